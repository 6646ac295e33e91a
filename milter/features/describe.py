"""Feature values in words, for the explanations an admin reads (`describe(name, value)`).

One entry per schema column, each true to how `milter.features` computes it: `*_log` columns hold
log1p(count) and are rendered as the count, ratios as percentages, sizes in bytes as KiB/MiB. A
column's *absence* can push a score too ("no List-Unsubscribe header"), so every entry has a phrase
for zero. Phrases are plain ASCII (they go into mail headers), at most 80 characters, no full stop.

The body-text statistics (`txt_*`, `lang_*`, hashed words) read the first 12,000 characters of the
text; the phrases say "body" for that window.

The zero phrase is used exactly when the value is not above zero: the model's trees split these
columns at thresholds just above zero, so any positive value is "present" to them. NaN and negative
values read as zero, which is what the model makes of them too (LightGBM sends a NaN in a column that
had no missing values in training down the zero branch; no column is ever negative).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

_CAP = 10**9  # counts beyond this are rendered as "1,000,000,000+": a phrase stays short
_LOG_CAP = math.log1p(_CAP)
_TOKEN_NAME = re.compile(r"tok_(\d{1,6})")
_GRAM_CHARS = 30
_GRAMS_SHOWN = 3


class Phrase(Protocol):
    def render(self, value: float) -> str: ...


def _clean(value: float) -> float:
    """NaN and negatives as zero (see the module doc), everything else as given."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if v > 0 else 0.0  # NaN > 0 is False


def _count(value: float, log: bool) -> int:
    """The integer a (log1p-scaled) count column stands for; at least 1 when the value is positive."""
    v = _clean(value)
    if log:
        v = math.expm1(min(v, _LOG_CAP))
    n = round(min(v, float(_CAP)))
    return max(n, 1) if v > 0 else 0


def _number(n: int) -> str:
    return f"{n:,}" if n < _CAP else f"{_CAP:,}+"


@dataclass(frozen=True)
class Flag:
    """A 0/1 column: what it means set, and what it means unset."""

    present: str
    absent: str

    def render(self, value: float) -> str:
        return self.present if _clean(value) > 0 else self.absent


@dataclass(frozen=True)
class Count:
    """A count, raw or log1p-scaled (`log`): `many` holds "{n}"."""

    zero: str
    one: str
    many: str
    log: bool = False

    def render(self, value: float) -> str:
        n = _count(value, self.log)
        if n == 0:
            return self.zero
        return self.one if n == 1 else self.many.format(n=_number(n))


@dataclass(frozen=True)
class Size:
    """A log1p-scaled size in bytes (`some` holds "{size}")."""

    zero: str
    some: str

    def render(self, value: float) -> str:
        n = _count(value, log=True)
        if n == 0:
            return self.zero
        return self.some.format(size=_bytes(n) if n < _CAP else f"{_bytes(_CAP)}+")


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} byte" if n == 1 else f"{n} bytes"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:,.0f} {unit}" if size >= 10 else f"{size:.1f} {unit}"


@dataclass(frozen=True)
class Share:
    """A ratio in 0..1, as a percentage (`some` holds "{p}")."""

    zero: str
    some: str

    def render(self, value: float) -> str:
        v = min(_clean(value), 1.0)
        if v == 0:
            return self.zero
        pct = round(v * 100)
        # a rounded 0% or 100% would say "none" or "all" of what is only almost none or all
        p = "under 1%" if pct == 0 else "over 99%" if pct == 100 and v < 1 else f"{pct}%"
        return self.some.format(p=p)


@dataclass(frozen=True)
class Amount:
    """A real-valued quantity with one decimal (`some` holds "{x}")."""

    zero: str
    some: str

    def render(self, value: float) -> str:
        v = _clean(value)
        if v == 0:
            return self.zero
        x = "under 0.1" if v < 0.05 else f"{v:,.1f}" if v < _CAP else f"{_CAP:,}+"
        return self.some.format(x=x)


def _log(zero: str, one: str, many: str) -> Count:
    return Count(zero, one, many, log=True)


