"""Rules on the sender's authentication (milter/auth): they act only where the From domain's owner
disowns the message (DMARC fails under p=quarantine or p=reject), and never for our own clients.

ARC (RFC 8617) is the one exception, RFC 7489 6.7's "local policy override" for forwarded mail: when
DMARC fails here but the message carries a validated ARC chain whose newest sealer the admin trusts
(`auth.trusted_arc_sealers`) and that sealer recorded dmarc=pass for the From domain (or, recording no
DMARC result, a DKIM pass aligned with it), the failure is the forwarding's doing, not a forgery: no
rule here acts on it, and the DMARC rule says why in a reason. A chain from an untrusted sealer, a
failed chain, or a sealer that recorded dmarc=fail changes nothing. A trusted chain that could not be
checked because a key lookup failed transiently is treated as DMARC temperror is: not acted on.

pct= (RFC 7489 6.6.4) governs what the DMARC rule does (`dmarc_fail`): failing mail outside the
record's sample, drawn at random, gets the next policy down (`enforced_policy`), so under p=quarantine;
pct=0 the rule only gives a reason, and under p=reject; pct=0 it still acts. As evidence that the owner
disowns the message (a spoof of a protected domain, an allow entry not applied, no bulk verdict), a
failure counts whatever pct says.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from milter.policy.table import Context, Hit, from_mailboxes, in_domain
from milter.types import Action, Verdict

if TYPE_CHECKING:  # only a type here: the policy's imports stay as they were
    from milter.auth import AuthResults, DmarcResult


def direct_failure(ctx: Context) -> str | None:
    """Why the From domain's owner disowns this message as it reached us, or None: DMARC failed and the
    domain publishes p=quarantine or p=reject. Under p=none (or with no record) a failure proves
    nothing: the owner has not said that all its mail is aligned, and much legitimate mail is not. Mail
    from our own clients is not judged: our users' mail passes the filter before (or without) being
    signed."""
    auth = ctx.summary.auth
    if auth is None or ctx.internal:
        return None
    dmarc = auth.dmarc
    if dmarc.result != "fail" or dmarc.policy not in ("quarantine", "reject"):
        return None
    return f"From domain {dmarc.from_domain} fails DMARC (p={dmarc.policy}; {auth.summary()})"


#: RFC 7489 6.6.4: failing mail outside the pct= sample gets the next policy down.
_STEP_DOWN = {"reject": "quarantine", "quarantine": "none"}


def enforced_policy(dmarc: DmarcResult, draw: float) -> str | None:
    """The policy the receiver enforces on a failing message: p= for the record's pct= share of
    failing mail, the next one down for the rest (pct=0, the usual "make mailing lists rewrite From"
    setting, asks that no failing message be quarantined). `draw` is uniform in [0, 100): random, not a
    hash of anything in the message, whose sender would then choose to fall outside the sample."""
    if dmarc.pct >= 100 or draw < dmarc.pct:
        return dmarc.policy
    return _STEP_DOWN.get(dmarc.policy or "", dmarc.policy)


def forwarded_pass(auth: AuthResults) -> str | None:
    """Why a DMARC failure is forgiven for forwarding (module docstring), or None."""
    arc = auth.arc
    if not arc.trusted or not (arc.result == "pass" or arc.transient):
        return None
    if (recorded := arc.vouches_for(auth.dmarc.from_domain)) is None:
        return None
    if arc.result == "pass":
        return f"DMARC failed after forwarding; trusted ARC sealer {arc.sealer} recorded {recorded}"
    return (f"DMARC failed after forwarding; trusted ARC sealer {arc.sealer} could not be verified "
            f"({arc.reason}): not acted on")


def refuted_by_dmarc(ctx: Context) -> str | None:
    """Why the From domain's owner disowns this message (`direct_failure`), or None, also when a trusted
    ARC sealer vouches for it (`forwarded_pass`): the rules that act on DMARC all ask this."""
    auth = ctx.summary.auth
    if auth is None or (why := direct_failure(ctx)) is None or forwarded_pass(auth) is not None:
        return None
    return why


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


def several_from_protected(ctx: Context) -> Hit | None:
    """A From with several addresses, one of them at a protected domain: the spoof that DMARC cannot
    see. DMARC judges the From domain, and a From that names two mailboxes has none (milter.auth gives
    "none": RFC 7489 6.6.1 leaves such mail to the receiver and says it SHOULD be rejected), so
    "From: jane@example.com, x@relay.test" from an outside server would dodge `spoofed_protected_domain`
    while the reader's mail client shows Jane of example.com. ("From: x, Jane Smith <jane@example.com>",
    where the bare word names no mailbox, is judged by DMARC on example.com; this rule holds it
    whatever DNS says.) Our own mail never writes such a From (an unquoted comma in a display name is how
    it happens by accident); our own clients are exempt."""
    summary = ctx.summary
    if ctx.internal or not summary.from_others:
        return None
    for _, domain in from_mailboxes(summary):
        if in_domain(domain, ctx.protected.domains) is not None:
            reason = (
                f"From gives {1 + len(summary.from_others)} addresses, one at protected domain {domain}: "
                "DMARC cannot judge such a From"
            )
            return Hit(reason, Verdict.BEC, Action.QUARANTINE)
    return None


def unproven(ctx: Context, listed: str) -> Hit | None:
    """A note instead of an accept when DMARC disowns the claimed sender: an allow entry trusts what
    the sender says about itself, and here its own domain says it is not so."""
    if (why := refuted_by_dmarc(ctx)) is None:
        return None
    return Hit(f"allow list entry {listed} not applied: {why}")


def dmarc_fail(ctx: Context) -> Hit | None:
    """The domain owner disowns the message (p=quarantine / p=reject). Last, so the model's stricter
    answer stands; a mailing list's copy is exempt, since lists that keep From break its signature."""
    auth = ctx.summary.auth
    if ctx.summary.list_mail or auth is None or (why := direct_failure(ctx)) is None:
        return None
    if (forgiven := forwarded_pass(auth)) is not None:
        return Hit(forgiven)  # a reason only: the record of why the failure was not acted on
    if ctx.dmarc_fail_action is None:
        return Hit(why)
    if enforced_policy(auth.dmarc, random.random() * 100) not in ("quarantine", "reject"):
        return Hit(f"{why}; outside its pct={auth.dmarc.pct} sample: not acted on")
    # a floor: with "quarantine" configured, an earlier rule's tag does not let the message out
    return Hit(why, Verdict.SPAM, ctx.dmarc_fail_action, floor=True)
