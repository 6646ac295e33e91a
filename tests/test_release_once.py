"""Releasing a quarantined message exactly once (issue 16): two nodes releasing the same message at the
same moment deliver it once; a failed delivery leaves it held; an abandoned claim is taken over, a live
one is not; delete waits for a release; migration 0004 keeps held messages.

Real stores (SQLite and PostgreSQL, each "node" its own Store and engine, or its own process) and a real
aiosmtpd downstream on loopback that answers DATA slowly, so that two releases really overlap.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SMTPEnvelope
from click.testing import CliRunner
from store_support import make_result

from milter.cli import main
from milter.commands.quarantine_release import CLAIM_TIMEOUT_S, ReleaseOutcome, release
from milter.errors import StoreError
from milter.store import ClaimState, Store
from milter.store.models import QUARANTINE
from milter.types import Action, Envelope, Verdict

ENV = Envelope(mail_from="alice@example.com", rcpt_tos=("bob@example.org",), client_addr="192.0.2.7")
MILTER = Path(sys.executable).with_name("milter")
DEAD = "deadhost pid 1 0123456789abcdef"  # the claim token of a release whose process died
BUSY = "being released by another process since"
RACE_ROUNDS = 10


def _raw(mid: str) -> bytes:
    return f"Message-ID: <{mid}>\r\nSubject: Hi\r\n\r\nbody of {mid}\r\n".encode()


class SlowSink:
    """A downstream that answers DATA after `delay` seconds (with `reply`, default 250), keeping what
    it accepted; `on_data` runs first, on the sink's thread, while the release waits for the reply."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.reply: str | None = None
        self.on_data: Callable[[], None] | None = None
        self.received: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SMTPEnvelope) -> str:
        if self.on_data is not None:
            self.on_data()
        await asyncio.sleep(self.delay)
        if self.reply is not None:
            return self.reply
        self.received.append(envelope.original_content or b"")
        return "250 2.0.0 Ok: queued"

    def count(self, mid: str) -> int:
        return sum(1 for raw in self.received if f"<{mid}>".encode() in raw)


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    with Store.open(url) as s:
        yield s


def _start(handler: SlowSink, port: int) -> Controller:
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    return controller


@pytest.fixture
def sink(free_port: Callable[[], int]) -> Iterator[tuple[int, SlowSink]]:
    handler = SlowSink(delay=0.5)
    port = free_port()
    controller = _start(handler, port)
    try:
        yield port, handler
    finally:
        controller.stop()


def _hold(store: Store, mid: str) -> int:
    return store.record(make_result(message_id=f"<{mid}>"), ENV, _raw(mid), "d")


def _release(store: Store, id: int, port: int, claim_timeout: float = CLAIM_TIMEOUT_S) -> ReleaseOutcome:
    [outcome] = release(store, [id], "127.0.0.1", port, 5.0, "gw.test", label=True,
                        claim_timeout=claim_timeout)
    return outcome


def _claim_of(store: Store, id: int) -> tuple[str | None, datetime | None]:
    q = QUARANTINE.c
    with store.engine.connect() as conn:
        claim, at = conn.execute(
            sa.select(q.release_claim, q.release_claimed_at).where(q.message_pk == id)).one()
    return claim, at


def _age_claim(store: Store, id: int, seconds: float) -> None:
    """Move the claim's time into the past, as if its release had started `seconds` ago."""
    q = QUARANTINE.c
    with store.engine.begin() as conn:
        conn.execute(sa.update(QUARANTINE).where(q.message_pk == id)
                     .values(release_claimed_at=datetime.now(UTC) - timedelta(seconds=seconds)))


def _lost_the_race(o: ReleaseOutcome) -> bool:
    return not o.released and (o.detail.startswith(BUSY) or o.detail.startswith("already released at"))


# -- the race -------------------------------------------------------------------------------------


