"""HTML mail that carries no sender marks at all is tagged at a lower spam score than other mail.

Since February 2024 Gmail and Yahoo refuse or junk mail without SPF or DKIM, and bulk senders must sign
with DKIM and offer unsubscribing; Microsoft followed in 2025. Legitimate HTML mail in 2026 (newsletters,
receipts, shipping notices, mail from any hosted mailbox) comes from platforms that sign it, and nearly all
bulk mail says how to unsubscribe. A message with an HTML part, no DKIM signature, no List-Unsubscribe, no
Feedback-ID and no Precedence: bulk is how a spam run from a throwaway host or a compromised web server
looks. The model cannot learn this: its old corpora (1999-2005) are unsigned on both sides, so the trees
read "no signature" as saying nothing, and the spam tag cut is set by ham that is old, plain and unsigned
(RSS items, personal notes; docs/DETECTION.md).

So where the model already leans hard to spam (`policy.unsigned_html_tag`, 0.93 by default against the
shipped model's tag cut of 0.975; false turns it off), such a message is tagged as spam. Measured on the
shipped model (docs/DETECTION.md, "Unsigned HTML mail and digests that hold no messages"): spam flagged on
the sender-split test set rose 95.1 -> 96.5 % and modern ham 0.70 -> 1.40 % flagged (one unsigned 2019
campaign mail with SPF softfail, which Gmail had filed as spam), all ham 0.16 -> 0.19 %; on the
out-of-fold threshold rows (three times as many senders) old ham 0.26 -> 0.31 % and modern ham +1 message
(a shipping notice whose corpus kept only From/To/Subject/Date: its missing signature is the corpus's
doing, not the sender's). The cut is a score on this model's scale: a model retrained on other data may
want it chosen again (the table in docs/DETECTION.md says how it was chosen).

What counts as signed: with `summary.auth` (the gateway, `scan --dns`) a signature that verified, or
could not be checked for a DNS error, a DMARC pass (a small sender's SPF-aligned mail meets the 2024
rules without DKIM), or a trusted ARC sealer's validated chain (forwarded mail loses signatures); a
signature that failed is no signature, so a forger cannot add a broken header to dodge the rule. Without
`summary.auth`, any DKIM-Signature header (all that feature extraction can see).

Never for our own clients (`policy.internal_networks`: their mail is often signed only after the filter)
or our own domains, a mailing list's copy (lists re-sign or strip), or a machine-generated report
(bounces from old MTAs are unsigned). After the allow lists, the blocklists and the abused-TLD rule;
never softer than the spam ladder: where the ladder alone would quarantine, that stands.

The same holds for a second mark of how a message was built, `odd_digest` (`policy.odd_digest_tag`, 0.5
by default): a multipart/digest whose parts are not messages. RFC 2046 makes a digest's parts messages
(mailing-list digests: message/rfc822 each); spam puts its HTML in one so that filters which skip digests
skip it. In the corpora 544 of cw-l's 603 spam and 164 of phishing-pot's 5,930 messages are built so and
no ham is (none of 29,242); the model cannot see it (it reads no content type below the top one), and
its misses among them score 0.77-0.97 as not-ham. Not for internal clients or a mailing list's copy.

And a third, `image_only_html` (`policy.image_only_tag`, 0.5 by default): HTML that shows images and
under 100 characters of text (the model's own `html_image_only`), signed or not, with an unsubscribe offer
or not. The words are in the picture, where no text filter reads them; a legitimate sender writes its
offer, its address and its unsubscribe line as text (accessibility, and clients that block images). In the
corpora 1,859 spam and phishing messages are built so (1,664 of them where this rule judges) and one ham,
a mailing-list copy, which it does not judge. The model weighs the fact among hundreds and gives the modern
ones it has not seen 0.5-0.97: on the test sets of four refits on other draws of senders (docs/DETECTION.md,
"Other sender splits") it tagged 1-6 more spam and phishing each, the shop mailbox's spam on one of them
86.5 -> 91.9 %, and no ham. Judged as the From rules are (`judged_sender`); before the bulk rule, so an
unsubscribe header does not make such mail bulk; never softer than the spam ladder.
"""

from __future__ import annotations

from milter.features.summary import MessageSummary
from milter.policy.table import Context, Hit, judged_sender, tag_from, tag_judged

#: DKIM results that say the message was signed (temperror: the key lookup failed, not the signature).
SIGNED_RESULTS = frozenset({"pass", "temperror"})


def unsigned_html(ctx: Context) -> Hit | None:
    cut = ctx.rules.cuts.unsigned_html
    summary = ctx.summary
    if cut is None or not summary.html or not judged_sender(ctx):
        return None
    if summary.bulk_evidence or signed(summary):
        return None
    what = "HTML mail with no DKIM signature and no unsubscribe offer"
    return tag_from(ctx, cut, lambda score: f"{what} scores {score:.2f} as spam")


def odd_digest(ctx: Context) -> Hit | None:
    """A multipart/digest that holds something other than messages (`MessageSummary.odd_digest`)."""
    cut = ctx.rules.cuts.odd_digest
    summary = ctx.summary
    if cut is None or not summary.odd_digest or ctx.internal or summary.list_mail:
        return None
    return tag_from(ctx, cut, lambda score: f"a digest that holds no messages, scored {score:.2f} as spam")


def image_only_html(ctx: Context) -> Hit | None:
    """HTML that shows images and under 100 characters of text (`MessageSummary.image_only`)."""
    if not ctx.summary.image_only:
        return None
    return tag_judged(ctx, ctx.rules.cuts.image_only, "HTML that is images with almost no text")


def signed(summary: MessageSummary) -> bool:
    """The message bears a DKIM signature (see the module docstring for what counts)."""
    auth = summary.auth
    if auth is None:
        return bool(summary.dkim_signers)
    if any(r.result in SIGNED_RESULTS for r in auth.dkim) or auth.dmarc.result == "pass":
        return True
    return auth.arc.trusted and auth.arc.result == "pass"
