"""The policy: model scores + lists + protected identities -> one `Decision`, as a readable table.

Mailman-3 style: every rule is one small function that looks at the message and either says nothing or
returns a `Hit` (a reason, and for a deciding rule a verdict and an action). The rules are evaluated in
the order of `RULES`; the first hit that carries an action decides, and every hit is kept as a reason.

Precedence (the order of `RULES`), and why:

1. Deny lists (sender address, sender domain, client IP/CIDR) -> spam, quarantine. An administrator's
   explicit "never" beats everything, including an allow entry for the same sender.
2. BEC impersonation: the From display name is a protected person (or a protected address) while the
   From domain is not protected, or the From domain imitates a protected domain -> bec, quarantine.
   This sits *before* the allow lists on purpose: an allowed or trusted name turning up from somewhere
   else is exactly what BEC looks like, and allow lists match only what the sender claims about itself,
   which costs an attacker nothing. One exception: a lookalike domain that is itself on the allow list
   (a real partner whose name is close to ours) is not one.
   Exact-domain spoof: the From domain is protected and fails DMARC while publishing p=quarantine or
   p=reject (milter/auth) -> bec, quarantine. No DMARC rule judges mail from our own clients
   (`internal_networks`, XFORWARD SOURCE=LOCAL): their mail is often signed only after the filter.
   BEC content rules, which need no configuration: bank or payroll details changing, or gift cards asked
   for with urgency, from free-mail or with replies going to another domain; a disguised sender (free-mail
   posing as an organisation, a display name showing another address) talking about money -> bec,
   quarantine. The corpora hold no real BEC, so these carry the documented patterns (fixtures/bec/) that
   the model cannot learn; they also sit before the allow lists: a vendor's hijacked mailbox is allowed.
3. BEC model ladder on P(bec) (reject / quarantine / tag).
4. Allow lists (sender address, sender domain, client IP/CIDR) -> ham, accept. They silence the spam
   model only: an allowed vendor whose account is taken over still meets the BEC rules above. A sender
   or domain entry is not applied when the From domain's own DMARC (p=quarantine / reject) disowns the
   message: the entry trusted a claim its owner denies.
5. Spam model ladder on P(spam) + P(bec), the probability that the message is *not ham*. Summing keeps a
   message the model splits between the two bad classes (say 0.5 / 0.45) from slipping through both
   ladders; its verdict is `spam` because the BEC ladder, which is tuned for BEC, did not fire.
6. DMARC failure under p=quarantine / p=reject -> spam, `dmarc_fail_action` (tag by default; none makes
   it a reason only). Last, so it never softens the model's answer; mailing-list copies are exempt.
7. Nothing fired -> ham, accept.

Thresholds come from the model's metadata (chosen at training time); `PolicyConfig.spam` / `.bec`, when
set, replace that class's thresholds as a whole (a `None` field there disables that action, as the config
documents). `reject` is never taken from the metadata: rejecting needs an explicit configuration.

Per recipient domain (`PolicyConfig.domains`): a `DomainRule` matches a recipient whose domain is the
rule's domain or a subdomain of it; its `spam` / `bec` thresholds replace the global ones for that
recipient and `action_override` replaces any action other than accept (so "tag" means "never quarantine
here"). An after-queue filter returns one answer per message, so a message to several recipients takes
the *strictest* answer over all of them (recipients without a rule use the global thresholds): one
recipient's relaxed rule must not let mail through to the others. Ties go to the first recipient.

On scanning errors the gateway applies `on_error`; nothing here raises for a message.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from milter.config import ClassThresholds, DomainRule, PolicyConfig
from milter.errors import ConfigError, ModelError
from milter.features import Protected
from milter.features.domains import lookalike_of
from milter.features.summary import Extracted, MessageSummary
from milter.types import Action, Decision, Envelope, Scores, Verdict

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: How many of the feature extractor's signals are appended to the reasons.
MAX_SIGNALS = 5

#: Strictness of each action, for choosing among recipients. TEMPFAIL is the gateway's, never ours.
SEVERITY: Mapping[Action, int] = {Action.ACCEPT: 0, Action.TAG: 1, Action.QUARANTINE: 2, Action.REJECT: 3}

_ADDR_IN_TEXT = re.compile(r"[\w.+-]+@([\w-]+(?:\.[\w-]+)+)", re.UNICODE)
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


def _networks(key: str, entries: Iterable[str], table: str = "policy.lists") -> tuple[IPNetwork, ...]:
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(f"{table}.{key}[{i}]", f"not an IP address or CIDR: {entry!r}") from exc
    return tuple(out)


def _lower(entries: Iterable[str]) -> tuple[str, ...]:
    return tuple(e.strip().lower().rstrip(".") for e in entries if e.strip())


# --- the rules, one small unit each ------------------------------------------------------------------


def deny_sender(ctx: Context) -> Hit | None:
    for sender in ctx.senders:
        if sender in ctx.lists.deny_senders:
            return Hit(f"sender {sender} is on the deny list", Verdict.SPAM, Action.QUARANTINE)
    return None


def deny_domain(ctx: Context) -> Hit | None:
    for sender in ctx.senders:
        domain = domain_of(sender)
        if (entry := in_domain(domain, ctx.lists.deny_domains)) is not None:
            reason = f"sender domain {domain} is on the deny list ({entry})"
            return Hit(reason, Verdict.SPAM, Action.QUARANTINE)
    return None


def deny_ip(ctx: Context) -> Hit | None:
    if (net := in_networks(ctx.client_ip, ctx.lists.deny_ips)) is not None:
        return Hit(f"client {ctx.client_ip} in deny list {net}", Verdict.SPAM, Action.QUARANTINE)
    return None


def impersonated_name(ctx: Context) -> Hit | None:
    display, domain = ctx.summary.from_display, ctx.summary.from_domain
    if not display or in_domain(domain, ctx.protected.domains) is not None:
        return None
    for name in ctx.protected.names:
        if contains_name(display, name):
            return Hit(
                f"From display name {display!r} is protected person {name} "
                f"but the From domain {domain or '(none)'} is not a protected domain",
                Verdict.BEC, Action.QUARANTINE,
            )
    return None


def impersonated_address(ctx: Context) -> Hit | None:
    """A display name that is itself an address at a protected domain ("ceo@example.com" <x@evil.test>)."""
    display, domain = ctx.summary.from_display, ctx.summary.from_domain
    if not display or in_domain(domain, ctx.protected.domains) is not None:
        return None
    for match in _ADDR_IN_TEXT.finditer(display):
        shown = match.group(1).lower()
        if in_domain(shown, ctx.protected.domains) is not None:
            return Hit(
                f"From display name shows {match.group(0)} at protected domain {shown} "
                f"but the From domain is {domain or '(none)'}",
                Verdict.BEC, Action.QUARANTINE,
            )
    return None


def lookalike_sender(ctx: Context) -> Hit | None:
    """The From domain imitates a protected domain (examp1e.com, exarnple.com, xn--xample-2of.com).

    A domain on the allow list is exempt: listing kernel.dk beside a protected kernel.org is the admin
    saying the two are different parties, and the lookalike is the only thing this rule knows."""
    domain = ctx.summary.from_org_domain
    if not domain or not ctx.protected.domains or in_domain(domain, ctx.lists.allow_domains) is not None:
        return None
    if (target := lookalike_of(domain, ctx.protected.domains)) is not None:
        return Hit(f"From domain {domain} imitates protected domain {target}", Verdict.BEC, Action.QUARANTINE)
    return None


def refuted_by_dmarc(ctx: Context) -> str | None:
    """Why the From domain's owner disowns this message, or None: DMARC failed and the domain publishes
    p=quarantine or p=reject. Under p=none (or with no record) a failure proves nothing: the owner has
    not said that all its mail is aligned, and much legitimate mail is not. Mail from our own clients
    is not judged: our users' mail passes the filter before (or without) being signed."""
    auth = ctx.summary.auth
    if auth is None or ctx.internal:
        return None
    dmarc = auth.dmarc
    if dmarc.result != "fail" or dmarc.policy not in ("quarantine", "reject"):
        return None
    return f"From domain {dmarc.from_domain} fails DMARC (p={dmarc.policy}; {auth.summary()})"


