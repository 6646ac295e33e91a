"""Raw bytes -> `ParsedMessage`: the one place the stdlib `email` package is called.

Parsing never raises: a message the parser chokes on still yields a `ParsedMessage` whose `defects`
say what went wrong, so malformed mail becomes a feature instead of a crash.

Line endings are normalised first: in the corpora they identify the source, not the message.
Header values are read raw (`raw_items`) and decoded only where needed, because the `policy.default`
header registry is slow and we only need a handful of headers.

Every message is read under per-message budgets (`Limits`): the stdlib parser costs per line, per
header line and, for each line, per enclosing multipart boundary, so a crafted message (1,000 nested
multiparts, 100,000 headers, 10,000 parts, a 20 MB body of one-byte lines) took seconds to minutes.
`trim` cuts the input to the budgets *before* the parser sees it, in C-speed passes over the bytes, so
the worst case is linear and small; a budget that cut in is recorded as a `Budget*` defect, which is
a feature (`mime_defects`) and a reason, because a message that hits the limits is itself a signal.
No corpus message under the limits reads differently: they are set far above real mail.

What is read of the parsed message afterwards is linear too, with the stdlib's results: MIME parameters
(`split_params`) and RFC 2047 encoded words that never end (`decode_words`; `MAX_RESCAN`, a
`BudgetEncodedWords` defect, bounds what is left). tests/test_slow_inputs.py holds each such slow path.
"""

from __future__ import annotations

import email.header
import email.utils
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import EmailPolicy

MAX_BODY_CHARS = 200_000  # per kind (text / html); enough for features, bounded cost
MAX_PARTS = 300


@dataclass(frozen=True)
class Limits:
    """What the parser reads of one message at most. Each bound caps one cost of the stdlib parser,
    measured (bench/fuzz.py); real mail stays far below (of 65,669 corpus messages, one is over
    `parse_bytes` and none is over any other bound)."""

    parse_bytes: int = 4 * 1024 * 1024  # the rest of a bigger message is not parsed (attachments' tails)
    parse_lines: int = 100_000  # the parser's cost is per line: 4 MB of base64 is 54,000
    header_lines: int = 2_000  # top-level header block, continuation lines included
    header_bytes: int = 256 * 1024  # top-level header block
    multiparts: int = 100  # boundary declarations: the parser tests every line against every open one
    delimiters: int = 1_000  # boundary lines ("--" + a declared boundary): parts the parser builds
    header_value: int = 64 * 1024  # characters kept of one header value (Postfix's limit is 100 kB)
    address_value: int = 4 * 1024  # characters of an address header parsed for addresses
    # Elements an HTML parser keeps open: lexbor's tree builder scans its stack of open elements for
    # each start tag, so 40,000 nested <div>s took 6 s; 2,048 and then 60,000 more tags take ~0.1 s.
    # Spam nests deep by accident (1,153 open "<name@host>" elements in one Enron message).
    html_depth: int = 2048


LIMITS = Limits()


def split_params(value: str) -> list[str]:
    """`email.message._parseparam` in linear time: the same list for every input.

    The stdlib's splitter re-counts the quotes from the start of the rest for every ';' it meets and
    copies the rest for every parameter, so a ';' per byte inside one open quote cost n^2: a 100 kB
    part header line took 5 s, 400 kB 97 s (parts' header lines are not in any budget, and a cut top-level
    value is still the whole one in the parser's `Message`). Here the quote count runs on from the last
    ';' (a '\\"' pair cannot straddle a ';', so the counts add up) and the rest is never copied.
    """
    out: list[str] = []
    start = 0  # the stdlib's `s` is value[start:] after each ';' it drops
    n = len(value)
    while True:
        end = value.find(";", start)
        open_quotes, counted = 0, start
        # a ';' at the very start of the rest ends the parameter even inside quotes, as in the stdlib
        while end > start:
            open_quotes += value.count('"', counted, end) - value.count('\\"', counted, end)
            if open_quotes % 2 == 0:
                break
            counted = end
            end = value.find(";", end + 1)
        if end < 0:
            end = n
        out.append(_param(value[start:end]))
        if end >= n:
            return out
        start = end + 1