_HEADERS: dict[str, Phrase] = {
    "feat_group_failed": Flag("a feature group failed on this message and reads as zero",
                              "every feature group was computed"),
    "hdr_from_missing": Flag("no From address", "has a From address"),
    "hdr_from_multiple": Flag("more than one From address", "no second From address"),
    "hdr_from_no_display": Flag("From address without a display name",
                                "From has a display name (or there is no From)"),
    "hdr_to_missing": Flag("no To header", "has a To header"),
    "hdr_to_count_log": _log("no address in To", "1 address in To", "{n} addresses in To"),
    "hdr_cc_count_log": _log("no address in Cc", "1 address in Cc", "{n} addresses in Cc"),
    "hdr_rcpt_many": Flag("more than 10 addresses in To and Cc", "10 or fewer addresses in To and Cc"),
    "hdr_to_undisclosed": Flag("To says undisclosed recipients or has no address",
                               "To is not undisclosed or empty"),
    "hdr_msgid_malformed": Flag("malformed Message-ID", "Message-ID well-formed or missing"),
    "hdr_msgid_domain_mismatch": Flag("Message-ID domain differs from the From domain",
                                      "Message-ID domain matches From (or no Message-ID)"),
    "hdr_date_missing": Flag("no Date header", "has a Date header"),
    "hdr_date_unparseable": Flag("Date header cannot be parsed", "Date parses (or there is no Date)"),
    "hdr_date_no_tz": Flag("Date has no time zone", "no Date without a time zone"),
    "hdr_date_bad_tz": Flag("Date time zone beyond +/-14 hours", "no impossible Date time zone"),
    "hdr_date_bad_weekday": Flag("Date weekday does not match the date", "no wrong weekday in Date"),
    "hdr_reply_to_present": Flag("has a Reply-To address", "no Reply-To address"),
    "hdr_reply_to_domain_differs": Flag("Reply-To domain differs from the From domain",
                                        "Reply-To domain matches From (or no Reply-To)"),
    "hdr_in_reply_to": Flag("has an In-Reply-To header", "no In-Reply-To header"),
    "hdr_references": Flag("has a References header", "no References header"),
    "hdr_subject_re": Flag("subject starts with a reply prefix (Re:, AW:, SV:)",
                           "subject has no reply prefix (Re:)"),
    "hdr_subject_fwd": Flag("subject starts with a forward prefix (Fwd:, WG:, TR:)",
                            "subject has no forward prefix (Fwd:)"),
    "hdr_fake_reply": Flag("subject says Re: but no In-Reply-To or References",
                           "no Re: subject without In-Reply-To or References"),
    "hdr_subject_missing": Flag("no Subject header", "has a Subject header"),
    "hdr_subject_len": Count("empty subject", "subject 1 character long", "subject {n} characters long"),
    "hdr_subject_words": Count("no words in the subject", "1 word in the subject",
                               "{n} words in the subject"),
    "hdr_subject_upper_ratio": Share("no upper-case letters in the subject",
                                     "{p} of the subject's letters upper-case"),
    "hdr_subject_excl": Count("no exclamation mark in the subject", "1 exclamation mark in the subject",
                              "{n} exclamation marks in the subject"),
    "hdr_subject_nonascii_ratio": Share("subject all ASCII", "{p} of the subject non-ASCII"),
    "hdr_subject_encoded": Flag("subject MIME-encoded (=?...?=)", "subject not MIME-encoded"),
    "hdr_subject_money": Flag("currency sign or code in the subject", "no currency in the subject"),
    "hdr_subject_emoji": Flag("emoji, symbol or CJK character in the subject",
                              "no emoji, symbol or CJK character in the subject"),
    "hdr_subject_digits_ratio": Share("no digits in the subject", "{p} of the subject digits"),
    "hdr_8bit_raw": Flag("raw 8-bit bytes in the headers", "no raw 8-bit bytes in the headers"),
}

_MIME: dict[str, Phrase] = {
    "mime_parts_log": _log("no MIME parts", "1 MIME part", "{n} MIME parts"),
    "mime_depth": Count("no nested MIME parts", "MIME parts nested 1 level deep",
                        "MIME parts nested {n} levels deep"),
    "mime_top_multipart": Flag("multipart message", "message not multipart"),
    "mime_top_html_only": Flag("HTML only, no plain-text part", "not HTML-only"),
    "mime_has_text_plain": Flag("has a plain-text part", "no plain-text part"),
    "mime_has_html": Flag("has an HTML part", "no HTML part"),
    "mime_alternative": Flag("text and HTML alternatives (multipart/alternative)",
                             "no multipart/alternative"),
    "mime_related": Flag("HTML with inline parts (multipart/related)", "no multipart/related"),
    "mime_defects": Count("no MIME defects", "1 MIME defect", "{n} MIME defects"),
    "mime_defect_boundary": Flag("MIME boundary defect", "no MIME boundary defect"),
    "mime_defect_header": Flag("header defect (malformed or oversized)", "no header defect"),
    "mime_defect_charset": Flag("unknown charset", "no unknown charset"),
    "mime_defect_payload": Flag("undecodable or badly encoded part", "no undecodable part"),
    "msg_body_size_log": Size("empty message body", "message body of {size}"),
}

