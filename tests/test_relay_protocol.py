"""The relay against a downstream that does not speak SMTP (issue 13), on loopback sockets.

A small fake downstream answers one step of the transaction (its greeting, EHLO, MAIL, RCPT, DATA, or
the end of the message) with something that is not a valid reply there: a line without a reply code,
a code that is not three digits, a line over aiosmtplib's 8192-byte limit, a code outside 2yz-5yz, a
success code where a refusal or the 354 was due. Each must end as `DownstreamProtocolError` (451 4.5.0:
the sender retries), the connection closed and never pooled. Before the 354 on a reused connection
the relay retries once on a fresh one; after the 354 never (the message may have arrived: a duplicate
is better than a loss, but the relay itself must not make one). A bug inside the relay (any other
exception) also closes the connection; the gateway answers it 451 and keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from gateway_support import (
    Received,
    Sink,
    account,
    make_message,
    message_id,
    quarantined_ids,
    run_gateway_scenario,
    send,
)

from milter.errors import DeliveryError, DownstreamProtocolError, smtp_reply
from milter.gateway import relay_data
from milter.gateway.relay import Downstream
from milter.gateway.server import Gateway
from milter.gateway.xforward import XForward

SENDER, RCPT = "a@sender.test", "b@rcpt.test"
ONE = make_message("one@test")
TWO = make_message("two@test")
THREE = make_message("three@test")
PROTOCOL_REPLY = "451 4.5.0 Downstream relay sent an invalid reply, try again later"

#: The normal reply at each step; `FakeDownstream.faults` replaces them.
NORMAL: dict[str, bytes] = {
    "greeting": b"220 fake.test ESMTP\r\n",
    "EHLO": b"250-fake.test\r\n250-XFORWARD NAME ADDR\r\n250 8BITMIME\r\n",
    "XFORWARD": b"250 2.0.0 Ok\r\n",
    "MAIL": b"250 2.1.0 Ok\r\n",
    "RCPT": b"250 2.1.5 Ok\r\n",
    "DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    "end": b"250 2.0.0 Ok: queued\r\n",
}
STAGES = tuple(NORMAL)
BEFORE_354 = ("XFORWARD", "MAIL", "RCPT", "DATA")  # the steps a reused connection can fail at before the 354
#: What the gateway passes on about its client: makes the relay send XFORWARD (advertised above).
CLIENT = XForward(name="client.test", addr="192.0.2.1")

#: Replies that are not SMTP anywhere.
GARBAGE: dict[str, bytes] = {
    "no-code": b"abc\r\n",
    "two-digit-code": b"25 ok\r\n",  # aiosmtplib reads int(b"25 ") == 25: no parse error, code 25
    "letter-in-code": b"2x0 ok\r\n",
    "over-long-line": b"250 " + b"x" * 9000 + b"\r\n",  # over aiosmtplib's MAX_LINE_LENGTH: even a 250
    "over-long-reply": b"250-" + b"y" * 1000 + b"\r\n" + b"250-more\r\n" * 4000,  # over 32 KiB, unended
    "code-999": b"999 what\r\n",  # three digits, but no SMTP reply class
}

#: Valid reply lines where they make no sense: passed back as they were, they would tell the client
#: "delivered" (a 250 to DATA: the message was never sent) or give it a code it cannot act on.
WRONG_CLASS: list[tuple[str, bytes]] = [
    ("MAIL", b"354 go ahead\r\n"),
    ("MAIL", b"251 ok\r\n"),
    ("RCPT", b"354 go ahead\r\n"),
    ("DATA", b"250 ok\r\n"),
    ("end", b"354 more?\r\n"),
    ("end", b"220 hello again\r\n"),
]


@dataclass
class FakeDownstream:
    """Enough SMTP for the relay, with faults. `faults[stage]`: the raw replies the next occurrences of
    that step get instead of the normal one, in order; then the normal one again."""

    faults: dict[str, list[bytes]] = field(default_factory=dict)
    received: list[bytes] = field(default_factory=list)  # each message as sent after the 354
    connections: int = 0
    closed_by_relay: int = 0  # connections the relay closed (EOF or reset) rather than ended with QUIT
    data_commands: int = 0
    port: int = 0
    open: set[asyncio.StreamWriter] = field(default_factory=set)
    seen: list[bytes] = field(default_factory=list)  # the commands' verbs, in order
    lines: list[bytes] = field(default_factory=list)  # the command lines, in order
    _changed: asyncio.Event = field(default_factory=asyncio.Event)  # set on every command and close

    def reply(self, stage: str) -> bytes:
        queue = self.faults.get(stage)
        return queue.pop(0) if queue else NORMAL[stage]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open.add(writer)
        try:
            writer.write(self.reply("greeting"))
            while line := await reader.readline():
                verb = line[:4].upper()
                self.seen.append(verb)
                self.lines.append(line)
                self._changed.set()
                if verb == b"QUIT":
                    writer.write(b"221 Bye\r\n")
                    return
                if verb == b"DATA":
                    await self._data(reader, writer)
                elif verb in (b"EHLO", b"MAIL", b"RCPT"):
                    writer.write(self.reply(verb.decode()))
                elif line.upper().startswith(b"XFORWARD"):
                    writer.write(self.reply("XFORWARD"))
                else:  # RSET, NOOP
                    writer.write(b"250 Ok\r\n")
                await writer.drain()
            if writer in self.open:  # EOF without QUIT, and not our own close at the end of the test
                self._closed_by_relay()
        except ConnectionError:
            self._closed_by_relay()
        finally:
            self.open.discard(writer)
            writer.close()

    async def _data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.data_commands += 1
        reply = self.reply("DATA")
        writer.write(reply)
        if reply != NORMAL["DATA"]:
            return  # no 354 from us: whatever the relay sends next is read as commands
        await writer.drain()
        self.received.append(await reader.readuntil(b"\r\n.\r\n"))
        writer.write(self.reply("end"))

    def _closed_by_relay(self) -> None:
        self.closed_by_relay += 1
        self._changed.set()

    async def closed(self, count: int) -> None:
        """Wait until the relay has closed `count` connections (it closes them at once, or never)."""
        await self._until(lambda: self.closed_by_relay >= count)

    async def reached(self, verb: bytes) -> None:
        await self._until(lambda: verb in self.seen)

    async def _until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not done():
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def fake_downstream(
    port: int = 0, faults: dict[str, list[bytes]] | None = None
) -> AsyncIterator[FakeDownstream]:
    fake = FakeDownstream(faults=dict(faults or {}))
    server = await asyncio.start_server(fake.handle, "127.0.0.1", port, limit=1 << 20)
    fake.port = int(server.sockets[0].getsockname()[1])
    try:
        yield fake
    finally:
        server.close()
        # End the connections the relay left open (the unfixed relay leaked them), so that no handler
        # is cancelled mid-read when the test's loop ends.
        writers, fake.open = list(fake.open), set()
        for writer in writers:
            writer.close()
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def relay_to(fake: FakeDownstream) -> AsyncIterator[Downstream]:
    ds = Downstream("127.0.0.1", fake.port, 5.0, "gw.test", size=1)  # one connection: reused
    try:
        yield ds
    finally:
        await ds.close()


def wire(raw: bytes) -> bytes:
    return raw + b".\r\n"  # what the fake server keeps of a message (CRLF already, no leading dots)


def assert_protocol_error(exc: DeliveryError, fake: FakeDownstream, stage: str) -> None:
    assert isinstance(exc, DownstreamProtocolError)
    assert smtp_reply(exc) == PROTOCOL_REPLY
    # the log line (process.py's relay_failed, detail=str(exc)) names the downstream and the step
    assert f"127.0.0.1:{fake.port}" in str(exc) and stage in str(exc)


# -- the relay alone -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", GARBAGE)
@pytest.mark.parametrize("stage", STAGES)
def test_garbage_on_a_fresh_connection_is_a_451_and_drops_the_connection(stage: str, variant: str) -> None:
    """No retry on a fresh connection (nothing to blame on a stale one); the next message gets a new
    connection; after the 354 the message was sent exactly once."""

    async def main() -> None:
        async with fake_downstream(faults={stage: [GARBAGE[variant]]}) as fake, relay_to(fake) as ds:
            with pytest.raises(DeliveryError) as exc:
                await ds.deliver(ONE, SENDER, [RCPT], xforward=CLIENT)
            assert_protocol_error(exc.value, fake, stage)
            await fake.closed(1)
            assert fake.connections == 1
            assert fake.data_commands == (1 if stage in ("DATA", "end") else 0)
            assert fake.received == ([wire(ONE)] if stage == "end" else [])
            assert (await ds.deliver(TWO, SENDER, [RCPT], xforward=CLIENT)).code == 250
            assert fake.connections == 2

    asyncio.run(main())


@pytest.mark.parametrize(("stage", "reply"), WRONG_CLASS)
def test_a_reply_of_the_wrong_class_is_a_451_never_passed_back(stage: str, reply: bytes) -> None:
    async def main() -> None:
        async with fake_downstream(faults={stage: [reply]}) as fake, relay_to(fake) as ds:
            with pytest.raises(DeliveryError) as exc:
                await ds.deliver(ONE, SENDER, [RCPT], xforward=CLIENT)
            assert_protocol_error(exc.value, fake, stage)
            await fake.closed(1)
            assert (await ds.deliver(TWO, SENDER, [RCPT], xforward=CLIENT)).code == 250
            assert fake.connections == 2

    asyncio.run(main())


@pytest.mark.parametrize("stage", BEFORE_354)
def test_garbage_before_354_on_a_reused_connection_is_retried_once(stage: str) -> None:
    async def main() -> None:
        async with fake_downstream() as fake, relay_to(fake) as ds:
            assert (await ds.deliver(ONE, SENDER, [RCPT], xforward=CLIENT)).code == 250
            fake.faults[stage] = [GARBAGE["no-code"]]
            # retried on a fresh connection
            assert (await ds.deliver(TWO, SENDER, [RCPT], xforward=CLIENT)).code == 250
            await fake.closed(1)
            assert fake.connections == 2
            assert fake.received == [wire(ONE), wire(TWO)]  # each exactly once
            assert fake.data_commands == 2 + (stage == "DATA")  # the garbled DATA got no 354

    asyncio.run(main())


@pytest.mark.parametrize("stage", BEFORE_354)
def test_garbage_again_on_the_fresh_connection_is_a_451(stage: str) -> None:
    async def main() -> None:
        async with fake_downstream() as fake, relay_to(fake) as ds:
            assert (await ds.deliver(ONE, SENDER, [RCPT], xforward=CLIENT)).code == 250
            fake.faults[stage] = [GARBAGE["no-code"], GARBAGE["two-digit-code"]]
            with pytest.raises(DeliveryError) as exc:
                await ds.deliver(TWO, SENDER, [RCPT], xforward=CLIENT)
            assert_protocol_error(exc.value, fake, stage)
            await fake.closed(2)
            assert fake.connections == 2  # one retry, not more
            assert fake.received == [wire(ONE)]

    asyncio.run(main())


@pytest.mark.parametrize("variant", ["no-code", "over-long-line"])
def test_garbage_after_354_on_a_reused_connection_is_never_retried(variant: str) -> None:
    """The message went out after the 354 and may have arrived: a 451, one DATA, no second copy."""

    async def main() -> None:
        async with fake_downstream() as fake, relay_to(fake) as ds:
            assert (await ds.deliver(ONE, SENDER, [RCPT], xforward=CLIENT)).code == 250
            fake.faults["end"] = [GARBAGE[variant]]
            with pytest.raises(DeliveryError) as exc:
                await ds.deliver(TWO, SENDER, [RCPT], xforward=CLIENT)
            assert_protocol_error(exc.value, fake, "end")
            await fake.closed(1)
            assert (fake.connections, fake.data_commands) == (1, 2)
            assert fake.received == [wire(ONE), wire(TWO)]
            # the broken connection was not pooled: the next message opens a fresh one
            assert (await ds.deliver(THREE, SENDER, [RCPT], xforward=CLIENT)).code == 250
            assert (fake.connections, fake.data_commands) == (2, 3)

    asyncio.run(main())


@pytest.mark.parametrize(("stage", "reply"), [("greeting", b"554 5.3.2 No service\r\n"),
                                              ("EHLO", b"550 5.7.1 Go away\r\n")])
def test_a_valid_refusal_at_connect_stays_downstream_unavailable(stage: str, reply: bytes) -> None:
    """Valid SMTP, so no protocol error: the 451 4.4.1 it always was (never passed back: the message
    is fine, the downstream is not taking any)."""

    async def main() -> None:
        async with fake_downstream(faults={stage: [reply]}) as fake, relay_to(fake) as ds:
            with pytest.raises(DeliveryError) as exc:
                await ds.deliver(ONE, SENDER, [RCPT])
            assert not isinstance(exc.value, DownstreamProtocolError)
            assert smtp_reply(exc.value) == "451 4.4.1 Downstream relay unavailable, try again later"
            await fake.closed(1)

    asyncio.run(main())


def test_any_other_aiosmtplib_error_is_a_451_and_drops_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An aiosmtplib error the relay has no case for (SMTPNotSupported here, at DATA): 451, closed,
    retried once when it came before the 354 on a reused connection."""
    fail = 0

    async def start_data(client: Any) -> None:
        nonlocal fail
        if fail:
            fail -= 1
            raise aiosmtplib.SMTPNotSupported("injected")
        await real_start_data(client)

    real_start_data = relay_data.start_data
    monkeypatch.setattr("milter.gateway.relay.start_data", start_data)

    async def main() -> None:
        nonlocal fail
        async with fake_downstream() as fake, relay_to(fake) as ds:
            fail = 1
            with pytest.raises(DeliveryError) as exc:  # a fresh connection: no retry
                await ds.deliver(ONE, SENDER, [RCPT])
            assert smtp_reply(exc.value) == "451 4.4.1 Downstream relay unavailable, try again later"
            assert "SMTPNotSupported" in str(exc.value) and "at DATA" in str(exc.value)
            await fake.closed(1)
            assert (await ds.deliver(TWO, SENDER, [RCPT])).code == 250
            fail = 1  # now on the reused connection: retried on a fresh one
            assert (await ds.deliver(THREE, SENDER, [RCPT])).code == 250
            await fake.closed(2)
            assert fake.connections == 3 and fake.received == [wire(TWO), wire(THREE)]

    asyncio.run(main())


