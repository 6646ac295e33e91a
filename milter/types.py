"""Value types shared by every stage of the pipeline (frozen dataclasses, no behaviour), and the one
mapping from an admin's label to the model class it trains (`label_class`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType


class Verdict(StrEnum):
    HAM = "ham"
    # Wanted bulk mail (newsletters, notifications): a policy verdict from the sender's own evidence
    # (milter.policy.bulk); the model has no such class.
    BULK = "bulk"
    SPAM = "spam"
    BEC = "bec"


class Action(StrEnum):
    ACCEPT = "accept"
    TAG = "tag"
    QUARANTINE = "quarantine"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


#: The model's classes, in the order of its output columns.
CLASS_NAMES: tuple[str, ...] = (Verdict.HAM.value, Verdict.SPAM.value, Verdict.BEC.value)

#: Every verdict the policy gives, and so every label an admin may give a message.
VERDICTS: tuple[str, ...] = tuple(v.value for v in Verdict)

# The model class each label trains: bulk is mail the recipient wants, so it teaches the model ham.
_TRAINS_AS: Mapping[str, str] = MappingProxyType({
    Verdict.HAM.value: Verdict.HAM.value,
    Verdict.BULK.value: Verdict.HAM.value,
    Verdict.SPAM.value: Verdict.SPAM.value,
    Verdict.BEC.value: Verdict.BEC.value,
})


def label_class(label: str) -> int:
    """The index into CLASS_NAMES that a stored label trains (bulk -> ham); ValueError for an unknown one."""
    try:
        return CLASS_NAMES.index(_TRAINS_AS[label])
    except KeyError:
        raise ValueError(f"label must be one of {', '.join(VERDICTS)}, got {label!r}") from None


def wanted_label(label: str) -> bool:
    """The label says the recipient wants mail like this (ham or bulk); unknown labels do not."""
    return _TRAINS_AS.get(label) == Verdict.HAM.value


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
    # The correspondence history (milter.history) learns from this message once it is delivered: mail
    # judged ham or bulk, or tagged only because its sender is new (never spam, never held mail).
    teaches: bool = False
    outbound: bool = False  # our users' mail: an internal client, From one of policy.protected_domains