_IDENTITY: dict[str, Phrase] = {
    "id_display_has_address": Flag("display name contains an address", "no address in the display name"),
    "id_display_address_differs": Flag("display name contains another address",
                                       "display name shows no other address"),
    "id_display_domain_differs": Flag("display name shows an address in another domain",
                                      "no other domain's address in the display name"),
    "id_freemail": Flag("sender on a free-mail domain", "sender not on a free-mail domain"),
    "id_freemail_org_display": Flag("free-mail sender with an organisation or title as name",
                                    "no free-mail sender posing as an organisation"),
    "id_reply_to_freemail": Flag("Reply-To on free mail but From not",
                                 "no free-mail Reply-To for a non-free-mail sender"),
    "id_brand_in_display_not_domain": Flag("display name names a brand the sender domain is not",
                                           "no foreign brand in the display name"),
    "id_brand_in_domain_not_own": Flag("sender host names a brand it does not belong to",
                                       "no foreign brand in the sender host"),
    "id_lookalike_protected": Flag("sender domain looks like a protected domain or brand",
                                   "sender domain no lookalike of a protected domain"),
    "id_punycode": Flag("sender host in punycode (xn--)", "sender host not punycode"),
    "id_mixed_script": Flag("sender host mixes Latin with Cyrillic or Greek", "sender host not mixed-script"),
    "id_local_len": Count("nothing before the @ of the sender (or no sender)",
                          "1 character before the @ of the sender",
                          "{n} characters before the @ of the sender"),
    "id_local_digits_ratio": Share("no digits before the @ of the sender",
                                   "{p} digits before the @ of the sender"),
    "id_local_random": Flag("sender address looks random before the @",
                            "sender address does not look random before the @"),
    "id_domain_len": Count("no sender domain", "sender domain 1 character long",
                           "sender domain {n} characters long"),
    "id_domain_hyphens": Count("no hyphen in the sender domain", "1 hyphen in the sender domain",
                               "{n} hyphens in the sender domain"),
    "id_domain_digits": Count("no digits in the sender domain", "1 digit in the sender domain",
                              "{n} digits in the sender domain"),
    "id_subdomain_depth": Count("sender host has no subdomain", "sender host has 1 subdomain level",
                                "sender host has {n} subdomain levels"),
    "id_suspicious_tld": Flag("sender domain on an often-abused TLD",
                              "sender domain not on an often-abused TLD"),
    "id_display_len": Count("no display name", "display name 1 character long",
                            "display name {n} characters long"),
    "id_display_all_caps": Flag("display name in capitals", "display name not all capitals"),
    "id_display_has_title": Flag("display name has a job title (CEO, director)",
                                 "no job title in the display name"),
    "id_protected_domain_sender": Flag("sender in one of our protected domains",
                                       "sender not in one of our protected domains"),
}

_HTML: dict[str, Phrase] = {
    "html_len_log": _log("no HTML", "1 character of HTML", "{n} characters of HTML"),
    "html_text_ratio": Share("no visible text in the HTML", "{p} of the HTML is visible text"),
    # the context's links: HTML anchors and URLs in the plain text, counted when there is HTML
    "html_links": Count("no links, or no HTML part", "1 link in an HTML message",
                        "{n} links in an HTML message"),
    "html_link_text_mismatch": Count("no link shows one domain but goes to another",
                                     "1 link shows one domain but goes to another",
                                     "{n} links show one domain but go to another"),
    "html_forms": Count("no HTML form", "1 HTML form", "{n} HTML forms"),
    "html_password_input": Count("no password field", "1 password field", "{n} password fields"),
    "html_hidden_text": Count("no hidden-text styles in the HTML", "1 hidden-text style (display:none, ...)",
                              "{n} hidden-text styles (display:none, ...)"),
    "html_images": Count("no images in the HTML", "1 image in the HTML", "{n} images in the HTML"),
    "html_image_only": Flag("HTML is images with almost no text", "HTML not image-only"),
    "html_scripts": Count("no scripts in the HTML", "1 script in the HTML", "{n} scripts in the HTML"),
    "html_iframes": Count("no iframes in the HTML", "1 iframe in the HTML", "{n} iframes in the HTML"),
    # the HTML head is dropped before this is read: what is left is meta tags in the body
    "html_meta_refresh": Flag("meta http-equiv tag (refresh) in the HTML body",
                              "no meta http-equiv tag in the HTML body"),
    "html_tiny_images": Count("no 0-1 pixel images", "1 image of 0-1 pixels (tracker)",
                              "{n} images of 0-1 pixels (trackers)"),
    "html_data_uri": Count("no inline data: images", "1 inline data: image", "{n} inline data: images"),
    "html_js_links": Count("no javascript: in the HTML", "javascript: once in the HTML",
                           "javascript: {n} times in the HTML"),
    "html_font_zero": Count("no 0-1 pixel font sizes", "1 font size of 0-1 pixels",
                            "{n} font sizes of 0-1 pixels"),
    "html_external_form_action": Flag("a form posts to another domain", "no form posting to another domain"),
}