def test_a_cancelled_delivery_closes_the_connection() -> None:
    """The downstream never answers MAIL and the delivery is cancelled (a shutdown, a dropped
    session): the half-done transaction's connection is closed, not left open or pooled."""

    async def main() -> None:
        async with fake_downstream(faults={"MAIL": [b""]}) as fake, relay_to(fake) as ds:
            task = asyncio.create_task(ds.deliver(ONE, SENDER, [RCPT]))
            await fake.reached(b"MAIL")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await fake.closed(1)
            assert (await ds.deliver(TWO, SENDER, [RCPT])).code == 250
            assert fake.connections == 2 and fake.received == [wire(TWO)]

    asyncio.run(main())


def test_a_bug_inside_the_relay_closes_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any other exception in a transaction (here: building the DATA payload fails) leaves the
    connection in an unknown state: closed, never pooled; the exception goes on to process.py's
    catch-all (tested end to end below)."""

    def broken(raw: bytes) -> Any:
        raise RuntimeError("injected relay bug")

    async def main() -> None:
        async with fake_downstream() as fake, relay_to(fake) as ds:
            assert (await ds.deliver(ONE, SENDER, [RCPT], xforward=CLIENT)).code == 250
            with monkeypatch.context() as patch:
                patch.setattr(relay_data.DataPayload, "encode", broken)
                with pytest.raises(RuntimeError, match="injected relay bug"):
                    await ds.deliver(TWO, SENDER, [RCPT], xforward=CLIENT)
            await fake.closed(1)
            assert (await ds.deliver(THREE, SENDER, [RCPT], xforward=CLIENT)).code == 250
            assert fake.connections == 2 and fake.received == [wire(ONE), wire(THREE)]

    asyncio.run(main())


def test_send_body_closes_the_client_on_a_reply_it_cannot_parse() -> None:
    """relay_data alone: after the 354, garbage (aiosmtplib's SMTPResponseException) closes the client,
    as a lost connection or a timeout does: part of the message may sit in the downstream's DATA."""

    async def main() -> None:
        async with fake_downstream(faults={"end": [GARBAGE["no-code"]]}) as fake:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=fake.port, timeout=5, start_tls=False)
            await client.connect()
            await client.mail(SENDER)
            await client.rcpt(RCPT)
            await relay_data.start_data(client)
            with pytest.raises(aiosmtplib.SMTPResponseException, match="Malformed"):
                await relay_data.send_body(client, relay_data.DataPayload.encode(ONE))
            assert not client.is_connected
            await fake.closed(1)

    asyncio.run(main())


