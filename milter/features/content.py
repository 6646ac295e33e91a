"""HTML, URL and attachment features.

HTML is never rendered: selectolax (lexbor) parses it once in `context.build`; here we only count
what a reader would not see (hidden text, links whose text shows another domain, forms, scripts).
"""

from __future__ import annotations

import math
import re

from milter.features import lexicon
from milter.features.context import Context, Link, parse_link
from milter.features.domains import is_ip, split_host
from milter.features.links import browser_href

HTML_NAMES: tuple[str, ...] = (
    "html_len_log",
    "html_text_ratio",
    "html_links",
    "html_link_text_mismatch",
    "html_forms",
    "html_password_input",
    "html_hidden_text",
    "html_images",
    "html_image_only",
    "html_scripts",
    "html_iframes",
    "html_meta_refresh",
    "html_tiny_images",
    "html_data_uri",
    "html_js_links",
    "html_font_zero",
    "html_external_form_action",
)

URL_NAMES: tuple[str, ...] = (
    "url_count_log",
    "url_domains",
    "url_ip_literal",
    "url_shortener",
    "url_punycode",
    "url_suspicious_tld",
    "url_abused_hosting",
    "url_at_sign",
    "url_port",
    "url_max_len_log",
    "url_query_heavy",
    "url_subdomain_depth_max",
    "url_encoded_chars",
    "url_from_domain_share",
    "url_lookalike_brand",
    "url_redirect_param",
    "url_file_download",
)

ATTACH_NAMES: tuple[str, ...] = (
    "att_count",
    "att_size_log",
    "att_executable",
    "att_macro_office",
    "att_office",
    "att_pdf",
    "att_archive",
    "att_html",
    "att_image",
    "att_double_ext",
    "att_type_mismatch",
    "att_calendar",
    "att_message",
    "att_name_spaces",
    "att_no_name",
)

# One literal-prefixed pattern each, run on the lower-cased HTML: re finds a literal prefix fast, while
# one case-insensitive alternation was tried at every character (a quarter of a millisecond a message).
_HIDDEN = tuple(
    re.compile(p)
    for p in (r"display\s*:\s*none", r"visibility\s*:\s*hidden", r"font-size\s*:\s*0(?![.\d])",
              r"opacity\s*:\s*0(?![.\d])", r"max-height\s*:\s*0(?![.\d])")
)
_FONT_ZERO = re.compile(r"font-size\s*:\s*[01](?:px|pt)?\s*[;\"']", re.I)
# A browser undoes three obfuscations before it applies a style, and a sender who hides text uses them
# to slip past the patterns above: character references in the attribute (`display&#58;none`,
# `d&#105;splay`, `&colon;`), CSS comments between tokens (`display:/**/none`) and CSS escapes
# (`\6e one`). Only the references to a character that can spell a pattern or a CSS delimiter are
# decoded: letters, digits, CSS white space and : ; - . / * \ (by number, or by the few names of such
# characters). The common &#39; &#34; &#38; &#8217; &nbsp; do not match, so they do not set off the
# recount. Possessive `0*+` and the bounded alternatives keep each match linear.
_CHAR_REF = re.compile(
    r"&#[xX]0*+([9acdACD]|2[0a-fA-F]|3[0-9abAB]|4[1-9a-fA-F]|5[0-9aAcC]|6[1-9a-fA-F]|7[0-9aA])"
    r"(?![0-9a-fA-F]);?"
    r"|&#0*+(9|1[023]|32|4[2-9]|5[0-9]|6[5-9]|[78][0-9]|9[027-9]|1[01][0-9]|12[0-2])(?![0-9]);?"
    r"|&(Tab|NewLine|colon|semi|period|sol|ast|midast|bsol);"
)
_NAMED_REF = {"Tab": "\t", "NewLine": "\n", "colon": ":", "semi": ";", "period": ".", "sol": "/",
              "ast": "*", "midast": "*", "bsol": "\\"}
