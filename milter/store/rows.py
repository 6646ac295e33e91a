"""Frozen value types the store hands out; ORM objects never leave a session."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from milter.types import Envelope, Scores, label_class


@dataclass(frozen=True)
class MessageRow:
    """One verdict, with its quarantine state when the message was quarantined."""

    id: int
    received_at: datetime
    queue_id: str | None
    mail_from: str | None
    rcpt_tos: tuple[str, ...]
    client_addr: str | None
    client_name: str | None
    helo: str | None
    message_id: str | None
    from_addr: str | None
    subject: str | None
    verdict: str
    action: str
    scores: Scores
    reasons: tuple[str, ...]
    explanation: Mapping[str, Any] | None  # as stored: milter.explain.Explanation.from_json reads it
    model: str
    schema_digest: str
    label: str | None
    label_source: str | None
    labelled_at: datetime | None
    quarantined: bool
    size: int | None
    released_at: datetime | None
    deleted_at: datetime | None

    def as_json(self) -> dict[str, object]:
        """JSON-ready mapping (ISO 8601 UTC times); the CLI's `--json` line format."""

        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "id": self.id, "received_at": iso(self.received_at), "queue_id": self.queue_id,
            "message_id": self.message_id, "verdict": self.verdict, "action": self.action,
            "scores": self.scores.as_dict(), "from": self.from_addr, "subject": self.subject,
            "mail_from": self.mail_from, "rcpt_tos": list(self.rcpt_tos),
            "client_addr": self.client_addr, "client_name": self.client_name, "helo": self.helo,
            "reasons": list(self.reasons), "explanation": self.explanation, "model": self.model,
            "label": self.label,
            "label_source": self.label_source, "labelled_at": iso(self.labelled_at),
            "quarantined": self.quarantined, "size": self.size,
            "released_at": iso(self.released_at), "deleted_at": iso(self.deleted_at),
        }


@dataclass(frozen=True)
class LabelledExample:
    id: int
    message_id: str | None
    label: str
    label_source: str | None
    schema_digest: str
    vector: npt.NDArray[np.float32]  # read-only


@dataclass(frozen=True)
class StaleExample:
    """A labelled verdict without a vector of the current schema: retraining recomputes it from `raw`
    (None once the quarantined bytes were deleted or the message was never held)."""

    id: int
    label: str
    raw: bytes | None
    envelope: Envelope


class ClaimState(StrEnum):
    """What `Store.claim_release` found (milter/store/release.py)."""

    CLAIMED = "claimed"  # the caller holds the claim now and may deliver
    BUSY = "busy"  # another process holds a live claim: it is delivering right now
    RELEASED = "released"
    DELETED = "deleted"
    NOT_QUARANTINED = "not quarantined"
    MISSING = "missing"  # no message with this id


@dataclass(frozen=True)
class ClaimResult:
    """The outcome of a claim. `since` and `holder` describe, for BUSY, the live claim (when it was
    taken, its token); for CLAIMED, the abandoned claim this one took over (None when the message was
    unclaimed); for RELEASED and DELETED `since` is when that happened."""

    state: ClaimState
    since: datetime | None = None
    holder: str | None = None

    @property
    def claimed(self) -> bool:
        return self.state is ClaimState.CLAIMED

    @property
    def took_over(self) -> bool:
        """Whether this claim replaced a dead process's: that one may have delivered already."""
        return self.claimed and self.holder is not None


@dataclass(frozen=True)
class PurgeCounts:
    messages: int  # verdict rows deleted (labelled rows are kept for retraining)
    quarantined: int  # quarantined messages whose raw bytes were deleted


@dataclass(frozen=True)
class StoreStats:
    messages: int
    quarantined: int  # raw bytes still held
    released: int
    labelled: int
    by_verdict: Mapping[str, int]
    by_action: Mapping[str, int]
    oldest: datetime | None
    newest: datetime | None


def training_arrays(
    examples: Sequence[LabelledExample],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """(X, y) for retraining, y as indices into CLASS_NAMES (`label_class`: a bulk label trains ham);
    all examples must share one schema."""
    digests = {e.schema_digest for e in examples}
    if len(digests) > 1:
        raise ValueError(f"examples span several feature schemas: {sorted(digests)}")
    if not examples:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    x = np.stack([e.vector for e in examples]).astype(np.float32, copy=False)
    y = np.array([label_class(e.label) for e in examples], dtype=np.int64)
    return x, y


@dataclass(frozen=True)
class HistoryStats:
    """What the correspondence history table holds (`milter history stats`)."""

    by_kind: Mapping[str, int]  # entries per kind (milter.history.KINDS; a newer gateway's too)
    oldest: float | None  # the least recent last_seen, POSIX seconds; None when empty
    newest: float | None  # the most recent last_seen

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


@dataclass(frozen=True)
class HistorySource:
    """The facts of one stored verdict that the correspondence history learns from: what
    `milter history rebuild` replays. `outbound` and `teaches` are None for verdicts stored before
    revision 0003, which did not record them."""

    id: int
    received_at: datetime
    from_addr: str | None
    from_display: str | None
    reply_to: str | None
    rcpt_tos: tuple[str, ...]
    outbound: bool | None
    teaches: bool | None
    verdict: str
    action: str
    label: str | None
