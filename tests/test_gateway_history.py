"""The gateway's correspondence history (milter/gateway/history.py) on the real stores: two keepers on one
store learn from each other, a failed write is kept for the next, an unreadable table means "unknown"
(counted, logged, mail unaffected); and end to end over SMTP: a borrowed display name is tagged, the
history survives a restart, and a dropped history table never costs a message."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosmtplib
import numpy as np
import pytest
import sqlalchemy as sa
from gateway_support import TEST_POLICY, Sink, config_for, load_scanner, running_gateway

from milter.config import HistoryConfig
from milter.features.summary import MessageSummary
from milter.gateway.history import HistoryKeeper
from milter.gateway.metrics import GatewayMetrics
from milter.gateway.server import Gateway
from milter.history import HistoryLimits
from milter.scan import ScanResult
from milter.store import Store
from milter.store.models import HISTORY
from milter.types import Action, Envelope, Scores, Verdict

OUR = "bob@rcpt.test"
ENV = Envelope(rcpt_tos=(OUR,))


def summary(sender: str, display: str) -> MessageSummary:
    return MessageSummary(message_id="<m@t>", subject="hi", from_addr=sender, from_display=display,
                          from_domain=sender.rpartition("@")[2], reply_to_addr=None, to_addrs=(OUR,),
                          date=None, defects=())


def delivered(sender: str, display: str = "Jane Doe", teaches: bool = True) -> ScanResult:
    return ScanResult(verdict=Verdict.HAM, action=Action.ACCEPT, scores=Scores(1.0, 0.0, 0.0), reasons=(),
                      model="m", summary=summary(sender, display), vector=np.zeros(1, np.float32),
                      teaches=teaches)


def keeper(store: Store, metrics: GatewayMetrics | None = None, clock: Callable[[], float] | None = None,
           **cfg: Any) -> HistoryKeeper:
    executor = ThreadPoolExecutor(max_workers=1)
    return HistoryKeeper(HistoryConfig(**cfg), store, executor, metrics or GatewayMetrics(),
                         **({"clock": clock} if clock else {}))


def known(k: HistoryKeeper, sender: str) -> bool:
    found = k.lookup(summary(sender, "Jane Doe"), ENV, ())
    assert found is not None
    return found.view.address is not None


def counter(metrics: GatewayMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


def test_two_keepers_on_one_store_learn_from_each_other(url: str) -> None:
    async def main() -> None:
        with Store.open(url) as store:
            a, b = keeper(store), keeper(store)
            assert await a.load() and await b.load()
            a.learn(delivered("jane.doe@vendor.test"), ENV)
            a.learn(delivered("spam@bad.test", teaches=False), ENV)  # held or bad mail: never learned
            assert known(a, "jane.doe@vendor.test") and not known(b, "jane.doe@vendor.test")
            assert await a.flush() > 0
            assert await b.refresh()
            assert known(b, "jane.doe@vendor.test") and not known(b, "spam@bad.test")
            # deltas add up: b learns the same sender once more, a reads the total (2)
            b.learn(delivered("jane.doe@vendor.test"), ENV)
            await b.flush()
            await a.refresh()
            view = a.lookup(summary("jane.doe@vendor.test", "Jane Doe"), ENV, ())
            assert view is not None and view.view.address is not None
            assert view.view.address.inbound == 2
            # a third process started now loads everything
            c = keeper(store)
            assert await c.load() and known(c, "jane.doe@vendor.test")
    asyncio.run(main())


def test_unknown_until_loaded_and_when_the_table_is_gone(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        with Store.open(url) as store:
            metrics = GatewayMetrics()
            k = keeper(store, metrics)
            assert k.lookup(summary("a@x.test", "A B"), ENV, ()) is None  # not loaded yet: unknown
            assert counter(metrics, "milter_history_unknown_total") == 1
            with store.engine.begin() as conn:
                conn.execute(sa.text("DROP TABLE history"))
            caplog.set_level(logging.INFO, "milter.gateway")
            assert not await k.load()
            assert not k.ready and k.lookup(summary("a@x.test", "A B"), ENV, ()) is None
            assert counter(metrics, "milter_history_unknown_total") == 2
            assert counter(metrics, "milter_errors_total", {"kind": "history"}) == 1
            assert [r for r in caplog.records if "history_unavailable" in r.getMessage()]
            # learning while unknown is journalled, and written once the table is back
            k.learn(delivered("jane.doe@vendor.test"), ENV)
            assert await k.flush() == 0
            assert counter(metrics, "milter_errors_total", {"kind": "history"}) == 2
            # logged once per outage, not once per failure
            assert len([r for r in caplog.records if "history_unavailable" in r.getMessage()]) == 1
        with Store.open(url) as store:  # the table back (as the migration made it), the store reachable
            with store.engine.begin() as conn:
                HISTORY.create(conn)
            k._store = store  # the same keeper, its store reachable again
            assert await k.flush() > 0
            assert await k.load() and known(k, "jane.doe@vendor.test")
            assert any("history_available" in r.getMessage() or "history_loaded" in r.getMessage()
                       for r in caplog.records)
    asyncio.run(main())


def test_the_hourly_purge_trims_the_table_to_what_a_history_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows for more senders than `max_entries` (a history keeps no more): the keeper's hourly purge
    deletes the oldest from the store, so the table, and every start's read of it, stays bounded."""
    async def main() -> None:
        with Store.open(f"sqlite:///{tmp_path}/h.db") as store:
            k = keeper(store, max_entries=20)
            assert await k.load()
            for n in range(30):
                k.learn(delivered(f"p{n}@s{n}.test"), ENV)
                assert await k.flush() > 0  # one at a time: each a later last_seen
            caplog.set_level(logging.INFO, "milter.gateway")
            def addresses() -> list[str]:
                return [r.key for r in store.history_rows() if r.kind == "address"]

            assert len(addresses()) == 30
            await k._purge(time.time())
            assert len(addresses()) == 20 and "p29@s29.test" in addresses()
            assert any("history_trimmed" in r.getMessage() for r in caplog.records)
    asyncio.run(main())