# -- through a listening gateway -----------------------------------------------------------------

Ports = Callable[[], int]


# -- addresses that need SMTPUTF8 (RFC 6531) -------------------------------------------------------

NO_UTF8_EHLO = NORMAL["EHLO"]
UTF8_EHLO = b"250-fake.test\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
UTF8_SENDER, UTF8_RCPT = "jürgen@sender.test", "zoë@rcpt.test"


@pytest.mark.parametrize(
    ("ehlo", "options", "why"),
    [
        (NO_UTF8_EHLO, ["SMTPUTF8"], "the downstream does not offer SMTPUTF8"),
        (UTF8_EHLO, [], "the client did not ask for SMTPUTF8"),
    ],
)
def test_a_non_ascii_sender_without_smtputf8_is_553_5_6_7_and_nothing_is_sent(
    ehlo: bytes, options: list[str], why: str
) -> None:
    """Not a 4xx (the sender would retry for days what can never go through), not an encoding
    error from inside aiosmtplib (that was a 451 with a traceback); the connection stays usable."""

    async def main() -> None:
        async with fake_downstream(faults={"EHLO": [ehlo]}) as fake, relay_to(fake) as ds:
            with pytest.raises(DeliveryError) as exc:
                await ds.deliver(ONE, UTF8_SENDER, [RCPT], options)
            assert (exc.value.smtp_code, exc.value.smtp_status) == (553, "5.6.7")
            assert smtp_reply(exc.value).startswith("553 5.6.7 Non-ASCII sender")
            assert why in str(exc.value) and UTF8_SENDER in str(exc.value)
            assert b"MAIL" not in fake.seen and fake.received == []
            assert (await ds.deliver(TWO, SENDER, [RCPT])).code == 250
            assert fake.connections == 1 and fake.closed_by_relay == 0

    asyncio.run(main())