# CSS Syntax 4.3.7: a backslash and 1-6 hex digits (plus one optional white space) is that code point;
# a backslash and any other character but a newline is that character. One pass: nothing is rescanned.
# a colon, then a comment, or the reverse, white space between: two patterns, as each one's literal
# start is found fast (one alternation was tried at every character, twice the time); each \s* run ends
# at the next colon or comment mark, so no run is scanned twice
_COLON_COMMENT = (re.compile(r":\s*/\*"), re.compile(r"\*/\s*:"))
_CSS_ESCAPE = re.compile(r"\\(?:([0-9a-f]{1,6})(?:\r\n|[ \t\r\n\f])?|([^\r\n\f0-9a-f]))")
_DOMAINISH = re.compile(r"(?i)(?:https?://)?((?:[a-z0-9-]+\.)+[a-z]{2,})(?:/|\s|$)")
_REDIRECT = re.compile(r"(?i)[?&](url|redirect|redir|next|target|dest|destination|goto|u|q)=https?")
_DOWNLOAD = re.compile(r"(?i)\.(exe|scr|zip|rar|7z|iso|img|js|vbs|hta|msi|apk|docm|xlsm)(\?|$)")


def html_features(ctx: Context) -> tuple[list[float], list[str]]:
    tree, html = ctx.html_tree, ctx.parsed.html
    if tree is None:
        return [0.0] * len(HTML_NAMES), []
    signals: list[str] = []
    mismatches = [ln for ln in ctx.links if ln.text and _shown_domain_differs(ln)]
    if mismatches:
        ln = mismatches[0]
        signals.append(f"link text shows {_shown(ln.text)} but points to {ln.domain or ln.host}")
    forms = tree.css("form")
    passwords = tree.css("input[type=password]")
    if forms:
        signals.append("message contains an HTML form")
    images = tree.css("img")
    tiny = sum(
        1
        for i in images
        if (i.attributes.get("width") or "") in ("0", "1")
        and (i.attributes.get("height") or "") in ("0", "1")
    )
    text_len = len(ctx.html_text.strip())
    image_only = len(images) > 0 and text_len < 100
    if image_only:
        signals.append("HTML body is images with almost no text")
    lower = html.lower()
    hidden = sum(len(rx.findall(lower)) for rx in _HIDDEN)
    font_zero = len(_FONT_ZERO.findall(html))
    plain = _deobfuscated(html, lower)
    if plain is not None:
        # never fewer than the raw text shows: decoding must not undo a count that plain HTML has today
        hidden = max(hidden, sum(len(rx.findall(plain)) for rx in _HIDDEN))
        font_zero = max(font_zero, len(_FONT_ZERO.findall(plain)))
    sender_domain = ctx.sender.domain if ctx.sender else ""
    ext_action = any(
        split_host(_host_of(f.attributes.get("action") or ""))[1] not in ("", sender_domain) for f in forms
    )
    values = [
        math.log1p(len(html)),
        text_len / len(html) if html else 0.0,
        float(sum(1 for ln in ctx.links if ln.text or ln.url)),
        float(len(mismatches)),
        float(len(forms)),
        float(len(passwords)),
        float(hidden),
        float(len(images)),
        float(image_only),
        float(len(tree.css("script"))) + float(html.lower().count("<script")),
        float(len(tree.css("iframe"))),
        float(bool(tree.css("meta[http-equiv]"))),
        float(tiny),
        float(html.count("data:image")),
        float(html.lower().count("javascript:")),
        float(font_zero),
        float(ext_action),
    ]
    return values, signals


def _deobfuscated(html: str, lower: str) -> str | None:
    """The lower-cased HTML as a browser's CSS parser reads its styles, or None when it holds none of
    the obfuscations (`&`, `/*`, `\\`) in a form that can change a count: the common case costs three
    substring tests and a regex scan or two in C, and the patterns run again only on the 1 in 50 modern
    messages that hold such a form. Each step is a single pass (str.find or one regex that cannot
    rescan), so a hostile 300,000-character body stays linear."""
    text, changed = lower, False
    if "&" in html and _CHAR_REF.search(html):
        # references are case-sensitive (&colon; is ':', &Colon; is not): decode before lower-casing
        text, changed = _CHAR_REF.sub(_char_ref, html).lower(), True
    # a comment joins a property to its value only beside a colon (display/**/:none, display:/**/none):
    # the stylesheet comments of 2 in 5 newsletters, elsewhere, then cost no recount
    if "/*" in text and any(rx.search(text) for rx in _COLON_COMMENT):
        text, changed = _without_css_comments(text), True
    if "\\" in text:
        # an escape can spell an upper-case letter (\44 is 'D'); CSS keywords ignore case
        text, changed = _CSS_ESCAPE.sub(_css_escape, text).lower(), True
    return text if changed else None


