"""The correspondence history in the store (issue 17), on SQLite and PostgreSQL: additive writes shared by
several gateways, reads, ageing, the rebuild from stored verdicts (`milter history`), and failures."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from store_support import make_result

import milter.store.history as history_sql
from milter.cli import main
from milter.errors import StoreError
from milter.history import KINDS, CorrespondenceHistory, HistoryRow, MessageFacts
from milter.store import Store
from milter.types import Action, Envelope, Verdict

DIGEST = "sha256:abc123"
BASE = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    with Store.open(url) as s:
        yield s


def _row(key: str, first: float, last: float, inbound: int = 1, outbound: int = 0,
         kind: str = "address", member: str = "") -> HistoryRow:
    return HistoryRow(kind, key, member, first, last, inbound, outbound)


def _by_key(rows: list[HistoryRow]) -> dict[tuple[str, str, str], HistoryRow]:
    return {(r.kind, r.key, r.member): r for r in rows}


# -- writing ----------------------------------------------------------------------------------------


def test_apply_adds_to_what_is_stored(store: Store) -> None:
    """Two gateways' deltas for one entry: counts summed, the earliest first and the latest last seen."""
    assert store.history_apply([
        _row("a@vendor.test", 100.5, 200.25, inbound=2),
        _row("b@vendor.test", 50.0, 60.0, outbound=1, inbound=0),
        _row("vendor.test", 100.0, 200.0, kind="key"),
    ]) == 3
    assert store.history_apply([
        _row("a@vendor.test", 90.0, 150.0, inbound=1, outbound=3),  # earlier first, earlier last
        _row("b@vendor.test", 55.0, 70.0, inbound=4),  # later first, later last
        _row("a@vendor.test", 1.0, 2.0, kind="pair", member="bob@corp.test"),  # a new entry
    ]) == 3
    assert _by_key(store.history_rows()) == {
        ("address", "a@vendor.test", ""): _row("a@vendor.test", 90.0, 200.25, inbound=3, outbound=3),
        ("address", "b@vendor.test", ""): _row("b@vendor.test", 50.0, 70.0, inbound=4, outbound=1),
        ("key", "vendor.test", ""): _row("vendor.test", 100.0, 200.0, kind="key"),
        ("pair", "a@vendor.test", "bob@corp.test"): _row("a@vendor.test", 1.0, 2.0, kind="pair",
                                                         member="bob@corp.test"),
    }
    assert store.history_apply([]) == 0


def test_duplicates_in_one_batch_are_merged(store: Store) -> None:
    """One batch naming an entry twice (PostgreSQL refuses an upsert touching a row twice)."""
    store.history_apply([_row("a@vendor.test", 10.0, 20.0, inbound=1)])
    written = store.history_apply([
        _row("a@vendor.test", 30.0, 40.0, inbound=1),
        _row("a@vendor.test", 5.0, 15.0, outbound=2, inbound=0),
        _row("a@vendor.test", 12.0, 50.0, inbound=3),
    ])
    assert written == 1
    assert store.history_rows() == [_row("a@vendor.test", 5.0, 50.0, inbound=5, outbound=2)]


def _observed() -> CorrespondenceHistory:
    """A history with an entry of every kind, times with fractions of a second."""
    h = CorrespondenceHistory()
    msgs = [
        (MessageFacts("jane.doe@vendor.test", "Jane Doe", ("bob@corp.test", "amy@corp.test"),
                      reply_to="billing@vendor-pay.test"), 0.25, False),
        (MessageFacts("bob@corp.test", "Bob Smith", ("jane.doe@vendor.test",)), 3600.5, True),
        (MessageFacts("friend@gmail.com", "Old Friend", ("amy@corp.test",)), 7200.125, False),
        (MessageFacts("jane.doe@vendor.test", "Doe, Jane", ("bob@corp.test",)), 86_400.75, False),
    ]
    for facts, offset, outbound in msgs:
        h.observe(facts, BASE + timedelta(seconds=offset), outbound=outbound)
    return h