_URL: dict[str, Phrase] = {
    "url_count_log": _log("no links in the message", "1 link in the message", "{n} links in the message"),
    "url_domains": Count("no link with a domain", "links go to 1 domain", "links go to {n} domains"),
    "url_ip_literal": Count("no link to a bare IP address", "1 link to a bare IP address",
                            "{n} links to a bare IP address"),
    "url_shortener": Count("no link through a URL shortener", "1 link through a URL shortener",
                           "{n} links through a URL shortener"),
    "url_punycode": Count("no link to a punycode (xn--) host", "1 link to a punycode (xn--) host",
                          "{n} links to punycode (xn--) hosts"),
    "url_suspicious_tld": Count("no link on an often-abused TLD", "1 link on an often-abused TLD",
                                "{n} links on often-abused TLDs"),
    "url_abused_hosting": Count("no link to free hosting used for phishing",
                                "1 link to free hosting used for phishing",
                                "{n} links to free hosting used for phishing"),
    "url_at_sign": Count("no link with an @ in its address", "1 link with an @ in its address",
                         "{n} links with an @ in their address"),
    "url_port": Count("no link with an explicit port", "1 link with an explicit port",
                      "{n} links with an explicit port"),
    "url_max_len_log": _log("no links", "longest link 1 character", "longest link {n} characters"),
    "url_query_heavy": Share("no link with a long query string", "{p} of links with long query strings"),
    "url_subdomain_depth_max": Count("no subdomains in link hosts", "link hosts up to 1 subdomain level deep",
                                     "link hosts up to {n} subdomain levels deep"),
    "url_encoded_chars": Amount("no %-escapes in links", "{x} %-escapes per link on average"),
    "url_from_domain_share": Share("no link to the sender's domain",
                                   "{p} of links go to the sender's domain"),
    "url_lookalike_brand": Count("no link host naming a foreign brand", "1 link host names a brand it is not",
                                 "{n} link hosts name a brand they are not"),
    "url_redirect_param": Count("no link with a redirect parameter", "1 link with a redirect parameter",
                                "{n} links with a redirect parameter"),
    "url_file_download": Count("no link to a file download (.exe, .zip)",
                               "1 link to a file download (.exe, .zip)",
                               "{n} links to file downloads (.exe, .zip)"),
}

_ATTACHMENTS: dict[str, Phrase] = {
    "att_count": Count("no attachments", "1 attachment", "{n} attachments"),
    "att_size_log": Size("no attachment data", "attachments of {size} in all"),
    "att_executable": Count("no executable attachment", "1 executable attachment",
                            "{n} executable attachments"),
    "att_macro_office": Count("no macro-enabled Office attachment", "1 macro-enabled Office attachment",
                              "{n} macro-enabled Office attachments"),
    "att_office": Count("no Office attachment", "1 Office attachment", "{n} Office attachments"),
    "att_pdf": Count("no PDF attachment", "1 PDF attachment", "{n} PDF attachments"),
    "att_archive": Count("no archive attachment (zip, rar)", "1 archive attachment (zip, rar)",
                         "{n} archive attachments (zip, rar)"),
    "att_html": Count("no HTML attachment", "1 HTML attachment", "{n} HTML attachments"),
    "att_image": Count("no image attachment", "1 image attachment", "{n} image attachments"),
    "att_double_ext": Count("no attachment with a double extension", "1 attachment with a double extension",
                            "{n} attachments with a double extension"),
    "att_type_mismatch": Count("no attachment whose content belies its name",
                               "1 attachment whose content belies its name",
                               "{n} attachments whose content belies their name"),
    "att_calendar": Count("no calendar invitation", "1 calendar invitation", "{n} calendar invitations"),
    "att_message": Count("no attached message", "1 attached message", "{n} attached messages"),
    "att_name_spaces": Count("no attachment name with runs of spaces",
                             "1 attachment name with runs of spaces",
                             "{n} attachment names with runs of spaces"),
    "att_no_name": Count("no attachment without a name", "1 attachment without a name",
                         "{n} attachments without a name"),
}

