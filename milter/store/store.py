"""The verdict / quarantine store: synchronous API over SQLAlchemy (the gateway uses asyncio.to_thread).

Every method is one short transaction on its own session and returns frozen rows, so nothing
bound to a session or a thread escapes. Every database failure surfaces as StoreError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from alembic.util import CommandError
from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Engine,
    Text,
    cast,
    delete,
    exists,
    func,
    insert,
    inspect,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute, Session, defer, sessionmaker

from milter.errors import StoreError
from milter.store import history as history_sql
from milter.store import registry as registry_sql
from milter.store import release as release_sql
from milter.store.engine import WRITE_OPTION, describe, is_memory_or_uri, make_engine, safe_url
from milter.store.mapping import (
    MAX_INDEXED,
    clean,
    envelope_of,
    message_values,
    new_message,
    to_row,
    vector_from_bytes,
)
from milter.store.migrate import current_revision, known_revisions, upgrade
from milter.store.models import MESSAGES, QUARANTINE, Message, Quarantine
from milter.store.registry import CurrentModel, ModelFiles, NodeStatus, PublishedModel
from milter.store.rows import (
    ClaimResult,
    HistorySource,
    HistoryStats,
    LabelledExample,
    MessageRow,
    PurgeCounts,
    StaleExample,
    StoreStats,
)
from milter.types import VERDICTS, Envelope

if TYPE_CHECKING:
    from milter.history import HistoryRow
    from milter.scan import ScanResult

PURGE_BATCH = 2000  # rows per purge transaction: short write locks, so record() never waits long
#: Label sources a user report may overwrite: other reports. Every other source (`quarantine label`'s
#: "cli" or --source, "release") is an admin's judgement, which a user's report must not undo.
REPORT_SOURCE = "user-report"
VERSION_TABLE = "alembic_version"


@dataclass(frozen=True)
class ReportLabels:
    """What `Store.label_reported` did: rows labelled, and rows whose admin label it kept."""

    labelled: int
    kept: int
    kept_labels: tuple[tuple[str, str], ...] = ()  # distinct (label, source) of the kept rows


def _now() -> datetime:
    return datetime.now(UTC)


@contextmanager
def _guard(what: str) -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise StoreError(f"{what}: {describe(exc)}") from exc


def _rowcount(result: Any) -> int:
    return int(result.rowcount) if isinstance(result, CursorResult) else 0


class Store:
    """Use `Store.open(url)`; close() (or a with block) releases the connections."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._writer = engine.execution_options(**{WRITE_OPTION: True})
        self._write = sessionmaker(self._writer, expire_on_commit=False)

    @classmethod
    def open(
        cls, url: str, busy_timeout_ms: int = 10_000, connect_timeout_s: int = 10, must_exist: bool = False
    ) -> Store:
        """Connect and bring the schema to the shipped head revision; StoreError on any failure.

        `must_exist`: for the review commands, which read and label a store the gateway filled. Opening
        creates and migrates whatever the URL names, so a wrong working directory (the default URL is
        relative) or a mistyped --db gave an empty new store: "quarantine is empty", or a user's label
        stored where nobody reads it. With it, a missing SQLite file (nothing created, not even its
        folder) or a database without a store's schema is a StoreError instead.
        """
        where = safe_url(url)
        try:
            engine = make_engine(url, busy_timeout_ms, connect_timeout_s, create=not must_exist)
        except (SQLAlchemyError, OSError, ImportError) as exc:
            raise StoreError(f"cannot open store {where}: {describe(exc)}") from exc
        try:
            if must_exist:
                _check_is_store(engine, where)
            with engine.execution_options(**{WRITE_OPTION: True}).begin() as conn:
                upgrade(conn)
        except (SQLAlchemyError, OSError, CommandError) as exc:
            engine.dispose()
            raise StoreError(f"cannot open store {where}: {_open_failure(engine, exc)}") from exc
        except StoreError:
            engine.dispose()
            raise
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------

    def record(
        self,
        result: ScanResult,
        envelope: Envelope,
        raw: bytes | None,
        schema_digest: str,
        keep_vector: bool = True,
        received_at: datetime | None = None,
    ) -> int:
        """Store one verdict (and the raw message when quarantining) atomically; the id once committed."""
        msg = new_message(result, envelope, schema_digest, keep_vector, received_at or _now())
        if raw is not None:
            msg.quarantine = Quarantine(raw=raw, size=len(raw))
        with _guard("cannot record verdict"), self._write.begin() as s:
            s.add(msg)
            s.flush()
            pk = msg.id
        return pk

    def record_many(
        self,
        items: Sequence[tuple[ScanResult, Envelope]],
        schema_digest: str,
        keep_vector: bool = True,
    ) -> int:
        """Store the verdicts of relayed messages in one transaction; how many rows were written.

        The gateway records delivered messages in batches: one commit per batch instead of one per
        message (the per-message commit was a third of a worker's CPU under load). Core, not the ORM:
        under load, py-spy found most of the store threads' time in the ORM's bulk-insert machinery.
        """
        if not items:
            return 0
        now = _now()
        rows = [message_values(r, e, schema_digest, keep_vector, now) for r, e in items]
        with _guard("cannot record verdicts"), self._writer.begin() as conn:
            conn.execute(insert(MESSAGES), rows)
        return len(rows)

    def record_batch(
        self,
        items: Sequence[tuple[ScanResult, Envelope, bytes | None]],
        schema_digest: str,
        keep_vector: bool = True,
    ) -> list[int]:
        """`record` for several messages in one transaction (group commit): all ids, or StoreError.

        Core inserts with RETURNING on a plain connection rather than the ORM: the gateway calls this
        for every quarantined message, and the ORM's unit of work cost more than the commit.
        """
        if not items:
            return []
        now = _now()
        rows = [message_values(r, e, schema_digest, keep_vector, now) for r, e, _ in items]
        stmt = insert(MESSAGES).returning(MESSAGES.c.id, sort_by_parameter_order=True)
        with _guard("cannot record verdicts"), self._writer.begin() as conn:
            ids = [int(pk) for pk in conn.execute(stmt, rows).scalars().all()]
            held = [
                {"message_pk": pk, "raw": raw, "size": len(raw)}
                for pk, (_, _, raw) in zip(ids, items, strict=True)
                if raw is not None
            ]
            if held:
                conn.execute(insert(QUARANTINE), held)
        return ids

    def mark_released(self, id: int) -> bool:
        """True when the message was held (not deleted, not yet released) and is now marked released.

        Ignores release claims: the release command uses claim_release / finish_release instead."""
        stmt = (
            update(Quarantine)
            .where(Quarantine.message_pk == id, Quarantine.released_at.is_(None),
                   Quarantine.deleted_at.is_(None))
            .values(released_at=_now())
        )
        with _guard("cannot mark released"), self._write.begin() as s:
            return _rowcount(s.execute(stmt)) == 1

    def delete(self, ids: Sequence[int], stale_after_s: float = release_sql.STALE_AFTER_S) -> int:
        """Drop the raw bytes of quarantined messages (the verdicts stay); how many were deleted. A
        message being released (a claim younger than `stale_after_s`) is not deleted."""
        with _guard("cannot delete"):
            return release_sql.delete(self._writer, ids, stale_after_s)

    # -- releasing exactly once across processes and nodes (the SQL is in milter/store/release.py) --

    def claim_release(
        self, id: int, token: str, stale_after_s: float = release_sql.STALE_AFTER_S
    ) -> ClaimResult:
        """Claim held message `id` for the release `token` (release_sql.new_token) before delivering it:
        CLAIMED when the caller may deliver (taking over a claim older than `stale_after_s`, which
        ClaimResult.took_over reports), otherwise why not (BUSY: another release is delivering it)."""
        with _guard("cannot claim message for release"):
            return release_sql.claim(self._writer, id, token, stale_after_s)

    def finish_release(self, id: int, token: str) -> bool:
        """After the downstream's 250: mark `id` released and drop the claim. False when `token` no
        longer holds it (taken over as abandoned, or purged): it may then be delivered twice."""
        with _guard("cannot mark released"):
            return release_sql.finish(self._writer, id, token)

    def abandon_release(self, id: int, token: str) -> bool:
        """After a failed delivery: drop `token`'s claim, the message stays held; whether it held one."""
        with _guard("cannot clear release claim"):
            return release_sql.abandon(self._writer, id, token)

    def set_label(self, ref: int | str, label: str, source: str) -> int:
        """Label by row id (int) or Message-ID (str, every copy); how many rows were labelled."""
        if label not in VERDICTS:
            raise ValueError(f"label must be one of {', '.join(VERDICTS)}, got {label!r}")
        # a Message-ID is looked up as it was stored (mapping.clean: no NUL, undecodable bytes replaced,
        # cut at MAX_INDEXED); raw, an 8-bit or a long one matched nothing or could not even be sent
        cond = Message.id == ref if isinstance(ref, int) else Message.message_id == clean(ref, MAX_INDEXED)
        # label_source is VARCHAR(64): a longer --source failed on PostgreSQL (SQLite does not check)
        values = {"label": label, "label_source": clean(source, 64), "labelled_at": _now()}
        stmt = update(Message).where(cond).values(**values)
        with _guard("cannot set label"), self._write.begin() as s:
            return _rowcount(s.execute(stmt))

    def label_reported(self, message_id: str, from_addr: str | None, label: str, source: str) -> ReportLabels:
        """Label a user-reported message: the stored verdicts with its Message-ID *and* its From address.

        The Message-ID alone is not the message: phishing kits copy a real message's ID, and a report of
        the phish then labelled the real one too (ending its sender's vouched-for credit). A row an admin
        labelled (any source but a report's: REPORT_SOURCE or `source`) keeps its label; how many did,
        and with which labels, comes back so the reporter can say so.
        """
        if label not in VERDICTS:
            raise ValueError(f"label must be one of {', '.join(VERDICTS)}, got {label!r}")
        source = clean(source, 64) or ""
        same_from = (
            Message.from_addr.is_(None)
            if from_addr is None
            else func.lower(Message.from_addr) == func.lower(clean(from_addr))
        )
        match = (Message.message_id == clean(message_id, MAX_INDEXED), same_from)
        by_report = or_(Message.label.is_(None), Message.label_source.in_((REPORT_SOURCE, source)))
        stmt = update(Message).where(*match, by_report).values(label=label, label_source=source,
                                                                labelled_at=_now())
        kept = select(Message.label, Message.label_source, func.count()).where(*match, not_(by_report))
        with _guard("cannot set label"), self._write.begin() as s:
            n = _rowcount(s.execute(stmt))
            kept_rows = s.execute(kept.group_by(Message.label, Message.label_source)).all()
        return ReportLabels(
            labelled=n, kept=sum(int(c) for _, _, c in kept_rows),
            kept_labels=tuple((str(lab), str(src)) for lab, src, _ in kept_rows),
        )

    def purge(self, older_than_days: int) -> PurgeCounts:
        """Delete verdicts and quarantined bytes older than the retention; labelled verdicts stay."""
        # 0 days put the cutoff at now: everything went, a message held a second ago included
        if older_than_days < 1:
            raise ValueError("older_than_days must be at least 1")
        cutoff = _now() - timedelta(days=older_than_days)
        held = exists().where(Quarantine.message_pk == Message.id)
        pick = (
            select(Message.id)
            .where(Message.received_at < cutoff, or_(Message.label.is_(None), held))
            .order_by(Message.id)
            .limit(PURGE_BATCH)
        )
        messages = quarantined = 0
        with _guard("cannot purge"):
            while True:
                with self._write.begin() as s:
                    ids = list(s.scalars(pick))
                    if not ids:
                        break
                    # bytes an admin deleted earlier are not purged now: only held rows count
                    in_batch = Quarantine.message_pk.in_(ids)
                    held_rows = delete(Quarantine).where(in_batch, Quarantine.deleted_at.is_(None))
                    quarantined += _rowcount(s.execute(held_rows))
                    s.execute(delete(Quarantine).where(in_batch))
                    gone = delete(Message).where(Message.id.in_(ids), Message.label.is_(None))
                    messages += _rowcount(s.execute(gone))
        return PurgeCounts(messages=messages, quarantined=quarantined)

    # -- reading -------------------------------------------------------------------------------

    def get(self, id: int) -> MessageRow | None:
        stmt = (
            select(Message, Quarantine)
            .outerjoin(Quarantine, Quarantine.message_pk == Message.id)
            .where(Message.id == id)
            .options(defer(Message.feature_vector), defer(Quarantine.raw))
        )
        with _guard("cannot read verdict"), self._read() as s:
            hit = s.execute(stmt).first()
            return to_row(hit[0], hit[1]) if hit is not None else None

    def get_raw(self, id: int) -> bytes | None:
        """The quarantined bytes; None when not quarantined or deleted."""
        with _guard("cannot read quarantined message"), self._read() as s:
            return s.scalar(select(Quarantine.raw).where(Quarantine.message_pk == id))

    def get_vector(self, id: int) -> npt.NDArray[np.float32] | None:
        """The stored feature vector (read-only, in the row's schema order); None when not kept."""
        with _guard("cannot read feature vector"), self._read() as s:
            data = s.scalar(select(Message.feature_vector).where(Message.id == id))
        return vector_from_bytes(data) if data is not None else None

    def quarantine_list(
        self,
        since: datetime | None = None,
        verdict: str | None = None,
        limit: int = 50,
        offset: int = 0,
        include_deleted: bool = False,
        recipient: str | None = None,
        sender: str | None = None,
        reason: str | None = None,
    ) -> list[MessageRow]:
        """Quarantined messages, newest first, without their bytes.

        `recipient` matches any envelope recipient, `sender` the envelope sender or the From address;
        both whole addresses, case-insensitive (ASCII letters; see `_recipient_match`). `reason` is a
        piece of text any of the message's reasons contains ("dbl.spamhaus.org": what one blocklist
        held), case-insensitive, `%` and `_` literal; matched in the stored JSON text, so text that JSON
        escapes (quotes, backslashes, non-ASCII letters) matches as escaped.
        """
        stmt = (
            select(Message, Quarantine)
            .join(Quarantine, Quarantine.message_pk == Message.id)
            .options(defer(Message.feature_vector), defer(Quarantine.raw))
            .order_by(Message.received_at.desc(), Message.id.desc())
            .limit(limit)
            .offset(offset)
        )
        if since is not None:
            stmt = stmt.where(Message.received_at >= since)
        if verdict is not None:
            stmt = stmt.where(Message.verdict == verdict)
        if not include_deleted:
            stmt = stmt.where(Quarantine.deleted_at.is_(None))
        if recipient is not None:
            stmt = stmt.where(_recipient_match(recipient))
        if sender is not None:
            wanted = sender.strip().lower()
            stmt = stmt.where(or_(func.lower(Message.mail_from) == wanted,
                                  func.lower(Message.from_addr) == wanted))
        if reason:
            text = func.lower(cast(Message.reasons, Text))
            stmt = stmt.where(text.contains(reason.lower(), autoescape=True))
        with _guard("cannot list quarantine"), self._read() as s:
            return [to_row(m, q) for m, q in s.execute(stmt)]

    def held_explanations(
        self, since: datetime, verdict: str | None = None, after_id: int = 0, limit: int = 2000
    ) -> list[tuple[int, str, object]]:
        """(id, verdict, stored explanation: a JSON object, or None) of quarantined verdicts received
        since `since`, by id, the first `limit` with an id above `after_id`: the caller pages through a
        long period without holding it all (`milter quarantine stats --why`).

        Quarantined means action "quarantine", released or deleted since or not: the report is about
        why mail was held. Only these three columns are read (no vectors, no raw bytes).
        """
        stmt = (
            select(Message.id, Message.verdict, Message.explanation)
            .where(Message.action == "quarantine", Message.received_at >= since, Message.id > after_id)
            .order_by(Message.id)
            .limit(limit)
        )
        if verdict is not None:
            stmt = stmt.where(Message.verdict == verdict)
        with _guard("cannot read explanations"), self._read() as s:
            return [(int(i), str(v), e) for i, v, e in s.execute(stmt)]

    def labelled_examples(self, schema_digest: str | None = None) -> list[LabelledExample]:
        """Labelled verdicts that kept their feature vector, oldest first (see rows.training_arrays)."""
        stmt = (
            select(Message.id, Message.message_id, Message.label, Message.label_source,
                   Message.schema_digest, Message.feature_vector)
            .where(Message.label.is_not(None), Message.feature_vector.is_not(None))
            .order_by(Message.id)
        )
        if schema_digest is not None:
            stmt = stmt.where(Message.schema_digest == schema_digest)
        with _guard("cannot read labelled examples"), self._read() as s:
            return [
                LabelledExample(id=i, message_id=mid, label=lab or "", label_source=src,
                                schema_digest=dig, vector=vector_from_bytes(vec or b""))
                for i, mid, lab, src, dig, vec in s.execute(stmt)
            ]

    def sender_labels(self) -> list[tuple[str | None, str, int]]:
        """(From address, label, count) over every labelled verdict: what the policy's learned-sender
        rule is built from (milter.policy.learned). Grouped in SQL, so it costs one row per sender."""
        stmt = (
            select(func.lower(Message.from_addr), Message.label, func.count())
            .where(Message.label.is_not(None))
            .group_by(func.lower(Message.from_addr), Message.label)
        )
        with _guard("cannot read sender labels"), self._read() as s:
            return [(addr, label or "", int(n)) for addr, label, n in s.execute(stmt)]

    def stale_examples(self, schema_digest: str) -> list[StaleExample]:
        """Labelled verdicts without a vector of `schema_digest`, oldest first, with their raw bytes
        where still held (the feature schema changed since they were scanned)."""
        stmt = (
            select(Message, Quarantine.raw)
            .outerjoin(Quarantine, Quarantine.message_pk == Message.id)
            .where(
                Message.label.is_not(None),
                or_(Message.feature_vector.is_(None), Message.schema_digest != schema_digest),
            )
            .order_by(Message.id)
        )
        with _guard("cannot read labelled examples"), self._read() as s:
            return [
                StaleExample(id=m.id, label=m.label or "", raw=raw, envelope=envelope_of(m))
                for m, raw in s.execute(stmt)
            ]

    def stats(self) -> StoreStats:
        with _guard("cannot read statistics"), self._read() as s:
            return _stats(s)

    def daily_volumes(self, days: int) -> list[tuple[str, str, str, int]]:
        """(UTC day, action, verdict, count) for the last `days` days, newest day first.

        Grouped in SQL by `date(received_at)`, which SQLite and PostgreSQL both have. PostgreSQL takes
        the date of a timestamptz in the session's TimeZone (the server's default), so there the value
        is converted to UTC first; SQLite stores UTC already.
        """
        since = _now() - timedelta(days=days)
        when: Any = Message.received_at
        if self.engine.dialect.name == "postgresql":
            when = func.timezone("UTC", Message.received_at)
        day = func.date(when)
        stmt = (
            select(day, Message.action, Message.verdict, func.count())
            .where(Message.received_at >= since)
            .group_by(day, Message.action, Message.verdict)
            .order_by(day.desc(), Message.action, Message.verdict)
        )
        with _guard("cannot read statistics"), self._read() as s:
            return [(str(d), str(a), str(v), int(n)) for d, a, v, n in s.execute(stmt)]


    # -- correspondence history (milter.history; the SQL is in milter/store/history.py) ---------------

    def history_apply(self, rows: Sequence[HistoryRow]) -> int:
        """Add what a gateway learned to the shared history, in one transaction: per entry the counts
        are summed, first_seen is the earliest and last_seen the latest (never an overwrite: other
        processes and nodes write the same entries). How many entries were written."""
        with _guard("cannot write correspondence history"):
            return history_sql.apply(self._writer, rows)

    def history_rows(self, since: float | None = None) -> list[HistoryRow]:
        """Entries last seen at or after `since` (POSIX seconds; all when None), by last_seen, then
        kind, key and member: given to `CorrespondenceHistory.put` in this order, they rebuild its
        tables' order."""
        with _guard("cannot read correspondence history"):
            return history_sql.read(self.engine, since)

    def history_purge(self, before: float) -> int:
        """Delete the entries last seen before `before` (POSIX seconds), in short transactions; how many."""
        with _guard("cannot purge correspondence history"):
            return history_sql.purge(self._writer, before)

    def history_trim(self, caps: Mapping[str, int]) -> int:
        """Keep per kind only the `caps[kind]` entries seen most recently, in short transactions; how
        many went (`milter.history.stored_caps`)."""
        with _guard("cannot trim correspondence history"):
            return history_sql.trim(self._writer, caps)

    def history_replace(self, rows: Iterable[HistoryRow]) -> int:
        """Replace the whole history with `rows` in one transaction (a failure keeps the old one); how
        many entries were written."""
        with _guard("cannot replace correspondence history"):
            return history_sql.replace(self._writer, rows)

    def history_stats(self) -> HistoryStats:
        with _guard("cannot read correspondence history"):
            return history_sql.stats(self.engine)

    def history_sources(self, after_id: int = 0, limit: int = 2000) -> list[HistorySource]:
        """What the history learns from, for the first `limit` verdicts with an id above `after_id`,
        by id: the caller pages through the store (`milter history rebuild`). Reads only those columns
        (no vectors, no raw bytes)."""
        with _guard("cannot read verdicts"):
            return history_sql.sources(self.engine, after_id, limit)

    # -- the fleet's model registry (the SQL is in milter/store/registry.py) -----------------------

    def model_publish(self, files: ModelFiles, by: str) -> bool:
        """Add a model's files; True when added, False when that name and digest were there already.
        StoreError when the name is taken by other bytes."""
        with _guard("cannot publish model"):
            return registry_sql.publish(self._writer, files, by)

    def model_set_current(self, name: str, action: str, by: str) -> None:
        """Make published model `name` the fleet's current one; `action` is "promote" or "rollback"."""
        with _guard("cannot change the current model"):
            registry_sql.set_current(self._writer, name, action, by)

    def model_current(self) -> CurrentModel | None:
        """The fleet's current model (name, ONNX sha256); None before the first promotion."""
        with _guard("cannot read the current model"):
            return registry_sql.current(self.engine)

    def model_previous(self) -> str | None:
        """The model that was current before the current one (what a rollback without a name picks)."""
        with _guard("cannot read the model log"):
            return registry_sql.previous(self.engine)

    def model_fetch(self, name: str) -> ModelFiles | None:
        with _guard("cannot read model"):
            return registry_sql.fetch(self.engine, name)

    def model_list(self) -> list[PublishedModel]:
        with _guard("cannot list models"):
            return registry_sql.models(self.engine)

    def node_check_in(self, status: NodeStatus) -> None:
        with _guard("cannot check in"):
            registry_sql.check_in(self._writer, status)

    def node_list(self) -> list[NodeStatus]:
        with _guard("cannot list nodes"):
            return registry_sql.nodes(self.engine)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _recipient_match(recipient: str) -> ColumnElement[bool]:
    """Match one element of the `rcpt_tos` JSON list, portably (SQLite and PostgreSQL `json`).

    Both backends keep the JSON text exactly as SQLAlchemy's json.dumps wrote it (ASCII, each address a
    quoted string), so the address serialised the same way, quotes included, is a LIKE needle that can
    only match a whole element: no partial-address hits, no JSON1 / jsonb operators needed. No index
    serves it (the quarantine join is scanned), which is fine at review-CLI scale. lower() on both sides
    makes it case-insensitive for ASCII letters; non-ASCII is \\u-escaped by json.dumps and compared
    as written.
    """
    needle = json.dumps(recipient.strip().lower())
    pattern = f"%{_like_escape(needle)}%"
    return func.lower(cast(Message.rcpt_tos, Text)).like(pattern, escape="\\")


