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

import numpy as np
import numpy.typing as npt
from selectolax.lexbor import LexborHTMLParser

from milter.classifier import ModelMetadata, load_metadata, metadata_path
from milter.errors import ModelError
from milter.features import SCHEMA
from milter.parse import ParsedMessage, decode_words

PREVIEW_LINES = 40
PREVIEW_LINE_CHARS = 200
TOP_CONTRIBUTIONS = 10
SHOWN_HEADERS = {"from": "From", "to": "To", "cc": "Cc", "reply-to": "Reply-To", "subject": "Subject",
                 "message-id": "Message-ID", "date": "Date"}
CONTRIBUTIONS_NOTE = (
    "importance-weighted signals (feature value x the model's global gain importance), "
    "not exact per-message attributions"
)

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
class Contribution:
    name: str
    value: float
    gain: float
    share: float
    weight: float  # value x gain

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "value": self.value, "gain": self.gain, "share": self.share,
                "weight": self.weight}


@dataclass(frozen=True)
class Contributions:
    items: tuple[Contribution, ...]
    model: str | None
    unavailable: str | None  # why there are none, for the reader

    def as_json(self) -> dict[str, object]:
        return {"note": CONTRIBUTIONS_NOTE, "model": self.model, "unavailable": self.unavailable,
                "top": [c.as_json() for c in self.items]}


def _feature_names(meta: ModelMetadata) -> tuple[str, ...]:
    names = meta.raw.get("schema", {}).get("feature_names")
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return tuple(names)
    return SCHEMA.names if meta.schema_digest == SCHEMA.digest else ()


def contributions(
    model_path: Path, vector: npt.NDArray[np.float32] | None, schema_digest: str
) -> Contributions:
    """Top features by value x gain importance; never raises (a missing model must not hide the rest)."""
    if vector is None:
        return Contributions((), None, "no feature vector stored for this message")
    try:
        meta = load_metadata(metadata_path(model_path))
    except ModelError as exc:
        return Contributions((), None, str(exc))
    names = _feature_names(meta)
    if meta.schema_digest != schema_digest or len(names) != len(vector):
        return Contributions((), meta.name, f"stored vector uses feature schema {schema_digest}, "
                                            f"model {meta.name} uses {meta.schema_digest}")
    if not meta.feature_importance:
        return Contributions((), meta.name, f"model {meta.name} has no feature_importance_gain")
    index = {name: i for i, name in enumerate(names)}
    shares = {str(item.get("name")): float(item.get("share", 0.0))
              for item in meta.raw.get("feature_importance_gain", []) if isinstance(item, dict)}
    items = [
        Contribution(name, float(vector[index[name]]), gain, shares.get(name, 0.0),
                     float(vector[index[name]]) * gain)
        for name, gain in meta.feature_importance
        if name in index and float(vector[index[name]]) != 0.0 and gain > 0.0
    ]
    items.sort(key=lambda c: abs(c.weight), reverse=True)
    return Contributions(tuple(items[:TOP_CONTRIBUTIONS]), meta.name, None)