def test_history_round_trips_through_the_store(store: Store) -> None:
    original = _observed()
    rows = list(original.rows())
    assert {r.kind for r in rows} == set(KINDS)
    assert store.history_apply(rows) == len(rows)
    stored = store.history_rows()
    assert set(stored) == set(rows)
    loaded = CorrespondenceHistory()
    for row in stored:
        loaded.put(row)
    assert set(loaded.rows()) == set(original.rows())
    facts = MessageFacts("jane.doe@vendor.test", "Jane Doe", ("bob@corp.test",))
    assert loaded.lookup(facts) == original.lookup(facts)


# -- reading, ageing, replacing ---------------------------------------------------------------------


def test_rows_since_and_their_order(store: Store) -> None:
    store.history_apply([
        _row("late@x.test", 1.0, 300.0),
        _row("b@x.test", 1.0, 200.0),
        _row("a@x.test", 1.0, 200.0, kind="reply_to"),
        _row("a@x.test", 1.0, 200.0),
        _row("early@x.test", 1.0, 100.0),
    ])
    order = [(r.last_seen, r.kind, r.key) for r in store.history_rows()]
    assert order == [(100.0, "address", "early@x.test"), (200.0, "address", "a@x.test"),
                     (200.0, "address", "b@x.test"), (200.0, "reply_to", "a@x.test"),
                     (300.0, "address", "late@x.test")]
    assert [r.key for r in store.history_rows(since=200.0)] == ["a@x.test", "b@x.test", "a@x.test",
                                                                "late@x.test"]
    assert [r.key for r in store.history_rows(since=300.5)] == []


def test_purge_deletes_entries_not_seen_since(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history_sql, "PURGE_BATCH", 2)  # several purge transactions
    store.history_apply([_row(f"old{i}@x.test", 1.0, 100.0 + i) for i in range(5)])
    store.history_apply([_row("kept@x.test", 1.0, 500.0), _row("edge@x.test", 1.0, 400.0)])
    assert store.history_purge(400.0) == 5
    assert sorted(r.key for r in store.history_rows()) == ["edge@x.test", "kept@x.test"]
    assert store.history_purge(400.0) == 0


