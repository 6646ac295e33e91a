"""The correspondence-history rules (issue 17): one rule per signal of `milter.history_signals`.

Each rule asks its signal about the message and what the site's history knew before it
(`Context.history`, a `HistoryLookup` the gateway made), and says what `[policy.history]` configures
for it: "note" adds the signal's reason and decides nothing, "tag" tags the message as `bec` (subject
prefix and verdict headers; it is still delivered). None of them quarantines: on the Enron replay each
signal fires on more than 0.1 % of real ham from outside the organisation (docs/bec-history.md), which
is issue 17's bar for holding mail.

What a tag from here lets the history learn (`Hit.novel`, read by `Decision.teaches`):

* a plain first contact (`first_contact_org`, `first_contact_recipient`) is tagged only for being new,
  so it teaches once delivered: otherwise a new supplier's invoices would be tagged for ever;
* a borrowed name, a correspondent writing from elsewhere (lookalike, free-mail), a new Reply-To or
  first contact talking money is tagged for looking like BEC, so it teaches nothing by itself: the
  attacker's second message must meet the same tag. It teaches once our users have written to the
  sender's address (their reply is outbound mail, which the history learns from), or when an admin
  labels or releases it as ham (`milter history rebuild`, `milter quarantine release`). A new Reply-To
  stops being new once our users write to it; their writing to the sender vouches for no Reply-To.

They sit after the model's ladders and the allow and bulk rules in `RULES`: the first hit with an action
decides, and a tag must never pre-empt a quarantine the model or a content rule would have made. An
allow-listed or bulk sender is therefore accepted with these reasons attached.

Without a history (`Context.history` None: `milter scan`, `[policy.history] enabled = false`, or a
gateway whose history table cannot be read: "unknown", logged and counted there) every rule is silent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from milter.history_signals import (
    Signal,
    correspondent_elsewhere,
    display_name_new_address,
    first_contact_money,
    first_contact_org,
    first_contact_recipient,
    reply_to_unseen,
)
from milter.policy.table import Context, Hit
from milter.types import Action, Verdict

if TYPE_CHECKING:
    from milter.history import HistoryLookup


#: Signals that say only "new": their tag does not stop the history learning the sender (module docstring).
_NEW_ONLY = frozenset({"first_contact_org", "first_contact_recipient"})
#: Signals about the sender's identity, whose tag the history may learn once our users write to it.
_ANSWERED_TEACHES = frozenset({"display_name_new_address", "correspondent_elsewhere"})


def _judge(ctx: Context, name: str, signal: Signal) -> Hit | None:
    known = ctx.history
    mode = ctx.history_modes.get(name, "off")
    if known is None or mode == "off" or ctx.internal:
        return None  # our own clients' mail is ours (outbound, or internal), not a stranger's
    reason = signal(known.facts, known.view, ctx.protected)
    if reason is None:
        return None
    if mode == "tag":
        return Hit(reason, Verdict.BEC, Action.TAG, novel=_may_teach(name, known))
    return Hit(reason)


def _may_teach(name: str, known: HistoryLookup) -> bool:
    """Whether a tag from signal `name` still lets the history learn the message (module docstring)."""
    if name in _NEW_ONLY:
        return True
    written = known.view.address
    return name in _ANSWERED_TEACHES and written is not None and written.outbound > 0


def history_first_contact_org(ctx: Context) -> Hit | None:
    """Nobody here has exchanged mail with this address or its domain."""
    return _judge(ctx, "first_contact_org", first_contact_org)


def history_first_contact_recipient(ctx: Context) -> Hit | None:
    """A known domain writing to one of our users for the first time."""
    return _judge(ctx, "first_contact_recipient", first_contact_recipient)


def history_display_name_new_address(ctx: Context) -> Hit | None:
    """A familiar (or protected) display name from an address never seen with it."""
    return _judge(ctx, "display_name_new_address", display_name_new_address)


def history_correspondent_elsewhere(ctx: Context) -> Hit | None:
    """A known correspondent from a lookalike of their domain, or from free-mail."""
    return _judge(ctx, "correspondent_elsewhere", correspondent_elsewhere)


def history_reply_to_unseen(ctx: Context) -> Hit | None:
    """Replies would go to an address the site has never exchanged mail with."""
    return _judge(ctx, "reply_to_unseen", reply_to_unseen)


def history_first_contact_money(ctx: Context) -> Hit | None:
    """First contact that talks about payment, bank details, gift cards or urgency."""
    return _judge(ctx, "first_contact_money", first_contact_money)
