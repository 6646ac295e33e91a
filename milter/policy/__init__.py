"""The policy: model scores + lists + protected identities -> one `Decision`, as a readable table.

The table (`RULES`) and the `Policy` object live here; the rules themselves in `rules.py` (lists,
impersonation, the model's ladders), `bec.py` (BEC content patterns), `dmarc.py` (sender
authentication), `learned.py` (senders the admins vouched for) and `bulk.py` (legitimate bulk mail),
and what they read and say in `table.py`.

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
   p=reject (milter/auth) -> bec, quarantine. A From with several addresses, one at a protected domain
   (DMARC cannot judge a From that names two mailboxes) -> bec, quarantine. The name and address
   impersonation rules read every From address, not only the first. No DMARC rule judges mail from our
   own clients (`internal_networks`, XFORWARD SOURCE=LOCAL): their mail is often signed only after the
   filter.
   BEC content rules, which need no configuration: bank or payroll details changing, or gift cards asked
   for with urgency, from free-mail or with replies going to another domain; a disguised sender (free-mail
   posing as an organisation, a display name showing another address) talking about money -> bec,
   quarantine, unless the admins have vouched for that sender (allow_senders, or learned-sender labels)
   and the message authenticates (`bec.vouched_for`). The corpora hold no real BEC, so these carry the
   documented patterns (fixtures/bec/) that the model cannot learn; they also sit before the allow lists:
   a vendor's hijacked mailbox is allowed.
3. Learned senders (`learned.py`): a From domain that passes DMARC and that the admins' labels vouch for
   (`policy.learned_sender_labels` ham, no spam or bec) -> tag where the model's ladders below would
   quarantine or reject. After the rules above, so a vouched-for sender's hijacked mailbox asking for new
   bank details is still quarantined.
   BEC model ladder on P(bec) (reject / quarantine / tag); where the not-ham score reaches a stricter
   step of the spam ladder (6.), that step: the thresholds were chosen for each level on its own
   (`training.thresholds.decide`), so the BEC ladder's tag must not let off what the spam ladder would
   hold. Verdict bec (spam where P(spam) is the larger, possible only with a BEC cut under 0.5; then an
   allow entry keeps the BEC ladder's own step, as it silences the spam model).
4. Allow lists (sender address, sender domain, client IP/CIDR) -> ham, accept. They silence the spam
   model only: an allowed vendor whose account is taken over still meets the BEC rules above. A sender
   or domain entry is not applied when the From domain's own DMARC (p=quarantine / reject) disowns the
   message: the entry trusted a claim its owner denies.
   DNS blocklists (`reputation.py`, [reputation] zones): a listed client address, sender domain or
   link domain -> the zone's verdict and action, or the spam ladder's when that is stricter. After the
   allow lists, so an admin can vouch for a sender a list names by mistake; a lookup that failed or that
   the list refused is no evidence.
   Abused TLDs (`abused_tld.py`): a From domain on an often-abused TLD (.shop, .xyz, ...) whose message
   the model scores at least `policy.abused_tld_tag` as not-ham -> spam, tag (the ladder's action when
   stricter). Before the bulk rule, so such a sender's unsubscribe header does not make it bulk.
   Unsigned HTML (`unsigned.py`): HTML mail with no DKIM signature, no unsubscribe offer, no Feedback-ID
   and no Precedence: bulk, which the model scores at least `policy.unsigned_html_tag` as not-ham -> spam,
   tag (the ladder's action when stricter). Not for internal clients, our own domains, list copies or
   bounces. Odd digests (same module): a multipart/digest whose parts are not messages, scored at least
   `policy.odd_digest_tag` -> spam, tag (the ladder's when stricter). HTML that is images with almost
   no text (same module), scored at least `policy.image_only_tag` -> spam, tag (the ladder's when
   stricter); judged as the From rules are.
   Headers that promise what the message does not keep (`form.py`): a From that names no mailbox
   (`policy.no_mailbox_tag`; bounces exempt), a From with several addresses, which DMARC cannot judge
   (`policy.several_from_tag`, any score by default) and, after the From rules below, a "Re:" subject over a
   message with no In-Reply-To and no References (`policy.fake_reply_tag`) -> spam, tag from those
   not-ham scores (the ladder's when stricter); judged as the From rules are. The same for a To header
   that tries one mailbox name at three or more organisations (`recipients.py`,
   `policy.harvested_recipients_tag`).
   How From names the sender (`mailbox.py`): a brand's name as the mailbox of a domain that carries none
   of it (`policy.name_mailbox_tag`), a person's name over a gibberish mailbox
   (`policy.gibberish_mailbox_tag`), a mailbox a tool padded with a run of separators
   (`policy.padded_mailbox_tag`), a brand in the display name that the From domain is not
   (`policy.brand_display_tag`; `policy.brand_alone_tag` where the address has no other word of the
   name), a person's name over a mailbox with none of it
   (`policy.unrelated_mailbox_tag`) -> spam, tag from those not-ham scores (the ladder's when stricter). Not
   for internal clients, our own domains, list copies or bounces; before the bulk rule, so such a
   sender's unsubscribe header does not make it bulk.
5. Bulk senders (`bulk.py`): an unsubscribe offer plus Feedback-ID, Precedence: bulk or an aligned DKIM
   signature (`MessageSummary.bulk_evidence`) -> bulk, `policy.bulk.action` (accept by default), where
   the model would accept the message (both ladders silent): a category, never a softened tag. After the
   allow lists, so an allowed sender stays ham. Never for a mailing list's copy or a message its From
   domain's DMARC disowns; it never meets the learned-senders rule, which acts only where the model
   would quarantine.
6. Spam model ladder on P(spam) + P(bec), the probability that the message is *not ham*. Summing keeps a
   message the model splits between the two bad classes (say 0.5 / 0.45) from slipping through both
   ladders; its verdict is `spam` because the BEC ladder, which is tuned for BEC, did not fire.
7. The correspondence history (`history.py`, issue 17): a familiar display name from a new address, a
   known correspondent from a lookalike or free-mail address, a never-seen Reply-To, first contact (with
   money talk) -> a reason, or bec and tag, per `[policy.history]`; never more than tag (each fires on
   over 0.1 % of real ham). After every rule that could quarantine, so a tag never pre-empts one; after
   the allow and bulk rules, so those senders are accepted with the reasons attached.
8. DMARC failure under p=quarantine / p=reject -> spam, `dmarc_fail_action` (tag by default; none makes
   it a reason only). Last, so it never softens the model's answer; mailing-list copies are exempt.
   With `quarantine` it is a floor (`Hit.floor`): where an earlier rule only tags, the message is held
   all the same (`_raised`); an accept (an allow entry that applied) and a stricter answer stand.
   A failure that a trusted ARC sealer's validated chain explains (forwarding; `dmarc.py`) is only a
   reason, here and for every rule above that asks whether DMARC disowns the message.
9. Nothing fired -> ham, accept.

Thresholds come from the model's metadata (chosen at training time); `PolicyConfig.spam` / `.bec`, when
set, replace that class's thresholds as a whole (a `None` field there disables that action, as the config
documents). `reject` is never taken from the metadata: rejecting needs an explicit configuration.

Per recipient domain (`PolicyConfig.domains`): a `DomainRule` matches a recipient whose domain is the
rule's domain or a subdomain of it (the most specific rule that matches applies, whatever the
order); its `spam` / `bec` thresholds replace the global ones for that recipient, its `bulk_action`
replaces `policy.bulk.action`, and `action_override` replaces any action other than accept (so "tag"
means "never quarantine here", bulk mail included). An after-queue filter returns one answer per
message, so a message to several recipients takes the *strictest* answer over all of them (recipients
without a rule use the global thresholds): one recipient's relaxed rule must not let mail through to
the others. Ties go to the first recipient.

On scanning errors the gateway applies `on_error`; nothing here raises for a message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from milter.config import BULK_ACTIONS, HISTORY_SIGNALS, ClassThresholds, DomainRule, PolicyConfig
from milter.errors import ConfigError, ModelError
from milter.features import Protected
from milter.features.summary import Extracted, MessageSummary
from milter.history import machine_mail
from milter.names import compared
from milter.policy.abused_tld import abused_tld_sender, abused_tlds
from milter.policy.bec import bank_details_change, disguised_sender_money, gift_card_request
from milter.policy.bulk import bulk_sender
from milter.policy.dmarc import dmarc_fail, refuted_by_dmarc, several_from_protected, spoofed_protected_domain
from milter.policy.form import fake_reply, no_mailbox, several_from
from milter.policy.history import (
    history_correspondent_elsewhere,
    history_display_name_new_address,
    history_first_contact_money,
    history_first_contact_org,
    history_first_contact_recipient,
    history_reply_to_unseen,
)
from milter.policy.learned import learned_sender
from milter.policy.mailbox import (
    brand_display_name,
    brands,
    gibberish_mailbox,
    name_as_mailbox,
    padded_mailbox,
    unrelated_mailbox,
)
from milter.policy.recipients import harvested_recipients
from milter.policy.reputation import blocklisted
from milter.policy.rules import (
    allow_domain,
    allow_ip,
    allow_sender,
    bec_score,
    deny_domain,
    deny_ip,
    deny_sender,
    impersonated_address,
    impersonated_name,
    lookalike_sender,
    spam_score,
)
from milter.policy.table import (
    MAX_SIGNALS,
    SEVERITY,
    Context,
    Hit,
    Ladder,
    LearnedSenders,
    Lists,
    LowerCuts,
    Rule,
    RuleSet,
    contains_name,
    domain_of,
    in_domain,
    is_internal,
    normalised,
    parse_client,
    parse_networks,
)
from milter.policy.unsigned import image_only_html, odd_digest, unsigned_html
from milter.types import Action, Decision, Envelope, Scores, Verdict

if TYPE_CHECKING:
    from milter.history import HistoryLookup

__all__ = ["RULES", "Ladder", "Policy", "contains_name", "evaluate", "parse_client"]


#: The policy, in order. The first hit with an action decides; all hits become reasons.
RULES: tuple[Rule, ...] = (
    deny_sender,
    deny_domain,
    deny_ip,
    impersonated_name,
    impersonated_address,
    lookalike_sender,
    spoofed_protected_domain,
    several_from_protected,
    bank_details_change,
    gift_card_request,
    disguised_sender_money,
    learned_sender,
    bec_score,
    allow_sender,
    allow_domain,
    allow_ip,
    blocklisted,
    abused_tld_sender,
    unsigned_html,
    odd_digest,
    image_only_html,
    no_mailbox,
    several_from,
    harvested_recipients,
    name_as_mailbox,
    gibberish_mailbox,
    padded_mailbox,
    brand_display_name,
    unrelated_mailbox,  # after the brand rule: "Norton Security <jokes@...>" is a borrowed brand first
    fake_reply,
    bulk_sender,
    spam_score,
    history_display_name_new_address,
    history_correspondent_elsewhere,
    history_reply_to_unseen,
    history_first_contact_money,
    history_first_contact_recipient,
    history_first_contact_org,
    dmarc_fail,
)


def evaluate(ctx: Context, rules: Iterable[Rule] = RULES) -> Decision:
    """Run the table once for one recipient's rule set."""
    hits = [hit for rule in rules if (hit := rule(ctx)) is not None]
    decider = next((h for h in hits if h.action is not None), None)
    if decider is None:
        notes = tuple(h.reason for h in hits)
        return Decision(Verdict.HAM, Action.ACCEPT, notes, teaches=_teaches(ctx, hits, Action.ACCEPT))
    decider = _raised(decider, hits)
    assert decider.verdict is not None and decider.action is not None
    action = decider.action
    reasons = [decider.reason, *(h.reason for h in hits if h is not decider)]
    override = ctx.rules.action_override
    if override is not None and action is not Action.ACCEPT and override is not action:
        reasons.insert(1, f"recipient domain {ctx.rules.domain} rule: {action.value} -> {override.value}")
        action = override
    return Decision(decider.verdict, action, tuple(reasons), teaches=_teaches(ctx, hits, action))