def _char_ref(m: re.Match[str]) -> str:
    if m.group(3):
        return _NAMED_REF[m.group(3)]
    return chr(int(m.group(1), 16) if m.group(1) else int(m.group(2)))


def _css_escape(m: re.Match[str]) -> str:
    if m.group(2) is not None:
        return m.group(2)
    cp = int(m.group(1), 16)
    return chr(cp) if 0 < cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF else "\ufffd"


def _without_css_comments(text: str) -> str:
    """Each closed /* */ comment read as the token break CSS makes of it (a space), so `display:/**/none`
    matches; the comments' bodies follow the text, so a style that is only commented out still counts
    as it does today. An unclosed /* is left as it is. str.find from the last end: linear."""
    out: list[str] = []
    bodies: list[str] = []
    pos = 0
    while (start := text.find("/*", pos)) >= 0:
        end = text.find("*/", start + 2)
        if end < 0:
            break
        out.append(text[pos:start])
        bodies.append(text[start + 2 : end])
        pos = end + 2
    out.append(text[pos:])
    return " ".join(out) + "\n" + "\n".join(bodies)


def _host_of(url: str) -> str:
    """The host a form posts to, read as a browser reads the action (`https:\\evil`, `//evil`, a tab
    inside the scheme: milter.features.links), '' for a relative action."""
    href = browser_href(url)
    return parse_link(href).host if href is not None else ""


def _shown(text: str) -> str:
    m = _DOMAINISH.search(text.strip() + " ")
    return m.group(1).lower() if m else text[:40]


def _shown_domain_differs(link: Link) -> bool:
    m = _DOMAINISH.fullmatch(link.text.strip() + " ") or _DOMAINISH.match(link.text.strip() + " ")
    if not m:
        return False
    shown = split_host(m.group(1))[1]
    return bool(shown) and bool(link.domain) and shown != link.domain


def url_features(ctx: Context) -> tuple[list[float], list[str]]:
    links = ctx.links
    if not links:
        return [0.0] * len(URL_NAMES), []
    signals: list[str] = []
    domains = {ln.domain for ln in links if ln.domain}
    ip_links = sum(1 for ln in links if is_ip(ln.host))
    shorteners = sum(1 for ln in links if ln.host in lexicon.SHORTENERS or ln.domain in lexicon.SHORTENERS)
    abused = sum(
        1
        for ln in links
        if ln.domain in lexicon.ABUSED_HOSTING
        or any(ln.host.endswith(h) for h in lexicon.ABUSED_HOSTING if "." in h and h.count(".") > 1)
    )
    sus_tld = sum(1 for ln in links if ln.domain.rpartition(".")[2] in lexicon.SUSPICIOUS_TLDS)
    brands = [ln for ln in links if _brand_lookalike(ln)]
    if ip_links:
        signals.append("link to a bare IP address")
    if shorteners:
        signals.append("link through a URL shortener")
    if abused:
        signals.append("link to a free hosting service often used for phishing pages")
    if brands:
        signals.append(f"link to {brands[0].domain}, which names a brand it does not belong to")
    sender = ctx.sender.domain if ctx.sender else ""
    values = [
        math.log1p(len(links)),
        float(len(domains)),
        float(ip_links),
        float(shorteners),
        float(sum("xn--" in ln.host for ln in links)),
        float(sus_tld),
        float(abused),
        float(sum("@" in ln.url.split("?")[0][8:] for ln in links)),
        float(sum(ln.port is not None for ln in links)),
        math.log1p(max(len(ln.url) for ln in links)),
        float(sum(ln.url.count("&") + ln.url.count("=") > 6 for ln in links)) / len(links),
        float(max(split_host(ln.host)[0].count(".") + bool(split_host(ln.host)[0]) for ln in links)),
        float(sum(ln.url.count("%") for ln in links)) / len(links),
        sum(ln.domain == sender for ln in links) / len(links) if sender else 0.0,
        float(len(brands)),
        float(sum(bool(_REDIRECT.search(ln.url)) for ln in links)),
        float(sum(bool(_DOWNLOAD.search(ln.url.split("#")[0])) for ln in links)),
    ]
    return values, signals


