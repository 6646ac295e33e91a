"""What `milter quarantine show` tells a reviewer: headers, a safe text preview, the signals behind a verdict.

Everything here comes from the sender, so it is treated as hostile: HTML is converted to text and never
rendered, control characters and terminal escape sequences are removed (a Subject could otherwise move
the cursor, retitle the terminal or hide text), and the caller prints it without Rich markup.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from rich import box
from rich.panel import Panel
from rich.text import Text
from selectolax.lexbor import LexborHTMLParser

from milter.errors import ModelError
from milter.parse import ParsedMessage, decode_words
from milter.store import MessageRow

if TYPE_CHECKING:
    from milter.explain import Explanation

PREVIEW_LINES = 40
PREVIEW_LINE_CHARS = 200
SHOWN_HEADERS = {"from": "From", "to": "To", "cc": "Cc", "reply-to": "Reply-To", "subject": "Subject",
                 "message-id": "Message-ID", "date": "Date"}

# ESC-introduced sequences: CSI (colours, cursor moves), OSC (titles, hyperlinks) and 2-byte escapes;
# also their 8-bit C1 forms (CSI U+009B, OSC U+009D), which some terminals still honour.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[@-_]?"
)


# Letters and symbols that render as nothing: spam pads with them, and a line of them read as blank to
# a reviewer but not to str.strip(), so the preview kept them as content. Made spaces; the Unicode line
# and paragraph separators become the newlines they are.
_INVISIBLE = str.maketrans({
    "\u2800": " ",  # BRAILLE PATTERN BLANK
    "\u3164": " ",  # HANGUL FILLER
    "\u115f": " ",  # HANGUL CHOSEONG FILLER
    "\u1160": " ",  # HANGUL JUNGSEONG FILLER
    "\uffa0": " ",  # HALFWIDTH HANGUL FILLER
    "\u2028": "\n",
    "\u2029": "\n",
})


_UNSAFE = ("Cc", "Cf", "Cs", "Co")  # control, format, surrogate, private use


def safe_text(value: str) -> str:
    """`value` without escape sequences or control/format characters (newlines and tabs kept).

    Format characters (Cf) go too: bidi overrides can make a preview read differently from its bytes.
    Invisible fillers (_INVISIBLE) become spaces.
    """
    value = _ESCAPES.sub("", value.replace("\r\n", "\n").replace("\r", "\n")).translate(_INVISIBLE)
    return "".join(
        ch for ch in value
        if ch in "\n\t" or unicodedata.category(ch) not in _UNSAFE
    ).replace("\t", "    ")


def safe_line(value: str) -> str:
    return " ".join(safe_text(value).split())


def json_text(obj: object, indent: int | None = None) -> str:
    """`obj` as JSON for --json output: non-ASCII text as is, but control and format characters
    (C1 such as U+009B, bidi overrides, zero-width) as \\uXXXX escapes. json.dumps escapes only C0,
    and a script printing a field would hand a terminal the raw escape or reordering."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent)
    # a raw newline can only be the indentation's: json.dumps escapes those inside strings
    return "".join(
        json.dumps(ch)[1:-1] if ch != "\n" and unicodedata.category(ch) in _UNSAFE else ch for ch in text
    )


def framed(preview_text: str) -> Panel:
    """The preview inside a frame: every line, wrapped ones too, starts with the frame's "│ ", so text
    in the message cannot pass for the lines `show` prints after it (a forged "why: the policy")."""
    return Panel(Text(preview_text), box=box.SQUARE, expand=False, padding=(0, 1))


# Tags after which a browser starts a new line; U+2028 marks the spot through the parser, because
# newlines inside HTML text are only whitespace and are collapsed below.
_BREAKS = re.compile(r"(?i)<(?:br|hr|/p|/div|/li|/tr|/h[1-6]|/table|/blockquote|/pre)\b[^>]*>")
_SPACE = re.compile(r"[ \t\n\r\f\v]+")


def html_to_text(html: str) -> str:
    """Visible text of an HTML body (scripts, styles and head dropped); nothing is rendered or fetched."""
    tree = LexborHTMLParser(_BREAKS.sub(lambda m: m.group(0) + "\u2028", html))
    for node in tree.css("script, style, head, title, template"):
        node.decompose()
    root = tree.body or tree.root
    text = root.text(separator="") if root is not None else ""
    return "\n".join(_SPACE.sub(" ", line).strip() for line in text.split("\u2028"))


def preview(parsed: ParsedMessage) -> tuple[str, str | None]:
    """(text, source): the text/plain body, else the HTML as text; at most PREVIEW_LINES lines."""
    source: str | None = None
    body = ""
    if parsed.text.strip():
        source, body = "text/plain", parsed.text
    elif parsed.html.strip():
        source, body = "text/html (converted to text)", html_to_text(parsed.html)
    lines = [line.rstrip()[:PREVIEW_LINE_CHARS] for line in safe_text(body).split("\n")]
    lines = _squeeze_blank(lines)
    if len(lines) > PREVIEW_LINES:
        lines = [*lines[:PREVIEW_LINES], f"[... {len(lines) - PREVIEW_LINES} more line(s)]"]
    return "\n".join(lines), source