def _counts(s: Session, column: InstrumentedAttribute[str]) -> dict[str, int]:
    return {key: int(n) for key, n in s.execute(select(column, func.count()).group_by(column))}


def _stats(s: Session) -> StoreStats:
    count, oldest, newest = s.execute(
        select(func.count(Message.id), func.min(Message.received_at), func.max(Message.received_at))
    ).one()
    n_quarantine = select(func.count()).select_from(Quarantine)
    # held: still waiting for a decision; a released message keeps its bytes but is no longer held
    held = s.scalar(n_quarantine.where(Quarantine.deleted_at.is_(None), Quarantine.released_at.is_(None)))
    released = s.scalar(n_quarantine.where(Quarantine.released_at.is_not(None)))
    labelled = s.scalar(select(func.count()).select_from(Message).where(Message.label.is_not(None)))
    by_verdict = _counts(s, Message.verdict)
    by_action = _counts(s, Message.action)
    return StoreStats(
        messages=int(count), quarantined=int(held or 0), released=int(released or 0),
        labelled=int(labelled or 0), by_verdict=by_verdict, by_action=by_action,
        oldest=oldest, newest=newest,
    )


def _check_is_store(engine: Engine, where: str) -> None:
    """StoreError unless `engine` reaches an existing store (see Store.open's `must_exist`)."""
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and database and not is_memory_or_uri(engine.url):
        # as sqlite3 resolves it: relative to the working directory, no ~ expansion
        path = Path(database).absolute()
        if not path.is_file():
            raise StoreError(f"no store at {path}: the file does not exist (check --db, MILTER_STORE_URL "
                             "or the config's store.url; the gateway creates its store)")
    with engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            raise StoreError(f"no store at {where}: the database holds no mailsift store "
                             f"(no {VERSION_TABLE} table)")


def _open_failure(engine: Engine, exc: BaseException) -> str:
    """Why opening failed, in words; a schema from a newer mailsift said as such (Alembic's own text,
    "Can't locate revision", reads like a corrupt store)."""
    if isinstance(exc, CommandError):
        newer = _unknown_revision(engine)
        if newer is not None:
            return (f"this store was migrated by a newer mailsift (revision {newer}); "
                    "run that version, or give this one a store of its own")
    return describe(exc)


def _unknown_revision(engine: Engine) -> str | None:
    """The store's schema revision when this code does not know it; None otherwise or unreadable."""
    try:
        with engine.connect() as conn:
            revision = current_revision(conn)
    except SQLAlchemyError:
        return None
    return revision if revision is not None and revision not in known_revisions() else None
