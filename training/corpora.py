"""Labeled corpora: unpack on demand, read manifests, dedupe, and describe every message.

The corpora live as archives in ``../shared/corpora`` beside the checkout and are unpacked once into
``.cache/corpora/<corpus>/<label>/NNNNNN.eml`` by the share's own ``unpack`` script. Each message is
described by a frozen `Message`: corpus, sub-collection (for per-collection metrics), label, our class
index, sha256 and the sender's ``Date`` header (only used to order the time split, never as a feature).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from milter.parse import parse
from milter.types import CLASS_NAMES

#: Corpus label -> our class name. Phishing, invoice and gift-card scams are what we call BEC.
LABEL_TO_CLASS: dict[str, str] = {"ham": "ham", "spam": "spam", "phish": "bec"}

# Dates outside this window are forged or broken clocks; they would distort the time split.
_MIN_DATE = datetime(1990, 1, 1, tzinfo=UTC)
_MAX_DATE = datetime(2035, 1, 1, tzinfo=UTC)
_HEADER_READ = 64 * 1024
_DATE_RE = re.compile(rb"^date:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


class CorporaError(RuntimeError):
    """The corpora are missing, cannot be unpacked, or a manifest is malformed."""


@dataclass(frozen=True)
class Message:
    """One labeled message as the training pipeline sees it."""

    corpus: str
    subcollection: str
    label: str  # the corpus's own label: ham / spam / phish
    klass: int  # index into CLASS_NAMES
    sha256: str
    path: Path
    order: int  # position in the corpus manifest (stable tie-breaker and fallback order)
    date: datetime | None
    sender: str = ""  # From address, lower-cased ('' when none): groups the sender split, never a feature

    @property
    def group(self) -> tuple[str, str]:
        """The (corpus, label) group the time split works within."""
        return (self.corpus, self.label)


def default_corpora_src(repo_root: Path) -> Path:
    return repo_root.resolve().parent / "shared" / "corpora"


def available_corpora(cache_dir: Path, src_dir: Path) -> list[str]:
    """Corpus names known from the share (archives) or, failing that, from the unpacked cache."""
    names = {p.name.removesuffix(".tar.xz") for p in src_dir.glob("*.tar.xz")} if src_dir.is_dir() else set()
    if cache_dir.is_dir():
        names |= {p.parent.name for p in cache_dir.glob("*/MANIFEST.tsv")}
    return sorted(names)


def ensure_unpacked(cache_dir: Path, src_dir: Path, corpora: Sequence[str]) -> None:
    """Run the share's unpack script for the corpora (it skips any already unpacked from the same archive).

    Always asking the script, not just checking for its stamp here, means a refreshed archive is picked
    up; without the share (an unpacked cache copied elsewhere) the stamps alone must do.
    """
    script = src_dir / "unpack"
    if not script.is_file():
        missing = [c for c in corpora if not (cache_dir / c / ".stamp").is_file()]
        if missing:
            raise CorporaError(
                f"corpora {missing} are not unpacked in {cache_dir} and {script} does not exist"
            )
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [str(script), str(cache_dir), *corpora], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise CorporaError(f"{script} failed ({proc.returncode}): {proc.stderr.strip()}")


def subcollection(corpus: str, label: str, source_repo: str, source_path: str) -> str:
    """Name the part of a corpus a message came from, so metrics can be broken down below corpus level."""
    repo = source_repo.split("@", 1)[0]
    parts = source_path.split("/")
    if corpus == "enron-spam-raw" and len(parts) >= 3:
        return parts[2]  # training_data/ham/<mailbox>/... or training_data/spam/<BG|GP|SH>/...
    if corpus == "spamassassin-public" and len(parts) >= 3:
        # The mirror keeps easy_ham / hard_ham as folders; its other sets are only "training" / "testing".
        sub = parts[2] if len(parts) >= 4 else label
        return f"{parts[0].removesuffix('_data')}/{sub}"
    if corpus == "lfdr-mailing-lists":
        return repo.split("/")[-1].split(".")[
            0
        ]  # linux-mailinglist-archives/usrp-users.lists... -> usrp-users
    if corpus == "modern-bulk-ham":
        return repo.split("/")[-1]
    return corpus


def parse_date(header_block: bytes) -> datetime | None:
    """The message's Date header as an aware UTC datetime, or None when missing, garbage or absurd."""
    match = _DATE_RE.search(header_block)
    if match is None:
        return None
    text = re.sub(rb"\s+", b" ", match.group(1)).decode("ascii", "replace").strip()
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 5322 "-0000": zone unknown; treat as UTC
        when = when.replace(tzinfo=UTC)
    try:
        when = when.astimezone(UTC)
    except (OverflowError, ValueError):
        return None
    return when if _MIN_DATE <= when < _MAX_DATE else None


def read_header_block(path: Path) -> bytes:
    """The header section of a message file (up to the first empty line), bounded in size."""
    with path.open("rb") as fh:
        head = fh.read(_HEADER_READ)
    end = re.search(rb"\r?\n\r?\n", head)
    return head[: end.start()] if end else head


