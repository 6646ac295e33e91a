"""Feature matrix and the split (by sender, or time-ordered) over the deduplicated corpora.

Extraction runs in a process pool and is cached in ``.cache/features-<schema digest>-<code hash>/``
(shards of a few thousand vectors keyed by sha256, so an interrupted run resumes and a re-run, or a run
with other corpora excluded, only extracts what it has not seen).
The cache name covers the schema digest *and* the extraction code, so neither a changed schema nor a
changed feature function can be served stale vectors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from milter.features.domains import registrable
from milter.features.lexicon import FREEMAIL
from training.corpora import Message

log = logging.getLogger(__name__)

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "validation", "test")

FloatArray = npt.NDArray[np.float32]
ExtractFn = Callable[[bytes], Any]  # returns an object with a float32 `.vector`


class SchemaLike(Protocol):
    @property
    def names(self) -> tuple[str, ...]: ...
    @property
    def version(self) -> str: ...
    @property
    def digest(self) -> str: ...


@dataclass(frozen=True)
class Dataset:
    """Rows aligned with `messages`: features, class index and split (TRAIN / VAL / TEST)."""

    messages: tuple[Message, ...]
    X: FloatArray
    y: npt.NDArray[np.int64]
    split: npt.NDArray[np.int8]
    feature_names: tuple[str, ...]

    def rows(self, which: int) -> npt.NDArray[np.intp]:
        return np.flatnonzero(self.split == which)


def subsample(messages: Sequence[Message], max_per_group: int | None, seed: int) -> list[Message]:
    """At most `max_per_group` messages per (corpus, label), chosen at random with `seed`; order kept."""
    if max_per_group is None:
        return list(messages)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, msg in enumerate(messages):
        groups[msg.group].append(i)
    rng = random.Random(seed)
    keep: set[int] = set()
    for key in sorted(groups):
        idx = groups[key]
        keep.update(idx if len(idx) <= max_per_group else rng.sample(idx, max_per_group))
    return [m for i, m in enumerate(messages) if i in keep]


def _cut(n: int, frac: float) -> int:
    return int(n * frac + 0.5)


def time_split(
    messages: Sequence[Message], val_frac: float = 0.1, test_frac: float = 0.2, by_subcollection: bool = False
) -> npt.NDArray[np.int8]:
    """Per (corpus, label): newest `test_frac` by Date is TEST, the `val_frac` before it VAL, rest TRAIN.

    Messages without a usable date are split on their own by manifest order (later = newer), in the
    same proportions, so they neither all land in one split nor get an invented date.
    With `by_subcollection` the groups are (corpus, sub-collection, label): a corpus whose parts are
    from different years (modern-bulk-ham) then has every part in training, not only the oldest.
    """
    split = np.full(len(messages), TRAIN, dtype=np.int8)
    buckets: dict[tuple[str, str, str, bool], list[int]] = defaultdict(list)
    for i, msg in enumerate(messages):
        sub = msg.subcollection if by_subcollection else ""
        buckets[(*msg.group, sub, msg.date is None)].append(i)
    for (_, _, _, undated), idx in buckets.items():
        if undated:
            idx.sort(key=lambda i: messages[i].order)
        else:
            idx.sort(key=lambda i: (messages[i].date, messages[i].order))
        n = len(idx)
        n_test, n_val = _cut(n, test_frac), _cut(n, val_frac)
        for rank, i in enumerate(idx):
            if rank >= n - n_test:
                split[i] = TEST
            elif rank >= n - n_test - n_val:
                split[i] = VAL
    return split


#: A domain that sends more than this share of its (corpus, label) group is the mailbox's own organisation
#: (enron.com in Enron's ham): grouping by it would put the whole corpus on one side, so its senders are
#: grouped by address instead.
DOMINANT_SHARE = 0.2


def sender_key(msg: Message, dominant: frozenset[tuple[str, str, str]] = frozenset()) -> str:
    """What the sender split groups by: the From registrable domain, or the address for free-mail
    providers and dominant domains, or the message itself when it names no sender."""
    if not msg.sender or "@" not in msg.sender:
        return f"message:{msg.sha256}"
    domain = registrable(msg.sender.rpartition("@")[2])
    if not domain or domain in FREEMAIL or (msg.corpus, msg.label, domain) in dominant:
        return f"address:{msg.sender}"
    return f"domain:{domain}"


def _dominant_domains(messages: Sequence[Message]) -> frozenset[tuple[str, str, str]]:
    sizes: Counter[tuple[str, str]] = Counter(m.group for m in messages)
    per_domain: Counter[tuple[str, str, str]] = Counter(
        (m.corpus, m.label, registrable(m.sender.rpartition("@")[2])) for m in messages if "@" in m.sender
    )
    return frozenset(
        key for key, n in per_domain.items() if key[2] and n > DOMINANT_SHARE * sizes[(key[0], key[1])]
    )


def sender_keys(messages: Sequence[Message]) -> list[str]:
    """Every message's sender key, as the sender split groups them (folds within training use it too)."""
    dominant = _dominant_domains(messages)
    return [sender_key(m, dominant) for m in messages]