def test_trim_keeps_the_newest_entries_of_each_kind(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The table is bounded by size too, not only by age: per kind the entries seen last are kept
    (as many as a gateway's history can hold), the others go, in several short transactions."""
    monkeypatch.setattr(history_sql, "PURGE_BATCH", 2)
    store.history_apply([_row(f"a{i}@x.test", 1.0, 100.0 + i) for i in range(7)])
    store.history_apply([_row("n", 1.0, 50.0 + i, kind="name", member=f"m{i}@x.test") for i in range(3)])
    assert store.history_trim({"address": 3, "name": 5, "pair": 1}) == 4
    rows = store.history_rows()
    assert sorted(r.key for r in rows if r.kind == "address") == ["a4@x.test", "a5@x.test", "a6@x.test"]
    assert len([r for r in rows if r.kind == "name"]) == 3  # under its cap: untouched
    assert store.history_trim({"address": 3}) == 0
    store.history_apply([_row(f"t{i}@x.test", 1.0, 999.0) for i in range(3)])  # ties at the cut stay
    assert store.history_trim({"address": 2}) == 3
    assert sorted(r.key for r in store.history_rows() if r.kind == "address") == [
        "t0@x.test", "t1@x.test", "t2@x.test"]


def test_the_stored_caps_hold_what_a_history_keeps() -> None:
    from milter.history import HistoryLimits, stored_caps

    limits = HistoryLimits(max_pairs=10, max_correspondents=7, max_identities=3, max_per_identity=8)
    caps = stored_caps(limits)
    assert caps == {"pair": 10, "key_pair": 10, "address": 7, "key": 7, "name": 24, "local": 24,
                    "reply_to": 24}


def test_replace_drops_everything_else(store: Store) -> None:
    store.history_apply([_row("a@x.test", 1.0, 2.0, inbound=7), _row("gone@x.test", 1.0, 2.0)])
    assert store.history_replace([_row("a@x.test", 3.0, 4.0, inbound=1), _row("new@x.test", 5.0, 6.0)]) == 2
    assert _by_key(store.history_rows()) == {
        ("address", "a@x.test", ""): _row("a@x.test", 3.0, 4.0, inbound=1),  # not added: replaced
        ("address", "new@x.test", ""): _row("new@x.test", 5.0, 6.0),
    }
    assert store.history_replace([]) == 0
    assert store.history_rows() == []


def test_stats(store: Store) -> None:
    empty = store.history_stats()
    assert (dict(empty.by_kind), empty.oldest, empty.newest, empty.total) == ({}, None, None, 0)
    store.history_apply([
        _row("a@x.test", 1.0, 150.5), _row("b@x.test", 1.0, 90.25),
        _row("x.test", 1.0, 120.0, kind="key"),
        _row("a@x.test", 1.0, 100.0, kind="pair", member="bob@corp.test"),
    ])
    st = store.history_stats()
    assert dict(st.by_kind) == {"address": 2, "key": 1, "pair": 1}
    assert (st.oldest, st.newest, st.total) == (90.25, 150.5, 4)


def test_hostile_keys_are_stored(store: Store) -> None:
    """NUL, lone surrogates and over-long keys from headers must not make the write fail; keys that
    become equal once cleaned are one entry."""
    long_key = "x" * 600 + "@x.test"
    store.history_apply([
        _row("a\x00b@x.test", 1.0, 2.0, inbound=1),
        _row("ab@x.test", 1.0, 3.0, inbound=2),  # the same entry once the NUL is gone
        _row("Jane \udcff Doe", 1.0, 2.0, kind="name", member="j@x.test\x00"),
        _row(long_key, 1.0, 2.0, kind="pair", member="m" * 700),
    ])
    got = _by_key(store.history_rows())
    assert got[("address", "ab@x.test", "")] == _row("ab@x.test", 1.0, 3.0, inbound=3)
    assert ("name", "Jane ? Doe", "j@x.test") in got
    assert ("pair", "x" * 500, "m" * 500) in got
    assert len(got) == 3


# -- concurrency and failures -----------------------------------------------------------------------

KEYS = [(kind, f"c{i}@x.test", "bob@corp.test" if kind == "pair" else "")
        for i in range(12) for kind in ("address", "pair")]


def _writer(store: Store, seed: int, totals: dict[tuple[str, str, str], list[float]],
            lock: threading.Lock, errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    try:
        for n in range(50):
            picked = [*rng.sample(KEYS, 10), rng.choice(KEYS)]  # a duplicate now and then
            rows = [HistoryRow(k, key, m, 1000.0 - n - seed, 2000.0 + n + seed, 1, seed % 2)
                    for k, key, m in picked]
            rng.shuffle(rows)  # unsorted on purpose: the store orders the writes
            store.history_apply(rows)
            with lock:
                for r in rows:
                    t = totals.setdefault((r.kind, r.key, r.member), [r.first_seen, r.last_seen, 0, 0])
                    t[:] = [min(t[0], r.first_seen), max(t[1], r.last_seen), t[2] + 1, t[3] + r.outbound]
    except BaseException as exc:
        errors.append(exc)


def test_concurrent_applies_sum_exactly_without_deadlock(url: str) -> None:
    """Four writers (two stores, as two gateway processes) adding overlapping batches at once."""
    with Store.open(url) as one, Store.open(url) as two:
        totals: dict[tuple[str, str, str], list[float]] = {}
        lock = threading.Lock()
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_writer, args=(s, seed, totals, lock, errors))
                   for seed, s in enumerate((one, two, one, two))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        stored = {k: [r.first_seen, r.last_seen, r.inbound, r.outbound]
                  for k, r in _by_key(one.history_rows()).items()}
    assert stored == totals
    assert sum(int(t[2]) for t in totals.values()) == 4 * 50 * 11


def test_a_vanished_history_table_is_store_error(store: Store) -> None:
    """The gateway counts on StoreError (never a raw driver error) to keep delivering mail."""
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE history"))
    with pytest.raises(StoreError, match="cannot write correspondence history") as info:
        store.history_apply([_row("a@x.test", 1.0, 2.0)])
    assert isinstance(info.value.__cause__, sa.exc.SQLAlchemyError)
    with pytest.raises(StoreError, match="cannot read correspondence history"):
        store.history_rows()
    with pytest.raises(StoreError):
        store.history_purge(10.0)
    with pytest.raises(StoreError):
        store.history_replace([_row("a@x.test", 1.0, 2.0)])
    with pytest.raises(StoreError):
        store.history_stats()


# -- what verdicts record for the history -----------------------------------------------------------


def test_recorded_verdicts_carry_what_the_history_learns_from(store: Store) -> None:
    taught = make_result(Verdict.HAM, Action.ACCEPT, teaches=True, from_addr="Jane@Vendor.test",
                         from_display="Jane\x00 Doe", reply_to_addr="pay@else.test")
    sent = make_result(Verdict.HAM, Action.ACCEPT, teaches=True, outbound=True, from_addr="bob@corp.test",
                       from_display=None)
    held = make_result(from_addr="x@spam.test")
    env = Envelope(mail_from="jane@vendor.test", rcpt_tos=("bob@corp.test", "amy@corp.test"))
    assert store.record_many([(taught, env), (sent, env)], DIGEST) == 2
    (held_id,) = store.record_batch([(held, env, b"raw")], DIGEST)
    rows = store.history_sources()
    assert [(r.from_addr, r.from_display, r.reply_to, r.outbound, r.teaches) for r in rows] == [
        ("Jane@Vendor.test", "Jane Doe", "pay@else.test", False, True),
        ("bob@corp.test", None, None, True, True),
        ("x@spam.test", "Alice", None, False, False),
    ]
    assert rows[2].id == held_id and (rows[2].verdict, rows[2].action) == ("spam", "quarantine")
    assert all(r.rcpt_tos == ("bob@corp.test", "amy@corp.test") for r in rows)
    assert rows[0].received_at.utcoffset() == timedelta(0) and rows[0].label is None
    assert [r.id for r in store.history_sources(after_id=rows[0].id, limit=1)] == [rows[1].id]


def test_verdicts_stored_before_0003_have_no_history_facts(store: Store) -> None:
    from alembic import command

    from milter.store.migrate import alembic_config, upgrade

    pk = store.record(make_result(Verdict.HAM, Action.ACCEPT, teaches=True), Envelope(), b"raw", DIGEST)
    store.history_apply([_row("a@x.test", 1.0, 2.0)])
    with store.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0002")
    insp = sa.inspect(store.engine)
    assert "history" not in insp.get_table_names()
    assert "teaches" not in {c["name"] for c in insp.get_columns("messages")}
    with store.engine.begin() as conn:
        upgrade(conn)
    (src,) = store.history_sources()
    assert (src.id, src.from_display, src.reply_to, src.outbound, src.teaches) == (pk, None, None, None, None)
    assert store.get_raw(pk) == b"raw"  # the downgrade did not cascade to the quarantine
    assert store.history_rows() == []


# -- `milter history` ---------------------------------------------------------------------------------


def _record(store: Store, verdict: Verdict, action: Action, sender: str, *, rcpt: str = "Bob@Corp.test",
            teaches: bool = False, outbound: bool = False, label: str | None = None,
            legacy: bool = False) -> int:
    result = make_result(verdict, action, teaches=teaches, outbound=outbound, from_addr=sender,
                         from_display="Some Body")
    raw = b"raw" if action == Action.QUARANTINE else None
    pk = store.record(result, Envelope(mail_from=sender, rcpt_tos=(rcpt,)), raw, DIGEST)
    if label is not None:
        assert store.set_label(pk, label, "test") == 1
    if legacy:  # as stored before revision 0003
        with store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE messages SET teaches = NULL, outbound = NULL, from_display = NULL "
                                 "WHERE id = :i"), {"i": pk})
    return pk


