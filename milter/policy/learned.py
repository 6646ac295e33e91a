"""Senders the admins have vouched for: their labels, per authenticated From domain, cap the model at tag.

Measured with `python -m training.unseen` (docs/DETECTION.md): a newsletter source the model never saw
is mostly quarantined, and the nightly retrain learns from the admins' releases slowly. After 40
released messages of one such source, half of the next issues *from the very senders released* were
still quarantined. An admin who has released a sender's mail expects it delivered, so the labels act
here as well as in training. A From domain that

* passes DMARC on this message, or, when it publishes no DMARC record, carries a valid DKIM signature
  of its own (aligned: same registrable domain). Either way its owner vouches that the message is
  theirs, so a spoofer cannot reuse the reputation. And it
* has at least `policy.learned_sender_labels` messages labelled ham (or bulk: wanted too) in the
  store and none labelled spam or bec (one confirmed bad message ends it); for a free-mail provider
  this counts per address, not per domain, since DMARC pass for gmail.com vouches for Gmail, not for
  one of its users,

is tagged, not quarantined or rejected, when the model's score alone would have done so. The rule sits
after the deny lists, the impersonation and spoof rules and the BEC content rules, which keep their
say: a vouched-for vendor whose account asks for changed bank details is still quarantined. One of
them yields to the same labels: a disguised sender talking money (`bec.disguised_sender_money`) is
only a reason once its sender is vouched for and authenticates, since its invoices always look so.

The counts are read from the store when the gateway starts and on every reload (the nightly retrain
ends with one), so a label takes effect by the next morning, like the retrained model.
"""

from __future__ import annotations

from milter.features.domains import registrable
from milter.policy.reputation import blocklisted
from milter.policy.table import SEVERITY, Context, Hit, SenderLabels, domain_of, sender_key
from milter.types import Action, Verdict


def authenticated(ctx: Context, address: str | None = None) -> str | None:
    """How the From domain (of `address`, by default the summary's From address) vouches for this
    message: "DMARC", or "DKIM" for an aligned signature (same registrable domain) where the domain
    publishes no DMARC record; None when it does not."""
    auth = ctx.summary.auth
    from_domain = registrable(domain_of(address or ctx.summary.from_addr or "") or "")
    if auth is None or not from_domain:
        return None
    if auth.dmarc.result == "pass":
        # DMARC judged the From the labels are keyed on, not another one
        return "DMARC" if registrable(auth.dmarc.from_domain or "") == from_domain else None
    if auth.dmarc.result == "none" and any(registrable(d) == from_domain for d in auth.dkim_pass_domains):
        return "DKIM"
    return None


def vouched_sender(ctx: Context) -> tuple[str, str, SenderLabels] | None:
    """(sender key, how the message authenticated, its labels) where the admins' labels vouch for the
    From sender (`sender_key`) and the message authenticates as its own (`authenticated`); else None."""
    if not ctx.learned.counts or (how := authenticated(ctx)) is None:
        return None
    sender = sender_key(ctx.summary.from_addr)
    labels = ctx.learned.vouched(sender) if sender else None
    return None if labels is None else (sender, how, labels)


def learned_sender(ctx: Context) -> Hit | None:
    """Tag instead of quarantine / reject when only the model's score would have done it (see above).
    Not where a DNS blocklist would hold the message: the labels vouch against the model's score, not
    against a listing (before, a listed sender's higher score made this rule fire first and tag it)."""
    if (vouched := vouched_sender(ctx)) is None:
        return None
    listed = blocklisted(ctx)
    if listed is not None and listed.action is not None and SEVERITY[listed.action] > SEVERITY[Action.TAG]:
        return None
    sender, how, labels = vouched
    # the ladders' own hits follow as reasons and carry the score and threshold
    for ladder, score, verdict in (
        (ctx.rules.bec, ctx.scores.bec, Verdict.BEC),
        (ctx.rules.spam, ctx.scores.spam + ctx.scores.bec, Verdict.SPAM),
    ):
        step = ladder.step(score)
        if step is not None and SEVERITY[step[0]] > SEVERITY[Action.TAG]:
            reason = (
                f"learned sender: {sender} passes {how} and admins labelled {labels.ham} of its messages "
                f"ham, none spam: tagged, not {'rejected' if step[0] is Action.REJECT else 'quarantined'}"
            )
            return Hit(reason, verdict, Action.TAG)
    return None
