"""`milter-retrain`, the nightly learning loop: base corpora + labels -> challenger -> promote or refuse.

1. Data: the base corpora, prepared exactly as `milter-train` prepares them (same dedupe, subsample,
   feature cache and split), plus every labelled verdict in the store. A stored feature vector is
   used when its schema digest is the current one; otherwise the vector is recomputed from the raw
   message while the quarantine still holds it; otherwise the label is skipped (and counted).
2. Labels: those whose store id is a multiple of `--holdout-every` (5) are held back as "recent labels"
   for the comparison; by id, so a label keeps that role night after night and the champion never
   trained on it. The rest train with a weight boost (`--label-weight`, 20): each counts as that many
   typical base messages of its class. Admins' labels are few (tens against tens of thousands) but they
   are the only examples of what this site receives now; unboosted they would barely move a tree.
   Each is also repeated (`label_rows`) so that a few labels of one kind can fill a tree leaf of their
   own (LightGBM's `min_data_in_leaf` counts rows, not weight).
   A `bulk` label (a wanted newsletter) trains the model's ham class: the model has no bulk class, the
   policy derives that verdict from sender evidence (milter.policy.bulk, milter.types.label_class).
3. Challenger: the same fit / ONNX export / parity check / threshold choice as `milter-train`.
4. Champion vs challenger, each at its own thresholds (quarantine level) on a FIXED set: the test split
   of the base corpora, plus the recent labels. Promote (milter.registry.promote: validated,
   atomic, kept in history) only if
     * pooled ham FPR <= champion's + `--fpr-tolerance` (0.0005 absolute: a retrain regrows every tree,
       so a borderline ham may flip; 0.05% is below the 0.1% target the thresholds aim for),
     * pooled spam+bec recall at the champion's own fixed-set ham FPR >= the champion's there -
       `--recall-tolerance` - two standard errors of the paired difference (same reason, in recall's
       terms; both models' rankings cut at one operating point, since each one's thresholds move with a
       few dozen modern validation ham; the standard error because a small fixed set is noisy),
     * recall on the recent spam/bec labels, and FPR on recent ham labels, no worse (same tolerances);
   otherwise refuse. Either way a report (report.md + retrain.json) says what was compared and why.

With `--dask SCHEDULER` (or `--dask local:N`, a LocalCluster of N worker processes on loopback) the trees
are grown on a Dask cluster by lightgbm.dask and stale stored messages are re-extracted as a Dask bag;
data, text stage, export, thresholds and gate are the same (training/dask_retrain.py says what differs).

Exit status: 0 when a model was promoted or cleanly refused (systemd then reloads the gateway), 1 on errors.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from milter.classifier import Classifier
from milter.commands.model_fleet import promote as fleet_promote
from milter.config import load_config
from milter.errors import MilterError, SchemaMismatchError
from milter.features import Protected
from milter.registry import promote, registry_dir
from milter.store import Store
from milter.types import CLASS_NAMES, VERDICTS, Envelope, label_class
from training import model as mdl
from training.artifacts import write_model
from training.corpora import CorporaError, default_corpora_src
from training.dataset import TEST, TRAIN, VAL, Dataset
from training.evaluate import Metrics, sliced_metrics
from training.report import write_atomic
from training.thresholds import HAM, Probs, Thresholds, decide, spam_score, threshold_for_fpr
from training.train import _features, export_and_evaluate, fit_setup, load_dataset, repo_root
from training.train import parse_args as train_defaults

log = logging.getLogger("milter-retrain")

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

RECENT = "recent-labels"  # the slice name of the held-back labels in reports
LEVELS = ("quarantine", "tag")


# --- arguments ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    root = repo_root()
    d = train_defaults([])  # model and split settings follow milter-train's, so the two stay comparable
    p = argparse.ArgumentParser(
        prog="milter-retrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, help="milter TOML config: store URL, model path, protected names")
    p.add_argument("--db", help="store URL (default: the config's store.url)")
    p.add_argument("--models-dir", type=Path, help="model registry (default: the folder of model.path)")
    p.add_argument(
        "--report",
        type=Path,
        help="reports go to REPORT/retrain-<time>/ (default: reports/ beside the models folder)",
    )
    p.add_argument("--dry-run", action="store_true", help="train, compare and report; never promote")
    p.add_argument(
        "--max-per-group", type=int, default=None, help="at most N base messages per (corpus, label)"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--label-weight",
        type=float,
        default=20.0,
        help="a training label counts as this many typical base messages of its class",
    )
    p.add_argument(
        "--holdout-every",
        type=int,
        default=5,
        help="every N-th label by store id is held back for evaluation (0: none)",
    )
    p.add_argument("--fpr-tolerance", type=float, default=0.0005, help="absolute ham-FPR slack")
    p.add_argument("--recall-tolerance", type=float, default=0.002, help="absolute recall slack")
    p.add_argument("--corpora-src", type=Path, default=default_corpora_src(root))
    p.add_argument("--corpora-dir", type=Path, default=root / ".cache" / "corpora")
    p.add_argument("--cache-dir", type=Path, default=root / ".cache", help="feature and date caches")
    p.add_argument("--exclude-corpus", action="append", default=[], metavar="NAME")
    p.add_argument(
        "--holdout-sha256",
        type=Path,
        metavar="FILE",
        help="base messages (sha256, one a line) to leave out entirely: for experiments that "
        "simulate a campaign the base corpora never saw",
    )
    p.add_argument(
        "--split-by",
        choices=("sender", "corpus", "subcollection"),
        default=d.split_by,
        help="split, as milter-train (default: %(default)s)",
    )
    p.add_argument("--target-fpr", type=float, default=d.target_fpr)
    p.add_argument("--tag-fpr", type=float, default=d.tag_fpr)
    p.add_argument("--modern-tag-fpr", type=float, default=d.modern_tag_fpr, help="as milter-train")
    p.add_argument("--modern-quarantine-fpr", type=float, default=d.modern_quarantine_fpr,
                   help="as milter-train")
    p.add_argument("--max-rounds", type=int, default=d.max_rounds)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--corpus-balance", type=float, default=d.corpus_balance)
    p.add_argument("--modern-ham-weight", type=float, default=d.modern_ham_weight)
    p.add_argument("--modern-spam-weight", type=float, default=d.modern_spam_weight)
    p.add_argument("--sender-balance", type=float, default=d.sender_balance, help="as milter-train")
    p.add_argument("--text-c", type=float, default=d.text_c, help="as milter-train")
    p.add_argument("--text-grams", choices=("none", "unwanted", "both"), default=d.text_grams,
                   help="as milter-train")
    p.add_argument("--gram-scale", type=float, default=d.gram_scale, help="as milter-train")
    p.add_argument("--topics", type=int, default=d.topics, help="as milter-train")
    p.add_argument("--topic-vocab", type=int, default=d.topic_vocab, help="as milter-train")
    p.add_argument("--stage-labels", choices=("none", "ham", "all"), default=d.stage_labels,
                   help="as milter-train")
    p.add_argument("--threshold-folds", type=int, default=d.threshold_folds, help="as milter-train")
    p.add_argument("--language-adjust", type=float, default=d.language_adjust, help="as milter-train")
    p.add_argument("--language-balance", type=float, default=d.language_balance, help="as milter-train")
    p.add_argument("--no-language-redistribute", dest="language_redistribute", action="store_false",
                   help="as milter-train")
    p.add_argument("--no-tree-words", dest="tree_words", action="store_false", help="as milter-train")
    p.add_argument("--processes", type=int, default=d.processes, help="feature extraction processes")
    p.add_argument("--features-module", default="milter.features", help=argparse.SUPPRESS)
    p.add_argument(
        "--dask",
        metavar="SCHEDULER",
        help="grow the trees on Dask: a scheduler address (tcp://HOST:PORT) or local:N for a local "
        "cluster of N worker processes (needs the 'distributed' extra; see training/dask_retrain.py)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


# --- labelled examples from the store ------------------------------------------------------------


@dataclass(frozen=True)
class Labelled:
    """Labelled store examples usable with the current schema, ordered by store id."""

    ids: tuple[int, ...]
    X: FloatArray
    y: IntArray
    counts: Mapping[str, int]  # stored / recomputed / skipped_no_raw / failed
    message_ids: tuple[str | None, ...] = ()  # per row where known (stale rows: None)

    def split(self, every: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """(train rows, recent rows): the copies of one message are held back together, when the
        smallest store id among them is a multiple of `every`.

        Copies: rows with the same feature vector or the same Message-ID (a label by Message-ID marks
        every stored copy; a reported message without one is stored again at each report). Split one
        by one, copies landed on both sides and the recent-labels check scored the challenger on rows
        it had trained on. By id, not by rank, so a label keeps its role from one night to the next:
        the champion (last night's challenger) never trained on the labels it is now judged on.
        """
        ids = np.asarray(self.ids, dtype=np.int64)
        if every <= 0:
            return np.arange(len(ids)), np.zeros(0, dtype=np.intp)
        first = _copies_first_id(ids, self.X, self.message_ids)
        recent = first % every == 0
        return np.flatnonzero(~recent), np.flatnonzero(recent)


def _copies_first_id(
    ids: npt.NDArray[np.int64], X: FloatArray, message_ids: Sequence[str | None]
) -> npt.NDArray[np.int64]:
    """For each row, the smallest id among its copies (same vector bytes or same Message-ID,
    transitively: a small union-find over the labels, a few thousand rows at most)."""
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    seen: dict[object, int] = {}
    for i in range(len(ids)):
        keys: list[object] = [("vector", X[i].tobytes())]
        mid = message_ids[i] if i < len(message_ids) else None
        if mid:
            keys.append(("message-id", mid.strip()))
        for key in keys:
            j = seen.setdefault(key, i)
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    first = ids.copy()
    for i in range(len(ids)):
        r = root(i)
        first[r] = min(first[r], ids[i])
    return np.array([first[root(i)] for i in range(len(ids))], dtype=np.int64)


#: (store id, raw bytes, envelope) of stored messages -> (store id, vector or None, error or None)
Recompute = Callable[
    [Sequence[tuple[int, bytes, Envelope]]], list[tuple[int, FloatArray | None, str | None]]
]


def extract_here(
    features: ModuleType, protected: Protected
) -> Recompute:
    """Re-extraction in this process, one message after another (the default; --dask uses a bag)."""

    def run(items: Sequence[tuple[int, bytes, Envelope]]) -> list[tuple[int, FloatArray | None, str | None]]:
        out: list[tuple[int, FloatArray | None, str | None]] = []
        for pk, raw, envelope in items:
            try:
                vector = np.asarray(features.extract(raw, envelope, protected).vector, dtype=np.float32)
            except Exception as exc:  # one unparseable message must not stop the nightly run; counted
                log.exception("feature extraction failed for stored message %d", pk)
                out.append((pk, None, str(exc)))
                continue
            out.append((pk, vector, None))
        return out

    return run


def load_labelled(
    store: Store, features: ModuleType, protected: Protected, recompute: Recompute | None = None
) -> Labelled:
    """Current vectors as stored; stale ones recomputed (`recompute`) from raw bytes when held, else
    skipped."""
    digest = features.SCHEMA.digest
    stored = store.labelled_examples(digest)
    rows: dict[int, tuple[FloatArray, str]] = {
        e.id: (np.asarray(e.vector, dtype=np.float32), e.label) for e in stored
    }
    message_id = {e.id: e.message_id for e in stored}
    counts = {"stored": len(rows), "recomputed": 0, "skipped_no_raw": 0, "failed": 0}
    width = len(features.SCHEMA.names)
    held: list[tuple[int, bytes, Envelope]] = []
    label_of: dict[int, str] = {}
    for stale in store.stale_examples(digest):
        if stale.raw is None:
            counts["skipped_no_raw"] += 1
            continue
        held.append((stale.id, stale.raw, stale.envelope))
        label_of[stale.id] = stale.label
    if counts["skipped_no_raw"]:
        # their vectors are of an older feature schema and their bytes went with the quarantine's
        # retention (store.retention_days): these labels are lost to training from now on
        log.warning(
            "%d labelled message(s) not used: stored with an older feature schema and their bytes "
            "already purged (store.retention_days), so their features cannot be recomputed",
            counts["skipped_no_raw"],
        )
    for pk, vector, error in (recompute or extract_here(features, protected))(held):
        if vector is None:
            log.error("feature extraction failed for stored message %d: %s", pk, error)
            counts["failed"] += 1
            continue
        rows[pk] = (vector, label_of[pk])
        counts["recomputed"] += 1
    ids = tuple(sorted(pk for pk, (vec, lab) in rows.items() if vec.shape == (width,) and lab in VERDICTS))
    counts["failed"] += len(rows) - len(ids)
    X = np.stack([rows[i][0] for i in ids]) if ids else np.zeros((0, width), np.float32)
    # a bulk label is wanted mail: it trains the model's ham class (label_class)
    y = np.array([label_class(rows[i][1]) for i in ids], dtype=np.int64)
    return Labelled(ids, X.astype(np.float32), y, counts, tuple(message_id.get(i) for i in ids))


# --- base corpora ---------------------------------------------------------------------------------


def load_base(args: argparse.Namespace, features: ModuleType, code_version: str) -> Dataset:
    """The base corpora as milter-train builds them (minus any --holdout-sha256 messages)."""
    drop: frozenset[str] = frozenset()
    if args.holdout_sha256 is not None:
        drop = frozenset(args.holdout_sha256.read_text(encoding="ascii").split())
    try:
        ds, _ = load_dataset(args, features, code_version, drop)
    except SystemExit as exc:  # milter-train's way to stop; here it is an error with exit status 1
        raise MilterError(str(exc)) from exc
    return ds


# --- the challenger -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenger:
    onnx_bytes: bytes
    explainer: bytes
    meta: dict[str, Any]
    thresholds: Thresholds
    tensor_onnx: bytes | None = None  # the tensor graph (training/tensor_export.py)


def label_weights(
    y_labels: IntArray, y_base: IntArray, w_base: npt.NDArray[np.float64], boost: float
) -> npt.NDArray[np.float64]:
    """Each label weighs `boost` times the mean base training weight of its class (1.0 if none)."""
    means = {
        k: float(w_base[y_base == k].mean()) if (y_base == k).any() else 1.0 for k in range(len(CLASS_NAMES))
    }
    return np.array([boost * means[int(k)] for k in y_labels], dtype=np.float64)


#: How many admin labels of one kind should be able to form a tree leaf of their own.
LABELS_PER_LEAF = 5


def label_rows(
    X: FloatArray, y: IntArray, w: npt.NDArray[np.float64], min_data_in_leaf: int
) -> tuple[FloatArray, IntArray, npt.NDArray[np.float64]]:
    """Labels as fit rows: each repeated so that LABELS_PER_LEAF of them fill a leaf, at the matching
    fraction of its weight (the total stays what `label_weights` gave).

    `min_data_in_leaf` counts rows, not weight: it keeps the trees from learning a handful of corpus
    messages, and it would equally keep them from ever learning 20 labels of a new sender (measured:
    with 50 rows per leaf, a source 40 labels set apart stayed 100 % quarantined)."""
    copies = max(1, math.ceil(min_data_in_leaf / LABELS_PER_LEAF))
    return np.repeat(X, copies, axis=0), np.repeat(y, copies), np.repeat(w / copies, copies)


def label_groups(labels: int, rows: int) -> list[str]:
    """Fold groups of the label rows `label_rows` made: the copies of one label stay together, so the
    text stage never scores a label with a fit that saw its own copies."""
    copies = rows // max(labels, 1)
    return [f"label:{i // copies}" for i in range(rows)] if labels else []


def fit_challenger(
    args: argparse.Namespace,
    features: ModuleType,
    code_version: str,
    ds: Dataset,
    labels: Labelled,
    train_rows: npt.NDArray[np.intp],
    trees: mdl.TreeFitter = mdl.local_trees,
) -> Challenger:
    """milter-train's fit, export, parity check and thresholds, with the labels added to training;
    `trees` grows the trees (this process, or a Dask cluster with --dask)."""
    try:
        setup = fit_setup(args, ds)
    except ValueError as exc:
        raise MilterError(str(exc)) from None
    cfg, weights, tr, va = setup.cfg, setup.weights, setup.train, setup.val
    X_lab, y_lab = labels.X[train_rows], labels.y[train_rows]
    w_lab = label_weights(y_lab, ds.y[tr], weights[tr], args.label_weight)
    X_fit, y_fit, w_fit = label_rows(X_lab, y_lab, w_lab, cfg.min_data_in_leaf)
    t0 = time.monotonic()
    fitted = mdl.fit(
        np.concatenate([setup.X_train, X_fit]),
        np.concatenate([ds.y[tr], y_fit]),
        np.concatenate([weights[tr], w_fit]),
        ds.X[va],
        ds.y[va],
        weights[va],
        ds.feature_names,
        cfg,
        groups=[setup.groups[i] for i in tr] + label_groups(len(y_lab), len(y_fit)),
        labels=np.concatenate([np.zeros(len(tr), dtype=bool), np.ones(len(y_fit), dtype=bool)]),
        trees=trees,
    )
    log.info(
        "text stage and LightGBM: %d rounds in %.1fs (%d base + %d label rows)",
        fitted.booster.current_iteration(),
        time.monotonic() - t0,
        len(tr),
        len(y_lab),
    )
    out = export_and_evaluate(
        ds,
        fitted,
        args=args,
        features=features,
        cfg=cfg,
        code_version=code_version,
        dropped={},
        extra_X=labels.X,
        extra_y=y_lab,
    )  # the parity check covers the labels too
    onnx_bytes, meta, thresholds = out.onnx_bytes, out.meta, out.thresholds
    meta["training_data"]["store_labels"] = {
        "train": len(y_lab),
        "held_back": len(labels.ids) - len(y_lab),
        "label_weight": args.label_weight,
        "by_class": {CLASS_NAMES[k]: int((y_lab == k).sum()) for k in range(len(CLASS_NAMES))},
        **labels.counts,
    }
    return Challenger(onnx_bytes, out.explainer, meta, thresholds, out.tensor_onnx)


# --- comparison ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """The fixed base test split and the held-back recent labels, scored by both models."""

    X: FloatArray
    y: IntArray
    corpora: tuple[str, ...]
    X_recent: FloatArray
    y_recent: IntArray


@dataclass(frozen=True)
class Scored:
    """One model's metrics at its own thresholds: {level: {slice: Metrics}} for fixed and recent sets."""

    name: str
    thresholds: Thresholds
    fixed: Mapping[str, Mapping[str, Metrics]]
    recent: Mapping[str, Metrics]  # level -> Metrics on the recent labels
    not_ham: npt.NDArray[np.float64]  # P(spam)+P(bec) of every fixed-set row: the ranking itself
    y: IntArray  # the fixed set's classes

    def caught_at_fpr(self, fpr: float | None) -> npt.NDArray[np.bool_] | None:
        """For each spam / bec row of the fixed set: caught by this model's ranking at a cut letting
        `fpr` of its ham through. Two models compared at one operating point, free of where each one's
        validation put its thresholds."""
        bad = self.y != HAM
        if fpr is None or not bad.any():
            return None
        cut = threshold_for_fpr(self.not_ham[self.y == HAM], fpr)
        caught: npt.NDArray[np.bool_] = self.not_ham[bad] >= cut
        return caught

    def recall_at_fpr(self, fpr: float | None) -> float | None:
        caught = self.caught_at_fpr(fpr)
        return None if caught is None else float(caught.mean())


def paired_noise(a: npt.NDArray[np.bool_] | None, b: npt.NDArray[np.bool_] | None) -> float:
    """Two standard errors of the difference between two recalls measured on the same rows: only the
    rows the models disagree on vary (McNemar), so it is 2 * sqrt(disagreements) / rows."""
    if a is None or b is None or not len(a):
        return 0.0
    return 2.0 * math.sqrt(float((a != b).sum())) / len(a)


def caught_recall(m: Metrics) -> float | None:
    """spam + bec rows not predicted ham, pooled (either way the message is not delivered as clean)."""
    rows = m.confusion[1:]
    total = sum(sum(r) for r in rows)
    return (total - sum(r[HAM] for r in rows)) / total if total else None


def score(name: str, probs: Probs, recent: Probs, ev: EvalSet, t: Thresholds) -> Scored:
    cuts = {"quarantine": (t.spam_quarantine, t.bec_quarantine), "tag": (t.spam_tag, t.bec_tag)}
    fixed = {lvl: sliced_metrics(ev.y, decide(probs, *cuts[lvl]), ev.corpora) for lvl in LEVELS}
    rec = {
        lvl: sliced_metrics(ev.y_recent, decide(recent, *cuts[lvl]), [RECENT] * len(ev.y_recent))["ALL"]
        for lvl in LEVELS
    }
    return Scored(name, t, fixed, rec, spam_score(probs), ev.y)


def thresholds_of(meta: Mapping[str, Mapping[str, float]]) -> Thresholds:
    return Thresholds(
        meta["spam"]["tag"], meta["spam"]["quarantine"], meta["bec"]["tag"], meta["bec"]["quarantine"]
    )


@dataclass(frozen=True)
class Check:
    what: str
    champion: float | None
    challenger: float | None
    limit: float | None
    ok: bool


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    checks: tuple[Check, ...] = field(default_factory=tuple)


def _no_worse(
    what: str, champ: float | None, chall: float | None, slack: float, higher_is_better: bool
) -> Check:
    """A metric the champion has no data for (None) cannot regress; one the challenger lacks fails."""
    if champ is None:
        return Check(what, champ, chall, None, True)
    limit = champ - slack if higher_is_better else champ + slack
    ok = chall is not None and (chall >= limit - 1e-12 if higher_is_better else chall <= limit + 1e-12)
    return Check(what, champ, chall, limit, ok)


def compare(champ: Scored, chall: Scored, fpr_tol: float, recall_tol: float) -> Decision:
    """The promotion rule (module docstring), at the quarantine level."""
    a, b = champ.fixed["quarantine"]["ALL"], chall.fixed["quarantine"]["ALL"]
    ra, rb = champ.recent["quarantine"], chall.recent["quarantine"]
    # Recall is compared at one operating point (the champion's own ham FPR on the fixed set), not at
    # each model's thresholds: those are set by the tail of a few hundred modern ham (thresholds.MODERN_HAM)
    # and move by more than the tolerance between any two fits (measured: a retrain on 16 labels moved
    # the quarantine cut 0.948 -> 0.968 and pooled recall 88.6 -> 84.0 % while tag-level recall rose).
    # The FPR check keeps each model's own thresholds: that is what the gateway will apply.
    # Its slack adds the comparison's own noise (two standard errors of a paired difference): a fixed
    # set of a few hundred spam, as on a subsample, cannot tell 0.2 points from chance.
    matched = a.ham_fpr
    caught_a, caught_b = champ.caught_at_fpr(matched), chall.caught_at_fpr(matched)
    checks = (
        _no_worse("fixed set: pooled ham FPR", a.ham_fpr, b.ham_fpr, fpr_tol, higher_is_better=False),
        _no_worse(
            "fixed set: spam+bec recall at the champion's ham FPR",
            champ.recall_at_fpr(matched),
            chall.recall_at_fpr(matched),
            recall_tol + paired_noise(caught_a, caught_b),
            True,
        ),
        _no_worse("recent labels: spam+bec recall", caught_recall(ra), caught_recall(rb), recall_tol, True),
        _no_worse("recent labels: ham FPR", ra.ham_fpr, rb.ham_fpr, fpr_tol, higher_is_better=False),
    )
    failed = [c for c in checks if not c.ok]
    if failed:
        why = "; ".join(
            f"{c.what} {_pct(c.challenger)} vs champion {_pct(c.champion)} (limit {_pct(c.limit)})"
            for c in failed
        )
        return Decision(False, f"refused: {why}", checks)
    return Decision(True, "promoted: no check worse than the champion (within tolerance)", checks)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4%}"