# A mailing list's copy reads as "none" for the author's own unsubscribe facts (sender.is_list_copy).
_SENDER: dict[str, Phrase] = {
    "snd_unsubscribe_header": Flag("has a List-Unsubscribe header",
                                   "no List-Unsubscribe header from the sender"),
    "snd_oneclick_unsub": Flag("offers one-click unsubscribe (RFC 8058)",
                               "no one-click unsubscribe (RFC 8058)"),
    "snd_unsub_related": Flag("List-Unsubscribe points to the sender or its platform",
                              "no List-Unsubscribe to the sender or its platform"),
    "snd_feedback_id": Flag("has a Feedback-ID header", "no Feedback-ID header"),
    "snd_precedence_bulk": Flag("Precedence: bulk", "no Precedence: bulk"),
    "snd_auto_report": Flag("automatic report or auto-reply (bounce, notice)",
                            "not an automatic report or auto-reply"),
    "snd_dkim_signed": Flag("has a DKIM-Signature header (verified elsewhere)", "no DKIM-Signature header"),
    "snd_dkim_aligned": Flag("DKIM signature claims the From domain",
                             "no DKIM signature claiming the From domain"),
    "snd_dkim_platform": Flag("DKIM signature claims a known sending platform",
                              "no DKIM signature claiming a sending platform"),
    "snd_links_related_share": Share("no link to the sender or its platform",
                                     "{p} of links go to the sender or its platform"),
    "snd_links_unrelated_log": _log("no link to an unrelated domain", "links go to 1 unrelated domain",
                                    "links go to {n} unrelated domains"),
    "snd_images_related_share": Share("no remote image from the sender or its platform",
                                      "{p} of remote images from the sender or its platform"),
    "snd_display_names_domain": Flag("display name matches the sender's domain name",
                                     "display name does not match the sender's domain name"),
    "snd_text_names_domain": Flag("body names the sender's domain", "body does not name the sender's domain"),
    "snd_footer_unsubscribe": Flag("unsubscribe text in the footer", "no unsubscribe text in the footer"),
    "snd_footer_postal": Flag("postal address in the footer", "no postal address in the footer"),
}

_TEXT: dict[str, Phrase] = {
    "txt_len_log": _log("no body text", "1 character of body text", "{n} characters of body text"),
    "txt_words_log": _log("no words in the body", "1 word in the body", "{n} words in the body"),
    "txt_upper_ratio": Share("no upper-case letters in the body", "{p} of the body's letters upper-case"),
    "txt_digit_ratio": Share("no digits in the body", "{p} of the body digits"),
    "txt_nonascii_ratio": Share("body all ASCII", "{p} of the body non-ASCII"),
    "txt_excl": Count("no exclamation mark in the body", "1 exclamation mark in the body",
                      "{n} exclamation marks in the body"),
    "txt_currency": Count("no currency sign ($, euro, pound) in the body",
                          "1 currency sign ($, euro, pound) in the body",
                          "{n} currency signs ($, euro, pound) in the body"),
    "txt_distinct_ratio": Share("no words in the body", "{p} of the body's words distinct"),
    "txt_avg_word_len": Amount("no words in the body", "body words {x} bytes long on average"),
    "txt_lines_log": _log("no line break in the body", "1 line break in the body",
                          "{n} line breaks in the body"),
    "txt_empty": Flag("no body text", "has body text"),
    "txt_replacement_chars": Count("no undecodable characters in the body",
                                   "1 undecodable character in the body",
                                   "{n} undecodable characters in the body"),
}