def sender_split(
    messages: Sequence[Message], val_frac: float = 0.1, test_frac: float = 0.2, salt: str = ""
) -> npt.NDArray[np.int8]:
    """TRAIN / VAL / TEST by a hash of each message's sender key: no sender on two sides, in any corpus.

    This asks the production question (how does the model do on senders it never saw?) where the
    time split asks "on newer mail of the same senders". The hash makes it deterministic and the same
    sender lands on the same side in every corpus and every run.

    `salt` draws another such split (`milter-train --split-salt`): the same question asked of other
    senders, to see how much a figure owes to which senders one split happened to put in test.
    """
    split = np.full(len(messages), TRAIN, dtype=np.int8)
    for i, key in enumerate(sender_keys(messages)):
        salted = f"{salt}\0{key}" if salt else key  # no salt: the shipped split, bit for bit
        u = int.from_bytes(hashlib.sha256(salted.encode()).digest()[:8], "big") / 2.0**64
        split[i] = TEST if u < test_frac else VAL if u < test_frac + val_frac else TRAIN
    return split


def _extract_path(extract_fn: ExtractFn, path: Path) -> FloatArray | None:
    """Worker: one message's vector, or None when extraction raised (counted and reported by the caller)."""
    try:
        vec = extract_fn(path.read_bytes()).vector
        return np.asarray(vec, dtype=np.float32)
    except Exception:  # a broken message must not kill a 60k-message run; the caller reports the count
        log.exception("feature extraction failed for %s", path)
        return None


