"""Model metadata (what the classifier checks at load, what a reviewer needs) and atomic writes to models/."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from importlib import metadata as importlib_metadata
from itertools import pairwise
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from milter.explain import EXPLAINER_FORMAT, EXPLAINER_SUFFIX
from milter.types import CLASS_NAMES
from training import model as mdl
from training.dataset import SPLIT_NAMES, TRAIN, Dataset
from training.evaluate import Metrics
from training.tensor_export import TENSOR_NAME  # the same trees as standard tensor operators (CUDA)
from training.thresholds import DISABLED, SCORE_DEFINITIONS, Thresholds

FORMAT_VERSION = 1
ONNX_NAME, META_NAME = "current.onnx", "current.json"
EXPLAINER_NAME = "current" + EXPLAINER_SUFFIX  # the LightGBM model text, for explanations
TOKEN_EXAMPLES = 3  # commonest training n-grams kept per hashed word bucket, to name the bucket

LICENCE_NOTE = (
    "The phishing (bec) class of this model is trained on Phishing Pot (rf-peixoto/phishing_pot), "
    "licensed CC BY-NC 4.0: attribution required, non-commercial use only. The shipped model is trained "
    "on it, so the CC BY-NC 4.0 terms may apply to the model. For a model free of that corpus, retrain "
    "with: milter-train --exclude-corpus phishing-pot (the bec class then has no training examples from "
    "it and its recall will drop). The other corpora: SpamAssassin public corpus and Enron-Spam "
    "(research use), public mailing-list archives, modern-bulk-ham (see ../shared/corpora/README.md)."
)
NO_PHISHING_POT_NOTE = "This model was trained without Phishing Pot (excluded with --exclude-corpus)."


def manifest_digest(shas: Sequence[str]) -> str:
    """sha256 over the sorted sha256 list of every message used (train, validation and test)."""
    return hashlib.sha256("\n".join(sorted(shas)).encode("ascii")).hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("lightgbm", "onnx", "onnxmltools", "onnxruntime", "numpy", "scikit-learn"):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def model_name(created: datetime, onnx_bytes: bytes) -> str:
    return f"mailsift-{created:%Y%m%d}-{hashlib.sha256(onnx_bytes).hexdigest()[:8]}"


def _salted(args: argparse.Namespace) -> str:
    """How the sender split was drawn, where not the default (`milter-train --split-salt`)."""
    salt = getattr(args, "split_salt", "")
    return f" salted with {salt!r}" if salt else ""


def _corpus_counts(ds: Dataset) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (corpus, label), n in sorted(Counter(m.group for m in ds.messages).items()):
        out.setdefault(corpus, {})[label] = n
    return out


#: milter-train / milter-retrain options besides the seed and the data that change the fitted model.
RECIPE_KEYS = (
    "split_by",
    "split_salt",
    "corpus_balance",
    "modern_ham_weight",
    "modern_spam_weight",
    "sender_balance",
    "learning_rate",
    "max_rounds",
    "text_c",
    "text_grams",
    "gram_scale",
    "topics",
    "topic_vocab",
    "stage_labels",
    "label_weight",
    "language_adjust",
    "tree_words",
    "language_balance",
    "language_redistribute",
)


def _percent(rate: float) -> str:
    return f"{rate * 100:g} %"


def build_metadata(
    *,
    ds: Dataset,
    args: argparse.Namespace,
    features: ModuleType,
    model: mdl.Fitted,
    onnx_bytes: bytes,
    explainer: bytes,
    token_examples: Mapping[str, Sequence[str]],
    thresholds: Thresholds,
    results: Mapping[str, Mapping[str, Mapping[str, Metrics]]],
    gain: npt.NDArray[np.float64],
    max_diff: float,
    dropped: Mapping[str, int],
    tensor_graph: Mapping[str, Any] | None = None,
    params: Mapping[str, Any],
    created: datetime,
    code_version: str = "",
) -> dict[str, Any]:
    schema = features.SCHEMA
    booster = model.booster
    names = model.feature_names  # the trees' inputs: the schema's, then the text stage's
    total = float(gain.sum()) or 1.0
    top = np.argsort(-gain, kind="stable")[:50]
    excluded = sorted(set(args.exclude_corpus))
    return {
        "format_version": FORMAT_VERSION,
        "name": model_name(created, onnx_bytes),
        "created": created.isoformat(timespec="seconds"),
        "schema": {"version": schema.version, "digest": schema.digest, "feature_names": list(schema.names)},
        "feature_code": code_version,
        "class_names": list(CLASS_NAMES),
        "onnx": {
            "input": mdl.INPUT_NAME,
            "output": mdl.PROBA_OUTPUT,
            "opset": mdl.TARGET_OPSET,
            "file": ONNX_NAME,
            "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        },
        "explainer": {
            "file": EXPLAINER_NAME,
            "format": EXPLAINER_FORMAT,
            "sha256": hashlib.sha256(explainer).hexdigest(),
            "purpose": "TreeSHAP contributions (LightGBM pred_contrib) of the same trees as the ONNX graph",
            "token_examples": {k: list(v) for k, v in sorted(token_examples.items())},
        },
        # the compiled tensor graph (training/tensor_export.py): file, sha256, operators, parity
        **({"tensor_graph": dict(tensor_graph)} if tensor_graph is not None else {}),
        **({"text_stage": model.stage.as_json()} if model.stage is not None else {}),
        "thresholds": thresholds.as_dict(),
        "threshold_scores": SCORE_DEFINITIONS,
        "threshold_selection": {
            "split": "validation" if model.oof is None else "validation + training rows out of fold",
            "out_of_fold_folds": getattr(args, "threshold_folds", 0) if model.oof is not None else 0,
            "quarantine_ham_fpr": args.target_fpr,
            "tag_ham_fpr": args.tag_fpr,
            "rule": "strictest of: old ham pooled at the target, modern ham group at "
            f"{_percent(args.modern_tag_fpr)} / {_percent(args.modern_quarantine_fpr)}, "
            "each corpus at 3 % / 0.5 %",
            "disabled_value": DISABLED,
        },
        "training_data": {
            "manifest_digest": manifest_digest([m.sha256 for m in ds.messages]),
            "corpora": _corpus_counts(ds),
            "excluded_corpora": excluded,
            "max_per_group": args.max_per_group,
            "rows": {name: int((ds.split == k).sum()) for k, name in enumerate(SPLIT_NAMES)},
            "dropped": dict(dropped),
            "split": (
                "by sender (From domain; address for free-mail and a corpus's own domain): 20% test, "
                "10% validation, by hash" + _salted(args)
                if args.split_by == "sender"
                else f"time-ordered per {args.split_by} and label: newest 20% test, previous 10% validation"
            ),
        },
        "metrics": {
            level: {k: m.as_dict() for k, m in by["corpus"].items()} for level, by in results.items()
        },
        "libraries": library_versions(),
        "lightgbm": {
            "params": dict(params),
            "best_iteration": booster.best_iteration,
            "rounds": booster.current_iteration(),
        },
        "feature_importance_gain": [
            {"name": names[i], "gain": float(gain[i]), "share": float(gain[i]) / total}
            for i in top
            if gain[i] > 0
        ],
        "seed": args.seed,
        # the rest of the command line that decides the fit (weights, text stage), so that a model can
        # be refitted from its metadata alone
        "recipe": {key: getattr(args, key) for key in RECIPE_KEYS if hasattr(args, key)},
        "export": {"max_abs_diff": max_diff, "tolerance": mdl.PARITY_TOL},
        "licence": NO_PHISHING_POT_NOTE if "phishing-pot" in excluded else LICENCE_NOTE,
    }


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_model(
    out_dir: Path, onnx_bytes: bytes, meta: Mapping[str, Any], explainer: bytes,
    tensor_onnx: bytes | None = None,
) -> tuple[Path, Path]:
    """Write current.onnx, current.lgb.txt, current.tensor.onnx (when given), then current.json, each
    atomically (no half files). Without a tensor graph a stale one of an earlier model is removed.

    The JSON carries the other files' sha256, so a reader that catches them mid-swap can tell.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, meta_path = out_dir / ONNX_NAME, out_dir / META_NAME
    _write_atomic(onnx_path, onnx_bytes)
    _write_atomic(out_dir / EXPLAINER_NAME, explainer)
    if tensor_onnx is not None:
        _write_atomic(out_dir / TENSOR_NAME, tensor_onnx)
    else:
        (out_dir / TENSOR_NAME).unlink(missing_ok=True)
    _write_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return onnx_path, meta_path


