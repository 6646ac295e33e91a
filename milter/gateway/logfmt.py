"""Structured log lines: `event key=value ...`, values quoted only when they need it."""

from __future__ import annotations

import os


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    # Logs are line-based: never let a client-controlled value start a new line.
    escaped = escaped.replace("\r", "\\r").replace("\n", "\\n")
    return f'"{escaped}"'


def kv(event: str, **fields: object) -> str:
    """`kv("relayed", id="ab12", code=250)` -> `relayed id=ab12 code=250` (None fields dropped)."""
    parts = [event]
    parts.extend(f"{key}={_quote(value)}" for key, value in fields.items() if value is not None)
    return " ".join(parts)


def new_message_id() -> str:
    """A short random id that ties together every log line of one message."""
    return os.urandom(6).hex()