def _param(f: str) -> str:
    if "=" in f:
        i = f.index("=")
        f = f[:i].strip().lower() + "=" + f[i + 1 :].strip()
    return f.strip()


class _LinearParamsMessage(EmailMessage):
    """The parser's message class: every parameter read (the parser's own `get_boundary`, our charset
    and filename reads) goes through `_get_params_preserve`; only its splitter is replaced."""

    def _get_params_preserve(self, failobj: object, header: str) -> object:
        missing = object()
        value = self.get(header, missing)
        if value is missing:
            return failobj
        params: list[tuple[str, str]] = []
        for p in split_params(str(value)):
            name, eq, val = p.partition("=")
            params.append((name.strip(), val.strip()) if eq else (p.strip(), ""))
        return email.utils.decode_params(params)


class _RawHeaderPolicy(EmailPolicy):
    """policy.default, except header values are handed back as raw strings.

    The header registry parses every Content-Type it is asked for (the parser itself asks once per
    part): that was 70% of the parse time, about 5 ms a message. We read the few headers we need raw
    and decode them ourselves (`decode_words`, `email.utils.getaddresses`).
    """

    def header_fetch_parse(self, name: str, value: str) -> str:  # type: ignore[override]
        return value


_PARSER = BytesParser(policy=_RawHeaderPolicy(message_factory=_LinearParamsMessage))


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    size: int
    head: bytes  # first bytes of the decoded payload (magic numbers)