BucketTokens = Callable[[bytes], dict[str, list[str]]]


def _internal_bucket_tokens() -> BucketTokens | None:
    """Rebuild milter.features' token hashing from its parts (subject + body, unigrams and bigrams).

    Used only while the features module has no `bucket_tokens` of its own; None if its internals moved.
    """
    try:
        from milter.features import text as ftext
        from milter.features.context import Protected, build
        from milter.parse import parse
        from milter.types import Envelope

        names, bucket, tokens = ftext.HASH_NAMES, ftext.bucket, ftext.tokens
    except (ImportError, AttributeError):
        return None

    def fn(raw: bytes) -> dict[str, list[str]]:
        parsed = parse(raw)
        ctx = build(parsed, Envelope(), Protected())
        toks = tokens(parsed.subject + "\n" + ctx.body_text)
        out: dict[str, list[str]] = {}
        for gram in [*toks, *map(" ".join, pairwise(toks))]:
            out.setdefault(names[bucket(gram)], []).append(gram)
        return out

    return fn


def _bucket_counter(features: ModuleType) -> BucketTokens | None:
    """The features module's `bucket_tokens(raw) -> {feature name: [tokens]}` when it has one, else the
    hashing rebuilt from milter.features' parts; None when neither works."""
    fn: BucketTokens | None = getattr(features, "bucket_tokens", None)
    if fn is None and features.__name__ == "milter.features":
        fn = _internal_bucket_tokens()
    return fn


