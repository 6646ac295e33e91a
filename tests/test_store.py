"""The verdict / quarantine store on SQLite and PostgreSQL: migrations, API, failures, concurrency."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from store_support import make_result

import milter.store.store as store_module
from milter.errors import StoreError
from milter.store import Store, training_arrays
from milter.store.migrate import head_revision, upgrade
from milter.store.models import Base
from milter.types import CLASS_NAMES, VERDICTS, Action, Envelope, Verdict, label_class, wanted_label

ENV = Envelope(mail_from="alice@example.com", rcpt_tos=("bob@example.org", "carol@example.org"),
               client_addr="192.0.2.7", client_name="mx.example.com", helo="mx.example.com",
               queue_id="4Xyz12")
RAW = b"From: alice@example.com\r\nSubject: Hello\r\n\r\nbody\r\n"
DIGEST = "sha256:abc123"


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    with Store.open(url) as s:
        yield s


def _ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


# -- migrations -----------------------------------------------------------------------------------


def test_open_migrates_empty_database_to_head(url: str) -> None:
    with Store.open(url) as s:
        insp = sa.inspect(s.engine)
        assert {"messages", "quarantine", "history", "alembic_version"} <= set(insp.get_table_names())
        indexed = {tuple(ix["column_names"]) for ix in insp.get_indexes("messages")}
        assert {("received_at",), ("message_id",), ("action",)} <= indexed
        assert "raw" not in {c["name"] for c in insp.get_columns("messages")}
        with s.engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
    assert version == head_revision() == "0006"
    with Store.open(url) as again:  # re-opening an up-to-date database is a no-op
        assert again.stats().messages == 0


def test_migrations_match_models(store: Store) -> None:
    """models.py and the migration scripts describe the same schema (no autogenerate diff)."""
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_downgrade_and_upgrade_round_trip(store: Store) -> None:
    from alembic import command

    from milter.store.migrate import alembic_config

    store.record(make_result(), ENV, RAW, DIGEST)
    with store.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert "messages" not in sa.inspect(store.engine).get_table_names()
    with store.engine.begin() as conn:
        upgrade(conn)
    assert store.stats().messages == 0
    assert store.record(make_result(), ENV, RAW, DIGEST) >= 1


def test_a_store_from_before_explanations_keeps_its_rows(store: Store) -> None:
    """0001 -> 0002 adds messages.explanation: the verdicts already stored stay, without one, and new
    verdicts keep theirs."""
    from dataclasses import replace

    from alembic import command

    from milter.explain import Contribution, Explanation
    from milter.store.migrate import alembic_config, current_revision

    old = store.record(make_result(subject="before"), ENV, RAW, DIGEST)
    with store.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0001")
    assert "explanation" not in {c["name"] for c in sa.inspect(store.engine).get_columns("messages")}
    with store.engine.begin() as conn:
        upgrade(conn)
        assert current_revision(conn) == head_revision()
    row = store.get(old)
    assert row is not None and row.subject == "before" and row.explanation is None
    assert store.get_raw(old) == RAW
    towards = (Contribution("html_len_log", 6.0, 3.0, "html"),)
    why = Explanation("m", "spam", "ham", -1.0, 2.5, towards, (), 0.5)
    new = store.record(replace(make_result(), explanation=why), ENV, RAW, DIGEST)
    stored = store.get(new)
    assert stored is not None and stored.explanation is not None
    assert Explanation.from_json(stored.explanation) == why


def test_sqlite_settings_and_parent_folder(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "milter.db"
    with Store.open(f"sqlite:///{path}") as s, s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: a 250 survives a power cut
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert path.is_file()


# -- recording and reading ------------------------------------------------------------------------


def test_record_and_get_round_trip(store: Store) -> None:
    before = datetime.now(UTC)
    pk = store.record(make_result(), ENV, RAW, DIGEST)
    row = store.get(pk)
    assert row is not None
    assert before - timedelta(seconds=1) <= row.received_at <= datetime.now(UTC)
    assert row.received_at.utcoffset() == timedelta(0)
    assert (row.verdict, row.action) == ("spam", "quarantine")
    assert row.scores.as_dict() == pytest.approx({"ham": 0.05, "spam": 0.9, "bec": 0.05})
    assert row.rcpt_tos == ENV.rcpt_tos and row.mail_from == ENV.mail_from
    assert (row.client_addr, row.client_name, row.helo, row.queue_id) == (
        "192.0.2.7", "mx.example.com", "mx.example.com", "4Xyz12")
    assert (row.message_id, row.subject, row.from_addr) == ("<m1@example.com>", "Hello", "alice@example.com")
    assert row.reasons == ("spam score 0.90",) and row.model == "lgbm-test-1"
    assert row.schema_digest == DIGEST and row.label is None
    assert row.quarantined and row.size == len(RAW) and row.released_at is None
    assert store.get_raw(pk) == RAW
    assert store.get(pk + 1000) is None


def test_record_batch_and_record_many_are_one_transaction_each(store: Store) -> None:
    """The gateway's group commit (quarantine) and batched verdicts: ids in order, raw bytes kept."""
    items = [
        (make_result(), ENV, b"raw-0"),
        (make_result(Verdict.HAM, Action.ACCEPT), ENV, None),
        (make_result(), ENV, b"raw-2"),
    ]
    ids = store.record_batch(items, DIGEST)
    assert len(ids) == 3 and ids == sorted(ids)
    assert [store.get_raw(pk) for pk in ids] == [b"raw-0", None, b"raw-2"]
    rows = [store.get(pk) for pk in ids]
    assert [r.quarantined for r in rows if r is not None] == [True, False, True]
    assert store.record_batch([], DIGEST) == []
    assert store.record_many([(make_result(Verdict.HAM, Action.ACCEPT), ENV)] * 4, DIGEST) == 4
    assert store.stats().messages == 7