@dataclass(frozen=True)
class ParsedMessage:
    headers: tuple[tuple[str, str], ...]  # (lower-cased name, raw unfolded value), top level only
    subject: str
    text: str  # decoded text/plain parts, joined
    html: str  # decoded text/html parts, joined
    attachments: tuple[Attachment, ...]
    content_types: tuple[str, ...]  # every part's content type, in walk order
    max_depth: int
    defects: tuple[str, ...]
    raw_size: int  # bytes after the header block, line endings normalised
    # A multipart/digest holds a part that is no message (RFC 2046 5.1.5: a digest's parts are messages;
    # spam nests its HTML in one to slip past filters that skip digests). For the policy, not the model.
    odd_digest: bool = False

    def get(self, name: str) -> str | None:
        """First value of a header (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def addresses(self, name: str) -> list[tuple[str, str]]:
        """(display name decoded, addr-spec lower-cased) pairs of an address header."""
        # getaddresses is super-linear on long quoted strings and comments: parse a bounded prefix
        values = [v[: LIMITS.address_value] for v in self.get_all(name)]
        if not values:
            return []
        try:
            pairs = _getaddresses(values)
        except Exception:  # the stdlib raises odd errors on odd input; treat as no address
            return []
        return [(decode_words(disp), _clean(addr).lower()) for disp, addr in pairs if disp or addr]


def _getaddresses(values: list[str]) -> list[tuple[str, str]]:
    """`email.utils.getaddresses` with the same (lenient) result on every Python 3.11+.

    The CVE-2023-27043 fix made it strict, and patched builds (Debian's 3.11.2, CPython >= 3.11.10)
    return no address where older ones return the parts: the same message would get other features
    on another patch release than the model was trained on. `strict=False` keeps the old parsing.
    """
    try:
        return email.utils.getaddresses(values, strict=False)  # type: ignore[call-arg]
    except TypeError:  # a release without the `strict` parameter parses leniently already
        return email.utils.getaddresses(values)


# RFC 2047 decoding, in linear time with the stdlib's result. `email.header.decode_header`'s regex reads
# from each "=?" to the first "?=" after it (on its line); a start that has none reads to the line's end
# and fails, so n of them on one line cost n^2: an unterminated 256 kB filename took 33 s, a 64 kB Subject
# 2 s. Such a start can never match and its text is kept as written, so it is disarmed before the call (a
# stand-in character between "=" and "?", removed from the result) and the result stays the same.

#: Characters the regex may still scan in vain for one value (`rescan_cost`, ~8 ms). Only hostile values
#: keep such starts: lines also split at a character other than "\n" (decode_header splits at \x1c too,
#: its regex reads over it), or every stand-in used. Past it, the value is kept undecoded (a
#: `BudgetEncodedWords` defect); no corpus value comes near it.
MAX_RESCAN = 2_000_000
#: ASCII controls that are neither space nor a line break to `str` (a us-ascii round trip keeps them).
_STAND_INS = tuple(map(chr, (*range(0x00, 0x09), *range(0x0E, 0x1C), 0x7F)))


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words; undecodable input comes back as readable text."""
    if "=?" not in value:
        return _clean(value)
    armed, stand_in = _disarm(value)
    if stand_in and rescan_cost(armed) <= MAX_RESCAN:
        decoded = _decode_header(armed)
        if decoded is None:
            return _clean(value)
        if decoded.count(stand_in) == armed.count(stand_in):  # none came out of an encoded word
            return _clean(decoded.replace(stand_in, ""))
    if rescan_cost(value) > MAX_RESCAN:
        return _clean(value)
    decoded = _decode_header(value)
    return _clean(value if decoded is None else decoded)


def words_over_budget(value: str) -> bool:
    """Whether `decode_words` keeps `value` undecoded because decoding it would cost too much."""
    if "=?" not in value:
        return False
    armed, stand_in = _disarm(value)
    return not (stand_in and rescan_cost(armed) <= MAX_RESCAN) and rescan_cost(value) > MAX_RESCAN


def _decode_header(value: str) -> str | None:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:  # bad charsets, broken base64: the caller keeps the raw text
        return None


def _disarm(value: str) -> tuple[str, str]:
    """`value` with a stand-in character between the "=" and "?" of each encoded-word start that cannot
    match, and that character ("" when no start needed it, or every stand-in occurs in `value`).

    A start cannot match when no "?=" follows its "=?charset?q?" before the next "\n" (the regex's `.`
    stops there; its charset may run over one, so a start is judged by where that part ends). Each
    `find` below only moves forward, so this reads `value` a few times, whatever it holds.
    """
    cut: list[int] = []  # where a stand-in goes
    end = len(value)
    close = newline = -1  # the first "?=" / "\n" at or after the last start's code: reused until passed
    at = value.find("=?")
    while at >= 0:
        mark = value.find("?", at + 2)  # the charset ends at the first "?"
        if mark >= 0 and value[mark + 1 : mark + 3] in ("q?", "Q?", "b?", "B?"):
            text = mark + 3  # the encoded text starts here, up to the first "?=" on this line
            if close < text:
                close = _find(value, "?=", text)
            if newline < text:
                newline = _find(value, "\n", text)
            if close >= newline:
                cut.append(at + 1)
        at = value.find("=?", at + 2)
    stand_in = next((c for c in _STAND_INS if c not in value), "") if cut else ""
    if not stand_in:
        return value, ""
    bounds = [0, *cut, end]
    return stand_in.join(value[a:b] for a, b in itertools.pairwise(bounds)), stand_in


def _find(value: str, sub: str, start: int) -> int:
    """`value.find`, with len(value) for none."""
    found = value.find(sub, start)
    return len(value) if found < 0 else found


_START = re.compile(r"=\?[^?]*\?[qQbB]\?")  # the start of an encoded word, as decode_header's regex reads it


def rescan_cost(value: str) -> int:
    """How many characters `email.header.decode_header` scans in vain on `value`, give or take a half:
    from each start after its line's last "?=" (one with a "?=" after it matches and is consumed) to the
    line's end."""
    cost = 0
    for line in value.splitlines():  # as decode_header splits
        tail = line[line.rfind("?=") + 2 :] if "?=" in line else line
        cost += sum(1 for _ in _START.finditer(tail)) * len(tail)
    return cost


def _clean(value: str) -> str:
    # surrogateescape'd 8-bit bytes from the parser become U+FFFD so they never break encoding later
    return value.encode("utf-8", "replace").decode("utf-8").replace("\r", "").replace("\n", " ").strip()


# Defanged links ("hxxps://evil[.]example"), as security teams and the cw-l corpus's redaction tool write
# them: a reader's client shows them as links to follow, and a corpus that defangs only its spam would
# otherwise teach "no links" as a spam trait. Refanged before any feature sees the bytes. One pattern
# per token, each run only where its literal occurs: a single case-insensitive alternation has no
# literal prefix for the regex engine to skip ahead with, and took 40 ms a megabyte.
_HXXP = re.compile(rb"(?i)\bhxxp(s?)(?:\[:\]|:)//")
_DOT_WORD = re.compile(rb"\[(?i:dot)\]")


def _refang(match: re.Match[bytes]) -> bytes:
    return b"http" + match.group(1) + b"://"


def normalise(raw: bytes) -> bytes:
    """Line endings unified and defanged links refanged: both say where a message was collected."""
    data = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if b"xxp" in data or b"XXP" in data or b"xxp" in data.lower():
        data = _HXXP.sub(_refang, data)
    if b"[" in data:
        data = _DOT_WORD.sub(b".", data.replace(b"[.]", b"."))
    return data.replace(b"(.)", b".") if b"(.)" in data else data


def parse(raw: bytes, limits: Limits = LIMITS) -> ParsedMessage:
    # CRLF -> LF at most halves the size, so twice the budget of raw bytes holds every byte the budget
    # can keep; what lies beyond is only counted (normalising 25 MB costs more than parsing 4).
    head, tail = raw[: 2 * limits.parse_bytes], raw[2 * limits.parse_bytes :]
    data = normalise(head)
    straddles = head.endswith(b"\r") and tail.startswith(b"\n")  # one CRLF, split by the slice
    raw_size = _body_size(data) + len(tail) - tail.count(b"\r\n") - straddles
    data, cuts = trim(data, limits)
    if tail:
        cuts = ("BudgetBytes", *cuts) if "BudgetBytes" not in cuts else cuts
    try:
        msg = _PARSER.parsebytes(data)
    except Exception as exc:  # pragma: no cover - the feed parser is very tolerant
        return _fallback(data, (f"ParseFailure:{type(exc).__name__}", *cuts), raw_size, limits)
    try:
        return _from_message(msg, raw_size, cuts, limits)
    except RecursionError:
        return _fallback(data, ("RecursionLimit", *cuts), raw_size, limits)
    except Exception as exc:
        return _fallback(data, (f"WalkFailure:{type(exc).__name__}", *cuts), raw_size, limits)


def trim(data: bytes, limits: Limits = LIMITS) -> tuple[bytes, tuple[str, ...]]:
    """`data` (normalised) cut to the budgets, and the names of the budgets that cut.

    The top-level header block keeps its first lines (and its end, so the body still follows a blank
    line); the body is cut at the first point where any budget runs out. Each test is a count or a
    search in C over the bytes; only a budget already exceeded is located line by line.
    """
    cuts: list[str] = []
    end = data.find(b"\n\n")
    head_end = end + 1 if end >= 0 else len(data)
    if head_end > limits.header_bytes or data.count(b"\n", 0, head_end) > limits.header_lines:
        keep = _line_start(data, min(head_end, limits.header_bytes))
        keep = min(keep, _after_nth(data, b"\n", limits.header_lines, keep))
        data = data[:keep] + data[head_end:]
        head_end = keep
        cuts.append("BudgetHeaderBlock")
    cut = len(data)
    if cut > limits.parse_bytes:
        cut = _line_start(data, limits.parse_bytes)
        cuts.append("BudgetBytes")
    if data.count(b"\n", head_end, cut) > limits.parse_lines:
        cut = _after_nth(data, b"\n", limits.parse_lines, cut, head_end)
        cuts.append("BudgetLines")
    multiparts = _nth_find(data[:cut].lower(), b"boundary", limits.multiparts + 1, 0, cut)
    # The delimiters counted are those of the boundaries declared before the multiparts cut, at most
    # `multiparts` of them: one regex of every "boundary=" in 4 MB (body text too) took seconds to compile.
    declared = cut if multiparts is None else _line_start(data, multiparts + 1)
    delimiters = _nth_boundary_line(data, limits.delimiters + 1, max(head_end - 1, 0), cut, declared)
    for name, at in (("BudgetMultiparts", multiparts), ("BudgetDelimiters", delimiters)):
        if at is not None:  # cut before the line that holds the occurrence
            cut = min(cut, _line_start(data, at + 1))
            cuts.append(name)
    return (data if cut == len(data) else data[:cut]), tuple(cuts)


def _line_start(data: bytes, pos: int) -> int:
    """The start of the line holding `pos` (a cut never splits a line)."""
    return data.rfind(b"\n", 0, pos) + 1


_BOUNDARY = re.compile(rb'boundary\s*=\s*"?(?=([^"\s;]{1,200}))')


def _nth_boundary_line(data: bytes, n: int, start: int, end: int, declared: int) -> int | None:
    """Where the n-th line in data[start:end] that opens or closes a boundary declared in data[:declared]
    starts (its newline), or None.

    Lines starting "--" that are no boundary (patches, signatures) cost the parser nothing extra,
    so they are not counted: counted in C first, and only a message with that many is looked at
    closer, with the boundaries it declares.
    """
    if data.count(b"\n--", start, end) < n:
        return None
    # found in the lower-cased copy (a literal prefix the regex engine skips to), read in the original
    names = {data[m.end() : m.end() + len(m.group(1))] for m in _BOUNDARY.finditer(data[:declared].lower())}
    if not names:
        return None
    alternatives = b"|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    for i, m in enumerate(re.compile(rb"\n--(?:" + alternatives + rb")").finditer(data, start, end), 1):
        if i == n:
            return m.start()
    return None


def _after_nth(data: bytes, sub: bytes, n: int, end: int, start: int = 0) -> int:
    """The position just after the n-th `sub` in data[start:end], or `end` if there are fewer."""
    pos = start
    for _ in range(n):
        found = data.find(sub, pos, end)
        if found < 0:
            return end
        pos = found + len(sub)
    return pos


def _nth_find(data: bytes, sub: bytes, n: int, start: int, end: int) -> int | None:
    """Where the n-th `sub` in data[start:end] starts, or None if there are fewer (counted in C first)."""
    if data.count(sub, max(start, 0), end) < n:
        return None
    return _after_nth(data, sub, n, end, max(start, 0)) - len(sub)


def _from_message(msg: Message, raw_size: int, cuts: tuple[str, ...], limits: Limits) -> ParsedMessage:
    defects: set[str] = set(cuts)
    headers = _headers(msg.raw_items(), limits, defects)
    text: list[str] = []
    html: list[str] = []
    attachments: list[Attachment] = []
    ctypes: list[str] = []
    max_depth = 0
    odd_digest = False
    # (part, depth, inside an attached message): the text of a message quoted whole (a bounce's copy of
    # what it returns, a forwarded .eml) is not this message's body: a bounce of spam is no spam.
    stack: list[tuple[Message, int, bool]] = [(msg, 0, False)]
    walked = 0
    while stack and walked < MAX_PARTS:
        walked += 1
        part, depth, quoted = stack.pop()
        max_depth = max(max_depth, depth)
        ctype = part.get_content_type()
        if not quoted:  # the quoted message's structure is not this message's either
            ctypes.append(ctype)
        if part.is_multipart():
            payload = part.get_payload()
            inner = quoted or ctype.startswith("message/")
            if isinstance(payload, list):
                stack.extend((p, depth + 1, inner) for p in reversed(payload) if isinstance(p, Message))
                if ctype == "multipart/digest" and not quoted:
                    odd_digest = odd_digest or any(_not_a_message(p) for p in payload)
        elif quoted:
            _leaf(part, ctype, [], [], attachments, defects)
        else:
            _leaf(part, ctype, text, html, attachments, defects)
        # read after decoding: get_payload(decode=True) records base64 defects on the part
        defects.update(type(d).__name__ for d in part.defects)
    if stack:
        defects.add("TooManyParts")
    raw_subject = next((v for k, v in headers if k == "subject"), "")
    _check_words(raw_subject, defects)
    subject = decode_words(raw_subject)
    markup = _html_budget("\n".join(html)[:MAX_BODY_CHARS], limits, defects)
    return ParsedMessage(
        headers=headers,
        subject=subject,
        text="\n".join(text)[:MAX_BODY_CHARS],
        html=markup,
        attachments=tuple(attachments),
        content_types=tuple(ctypes),
        max_depth=max_depth,
        defects=tuple(sorted(defects)),
        raw_size=raw_size,
        odd_digest=odd_digest,
    )


def _not_a_message(part: object) -> bool:
    """A digest's part that is not a message (its default type is message/rfc822: RFC 2046 5.1.5)."""
    return not isinstance(part, Message) or not part.get_content_type().startswith("message/")


def _leaf(
    part: Message,
    ctype: str,
    text: list[str],
    html: list[str],
    attachments: list[Attachment],
    defects: set[str],
) -> None:
    filename = _filename(part, defects)
    disposition = (part.get_content_disposition() or "").lower()
    is_body = not filename and disposition != "attachment" and ctype in ("text/plain", "text/html")
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        defects.add("UndecodablePayload")
        payload = b""
    if not isinstance(payload, bytes):
        payload = b""
    if is_body and _binary(payload, part):
        defects.add("BinaryText")  # then an attachment: its bytes are no words of the message
        is_body = False
    if is_body:
        (html if ctype == "text/html" else text).append(_decode_text(part, payload, defects))
        return
    if ctype.startswith("message/"):
        # an attached message: its own payload is parsed as a part above when multipart-like
        attachments.append(Attachment(filename or "message.eml", ctype, len(payload), payload[:16]))
        return
    attachments.append(Attachment(filename, ctype, len(payload), payload[:16]))


#: File signatures of images, archives and documents: a "text" part that starts with one is that file.
_BINARY_MAGIC = (b"\x89PNG\r\n", b"GIF87a", b"GIF89a", b"\xff\xd8\xff", b"%PDF-", b"PK\x03\x04", b"\x1f\x8b",
                 b"\xd0\xcf\x11\xe0", b"Rar!", b"7z\xbc\xaf")
_WIDE_CHARSETS = ("utf-16", "utf-32", "ucs-2", "ucs-4")


def _binary(payload: bytes, part: Message) -> bool:
    """A text/plain or text/html part that holds a file: a bounce whose "text" is a base64 PNG (sisimai's
    corpus) read as 512 words of garbage and was quarantined as spam. A file signature at the start, or
    a tenth or more NUL bytes in text not declared UTF-16 or UTF-32 (whose NULs are half of every ASCII
    letter). A text/html part is a file only by its signature: NULs cannot tell, because a mail client's
    HTML tokenizer drops or replaces them and shows the rest, so 600 NULs in a comment at the top hid
    the HTML's words, links and forms from the features (no text/html part of the corpora is NUL-heavy)."""
    if payload.startswith(_BINARY_MAGIC):
        return True
    head = payload[:4096]
    # a stray NUL is obfuscation inside real text (194 Enron spam have a few); a file has many
    if not head or head.count(b"\x00") * 10 < len(head):
        return False
    if part.get_content_type() == "text/html":  # asked only here: a NUL-heavy part is rare
        return False
    try:
        charset = (part.get_content_charset() or "").lower()
    except Exception:
        charset = ""
    return not charset.startswith(_WIDE_CHARSETS)


def _filename(part: Message, defects: set[str]) -> str:
    try:
        name = str(part.get_filename() or "")
    except Exception:
        return ""
    _check_words(name, defects)
    return decode_words(name)


def _check_words(value: str, defects: set[str]) -> None:
    if words_over_budget(value):
        defects.add("BudgetEncodedWords")


def _decode_text(part: Message, payload: bytes, defects: set[str]) -> str:
    charset = "utf-8"
    try:
        charset = part.get_content_charset() or "us-ascii"
        return payload.decode(charset, "replace")
    except LookupError:
        defects.add("UnknownCharset")
    except Exception:
        defects.add("UndecodableText")
    return payload.decode("latin-1")  # every byte decodes; better than losing the text


# Start and end tags, and the elements a parser closes by itself or never opens (void elements, and
# those whose end tag may be left out): they do not deepen the tree, so they are not counted.
_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9]*)")
_NOT_NESTING = frozenset((
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr",
    "param", "keygen", "p", "li", "td", "th", "tr", "option", "optgroup", "dd", "dt", "tbody", "thead",
    "tfoot", "colgroup", "caption", "rb", "rp", "rt", "rtc", "html", "head", "body",
))


