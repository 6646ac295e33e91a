"""Legitimate bulk mail (newsletters, marketing, notifications) gets a verdict of its own, `bulk`, as
Gmail's Promotions tab sorts it. The model keeps its three classes; this rule derives `bulk` from what
the sender declares about itself (`MessageSummary.bulk_evidence`, milter.features.sender).

Since 2024 Gmail and Yahoo require bulk senders to offer unsubscribing (RFC 8058 one-click) and to sign
with DKIM aligned to the From domain, and Gmail asks for a Feedback-ID. One header alone proves little
(any script can add List-Unsubscribe), so the rule wants an unsubscribe offer *and* one more mark:
Feedback-ID, Precedence: bulk, or the aligned DKIM signature. A message carrying them is `bulk`, with
`policy.bulk.action` (accept by default; a `[[policy.domain]]` rule's `bulk_action` for its
recipients), when

* the model would accept it: the spam and BEC ladders both silent for the recipient. Measured on the
  sender-split test rows (docs/DETECTION.md), letting the tag band through as bulk too saved none of
  143 modern ham and let 1.5 points of cw-l spam and 9 of foff's spam out untagged: forgeable headers
  must not soften a score the model already finds suspicious;
* no earlier rule decided: deny lists, impersonation, the spoof rule, the BEC content rules and the
  allow lists come first in `RULES` (an allow-listed sender stays ham). Learned senders act only where
  the model would quarantine, where this rule never does;
* its display name names no brand the From domain is not (`mailbox.borrowed_brand`: "Norton
  Security <jokes@funnysnails.com>" with an unsubscribe header is a brand's name borrowed by a bulk
  sender, not a newsletter the recipient asked for; it stays ham and the spam ladder judges it);
* it is no mailing list's copy: a list's List-Unsubscribe is the list manager's, not the author's,
  and list traffic is conversation, not a newsletter;
* where the gateway verified the sender (`summary.auth`), the From domain's owner does not disown it:
  under DMARC p=quarantine or p=reject a failure leaves the message to the DMARC rule; any DMARC failure,
  or an aligned signature that did not verify, drops the DKIM mark (it was only claimed). Both follow the
  DMARC rule on ARC: a failure that a trusted sealer's validated chain forgives (milter.policy.dmarc) is
  no refutation, and the DKIM mark holds if that sealer recorded the signature's pass.

Without `summary.auth` (`milter scan` without --dns, `[auth] enabled = false`) the DKIM mark counts as
present, which is all feature extraction can see.
"""

from __future__ import annotations

from milter.features.domains import registrable
from milter.features.summary import MessageSummary
from milter.policy.dmarc import forwarded_pass, refuted_by_dmarc
from milter.policy.mailbox import borrowed_brand
from milter.policy.table import Context, Hit
from milter.types import Verdict

# The words milter.features.sender.bulk_evidence uses for each mark.
UNSUBSCRIBE = frozenset({"one-click unsubscribe (RFC 8058)", "List-Unsubscribe"})
DKIM_MARK = "DKIM signature of "


def bulk_sender(ctx: Context) -> Hit | None:
    """Verdict `bulk` for a self-declared bulk sender the model does not hold (see the module docstring)."""
    action = ctx.rules.bulk_action
    if action is None or ctx.summary.list_mail or not model_accepts(ctx):
        return None
    if borrowed_brand(ctx.summary, ctx.rules.cuts.brands) is not None:
        return None
    if refuted_by_dmarc(ctx) is not None:
        return None
    evidence = counted_evidence(ctx.summary)
    unsubscribe = [e for e in evidence if e in UNSUBSCRIBE]
    others = [e for e in evidence if e not in UNSUBSCRIBE]
    if not unsubscribe or not others:
        return None
    return Hit(f"bulk sender: {', '.join(evidence)}", Verdict.BULK, action)


def model_accepts(ctx: Context) -> bool:
    """The recipient's ladders would neither tag nor hold this message (BEC and spam both silent)."""
    return (
        ctx.rules.bec.step(ctx.scores.bec) is None
        and ctx.rules.spam.step(ctx.scores.spam + ctx.scores.bec) is None
    )


def counted_evidence(summary: MessageSummary) -> tuple[str, ...]:
    """The bulk marks that count: all of them, less a DKIM mark that authentication did not bear out."""
    return tuple(
        e
        for e in summary.bulk_evidence
        if not e.startswith(DKIM_MARK) or dkim_mark_holds(summary, e.removeprefix(DKIM_MARK))
    )


def dkim_mark_holds(summary: MessageSummary, domain: str) -> bool:
    """The aligned signature of `domain` verified and the From domain does not fail DMARC; True when
    nothing was verified (the mark then says only what the headers claim, as in training). Where DMARC
    failed after forwarding and a trusted ARC sealer vouches for the message (milter.policy.dmarc), the
    sealer's validated record of a DKIM pass for `domain` stands in for our own check."""
    auth = summary.auth
    if auth is None:
        return True
    wanted = registrable(domain)
    if not wanted:
        return False
    if auth.dmarc.result != "fail":
        return any(registrable(d) == wanted for d in auth.dkim_pass_domains)
    if auth.arc.result != "pass" or forwarded_pass(auth) is None:
        return False
    passed = (r.domain for r in auth.arc.recorded if r.method == "dkim" and r.result == "pass")
    return any(registrable(d) == wanted for d in passed)
