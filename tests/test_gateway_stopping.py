"""The gateway's stop and its wedged-scorer report, on a listening gateway over loopback:

* once stopping, a session that is still open gets 421 to a new transaction (the drain would cut it
  off), and a message still unfinished at the end of the grace is logged with its id and stage;
* a model or policy call that does not return makes /healthz answer 503 once the batch has run past
  server.scan_timeout, and ok again when it returns;
* the per-message log line names the model that scored the message.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from gateway_support import (
    TEST_POLICY,
    Sink,
    SinkBehaviour,
    config_for,
    load_scanner,
    make_message,
    open_store,
    run_gateway_scenario,
    send,
)

from milter.features import SCHEMA
from milter.gateway.server import Gateway
from milter.scan import prepare

Ports = Callable[[], int]
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"


class _SlowDownstream(SinkBehaviour):
    """The sink's DATA takes `delay` seconds; `reached` says a relay got that far."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.reached = False

    @property  # type: ignore[override]
    def data_delay(self) -> float:
        self.reached = True
        return self.delay

    @data_delay.setter
    def data_delay(self, _value: float) -> None:
        pass  # the dataclass's __init__ sets it


async def until(condition: Callable[[], bool], limit: float = 60.0) -> None:
    for _ in range(int(limit / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)  # polling state the gateway changes in the background
    raise AssertionError("condition not reached in time")


async def stopping_gateway(
    tmp_path: Path, free_port: Ports, scenario: Callable[[Gateway, Sink], Any], **server: Any
) -> None:
    """A started gateway whose `scenario` stops it itself (`gw.close`)."""
    sink = Sink()
    sink_port = await sink.start(free_port())
    url = f"sqlite:///{tmp_path}/gw.db"
    cfg = config_for(free_port(), sink_port, url, **server)
    store = open_store(url)
    gw = Gateway(cfg, load_scanner(cfg.policy), store, prepare=prepare, schema_digest=SCHEMA.digest)
    await gw.start()
    try:
        await scenario(gw, sink)
    finally:
        if gw._server is not None and gw._server.is_serving():  # the scenario did not stop it
            await gw.close(grace=1)
        await sink.stop()
        store.close()


def test_a_new_transaction_on_an_open_session_is_refused_while_stopping(
    tmp_path: Path, free_port: Ports
) -> None:
    async def scenario(gw: Gateway, sink: Sink) -> None:
        sink.behaviour.data_delay = 2.0  # the first message is still being relayed when the stop begins
        early_client, late = (
            aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.address[1], timeout=60, start_tls=False)
            for _ in range(2)
        )
        for client in (early_client, late):
            await client.connect()
            await client.ehlo()
        early = asyncio.ensure_future(
            early_client.sendmail("alice@sender.test", ["bob@rcpt.test"], make_message("early@test"))
        )
        await until(lambda: bool(gw._inflight))
        closing = asyncio.ensure_future(gw.close(grace=30))
        await until(lambda: gw._server is not None and not gw._server.is_serving())  # close() began
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await late.sendmail("alice@sender.test", ["bob@rcpt.test"], make_message("late@test"))
        assert (refused.value.code, refused.value.message) == (421, SHUTTING_DOWN[4:])
        _, reply = await early  # the message in progress was drained, not cut off
        assert reply.startswith("2.0.0 Ok")
        await closing
        assert sink.message_ids() == ["<early@test>"]
        for client in (early_client, late):
            client.close()

    asyncio.run(stopping_gateway(tmp_path, free_port, scenario))


def test_a_message_still_in_progress_at_the_end_of_the_grace_is_logged(
    tmp_path: Path, free_port: Ports, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(gw: Gateway, sink: Sink) -> None:
        downstream = sink.behaviour = _SlowDownstream(30.0)  # longer than the grace
        slow = asyncio.ensure_future(send(gw.address[1], make_message("slow@test"), smtp_timeout=60))
        await until(lambda: downstream.reached)
        await gw.close(grace=1)
        outcome = await slow
        assert outcome.code != 250  # cut off: no reply, so the sender keeps it and retries

    with caplog.at_level(logging.INFO, logger="milter.gateway"):
        asyncio.run(stopping_gateway(tmp_path, free_port, scenario, downstream_timeout=60.0))
    abandoned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("message_abandoned")]
    assert len(abandoned) == 1 and "stage=relay" in abandoned[0], caplog.text


POISON = "poison@sender.test"


class _HangingScanner:
    """The real scanner, whose policy does not return for one sender until released."""

    def __init__(self, real: Any, release: threading.Event) -> None:
        self._real = real
        self._release = release

    policy = property(lambda self: self._real.policy)
    classifier = property(lambda self: self._real.classifier)

    def predict(self, items: Sequence[Any]) -> Any:
        return self._real.predict(items)

    def decide(self, items: Sequence[Any], envelopes: Sequence[Any], probs: Any, words_of: Any = None,
               histories: Any = None) -> Any:
        if any(e.mail_from == POISON for e in envelopes):
            self._release.wait(120)
        return self._real.decide(items, envelopes, probs, words_of, histories)


def test_healthz_reports_a_model_call_that_does_not_return(tmp_path: Path, free_port: Ports) -> None:
    mport = free_port()
    release = threading.Event()

    async def healthz() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", mport)
        writer.write(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
        data = await reader.read()
        writer.close()
        return data

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        assert (await healthz()).endswith(b"ok\n")
        try:
            stuck = await send(gw.address[1], make_message("p@test"), mail_from=POISON)
            assert stuck.code == 451  # its scan_timeout passed
            await until(lambda: gw.health() is not None)  # the batch outlasts scan_timeout
            answer = await healthz()
            assert answer.startswith(b"HTTP/1.0 503") and b"model batch running" in answer
        finally:
            release.set()
        await until(lambda: gw.health() is None)
        assert (await send(gw.address[1], make_message("after@test"))).code == 250

    run_gateway_scenario(
        tmp_path, free_port, scenario, scanner=_HangingScanner(load_scanner(TEST_POLICY), release),
        scan_timeout=2.0, metrics_listen=f"127.0.0.1:{mport}",
    )


def test_the_message_log_line_names_the_model(
    tmp_path: Path, free_port: Ports, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        assert (await send(gw.address[1], make_message("m@test"))).code == 250

    scanner = load_scanner(TEST_POLICY)
    with caplog.at_level(logging.INFO, logger="milter.gateway"):
        run_gateway_scenario(tmp_path, free_port, scenario, scanner=scanner)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("message id=")]
    assert f" model={scanner.classifier.name} " in line


def test_a_milter_message_finished_while_stopping_is_tempfailed_not_scanned(
    tmp_path: Path, free_port: Ports
) -> None:
    from test_milter_faults import BODY, MILTER, _talk

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        gw.stopping = True  # as close() sets it first: the MTA keeps the message and retries it
        packets = await _talk(gw, "alice@sender.test", BODY)
        assert packets[-1] == (b"y", SHUTTING_DOWN.encode() + b"\x00")
        assert gw.metrics.registry.get_sample_value("milter_messages_total", {"action": "accept",
                                                                              "verdict": "ham"}) is None

    run_gateway_scenario(tmp_path, free_port, scenario, **MILTER)
