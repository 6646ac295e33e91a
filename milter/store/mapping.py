"""Conversions between scan results, ORM rows and the frozen rows handed out.

Header-derived text comes from senders, so it is made storable here: PostgreSQL rejects NUL
characters, neither backend can encode lone surrogates, and an over-long indexed value would fail
the insert. A message must never be refused because its Subject cannot be stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from milter.store.models import Message, Quarantine
from milter.store.rows import MessageRow
from milter.types import Envelope, Scores

if TYPE_CHECKING:
    from milter.scan import ScanResult

MAX_INDEXED = 500  # characters; well under PostgreSQL's B-tree entry limit even in 4-byte UTF-8
MAX_TEXT = 10_000


def clean(value: str | None, limit: int = MAX_TEXT) -> str | None:
    if value is None:
        return None
    value = value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return value[:limit]


def _clean_list(values: Iterable[str], limit: int = MAX_TEXT) -> list[str]:
    return [clean(v, limit) or "" for v in values]


def vector_bytes(vector: object) -> bytes:
    """float32 little-endian, whatever the host byte order."""
    return np.ascontiguousarray(vector, dtype="<f4").ravel().tobytes()


def vector_from_bytes(data: bytes) -> npt.NDArray[np.float32]:
    out = np.frombuffer(data, dtype="<f4").astype(np.float32)
    out.flags.writeable = False
    return out


def message_values(
    result: ScanResult, envelope: Envelope, schema_digest: str, keep_vector: bool, received_at: datetime
) -> dict[str, object]:
    """The `messages` columns for one verdict, cleaned for storage."""
    summary = result.summary
    return {
        "received_at": received_at,
        "queue_id": clean(envelope.queue_id, 64),
        "mail_from": clean(envelope.mail_from),
        "rcpt_tos": _clean_list(envelope.rcpt_tos, 1000),
        "client_addr": clean(envelope.client_addr, 64),
        "client_name": clean(envelope.client_name),
        "helo": clean(envelope.helo),
        "message_id": clean(summary.message_id, MAX_INDEXED),
        "from_addr": clean(summary.from_addr),
        "subject": clean(summary.subject),
        "verdict": str(result.verdict),
        "action": str(result.action),
        "score_ham": float(result.scores.ham),
        "score_spam": float(result.scores.spam),
        "score_bec": float(result.scores.bec),
        "reasons": _clean_list(result.reasons, 1000),
        "explanation": result.explanation.as_json() if result.explanation is not None else None,
        "model": clean(result.model, 200) or "",
        "feature_vector": vector_bytes(result.vector) if keep_vector else None,
        "schema_digest": schema_digest[:128],
        "from_display": clean(summary.from_display),
        "reply_to": clean(summary.reply_to_addr),
        "outbound": bool(result.outbound),
        "teaches": bool(result.teaches),
    }


def new_message(
    result: ScanResult, envelope: Envelope, schema_digest: str, keep_vector: bool, received_at: datetime
) -> Message:
    return Message(**message_values(result, envelope, schema_digest, keep_vector, received_at))


def envelope_of(msg: Message) -> Envelope:
    """The SMTP envelope a verdict was stored with (for rescanning or releasing the message)."""
    return Envelope(
        mail_from=msg.mail_from,
        rcpt_tos=tuple(msg.rcpt_tos or ()),
        client_addr=msg.client_addr,
        client_name=msg.client_name,
        helo=msg.helo,
        queue_id=msg.queue_id,
    )


def to_row(msg: Message, q: Quarantine | None) -> MessageRow:
    return MessageRow(
        id=msg.id, received_at=msg.received_at, queue_id=msg.queue_id, mail_from=msg.mail_from,
        rcpt_tos=tuple(msg.rcpt_tos), client_addr=msg.client_addr, client_name=msg.client_name,
        helo=msg.helo, message_id=msg.message_id, from_addr=msg.from_addr, subject=msg.subject,
        verdict=msg.verdict, action=msg.action,
        scores=Scores(ham=msg.score_ham, spam=msg.score_spam, bec=msg.score_bec),
        reasons=tuple(msg.reasons), explanation=msg.explanation, model=msg.model,
        schema_digest=msg.schema_digest,
        label=msg.label, label_source=msg.label_source, labelled_at=msg.labelled_at,
        quarantined=q is not None, size=q.size if q is not None else None,
        released_at=q.released_at if q is not None else None,
        deleted_at=q.deleted_at if q is not None else None,
    )
