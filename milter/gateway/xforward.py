"""Postfix XFORWARD (www.postfix.org/XFORWARD_README.html): parse, keep, and pass on.

Postfix sends, before MAIL FROM, the original client's facts that the filter cannot see on its own
socket: `XFORWARD NAME=mx.example ADDR=192.0.2.1 PROTO=ESMTP HELO=mx.example IDENT=4Xyz SOURCE=REMOTE`.
Values are xtext-encoded (RFC 3461); `[UNAVAILABLE]` and `[TEMPUNAVAIL]` stand for "not known".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace

ATTRIBUTES: tuple[str, ...] = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
UNKNOWN_VALUES = frozenset({"[UNAVAILABLE]", "[TEMPUNAVAIL]"})
# Postfix's smtpd accepts 512-byte command lines; keep each XFORWARD we send well under that.
MAX_LINE = 400

_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")


class XForwardError(ValueError):
    """A malformed XFORWARD command; `reply` is the SMTP answer for it."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def xtext_decode(text: str) -> str:
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if 33 <= code <= 126 and ch not in "+=":
            out.append(ch)
        else:
            # Non-ASCII cannot be xtext; encode its UTF-8 bytes one by one.
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


@dataclass(frozen=True)
class XForward:
    """The XFORWARD attributes received for the current transaction (decoded, as sent)."""

    name: str | None = None
    addr: str | None = None
    port: str | None = None
    proto: str | None = None
    helo: str | None = None
    ident: str | None = None
    source: str | None = None

    def updated(self, arg: str | None) -> XForward:
        """This state plus the attributes of one `XFORWARD` argument string; XForwardError if bad."""
        if not arg:
            raise XForwardError("501 5.5.4 Syntax: XFORWARD attribute=value...")
        values: dict[str, str] = {}
        for item in arg.split():
            key, sep, value = item.partition("=")
            key = key.upper()
            if not sep or key not in ATTRIBUTES:
                raise XForwardError(f"501 5.5.4 Bad XFORWARD attribute name: {key[:32]}")
            decoded = xtext_decode(value)
            if not decoded.isprintable():
                raise XForwardError(f"501 5.5.4 Bad XFORWARD attribute value for {key}")
            values[key.lower()] = decoded
        return replace(self, **values)

    def known(self, attr: str) -> str | None:
        """The attribute's value, or None when absent or [UNAVAILABLE]/[TEMPUNAVAIL]."""
        value: str | None = getattr(self, attr.lower())
        return None if value is None or value.upper() in UNKNOWN_VALUES else value

    @property
    def client_addr(self) -> str | None:
        addr = self.known("ADDR")
        # Postfix writes IPv6 client addresses as "IPV6:2001:db8::1".
        if addr is not None and addr.upper().startswith("IPV6:"):
            addr = addr[5:]
        return addr

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def commands(self, supported: frozenset[str]) -> list[bytes]:
        """Arguments of the XFORWARD commands that pass these attributes on to a downstream
        advertising `supported` (upper-case names); several commands when one would be too long."""
        items = [
            f"{f.name.upper()}={xtext_encode(value)}"
            for f in fields(self)
            if (value := getattr(self, f.name)) is not None and f.name.upper() in supported
        ]
        lines: list[str] = []
        for item in items:
            if lines and len(lines[-1]) + 1 + len(item) <= MAX_LINE:
                lines[-1] += " " + item
            else:
                lines.append(item[:MAX_LINE])
        return [line.encode("ascii") for line in lines]


def advertised(ehlo_params: str) -> frozenset[str]:
    """Attribute names from the parameters of a downstream's `250-XFORWARD NAME ADDR ...` line."""
    return frozenset(p.upper() for p in ehlo_params.split() if p.upper() in ATTRIBUTES)