# --- report ---------------------------------------------------------------------------------------


def _metrics_json(s: Scored) -> dict[str, Any]:
    return {
        "name": s.name,
        "thresholds": s.thresholds.as_dict(),
        "fixed": {
            lvl: {k: {**m.as_dict(), "spam_bec_recall": caught_recall(m)} for k, m in by.items()}
            for lvl, by in s.fixed.items()
        },
        "recent": {lvl: {**m.as_dict(), "spam_bec_recall": caught_recall(m)} for lvl, m in s.recent.items()},
    }


def _table(models: Sequence[Scored], level: str) -> list[str]:
    lines = [
        f"### {level} level",
        "",
        "| model | slice | n | ham FPR | spam recall | bec recall | spam+bec |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in models:
        for key, m in [*s.fixed[level].items(), (RECENT, s.recent[level])]:
            lines.append(
                f"| {s.name} | {key} | {m.n} | {_pct(m.ham_fpr)} | {_pct(m.spam_recall)} | "
                f"{_pct(m.bec_recall)} | {_pct(caught_recall(m))} |"
            )
    return [*lines, ""]


def write_report(out: Path, summary: Mapping[str, Any], models: Sequence[Scored], decision: Decision) -> Path:
    """report.md for people, retrain.json for scripts; both say what was compared and why."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        **summary,
        "decision": {
            "promote": decision.promote,
            "reason": decision.reason,
            "checks": [asdict(c) for c in decision.checks],
        },
        "models": [_metrics_json(s) for s in models],
    }
    (out / "retrain.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    lines = [
        f"# Retrain {summary['started']}",
        "",
        f"**{decision.reason}**",
        "",
        "Compared on the test split of the base corpora (fixed) and the held-back recent "
        "labels, each model at its own thresholds; the promotion rule uses the quarantine level.",
        "",
        "| check | champion | challenger | limit | ok |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {c.what} | {_pct(c.champion)} | {_pct(c.challenger)} | {_pct(c.limit)} | "
        f"{'yes' if c.ok else 'NO'} |"
        for c in decision.checks
    ]
    lines += [
        "",
        "## Data",
        "",
        "```",
        json.dumps(summary.get("data", {}), indent=2),
        "```",
        "",
        "## Metrics",
        "",
    ]
    for level in LEVELS:
        lines += _table(models, level)
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return out


# --- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainResult:
    promoted: bool
    reason: str
    challenger: str
    champion: str | None
    report_dir: Path
    candidate: Path


def _load_champion(models_dir: Path) -> tuple[Classifier | None, str | None]:
    """The current model, or None with the reason when there is none to defend: no current model, or
    one of another feature schema (this code cannot run it, nor can the gateways once upgraded to it:
    the upgrade's first retrain replaces it). Any other failure to load it raises MilterError: before,
    it counted as "no champion" and the challenger was promoted uncompared (a champion caught in the
    middle of a manual promote, a damaged file). The gateways keep serving what they loaded; the next
    run, after a fix or `milter model rollback`, compares again."""
    path = models_dir / "current.onnx"
    if not path.exists():
        return None, f"no current model in {models_dir}"
    try:
        return Classifier.load(path), None
    except SchemaMismatchError as exc:  # a champion this code cannot run is no champion to defend
        return None, f"current model unusable: {exc}"
    except MilterError as exc:
        raise MilterError(
            f"current model {path} cannot be loaded ({exc}): a challenger is not promoted without the "
            "comparison; fix the current model or roll it back (milter model rollback), then run again"
        ) from exc


def _locations(args: argparse.Namespace) -> tuple[str, Path, Protected, bool]:
    """Store URL, models folder, protected identities, and whether the fleet's registry is the store's."""
    cfg = load_config(args.config)
    models_dir = args.models_dir or registry_dir(cfg.model.path)  # ConfigError: a pinned model
    protected = Protected(domains=cfg.policy.protected_domains, names=cfg.policy.protected_names)
    return args.db or cfg.store.url, models_dir, protected, cfg.model.registry == "store"


def install(models_dir: Path, candidate: Path, fleet_url: str | None) -> None:
    """Promote `candidate` here (validated, atomic swap) and, with the store's registry (`fleet_url`),
    publish it as the fleet's current model: every node then adopts it (milter.gateway.fleet). Without
    that, this node's own follower would put the fleet's older model back at its next poll."""
    promote(models_dir, candidate)  # validates again and swaps atomically; ModelError = an error exit
    if fleet_url is not None:
        with Store.open(fleet_url) as store:
            fleet_promote(store, candidate, None)


def _evaluate_both(
    champion: Classifier | None, challenger: Classifier, thresholds: Thresholds, ev: EvalSet
) -> list[Scored]:
    """Both models scored as the gateway scores (milter.classifier: the tensor graph on CUDA where there
    is one, else the TreeEnsemble graph on the CPU; both within 1e-5 of LightGBM), in one call per model:
    the whole fixed set and the recent labels as one batch."""
    both = np.concatenate([ev.X, ev.X_recent])
    probs = challenger.predict(both)
    out = [score(challenger.name, probs[: len(ev.y)], probs[len(ev.y) :], ev, thresholds)]
    if champion is not None:
        cp = champion.predict(both)
        out.insert(
            0,
            score(
                champion.name,
                cp[: len(ev.y)],
                cp[len(ev.y) :],
                ev,
                thresholds_of(champion.metadata.thresholds),
            ),
        )
    return out


def _same_graph(champion: Path, challenger: bytes) -> bool:
    """Same trees and thresholds. Not the file bytes: the converter orders its opset imports by set
    iteration, which varies with PYTHONHASHSEED, so two identical fits can differ in the header."""
    try:
        return bool(onnx.load(str(champion)).graph == onnx.load_from_string(challenger).graph)
    except (OSError, ValueError):  # unreadable champion: it cannot be the same model
        return False


def _decide(
    champion: Classifier | None,
    missing: str | None,
    challenger: Challenger,
    models: Sequence[Scored],
    args: argparse.Namespace,
) -> Decision:
    if champion is None:
        return Decision(True, f"promoted: {missing}")
    decision = compare(models[0], models[1], args.fpr_tolerance, args.recall_tolerance)
    if decision.promote and _same_graph(champion.path, challenger.onnx_bytes):
        # No new labels: the deterministic fit reproduces the champion. Promoting it again gains nothing
        # and could clash with its history entry (same name, other creation time in the metadata).
        return Decision(False, "refused: the challenger is identical to the champion", decision.checks)
    return decision


@dataclass(frozen=True)
class Engine:
    """Where the trees grow and stale messages are re-extracted: here (default) or on Dask (--dask)."""

    trees: mdl.TreeFitter = mdl.local_trees
    recompute: Recompute | None = None
    describe: Callable[[], dict[str, Any]] | None = None  # the model metadata's `fitted_on`, if any


@contextmanager
def engine(args: argparse.Namespace, protected: Protected) -> Iterator[Engine]:
    """This process, or a Dask client for `--dask` (connected first: a bad address fails before the
    corpora load; a LocalCluster is closed at the end)."""
    if not args.dask:
        yield Engine()
        return
    from training import dask_retrain as dr  # imports dask only when asked for

    with dr.connect(args.dask) as client:
        trees = dr.DaskTrees(client, args.dask)

        def recompute(
            items: Sequence[tuple[int, bytes, Envelope]],
        ) -> list[tuple[int, FloatArray | None, str | None]]:
            return dr.extract_bag(client, items, args.features_module, protected)

        yield Engine(trees, recompute, trees.describe)


RUN_LOCK = ".retrain.lock"


@contextmanager
def one_run_at_a_time(models_dir: Path) -> Iterator[None]:
    """An exclusive lock on the models folder for the whole run: a manual run beside the nightly one
    would fit the same labels twice, race on the caches and promote twice. The second one stops at
    once (MilterError, exit 1) rather than wait hours for the first."""
    models_dir.mkdir(parents=True, exist_ok=True)
    with (models_dir / RUN_LOCK).open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MilterError(
                f"another milter-retrain is running on {models_dir} (it holds {RUN_LOCK}); not started"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: In the reports folder: how the last run ended, for a monitoring check (a failed night was in the
#: journal only).
LAST_RUN = "last-run.json"


def reports_dir(args: argparse.Namespace, models_dir: Path) -> Path:
    return args.report or models_dir.parent / "reports"


def run(args: argparse.Namespace) -> RetrainResult:
    url, models_dir, protected, fleet = _locations(args)
    reports = reports_dir(args, models_dir)
    # the outcome is recorded under the lock: a run refused because another holds it records nothing,
    # or a manual try beside the nightly run would report an error for a night that is going fine
    with one_run_at_a_time(models_dir):
        try:
            with engine(args, protected) as eng:
                result = _run(args, eng, url, models_dir, protected, fleet)
        except Exception as exc:
            write_last_run(reports, {"outcome": "error", "reason": str(exc)})
            raise
        write_last_run(reports, {
            "outcome": "promoted" if result.promoted else "refused", "reason": result.reason,
            "challenger": result.challenger, "champion": result.champion, "report": str(result.report_dir),
        })
    return result


def write_last_run(reports: Path, fields: Mapping[str, Any]) -> None:
    """`reports/last-run.json`: the outcome (promoted, refused, error), its reason and when, written
    atomically; a failure to write it is logged, never the run's outcome."""
    record = {"finished": datetime.now(UTC).isoformat(timespec="seconds"), **fields}
    try:
        reports.mkdir(parents=True, exist_ok=True)
        write_atomic(reports / LAST_RUN, json.dumps(record, indent=1) + "\n")
    except OSError as exc:
        log.error("cannot write %s: %s", reports / LAST_RUN, exc)


def _run(
    args: argparse.Namespace, eng: Engine, url: str, models_dir: Path, protected: Protected, fleet: bool
) -> RetrainResult:
    started, t0 = datetime.now(UTC), time.monotonic()
    _load_champion(models_dir)  # before the fit: a champion that cannot be compared fails the run early
    features, code_version = _features(args.features_module)
    with Store.open(url) as store:
        labels = load_labelled(store, features, protected, eng.recompute)
    train_rows, recent_rows = labels.split(args.holdout_every)
    log.info(
        "store labels: %s; %d train, %d held back", dict(labels.counts), len(train_rows), len(recent_rows)
    )
    ds = load_base(args, features, code_version)
    challenger = fit_challenger(args, features, code_version, ds, labels, train_rows, eng.trees)
    if eng.describe is not None:
        challenger.meta["fitted_on"] = eng.describe()
    te = ds.rows(TEST)
    ev = EvalSet(
        ds.X[te],
        ds.y[te],
        tuple(ds.messages[i].corpus for i in te),
        labels.X[recent_rows],
        labels.y[recent_rows],
    )
    champion, missing = _load_champion(models_dir)
    report_dir = reports_dir(args, models_dir) / f"retrain-{started:%Y%m%dT%H%M%SZ}"
    # written first so that the challenger is loaded and scored as the gateway will load it (its files
    # and digests checked, the graph picked by provider), not from the bytes in memory
    candidate, _ = write_model(
        report_dir / "candidate", challenger.onnx_bytes, challenger.meta, challenger.explainer,
        challenger.tensor_onnx,
    )
    scorer = Classifier.load(candidate)
    models = _evaluate_both(champion, scorer, challenger.thresholds, ev)
    decision = _decide(champion, missing, challenger, models, args)
    if args.dry_run:
        decision = Decision(
            False, f"dry run, not promoted (would have been {decision.reason})", decision.checks
        )
    if decision.promote:
        install(models_dir, candidate, url if fleet else None)
    summary = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - t0, 1),
        "models_dir": str(models_dir),
        "champion": champion.name if champion else None,
        "challenger": challenger.meta["name"],
        "dry_run": args.dry_run,
        "tolerances": {"ham_fpr": args.fpr_tolerance, "recall": args.recall_tolerance},
        # which graph and provider scored each model on the fixed set (milter.classifier)
        "scored_with": {
            "champion": champion.describe() if champion else None,
            "challenger": scorer.describe(),
        },
        "data": {
            "base_rows": {"train": len(ds.rows(TRAIN)), "validation": len(ds.rows(VAL)), "test": len(te)},
            "max_per_group": args.max_per_group,
            "split_by": args.split_by,
            "labels": {
                **labels.counts,
                "train": len(train_rows),
                "held_back": len(recent_rows),
                "label_weight": args.label_weight,
                "holdout_every": args.holdout_every,
            },
        },
    }
    write_report(report_dir, summary, models, decision)
    _prune_candidates(report_dir.parent, KEEP_CANDIDATES)
    return RetrainResult(
        decision.promote,
        decision.reason,
        str(challenger.meta["name"]),
        champion.name if champion else None,
        report_dir,
        candidate,
    )


#: Runs whose candidate model is kept in their report folder; older ones keep only their report.
KEEP_CANDIDATES = 5


def _prune_candidates(reports: Path, keep: int) -> None:
    """Delete the candidate models of all but the `keep` newest runs (some 20 MB each, every night:
    gigabytes a year beside the store). A promoted one lives on in the registry's history/; a refused
    one is kept a few nights for a look. Reports (report.md, summary) stay."""
    runs = sorted(p for p in reports.glob("retrain-*") if (p / "candidate").is_dir())
    for old in runs[:-keep] if keep > 0 else runs:
        shutil.rmtree(old / "candidate", ignore_errors=True)
        log.info("removed the candidate model of %s (kept: the %d newest)", old.name, keep)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        result = run(args)
    except (MilterError, CorporaError, mdl.ExportMismatchError, OSError, ValueError) as exc:
        log.error("retrain failed: %s", exc)
        print(f"milter-retrain: ERROR {exc}", file=sys.stderr)
        return 1
    verb = "PROMOTED" if result.promoted else "REFUSED"
    print(
        f"milter-retrain: {verb} {result.challenger} (champion {result.champion}): {result.reason} "
        f"[report {result.report_dir}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
