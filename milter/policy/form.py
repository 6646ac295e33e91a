"""How the headers are formed: three promises a spam tool's message makes and does not keep, tagged at a
lower spam score.

* **A reply that answers nothing** (`fake_reply`, `policy.fake_reply_tag`, 0.5 by default): the Subject
  opens with "Re:" (or Aw:, Sv:, Antw:, Rif:) and the message carries neither In-Reply-To nor
  References. Mail clients write them when they reply (RFC 5322 3.6.4 says they should, and Gmail,
  Outlook and Apple Mail do); a spam run writes "Re:" into the subject so the recipient takes it for a
  conversation already under way (`AAA - Car Emergency Kit <aaa-1044@idealbookclub.com>`, "Re: Your
  order"). Rspamd scores the same thing (`FAKE_REPLY`). Old Exchange and Outlook replies did omit the
  headers: 712 of the 3,138 Enron ham on the sender-split test set carry the mark, so the model must
  lean to spam already; of those 712 one reaches 0.5 as not-ham (and 0.9).
* **A From that names no mailbox** (`no_mailbox`, `policy.no_mailbox_tag`, 0.3 by default): no From
  header, a From without an address (`citi`, `invalid-email-format`), or an address left as an undecoded
  encoded word (`=?utf-8?q?singapore-post...?=`, where "@" is "=40"). RFC 5322 3.6.2 requires one mailbox
  at least; every mail system that sends on a person's or a company's behalf writes one, and a spam tool
  that fills the header from a template sometimes does not (SpamAssassin's `MISSING_FROM`, Rspamd's
  `FROM_INVALID`). The one ham kind that does the same is a bounce from an old MTA
  (`From: MAILER-DAEMON`, no domain; or `From: <>`), so a display name of a mail system's role
  (MAILER-DAEMON, postmaster, Mail Delivery System) is exempt here as DSNs are everywhere; a bounce that
  names nothing at all is left to the cut (the corpora's one scores 0.02). A From that reads as several
  addresses is not judged: an unquoted comma in a display name (`Kundenservice, jehd
  <service@stayfriends.de>`) splits one mailbox into a bare word and the real one, and the summary's
  `from_addr` is the first.
* **A From with several addresses** (`several_from`, `policy.several_from_tag`, 0 by default: any
  score): RFC 5322 allows it only with a Sender header naming the one who sent it, DMARC cannot judge
  it (it has no single From domain; RFC 7489 6.6.1 says such mail SHOULD be rejected), and phishing
  writes it to show a brand over an address the filter does not see first (`Microsoft account team
  ,_<no-reply@access-accsecurity.com>`: the unquoted comma makes two addresses). 1,675 of the corpora's
  5,941 phishing messages, 129 of Enron's spam and none of their 29,242 ham do it. The model reads the
  same fact (`hdr_from_multiple`) and holds nearly all of them; the rule is there for the one it does
  not: a spoof of a domain whose DMARC would have refused it. Where one of the addresses is at a
  protected domain, `milter.policy.dmarc.several_from_protected` has already quarantined it as BEC.
  A From that an unquoted comma split has one real address (`split_mailbox`): the gateway's DMARC check
  judges that address's domain (milter.auth.message), so where that domain authenticates the message
  (DMARC pass, or an aligned DKIM signature without a DMARC record) the rule only notes it: software
  that writes `Smith, John <john@partner.example>` unquoted sends every message so, and the domain's
  owner vouches for them. Without DNS answers, or when they prove nothing, it tags as before.

Measured (docs/DETECTION.md, "Headers that promise what the message does not keep"): among the
corpora's 29,242 ham, none but bounces (11 of sisimai's 159: 10 exempt, one `From: <>` at 0.02) and
one parcel notice whose corpus kept no From (scored 0.004) names no mailbox; on the sender-split test
set the first two rules tag 13 spam and phishing messages the ladders let through, and one ham (the
Enron reply above); the third tags one spam more and no ham.

None judges internal clients, our own domains, a mailing list's copy (a list rewrites headers) or a
machine-generated report. All only tag, after the allow lists and the blocklists, before the bulk rule
(an unsubscribe header does not make such a message bulk), never softer than the spam ladder. The cuts
are scores on the shipped model's scale; a model retrained on other data may want them chosen again.
"""

from __future__ import annotations

from milter.features.summary import MessageSummary
from milter.policy.learned import authenticated
from milter.policy.mailbox import ROLE_MAILBOXES
from milter.policy.table import Context, Hit, judged_sender, tag_judged

#: Display names of a mail system writing on its own behalf (bounces: "MAILER-DAEMON" with no address).
MAIL_SYSTEM_NAMES = ROLE_MAILBOXES | {"mailer daemon", "mail delivery system", "mail delivery subsystem"}


def fake_reply(ctx: Context) -> Hit | None:
    if not ctx.summary.fake_reply:
        return None
    what = "the subject says Re: but the message answers nothing (no In-Reply-To or References)"
    return tag_judged(ctx, ctx.rules.cuts.fake_reply, what)


def no_mailbox(ctx: Context) -> Hit | None:
    summary = ctx.summary
    if names_mailbox(summary.from_addr):
        return None
    if summary.from_others:  # "Smith, John <j@x.example>" unquoted: a mailbox follows the first word
        return None
    if (summary.from_display or "").strip().lower() in MAIL_SYSTEM_NAMES:
        return None
    shown = summary.from_addr or summary.from_display
    what = f"From ({shown!r}) names no mailbox" if shown else "From names no mailbox"
    return tag_judged(ctx, ctx.rules.cuts.no_mailbox, what)


def several_from(ctx: Context) -> Hit | None:
    summary = ctx.summary
    others = summary.from_others
    if not others:
        return None
    real = split_mailbox(summary)
    if real is None:
        what = f"From gives {1 + len(others)} addresses, which DMARC cannot judge"
        return tag_judged(ctx, ctx.rules.cuts.several_from, what)
    what = f"From reads as {1 + len(others)} addresses (an unquoted comma before {real})"
    if judged_sender(ctx) and (how := authenticated(ctx, real)) is not None:
        return Hit(f"{what}; not tagged: {how} passed for {real}")  # its domain's owner vouches for it
    return tag_judged(ctx, ctx.rules.cuts.several_from, what)


def split_mailbox(summary: MessageSummary) -> str | None:
    """The one real address of a From that an unquoted comma in its display name split ("Smith, John
    <john@partner.example>" -> john@partner.example): every other part names no mailbox. None for a
    From of several mailboxes, or of none."""
    every = (summary.from_addr, *(addr for _, addr in summary.from_others))
    found = [addr for addr in every if names_mailbox(addr)]
    return found[0] if len(found) == 1 else None


def names_mailbox(addr: str | None) -> bool:
    """`addr` (the summary's From addr-spec) is a mailbox: a local part and a domain around one "@"; an
    encoded word is no address (RFC 2047 5: it may not appear in an addr-spec)."""
    if not addr or addr.startswith("=?"):
        return False
    local, at, domain = addr.rpartition("@")
    return bool(at and local and domain)