def _race(nodes: tuple[Store, Store], id: int, port: int) -> list[ReleaseOutcome]:
    """Both nodes release `id` at once, each on its own thread."""
    barrier = threading.Barrier(2)
    outcomes: dict[int, ReleaseOutcome] = {}

    def node(i: int) -> None:
        barrier.wait()
        outcomes[i] = _release(nodes[i], id, port)

    threads = [threading.Thread(target=node, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return [outcomes[0], outcomes[1]]


def test_concurrent_releases_from_two_nodes_deliver_once(url: str, sink: tuple[int, SlowSink]) -> None:
    port, handler = sink
    with Store.open(url) as a, Store.open(url) as b:
        busy = 0
        for n in range(RACE_ROUNDS):
            mid = f"race-{n}@x"
            id = _hold(a, mid)
            outcomes = _race((a, b), id, port)
            assert handler.count(mid) == 1, outcomes
            won = [o for o in outcomes if o.released]
            assert len(won) == 1 and won[0].detail.startswith("250"), outcomes
            [lost] = [o for o in outcomes if not o.released]
            assert _lost_the_race(lost), lost
            busy += lost.detail.startswith(BUSY)
            row = a.get(id)
            assert row is not None and row.released_at is not None and row.label == "ham"
            assert _claim_of(a, id) == (None, None)
        # the slow DATA makes them overlap: the loser usually met the winner's live claim
        assert busy >= RACE_ROUNDS // 2
    assert len(handler.received) == RACE_ROUNDS


def test_concurrent_release_commands_in_two_processes_deliver_once(
    url: str, free_port: Callable[[], int]
) -> None:
    handler = SlowSink(delay=2.0)  # longer than the CLI's start-up, so the two processes overlap
    port = free_port()
    controller = _start(handler, port)
    try:
        with Store.open(url) as store:
            for n in range(2):
                mid = f"proc-{n}@x"
                id = _hold(store, mid)
                cmd = [str(MILTER), "quarantine", "release", "--json", "--db", url,
                       "--downstream", f"127.0.0.1:{port}", str(id)]
                procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                         for _ in (0, 1)]
                done = [p.communicate(timeout=60) for p in procs]
                lines = [json.loads(out) for out, _ in done]
                assert sorted(p.returncode for p in procs) == [0, 1], done
                assert sorted(bool(o["released"]) for o in lines) == [False, True], lines
                [lost] = [o for o in lines if not o["released"]]
                assert _lost_the_race(ReleaseOutcome(id, False, False, str(lost["detail"]))), lost
                assert all("Traceback" not in err for _, err in done)
                assert handler.count(mid) == 1
    finally:
        controller.stop()


# -- failures -------------------------------------------------------------------------------------


def test_failed_delivery_drops_the_claim_and_a_later_release_delivers(
    store: Store, free_port: Callable[[], int]
) -> None:
    id = _hold(store, "down@x")
    port = free_port()
    down = _release(store, id, port)  # nothing listens there
    assert not down.released and "cannot connect to downstream" in down.detail
    assert _claim_of(store, id) == (None, None)
    handler = SlowSink(delay=0.0)
    handler.reply = "451 4.3.0 Try later"
    controller = _start(handler, port)
    try:
        refused = _release(store, id, port)
        assert not refused.released and "451" in refused.detail
        assert _claim_of(store, id) == (None, None)
        row = store.get(id)
        assert row is not None and row.released_at is None and row.label is None
        handler.reply = None
        ok = _release(store, id, port)
        assert ok.released and ok.labelled, ok
    finally:
        controller.stop()
    assert handler.count("down@x") == 1
    assert store.get_raw(id) == _raw("down@x")


def test_a_claim_lost_during_delivery_is_reported(store: Store, sink: tuple[int, SlowSink]) -> None:
    """The release was frozen past the timeout while the downstream took the message, and another
    release took its claim over: the 250 is not recorded as this release's, and the outcome says so."""
    port, handler = sink
    id = _hold(store, "lost@x")

    def take_over() -> None:
        _age_claim(store, id, CLAIM_TIMEOUT_S + 60)
        assert store.claim_release(id, DEAD).took_over

    handler.on_data = take_over
    outcome = _release(store, id, port)
    assert not outcome.released and "claim was taken over" in outcome.detail
    assert "may be delivered twice" in outcome.detail
    assert handler.count("lost@x") == 1
    assert _claim_of(store, id)[0] == DEAD


# -- abandoned and live claims --------------------------------------------------------------------


def test_an_abandoned_claim_is_taken_over_and_delivered(store: Store, sink: tuple[int, SlowSink]) -> None:
    port, handler = sink
    id = _hold(store, "stale@x")
    assert store.claim_release(id, DEAD).state is ClaimState.CLAIMED
    _age_claim(store, id, CLAIM_TIMEOUT_S + 60)
    outcome = _release(store, id, port)
    assert outcome.released, outcome
    assert f"took over the abandoned release of {DEAD}" in outcome.detail  # a second delivery is possible
    assert handler.count("stale@x") == 1
    assert _claim_of(store, id) == (None, None)


def test_a_live_foreign_claim_is_not_taken_over(store: Store, sink: tuple[int, SlowSink]) -> None:
    port, handler = sink
    id = _hold(store, "live@x")
    other = "otherhost pid 7 fedcba9876543210"
    assert store.claim_release(id, other).claimed
    _age_claim(store, id, CLAIM_TIMEOUT_S - 60)  # old, but not yet abandoned
    before = _claim_of(store, id)
    outcome = _release(store, id, port)
    assert not outcome.released and outcome.detail.startswith(BUSY) and other in outcome.detail
    assert handler.received == []
    assert _claim_of(store, id) == before
    # the timeout is the caller's: the same claim is abandoned for a release that waits less
    assert _release(store, id, port, claim_timeout=30).released
    assert handler.count("live@x") == 1


def test_claim_states_and_tokens(store: Store) -> None:
    held = _hold(store, "s@x")
    plain = store.record(make_result(Verdict.HAM, Action.ACCEPT), ENV, None, "d")
    assert store.claim_release(plain + 1000, "t1").state is ClaimState.MISSING
    assert store.claim_release(plain, "t1").state is ClaimState.NOT_QUARANTINED
    first = store.claim_release(held, "t1")
    assert first.claimed and not first.took_over and first.holder is None
    busy = store.claim_release(held, "t2")
    assert (busy.state, busy.holder) == (ClaimState.BUSY, "t1") and busy.since is not None
    assert store.finish_release(held, "t2") is False  # not its claim
    assert store.abandon_release(held, "t2") is False
    assert store.abandon_release(held, "t1") is True
    assert store.claim_release(held, "t2").claimed
    assert store.finish_release(held, "t2") is True
    assert store.finish_release(held, "t2") is False  # once
    released = store.claim_release(held, "t3")
    assert released.state is ClaimState.RELEASED and released.since is not None
    gone = _hold(store, "gone@x")
    assert store.delete([gone]) == 1
    assert store.claim_release(gone, "t1").state is ClaimState.DELETED
    with pytest.raises(ValueError):
        store.claim_release(held, "")


def test_claim_on_vanished_tables_is_store_error(store: Store) -> None:
    id = _hold(store, "v@x")
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE quarantine"))
    for call in (lambda: store.claim_release(id, "t"), lambda: store.finish_release(id, "t"),
                 lambda: store.abandon_release(id, "t")):
        with pytest.raises(StoreError):
            call()


# -- delete ---------------------------------------------------------------------------------------


def test_delete_refuses_while_a_release_holds_the_claim(store: Store, url: str) -> None:
    id = _hold(store, "del@x")
    assert store.claim_release(id, "t1").claimed
    assert store.delete([id]) == 0
    result = CliRunner().invoke(main, ["quarantine", "delete", "--db", url, str(id)])
    # the admin is told which one was kept and why (a silent exit 0 hid it)
    assert result.exit_code == 1 and result.stdout.strip() == "deleted 0 of 1"
    assert "being released" in result.stderr
    assert store.get_raw(id) == _raw("del@x")
    _age_claim(store, id, CLAIM_TIMEOUT_S + 60)  # its release died: the claim no longer protects it
    assert store.delete([id]) == 1
    assert store.get_raw(id) is None and _claim_of(store, id) == (None, None)
    other = _hold(store, "del2@x")
    assert store.claim_release(other, "t1").claimed and store.abandon_release(other, "t1")
    assert store.delete([other]) == 1


# -- migration ------------------------------------------------------------------------------------


def test_migration_round_trip_keeps_held_messages(store: Store, sink: tuple[int, SlowSink]) -> None:
    """0004 -> 0003 -> head with messages held, released and being released: the bytes and states stay;
    a claim in progress is dropped with its columns, so that message can be released afterwards."""
    from alembic import command

    from milter.store.migrate import alembic_config, current_revision, upgrade

    port, handler = sink
    held, released, claimed = (_hold(store, f"{name}@x") for name in ("held", "released", "claimed"))
    assert store.claim_release(released, "t").claimed and store.finish_release(released, "t")
    assert store.claim_release(claimed, "t").claimed
    with store.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0003")
        assert current_revision(conn) == "0003"
    columns = {c["name"] for c in sa.inspect(store.engine).get_columns("quarantine")}
    assert "release_claim" not in columns and "release_claimed_at" not in columns
    with store.engine.begin() as conn:
        upgrade(conn)
        assert current_revision(conn) == "0006"
    for id, name in ((held, "held"), (released, "released"), (claimed, "claimed")):
        assert store.get_raw(id) == _raw(f"{name}@x")
        assert _claim_of(store, id) == (None, None)
    row = store.get(released)
    assert row is not None and row.released_at is not None
    assert [_release(store, id, port).released for id in (held, claimed, released)] == [True, True, False]
    assert handler.count("held@x") == handler.count("claimed@x") == 1 and handler.count("released@x") == 0