def test_the_journal_is_bounded_while_the_store_is_down(tmp_path: Path) -> None:
    async def main() -> None:
        with Store.open(f"sqlite:///{tmp_path}/h.db") as store:
            metrics = GatewayMetrics()
            k = keeper(store, metrics, max_entries=20)
            assert await k.load()
            with store.engine.begin() as conn:
                conn.execute(sa.text("DROP TABLE history"))
            for n in range(30):  # 30 senders: more rows than max_entries
                k.learn(delivered(f"p{n}@s{n}.test"), ENV)
            assert await k.flush() == 0
            assert counter(metrics, "milter_errors_total", {"kind": "history_dropped"}) > 0
            assert known(k, "p29@s29.test")  # memory keeps what it learned (up to its own caps)
    asyncio.run(main())


class DownStore:
    """A store whose history writes all fail (the journal is kept), for the keeper's own costs."""

    def history_apply(self, rows: Any) -> int:
        raise RuntimeError("store down")

    def history_rows(self, since: float | None = None) -> list[Any]:
        return []

    def history_purge(self, before: float) -> int:
        return 0

    def history_trim(self, caps: Any) -> int:
        return 0


def test_the_journal_keeps_a_name_s_addresses_as_the_history_does() -> None:
    """While the store is down, a common display name's addresses pile up in the journal; each message
    scans them on the event loop, so the journal keeps as many as the history (max_per_identity)."""
    async def main() -> None:
        k = keeper(DownStore())  # type: ignore[arg-type]
        assert await k.load()
        for n in range(200):
            k.learn(delivered(f"p{n}@s{n}.test", "Pat Smith"), ENV)
            if n % 50 == 49:
                assert await k.flush() == 0  # fails: the journal is kept for the next try
        members = k._journal.names["pat smith"]
        assert len(members) == HistoryLimits().max_per_identity
        assert "p199@s199.test" in members  # the newest are the ones kept
        assert len(k._journal.addresses) == 200  # the deltas of every sender are all still there
    asyncio.run(main())


def test_a_bounce_s_name_is_not_learned_by_the_keeper(url: str) -> None:
    """The keeper gives the history the envelope: a null sender is a machine's mail."""
    async def main() -> None:
        with Store.open(url) as store:
            k = keeper(store)
            assert await k.load()
            bounce = Envelope(mail_from="", rcpt_tos=(OUR,))
            k.learn(delivered("bounces@mx.partner.test", "Mail Delivery System"), bounce)
            k.learn(delivered("bounces@mx.partner.test", "Mail Delivery System"), bounce)
            k.learn(delivered("jane.doe@vendor.test", "Jane Doe"), Envelope(mail_from="j@vendor.test",
                                                                             rcpt_tos=(OUR,)))
            await k.flush()
            names = {r.key for r in store.history_rows() if r.kind == "name"}
            assert names == {"doe jane"}
            found = k.lookup(summary("bounces@mx.other.test", "Mail Delivery System"), bounce, ())
            assert found is not None and found.facts.machine
    asyncio.run(main())


# --- end to end over SMTP -----------------------------------------------------------------------------

POLICY = replace(TEST_POLICY, internal_networks=(), protected_domains=("rcpt.test",))


def letter(sender: str, display: str, mid: str) -> bytes:
    return (f"From: {display} <{sender}>\r\nTo: {OUR}\r\nSubject: Quarterly figures\r\n"
            f"Message-ID: <{mid}>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\n"
            "Please find the figures attached.\r\n").encode()


async def send_one(port: int, raw: bytes, sender: str) -> str:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await client.connect()
    _, text = await client.sendmail(sender, [OUR], raw)
    await client.quit()
    return text


