"""Store behaviour the review commands rely on: opening only an existing store, labelling a reported
message without touching look-alikes or an admin's label, UTC days on PostgreSQL, bounded label sources.
Both backends (store_support)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from store_support import make_result

from milter.errors import StoreError
from milter.store import Store
from milter.types import Envelope

ENV = Envelope(mail_from="a@example.net", rcpt_tos=("bob@example.org",))
RAW = b"Subject: x\r\n\r\nx\r\n"
MID = "<20261201.abc123@mail.bank.example>"


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    with Store.open(url) as s:
        yield s


# -- must_exist ------------------------------------------------------------------------------------


def test_must_exist_refuses_a_missing_sqlite_file_and_creates_nothing(tmp_path: Path) -> None:
    """Before, a review command on a missing file created it (and its folders) and showed it empty."""
    path = tmp_path / "typo-dir" / "milter.db"
    with pytest.raises(StoreError, match=f"no store at {path}: the file does not exist"):
        Store.open(f"sqlite:///{path}", must_exist=True)
    assert not path.parent.exists()


def test_must_exist_names_a_relative_path_as_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=f"no store at {tmp_path / 'var' / 'milter.db'}:"):
        Store.open("sqlite:///var/milter.db", must_exist=True)
    assert not (tmp_path / "var").exists()


def test_must_exist_refuses_a_file_that_is_no_store(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="holds no mailsift store"):
        Store.open(f"sqlite:///{path}", must_exist=True)
    with sqlite3.connect(path) as conn:  # and it was left alone: no store tables added
        names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert names == {"t"}


def test_must_exist_refuses_an_empty_database_and_opens_a_store(url: str) -> None:
    with pytest.raises(StoreError, match="no store at"):
        Store.open(url, must_exist=True)
    with Store.open(url) as s:  # the gateway creates it
        pk = s.record(make_result(), ENV, RAW, "d")
    with Store.open(url, must_exist=True) as s:
        assert s.get_raw(pk) == RAW


# -- labels from user reports ----------------------------------------------------------------------


def _row(store: Store, from_addr: str | None, label: str | None = None, source: str = "cli",
         message_id: str = MID) -> int:
    pk = store.record(make_result(message_id=message_id, from_addr=from_addr), ENV, None, "d")
    if label is not None:
        assert store.set_label(pk, label, source) == 1
    return pk


def test_a_report_labels_only_rows_with_the_same_from(store: Store) -> None:
    """A phish copying a real Message-ID: before, reporting it labelled the real message too."""
    real = _row(store, "news@bank.example")
    phish = _row(store, "security@bank-verify.example")
    done = store.label_reported(MID, "Security@Bank-Verify.example", "spam", "user-report")
    assert (done.labelled, done.kept) == (1, 0)
    assert store.get(real).label is None  # type: ignore[union-attr]
    assert store.get(phish).label == "spam"  # type: ignore[union-attr]


def test_a_report_keeps_an_admins_label(store: Store) -> None:
    admin = _row(store, "news@bank.example", "ham", "cli")
    released = _row(store, "news@bank.example", "ham", "release")
    reported = _row(store, "news@bank.example", "ham", "user-report")
    fresh = _row(store, "news@bank.example")
    done = store.label_reported(MID, "news@bank.example", "spam", "user-report")
    assert (done.labelled, done.kept) == (2, 2)
    assert sorted(done.kept_labels) == [("ham", "cli"), ("ham", "release")]
    labels = {pk: store.get(pk) for pk in (admin, released, reported, fresh)}
    assert [(r.label, r.label_source) for r in labels.values() if r] == [
        ("ham", "cli"), ("ham", "release"), ("spam", "user-report"), ("spam", "user-report")]


def test_a_report_without_from_matches_rows_without_from(store: Store) -> None:
    other = _row(store, "x@example.com")
    none = _row(store, None)
    done = store.label_reported(MID, None, "spam", "user-report")
    assert (done.labelled, done.kept) == (1, 0)
    assert store.get(other).label is None  # type: ignore[union-attr]
    assert store.get(none).label == "spam"  # type: ignore[union-attr]


def test_a_long_label_source_is_cut_to_the_column(store: Store) -> None:
    """label_source is VARCHAR(64): PostgreSQL refused a longer --source (set_label did not cut it)."""
    pk = _row(store, "a@example.com")
    source = "helpdesk ticket 4711 (reported by carol@corp.example via the Outlook add-in)"
    assert store.set_label(pk, "spam", source) == 1
    assert store.get(pk).label_source == source[:64]  # type: ignore[union-attr]
    assert store.label_reported(MID, "a@example.com", "ham", source).labelled == 1


# -- statistics ------------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("url", ["postgresql"], indirect=True)
def test_daily_volumes_are_utc_days_in_any_session_time_zone(url: str) -> None:
    """date(timestamptz) takes the session's TimeZone: at 02:00 UTC, New York's day is the one before."""
    now = datetime.now(UTC)
    when = now.replace(hour=2, minute=0, second=0, microsecond=0)
    if when > now:
        when -= timedelta(days=1)
    with Store.open(f"{url}%20-ctimezone%3DAmerica/New_York") as s:
        s.record(make_result(), ENV, RAW, "d", received_at=when)
        assert [d for d, *_ in s.daily_volumes(3)] == [when.date().isoformat()]
