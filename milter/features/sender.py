"""Who sent it and how: the evidence legitimate bulk senders carry and phishers rarely assemble.

Since 2024 Gmail and Yahoo require bulk senders to sign with DKIM aligned to the From domain, to offer
RFC 8058 one-click unsubscribe (``List-Unsubscribe`` + ``List-Unsubscribe-Post``) and, at Gmail, invite a
``Feedback-ID``. A newsletter's links and images point to its own organisation or its sending platform;
its footer has unsubscribe text and a postal address (CAN-SPAM, the EU's Impressum). A phish borrows a
brand's name and points elsewhere. Every feature here reads only what the *sender* wrote (no receiving
side header, see `headers`), and none can tell the year: DKIM signatures are only *present or aligned*
(offline, and in training, nothing can be verified; the gateway verifies them in `milter.auth`).

`bulk_evidence` lists the same facts in words for the policy's ``bulk`` verdict.
"""

from __future__ import annotations

import functools
import math
import re

from milter.features import lexicon
from milter.features.context import Context, parse_link
from milter.features.domains import split_host
from milter.parse import ParsedMessage, decode_words

NAMES: tuple[str, ...] = (
    "snd_unsubscribe_header",
    "snd_oneclick_unsub",
    "snd_unsub_related",
    "snd_feedback_id",
    "snd_precedence_bulk",
    "snd_auto_report",
    "snd_dkim_signed",
    "snd_dkim_aligned",
    "snd_dkim_platform",
    "snd_links_related_share",
    "snd_links_unrelated_log",
    "snd_images_related_share",
    "snd_display_names_domain",
    "snd_text_names_domain",
    "snd_footer_unsubscribe",
    "snd_footer_postal",
)

_DKIM_D = re.compile(r"(?:^|;)\s*d\s*=\s*([A-Za-z0-9._-]+)")
# A URI stops at the next '<' too (RFC 3986 has no raw '<'): from each '<' the old [^>\s]+ read on over
# every later '<' to the first '>' or space, and 4 headers of "<http://a" * 7,000 took 32 s.
_UNSUB_URI = re.compile(r"<\s*(https?://[^<>\s]+|mailto:[^<>\s]+)\s*>", re.I)
# `<img\b[^>]*?\bsrc...` as one regex read from every "<img" to the next '>': 20,000 "<img " and no '>'
# took 15 s. `_img_srcs` finds the same matches in two steps, each reading a character once.
_IMG_OPEN = re.compile(r"(?is)<img\b")
_IMG_SRC = re.compile(r"""(?is)\bsrc\s*=\s*["']?\s*(https?://[^"'\s>]+)""")
_MAX_IMAGES = 200
_FOOTER_CHARS = 2500
_UNSUB_WORDS = re.compile(
    r"(?i)(?=[uomeandc])\b(unsubscribe|opt[ -]?out|manage (?:your )?(?:email )?(?:preferences|subscriptions)|"
    r"email preferences|abmelden|abbestellen|newsletter abbestellen|désinscri\w*|desinscri\w*|"
    r"darse de baja|cancelar (?:la )?suscripci\w+|disiscriv\w*|uitschrijven|afmelden)\b"
)
# A street line or a postcode next to a place: US "Suite 100, Austin, TX 78701", DE "10115 Berlin",
# UK "London EC1A 1BB". Digits are what the corpora's anonymiser rewrote, so the shape matters, not them.
# Case matters for the postcodes (a state code, a capitalised town): only the street words ignore it.
# Each pattern starts with a lookahead of the characters a match can start with: it fails at the other
# positions in one step instead of trying every alternative (the footer scans were a third of this
# module's time in the gateway; measured 442 -> 177 and 147 -> 42 us per message, the same match spans
# on 4,000 corpus messages). Under (?i) the class folds case exactly as the literals do (s matches ſ).
#
# `_POSTAL` is written so that its first item consumes a character of a class: the `re` engine then skips
# the positions outside the class in C, without entering the pattern, which an assertion first (a
# lookahead, `\b`) prevents. Each alternative starts with the character it needs and checks what `\b`
# asked for as a lookbehind. The readable form, which it matches span for span (tests/test_features.py
# checks both on corpus text and generated strings; 100 -> 56 us per footer on 4,000 corpus messages):
#   \b\d{1,6}\s+(?:[A-Z][\w.'-]*\s+){1,4}STREET_WORD\b\.?   US street line
#   | \b[A-Z]{2}\s+\d{5}(?:-\d{4})?\b                        US state and ZIP
#   | \b\d{5}\s+[A-ZÄÖÜ][a-zäöüß]+                          DE postcode and town
#   | (?i:straße|strasse|str\.|platz|weg|allee)\s*\d+        DE street and number
#   | \b(?i:p\.?\s?o\.?\s+box)\s+\d+                         PO box
#   | \b[A-Z]{1,2}\d[A-Z\d]?\s+\d[A-Z]{2}\b                  UK postcode
POSTAL_STREET_WORDS = (
    r"(?i:street|st|avenue|ave|road|rd|boulevard|blvd|drive|dr|lane|ln|way|suite|ste|parkway|pkwy|place|pl|"
    r"court|ct|highway|hwy)"
)
_POSTAL = re.compile(
    r"[\dA-Zsſpwa](?:"
    r"(?<=\d)(?<!\w\d)(?:\d{0,5}\s+(?:[A-Z][\w.'-]*\s+){1,4}" + POSTAL_STREET_WORDS + r"\b\.?"
    r"|\d{4}\s+[A-ZÄÖÜ][a-zäöüß]+)"
    r"|(?<=[A-Z])(?<!\w[A-Z])(?:[A-Z]\s+\d{5}(?:-\d{4})?\b|[A-Z]?\d[A-Z\d]?\s+\d[A-Z]{2}\b)"
    r"|(?<=[sSſ])(?i:tra(?:ße|sse)|tr\.)\s*\d+"
    r"|(?<=[pP])(?i:latz)\s*\d+"
    r"|(?<=[wW])(?i:eg)\s*\d+"
    r"|(?<=[aA])(?i:llee)\s*\d+"
    r"|(?<=[pP])(?<!\w[pP])(?i:\.?\s?o\.?\s+box)\s+\d+"
    r")"
)
_NON_ALNUM = re.compile(r"[^a-z0-9]+")  # runs: one replacement per gap, not per character
_NOT_ALNUM_BYTES = bytes(b for b in range(256) if b not in b"abcdefghijklmnopqrstuvwxyz0123456789")