def test_a_non_ascii_recipient_without_smtputf8_is_refused_alone() -> None:
    """Like any 5xx refusal among accepted recipients: delivered to the others, named in the reply."""

    async def main() -> None:
        async with fake_downstream() as fake, relay_to(fake) as ds:
            result = await ds.deliver(ONE, SENDER, [RCPT, UTF8_RCPT], ["SMTPUTF8"])
            assert result.code == 250
            assert [(r.recipient, r.code, r.text[:5]) for r in result.refused] == [(UTF8_RCPT, 553, "5.6.7")]
            assert [line for line in fake.lines if line.startswith(b"RCPT")] == [b"RCPT TO:<b@rcpt.test>\r\n"]
            assert fake.received == [wire(ONE)]

    asyncio.run(main())


def test_only_non_ascii_recipients_without_smtputf8_is_553_5_6_7() -> None:
    async def main() -> None:
        async with fake_downstream() as fake, relay_to(fake) as ds:
            with pytest.raises(DeliveryError) as exc:
                await ds.deliver(ONE, SENDER, [UTF8_RCPT], ["SMTPUTF8"])
            assert (exc.value.smtp_code, exc.value.smtp_status) == (553, "5.6.7")
            assert b"RCPT" not in fake.seen and b"DATA" not in fake.seen and fake.received == []

    asyncio.run(main())


