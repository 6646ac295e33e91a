"""How the message addresses its recipients: a recipient list guessed from one mailbox name, tagged at a
lower spam score.

* **One mailbox name at many organisations** (`harvested_recipients`, `policy.harvested_recipients_tag`,
  0.3 by default): the To header lists the same local part at three or more organisations
  (`mstone@gestation.com, mstone@hopkintonschools.org, mstone@midsouth.rr.com, ...`). A spam run that has
  a name and not an address tries it at every domain its list holds, and one message goes to all of the
  guesses; a person writing to colleagues at other organisations writes to other people, and an
  organisation's own domains count once (`acme.com` and `acme.co.uk` are one name, so a company that
  writes to `jane@` at its country domains is not judged). Among the corpora's 29,242 ham none does it,
  against 12 of Enron's spam, 2 of the shop mailbox's, 1 of phishing-pot's and 19 of SpamAssassin's (5 of
  those list `yyyy@`, that corpus's rewrite of its owner's mailbox names, at his several domains: the
  same shape as the `jm@` ones it left alone). Two organisations are not enough: 8 of the corpora's ham
  write to one name at two (a person's work and home address, `phenatic@` at ev1 and excite; an
  organisation that was renamed, `rbrent@` at fhcrc and fredhutch).

Only the To header is read (`MessageSummary.to_addrs`, its first 50 addresses): that is where such runs
put the guesses, since the recipients are meant to see a message addressed to them. Cc and Bcc are not in
the summary. Like the header rules of `form.py`, it judges no internal client, none of our own domains, no
mailing list's copy and no machine-generated report; it only tags, after the allow lists and the
blocklists, before the bulk rule (an unsubscribe header does not make such a message bulk), never softer
than the spam ladder. The cut is a score on the shipped model's scale.

Written here rather than taken from a library: SpamAssassin's `SUSPICIOUS_RECIPS` and `SORTED_RECIPS`
(EvalTests.pm) look at five or more To/Cc addresses for similar or sorted ones, a dictionary run at one
domain; they do not ask whether one name repeats across organisations, and no Python library does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from milter.features.domains import split_host
from milter.policy.table import Context, Hit, tag_judged

#: How many organisations one mailbox name must be tried at: two is a person's work and home address or a
#: renamed organisation (8 of the corpora's ham); three or more is a list of guesses.
MIN_ORGANISATIONS = 3


def harvested_recipients(ctx: Context) -> Hit | None:
    guessed = guessed_mailbox(ctx.summary.to_addrs)
    if guessed is None:
        return None
    local, organisations = guessed
    shown = ", ".join(organisations[:3]) + (", ..." if len(organisations) > 3 else "")
    what = f"To tries the mailbox {local!r} at {len(organisations)} organisations ({shown})"
    return tag_judged(ctx, ctx.rules.cuts.harvested_recipients, what)


def guessed_mailbox(addresses: Sequence[str]) -> tuple[str, tuple[str, ...]] | None:
    """The local part that `addresses` give at the most organisations, with those organisations' names
    (sorted), where there are `MIN_ORGANISATIONS` of them or more; None otherwise."""
    if len(addresses) < MIN_ORGANISATIONS:  # most mail: no public-suffix lookups at all
        return None
    at: defaultdict[str, set[str]] = defaultdict(set)
    for address in addresses:
        local, sep, host = address.lower().rpartition("@")
        name = organisation(host) if sep and local else ""
        if name:
            at[local].add(name)
    if not at:
        return None
    local, names = max(at.items(), key=lambda item: (len(item[1]), item[0]))
    return (local, tuple(sorted(names))) if len(names) >= MIN_ORGANISATIONS else None


def organisation(host: str) -> str:
    """The name a host's registrable domain gives its organisation, without the public suffix:
    mail.acme.co.uk -> acme; '' for IP literals and junk."""
    _, registrable, suffix = split_host(host.strip("[]"))
    if not registrable:
        return ""
    return registrable[: -len(suffix) - 1] if suffix and registrable.endswith("." + suffix) else registrable