def _raised(decider: Hit, hits: list[Hit]) -> Hit:
    """The decider, or the first later `Hit.floor` that is stricter where the decider only tags: a tag for
    one suspicion (a lower cut, the model's tag threshold, a history signal) must not let a message out of
    the quarantine the admin configured for another (`dmarc_fail_action = "quarantine"`). An accept (an
    allow entry that applied) and anything stricter than a tag stay as they are."""
    if decider.action is not Action.TAG:
        return decider
    tag = SEVERITY[Action.TAG]
    stricter = (h for h in hits if h.floor and h.action is not None and SEVERITY[h.action] > tag)
    return next(stricter, decider)


def _teaches(ctx: Context, hits: list[Hit], action: Action) -> bool:
    """Whether the correspondence history may learn from the message once delivered: wanted mail
    (ham, bulk), or mail tagged only for being new (`Hit.novel`: milter.policy.history says which).
    Never held mail, and never mail that any rule found bad, whether or not that rule decided: a history
    tag decides before the DMARC rule and after an allow entry, and neither may make an attacker a known
    correspondent by writing twice. Never mail whose From domain disowns it (DMARC fails under
    p=quarantine / reject, even where `dmarc_fail_action` is "none"): whoever sent it, the history would
    learn it as that domain's."""
    if action not in (Action.ACCEPT, Action.TAG) or refuted_by_dmarc(ctx) is not None:
        return False
    return all(h.verdict in (None, Verdict.HAM, Verdict.BULK) or h.novel for h in hits)