def spoofed_protected_domain(ctx: Context) -> Hit | None:
    """Mail claiming to come from one of our own domains that the domain's DMARC disowns: the exact-domain
    spoof ("From: Jane Smith <jane@example.com>" from an outside server) that no name or lookalike rule
    can see. Mailing-list copies are not exempt here: List-Id costs a spoofer nothing."""
    domain = ctx.summary.auth.dmarc.from_domain if ctx.summary.auth is not None else None
    if in_domain(domain, ctx.protected.domains) is None:
        return None
    if (why := refuted_by_dmarc(ctx)) is None:
        return None
    return Hit(f"protected domain spoofed: {why}", Verdict.BEC, Action.QUARANTINE)


# The BEC content rules below pair pretext language with a sender that hides where it is or where
# replies go. Each half alone is common in real mail (Enron ham talks about payroll and bank accounts,
# list mail has Reply-To elsewhere); together they flagged none of the corpora's 28,943 ham messages
# (`milter scan --json` over every ham folder, 2026-11-28). The language groups are the model's own
# lang_* features, read back from the vector (milter/features/__init__.py): one definition of each.


def _elsewhere(summary: MessageSummary) -> str | None:
    """How the sender hides where answers go, for a reason; None when it does not."""
    if summary.replies_elsewhere:
        return f"Reply-To goes to {summary.reply_to_domain}, not {summary.from_org_domain or '(no From)'}"
    if summary.freemail_sender:
        return f"sent from free-mail ({summary.from_org_domain})"
    return None