async def until_ready(gw: Gateway) -> None:
    assert gw.history is not None
    for _ in range(200):
        if gw.history.ready:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("history never loaded")


def test_a_borrowed_name_is_tagged_and_the_history_survives_a_restart(
    tmp_path: Path, free_port: Any
) -> None:
    url = f"sqlite:///{tmp_path}/gw.db"
    store = Store.open(url)
    sink_port = free_port()
    cfg = replace(config_for(free_port(), sink_port, url), policy=POLICY)
    scanner = load_scanner(POLICY)
    real, fake = "jane.doe@vendor.test", "jane.doe.vendor@gmail.com"

    async def main() -> None:
        sink = Sink()
        await sink.start(sink_port)
        async with running_gateway(cfg, scanner, store) as gw:
            await until_ready(gw)
            for n in range(2):
                await send_one(gw.address[1], letter(real, "Jane Doe", f"real{n}@t"), real)
            await send_one(gw.address[1], letter(fake, "Jane Doe", "fake1@t"), fake)
        first, second, borrowed = sink.messages
        assert b"X-Milter-Verdict" not in first.raw  # first contact is a note, not a tag
        assert b"X-Milter-Verdict" not in second.raw
        assert b"X-Milter-Verdict: bec" in borrowed.raw
        assert b"display name 'Jane Doe' has come from jane.doe@vendor.test" in borrowed.raw
        rows = {(r.kind, r.key, r.member): r for r in store.history_rows()}
        assert rows[("pair", real, OUR)].inbound == 2  # written at close: nothing learned is lost
        # a restarted gateway loads the history: the borrowed name is still caught
        again = replace(cfg, server=replace(cfg.server, listen=f"127.0.0.1:{free_port()}"))
        async with running_gateway(again, scanner, store) as gw:
            await until_ready(gw)
            await send_one(gw.address[1], letter("jdoe.accounts@outlook.com", "Jane Doe", "fake2@t"),
                           "jdoe.accounts@outlook.com")
        assert b"X-Milter-Verdict: bec" in sink.messages[-1].raw
        await sink.stop()

    asyncio.run(main())
    rows = store.history_sources()
    # the real mail teaches; the borrowed name's tags do not (the attacker's next message is tagged too)
    assert [r.teaches for r in rows] == [True, True, False, False]
    store.close()


def test_a_dropped_history_table_never_costs_a_message(
    tmp_path: Path, free_port: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path}/gw.db"
    store = Store.open(url)
    sink_port = free_port()
    cfg = replace(config_for(free_port(), sink_port, url), policy=replace(
        POLICY, history=HistoryConfig(flush_seconds=0.05, refresh_seconds=0.1)))
    caplog.set_level(logging.INFO, "milter.gateway")

    async def main() -> None:
        sink = Sink()
        await sink.start(sink_port)
        async with running_gateway(cfg, load_scanner(cfg.policy), store) as gw:
            await until_ready(gw)
            with store.engine.begin() as conn:
                conn.execute(sa.text("DROP TABLE history"))
            replies = [await send_one(gw.address[1], letter(f"p{n}@s{n}.test", "P Q", f"d{n}@t"),
                                      f"p{n}@s{n}.test") for n in range(5)]
            await asyncio.sleep(0.3)  # flushes and refreshes fail meanwhile
            assert all(r.startswith("2.0.0") for r in replies)
            metrics = gw.metrics
            assert counter(metrics, "milter_errors_total", {"kind": "history"}) >= 1
            assert counter(metrics, "milter_history_ready") == 1  # what it holds in memory stays
        assert len(sink.messages) == 5
        await sink.stop()

    asyncio.run(main())
    assert [r for r in caplog.records if "history_unavailable" in r.getMessage()]
    assert len(store.quarantine_list()) == 0 and store.stats().messages == 5
    store.close()


def test_loading_is_retried_every_refresh_interval_until_the_table_is_back(tmp_path: Path) -> None:
    async def main() -> None:
        with Store.open(f"sqlite:///{tmp_path}/h.db") as store:
            with store.engine.begin() as conn:
                conn.execute(sa.text("ALTER TABLE history RENAME TO history_away"))
            metrics = GatewayMetrics()
            k = keeper(store, metrics, refresh_seconds=0.3, flush_seconds=0.02)
            k.start()
            await asyncio.sleep(1.0)
            attempts = counter(metrics, "milter_errors_total", {"kind": "history"})
            assert 2 <= attempts <= 5  # every 0.3 s, not at every 0.02 s flush
            assert not k.ready and counter(metrics, "milter_history_ready") == 0
            with store.engine.begin() as conn:
                conn.execute(sa.text("ALTER TABLE history_away RENAME TO history"))
            await asyncio.sleep(0.5)
            assert k.ready and counter(metrics, "milter_history_ready") == 1
            await k.close()
    asyncio.run(main())
