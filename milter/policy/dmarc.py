"""Rules on the sender's authentication (milter/auth): they act only where the From domain's owner
disowns the message (DMARC fails under p=quarantine or p=reject), and never for our own clients."""

from __future__ import annotations

from milter.policy.table import Context, Hit, in_domain
from milter.types import Action, Verdict


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


def unproven(ctx: Context, listed: str) -> Hit | None:
    """A note instead of an accept when DMARC disowns the claimed sender: an allow entry trusts what
    the sender says about itself, and here its own domain says it is not so."""
    if (why := refuted_by_dmarc(ctx)) is None:
        return None
    return Hit(f"allow list entry {listed} not applied: {why}")


def dmarc_fail(ctx: Context) -> Hit | None:
    """The domain owner disowns the message (p=quarantine / p=reject). Last, so the model's stricter
    answer stands; a mailing list's copy is exempt, since lists that keep From break its signature."""
    if ctx.summary.list_mail or (why := refuted_by_dmarc(ctx)) is None:
        return None
    if ctx.dmarc_fail_action is None:
        return Hit(why)
    return Hit(why, Verdict.SPAM, ctx.dmarc_fail_action)