def bank_details_change(ctx: Context) -> Hit | None:
    """Vendor or payroll diversion: "our bank details have changed", answered somewhere else."""
    lang = ctx.summary.language
    if "bank_change" not in lang or not lang & {"payment", "urgency"}:
        return None
    if (how := _elsewhere(ctx.summary)) is None:
        return None
    return Hit(f"asks to change bank or payroll details; {how}", Verdict.BEC, Action.QUARANTINE)


def gift_card_request(ctx: Context) -> Hit | None:
    """CEO gift-card fraud: "are you available? buy gift cards, send me the codes"."""
    lang = ctx.summary.language
    if "giftcard" not in lang or not lang & {"availability", "urgency", "secrecy"}:
        return None
    if (how := _elsewhere(ctx.summary)) is None:
        return None
    return Hit(f"asks for gift cards with urgency or secrecy; {how}", Verdict.BEC, Action.QUARANTINE)


def disguised_sender_money(ctx: Context) -> Hit | None:
    """A free-mail sender posing as an organisation or officer, or a display name showing another
    address, that talks about payments, bank details or gift cards."""
    if not ctx.summary.disguised_sender or not ctx.summary.language & {"payment", "bank_change", "giftcard"}:
        return None
    display = ctx.summary.from_display or ""
    return Hit(
        f"display name {display!r} disguises the sender {ctx.summary.from_addr or '(none)'} "
        "and the message is about money",
        Verdict.BEC, Action.QUARANTINE,
    )


def _ladder_hit(ladder: Ladder, score: float, verdict: Verdict) -> Hit | None:
    step = ladder.step(score)
    if step is None:
        return None
    action, threshold = step
    reason = f"{ladder.name} score {score:.2f} >= {action.value} threshold {threshold:.2f}"
    return Hit(reason, verdict, action)


def bec_score(ctx: Context) -> Hit | None:
    return _ladder_hit(ctx.rules.bec, ctx.scores.bec, Verdict.BEC)


def _unproven(ctx: Context, listed: str) -> Hit | None:
    """A note instead of an accept when DMARC disowns the claimed sender: an allow entry trusts what
    the sender says about itself, and here its own domain says it is not so."""
    if (why := refuted_by_dmarc(ctx)) is None:
        return None
    return Hit(f"allow list entry {listed} not applied: {why}")