def test_vector_stored_as_float32_little_endian(store: Store) -> None:
    result = make_result(dim=5)
    pk = store.record(result, ENV, None, DIGEST)
    with store.engine.connect() as conn:
        blob = conn.execute(sa.text("SELECT feature_vector FROM messages WHERE id = :i"), {"i": pk}).scalar()
    assert blob is not None
    assert bytes(blob) == np.asarray(result.vector, dtype="<f4").tobytes()
    no_vec = store.record(make_result(), ENV, None, DIGEST, keep_vector=False)
    with store.engine.connect() as conn:
        blob = conn.execute(sa.text("SELECT feature_vector FROM messages WHERE id = :i"), {"i": no_vec})
        assert blob.scalar() is None


def test_verdict_without_raw_is_not_quarantined(store: Store) -> None:
    pk = store.record(make_result(Verdict.HAM, Action.ACCEPT), Envelope(), None, DIGEST)
    row = store.get(pk)
    assert row is not None and not row.quarantined and row.size is None
    assert row.rcpt_tos == () and row.mail_from is None
    assert store.get_raw(pk) is None
    assert store.quarantine_list() == []


def test_hostile_header_text_is_stored(store: Store) -> None:
    """NUL, lone surrogates and a huge Message-ID must not make the insert fail (tempfail forever)."""
    huge = "<" + "x" * 5000 + "@example.com>"
    result = make_result(message_id=huge, subject="a\x00b \udcff c", from_addr="\x00evil@example.com")
    pk = store.record(result, ENV, RAW, DIGEST)
    row = store.get(pk)
    assert row is not None
    assert row.subject == "ab ? c" and row.from_addr == "evil@example.com"
    assert row.message_id is not None and len(row.message_id) == 500 and row.message_id.startswith("<xxx")


def test_quarantine_list_order_filters_and_paging(store: Store) -> None:
    old = store.record(make_result(message_id="<old@x>"), ENV, RAW, DIGEST, received_at=_ago(3))
    bec = store.record(make_result(Verdict.BEC, message_id="<bec@x>"), ENV, RAW, DIGEST, received_at=_ago(1))
    new = store.record(make_result(message_id="<new@x>"), ENV, RAW, DIGEST)
    store.record(make_result(Verdict.HAM, Action.ACCEPT), ENV, None, DIGEST)  # not quarantined
    assert [r.id for r in store.quarantine_list()] == [new, bec, old]
    assert [r.id for r in store.quarantine_list(since=_ago(2))] == [new, bec]
    assert [r.id for r in store.quarantine_list(verdict="bec")] == [bec]
    assert [r.id for r in store.quarantine_list(limit=2, offset=1)] == [bec, old]


