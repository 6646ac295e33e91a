"""The SQL of releasing a quarantined message exactly once, behind `Store.claim_release`,
`finish_release`, `abandon_release` (and `delete`, which respects a claim).

Several gateway nodes share one store, and two admins may release the same message at the same moment.
Checking the row, delivering, then marking it released lets both deliver; marking first and delivering
after loses the message when the delivery fails. So a release *claims* the row first, in one
conditional UPDATE that succeeds only where the message is held (not released, not deleted) and no live
claim exists; only the claimer delivers. On the downstream's 250 it marks the message released and
drops the claim (`finish`, conditional on its own token); when the delivery fails it drops the claim
(`abandon`), so the message stays held and can be released again.

A claim older than `stale_after_s` (STALE_AFTER_S by default) counts as abandoned: its process died
(killed, host lost) between claiming and finishing, and another release may take it over. What that
costs: a process that died after the downstream's 250 but before `finish` committed has delivered
the message, and the release that takes its claim over delivers it a second time. That window is the
delivery itself plus one short UPDATE; a takeover is reported to whoever releases (the claim names the
dead process's host and pid), and so is a `finish` that finds its claim gone. A live release bounds
its delivery well under the timeout (milter/commands/quarantine_release.py), so only a dead or frozen
process's claim is ever taken over. Every process must use the same timeout: a shorter one would take
over live claims.

Clock: a claim's time is the database's clock on PostgreSQL (nodes' clocks may differ; the server's is
one), and this host's on SQLite (one file on one host: every process shares its clock).

Locks: on PostgreSQL the claim locks the row (SELECT ... FOR UPDATE) before deciding, so a concurrent
claim waits and then sees the winner's claim; on SQLite a writer holds the database's write lock for its
transaction (BEGIN IMMEDIATE, engine.py). The UPDATE's own conditions guard the claim either way.

Own module, like history.py: store.py is long enough; the Store methods delegate here.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, CursorResult, Engine, func, or_, select, update

from milter.store.models import MESSAGES, QUARANTINE
from milter.store.rows import ClaimResult, ClaimState

#: Seconds after which a claim counts as abandoned. Well over what a live release may spend delivering
#: (it gives up at half of this), so that a live claim is never taken over.
STALE_AFTER_S = 600.0
TOKEN_LENGTH = 255  # Quarantine.release_claim

_q = QUARANTINE.c


def new_token() -> str:
    """A claim token for this process: unique (random), and saying to an admin who holds the claim."""
    return f"{socket.gethostname()[:150]} pid {os.getpid()} {secrets.token_hex(8)}"


def _clock(conn: Connection) -> datetime:
    """Now, by the clock every process sharing this database agrees on (see the module docstring)."""
    if conn.dialect.name == "postgresql":
        # clock_timestamp(), not now(): the transaction may have waited for the row lock
        now: datetime = conn.execute(select(func.clock_timestamp())).scalar_one()
        return now.astimezone(UTC)
    return datetime.now(UTC)


def unclaimed(now: datetime, stale_after_s: float) -> ColumnElement[bool]:
    """No live claim on the row: none at all, or one older than `stale_after_s` (abandoned)."""
    return or_(_q.release_claim.is_(None), _q.release_claimed_at < now - timedelta(seconds=stale_after_s))


def _rowcount(result: Any) -> int:
    return int(result.rowcount) if isinstance(result, CursorResult) else 0


@dataclass(frozen=True)
class _Locked:
    """The claim's view of a quarantine row, as read under the row lock."""

    claim: str | None
    claimed_at: datetime | None
    released_at: datetime | None
    deleted_at: datetime | None


def _lock(conn: Connection, id: int) -> _Locked | None:
    pick = (
        select(_q.release_claim, _q.release_claimed_at, _q.released_at, _q.deleted_at)
        .where(_q.message_pk == id)
        .with_for_update()  # SQLite: ignored, the write lock covers it
    )
    row = conn.execute(pick).first()
    return None if row is None else _Locked(*row)


def _refusal(conn: Connection, id: int, row: _Locked | None) -> ClaimResult:
    """Why message `id` (its quarantine row as locked, or None) cannot be claimed."""
    if row is None:
        exists = conn.execute(select(MESSAGES.c.id).where(MESSAGES.c.id == id)).first() is not None
        return ClaimResult(ClaimState.NOT_QUARANTINED if exists else ClaimState.MISSING)
    if row.deleted_at is not None:
        return ClaimResult(ClaimState.DELETED, row.deleted_at)
    if row.released_at is not None:
        return ClaimResult(ClaimState.RELEASED, row.released_at)
    return ClaimResult(ClaimState.BUSY, row.claimed_at, row.claim)


def claim(writer: Engine, id: int, token: str, stale_after_s: float) -> ClaimResult:
    """Claim message `id` for `token`, in one transaction: CLAIMED, or why not."""
    if not token or len(token) > TOKEN_LENGTH:
        raise ValueError(f"a claim token is 1 to {TOKEN_LENGTH} characters")
    with writer.begin() as conn:
        row = _lock(conn, id)
        now = _clock(conn)
        stmt = (
            update(QUARANTINE)
            .where(_q.message_pk == id, _q.released_at.is_(None), _q.deleted_at.is_(None),
                   unclaimed(now, stale_after_s))
            .values(release_claim=token, release_claimed_at=now)
        )
        if row is None or _rowcount(conn.execute(stmt)) != 1:
            return _refusal(conn, id, row)
    return ClaimResult(ClaimState.CLAIMED, row.claimed_at, row.claim)


def finish(writer: Engine, id: int, token: str) -> bool:
    """Mark `id` released and drop the claim, if `token` still holds it; whether it did."""
    with writer.begin() as conn:
        stmt = (
            update(QUARANTINE)
            .where(_q.message_pk == id, _q.release_claim == token, _q.released_at.is_(None),
                   _q.deleted_at.is_(None))
            .values(released_at=_clock(conn), release_claim=None, release_claimed_at=None)
        )
        return _rowcount(conn.execute(stmt)) == 1


def abandon(writer: Engine, id: int, token: str) -> bool:
    """Drop `token`'s claim on `id` (the delivery failed: the message stays held); whether it held one."""
    stmt = (
        update(QUARANTINE)
        .where(_q.message_pk == id, _q.release_claim == token)
        .values(release_claim=None, release_claimed_at=None)
    )
    with writer.begin() as conn:
        return _rowcount(conn.execute(stmt)) == 1


def delete(writer: Engine, ids: Sequence[int], stale_after_s: float) -> int:
    """Drop the raw bytes of held messages (verdicts stay); how many. A message with a live claim is
    not deleted: it is being delivered right now, and deleting it under the release would leave a
    delivered message recorded as deleted, not released."""
    if not ids:
        return 0
    with writer.begin() as conn:
        now = _clock(conn)
        stmt = (
            update(QUARANTINE)
            .where(_q.message_pk.in_(list(ids)), _q.deleted_at.is_(None), unclaimed(now, stale_after_s))
            .values(raw=None, deleted_at=now, release_claim=None, release_claimed_at=None)
        )
        return _rowcount(conn.execute(stmt))
