"""The policy table's vocabulary: what a rule reads (`Context`), what it says (`Hit`), thresholds as
data (`Ladder`, `RuleSet`), normalised lists, and the small helpers the rules share."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from milter.config import ClassThresholds
from milter.errors import ConfigError
from milter.features import Protected
from milter.features.summary import MessageSummary
from milter.types import Action, Envelope, Scores, Verdict

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: How many of the feature extractor's signals are appended to the reasons.
MAX_SIGNALS = 5

#: Strictness of each action, for choosing among recipients. TEMPFAIL is the gateway's, never ours.
SEVERITY: Mapping[Action, int] = {Action.ACCEPT: 0, Action.TAG: 1, Action.QUARANTINE: 2, Action.REJECT: 3}

ADDR_IN_TEXT = re.compile(r"[\w.+-]+@([\w-]+(?:\.[\w-]+)+)", re.UNICODE)
_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


# --- data the rules read -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ladder:
    """One class's thresholds as data: (action, threshold) rows, strictest first."""

    name: str  # "spam" or "bec", for reasons
    rows: tuple[tuple[Action, float], ...]

    @classmethod
    def build(cls, name: str, thresholds: ClassThresholds) -> Ladder:
        rows = ((Action.REJECT, thresholds.reject), (Action.QUARANTINE, thresholds.quarantine),
                (Action.TAG, thresholds.tag))
        return cls(name, tuple((action, t) for action, t in rows if t is not None))

    def step(self, score: float) -> tuple[Action, float] | None:
        """The strictest row whose threshold the score reaches, if any."""
        for action, threshold in self.rows:
            if score >= threshold:
                return action, threshold
        return None


@dataclass(frozen=True)
class RuleSet:
    """Thresholds and override that apply to one recipient (the global set, or one DomainRule's)."""

    spam: Ladder
    bec: Ladder
    action_override: Action | None = None
    domain: str | None = None  # the DomainRule's domain; None for the global set


@dataclass(frozen=True)
class Lists:
    """Allow / deny lists, normalised once (lower-case names, parsed networks)."""

    allow_senders: frozenset[str]
    allow_domains: tuple[str, ...]
    allow_ips: tuple[IPNetwork, ...]
    deny_senders: frozenset[str]
    deny_domains: tuple[str, ...]
    deny_ips: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class Context:
    """Everything one evaluation of the rule table may look at."""

    scores: Scores
    summary: MessageSummary
    senders: tuple[str, ...]  # envelope MAIL FROM and header From, lower-case, de-duplicated
    client_ip: IPAddress | None
    lists: Lists
    protected: Protected
    rules: RuleSet
    dmarc_fail_action: Action | None = Action.TAG  # None: a DMARC failure is only a reason
    internal: bool = False  # from our own clients (policy.internal_networks, XFORWARD SOURCE=LOCAL)


@dataclass(frozen=True)
class Hit:
    """What a rule found. With an action it decides (if no earlier rule did); without, it is a note."""

    reason: str
    verdict: Verdict | None = None
    action: Action | None = None


Rule = Callable[[Context], "Hit | None"]


# --- small helpers -----------------------------------------------------------------------------------


def domain_of(address: str) -> str | None:
    _, at, domain = address.rpartition("@")
    if not at:
        return None
    return domain.lower().rstrip(".") or None


def in_domain(domain: str | None, listed: Iterable[str]) -> str | None:
    """The listed domain that `domain` is, or is a subdomain of (mail.example.com is in example.com)."""
    if not domain:
        return None
    for entry in listed:
        if domain == entry or domain.endswith("." + entry):
            return entry
    return None


def parse_client(addr: str | None) -> IPAddress | None:
    """SMTP / XFORWARD spell client addresses as 1.2.3.4, [1.2.3.4] or IPv6:... ; None if not an IP."""
    if not addr:
        return None
    text = addr.strip().strip("[]")
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    # An IPv4 client seen through an IPv6 socket must still match IPv4 CIDRs.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(ip: IPAddress | None, networks: Iterable[IPNetwork]) -> IPNetwork | None:
    if ip is None:
        return None
    for net in networks:
        if ip.version == net.version and ip in net:
            return net
    return None


def is_internal(envelope: Envelope, networks: Iterable[IPNetwork]) -> bool:
    """Mail from one of our own clients: XFORWARD SOURCE=LOCAL (Postfix's local_header_rewrite_clients)
    or a client address in `networks` (policy.internal_networks)."""
    if (envelope.source or "").upper() == "LOCAL":
        return True
    return in_networks(parse_client(envelope.client_addr), networks) is not None


def name_tokens(text: str) -> tuple[str, ...]:
    """Case-, punctuation- and whitespace-insensitive words: "Jane  SMITH, CEO" -> (jane, smith, ceo)."""
    return tuple(t for t in _NON_WORD.split(text.casefold()) if t)


def contains_name(display: str, name: str) -> bool:
    """The protected name's words appear together in the display name, in order or reversed
    ("Smith, Jane"): titles and decorations around them ("Jane Smith, CEO") do not hide a match."""
    words, wanted = name_tokens(display), name_tokens(name)
    if not wanted:
        return False
    n = len(wanted)
    windows = {words[i:i + n] for i in range(len(words) - n + 1)}
    return wanted in windows or tuple(reversed(wanted)) in windows


def parse_networks(key: str, entries: Iterable[str], table: str = "policy.lists") -> tuple[IPNetwork, ...]:
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(f"{table}.{key}[{i}]", f"not an IP address or CIDR: {entry!r}") from exc
    return tuple(out)


def normalised(entries: Iterable[str]) -> tuple[str, ...]:
    return tuple(e.strip().lower().rstrip(".") for e in entries if e.strip())