def test_release_and_delete(store: Store) -> None:
    a = store.record(make_result(), ENV, RAW, DIGEST)
    b = store.record(make_result(), ENV, RAW, DIGEST)
    plain = store.record(make_result(), ENV, None, DIGEST)
    assert store.mark_released(a) is True
    assert store.mark_released(a) is False  # already released
    assert store.mark_released(plain) is False  # never quarantined
    row = store.get(a)
    assert row is not None and row.released_at is not None
    assert store.delete([b, plain]) == 1
    assert store.delete([b]) == 0
    assert store.get_raw(b) is None and store.get_raw(a) == RAW
    assert [r.id for r in store.quarantine_list()] == [a]
    assert {r.id for r in store.quarantine_list(include_deleted=True)} == {a, b}
    assert store.mark_released(b) is False  # deleted bytes cannot be released
    deleted = store.get(b)
    assert deleted is not None and deleted.deleted_at is not None and deleted.verdict == "spam"


def test_sender_labels_count_labelled_verdicts_per_from_address(store: Store) -> None:
    def labelled(from_addr: str | None, label: str) -> None:
        pk = store.record(make_result(from_addr=from_addr), ENV, None, DIGEST)
        assert store.set_label(pk, label, "admin-release") == 1

    labelled("news@bulletin.example", "ham")
    labelled("News@Bulletin.example", "ham")  # the same sender, written otherwise: one row
    labelled("news@bulletin.example", "spam")
    labelled(None, "ham")
    store.record(make_result(from_addr="news@bulletin.example"), ENV, None, DIGEST)  # not labelled
    assert sorted(store.sender_labels(), key=str) == sorted(
        [("news@bulletin.example", "ham", 2), ("news@bulletin.example", "spam", 1), (None, "ham", 1)], key=str
    )


def test_labels_and_training_examples(store: Store) -> None:
    a = store.record(make_result(message_id="<dup@x>"), ENV, None, DIGEST)
    b = store.record(make_result(message_id="<dup@x>"), ENV, None, DIGEST)
    c = store.record(make_result(dim=8), ENV, None, DIGEST)
    store.record(make_result(), ENV, None, DIGEST, keep_vector=False)
    assert store.set_label("<dup@x>", "ham", "user-report") == 2
    assert store.set_label(c, "bec", "analyst") == 1
    assert store.set_label(99999, "spam", "x") == 0
    with pytest.raises(ValueError, match="label must be one of"):
        store.set_label(a, "phish", "x")
    row = store.get(a)
    assert row is not None and (row.label, row.label_source) == ("ham", "user-report")
    assert row.labelled_at is not None
    examples = store.labelled_examples()
    assert [e.id for e in examples] == [a, b, c]
    assert store.labelled_examples(schema_digest="other") == []
    x, y = training_arrays(examples)
    assert x.dtype == np.float32 and x.shape == (3, 8)
    np.testing.assert_array_equal(x[0], make_result().vector)
    assert y.tolist() == [0, 0, 2]


@pytest.mark.parametrize(
    "message_id",
    [
        "<caf\udce9@example.com>",  # an 8-bit byte as the parser hands it on (surrogate escape)
        "<" + "a" * 600 + "@example.com>",  # longer than the indexed column keeps
        "<nul\x00@example.com>",
    ],
    ids=["8-bit", "long", "nul"],
)
def test_a_message_id_is_looked_up_as_it_was_stored(store: Store, message_id: str) -> None:
    """`milter report` labels by the Message-ID it parses from the file; the store keeps a cleaned copy.
    Before, the 8-bit one raised UnicodeEncodeError out of the store, and the other two matched nothing
    (so `report` stored a second, labelled copy of the message)."""
    pk = store.record(make_result(message_id=message_id), ENV, None, DIGEST)
    other = store.record(make_result(message_id="<other@example.com>"), ENV, None, DIGEST)
    assert store.set_label(message_id, "spam", "user-report") == 1
    row, untouched = store.get(pk), store.get(other)
    assert row is not None and row.label == "spam"
    assert untouched is not None and untouched.label is None