def _html_budget(html: str, limits: Limits, defects: set[str]) -> str:
    """`html` cut before the tag that would nest elements deeper than `limits.html_depth`."""
    if html.count("<") - 2 * html.count("</") <= limits.html_depth:  # opens - closes: no deeper than this
        return html
    depth = 0
    for m in _TAG.finditer(html):
        if m.group(2).lower() in _NOT_NESTING:
            continue
        depth = max(depth - 1, 0) if m.group(1) else depth + 1
        if depth > limits.html_depth:
            defects.add("BudgetHtmlDepth")
            return html[: m.start()]
    return html


def _headers(
    items: Iterable[tuple[str, object]], limits: Limits, defects: set[str]
) -> tuple[tuple[str, str], ...]:
    out = []
    for key, value in items:
        text = _unfold(value)
        if len(text) > limits.header_value:
            text = text[: limits.header_value]
            defects.add("BudgetHeaderValue")
        out.append((key.lower(), text))
    return tuple(out)


def _body_size(data: bytes) -> int:
    """Size after the header block: trace headers added in transit (and CRLF) must not change it."""
    end = data.find(b"\n\n")
    return len(data) - end - 2 if end >= 0 else 0


def _unfold(value: object) -> str:
    return str(value).replace("\r", "").replace("\n", "")


def _fallback(data: bytes, defects: tuple[str, ...], raw_size: int, limits: Limits) -> ParsedMessage:
    """Best effort for input the parser could not walk: split the header block by hand."""
    head, _, body = data.partition(b"\n\n")
    headers: list[tuple[str, list[str]]] = []
    for line in head.decode("latin-1").split("\n"):
        if line[:1] in (" ", "\t") and headers:
            headers[-1][1].append(line.strip())  # joined once below: += here was quadratic
        elif ":" in line:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), [value.strip()]))
    found: set[str] = set(defects)
    fields = _headers(((name, " ".join(parts)) for name, parts in headers), limits, found)
    subject = next((v for k, v in fields if k == "subject"), "")
    return ParsedMessage(
        headers=fields,
        subject=decode_words(subject),
        text=body[:MAX_BODY_CHARS].decode("utf-8", "replace"),
        html="",
        attachments=(),
        content_types=("text/plain",),
        max_depth=0,
        defects=tuple(sorted(found)),
        raw_size=raw_size,
    )