def code_fingerprint(files: Sequence[Path]) -> str:
    """Hash of the extraction code: the schema digest only covers names, not how values are computed."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def cache_path(cache_dir: Path, schema: SchemaLike, code_version: str = "") -> Path:
    """Folder of shards for this schema and extraction code."""
    return cache_dir / f"features-{schema.digest[:16]}-{code_version or 'unversioned'}"


def _load_cache(path: Path, width: int) -> tuple[dict[str, FloatArray], set[str]]:
    vectors: dict[str, FloatArray] = {}
    failed: set[str] = set()
    for shard in sorted(path.glob("shard-*.npz")):
        with np.load(shard, allow_pickle=False) as data:
            X = data["X"]
            if X.ndim != 2 or X.shape[1] != width:
                log.warning(
                    "ignoring feature cache shard %s: shape %s, schema width %d", shard, X.shape, width
                )
                continue
            vectors.update(zip(data["sha256"].tolist(), X, strict=True))
            failed.update(data["failed"].tolist())
    return vectors, failed


def _save_shard(path: Path, vectors: dict[str, FloatArray], failed: set[str], width: int) -> None:
    """Append one shard (written atomically); an interrupted run keeps every shard already written."""
    path.mkdir(parents=True, exist_ok=True)
    shas = sorted(vectors)
    X = np.stack([vectors[s] for s in shas]) if shas else np.zeros((0, width), np.float32)
    n = len(list(path.glob("shard-*.npz")))
    tmp = path / f".shard-{n:05d}.{os.getpid()}.tmp.npz"
    # Compressed: the hashed-token block is mostly zeros (about 300 MB raw for the full share).
    np.savez_compressed(
        tmp, sha256=np.array(shas, dtype="U64"), X=X, failed=np.array(sorted(failed), dtype="U64")
    )
    os.replace(tmp, path / f"shard-{n:05d}-{os.getpid()}.npz")


def _drop_stale(cache_dir: Path, keep: Path) -> None:
    """Caches of older code or schemas are dead weight (hundreds of MB each)."""
    for stale in cache_dir.glob("features-*"):
        if stale != keep and stale.is_dir():
            for f in stale.iterdir():
                f.unlink()
            stale.rmdir()


def extract_all(
    messages: Sequence[Message],
    schema: SchemaLike,
    extract_fn: ExtractFn,
    cache_dir: Path,
    processes: int = 2,
    progress: bool = True,
    code_version: str = "",
    shard_size: int = 4096,
) -> tuple[dict[str, FloatArray], set[str]]:
    """Vectors for every message (sha256 -> vector), from the cache or extracted in a process pool."""
    width = len(schema.names)
    path = cache_path(cache_dir, schema, code_version)
    _drop_stale(cache_dir, path)
    vectors, failed = _load_cache(path, width)
    todo = [m for m in messages if m.sha256 not in vectors and m.sha256 not in failed]
    if not todo:
        return vectors, failed
    worker = partial(_extract_path, extract_fn)
    chunk = max(1, min(256, len(todo) // (processes * 8)))
    new: dict[str, FloatArray] = {}
    new_failed: set[str] = set()
    with get_context("fork" if os.name == "posix" else "spawn").Pool(processes) as pool:
        results = pool.imap(worker, [m.path for m in todo], chunksize=chunk)
        bar = tqdm(results, total=len(todo), desc="features", unit="msg", disable=not progress)
        for done, (msg, vec) in enumerate(zip(todo, bar, strict=True), 1):
            if vec is None or vec.shape != (width,):
                new_failed.add(msg.sha256)
            else:
                new[msg.sha256] = vec
            if len(new) + len(new_failed) >= shard_size or done == len(todo):
                _save_shard(path, new, new_failed, width)
                vectors.update(new)
                failed.update(new_failed)
                new, new_failed = {}, set()
                log.info("features: %d of %d extracted", done, len(todo))
    return vectors, failed


def split_rows(messages: Sequence[Message], split_by: str, salt: str = "") -> npt.NDArray[np.int8]:
    """The split milter-train's --split-by names: "sender" (drawn with `salt`, see `sender_split`), or
    time within "subcollection" / "corpus"."""
    if split_by == "sender":
        return sender_split(messages, salt=salt)
    return time_split(messages, by_subcollection=split_by == "subcollection")


def build_dataset(
    messages: Sequence[Message],
    schema: SchemaLike,
    extract_fn: ExtractFn,
    cache_dir: Path,
    processes: int = 2,
    progress: bool = True,
    code_version: str = "",
    split_by: str = "sender",
    split_salt: str = "",
) -> tuple[Dataset, int]:
    """Extract (or load) features, drop messages whose extraction failed, split by sender or by time.

    Returns the dataset and the number of messages dropped for failed extraction.
    """
    vectors, _ = extract_all(messages, schema, extract_fn, cache_dir, processes, progress, code_version)
    kept = tuple(m for m in messages if m.sha256 in vectors)
    width = len(schema.names)
    X = np.stack([vectors[m.sha256] for m in kept]) if kept else np.zeros((0, width), np.float32)
    y = np.array([m.klass for m in kept], dtype=np.int64)
    dataset = Dataset(
        kept,
        X.astype(np.float32),
        y,
        split_rows(kept, split_by, split_salt),
        tuple(schema.names),
    )
    return dataset, len(messages) - len(kept)