def test_bulk_verdicts_and_labels(store: Store) -> None:
    held = store.record(make_result(Verdict.BULK, Action.QUARANTINE), ENV, RAW, DIGEST)
    store.record(make_result(Verdict.BULK, Action.ACCEPT), ENV, None, DIGEST)
    spam = store.record(make_result(), ENV, RAW, DIGEST)
    assert [r.id for r in store.quarantine_list(verdict="bulk")] == [held]
    assert store.stats().by_verdict == {"bulk": 2, "spam": 1}
    assert store.set_label(held, "bulk", "admin") == 1 and store.set_label(spam, "spam", "admin") == 1
    row = store.get(held)
    assert row is not None and (row.verdict, row.label) == ("bulk", "bulk")
    _, y = training_arrays(store.labelled_examples())
    assert y.tolist() == [label_class("ham"), label_class("spam")]  # bulk is wanted mail: it trains ham


def test_label_class_is_the_one_label_to_class_mapping() -> None:
    assert [CLASS_NAMES[label_class(v)] for v in VERDICTS] == ["ham", "ham", "spam", "bec"]
    assert [wanted_label(v) for v in VERDICTS] == [True, True, False, False]
    assert not wanted_label("phish")
    with pytest.raises(ValueError, match="label must be one of ham, bulk, spam, bec, got 'phish'"):
        label_class("phish")


def test_stale_examples_carry_raw_bytes_and_envelope(store: Store) -> None:
    old = store.record(make_result(), ENV, RAW, "sha256:old")  # quarantined under an older schema
    gone = store.record(make_result(), ENV, None, "sha256:old")  # relayed: no bytes to rescan
    novec = store.record(make_result(), ENV, RAW, DIGEST, keep_vector=False)
    current = store.record(make_result(), ENV, RAW, DIGEST)
    unlabelled = store.record(make_result(), ENV, RAW, "sha256:old")
    for pk in (old, gone, novec, current):
        store.set_label(pk, "spam", "analyst")
    stale = store.stale_examples(DIGEST)
    assert [(e.id, e.label, e.raw) for e in stale] == [
        (old, "spam", RAW), (gone, "spam", None), (novec, "spam", RAW)
    ]
    assert all(e.envelope == ENV for e in stale)
    assert unlabelled not in {e.id for e in stale} and current not in {e.id for e in stale}


def test_purge_old_rows_keeps_labelled(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "PURGE_BATCH", 2)  # exercise several purge transactions
    old = [store.record(make_result(), ENV, RAW, DIGEST, received_at=_ago(40)) for _ in range(3)]
    old_plain = store.record(make_result(), ENV, None, DIGEST, received_at=_ago(40))
    kept_label = store.record(make_result(), ENV, RAW, DIGEST, received_at=_ago(40))
    store.set_label(kept_label, "spam", "analyst")
    recent = store.record(make_result(), ENV, RAW, DIGEST, received_at=_ago(5))
    counts = store.purge(30)
    assert (counts.messages, counts.quarantined) == (4, 4)
    assert all(store.get(pk) is None for pk in [*old, old_plain])
    labelled = store.get(kept_label)
    assert labelled is not None and not labelled.quarantined and store.get_raw(kept_label) is None
    assert store.get_raw(recent) == RAW
    assert [e.id for e in store.labelled_examples()] == [kept_label]
    assert store.purge(30) == type(counts)(messages=0, quarantined=0)
    with pytest.raises(ValueError):
        store.purge(-1)
    with pytest.raises(ValueError, match="at least 1"):  # 0: a cutoff of now purged a message just held
        store.purge(0)
    assert store.get_raw(recent) == RAW


def test_purge_counts_only_bytes_still_held(store: Store) -> None:
    """Bytes `delete` dropped earlier are not purged again: before, purge counted them (3, not 1)."""
    old = [store.record(make_result(), ENV, RAW, DIGEST, received_at=_ago(40)) for _ in range(3)]
    assert store.delete(old[:2]) == 2
    counts = store.purge(30)
    assert (counts.messages, counts.quarantined) == (3, 1)


def test_stats(store: Store) -> None:
    a = store.record(make_result(), ENV, RAW, DIGEST, received_at=_ago(2))
    store.record(make_result(Verdict.BEC), ENV, RAW, DIGEST)
    store.record(make_result(Verdict.HAM, Action.ACCEPT), ENV, None, DIGEST)
    store.mark_released(a)
    store.set_label(a, "ham", "user")
    st = store.stats()
    # a released message keeps its bytes but is no longer held: before, it counted as quarantined
    assert (st.messages, st.quarantined, st.released, st.labelled) == (3, 1, 1, 1)
    assert dict(st.by_verdict) == {"spam": 1, "bec": 1, "ham": 1}
    assert dict(st.by_action) == {"quarantine": 2, "accept": 1}
    assert st.oldest is not None and st.newest is not None and st.oldest < st.newest