def _brand_lookalike(link: Link) -> bool:
    host = link.host.replace("-", "").replace(".", "")
    for brand, owned in lexicon.BRANDS.items():
        if len(brand) >= 5 and brand in host and link.domain not in owned:
            return True
    return False


_MAGIC = {
    b"MZ": "exe",
    b"PK\x03\x04": "zip",
    b"%PDF": "pdf",
    b"\xd0\xcf\x11\xe0": "ole",
    b"Rar!": "rar",
    b"7z\xbc\xaf": "7z",
    b"\x89PNG": "png",
    b"\xff\xd8\xff": "jpg",
    b"GIF8": "gif",
}


def attachment_features(ctx: Context) -> tuple[list[float], list[str]]:
    atts = ctx.parsed.attachments
    if not atts:
        return [0.0] * len(ATTACH_NAMES), []
    signals: list[str] = []
    exts = [_ext(a.filename) for a in atts]
    names = [a.filename.lower() for a in atts]
    executable = sum(e in lexicon.EXECUTABLE_EXT for e in exts)
    macro = sum(
        e in lexicon.MACRO_EXT or "macroenabled" in a.content_type for e, a in zip(exts, atts, strict=True)
    )
    double = sum(_double_ext(n) for n in names)
    html_att = sum(
        e in lexicon.HTML_EXT or a.content_type == "text/html" for e, a in zip(exts, atts, strict=True)
    )
    mismatch = sum(_type_mismatch(e, a.head) for e, a in zip(exts, atts, strict=True))
    for cond, text in (
        (executable, "executable attachment"),
        (macro, "macro-enabled Office attachment"),
        (double, "attachment with a double extension"),
        (html_att, "HTML attachment"),
        (mismatch, "attachment content does not match its name"),
    ):
        if cond:
            signals.append(text)
    values = [
        float(len(atts)),
        math.log1p(sum(a.size for a in atts)),
        float(executable),
        float(macro),
        float(sum(e in lexicon.OFFICE_EXT for e in exts)),
        float(sum(e == "pdf" for e in exts)),
        float(sum(e in lexicon.ARCHIVE_EXT for e in exts)),
        float(html_att),
        float(sum(a.content_type.startswith("image/") for a in atts)),
        float(double),
        float(mismatch),
        float(sum(e == "ics" or a.content_type == "text/calendar" for e, a in zip(exts, atts, strict=True))),
        float(sum(a.content_type.startswith("message/") for a in atts)),
        float(sum("   " in n for n in names)),
        float(sum(not n for n in names)),
    ]
    return values, signals


def _ext(name: str) -> str:
    return name.lower().rstrip(". ").rpartition(".")[2] if "." in name else ""


def _double_ext(name: str) -> bool:
    parts = name.rstrip(". ").split(".")
    return (
        len(parts) >= 3
        and parts[-2] in ("pdf", "doc", "docx", "xls", "xlsx", "jpg", "png", "txt", "zip")
        and parts[-1] in lexicon.EXECUTABLE_EXT | lexicon.HTML_EXT | lexicon.ARCHIVE_EXT
    )


def _type_mismatch(ext: str, head: bytes) -> bool:
    kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
    if kind is None or not ext:
        return False
    if kind == "exe":
        return ext not in lexicon.EXECUTABLE_EXT
    if kind == "zip":
        return ext not in lexicon.ARCHIVE_EXT | lexicon.OFFICE_EXT | {"jar", "apk", "odp", "epub", "xpi"}
    if kind == "pdf":
        return ext != "pdf"
    return False