def alnum_bytes(text: str) -> bytes:
    """`_NON_ALNUM.sub("", text)` as ASCII bytes: what it keeps is ASCII, so the codec drops the rest and
    bytes.translate the ASCII it does not keep, both in C (a body: 0.070 -> 0.008 ms)."""
    return text.encode("ascii", "ignore").translate(None, _NOT_ALNUM_BYTES)

# "list" is what mailing-list managers write, not the author: see `is_list_copy`.
_BULK_PRECEDENCE = frozenset({"bulk"})


def dkim_domains(parsed: ParsedMessage) -> tuple[str, ...]:
    """Registrable domains of every DKIM-Signature's d= tag (not verified here)."""
    out = []
    for value in parsed.get_all("dkim-signature"):
        m = _DKIM_D.search(value)
        if m:
            dom = split_host(m.group(1).lower())[1]
            if dom:
                out.append(dom)
    return tuple(dict.fromkeys(out))


def _unsub_uris(parsed: ParsedMessage) -> list[str]:
    return list(_uris_of(tuple(parsed.get_all("list-unsubscribe"))))


# One message's values are read three times (`compute`, `one_click` in it and in `bulk_evidence`): the
# last few are kept, so up to four 64 kB headers are decoded and searched once a message, not thrice.
@functools.lru_cache(maxsize=4)
def _uris_of(values: tuple[str, ...]) -> tuple[str, ...]:
    # some senders (and the foff corpus) send it as RFC 2047 encoded words
    return tuple(_UNSUB_URI.findall(" ".join(decode_words(v) for v in values)))


def one_click(parsed: ParsedMessage) -> bool:
    """RFC 8058: List-Unsubscribe-Post says One-Click and List-Unsubscribe offers an HTTPS URI."""
    post = (parsed.get("list-unsubscribe-post") or "").replace(" ", "").lower()
    return "list-unsubscribe=one-click" in post and any(
        u.lower().startswith("https://") for u in _unsub_uris(parsed)
    )


def _uri_domain(uri: str) -> str:
    if uri.lower().startswith("mailto:"):
        return split_host(uri[7:].split("?", 1)[0].rpartition("@")[2].lower())[1]
    return parse_link(uri).domain


def _bulk_precedence(parsed: ParsedMessage) -> bool:
    return (parsed.get("precedence") or "").strip().lower() in _BULK_PRECEDENCE


def _is_platform(domain: str) -> bool:
    return domain in lexicon.SENDING_PLATFORMS


def _label(domain: str) -> str:
    """The name part of a registrable domain ('1000bulbs' of 1000bulbs.com), alphanumerics only."""
    return _NON_ALNUM.sub("", domain.split(".", 1)[0])