def allow_sender(ctx: Context) -> Hit | None:
    for sender in ctx.senders:
        if sender in ctx.lists.allow_senders:
            return _unproven(ctx, sender) or Hit(
                f"sender {sender} is on the allow list", Verdict.HAM, Action.ACCEPT
            )
    return None


def allow_domain(ctx: Context) -> Hit | None:
    for sender in ctx.senders:
        domain = domain_of(sender)
        if (entry := in_domain(domain, ctx.lists.allow_domains)) is not None:
            return _unproven(ctx, entry) or Hit(
                f"sender domain {domain} is on the allow list ({entry})", Verdict.HAM, Action.ACCEPT
            )
    return None


def allow_ip(ctx: Context) -> Hit | None:
    if (net := in_networks(ctx.client_ip, ctx.lists.allow_ips)) is not None:
        return Hit(f"client {ctx.client_ip} in allow list {net}", Verdict.HAM, Action.ACCEPT)
    return None


def spam_score(ctx: Context) -> Hit | None:
    # P(spam) + P(bec): "not ham" (see the module docstring).
    return _ladder_hit(ctx.rules.spam, ctx.scores.spam + ctx.scores.bec, Verdict.SPAM)


def dmarc_fail(ctx: Context) -> Hit | None:
    """The domain owner disowns the message (p=quarantine / p=reject). Last, so the model's stricter
    answer stands; a mailing list's copy is exempt, since lists that keep From break its signature."""
    if ctx.summary.list_mail or (why := refuted_by_dmarc(ctx)) is None:
        return None
    if ctx.dmarc_fail_action is None:
        return Hit(why)
    return Hit(why, Verdict.SPAM, ctx.dmarc_fail_action)


#: The policy, in order. The first hit with an action decides; all hits become reasons.
RULES: tuple[Rule, ...] = (
    deny_sender,
    deny_domain,
    deny_ip,
    impersonated_name,
    impersonated_address,
    lookalike_sender,
    spoofed_protected_domain,
    bank_details_change,
    gift_card_request,
    disguised_sender_money,
    bec_score,
    allow_sender,
    allow_domain,
    allow_ip,
    spam_score,
    dmarc_fail,
)


def evaluate(ctx: Context, rules: Iterable[Rule] = RULES) -> Decision:
    """Run the table once for one recipient's rule set."""
    hits = [hit for rule in rules if (hit := rule(ctx)) is not None]
    decider = next((h for h in hits if h.action is not None), None)
    if decider is None:
        return Decision(Verdict.HAM, Action.ACCEPT, tuple(h.reason for h in hits))
    assert decider.verdict is not None and decider.action is not None
    action = decider.action
    reasons = [decider.reason, *(h.reason for h in hits if h is not decider)]
    override = ctx.rules.action_override
    if override is not None and action is not Action.ACCEPT and override is not action:
        reasons.insert(1, f"recipient domain {ctx.rules.domain} rule: {action.value} -> {override.value}")
        action = override
    return Decision(decider.verdict, action, tuple(reasons))


# --- the public object -------------------------------------------------------------------------------


def _metadata_thresholds(name: str, raw: Mapping[str, float] | None) -> ClassThresholds:
    """A class's thresholds from model metadata; `reject` is ignored (it must be configured)."""
    if raw is None:
        return ClassThresholds()
    values: dict[str, float] = {}
    for key in ("tag", "quarantine"):
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ModelError(f"model metadata threshold {name}.{key} must be within [0, 1], got {value!r}")
        values[key] = float(value)
    return ClassThresholds(**values)


_DMARC_FAIL_ACTIONS: Mapping[str, Action | None] = {
    "none": None, "tag": Action.TAG, "quarantine": Action.QUARANTINE,
}


