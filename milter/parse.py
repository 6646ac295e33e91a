"""Raw bytes -> `ParsedMessage`: the one place the stdlib `email` package is called.

Parsing never raises: a message the parser chokes on still yields a `ParsedMessage` whose `defects`
say what went wrong, so malformed mail becomes a feature instead of a crash.

Line endings are normalised first: in the corpora they identify the source, not the message.
Header values are read raw (`raw_items`) and decoded only where needed, because the `policy.default`
header registry is slow and we only need a handful of headers.
"""

from __future__ import annotations

import email.header
import email.utils
import re
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from email.policy import EmailPolicy

MAX_BODY_CHARS = 200_000  # per kind (text / html); enough for features, bounded cost
MAX_PARTS = 300


class _RawHeaderPolicy(EmailPolicy):
    """policy.default, except header values are handed back as raw strings.

    The header registry parses every Content-Type it is asked for (the parser itself asks once per
    part): that was 70% of the parse time, about 5 ms a message. We read the few headers we need raw
    and decode them ourselves (`decode_words`, `email.utils.getaddresses`).
    """

    def header_fetch_parse(self, name: str, value: str) -> str:  # type: ignore[override]
        return value


_PARSER = BytesParser(policy=_RawHeaderPolicy())


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
        values = self.get_all(name)
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


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words; undecodable input comes back as readable text."""
    if "=?" not in value:
        return _clean(value)
    try:
        return _clean(str(email.header.make_header(email.header.decode_header(value))))
    except Exception:  # bad charsets, broken base64: keep the raw text
        return _clean(value)


def _clean(value: str) -> str:
    # surrogateescape'd 8-bit bytes from the parser become U+FFFD so they never break encoding later
    return value.encode("utf-8", "replace").decode("utf-8").replace("\r", "").replace("\n", " ").strip()


# Defanged links ("hxxps://evil[.]example"), as security teams and the cw-l corpus's redaction tool write
# them: a reader's client shows them as links to follow, and a corpus that defangs only its spam would
# otherwise teach "no links" as a spam trait. Refanged before any feature sees the bytes.
_DEFANGED = re.compile(rb"(?i)\bhxxp(s?)(?:\[:\]|:)//|\[\.\]|\(\.\)|\[dot\]")


def _refang(match: re.Match[bytes]) -> bytes:
    token = match.group(0)
    if token[:1] in (b"h", b"H"):
        return b"http" + match.group(1) + b"://"
    return b"."


def normalise(raw: bytes) -> bytes:
    """Line endings unified and defanged links refanged: both say where a message was collected."""
    data = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return _DEFANGED.sub(_refang, data) if b"xxp" in data or b"[" in data or b"(.)" in data else data


def parse(raw: bytes) -> ParsedMessage:
    data = normalise(raw)
    try:
        msg = _PARSER.parsebytes(data)
    except Exception as exc:  # pragma: no cover - the feed parser is very tolerant
        return _fallback(data, f"ParseFailure:{type(exc).__name__}")
    try:
        return _from_message(msg, _body_size(data))
    except RecursionError:
        return _fallback(data, "RecursionLimit")
    except Exception as exc:
        return _fallback(data, f"WalkFailure:{type(exc).__name__}")


def _from_message(msg: Message, raw_size: int) -> ParsedMessage:
    headers = tuple((k.lower(), _unfold(v)) for k, v in msg.raw_items())
    defects: set[str] = set()
    text: list[str] = []
    html: list[str] = []
    attachments: list[Attachment] = []
    ctypes: list[str] = []
    max_depth = 0
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
        elif quoted:
            _leaf(part, ctype, [], [], attachments, defects)
        else:
            _leaf(part, ctype, text, html, attachments, defects)
        # read after decoding: get_payload(decode=True) records base64 defects on the part
        defects.update(type(d).__name__ for d in part.defects)
    if stack:
        defects.add("TooManyParts")
    subject = decode_words(_unfold(msg.get("subject", "") or "")) if "subject" in msg else ""
    return ParsedMessage(
        headers=headers,
        subject=subject,
        text="\n".join(text)[:MAX_BODY_CHARS],
        html="\n".join(html)[:MAX_BODY_CHARS],
        attachments=tuple(attachments),
        content_types=tuple(ctypes),
        max_depth=max_depth,
        defects=tuple(sorted(defects)),
        raw_size=raw_size,
    )


def _leaf(
    part: Message,
    ctype: str,
    text: list[str],
    html: list[str],
    attachments: list[Attachment],
    defects: set[str],
) -> None:
    filename = _filename(part)
    disposition = (part.get_content_disposition() or "").lower()
    is_body = not filename and disposition != "attachment" and ctype in ("text/plain", "text/html")
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        defects.add("UndecodablePayload")
        payload = b""
    if not isinstance(payload, bytes):
        payload = b""
    if is_body:
        (html if ctype == "text/html" else text).append(_decode_text(part, payload, defects))
        return
    if ctype.startswith("message/"):
        # an attached message: its own payload is parsed as a part above when multipart-like
        attachments.append(Attachment(filename or "message.eml", ctype, len(payload), payload[:16]))
        return
    attachments.append(Attachment(filename, ctype, len(payload), payload[:16]))


def _filename(part: Message) -> str:
    try:
        name = part.get_filename() or ""
    except Exception:
        return ""
    return decode_words(str(name))


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


def _body_size(data: bytes) -> int:
    """Size after the header block: trace headers added in transit (and CRLF) must not change it."""
    end = data.find(b"\n\n")
    return len(data) - end - 2 if end >= 0 else 0


def _unfold(value: object) -> str:
    return str(value).replace("\r", "").replace("\n", "")


def _fallback(data: bytes, defect: str) -> ParsedMessage:
    """Best effort for input the parser could not walk: split the header block by hand."""
    head, _, body = data.partition(b"\n\n")
    headers: list[tuple[str, str]] = []
    for line in head.decode("latin-1").split("\n"):
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
    subject = next((v for k, v in headers if k == "subject"), "")
    return ParsedMessage(
        headers=tuple(headers),
        subject=decode_words(subject),
        text=body[:MAX_BODY_CHARS].decode("utf-8", "replace"),
        html="",
        attachments=(),
        content_types=("text/plain",),
        max_depth=0,
        defects=(defect,),
        raw_size=_body_size(data),
    )
