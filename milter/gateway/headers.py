"""Header edits on the raw bytes: strip forged `X-Milter-*` fields (and Authentication-Results in our
name), add verdict fields, prefix Subject.

The message is never re-serialised through the `email` package: that would re-fold and re-encode
headers and bodies and break DKIM signatures. Only the header block is touched, line by line; the
body bytes go out exactly as they came in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from email.header import Header

OWN_PREFIX = b"x-milter-"
FOLD_AT = 78
MAX_VALUE = 2000
# The part of a header block that is edited; the rest goes out as it came. This runs on the event
# loop, at about 1.5 us a field: a 4 MB "header block" of bare-CR lines (no blank line anywhere) held
# the loop 4 s. The parser reads the same 256 KiB (parse.Limits.header_bytes).
MAX_EDITED = 256 * 1024
# Control characters (CR and LF above all) in a value would end the field and start a new,
# attacker-chosen one; they become spaces.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")


def split_header_block(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(header block, blank line that ends it, body); a message without a blank line is all header."""
    if raw.startswith((b"\r\n", b"\n")):
        eol = b"\r\n" if raw.startswith(b"\r\n") else b"\n"
        return b"", eol, raw[len(eol) :]
    # The earliest empty line ends the header block, whichever line ending the message uses.
    ends = [(pos, blank) for blank in (b"\r\n\r\n", b"\n\n") if (pos := raw.find(blank)) >= 0]
    if ends:
        end, blank = min(ends)
        eol = blank[: len(blank) // 2]
        return raw[: end + len(eol)], eol, raw[end + len(blank) :]
    return raw, b"", b""


def header_fields(block: bytes) -> list[bytes]:
    """Header fields, each with its continuation lines and line endings."""
    # Lines gathered per field and joined once: `field += line` copied the whole field for every
    # continuation line, and this runs on the event loop. A 1.8 MB header of 300,000 folded lines
    # (tests/hostile.py header-1mb-folded) held a worker's loop for 9 to 240 s (bench/rss.py).
    parts: list[list[bytes]] = []
    for line in block.splitlines(keepends=True):
        if parts and line[:1] in (b" ", b"\t"):
            parts[-1].append(line)
        else:
            parts.append([line])
    return [b"".join(p) for p in parts]


def field_name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def line_ending(raw: bytes) -> bytes:
    """The message's own line ending; CRLF (SMTP's) when it has none."""
    first = raw.find(b"\n")
    return b"\n" if first >= 0 and raw[first - 1 : first] != b"\r" else b"\r\n"


def fold(name: str, value: str, eol: bytes = b"\r\n") -> bytes:
    """`Name: value` folded at whitespace near 78 columns, CR/LF-safe; RFC 2047 for non-ASCII."""
    clean = _UNSAFE.sub(" ", value).strip()[:MAX_VALUE]
    if not clean.isascii():
        encoded = Header(clean, "utf-8", header_name=name).encode(linesep=eol.decode())
        return f"{name}: {encoded}".encode("ascii") + eol
    head = f"{name}:"
    lines = [head]
    for word in clean.split():
        if len(lines[-1]) + 1 + len(word) > FOLD_AT and lines[-1] != head:
            lines.append("")  # continuation line: starts with the space added below
        lines[-1] += " " + word
    return eol.join(line.encode("ascii") for line in lines) + eol


def _prefixed_subject(field: bytes, prefix: bytes) -> bytes:
    name, _, value = field.partition(b":")
    stripped = value.lstrip(b" \t")
    if stripped.startswith(prefix.rstrip()):
        return field  # already tagged on an earlier pass: don't stack prefixes
    return name + b": " + prefix + stripped


def forged(field: bytes, authserv_id: bytes | None) -> bool:
    name = field_name(field)
    if name.startswith(OWN_PREFIX):
        return True
    if authserv_id is None or name != b"authentication-results":
        return False
    # RFC 8601 section 5: remove results that claim to be ours; the authserv-id is the value's first
    # token, before any ';', CFWS or version number.
    value = field.split(b":", 1)[1].split(b";", 1)[0]
    tokens = value.replace(b"(", b" ").split()
    return bool(tokens) and tokens[0].lower() == authserv_id


def rewrite(
    raw: bytes,
    add: Sequence[tuple[str, str]] = (),
    subject_prefix: str | None = None,
    authserv_id: str | None = None,
) -> bytes:
    """The message with incoming `X-Milter-*` fields (and Authentication-Results carrying our
    `authserv_id`) removed, `add` fields on top, Subject prefixed."""
    block, blank, body = split_header_block(raw)
    eol = line_ending(raw)
    rest = b""
    if len(block) > MAX_EDITED:  # past it, fields are neither stripped nor edited: bytes as they came
        cut = block.rfind(b"\n", 0, MAX_EDITED) + 1
        # at a field's start, not inside one: a field cut through and removed as forged left its
        # continuation lines behind, joined to the field before (ours, when all before it were forged)
        while 0 < cut < len(block) and block[cut : cut + 1] in (b" ", b"\t"):
            cut = block.rfind(b"\n", 0, cut - 1) + 1
        block, rest = block[:cut], block[cut:]
    own_id = authserv_id.lower().encode("ascii", "replace") if authserv_id else None
    kept = [f for f in header_fields(block) if not forged(f, own_id)]
    if subject_prefix:
        prefix = _prefix_bytes(subject_prefix)
        subjects = [i for i, f in enumerate(kept) if field_name(f) == b"subject"]
        if subjects:
            kept[subjects[0]] = _prefixed_subject(kept[subjects[0]], prefix)
        else:
            kept.append(b"Subject: " + prefix.rstrip() + eol)
    if kept and not kept[-1].endswith(b"\n") and not rest:
        kept[-1] += eol  # a header-only message whose last line had no ending
    added = b"".join(fold(name, value, eol) for name, value in add)
    if rest:
        return added + b"".join(kept) + rest + blank + body
    return added + b"".join(kept) + (blank or eol) + body


def _prefix_bytes(prefix: str) -> bytes:
    clean = _UNSAFE.sub(" ", prefix).strip()
    if not clean.isascii():
        clean = Header(clean, "utf-8").encode()
    return clean.encode("ascii") + b" "