def is_list_copy(parsed: ParsedMessage) -> bool:
    """A mailing list's copy (List-Id or List-Post): its List-Unsubscribe, Precedence and footer are the
    list manager's, not the author's. In the corpora every list message is ham (lfdr, SpamAssassin), so
    read as the author's they would teach "mailing list = ham" (../shared/corpora/README.md, "Traps")."""
    return parsed.get("list-id") is not None or parsed.get("list-post") is not None


def compute(ctx: Context) -> tuple[list[float], list[str]]:
    p = ctx.parsed
    own_words = not is_list_copy(p)  # the unsubscribe, precedence and footer facts are the author's
    sender = ctx.sender.domain if ctx.sender else ""
    signers = dkim_domains(p)
    own = {d for d in (sender, *signers) if d}
    unsub = [_uri_domain(u) for u in _unsub_uris(p)]
    link_domains = [ln.domain for ln in ctx.links if ln.domain and ln.domain not in lexicon.SOCIAL_LINKS]
    related = [d in own or _is_platform(d) for d in link_domains]
    unrelated = {d for d, ok in zip(link_domains, related, strict=True) if not ok}
    images = _img_domains(p.html)
    label = _label(sender)
    display = _NON_ALNUM.sub("", (ctx.sender.display if ctx.sender else "").lower())
    footer = ctx.body_text[-_FOOTER_CHARS:]
    text = ctx.body_text[:20_000].lower()
    values = [
        float(own_words and bool(p.get_all("list-unsubscribe"))),
        float(own_words and one_click(p)),
        float(own_words and any(d in own or _is_platform(d) for d in unsub if d)),
        float(p.get("feedback-id") is not None),
        float(own_words and _bulk_precedence(p)),
        float(_auto_report(p)),
        float(bool(p.get_all("dkim-signature"))),
        float(bool(sender) and sender in signers),
        float(any(_is_platform(d) for d in signers)),
        sum(related) / len(related) if related else 0.0,
        math.log1p(len(unrelated)),
        sum(d in own or _is_platform(d) for d in images) / len(images) if images else 0.0,
        float(len(label) >= 4 and len(display) >= 4 and (label in display or display in label)),
        float(len(label) >= 4 and label.encode("ascii") in alnum_bytes(text)),
        float(own_words and bool(_UNSUB_WORDS.search(footer))),
        float(bool(_POSTAL.search(footer))),
    ]
    return values, []


def _img_domains(html: str) -> list[str]:
    """Registrable domains of the remote images (`context.parse_link` reads each src as any link)."""
    return [d for url in _img_srcs(html[:300_000], _MAX_IMAGES) if (d := parse_link(url).domain)]


def _img_srcs(html: str, limit: int) -> list[str]:
    """The first `limit` matches of `<img\b[^>]*?` + `_IMG_SRC` (one regex, as `findall` reads them), in
    linear time.

    No match crosses a '>' (no part of it can read one), so a tag's src is the first `_IMG_SRC` between
    its "<img" and the next '>'; and when there is none, no later "<img" before that '>' has one either:
    the search goes on after the '>' instead of from each "<img" to it again.
    """
    out: list[str] = []
    pos, close = 0, -1
    while len(out) < limit and (tag := _IMG_OPEN.search(html, pos)):
        if close < tag.end():
            close = html.find(">", tag.end())
            close = len(html) if close < 0 else close
        src = _IMG_SRC.search(html, tag.end(), close)
        if src is None:
            pos = close
            continue
        out.append(src.group(1))
        pos = src.end()
    return out


def _auto_report(parsed: ParsedMessage) -> bool:
    """A machine-generated report (RFC 3464 DSN, RFC 3834 auto-reply): bounces and notifications."""
    auto = (parsed.get("auto-submitted") or "").strip().lower()
    return (auto not in ("", "no")) or "multipart/report" in parsed.content_types


def bulk_evidence(parsed: ParsedMessage, from_domain: str, signers: tuple[str, ...]) -> tuple[str, ...]:
    """What marks a message as sent by a (self-declared) bulk sender, in words, for the `bulk` verdict.

    Empty when the message carries none. Only the sender's own headers count; the DKIM signature is
    named when its d= (`signers`: `dkim_domains(parsed)`) aligns with `from_domain` (the gateway verifies
    it separately).
    """
    out = []
    if one_click(parsed):
        out.append("one-click unsubscribe (RFC 8058)")
    elif parsed.get_all("list-unsubscribe"):
        out.append("List-Unsubscribe")
    if parsed.get("feedback-id") is not None:
        out.append("Feedback-ID")
    if _bulk_precedence(parsed):
        out.append("Precedence: bulk")
    if out and from_domain and from_domain in signers:
        out.append(f"DKIM signature of {from_domain}")
    return tuple(out)
