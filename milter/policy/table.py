"""The policy table's vocabulary: what a rule reads (`Context`), what it says (`Hit`), thresholds as
data (`Ladder`, `RuleSet`), normalised lists, and the small helpers the rules share."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from milter.config import DEFAULT_LEARNED_SENDER_LABELS, ClassThresholds
from milter.errors import ConfigError
from milter.features import Protected

# Re-exported: the rules import them from here; they live beside the features so that the pure
# correspondence history (milter.history) can use them without importing the policy package.
from milter.features.domains import in_domain as in_domain
from milter.features.domains import sender_key as sender_key
from milter.features.identity import contains_name as contains_name
from milter.features.identity import name_tokens as name_tokens
from milter.features.lexicon import SUSPICIOUS_TLDS
from milter.features.summary import MessageSummary
from milter.names import compared
from milter.types import Action, Envelope, Scores, Verdict, wanted_label

if TYPE_CHECKING:  # milter.history imports the policy's helpers' modules: keep this one type-only
    from milter.history import HistoryLookup

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: How many of the feature extractor's signals are appended to the reasons.
MAX_SIGNALS = 5

#: Strictness of each action, for choosing among recipients. TEMPFAIL is the gateway's, never ours.
SEVERITY: Mapping[Action, int] = {Action.ACCEPT: 0, Action.TAG: 1, Action.QUARANTINE: 2, Action.REJECT: 3}

ADDR_IN_TEXT = re.compile(r"[\w.+-]+@([\w-]+(?:\.[\w-]+)+)", re.UNICODE)


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
class Brand:
    """A brand of `policy.brands`: its name as a reader takes it in ("lowes"), as the admin wrote it
    ("Lowe's", for reasons) and the registrable domains it mails from."""

    letters: str
    name: str
    owned: frozenset[str]


@dataclass(frozen=True)
class LowerCuts:
    """Not-ham scores from which one kind of mail is tagged as spam (`tag_from`); None: that rule is off."""

    abused_tld: float | None = None  # policy.abused_tld_tag (milter.policy.abused_tld)
    # the TLDs that rule judges: the features' list and policy.abused_tlds (milter.policy.abused_tld)
    abused_tlds: frozenset[str] = SUSPICIOUS_TLDS
    unsigned_html: float | None = None  # policy.unsigned_html_tag (milter.policy.unsigned)
    odd_digest: float | None = None  # policy.odd_digest_tag (milter.policy.unsigned)
    image_only: float | None = None  # policy.image_only_tag (milter.policy.unsigned)
    name_mailbox: float | None = None  # policy.name_mailbox_tag (milter.policy.mailbox)
    gibberish_mailbox: float | None = None  # policy.gibberish_mailbox_tag (milter.policy.mailbox)
    padded_mailbox: float | None = None  # policy.padded_mailbox_tag (milter.policy.mailbox)
    unrelated_mailbox: float | None = None  # policy.unrelated_mailbox_tag (milter.policy.mailbox)
    brand_display: float | None = None  # policy.brand_display_tag (milter.policy.mailbox)
    brand_alone: float | None = None  # policy.brand_alone_tag (milter.policy.mailbox)
    brands: tuple[Brand, ...] = ()  # policy.brands, as the brand rule reads them (mailbox.brands)
    fake_reply: float | None = None  # policy.fake_reply_tag (milter.policy.form)
    no_mailbox: float | None = None  # policy.no_mailbox_tag (milter.policy.form)
    several_from: float | None = None  # policy.several_from_tag (milter.policy.form)
    harvested_recipients: float | None = None  # policy.harvested_recipients_tag (milter.policy.recipients)


@dataclass(frozen=True)
class RuleSet:
    """Thresholds and override that apply to one recipient (the global set, or one DomainRule's)."""

    spam: Ladder
    bec: Ladder
    action_override: Action | None = None
    domain: str | None = None  # the DomainRule's domain; None for the global set
    bulk_action: Action | None = None  # what the bulk rule does (milter.policy.bulk); None: it is off
    cuts: LowerCuts = field(default_factory=lambda: LowerCuts())  # the same for every recipient


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
class SenderLabels:
    """Labels the store holds for one sender (see `sender_key`)."""

    ham: int = 0  # ham or bulk: mail the recipient wants
    unwanted: int = 0  # spam or bec



@dataclass(frozen=True)
class LearnedSenders:
    """Label counts per sender (`sender_key`), and how many ham labels make a sender vouched for."""

    counts: Mapping[str, SenderLabels] = field(default_factory=lambda: MappingProxyType({}))
    min_ham: int = DEFAULT_LEARNED_SENDER_LABELS  # policy.learned_sender_labels; 0 turns the rule off

    @classmethod
    def from_labels(cls, rows: Iterable[tuple[str | None, str, int]], min_ham: int) -> LearnedSenders:
        """From (from address, label, count) rows, as `Store.sender_labels` returns them."""
        ham: dict[str, int] = {}
        unwanted: dict[str, int] = {}
        for addr, label, n in rows:
            if not (key := sender_key(addr)):
                continue
            # a bulk label vouches like ham: the recipient wants the newsletter, in its own folder
            target = ham if wanted_label(label) else unwanted
            target[key] = target.get(key, 0) + n
        counts = {k: SenderLabels(ham.get(k, 0), unwanted.get(k, 0)) for k in ham.keys() | unwanted.keys()}
        return cls(MappingProxyType(counts), min_ham)

    @property
    def vouched_count(self) -> int:
        """How many senders the labels vouch for now (logged at start and on reload)."""
        return sum(1 for key in self.counts if self.vouched(key) is not None)

    def vouched(self, key: str) -> SenderLabels | None:
        """The sender's labels when they vouch for it (enough ham, no spam or bec), else None."""
        labels = self.counts.get(key)
        if self.min_ham <= 0 or labels is None or labels.unwanted or labels.ham < self.min_ham:
            return None
        return labels


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
    learned: LearnedSenders = field(default_factory=LearnedSenders)  # admins' labels per From domain
    history: HistoryLookup | None = None  # what the correspondence history knew (None: unknown or off)
    history_modes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # signal -> mode


@dataclass(frozen=True)
class Hit:
    """What a rule found. With an action it decides (if no earlier rule did); without, it is a note."""

    reason: str
    verdict: Verdict | None = None
    action: Action | None = None
    novel: bool = False  # decided for who sent it, not what it says: the history may still learn it
    floor: bool = False  # its action is a minimum: it raises an earlier rule's tag to it (`evaluate`)


Rule = Callable[[Context], "Hit | None"]


# --- small helpers -----------------------------------------------------------------------------------


def tag_from(ctx: Context, cut: float, reason: Callable[[float], str]) -> Hit | None:
    """Spam, tag, once the not-ham score reaches `cut`: the rules that lower the spam cut for one kind of
    mail (abused TLDs, unsigned HTML, odd digests, how the mailbox is named). Never softer than the spam
    ladder: where it alone would quarantine or reject, that stands. `reason` says why, given the score."""
    score = ctx.scores.spam + ctx.scores.bec
    if score < cut:
        return None
    action = no_softer_than_ladder(ctx, Action.TAG, score)
    at_least = f" (at least {cut:g} tags such mail)" if cut > 0 else ""  # 0: the rule tags at any score
    return Hit(f"{reason(score)}{at_least}", Verdict.SPAM, action)


def tag_judged(ctx: Context, cut: float | None, what: str) -> Hit | None:
    """Spam, tag from `cut` (None: the rule is off), for the senders the lower-cut rules judge
    (`judged_sender`); the reason is `what`, then the score."""
    if cut is None or not judged_sender(ctx):
        return None
    return tag_from(ctx, cut, lambda score: f"{what}, and it scores {score:.2f} as spam")


def judged_sender(ctx: Context) -> bool:
    """Whether a rule that lowers the spam cut for how a sender looks may judge this message: not our own
    clients' mail (`policy.internal_networks`: often signed only after the filter), not from our own
    domains (`policy.protected_domains`), not a mailing list's copy (the list's headers, not the
    author's) and not a machine-generated report (bounces, DMARC reports)."""
    summary = ctx.summary
    if ctx.internal or summary.list_mail or summary.auto_report:
        return False
    domain = summary.from_org_domain or ""
    return not (domain and in_domain(domain, ctx.protected.domains) is not None)


def no_softer_than_ladder(ctx: Context, action: Action, score: float) -> Action:
    """`action`, or the spam ladder's for not-ham `score` where that is stricter: a rule that decides on
    other evidence (a listing, a lower cut) never lets through what the model alone would hold."""
    step = stricter_spam_step(ctx, action, score)
    return action if step is None else step[0]


def stricter_spam_step(ctx: Context, action: Action, score: float) -> tuple[Action, float] | None:
    """The spam ladder's (action, threshold) for not-ham `score` where that action is stricter than
    `action`; None where it is not."""
    step = ctx.rules.spam.step(score)
    return step if step is not None and SEVERITY[step[0]] > SEVERITY[action] else None


def from_mailboxes(summary: MessageSummary) -> tuple[tuple[str, str | None], ...]:
    """(display name, domain) of every From address: the first, then the others a From with several
    addresses gives (`MessageSummary.from_others`). A mail client shows all of them, so the rules that
    read who the sender claims to be read all of them."""
    first = (summary.from_display or "", summary.from_domain)
    return (first, *((display, domain_of(addr)) for display, addr in summary.from_others))


def domain_of(address: str) -> str | None:
    """An address's domain as the rules compare it (milter.names.compared), or None."""
    _, at, domain = address.rpartition("@")
    if not at:
        return None
    return compared(domain) or None



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






def parse_networks(key: str, entries: Iterable[str], table: str = "policy.lists") -> tuple[IPNetwork, ...]:
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(f"{table}.{key}[{i}]", f"not an IP address or CIDR: {entry!r}") from exc
    return tuple(out)


def normalised(entries: Iterable[str]) -> tuple[str, ...]:
    """List entries (domains, or addresses) as the rules compare them (milter.names.compared: trimmed,
    lower case, no root dot, domains in A-labels); blank entries dropped."""
    return tuple(compared(e) for e in entries if e.strip())