class Policy:
    """Thresholds, per-domain rules and allow / deny lists, built once from the configuration."""

    def __init__(self, config: PolicyConfig, model_thresholds: Mapping[str, Mapping[str, float]]) -> None:
        self.config = config
        self.dmarc_fail_action = _DMARC_FAIL_ACTIONS.get(config.dmarc_fail_action)
        if config.dmarc_fail_action not in _DMARC_FAIL_ACTIONS:
            raise ConfigError("policy.dmarc_fail_action", f"unknown action {config.dmarc_fail_action!r}")
        spam = config.spam or _metadata_thresholds("spam", model_thresholds.get("spam"))
        bec = config.bec or _metadata_thresholds("bec", model_thresholds.get("bec"))
        self.default_rules = RuleSet(spam=Ladder.build("spam", spam), bec=Ladder.build("bec", bec))
        self.domain_rules = tuple(self._domain_rules(r, spam, bec) for r in config.domains)
        raw = config.lists
        self.lists = Lists(
            allow_senders=frozenset(_lower(raw.allow_senders)),
            allow_domains=_lower(raw.allow_domains),
            allow_ips=_networks("allow_ips", raw.allow_ips),
            deny_senders=frozenset(_lower(raw.deny_senders)),
            deny_domains=_lower(raw.deny_domains),
            deny_ips=_networks("deny_ips", raw.deny_ips),
        )
        self.internal_networks = _networks("internal_networks", config.internal_networks, "policy")
        self._protected = Protected(
            domains=_lower(config.protected_domains),
            names=tuple(n.strip() for n in config.protected_names if n.strip()),
        )

    @staticmethod
    def _domain_rules(rule: DomainRule, spam: ClassThresholds, bec: ClassThresholds) -> RuleSet:
        try:
            override = Action(rule.action_override) if rule.action_override is not None else None
        except ValueError as exc:
            raise ConfigError(f"policy.domain[{rule.domain}].action_override",
                              f"unknown action {rule.action_override!r}") from exc
        return RuleSet(
            spam=Ladder.build("spam", rule.spam or spam),
            bec=Ladder.build("bec", rule.bec or bec),
            action_override=override,
            domain=rule.domain.lower(),
        )

    @property
    def protected(self) -> Protected:
        """The protected domains and names, for feature extraction (impersonation signals)."""
        return self._protected

    def rules_for(self, recipient: str) -> RuleSet:
        """The first DomainRule matching the recipient's domain (or a parent domain), else the global set."""
        domain = domain_of(recipient)
        for rules in self.domain_rules:
            if rules.domain is not None and in_domain(domain, (rules.domain,)) is not None:
                return rules
        return self.default_rules

    def decide(self, scores: Scores, extracted: Extracted, envelope: Envelope) -> Decision:
        summary = extracted.summary
        senders = tuple(dict.fromkeys(
            s for s in (_clean_address(envelope.mail_from), _clean_address(summary.from_addr)) if s
        ))
        client_ip = parse_client(envelope.client_addr)
        internal = (envelope.source or "").upper() == "LOCAL" or (
            in_networks(client_ip, self.internal_networks) is not None
        )
        base = Context(
            scores=scores, summary=summary, senders=senders, client_ip=client_ip,
            lists=self.lists, protected=self._protected, rules=self.default_rules,
            dmarc_fail_action=self.dmarc_fail_action, internal=internal,
        )
        # One evaluation per distinct rule set among the recipients, strictest wins (module docstring).
        per_rcpt = (self.rules_for(r) for r in envelope.rcpt_tos)
        rule_sets = tuple(dict.fromkeys(per_rcpt)) or (self.default_rules,)
        decisions = [evaluate(replace(base, rules=rules)) for rules in rule_sets]
        decision = max(decisions, key=lambda d: SEVERITY[d.action])  # max keeps the first on ties
        # a signal that a rule's reason already quotes ("asks for gift cards ...; sent from ...") adds nothing
        signals = tuple(
            s for s in extracted.signals[:MAX_SIGNALS] if not any(s in reason for reason in decision.reasons)
        )
        prefix = self.config.subject_prefix if decision.action is Action.TAG else None
        return Decision(decision.verdict, decision.action, decision.reasons + signals, prefix)


def _clean_address(address: str | None) -> str | None:
    """Lower-case addr-spec without angle brackets; the null sender <> is no address."""
    if not address:
        return None
    text = address.strip().strip("<>").strip().lower()
    return text if "@" in text else None