def _automatic(summary: MessageSummary, envelope: Envelope) -> bool:
    """Mail no person wrote (an out-of-office reply, a bounce, a newsletter): from our users it is no
    sign that they correspond with its recipients. An attacker who writes once from a lookalike domain
    gets an auto-reply back, or subscribes that address to our newsletter; counted as our users writing
    there, it would switch the lookalike check off for that domain."""
    sender = (summary.from_addr or "").lower()
    return machine_mail(sender, summary.auto_report, envelope.mail_from) or bool(summary.bulk_evidence)


# --- the public object -------------------------------------------------------------------------------


def metadata_ladders(raw: Mapping[str, Any] | None) -> tuple[ClassThresholds, ClassThresholds]:
    """(spam, bec) thresholds from a model's metadata (its "thresholds"), checked as a gateway needs
    them; ModelError otherwise. `milter model promote` and the fleet's adoption call it too, so that a
    model every gateway would refuse is never made current."""
    raw = raw if isinstance(raw, Mapping) else {}
    return _metadata_thresholds("spam", raw.get("spam")), _metadata_thresholds("bec", raw.get("bec"))


def _metadata_thresholds(name: str, raw: Mapping[str, float] | None) -> ClassThresholds:
    """A class's thresholds from model metadata; `reject` is ignored (it must be configured). A cut
    above 1 is one no probability reaches: that step is off (training writes 2.0,
    `training.thresholds.DISABLED`, for a class it had no examples of)."""
    if raw is None:
        return ClassThresholds()
    values: dict[str, float] = {}
    for key in ("tag", "quarantine"):
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < math.inf:
            raise ModelError(f"model metadata threshold {name}.{key} must be within [0, 1] (above 1: "
                             f"off), got {value!r}")
        if value <= 1.0:
            values[key] = float(value)
    cuts = ClassThresholds(**values)
    if cuts.tag is not None and cuts.quarantine is not None and cuts.quarantine < cuts.tag:
        raise ModelError(f"model metadata threshold {name}.quarantine ({cuts.quarantine:g}) is under "
                         f"{name}.tag ({cuts.tag:g}): the tag step could never apply")
    return cuts