BAD_UTF8_SENDER = b"x\xff@sender.test".decode("utf-8", "surrogateescape")  # as aiosmtpd hands it on
BAD_UTF8_RCPT = b"z\xff@rcpt.test".decode("utf-8", "surrogateescape")


def test_an_address_that_is_not_utf8_is_refused_with_553_not_retried_for_ever() -> None:
    """Bytes that are not UTF-8 in an SMTPUTF8 address: the encoding failed inside aiosmtplib, a 451
    with a traceback on every try. Now the sender is a 553 5.6.7 before anything is sent, and a
    recipient is refused alone, like any 5xx recipient."""

    async def main() -> None:
        async with fake_downstream(faults={"EHLO": [UTF8_EHLO]}) as fake, relay_to(fake) as ds:
            with pytest.raises(DeliveryError) as exc:
                await ds.deliver(ONE, BAD_UTF8_SENDER, [RCPT], ["SMTPUTF8"])
            assert (exc.value.smtp_code, exc.value.smtp_status) == (553, "5.6.7")
            assert b"MAIL" not in fake.seen and fake.received == []
            result = await ds.deliver(ONE, SENDER, [RCPT, BAD_UTF8_RCPT], ["SMTPUTF8"])
            assert result.code == 250 and fake.received == [wire(ONE)]
            refused = [(r.recipient, r.code, r.text[:5]) for r in result.refused]
            assert refused == [(BAD_UTF8_RCPT, 553, "5.6.7")]

    asyncio.run(main())