# -- failures -------------------------------------------------------------------------------------


def test_unreachable_postgres_is_store_error(free_port: object) -> None:
    port = free_port()  # type: ignore[operator]
    with pytest.raises(StoreError) as info:
        Store.open(f"postgresql+psycopg://postgres:s3cret@127.0.0.1:{port}/test", connect_timeout_s=3)
    assert isinstance(info.value.__cause__, sa.exc.SQLAlchemyError)
    assert "s3cret" not in str(info.value) and str(port) in str(info.value)


@pytest.mark.parametrize("bad", ["not a url", "nosuchdialect://x/y", "mysql+nosuchdriver://h/db"])
def test_bad_url_is_store_error(bad: str) -> None:
    with pytest.raises(StoreError, match="cannot open store"):
        Store.open(bad)


def test_unwritable_sqlite_location_is_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # root ignores permissions, but not a file in the way
    with pytest.raises(StoreError) as info:
        Store.open(f"sqlite:///{blocker}/sub/milter.db")
    assert isinstance(info.value.__cause__, OSError)
    for target in (tmp_path, blocker):  # a folder, and a file that is not a database
        with pytest.raises(StoreError) as info:
            Store.open(f"sqlite:///{target}")
        assert isinstance(info.value.__cause__, sa.exc.SQLAlchemyError)
    assert blocker.read_text() == "not a folder"


def test_record_failure_is_store_error_and_atomic(store: Store) -> None:
    """If the quarantine row cannot be written, the verdict row must not stay behind either."""
    store.record(make_result(), ENV, None, DIGEST)
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE quarantine"))
    with pytest.raises(StoreError, match="cannot record verdict") as info:
        store.record(make_result(), ENV, RAW, DIGEST)
    assert isinstance(info.value.__cause__, sa.exc.SQLAlchemyError)
    assert "body" not in str(info.value)  # no message content in the error text
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM messages")).scalar() == 1
    assert store.record(make_result(), ENV, None, DIGEST) > 0  # the store keeps working


def test_record_on_vanished_tables_is_store_error(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE quarantine"))
        conn.execute(sa.text("DROP TABLE messages"))
    with pytest.raises(StoreError):
        store.record(make_result(), ENV, None, DIGEST)
    with pytest.raises(StoreError):
        store.quarantine_list()


# -- concurrency ----------------------------------------------------------------------------------


def _hammer(store: Store, n: int, ids: list[int], errors: list[BaseException]) -> None:
    try:
        for i in range(n):
            pk = store.record(make_result(message_id=f"<c{i}@x>"), ENV, RAW * 200, DIGEST)
            ids.append(pk)
            if i % 5 == 0:  # read-then-write transactions too
                store.set_label(pk, "spam", "thread")
                store.quarantine_list(limit=5)
    except BaseException as exc:
        errors.append(exc)


def test_concurrent_writers_from_two_stores(url: str) -> None:
    """Two Store objects (as two gateway processes would have) writing from threads at once."""
    with Store.open(url) as one, Store.open(url) as two:
        ids: list[int] = []
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_hammer, args=(s, 40, ids, errors)) for s in (one, two) * 3]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(ids) == len(set(ids)) == 240
        assert one.stats().messages == 240 and two.stats().quarantined == 240
        assert one.stats().labelled == 48


def test_concurrent_open_of_fresh_database(url: str) -> None:
    """Gateways starting together must not race each other's migrations."""
    errors: list[BaseException] = []

    def open_close() -> None:
        try:
            with Store.open(url) as s:
                s.record(make_result(), ENV, None, DIGEST)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_close) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Store.open(url) as s:
        assert s.stats().messages == 4


def test_database_from_newer_release_is_store_error(url: str) -> None:
    """A schema revision this code does not ship (a downgraded gateway) refuses to open, clearly."""
    with Store.open(url) as s, s.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff9999'"))
    with pytest.raises(StoreError, match=r"migrated by a newer mailsift \(revision ffff9999\)"):
        Store.open(url)