def _squeeze_blank(lines: list[str]) -> list[str]:
    """Runs of blank lines become one (HTML conversion produces many); leading/trailing ones go."""
    out: list[str] = []
    for line in lines:
        if line.strip() or (out and out[-1].strip()):
            out.append(line if line.strip() else "")
    while out and not out[-1].strip():
        out.pop()
    return out


def parts(parsed: ParsedMessage) -> dict[str, object]:
    """What the message is made of, for a preview with no text: content types and attachments."""
    return {
        "content_types": list(dict.fromkeys(parsed.content_types)),
        "attachments": [{"filename": safe_line(a.filename), "content_type": a.content_type, "size": a.size}
                        for a in parsed.attachments],
    }


def describe_parts(found: object) -> str:
    """`parts` in words: "parts: multipart/mixed, application/pdf; attachments: inv.pdf (..., 14 bytes)"."""
    if not isinstance(found, dict):
        return "no parts"
    types = ", ".join(safe_line(str(t)) for t in found.get("content_types", ())) or "none"
    files = [f"{a['filename'] or '(no name)'} ({safe_line(str(a['content_type']))}, {a['size']} bytes)"
             for a in found.get("attachments", ())]
    return f"parts: {types}" + (f"; attachments: {', '.join(files)}" if files else "")


def headers(parsed: ParsedMessage) -> dict[str, str]:
    """The headers a reviewer wants, decoded and made safe; absent ones are left out."""
    found: dict[str, str] = {}
    for name in SHOWN_HEADERS:
        values = parsed.get_all(name)
        if values:
            found[name] = safe_line(", ".join(decode_words(_raw_utf8(v)) for v in values))[:1000]
    return found


def _raw_utf8(value: str) -> str:
    """A header value with its raw 8-bit bytes read as UTF-8 (RFC 6532 headers, SMTPUTF8 mail).

    The parser keeps such bytes as surrogate escapes, and decode_words turns each into "?": "Grüße" read
    "Gr????e". Bytes that are no UTF-8 become U+FFFD. The stored Subject and From (`list`) are made by
    the parser's own cleaning before the store sees them, so only `show`, which reads the bytes, gains.
    """
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte: leave it to decode_words
        return value


@dataclass(frozen=True)
class Why:
    """The model's explanation of one stored verdict, and where it came from."""

    explanation: Explanation | None
    source: str  # "stored with the verdict", "computed now with model X", or why there is none

    def as_json(self) -> dict[str, object]:
        return {"source": self.source,
                **({"explanation": self.explanation.as_json()} if self.explanation is not None else {})}


def explain_row(
    row: MessageRow, raw: bytes | None, vector: npt.NDArray[np.float32] | None, model_path: Path
) -> Why:
    """The explanation stored with the verdict (what the gateway said then), else one computed now from
    the stored vector with the current model; hashed words named by the message's own when the bytes are
    still held. Never raises: a missing model or explainer must not hide the rest of `show`."""
    # imported here: the model and the features cost a second of start-up that `list` need not pay
    from milter.classifier import Classifier
    from milter.explain import Explainer, Explanation
    from milter.features import SCHEMA

    words = _words(raw)
    if row.explanation is not None:
        try:
            stored = Explanation.from_json(row.explanation)
        except (KeyError, TypeError, ValueError) as exc:
            return Why(None, f"stored explanation unreadable: {exc!r}")
        return Why(stored.reworded(words), f"stored with the verdict by model {stored.model}")
    if vector is None:
        return Why(None, "none stored with the verdict, and no feature vector kept to compute one")
    if row.schema_digest != SCHEMA.digest or len(vector) != len(SCHEMA):
        return Why(None, f"none stored; the stored vector uses feature schema {row.schema_digest}, "
                         f"this code {SCHEMA.digest}")
    try:
        classifier = Classifier.load(model_path, providers=("CPUExecutionProvider",))
        explainer = Explainer.load(model_path, classifier.metadata.raw, classifier.predict)
    except ModelError as exc:
        return Why(None, f"none stored, and the current model cannot explain: {exc}")
    if explainer is None:
        return Why(None, f"none stored, and model {classifier.name} ships no explainer")
    X = vector.reshape(1, -1)
    (computed,) = explainer.explain(X, [row.verdict], classifier.predict(X), [words])
    note = "" if classifier.name == row.model else f" (the verdict was given by model {row.model})"
    return Why(computed, f"none stored; computed now with model {classifier.name}{note}")


def _words(raw: bytes | None) -> dict[str, tuple[str, ...]]:
    if raw is None:
        return {}
    from milter.features import bucket_words

    try:
        return bucket_words(raw)
    except Exception:  # a reading aid: without it, hashed word groups are named by examples
        return {}
