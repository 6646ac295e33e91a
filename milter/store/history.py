"""The SQL of the correspondence history table (`history`), behind the Store's `history_*` methods.

Several gateway processes and nodes share one table, each holding its own history in memory
(milter.history) and writing what it learned as deltas. So a write *adds* to an entry (counts summed,
first_seen the earliest, last_seen the latest) and never overwrites: two nodes that each saw one
message from a sender leave two, not one.

Locks: on PostgreSQL every writer touches rows in primary-key order (code point order, which is the
"C" collation's), so two writers of overlapping batches wait for each other instead of deadlocking. On
SQLite a writer holds the database's one write lock for its transaction (BEGIN IMMEDIATE, see engine.py).

Own module: store.py is the verdict store's API and long enough; the Store methods delegate here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Engine,
    case,
    delete,
    func,
    insert,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

from milter.errors import StoreError
from milter.store.mapping import MAX_INDEXED, clean
from milter.store.models import HISTORY, MESSAGES
from milter.store.rows import HistorySource, HistoryStats

if TYPE_CHECKING:
    from milter.history import HistoryRow

#: Rows per statement: bounds one DBAPI call's parameters whatever the batch.
CHUNK = 500
#: Rows deleted per purge transaction: short write locks, so the gateways' writes never wait long. Three
#: variables a row (the primary key) stay far under SQLite's 32,766.
PURGE_BATCH = 1000
KIND_LENGTH = 16  # HistoryEntry.kind

_Key = tuple[str, str, str]  # kind, key, member
_Counts = tuple[float, float, int, int]  # first_seen, last_seen, inbound, outbound
_PK = ("kind", "key", "member")


def _storable_key(row: HistoryRow) -> _Key:
    """The primary key as it can be stored: NUL removed, lone surrogates replaced, cut to the column."""
    return (
        clean(row.kind, KIND_LENGTH) or "",
        clean(row.key, MAX_INDEXED) or "",
        clean(row.member, MAX_INDEXED) or "",
    )


def _combined(a: _Counts, b: _Counts) -> _Counts:
    return min(a[0], b[0]), max(a[1], b[1]), a[2] + b[2], a[3] + b[3]


def prepared(rows: Iterable[HistoryRow]) -> list[dict[str, Any]]:
    """The rows as column values: one per primary key (duplicates, before or after cleaning, combined:
    PostgreSQL refuses a statement that touches one row twice), in primary-key order (the lock order)."""
    merged: dict[_Key, _Counts] = {}
    for row in rows:
        key = _storable_key(row)
        counts = (float(row.first_seen), float(row.last_seen), int(row.inbound), int(row.outbound))
        old = merged.get(key)
        merged[key] = counts if old is None else _combined(old, counts)
    return [
        {"kind": kind, "key": key, "member": member, "first_seen": first, "last_seen": last,
         "inbound": inbound, "outbound": outbound}
        for (kind, key, member), (first, last, inbound, outbound) in sorted(merged.items())
    ]


def _chunks(values: list[dict[str, Any]], size: int = CHUNK) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _additive(new: Any) -> dict[str, ColumnElement[Any]]:
    """SET clause adding the proposed row (`excluded`) to the stored one. min / max by CASE: the two
    backends spell the two-argument minimum differently (least() / min())."""
    old = HISTORY.c
    return {
        "first_seen": case((new.first_seen < old.first_seen, new.first_seen), else_=old.first_seen),
        "last_seen": case((new.last_seen > old.last_seen, new.last_seen), else_=old.last_seen),
        "inbound": old.inbound + new.inbound,
        "outbound": old.outbound + new.outbound,
    }


def _upsert(dialect: str) -> Insert:
    """INSERT ... ON CONFLICT (kind, key, member) DO UPDATE adding the counts, in the dialect's words."""
    if dialect == "postgresql":
        pg = postgresql.insert(HISTORY)
        return pg.on_conflict_do_update(index_elements=_PK, set_=_additive(pg.excluded))
    if dialect == "sqlite":
        lite = sqlite.insert(HISTORY)
        return lite.on_conflict_do_update(index_elements=_PK, set_=_additive(lite.excluded))
    raise StoreError(f"the correspondence history needs PostgreSQL or SQLite, not {dialect}")


def apply(writer: Engine, rows: Sequence[HistoryRow]) -> int:
    """Add `rows` to the table in one transaction; how many entries were written."""
    values = prepared(rows)
    if not values:
        return 0
    stmt = _upsert(writer.dialect.name)
    with writer.begin() as conn:
        for chunk in _chunks(values):
            conn.execute(stmt, chunk)
    return len(values)


def replace(writer: Engine, rows: Iterable[HistoryRow]) -> int:
    """Delete every entry and insert `rows`, in one transaction; how many entries were written."""
    values = prepared(rows)
    with writer.begin() as conn:
        if writer.dialect.name == "postgresql":
            # Gateways' writes wait for the rebuild instead of deadlocking with its delete; reads go on.
            conn.execute(text(f"LOCK TABLE {HISTORY.name} IN EXCLUSIVE MODE"))
        conn.execute(delete(HISTORY))
        for chunk in _chunks(values):
            conn.execute(insert(HISTORY), chunk)
    return len(values)


