"""SMTP front end of `milter serve`: aiosmtpd sessions, XFORWARD, scanning, relay and quarantine.

Modules, in the order a message meets them:

* `session`  -- aiosmtpd `SMTP` subclass: XFORWARD, limits, timeouts, reply rewriting.
* `process`  -- one message: prepare (process pool) -> micro-batched model -> action -> reply.
* `batcher`  -- `MicroBatcher`: groups concurrent sessions' items into one model call.
* `headers`  -- byte-level header hygiene and verdict headers (never re-serialises the message).
* `relay`    -- downstream delivery with a pool of reusable aiosmtplib clients.
* `metrics`  -- Prometheus metrics and `/healthz` on the metrics port.
* `reload`   -- SIGHUP: load, check and swap in the configured model without dropping a message.
* `server`   -- `Gateway`: wires the above on one event loop; `workers` runs N of them.

The contract that shapes all of it: a client gets 250 only once the message is accepted downstream
(downstream said 250) or committed to the quarantine store; every other outcome is a 4xx (the sending
MTA retries) or a 5xx the downstream or the before-queue policy chose.
"""