def _bucket_counts(fn: BucketTokens, ds: Dataset, sample: int) -> dict[str, Counter[str]]:
    """Per hashed word bucket, its tokens counted over a sample of training messages (a sample is
    enough to name a bucket; a message that cannot be read or parsed is skipped: a reading aid)."""
    seen: dict[str, Counter[str]] = {}
    train_rows = np.flatnonzero(ds.split == TRAIN)
    for i in train_rows[:: max(1, len(train_rows) // sample)]:
        try:
            found = fn(ds.messages[i].path.read_bytes())
        except Exception:
            continue
        for name, toks in found.items():
            seen.setdefault(name, Counter()).update(toks)
    return seen


def bucket_token_map(
    features: ModuleType, ds: Dataset, gain: npt.NDArray[np.float64], sample: int = 800
) -> dict[str, list[str]] | None:
    """For hashed token buckets among the top 30 by gain, the commonest training tokens that fall in them;
    None when the hashing cannot be rebuilt (the report says so)."""
    fn = _bucket_counter(features)
    if fn is None:
        return None
    top = {ds.feature_names[i] for i in np.argsort(-gain)[:30] if gain[i] > 0}
    counts = _bucket_counts(fn, ds, sample)
    return {name: [t for t, _ in c.most_common(6)] for name, c in counts.items() if name in top}


def token_examples(features: ModuleType, ds: Dataset, sample: int = 600) -> dict[str, list[str]]:
    """Every hashed word bucket -> its commonest n-grams in a sample of training messages.

    Explanations name a bucket by these when they cannot show the message's own words (the gateway's
    header, which is written without re-reading the text); empty when the hashing cannot be rebuilt.
    """
    fn = _bucket_counter(features)
    if fn is None:
        return {}
    counts = _bucket_counts(fn, ds, sample)
    return {name: [t[:40] for t, _ in c.most_common(TOKEN_EXAMPLES)] for name, c in sorted(counts.items())}