# lang_<group>: log1p of how often the group's phrases occur in subject and body; the examples are
# lexicon phrases, so the admin sees what kind of words are meant.
_LANGUAGE_WORDS: dict[str, tuple[str, str]] = {
    "payment": ("payment phrase", "invoice, wire, IBAN"),
    "bank_change": ("bank-change phrase", "new bank details, payroll"),
    "giftcard": ("gift-card phrase", "gift card, iTunes card"),
    "availability": ("availability ask", "are you available, quick favor"),
    "urgency": ("urgency word", "urgent, today, expires"),
    "secrecy": ("secrecy phrase", "confidential, keep this between us"),
    "credentials": ("login or verify phrase", "password, verify, sign in"),
    "prize": ("prize word", "winner, lottery, reward"),
    "money": ("money word", "million, loan, refund"),
    "crypto": ("crypto word", "bitcoin, wallet"),
    "pharma": ("pharmacy word", "viagra, pills"),
    "unsubscribe": ("unsubscribe phrase", "unsubscribe, opt out"),
    "greeting_generic": ("generic greeting", "dear customer, dear user"),
}


def _language(noun: str, examples: str) -> Count:
    # "such as": the examples name the kind of phrase, not the ones this message contains
    return _log(f"no {noun}s (such as {examples})", f"1 {noun} (such as {examples})",
                f"{{n}} {noun}s (such as {examples})")


@dataclass(frozen=True)
class Leaning:
    """A text-stage score (milter/stacking.py): the log-odds of a linear model over all the message's
    words, read as which way the words lean and how strongly."""

    like: str
    unlike: str

    def render(self, value: float) -> str:
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = 0.0
        # three wordings, no number: `quarantine stats --why` counts messages per wording, and the
        # contribution beside it already says how much the score moved
        if not math.isfinite(v) or abs(v) < 0.5:
            return f"its words, weighed together, lean neither way ({self.like} or not)"
        strength = "strongly " if abs(v) >= 3 else ""
        side = self.like if v > 0 else self.unlike
        return f"its words, weighed together, read {strength}like {side}"


# the text stage's scores (milter.stacking.STAGE_NAMES), appended to the trees' input
_STAGE: dict[str, Phrase] = {
    "txt_words_unwanted": Leaning("spam or phishing", "wanted mail"),
    "txt_words_phishing": Leaning("phishing", "other mail"),
}

# a lexicon group added without words here falls back to its column name (and fails the tests)
_LANG: dict[str, Phrase] = {f"lang_{group}": _language(*words) for group, words in _LANGUAGE_WORDS.items()}

DESCRIPTIONS: Mapping[str, Phrase] = MappingProxyType(
    {**_HEADERS, **_MIME, **_IDENTITY, **_HTML, **_URL, **_ATTACHMENTS, **_SENDER, **_TEXT, **_LANG, **_STAGE}
)


#: the text stage's topics (milter.stacking.TopicProjection), one explanation line for all of them
TOPICS = "txt_topics"


def describe(name: str, value: float, words: Sequence[str] = (), examples: Sequence[str] = ()) -> str:
    """`name`'s value for one message in words. For a hashed word column (`tok_NNNN`), `words` are the
    message's own n-grams in that bucket (most frequent first) and `examples` common training n-grams
    of it. Never raises: an unknown column is named as it is."""
    phrase = DESCRIPTIONS.get(name)
    if phrase is not None:
        return phrase.render(value)
    if name == TOPICS:
        # no number: one direction of a learned projection means nothing alone; together they say
        # what kind of text the trees took it for
        return "what the text is about (its topics, weighed together)"
    m = _TOKEN_NAME.fullmatch(name)
    if m:
        return _tokens(int(m.group(1)), _clean(value), words, examples)
    return _fallback(name, value)


def _tokens(group: int, value: float, words: Sequence[str], examples: Sequence[str]) -> str:
    own = _quoted(words)
    if value > 0 and own:
        return f"{'word' if len(own) == 1 else 'words'} {', '.join(own)} in the text"
    common = _quoted(examples)
    such_as = f" (such as {', '.join(common)})" if common else ""
    none = "" if value > 0 else "none of the "
    return f"{none}words of hashed group {group}{such_as}"


def _quoted(grams: Sequence[str]) -> list[str]:
    """The first few non-empty n-grams, cut short and quoted (a quote inside is escaped)."""
    kept = [g for g in grams if g][:_GRAMS_SHOWN]
    return ['"' + g[:_GRAM_CHARS].replace("\\", "\\\\").replace('"', '\\"') + '"' for g in kept]


def _fallback(name: str, value: float) -> str:
    label = name.encode("ascii", "replace").decode()[:40] or "?"
    try:
        shown = f"{float(value):.3g}"
    except (TypeError, ValueError):
        shown = "?"
    return f"model feature {label} = {shown}"


__all__ = ["DESCRIPTIONS", "Phrase", "describe"]
