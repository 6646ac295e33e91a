"""Where `milter scan` (and the benches) read messages from: files, folders, mbox files, stdin.

Each item is (label, bytes) or (label, OSError-text) so one unreadable file never stops a scan.
"""

from __future__ import annotations

import mailbox
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MESSAGE_SUFFIXES = (".eml", ".msg", ".txt")
MBOX_SUFFIXES = (".mbox", ".mbx")


@dataclass(frozen=True)
class Item:
    path: str
    raw: bytes | None
    error: str | None = None


def expand(paths: list[str]) -> list[Path | str]:
    """Files and folders -> an ordered list of files ('-' stays as is). Folders are walked recursively."""
    out: list[Path | str] = []
    for arg in paths:
        if arg == "-":
            out.append("-")
            continue
        path = Path(arg)
        if path.is_dir():
            out.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and not p.name.startswith(".")
                    and p.suffix.lower() in MESSAGE_SUFFIXES + MBOX_SUFFIXES
                )
            )
        else:
            out.append(path)
    return out


def is_mbox(path: Path) -> bool:
    if path.suffix.lower() in MBOX_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(5)
    except OSError:
        return False
    return head == b"From " and path.suffix.lower() not in MESSAGE_SUFFIXES


def read_items(paths: list[Path | str]) -> Iterator[Item]:
    for path in paths:
        if path == "-":
            yield _checked("-", sys.stdin.buffer.read())
            continue
        assert isinstance(path, Path)
        if is_mbox(path):
            yield from _mbox(path)
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            yield Item(str(path), None, f"cannot read: {exc.strerror or exc}")
            continue
        yield _checked(str(path), data)


def _checked(label: str, data: bytes) -> Item:
    if not data.strip():
        return Item(label, None, "empty input: no message")
    return Item(label, data)


def _mbox(path: Path) -> Iterator[Item]:
    try:
        box = mailbox.mbox(str(path), create=False)
        keys = box.keys()
    except (OSError, mailbox.Error) as exc:
        yield Item(str(path), None, f"cannot read mbox: {exc}")
        return
    for n, key in enumerate(keys):
        try:
            data = box.get_bytes(key)
        except (OSError, mailbox.Error, KeyError) as exc:
            yield Item(f"{path}#{n}", None, f"cannot read mbox message: {exc}")
            continue
        yield _checked(f"{path}#{n}", data)
