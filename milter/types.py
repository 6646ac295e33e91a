"""Value types shared by every stage of the pipeline (frozen dataclasses, no behaviour)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Verdict(StrEnum):
    HAM = "ham"
    SPAM = "spam"
    BEC = "bec"


class Action(StrEnum):
    ACCEPT = "accept"
    TAG = "tag"
    QUARANTINE = "quarantine"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


CLASS_NAMES: tuple[str, ...] = (Verdict.HAM.value, Verdict.SPAM.value, Verdict.BEC.value)


@dataclass(frozen=True)
class Envelope:
    """What the SMTP session (or XFORWARD) says about a message; all optional for offline scans."""

    mail_from: str | None = None
    rcpt_tos: tuple[str, ...] = ()
    client_addr: str | None = None
    client_name: str | None = None
    helo: str | None = None
    queue_id: str | None = None
    source: str | None = None  # XFORWARD SOURCE: "LOCAL" for Postfix's own/authenticated clients, "REMOTE"


@dataclass(frozen=True)
class Scores:
    ham: float
    spam: float
    bec: float

    def as_dict(self) -> dict[str, float]:
        return {"ham": self.ham, "spam": self.spam, "bec": self.bec}


@dataclass(frozen=True)
class Decision:
    """The policy's answer for one message: what to do and why."""

    verdict: Verdict
    action: Action
    reasons: tuple[str, ...] = field(default_factory=tuple)
    subject_prefix: str | None = None
