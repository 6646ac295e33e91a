"""Mail from a domain on an often-abused top-level domain is tagged at a lower spam score than other mail.

The model reads the TLD as one feature among hundreds and its spam cut is set by old ham (2002 RSS items,
short personal notes; docs/DETECTION.md), so a `.shop` sender it scores 0.95 goes untagged beside a 2002
mailing-list post it scores the same. SpamAssassin (FROM_SUSPICIOUS_NTLD, PDS_OTHER_BAD_TLD) and Rspamd
weigh such TLDs by hand for the same reason: most domains registered under them that send mail send
spam. The list is `lexicon.SUSPICIOUS_TLDS`, the one the features use, and `policy.abused_tlds`: cheap
TLDs that list lacks (.help, .bar, .autos, .skin and the like; the features' list is an input the model
was fitted with, so it changes only with a refit, while this one is the admin's). In the corpora 4 spam
messages come from .help, a spam and a phish from .autos, one spam each from .bar and .skin, and no ham;
the shop mailbox's spam from them is missed on other sender splits ("Derila
<NeckandShoulder@promosprout.help>" at not-ham 0.97; docs/DETECTION.md, "Other sender splits").

Measured on the sender-split test set of the shipped model (docs/DETECTION.md, "A lower spam cut for
abused TLDs"): the shop mailbox's spam and phishing flagged 45.7 -> 62.9 %, spam pooled 95.01 -> 95.11 %,
phishing 97.43 -> 97.52 %, no ham flagged that was not before. Of the 29,242 ham in the corpora one has a
From domain on such a TLD; modern legitimate senders on them are absent from the corpora, so their rate
is unknown, which is why the rule only tags (never quarantines) and only where the model already leans
to spam (`policy.abused_tld_tag`, 0.5 by default; false turns it off). Only the From domain counts: link
domains on these TLDs are more common in ham (8 of the corpora's ham) and added nothing measured.

Never for our own domains (`policy.protected_domains`: a site whose own domain is on such a TLD).
After the allow lists and the blocklists, before the bulk rule (a `.shop` sender with an unsubscribe
header is not accepted as bulk for it) and before the spam ladder, which it never softens: where the
ladder alone would quarantine, that stands.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from milter.errors import ConfigError
from milter.features.lexicon import SUSPICIOUS_TLDS
from milter.policy.table import Context, Hit, in_domain, tag_from

_TLD = re.compile(r"[a-z][a-z0-9-]{0,62}")


def abused_tld_sender(ctx: Context) -> Hit | None:
    cut = ctx.rules.cuts.abused_tld
    domain = ctx.summary.from_org_domain or ""
    tld = domain.rpartition(".")[2]
    if cut is None or not domain or tld not in ctx.rules.cuts.abused_tlds:
        return None
    if in_domain(domain, ctx.protected.domains) is not None:  # a site of our own on such a TLD
        return None
    where = f"sender domain {domain} is on an often-abused TLD (.{tld})"
    return tag_from(ctx, cut, lambda score: f"{where} and scores {score:.2f} as spam")


def abused_tlds(extra: Iterable[str]) -> frozenset[str]:
    """The features' list and `policy.abused_tlds` (".help" or "help", any case); a name that is no TLD is
    a configuration error naming the key."""
    out = set(SUSPICIOUS_TLDS)
    for raw in extra:
        tld = raw.strip().lower().removeprefix(".")
        if not _TLD.fullmatch(tld):
            raise ConfigError("policy.abused_tlds", f"not a top-level domain: {raw!r}")
        out.add(tld)
    return frozenset(out)