_DMARC_FAIL_ACTIONS: Mapping[str, Action | None] = {
    "none": None, "tag": Action.TAG, "quarantine": Action.QUARANTINE,
}


def _bulk_action(key: str, value: str) -> Action:
    """A bulk action from the configuration (checked again here: a PolicyConfig may be built in code)."""
    if value not in BULK_ACTIONS:
        raise ConfigError(key, f"must be 'accept', 'tag' or 'quarantine', got {value!r}")
    return Action(value)


class Policy:
    """Thresholds, per-domain rules and allow / deny lists, built once from the configuration."""

    def __init__(
        self,
        config: PolicyConfig,
        model_thresholds: Mapping[str, Mapping[str, float]],
        sender_labels: Iterable[tuple[str | None, str, int]] = (),
    ) -> None:
        """`sender_labels`: (From address, label, count) rows from `Store.sender_labels` (none: no
        sender has been vouched for, as in `milter scan`, which has no store)."""
        self.config = config
        self.learned = LearnedSenders.from_labels(sender_labels, config.learned_sender_labels)
        self.dmarc_fail_action = _DMARC_FAIL_ACTIONS.get(config.dmarc_fail_action)
        if config.dmarc_fail_action not in _DMARC_FAIL_ACTIONS:
            raise ConfigError("policy.dmarc_fail_action", f"unknown action {config.dmarc_fail_action!r}")
        spam = config.spam or _metadata_thresholds("spam", model_thresholds.get("spam"))
        bec = config.bec or _metadata_thresholds("bec", model_thresholds.get("bec"))
        bulk = _bulk_action("policy.bulk.action", config.bulk.action) if config.bulk.enabled else None
        self.default_rules = RuleSet(
            spam=Ladder.build("spam", spam), bec=Ladder.build("bec", bec), bulk_action=bulk,
            cuts=LowerCuts(
                abused_tld=config.abused_tld_tag,
                abused_tlds=abused_tlds(config.abused_tlds),
                unsigned_html=config.unsigned_html_tag,
                odd_digest=config.odd_digest_tag,
                image_only=config.image_only_tag,
                name_mailbox=config.name_mailbox_tag,
                gibberish_mailbox=config.gibberish_mailbox_tag,
                padded_mailbox=config.padded_mailbox_tag,
                unrelated_mailbox=config.unrelated_mailbox_tag,
                brand_display=config.brand_display_tag,
                brand_alone=config.brand_alone_tag,
                brands=brands(config.brands),
                fake_reply=config.fake_reply_tag,
                no_mailbox=config.no_mailbox_tag,
                several_from=config.several_from_tag,
                harvested_recipients=config.harvested_recipients_tag,
            ),
        )
        cuts = self.default_rules.cuts
        built = [replace(self._domain_rules(r, spam, bec, bulk), cuts=cuts) for r in config.domains]
        # the most specific domain first, whatever the file's order: finance.corp.test's own rule must
        # not be shadowed by a corp.test rule written above it (ties keep the file's order)
        self.domain_rules = tuple(sorted(built, key=lambda r: -(r.domain or "").count(".")))
        raw = config.lists
        self.lists = Lists(
            allow_senders=frozenset(normalised(raw.allow_senders)),
            allow_domains=normalised(raw.allow_domains),
            allow_ips=parse_networks("allow_ips", raw.allow_ips),
            deny_senders=frozenset(normalised(raw.deny_senders)),
            deny_domains=normalised(raw.deny_domains),
            deny_ips=parse_networks("deny_ips", raw.deny_ips),
        )
        hist = config.history
        # signal -> "note" / "tag"; none at all when the history is off (the rules then never run)
        self.history_modes: Mapping[str, str] = MappingProxyType(
            {name: hist.action(name) for name in HISTORY_SIGNALS} if hist.enabled else {}
        )
        self.internal_networks = parse_networks("internal_networks", config.internal_networks, "policy")
        self._protected = Protected(
            domains=normalised(config.protected_domains),
            names=tuple(n.strip() for n in config.protected_names if n.strip()),
        )

    @staticmethod
    def _domain_rules(
        rule: DomainRule, spam: ClassThresholds, bec: ClassThresholds, bulk: Action | None
    ) -> RuleSet:
        try:
            override = Action(rule.action_override) if rule.action_override is not None else None
        except ValueError as exc:
            raise ConfigError(f"policy.domain[{rule.domain}].action_override",
                              f"unknown action {rule.action_override!r}") from exc
        if bulk is not None and rule.bulk_action is not None:  # policy.bulk.enabled = false: off everywhere
            bulk = _bulk_action(f"policy.domain[{rule.domain}].bulk_action", rule.bulk_action)
        return RuleSet(
            spam=Ladder.build("spam", rule.spam or spam),
            bec=Ladder.build("bec", rule.bec or bec),
            action_override=override,
            domain=compared(rule.domain),
            bulk_action=bulk,
        )

    @property
    def protected(self) -> Protected:
        """The protected domains and names, for feature extraction (impersonation signals)."""
        return self._protected

    def rules_for(self, recipient: str) -> RuleSet:
        """The most specific DomainRule matching the recipient's domain (or a parent domain), else the
        global set."""
        domain = domain_of(recipient)  # as the rules are written: A-labels, no root dot
        for rules in self.domain_rules:
            if rules.domain is not None and in_domain(domain, (rules.domain,)) is not None:
                return rules
        return self.default_rules

    def decide(
        self, scores: Scores, extracted: Extracted, envelope: Envelope, history: HistoryLookup | None = None
    ) -> Decision:
        """`history`: what the site's correspondence history knew before this message (the gateway's;
        None where there is none or it is unknown: the history rules are then silent)."""
        summary = extracted.summary
        senders = tuple(dict.fromkeys(
            s for s in (_clean_address(envelope.mail_from), _clean_address(summary.from_addr)) if s
        ))
        client_ip = parse_client(envelope.client_addr)
        internal = is_internal(envelope, self.internal_networks)
        base = Context(
            scores=scores, summary=summary, senders=senders, client_ip=client_ip,
            lists=self.lists, protected=self._protected, rules=self.default_rules,
            dmarc_fail_action=self.dmarc_fail_action, internal=internal, learned=self.learned,
            history=history, history_modes=self.history_modes,
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
        # our users' mail to their correspondents: from our clients, From one of our domains
        ours = in_domain(domain_of(summary.from_addr or "") or "", self._protected.domains) is not None
        outbound = internal and ours
        # our software's mail (auto-replies, bounces, newsletters) is outbound, but teaches nothing
        teaches = decision.teaches and not (outbound and _automatic(summary, envelope))
        return Decision(decision.verdict, decision.action, decision.reasons + signals, prefix,
                        teaches=teaches, outbound=outbound)


def _clean_address(address: str | None) -> str | None:
    """Lower-case addr-spec without angle brackets or the root's trailing dot (`bad@evil.test.` is the
    sender `bad@evil.test` denied); the null sender <> is no address."""
    if not address:
        return None
    text = compared(address.strip().strip("<>"))
    return text if "@" in text else None