def load_manifest(corpus_dir: Path) -> list[Message]:
    """Read one corpus's MANIFEST.tsv (dates are left None: `attach_dates` reads them, in parallel)."""
    manifest = corpus_dir / "MANIFEST.tsv"
    if not manifest.is_file():
        raise CorporaError(f"no manifest at {manifest}")
    out: list[Message] = []
    with manifest.open(newline="", encoding="utf-8") as fh:
        for order, row in enumerate(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)):
            label = row["label"]
            if label not in LABEL_TO_CLASS:
                raise CorporaError(f"{manifest}: unknown label {label!r} on row {order + 2}")
            path = corpus_dir / row["relative_path"]
            out.append(
                Message(
                    corpus=corpus_dir.name,
                    subcollection=subcollection(
                        corpus_dir.name, label, row["source_repo"], row["source_path"]
                    ),
                    label=label,
                    klass=CLASS_NAMES.index(LABEL_TO_CLASS[label]),
                    sha256=row["sha256"],
                    path=path,
                    order=order,
                    date=None,
                )
            )
    return out


def dedupe(messages: Iterable[Message]) -> tuple[list[Message], int]:
    """Drop repeated sha256s, keeping the first seen (callers pass corpora in sorted order).

    A message with two different labels would be a contradiction in the data; it is dropped entirely.
    Returns the kept messages and the number dropped.
    """
    first: dict[str, Message] = {}
    conflicting: set[str] = set()
    total = 0
    for msg in messages:
        total += 1
        seen = first.get(msg.sha256)
        if seen is None:
            first[msg.sha256] = msg
        elif seen.klass != msg.klass:
            conflicting.add(msg.sha256)
    kept = [m for m in first.values() if m.sha256 not in conflicting]
    return kept, total - len(kept)


def load_corpora(
    cache_dir: Path, src_dir: Path, exclude: Sequence[str] = (), include: Sequence[str] | None = None
) -> tuple[list[Message], int]:
    """Unpack as needed, load every selected corpus in name order, dedupe across corpora."""
    names = [c for c in (include or available_corpora(cache_dir, src_dir)) if c not in set(exclude)]
    if not names:
        raise CorporaError(
            f"no corpora selected (cache {cache_dir}, share {src_dir}, excluded {list(exclude)})"
        )
    ensure_unpacked(cache_dir, src_dir, names)
    messages: list[Message] = []
    for name in sorted(names):
        messages.extend(load_manifest(cache_dir / name))
    return dedupe(messages)


def sender_of(header_block: bytes) -> str:
    """The first From address of a header block, as the features read it ('' when none)."""
    froms = parse(header_block + b"\n\n").addresses("from")
    return froms[0][1] if froms else ""


def _date_and_sender(path: Path) -> tuple[float, str]:
    """Worker: Date as a POSIX timestamp (NaN when unusable: it pickles cheaply) and the From address."""
    head = read_header_block(path)
    when = parse_date(head)
    return (when.timestamp() if when else float("nan")), sender_of(head)


def attach_dates(messages: Sequence[Message], cache_dir: Path, processes: int = 2) -> list[Message]:
    """Messages with `date` and `sender` filled from their headers, cached in CACHE/headers.npz by sha256.

    Reading 64k headers takes tens of seconds on a busy disk, so it is done once, in parallel.
    """
    path = cache_dir / "headers.npz"
    known: dict[str, tuple[float, str]] = {}
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            known = {
                sha: (ts, sender)
                for sha, ts, sender in zip(
                    data["sha256"].tolist(), data["ts"].tolist(), data["sender"].tolist(), strict=True
                )
            }
    todo = [m for m in messages if m.sha256 not in known]
    if todo:
        with get_context("fork" if os.name == "posix" else "spawn").Pool(processes) as pool:
            found = pool.map(
                _date_and_sender, [m.path for m in todo], chunksize=max(1, len(todo) // (processes * 4))
            )
        known.update(zip((m.sha256 for m in todo), found, strict=True))
        cache_dir.mkdir(parents=True, exist_ok=True)
        shas = sorted(known)
        # a name of this process's own: two runs on one cache (the nightly retrain beside a manual
        # milter-train) shared "headers.tmp.npz", and the second rename found it gone
        fd, tmp_name = tempfile.mkstemp(prefix="headers.", suffix=".tmp.npz", dir=cache_dir)
        try:
            with os.fdopen(fd, "wb") as tmp:
                np.savez(
                    tmp,
                    sha256=np.array(shas, dtype="U64"),
                    ts=np.array([known[s][0] for s in shas]),
                    sender=np.array([known[s][1] for s in shas], dtype=str),
                )
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
    out = []
    for m in messages:
        ts, sender = known[m.sha256]
        when = None if math.isnan(ts) else datetime.fromtimestamp(ts, UTC)
        out.append(replace(m, date=when, sender=sender))
    return out
