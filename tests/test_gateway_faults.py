"""Fault injection, each ending in an exact accounting by Message-ID (see gateway_support.account):
every message that got 250 is at the sink or in the quarantine exactly once; every other got 4xx."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gateway_support import (
    QUARANTINE_SENDER,
    TEST_POLICY,
    Sink,
    account,
    load_scanner,
    make_message,
    run_gateway_scenario,
    send,
)

from milter.classifier import Classifier
from milter.errors import ModelError
from milter.gateway.server import Gateway
from milter.store import Store

Ports = Callable[[], int]


def mixed(prefix: str, n: int) -> list[tuple[bytes, str]]:
    """n messages, every third one for the quarantine."""
    return [
        (make_message(f"{prefix}{i}@test"), QUARANTINE_SENDER if i % 3 == 0 else "alice@sender.test")
        for i in range(n)
    ]


async def send_all(port: int, msgs: list[tuple[bytes, str]]) -> list[Any]:
    return list(await asyncio.gather(*(send(port, raw, mail_from=sender) for raw, sender in msgs)))


def test_downstream_down_tempfails_relays_and_recovers(tmp_path: Path, free_port: Ports) -> None:
    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        outs = await send_all(gw.address[1], mixed("down", 6))
        relayed = [o for o in outs if not o.mid.startswith("<down0") and not o.mid.startswith("<down3")]
        assert all(o.code == 451 and o.text.startswith("4.4.1") for o in relayed)
        assert sum(o.code == 250 for o in outs) == 2  # the quarantined ones do not need the downstream
        await sink.start(int(gw.config.server.downstream.rsplit(":", 1)[1]))
        retry = await send_all(gw.address[1], mixed("up", 3))
        assert all(o.code == 250 for o in retry)
        account(outs + retry, sink, store)

    run_gateway_scenario(tmp_path, free_port, scenario, sink_up=False)


def test_downstream_slow_beyond_timeout(tmp_path: Path, free_port: Ports) -> None:
    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        sink.behaviour.data_delay = 3.0
        outs = await send_all(gw.address[1], mixed("slow", 4))
        assert [o.code for o in outs] == [250, 451, 451, 250]
        sink.behaviour.data_delay = 0.0
        fast = await send_all(gw.address[1], mixed("fast", 2))
        assert all(o.code == 250 for o in fast)
        account(outs + fast, sink, store)

    run_gateway_scenario(tmp_path, free_port, scenario, downstream_timeout=0.5)


def test_downstream_4xx_and_5xx_passed_back(tmp_path: Path, free_port: Ports) -> None:
    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        sink.behaviour.data_reply = "452 4.3.1 Insufficient system storage"
        temp = await send(gw.address[1], make_message("t1@test"))
        assert (temp.code, temp.text) == (452, "4.3.1 Insufficient system storage")
        sink.behaviour.data_reply = "554 5.6.0 Content refused"
        perm = await send(gw.address[1], make_message("p1@test"))
        assert (perm.code, perm.text) == (554, "5.6.0 Content refused")
        sink.behaviour.data_reply = None
        ok = await send(gw.address[1], make_message("ok1@test"))
        assert ok.code == 250
        assert sink.message_ids() == ["<ok1@test>"]
        account([temp, ok], sink, store)

    run_gateway_scenario(tmp_path, free_port, scenario)


def test_store_unavailable(tmp_path: Path, free_port: Ports) -> None:
    """SQLite locked by another writer: quarantine tempfails, relayed mail still flows."""
    url = f"sqlite:///{tmp_path}/gw.db"
    store = Store.open(url, busy_timeout_ms=200)  # a locked database fails fast
    lock = sqlite3.connect(tmp_path / "gw.db", isolation_level=None)

    async def scenario(gw: Gateway, sink: Sink, st: Any) -> None:
        lock.execute("BEGIN EXCLUSIVE")
        outs = await send_all(gw.address[1], mixed("locked", 6))
        await gw.processor.drain()
        lock.execute("ROLLBACK")
        for o in outs:
            held = o.mid.startswith(("<locked0", "<locked3"))
            assert o.code == (451 if held else 250), o
        assert sorted(map(str, sink.message_ids())) == sorted(o.mid for o in outs if o.code == 250)
        errors = gw.metrics.registry.get_sample_value("milter_errors_total", {"kind": "store_record"})
        assert errors == 4  # each relayed message's verdict record failed, and was counted
        again = await send_all(gw.address[1], mixed("unlocked", 3))
        assert all(o.code == 250 for o in again)
        account(outs + again, sink, st)

    run_gateway_scenario(tmp_path, free_port, scenario, store=store)
    lock.close()


class FailingClassifier(Classifier):
    """Fault injection: the model session fails at inference."""

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        raise ModelError("injected inference failure")


def test_model_failure_tempfails_or_accepts_unscanned(tmp_path: Path, free_port: Ports) -> None:
    async def tempfail(gw: Gateway, sink: Sink, store: Any) -> None:
        outs = await send_all(gw.address[1], mixed("mf", 3))
        assert all((o.code, o.text[:5]) == (451, "4.3.0") for o in outs)
        assert sink.messages == []
        account(outs, sink, store)

    async def accept(gw: Gateway, sink: Sink, store: Any) -> None:
        outs = await send_all(gw.address[1], mixed("ma", 3))
        assert all(o.code == 250 for o in outs)
        assert all(m.raw.startswith(b"X-Milter-Verdict: unscanned\r\n") for m in sink.messages)
        account(outs, sink, store)

    scanner = load_scanner(TEST_POLICY, FailingClassifier)
    (tmp_path / "t").mkdir()
    # the warm-up at start scores one message: a failing model must not stop the gateway from serving
    run_gateway_scenario(tmp_path / "t", free_port, tempfail, scanner=scanner)
    on_accept = replace(TEST_POLICY, on_error="accept")
    run_gateway_scenario(
        tmp_path, free_port, accept, scanner=load_scanner(on_accept, FailingClassifier), policy=on_accept
    )


def test_client_drops_mid_data(tmp_path: Path, free_port: Ports) -> None:
    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.address[1])
        await reader.readline()
        for cmd in (b"EHLO c.test", b"MAIL FROM:<a@sender.test>", b"RCPT TO:<b@rcpt.test>", b"DATA"):
            writer.write(cmd + b"\r\n")
            await writer.drain()
            while (await reader.readline())[3:4] == b"-":
                pass
        writer.write(make_message("dropped@test")[:60])
        await writer.drain()
        writer.close()
        ok = await send(gw.address[1], make_message("after-drop@test"))
        assert ok.code == 250
        assert sink.message_ids() == ["<after-drop@test>"]
        assert "dropped" not in str(await asyncio.to_thread(store.quarantine_list))

    run_gateway_scenario(tmp_path, free_port, scenario)