@pytest.fixture
def verdicts(store: Store) -> Store:
    """Seven stored verdicts; four teach (a, c, e, and bob's mail to x)."""
    _record(store, Verdict.HAM, Action.ACCEPT, "a@vendor.test", teaches=True)
    _record(store, Verdict.SPAM, Action.QUARANTINE, "spammer@spam.test")
    _record(store, Verdict.SPAM, Action.QUARANTINE, "c@held.test", label="ham")  # a release
    _record(store, Verdict.HAM, Action.ACCEPT, "d@fake.test", teaches=True, label="spam")
    _record(store, Verdict.HAM, Action.ACCEPT, "e@old.test", legacy=True)
    _record(store, Verdict.HAM, Action.TAG, "f@tagged.test", legacy=True)
    _record(store, Verdict.HAM, Action.ACCEPT, "bob@corp.test", rcpt="X@Partner.test", teaches=True,
            outbound=True)
    return store


def _history(store: Store, kind: str) -> dict[tuple[str, str], HistoryRow]:
    return {(r.key, r.member): r for r in store.history_rows() if r.kind == kind}


def _lines(output: str) -> list[str]:
    """Rich's table lines, borders and padding gone: "address 4"."""
    return [" ".join(line.replace("│", " ").replace("┃", " ").split()) for line in output.splitlines()]


