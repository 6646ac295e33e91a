"""BEC content rules: documented pretexts (bank details changing, gift cards, a disguised sender
talking money) that the public corpora cannot teach a model."""

from __future__ import annotations

from milter.features.summary import MessageSummary
from milter.policy.learned import authenticated, vouched_sender
from milter.policy.table import Context, Hit
from milter.types import Action, Verdict

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
    address, that talks about payments, bank details or gift cards.

    Not held where the admins have vouched for that very sender and its own domain authenticates the
    message (`vouched_for`): a contractor that bills from `gandiroofingsolutions@gmail.com` as "G&I
    Roofing Solutions, LLC" sends every invoice that way, and with this rule ahead of the allow lists
    and the learned senders no release or allow entry could ever let one through. The disguise is
    about who sends; once the admins know who sends, it hides nothing. The pretexts that stay
    dangerous from a known sender (bank details changing, gift cards) have their own rules above,
    which keep quarantining it."""
    if not ctx.summary.disguised_sender or not ctx.summary.language & {"payment", "bank_change", "giftcard"}:
        return None
    display = ctx.summary.from_display or ""
    reason = (
        f"display name {display!r} disguises the sender {ctx.summary.from_addr or '(none)'} "
        "and the message is about money"
    )
    if (known := vouched_for(ctx)) is not None:
        return Hit(f"{reason}; not held: {known}")
    return Hit(reason, Verdict.BEC, Action.QUARANTINE)


def vouched_for(ctx: Context) -> str | None:
    """How the admins vouched for the From sender, where the message authenticates as its own (DMARC
    pass, or an aligned DKIM signature where the domain publishes no DMARC record): the address on
    `lists.allow_senders`, or `policy.learned_sender_labels` ham labels and none spam or bec (per address
    for free-mail, per domain otherwise: `sender_key`). None when neither holds."""
    addr = (ctx.summary.from_addr or "").lower()
    if addr and addr in ctx.lists.allow_senders and (how := authenticated(ctx)) is not None:
        return f"{addr} is on the allow list and {how} passed"
    if (vouched := vouched_sender(ctx)) is not None:
        key, how, labels = vouched
        return f"the admins labelled {labels.ham} messages of {key} as wanted and {how} passed"
    return None
