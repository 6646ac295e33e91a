"""Links as a browser reads them: the URL an `<a href>` leads to and the host a link names.

A browser does not follow an href as written: it follows the WHATWG URL Standard, which removes tabs and
newlines anywhere in the URL, reads `\\` as `/` in http(s) URLs, skips any run of slashes after
`https:` (`https:\\\\evil`, `https:evil`), opens `//evil` with the page's scheme, reads `3232235777`,
`0xC0A80001`, `0300.0250.0.1` and `192.168.1` as IPv4 addresses, percent-decodes the host and converts a
Unicode host to IDNA A-labels. Read as written, each of those hid a link's real host from the URL
features and the domain blocklists, or dropped the link.

Why our own code: `urllib.parse` follows RFC 3986 (no backslash rule, no numeric IPv4 forms, no IDNA), and
no library in this project's dependencies implements WHATWG host parsing (the `idna` package does the
UTS #46 mapping, used below, but not the URL's authority or IPv4 rules). Only the steps that decide which
host a link names are implemented; each is linear in the URL's length (string methods and regexes of
single character classes, possessive where they could backtrack), since hostile HTML can hold hundreds
of long links. An ordinary link (`https://host/...`, ASCII host) is returned as it was read before.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import idna

# What a browser strips around a URL (C0 controls and space), plus what str.strip() strips (the
# links were read with it before, and an ordinary link must read as it did).
_STRIP = "".join(map(chr, range(0x21))) + "".join(c for c in map(chr, range(0x80, 0x3001)) if c.isspace())
_TAB_NEWLINE = str.maketrans("", "", "\t\n\r")
_ORDINARY = ("http://", "https://", "www.")
_SLASHES = ("http:///", "https:///")  # more slashes than the scheme's two: the browser skips them
_AUTHORITY_END = re.compile(r"[/\\?#]")
# WHATWG forbidden domain code points: a host holding one after decoding is no host (the URL fails)
_FORBIDDEN = frozenset(map(chr, range(0x21))) | frozenset("#/:<>?@[\\]^|%\x7f")
_MAX_HOST = 1024  # longer (up to 3 x 253 percent-encoded): no DNS name, not worth decoding
_MAX_NAME = 253  # DNS limits: a longer name or label resolves nowhere, so it is left as written
_MAX_LABEL = 63
_NUMBER_END = frozenset("0123456789abcdefx.")  # the last character of a host that may end in a number
# an IPv4 part's digits after its 0x or 0 prefix, leading zeros apart (possessive: no backtracking)
_DIGITS = {
    10: re.compile(r"0*+([0-9]*+)"),
    16: re.compile(r"0*+([0-9a-f]*+)", re.IGNORECASE),
    8: re.compile(r"0*+([0-7]*+)"),
}


def browser_href(href: str) -> str | None:
    """The http(s) URL a browser follows for an `<a href>` value (or a `www.` href, which mail
    clients open as http), or None when it is no such link.

    An ordinary href (`http://`, `https://` or `www.` followed by the host, no backslash, tab or
    newline) comes back as `href.strip()`; otherwise the scheme is written `scheme://`, a
    scheme-relative `//host` gets `https:`, and backslashes before the query read as `/`."""
    s = href.strip(_STRIP)
    head = s[:9].lower()
    if "\t" in s or "\n" in s or "\r" in s:
        s = s.translate(_TAB_NEWLINE)
        head = s[:9].lower()
    elif head.startswith(_ORDINARY) and not head.startswith(_SLASHES) and "\\" not in s:
        return s
    if head.startswith("www."):
        prefix, rest = "", s
    else:
        if head.startswith("https:"):
            prefix, rest = s[:5] + "://", s[6:]
        elif head.startswith("http:"):
            prefix, rest = s[:4] + "://", s[5:]
        elif s[:1] in ("/", "\\") and s[1:2] in ("/", "\\"):  # scheme-relative: the page's scheme
            prefix, rest = "https://", s
        else:
            return None
        rest = rest.lstrip("/\\")  # special authority ignore slashes state
    end = _AUTHORITY_END.search(rest)
    cut = end.start() if end else len(rest)
    authority, tail = rest[:cut], rest[cut:]
    if not authority:
        return None  # no host: the browser gives up
    if "\\" in tail:  # the path's backslashes are slashes; the query's and fragment's stay
        q = min((i for i in (tail.find("?"), tail.find("#")) if i >= 0), default=len(tail))
        tail = tail[:q].replace("\\", "/") + tail[q:]
    return prefix + authority + tail


def canonical_host(host: str) -> str:
    """`host` (without brackets or port) as a browser reads it: lower case, percent-decoded, in IDNA
    A-labels (UTS #46 mapping, so fullwidth dots separate labels), a numeric IPv4 form as a
    dotted quad. A host the browser would reject stays as it was, lower-cased."""
    lowered = host.lower()
    if lowered.isascii() and "%" not in lowered:
        if lowered[-1:] not in _NUMBER_END:  # most names: no IPv4 form to read
            return lowered
        return _ipv4(lowered) or lowered
    if len(host) > _MAX_HOST:
        return lowered
    name = unquote(host, errors="replace") if "%" in host else host  # as UTF-8, bad bytes as U+FFFD
    if name.isascii():
        name = name.lower()
    else:
        name = _to_ascii(name)
        if not name:
            return lowered
    if not name or any(c in _FORBIDDEN for c in name):
        return lowered
    return _ipv4(name) or name


def _to_ascii(name: str) -> str:
    """UTS #46 ToASCII as browsers run it (no hyphen or length checks), '' where it fails. Labels
    longer than DNS allows are not encoded (punycode's cost grows faster than their length)."""
    if len(name) > _MAX_NAME:
        return ""
    try:
        mapped = idna.uts46_remap(name, std3_rules=False, transitional=False)
    except (idna.IDNAError, ValueError):
        return ""
    labels = mapped.split(".")
    for i, label in enumerate(labels):
        if not label.isascii():
            if len(label) > _MAX_LABEL:
                return ""
            labels[i] = "xn--" + label.encode("punycode").decode("ascii")
    return ".".join(labels)


def _ipv4(host: str) -> str | None:
    """The dotted quad a host "ending in a number" names (WHATWG IPv4 parser: 1 to 4 parts, each
    decimal, 0x-hex or 0-octal, the last filling the remaining bytes), or None: not one (a name), or
    one the browser rejects (left as written)."""
    if host[-1:] not in _NUMBER_END or ":" in host:
        return None
    parts = host.split(".")
    if len(parts) > 1 and not parts[-1]:
        parts.pop()
    last = parts[-1]
    if not (last and last.isdigit() and last.isascii()) and _ipv4_number(last) is None:
        return None  # a name, not an address
    if len(parts) > 4:
        return None
    numbers = [_ipv4_number(p) for p in parts]
    valid = [n for n in numbers if n is not None]
    if len(valid) != len(numbers) or any(n > 255 for n in valid[:-1]) or valid[-1] >= 256 ** (5 - len(valid)):
        return None
    value = valid[-1] + sum(n << (8 * (3 - i)) for i, n in enumerate(valid[:-1]))
    return ".".join(str((value >> shift) & 255) for shift in (24, 16, 8, 0))


def _ipv4_number(part: str) -> int | None:
    if not part:
        return None
    radix = 10
    if len(part) >= 2 and part[:2] in ("0x", "0X"):
        part, radix = part[2:], 16
    elif len(part) >= 2 and part[0] == "0":
        part, radix = part[1:], 8
    m = _DIGITS[radix].fullmatch(part)
    if m is None:
        return None
    digits = m.group(1)
    if len(digits) > 12:  # past any part's range, and int() of a long string is slow (or refused)
        return 1 << 40
    return int(digits or "0", radix)