def test_rebuild_replays_the_verdicts_that_teach(url: str, verdicts: Store) -> None:
    verdicts.history_apply([_row("stale@x.test", 1.0, 2.0)])  # replaced, not added to
    result = CliRunner().invoke(main, ["history", "rebuild", "--db", url])
    assert result.exit_code == 0, result.output
    assert "read 7 verdict(s), 4 taught the history" in result.output
    addresses = _history(verdicts, "address")
    assert set(addresses) == {("a@vendor.test", ""), ("c@held.test", ""), ("e@old.test", ""),
                              ("x@partner.test", "")}
    partner = addresses[("x@partner.test", "")]
    assert (partner.inbound, partner.outbound) == (0, 1)  # our user wrote to it
    assert set(_history(verdicts, "pair")) == {
        ("a@vendor.test", "bob@corp.test"), ("c@held.test", "bob@corp.test"),
        ("e@old.test", "bob@corp.test"), ("x@partner.test", "bob@corp.test"),
    }
    names = _history(verdicts, "name")  # the legacy row has no display name
    assert set(names) == {("body some", a) for a in ("a@vendor.test", "c@held.test", "bob@corp.test")}
    st = verdicts.history_stats()
    lines = _lines(result.output)
    assert f"replaced the history with {st.total} entries" in lines
    assert all(f"{kind} {n}" in lines for kind, n in st.by_kind.items())
    assert f"total {st.total}" in lines and st.total == sum(1 for _ in verdicts.history_rows())


def test_rebuild_dry_run_writes_nothing(url: str, verdicts: Store) -> None:
    verdicts.history_apply([_row("kept@x.test", 1.0, 2.0)])
    dry = CliRunner().invoke(main, ["history", "rebuild", "--dry-run", "--db", url])
    assert dry.exit_code == 0, dry.output
    assert "read 7 verdict(s), 4 taught the history" in dry.output
    assert [r.key for r in verdicts.history_rows()] == ["kept@x.test"]
    wet = CliRunner().invoke(main, ["history", "rebuild", "--db", url])
    assert wet.exit_code == 0, wet.output
    written = verdicts.history_stats().total
    assert f"would write {written} entries (dry run: nothing written)" in _lines(dry.output)
    assert _lines(dry.output)[2:] == _lines(wet.output)[2:]  # the same table of entries per kind


