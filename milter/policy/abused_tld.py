"""Mail from a domain on an often-abused top-level domain is tagged at a lower spam score than other mail.

The model reads the TLD as one feature among hundreds and its spam cut is set by old ham (2002 RSS items,
short personal notes; docs/DETECTION.md), so a `.shop` sender it scores 0.95 goes untagged beside a 2002
mailing-list post it scores the same. SpamAssassin (FROM_SUSPICIOUS_NTLD, PDS_OTHER_BAD_TLD) and Rspamd
weigh such TLDs by hand for the same reason: most domains registered under them that send mail send
spam. The list is `lexicon.SUSPICIOUS_TLDS`, the one the features use.

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

from milter.features.lexicon import SUSPICIOUS_TLDS
from milter.policy.table import Context, Hit, in_domain, tag_from


def abused_tld_sender(ctx: Context) -> Hit | None:
    cut = ctx.rules.cuts.abused_tld
    domain = ctx.summary.from_org_domain or ""
    tld = domain.rpartition(".")[2]
    if cut is None or not domain or tld not in SUSPICIOUS_TLDS:
        return None
    if in_domain(domain, ctx.protected.domains) is not None:  # a site of our own on such a TLD
        return None
    where = f"sender domain {domain} is on an often-abused TLD (.{tld})"
    return tag_from(ctx, cut, lambda score: f"{where} and scores {score:.2f} as spam")
