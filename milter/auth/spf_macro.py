"""SPF macros (RFC 7208 section 7) in the domain-specs of include, a, mx, ptr, exists and redirect.

`expand` turns a macro-string into text, `expand_domain` also checks the domain-end the grammar asks for
and shortens an over-long result. Both raise `MacroError` (a ValueError) on any syntax error; the SPF
evaluation turns that into permerror. The letters c, r and t are only valid in exp= explanations,
which we never produce, so here they are errors too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from urllib.parse import quote

_MAX_DOMAIN = 253
_PART = re.compile(
    r"%\{(?P<letter>[a-z])(?P<digits>\d*)(?P<reverse>r?)(?P<delimiters>[.\-+,/_=]*)\}"
    r"|%(?P<escape>[%_-])"
    r"|(?P<literal>[\x21-\x24\x26-\x7e]+)",
    re.IGNORECASE,
)
_ESCAPES = {"%": "%", "_": " ", "-": "%20"}
# domain-end: "." toplabel ["."] (a toplabel is not all digits), or a macro-expand
_DOMAIN_END = re.compile(
    r"(?:\.(?:[a-z0-9]*[a-z][a-z0-9]*|[a-z0-9]+-[a-z0-9-]*[a-z0-9])\.?|%\{[^}]*\}|%[%_-])\Z", re.IGNORECASE
)


class MacroError(ValueError):
    """A domain-spec that is not valid macro syntax (the evaluation's permerror)."""


@dataclass(frozen=True)
class MacroContext:
    """What the macro letters stand for: the client `ip`, the sender's `local` part and domain
    (`sender_domain`, %{o}), the `domain` being checked (%{d}) and the `helo` name (%{h})."""

    ip: IPv4Address | IPv6Address
    local: str
    sender_domain: str
    domain: str
    helo: str

    def value(self, letter: str) -> str:
        """The unexpanded value of one macro letter (lower case); MacroError for c, r, t and others."""
        values = {
            "s": f"{self.local}@{self.sender_domain}",
            "l": self.local,
            "o": self.sender_domain,
            "d": self.domain,
            "i": _dotted(self.ip),
            "p": "unknown",  # we never look up PTR (see milter.auth.spf_check)
            "h": self.helo,
            "v": "in-addr" if self.ip.version == 4 else "ip6",
        }
        if letter not in values:
            raise MacroError(f"macro letter {letter!r} not allowed in a domain-spec")
        return values[letter]


def _dotted(ip: IPv4Address | IPv6Address) -> str:
    """%{i}: the dotted quad, or for IPv6 the 32 nibbles dotted (2001:db8::1 -> 2.0.0.1.0.d.b.8...)."""
    return str(ip) if ip.version == 4 else ".".join(ip.exploded.replace(":", ""))


def expand(spec: str, ctx: MacroContext) -> str:
    """`spec` (a macro-string) with every macro replaced."""
    out: list[str] = []
    pos = 0
    while pos < len(spec):
        part = _PART.match(spec, pos)
        if part is None:
            raise MacroError(f"invalid macro syntax at {spec[pos:pos + 12]!r}")
        pos = part.end()
        if part["literal"] is not None:
            out.append(part["literal"])
        elif part["escape"] is not None:
            out.append(_ESCAPES[part["escape"]])
        else:
            out.append(_macro(part, ctx))
    return "".join(out)


def _macro(part: re.Match[str], ctx: MacroContext) -> str:
    letter = part["letter"]
    pieces = re.split("[" + re.escape(part["delimiters"] or ".") + "]", ctx.value(letter.lower()))
    if part["reverse"]:
        pieces.reverse()
    if part["digits"]:
        keep = int(part["digits"])
        if keep == 0:
            raise MacroError("macro digit transformer must not be zero")
        pieces = pieces[-keep:]
    text = ".".join(pieces)
    return quote(text, safe="-._~") if letter.isupper() else text  # upper-case letter: URL-escaped


def expand_domain(spec: str, ctx: MacroContext) -> str:
    """A domain-spec expanded; left-hand labels dropped while it is longer than 253 characters."""
    if _DOMAIN_END.search(spec) is None:
        raise MacroError(f"domain-spec {spec[:40]!r} does not end in a top label or a macro")
    domain = expand(spec, ctx)
    while len(domain.rstrip(".")) > _MAX_DOMAIN and "." in domain:
        domain = domain.partition(".")[2]
    return domain