def test_non_ascii_addresses_go_through_when_both_hops_speak_smtputf8() -> None:
    async def main() -> None:
        async with fake_downstream(faults={"EHLO": [UTF8_EHLO]}) as fake, relay_to(fake) as ds:
            result = await ds.deliver(ONE, UTF8_SENDER, [UTF8_RCPT], ["SMTPUTF8"])
            assert (result.code, result.refused) == (250, ())
            mail = next(line for line in fake.lines if line.startswith(b"MAIL"))
            rcpt = next(line for line in fake.lines if line.startswith(b"RCPT"))
            assert UTF8_SENDER.encode() in mail and b"SMTPUTF8" in mail
            assert UTF8_RCPT.encode() in rcpt
            assert fake.received == [wire(ONE)]

    asyncio.run(main())


def test_gateway_answers_553_5_6_7_to_an_address_the_downstream_cannot_take(
    tmp_path: Path, free_port: Ports
) -> None:
    """Through a real gateway: its client speaks SMTPUTF8 (the gateway offers it), the downstream does
    not. The non-ASCII recipient alone is refused at the end of DATA; with an ASCII one beside it, the
    message is delivered to that one, and the sender gets a delivery report naming the other (from
    <>, status 5.6.7: milter.gateway.dsn)."""

    async def send_utf8(port: int, raw: bytes, rcpts: list[str]) -> tuple[int, str]:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30, start_tls=False)
        try:
            await client.connect()
            _, text = await client.sendmail(SENDER, rcpts, raw, mail_options=["SMTPUTF8"])
            return 250, text
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        finally:
            client.close()

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        async with fake_downstream(downstream_port(gw)) as fake:
            code, text = await send_utf8(gw.address[1], make_message("utf8-alone@test"), [UTF8_RCPT])
            assert (code, text[:5]) == (553, "5.6.7")
            code, text = await send_utf8(gw.address[1], make_message("utf8-mixed@test"), [RCPT, UTF8_RCPT])
            # named in the reply, in ASCII (a reply is ASCII unless the session negotiated otherwise)
            assert code == 250 and "<zo?@rcpt.test> (553)" in text
            assert message_id(fake.received[0]) == "<utf8-mixed@test>" and len(fake.received) == 2
            report = fake.received[1]
            assert b"report-type=delivery-status" in report and b"Status: 5.6.7" in report
            assert f"Final-Recipient: utf-8; {UTF8_RCPT}".encode() in report
            assert "utf8-alone@test" not in quarantined_ids(store)

    run_gateway_scenario(tmp_path, free_port, scenario, sink_up=False)