def _learned(store: Store, sender: str, days_ago: float, *, label: str | None = None) -> None:
    """A verdict received `days_ago`, and what a gateway learned from it then."""
    when = datetime.now(UTC) - timedelta(days=days_ago)
    result = make_result(Verdict.HAM, Action.ACCEPT, teaches=True, from_addr=sender, from_display="Some Body")
    pk = store.record(result, Envelope(mail_from=sender, rcpt_tos=("bob@corp.test",)), None, DIGEST,
                      received_at=when)
    if label is not None:
        assert store.set_label(pk, label, "test") == 1
    history = CorrespondenceHistory()
    history.observe(MessageFacts(sender, "Some Body", ("bob@corp.test",)), when, outbound=False)
    store.history_apply(list(history.rows()))


def test_rebuild_refuses_to_forget_what_retention_deleted_the_verdicts_of(url: str, store: Store) -> None:
    _learned(store, "old@vendor.test", 100)  # its verdict goes with the 30-day retention
    _learned(store, "kept@labelled.test", 200, label="ham")  # labelled verdicts stay
    _learned(store, "new@vendor.test", 1)
    store.purge(30)
    before = sorted((r.kind, r.key, r.member) for r in store.history_rows())
    refused = CliRunner().invoke(main, ["history", "rebuild", "--db", url])
    assert refused.exit_code == 1, refused.output
    line = " ".join(refused.output.split())
    # old@vendor.test's own entries (address, pair, name, local part); vendor.test stays known via new@
    assert "the rebuild would drop 4 history entries last seen from" in line
    assert "nothing written (--force replaces it)" in line
    assert sorted((r.kind, r.key, r.member) for r in store.history_rows()) == before
    dry = CliRunner().invoke(main, ["history", "rebuild", "--dry-run", "--db", url])
    assert dry.exit_code == 0 and "would drop 4 history entries" in " ".join(dry.output.split())
    forced = CliRunner().invoke(main, ["history", "rebuild", "--force", "--db", url])
    assert forced.exit_code == 0, forced.output
    assert "replaced anyway (--force)" in " ".join(forced.output.split())
    addresses = {r.key for r in store.history_rows() if r.kind == "address"}
    assert addresses == {"kept@labelled.test", "new@vendor.test"}


def test_rebuild_drops_what_a_label_took_back_without_asking(url: str, store: Store) -> None:
    """Entries the verdicts still cover but that no longer teach (labelled bec since) go: what a rebuild
    is for."""
    _learned(store, "a@vendor.test", 2)
    _learned(store, "fake@evil.test", 1, label="bec")
    result = CliRunner().invoke(main, ["history", "rebuild", "--db", url])
    assert result.exit_code == 0, result.output
    assert "would drop" not in result.output
    assert {r.key for r in store.history_rows() if r.kind == "address"} == {"a@vendor.test"}


def test_stats_prints_the_counts(url: str, store: Store) -> None:
    day = datetime(2026, 2, 3, 12, tzinfo=UTC).timestamp()
    store.history_apply([_row("a@x.test", day, day), _row("b@x.test", day, day + 86_400),
                         _row("x.test", day, day, kind="key")])
    result = CliRunner().invoke(main, ["history", "stats", "--db", url])
    assert result.exit_code == 0, result.output
    lines = _lines(result.output)
    assert "address 2" in lines and "key 1" in lines and "total 3" in lines
    assert "last seen: oldest 2026-02-03, newest 2026-02-04 (UTC); 3 in all" in lines


def test_history_commands_fail_cleanly_on_a_broken_store(url: str, store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE history"))
    for args in (["rebuild"], ["stats"]):
        result = CliRunner().invoke(main, ["history", *args, "--db", url])
        assert result.exit_code == 1, result.output
        assert "correspondence history" in result.output
        assert "Traceback" not in result.output and not isinstance(result.exception, StoreError)
