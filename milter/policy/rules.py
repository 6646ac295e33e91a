"""The rules of the lists, impersonation and the model's two ladders, one small unit each (the order
they run in is `milter.policy.RULES`)."""

from __future__ import annotations

from collections.abc import Iterator

from milter.features.domains import lookalike_of
from milter.history import shows_name
from milter.policy.dmarc import unproven
from milter.policy.table import (
    ADDR_IN_TEXT,
    Context,
    Hit,
    Ladder,
    domain_of,
    from_mailboxes,
    in_domain,
    in_networks,
    stricter_spam_step,
)
from milter.types import Action, Verdict


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
    """A protected person's name over a From address outside our domains; every From address counts
    (`from_mailboxes`: "x, Jane Smith <jane@evil.test>" shows Jane Smith second)."""
    for display, domain in _shown_from_outside(ctx):
        for name in ctx.protected.names:
            # as a reader sees them: "Jаne Doe" in Cyrillic letters, fullwidth or with a soft hyphen
            # inside is the protected name to the eye, and was let through
            if shows_name(display, name):
                return Hit(
                    f"From display name {display!r} is protected person {name} "
                    f"but the From domain {domain or '(none)'} is not a protected domain",
                    Verdict.BEC, Action.QUARANTINE,
                )
    return None


def impersonated_address(ctx: Context) -> Hit | None:
    """A display name that is itself an address at a protected domain ("ceo@example.com" <x@evil.test>),
    over any of the From addresses."""
    for display, domain in _shown_from_outside(ctx):
        for match in ADDR_IN_TEXT.finditer(display):
            shown = match.group(1).lower()
            if in_domain(shown, ctx.protected.domains) is not None:
                return Hit(
                    f"From display name shows {match.group(0)} at protected domain {shown} "
                    f"but the From domain is {domain or '(none)'}",
                    Verdict.BEC, Action.QUARANTINE,
                )
    return None


def _shown_from_outside(ctx: Context) -> Iterator[tuple[str, str | None]]:
    """(display name, domain) of each From address that shows a name and is not at a protected domain:
    what the two impersonation rules read."""
    for display, domain in from_mailboxes(ctx.summary):
        if display and in_domain(domain, ctx.protected.domains) is None:
            yield display, domain


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


def _ladder_hit(ladder: Ladder, score: float, verdict: Verdict) -> Hit | None:
    step = ladder.step(score)
    if step is None:
        return None
    action, threshold = step
    reason = f"{ladder.name} score {score:.2f} >= {action.value} threshold {threshold:.2f}"
    return Hit(reason, verdict, action)


def bec_score(ctx: Context) -> Hit | None:
    """The BEC ladder on P(bec); where the not-ham score reaches a stricter step of the spam ladder, that
    step. The thresholds were chosen for the model's decision at each level on its own
    (`training.thresholds.decide`: held when P(bec) or P(spam) + P(bec) reaches its quarantine cut), so
    a message the spam ladder would hold is not let off with a tag because it reached the BEC ladder's
    lower step first. The verdict is the larger bad class, as `decide` gives it: bec whenever the BEC
    cut is 0.5 or more. Where spam is the larger, the raised step is the spam model's, which the allow
    lists silence (4.): for an allowed sender the BEC ladder's own step stands."""
    hit = _ladder_hit(ctx.rules.bec, ctx.scores.bec, Verdict.BEC)
    if hit is None or hit.action is None:
        return hit
    not_ham = ctx.scores.spam + ctx.scores.bec
    if (step := stricter_spam_step(ctx, hit.action, not_ham)) is None:
        return hit
    bec_larger = ctx.scores.bec >= ctx.scores.spam
    if not bec_larger and _allowed(ctx):
        return hit
    action, threshold = step
    return Hit(
        f"{hit.reason}, and its not-ham score {not_ham:.2f} >= {ctx.rules.spam.name} {action.value} "
        f"threshold {threshold:.2f}",
        Verdict.BEC if bec_larger else Verdict.SPAM, action,
    )


def _allowed(ctx: Context) -> bool:
    """An allow entry (sender, domain, client) applies to this message: the allow rules would accept it."""
    return any(
        (h := rule(ctx)) is not None and h.action is Action.ACCEPT
        for rule in (allow_sender, allow_domain, allow_ip)
    )


def allow_sender(ctx: Context) -> Hit | None:
    for sender in ctx.senders:
        if sender in ctx.lists.allow_senders:
            return unproven(ctx, sender) or Hit(
                f"sender {sender} is on the allow list", Verdict.HAM, Action.ACCEPT
            )
    return None


def allow_domain(ctx: Context) -> Hit | None:
    for sender in ctx.senders:
        domain = domain_of(sender)
        if (entry := in_domain(domain, ctx.lists.allow_domains)) is not None:
            return unproven(ctx, entry) or Hit(
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