def _lock_order(dialect: str) -> list[ColumnElement[str]]:
    """Primary-key order as `prepared` sorts it (code points). PostgreSQL's default collation may sort
    otherwise, and a purge locking in another order than the writers could deadlock with them."""
    c = HISTORY.c
    columns = [c.kind, c.key, c.member]
    if dialect == "postgresql":
        return [col.collate("C") for col in columns]
    return list(columns)  # SQLite's BINARY collation is code point order already


def purge(writer: Engine, before: float, batch: int | None = None) -> int:
    """Delete the entries last seen before `before` (POSIX seconds), `batch` (PURGE_BATCH) a
    transaction; how many."""
    return _delete_batches(writer, [HISTORY.c.last_seen < before], PURGE_BATCH if batch is None else batch)


def trim(writer: Engine, caps: Mapping[str, int], batch: int | None = None) -> int:
    """Per kind, delete all but the `caps[kind]` entries last seen most recently (ties at the cut are
    kept: never more than were asked to go), `batch` a transaction; how many. The age purge alone
    bounded the table by time only: a site accepting mail from ever new senders grew it without end,
    and every gateway start read all of it."""
    batch = PURGE_BATCH if batch is None else batch
    c = HISTORY.c
    gone = 0
    for kind, cap in caps.items():
        if cap < 1:
            gone += _delete_batches(writer, [c.kind == kind], batch)
            continue
        with writer.connect() as conn:  # the cap-th newest: older ones go
            newest = select(c.last_seen).where(c.kind == kind).order_by(c.last_seen.desc())
            cut = conn.execute(newest.offset(cap - 1).limit(1)).scalar()
        if cut is None:
            continue
        gone += _delete_batches(writer, [c.kind == kind, c.last_seen < float(cut)], batch)
    return gone


def _delete_batches(writer: Engine, where: list[ColumnElement[bool]], batch: int) -> int:
    """Delete the rows matching `where`, `batch` per transaction, locked in primary-key order."""
    c = HISTORY.c
    pick = (
        select(c.kind, c.key, c.member).where(*where).order_by(*_lock_order(writer.dialect.name))
        .limit(batch).with_for_update()  # locks in that order (SQLite: ignored, its write lock covers it)
    )
    gone = 0
    while True:
        with writer.begin() as conn:
            keys = [(str(k), str(key), str(m)) for k, key, m in conn.execute(pick)]
            if keys:
                stmt = delete(HISTORY).where(tuple_(c.kind, c.key, c.member).in_(keys), *where)
                result = conn.execute(stmt)
                gone += int(result.rowcount) if isinstance(result, CursorResult) else 0
        if len(keys) < batch:
            return gone


def read(engine: Engine, since: float | None) -> list[HistoryRow]:
    """Entries last seen at or after `since` (all when None), by last_seen, then primary key."""
    # Imported here: milter.history loads the feature code (0.2 s), which the quarantine CLI, a user of
    # this package that never reads the history, need not wait for.
    from milter.history import HistoryRow

    c = HISTORY.c
    stmt = (
        select(c.kind, c.key, c.member, c.first_seen, c.last_seen, c.inbound, c.outbound)
        .order_by(c.last_seen, c.kind, c.key, c.member)
    )
    if since is not None:
        stmt = stmt.where(c.last_seen >= since)
    with engine.connect() as conn:
        return [
            HistoryRow(str(kind), str(key), str(member), float(first), float(last), int(inb), int(outb))
            for kind, key, member, first, last, inb, outb in conn.execute(stmt)
        ]


def stats(engine: Engine) -> HistoryStats:
    c = HISTORY.c
    with engine.connect() as conn:
        by_kind = {str(k): int(n) for k, n in conn.execute(select(c.kind, func.count()).group_by(c.kind))}
        oldest, newest = conn.execute(select(func.min(c.last_seen), func.max(c.last_seen))).one()
    return HistoryStats(
        by_kind=dict(sorted(by_kind.items())),
        oldest=float(oldest) if oldest is not None else None,
        newest=float(newest) if newest is not None else None,
    )


def sources(engine: Engine, after_id: int, limit: int) -> list[HistorySource]:
    """The history's facts of the first `limit` verdicts with an id above `after_id`, by id."""
    m = MESSAGES.c
    stmt = (
        select(m.id, m.received_at, m.from_addr, m.from_display, m.reply_to, m.rcpt_tos, m.outbound,
               m.teaches, m.verdict, m.action, m.label)
        .where(m.id > after_id)
        .order_by(m.id)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [
            HistorySource(
                id=int(r.id), received_at=r.received_at, from_addr=r.from_addr,
                from_display=r.from_display, reply_to=r.reply_to, rcpt_tos=tuple(r.rcpt_tos or ()),
                outbound=_optional_bool(r.outbound), teaches=_optional_bool(r.teaches),
                verdict=str(r.verdict), action=str(r.action), label=r.label,
            )
            for r in conn.execute(stmt)
        ]


def _optional_bool(value: object) -> bool | None:
    return None if value is None else bool(value)
