"""What `milter quarantine show` tells a reviewer: headers, a safe text preview, the signals behind a verdict.

Everything here comes from the sender, so it is treated as hostile: HTML is converted to text and never
rendered, control characters and terminal escape sequences are removed (a Subject could otherwise move
the cursor, retitle the terminal or hide text), and the caller prints it without Rich markup.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
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


def safe_text(value: str) -> str:
    """`value` without escape sequences or control/format characters (newlines and tabs kept).

    Format characters (Cf) go too: bidi overrides can make a preview read differently from its bytes.
    """
    value = _ESCAPES.sub("", value.replace("\r\n", "\n").replace("\r", "\n"))
    return "".join(
        ch for ch in value
        if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co")
    ).replace("\t", "    ")


def safe_line(value: str) -> str:
    return " ".join(safe_text(value).split())


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


def headers(parsed: ParsedMessage) -> dict[str, str]:
    """The headers a reviewer wants, decoded and made safe; absent ones are left out."""
    found: dict[str, str] = {}
    for name in SHOWN_HEADERS:
        values = parsed.get_all(name)
        if values:
            found[name] = safe_line(", ".join(decode_words(v) for v in values))[:1000]
    return found


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