def downstream_port(gw: Gateway) -> int:
    return int(gw.config.server.downstream.rsplit(":", 1)[1])


def accepted(fake: FakeDownstream) -> Sink:
    """The fake's messages as a Sink, for gateway_support.account (by Message-ID)."""
    sink = Sink()
    sink.messages = [Received(SENDER, [RCPT], raw, XForward()) for raw in fake.received]
    return sink


def test_gateway_answers_451_to_downstream_garbage_and_keeps_serving(
    tmp_path: Path, free_port: Ports, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        faults = {"MAIL": [b"abc\r\n"], "end": [b"25 ok\r\n"]}
        async with fake_downstream(downstream_port(gw), faults) as fake:
            garbled = await send(gw.address[1], make_message("garbled@test"))
            assert (garbled.code, f"{garbled.code} {garbled.text}") == (451, PROTOCOL_REPLY)
            after_354 = await send(gw.address[1], make_message("after354@test"))
            assert (after_354.code, f"{after_354.code} {after_354.text}") == (451, PROTOCOL_REPLY)
            ok = await send(gw.address[1], make_message("next@test"))
            assert ok.code == 250
            # the message that got the garbage after the 354 went out once (the sender's retry may
            # duplicate it: never lost), the one after it too
            assert [message_id(m) for m in fake.received] == ["<after354@test>", "<next@test>"]
            assert fake.data_commands == 2
            account([garbled, after_354, ok], accepted(fake), store)
        failed = [r.getMessage() for r in caplog.records if "relay_failed" in r.getMessage()]
        assert len(failed) == 2
        assert f"127.0.0.1:{fake.port}" in failed[0] and "MAIL" in failed[0] and "abc" in failed[0]
        assert "reply code 25" in failed[1]

    with caplog.at_level(logging.INFO):
        run_gateway_scenario(tmp_path, free_port, scenario, sink_up=False)


def test_gateway_answers_451_to_a_bug_in_the_relay_and_keeps_serving(
    tmp_path: Path, free_port: Ports, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_encode = relay_data.DataPayload.encode
    calls = 0

    def broken_once(raw: bytes) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected relay bug")
        return real_encode(raw)

    monkeypatch.setattr(relay_data.DataPayload, "encode", broken_once)

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        async with fake_downstream(downstream_port(gw)) as fake:
            buggy = await send(gw.address[1], make_message("buggy@test"))
            assert (buggy.code, buggy.text) == (451, "4.3.0 Internal error, try again later")
            await fake.closed(1)
            ok = await send(gw.address[1], make_message("after-bug@test"))
            assert ok.code == 250
            assert [message_id(m) for m in fake.received] == ["<after-bug@test>"]
            assert fake.connections == 2
            account([buggy, ok], accepted(fake), store)
        assert "internal_error" in caplog.text and "injected relay bug" in caplog.text

    with caplog.at_level(logging.INFO):
        run_gateway_scenario(tmp_path, free_port, scenario, sink_up=False)
