"""`milter-train`: corpora -> features -> LightGBM -> ONNX (parity-checked) -> thresholds -> report.

Run from a checkout with ``../shared/corpora`` beside it (or pass --corpora-src). Everything that decides
the result is recorded in the metadata: seed, data digest, schema, library versions, thresholds.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from milter.stacking import id_columns
from milter.types import CLASS_NAMES
from training import model as mdl
from training.artifacts import bucket_token_map, build_metadata, token_examples, write_model
from training.corpora import attach_dates, default_corpora_src, load_corpora
from training.dataset import (
    SPLIT_NAMES,
    TEST,
    TRAIN,
    VAL,
    Dataset,
    build_dataset,
    code_fingerprint,
    sender_keys,
    subsample,
)
from training.evaluate import acceptance, evaluate
from training.languages import balance_languages, leans, row_languages
from training.report import HardHam, load_hard_ham, production_rows, top_features, write_report
from training.tensor_export import export_tensor_graph
from training.thresholds import (
    HAM,
    MODERN_QUARANTINE_FPR,
    MODERN_TAG_FPR,
    Thresholds,
    choose_thresholds,
    decide,
    threshold_breakdown,
)
from training.traps import hide_artefacts, label_noise

log = logging.getLogger("milter-train")


def repo_root() -> Path:
    """The checkout this package lives in (editable install), else the working directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    root = repo_root()
    p = argparse.ArgumentParser(prog="milter-train", description=__doc__)
    p.add_argument(
        "--corpora-src",
        type=Path,
        default=default_corpora_src(root),
        help="folder with the corpus archives and their unpack script (default: %(default)s)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=root / ".cache",
        help="feature and date caches (default: %(default)s)",
    )
    p.add_argument(
        "--corpora-dir",
        type=Path,
        default=root / ".cache" / "corpora",
        help="where the corpora are (or get) unpacked (default: %(default)s)",
    )
    p.add_argument(
        "--exclude-corpus",
        action="append",
        default=[],
        metavar="NAME",
        help="leave a corpus out entirely (repeatable), e.g. phishing-pot for a non-commercial-free model",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=root / "models", help="where current.onnx/.json go")
    p.add_argument("--report", type=Path, default=root / "reports", help="reports go to REPORT/<model name>/")
    p.add_argument(
        "--target-fpr",
        type=float,
        default=0.001,
        help="pooled old-ham FPR for the quarantine thresholds (each corpus also at most 0.5 %%, modern "
        "ham at --modern-quarantine-fpr: training/thresholds.py)",
    )
    p.add_argument(
        "--tag-fpr",
        type=float,
        default=0.004,
        help="pooled old-ham FPR for the tag thresholds (each corpus also at most 3 %%, modern ham at "
        "--modern-tag-fpr)",
    )
    p.add_argument(
        "--modern-tag-fpr",
        type=float,
        default=MODERN_TAG_FPR,
        help="the modern ham group's FPR for the tag thresholds (default: %(default)s)",
    )
    p.add_argument(
        "--modern-quarantine-fpr",
        type=float,
        default=MODERN_QUARANTINE_FPR,
        help="the modern ham group's FPR for the quarantine thresholds (default: %(default)s)",
    )
    p.add_argument(
        "--max-per-group",
        type=int,
        default=None,
        help="at most N messages per (corpus, label), for a fast smoke run",
    )
    p.add_argument(
        "--max-rounds",
        type=int,
        default=1000,
        help="boosting rounds at most (early stopping usually ends sooner)",
    )
    p.add_argument("--learning-rate", type=float, default=mdl.FitConfig.learning_rate)
    p.add_argument(
        "--corpus-balance",
        type=float,
        default=mdl.FitConfig.corpus_balance,
        help="within a class, a corpus of n messages weighs n**B in total (0: equal corpora, 1: per message)",
    )
    p.add_argument(
        "--modern-ham-weight",
        type=float,
        default=mdl.FitConfig.modern_ham_weight,
        help="multiply the modern ham corpora's share of the ham class (default: %(default)s)",
    )
    p.add_argument(
        "--modern-spam-weight",
        type=float,
        default=mdl.FitConfig.modern_spam_weight,
        help="multiply the modern spam corpora's share of the spam class (default: %(default)s)",
    )
    p.add_argument(
        "--sender-balance",
        type=float,
        default=mdl.FitConfig.sender_balance,
        help="within a class and corpus, a sender of n messages weighs n**B in total (1: per message; "
        "default: %(default)s)",
    )
    p.add_argument(
        "--text-c",
        type=float,
        default=mdl.FitConfig.text_c,
        help="L2 strength (sklearn C) of the text stage's regressions; 0: none (default: %(default)s)",
    )
    p.add_argument(
        "--text-grams",
        choices=("none", "unwanted", "both"),
        default=mdl.FitConfig.text_grams,
        help="which text-stage regressions also read the 2^18 hashed grams (default: %(default)s)",
    )
    p.add_argument(
        "--gram-scale",
        type=float,
        default=mdl.FitConfig.gram_scale,
        help="strength of the hashed grams against the stage's L2 penalty (default: %(default)s)",
    )
    p.add_argument(
        "--topics",
        type=int,
        default=mdl.FitConfig.topics,
        help="topic columns the text stage gives the trees (an SVD of the grams' tf-idf); 0: none "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--topic-vocab",
        type=int,
        default=mdl.FitConfig.topic_vocab,
        help="the commonest grams of the training corpora the topics are read from (default: %(default)s)",
    )
    p.add_argument(
        "--stage-labels",
        choices=("none", "ham", "all"),
        default=mdl.FitConfig.stage_labels,
        help="which admin labels (milter-retrain, make unseen) the text stage also learns from; "
        "the trees learn from all (default: %(default)s)",
    )
    p.add_argument(
        "--language-adjust",
        type=float,
        default=mdl.FitConfig.language_adjust,
        help="learn the text stage with the rows' language as a column it does not ship, and the topics "
        "from English rows only (training/languages.py); the column's scale, 0: off (default: %(default)s)",
    )
    p.add_argument(
        "--language-balance",
        type=float,
        default=mdl.FitConfig.language_balance,
        help="weigh down the spam and bec rows of a language those classes hold more of than ham does, "
        "until its lean is r**(1-P) (training/languages.py); 0: off, 1: no lean (default: %(default)s)",
    )
    p.add_argument(
        "--no-language-redistribute",
        dest="language_redistribute",
        action="store_false",
        help="with --language-balance, the weight taken from a leaning language is not given back to the "
        "class's other rows: the class's total shrinks (default: given back)",
    )
    p.add_argument(
        "--no-tree-words",
        dest="tree_words",
        action="store_false",
        help="the trees do not read the hashed word columns themselves, only the text stage's scores "
        "and topics made from them (measured with and without --language-adjust: docs/DETECTION.md)",
    )
    p.add_argument(
        "--threshold-folds",
        type=int,
        default=mdl.FitConfig.threshold_folds,
        help="choose thresholds on validation and on the training rows scored out of fold by this many "
        "sender folds; 0: validation only (default: %(default)s)",
    )
    p.add_argument(
        "--split-by",
        choices=("sender", "corpus", "subcollection"),
        # per sender (default): no sender domain on two sides, the production question for a new site's
        # mail. The time splits ask about newer mail of known senders: per sub-collection every source has
        # its newest 20% in test; per corpus, whole young sources would land only in test.
        default="sender",
        help="split by sender (From domain; address for free-mail; default), or by time within "
        "(corpus, sub-collection, label) or (corpus, label) groups",
    )
    p.add_argument(
        "--split-salt",
        default="",
        metavar="TEXT",
        help="draw another sender split (the same shares, other senders in test) to see how the figures "
        "depend on which senders the default split put in test; bench/sender_splits.py runs several",
    )
    p.add_argument("--processes", type=int, default=2, help="feature extraction processes")
    p.add_argument("--features-module", default="milter.features", help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


@dataclass(frozen=True)
class TrainResult:
    name: str
    onnx_path: Path
    metadata_path: Path
    report_path: Path
    passed: bool


def _features(module_name: str) -> tuple[ModuleType, str]:
    """The features module and a fingerprint of its code, taken right after import (what will run)."""
    module = importlib.import_module(module_name)
    for attr in ("SCHEMA", "extract"):
        if not hasattr(module, attr):
            raise SystemExit(f"{module_name} has no {attr}: the feature module is not ready")
    return module, code_fingerprint(feature_code_files(module))


def feature_code_files(features: ModuleType) -> list[Path]:
    """Sources whose change must invalidate the feature cache: the features package and the parser.

    Not describe.py: it words explanations and computes no feature (a rewording must not cost a
    three-minute re-extraction of the corpora)."""
    files: list[Path] = []
    for mod in (features, importlib.import_module("milter.parse")):
        if mod.__file__:
            src = Path(mod.__file__)
            files += sorted(src.parent.glob("*.py")) if src.name == "__init__.py" else [src]
    return [f for f in files if f.name != "describe.py"]


def load_dataset(
    args: argparse.Namespace, features: ModuleType, code_version: str, drop: frozenset[str] = frozenset()
) -> tuple[Dataset, dict[str, int]]:
    """Corpora -> dedupe -> (minus `drop`, sha256s held out) -> subsample -> dates -> features + split."""
    t0 = time.monotonic()
    messages, dropped_dup = load_corpora(args.corpora_dir, args.corpora_src, args.exclude_corpus)
    if drop:
        messages = [m for m in messages if m.sha256 not in drop]
    messages = attach_dates(
        subsample(messages, args.max_per_group, args.seed), args.cache_dir, args.processes
    )
    log.info(
        "%d messages after dedupe (%d duplicates dropped) in %.1fs",
        len(messages),
        dropped_dup,
        time.monotonic() - t0,
    )
    dataset, failed = build_dataset(
        messages,
        features.SCHEMA,
        features.extract,
        args.cache_dir,
        args.processes,
        progress=not args.no_progress,
        code_version=code_version,
        split_by=args.split_by,
        split_salt=getattr(args, "split_salt", ""),  # milter-train only: retrain keeps the shipped split
    )
    if failed > 0.01 * max(1, len(messages)):
        raise SystemExit(f"feature extraction failed on {failed} of {len(messages)} messages")
    noisy = label_noise(
        [m.corpus for m in dataset.messages],
        [m.label for m in dataset.messages],
        dataset.X[:, dataset.feature_names.index("snd_auto_report")],
    )
    if noisy.any():
        keep = np.flatnonzero(~noisy)
        dataset = Dataset(
            tuple(dataset.messages[i] for i in keep),
            dataset.X[keep],
            dataset.y[keep],
            dataset.split[keep],
            dataset.feature_names,
        )
        log.info("dropped %d machine-generated reports labelled spam (traps.NOISY_REPORTS)", int(noisy.sum()))
    log.info("features ready for %d rows in %.1fs (%d failed)", len(dataset.y), time.monotonic() - t0, failed)
    return dataset, {"duplicates": dropped_dup, "failed_extraction": failed, "label_noise": int(noisy.sum())}


@dataclass(frozen=True)
class Exported:
    """A fitted model as it ships: ONNX bytes, thresholds, test metrics and metadata."""

    onnx_bytes: bytes
    explainer: bytes  # the LightGBM model text of the same trees (milter.explain)
    feature_names: tuple[str, ...]  # the trees' inputs: the schema's, then the text stage's
    meta: dict[str, Any]
    thresholds: Thresholds
    results: Any
    p_val: npt.NDArray[np.float32]
    p_test: npt.NDArray[np.float32]
    gain: npt.NDArray[np.float64]
    tensor_onnx: bytes  # the same trees as standard tensor operators, for the CUDA provider


def export_and_evaluate(
    ds: Dataset,
    model: mdl.Fitted,
    *,
    args: argparse.Namespace,
    features: ModuleType,
    cfg: mdl.FitConfig,
    code_version: str,
    dropped: dict[str, int],
    extra_X: npt.NDArray[np.float32] | None = None,
    extra_y: npt.NDArray[np.int64] | None = None,
) -> Exported:
    """Export to ONNX, check parity on every validation and test row (and `extra_X`, e.g. store labels),
    choose thresholds (`threshold_rows`), evaluate on test, build the metadata. Shared by milter-train and
    milter-retrain so both ship models made the same way."""
    tr, va, te = ds.rows(TRAIN), ds.rows(VAL), ds.rows(TEST)
    corpora = [m.corpus for m in ds.messages]
    onnx_bytes = mdl.to_onnx(model, ds.X.shape[1]).SerializeToString()
    parts = [ds.X[va], ds.X[te]] + ([extra_X] if extra_X is not None and len(extra_X) else [])
    check = np.concatenate(parts)
    probs, stage_scores = mdl.onnx_outputs(onnx_bytes, check)
    # the trees on the graph's own text-stage scores: float32 summation order must not flip a split
    extended = check if stage_scores is None else np.hstack([check, stage_scores])
    reference = mdl.predict_extended(model.booster, extended)
    max_diff = mdl.check_parity(reference, probs)
    explainer = mdl.explainer_text(model, onnx_bytes, check)
    # the same trees for the CUDA provider, held to the same rows and bound (training/tensor_export.py)
    tensor = export_tensor_graph(explainer.decode("utf-8"), onnx_bytes, check, reference)
    p_val, p_test = probs[: len(va)], probs[len(va) : len(va) + len(te)]
    seen = ds.y[tr] if extra_y is None else np.concatenate([ds.y[tr], extra_y])
    trained = frozenset(int(k) for k in np.unique(seen))
    p_cut, y_cut, c_cut = threshold_rows(ds, va, tr, p_val, model.oof)
    thresholds = choose_thresholds(
        p_cut, y_cut, c_cut, args.target_fpr, args.tag_fpr, trained,
        modern_tag_fpr=args.modern_tag_fpr, modern_quarantine_fpr=args.modern_quarantine_fpr,
    )  # fmt: skip
    results = evaluate(
        p_test, ds.y[te], [corpora[i] for i in te], [ds.messages[i].subcollection for i in te], thresholds
    )
    booster = model.booster
    gain = np.asarray(
        booster.feature_importance(importance_type="gain", iteration=booster.best_iteration or None),
        dtype=np.float64,
    )
    meta = build_metadata(
        ds=ds,
        args=args,
        features=features,
        model=model,
        onnx_bytes=onnx_bytes,
        explainer=explainer,
        token_examples=token_examples(features, ds),
        thresholds=thresholds,
        results=results,
        gain=gain,
        max_diff=max_diff,
        tensor_graph=tensor.entry(
            "every validation and test row" + (" and the store's labels" if len(parts) > 2 else "")
        ),
        dropped=dropped,
        params=mdl.lgb_params(cfg),
        code_version=code_version,
        created=datetime.now(UTC),
    )
    return Exported(
        onnx_bytes, explainer, model.feature_names, meta, thresholds, results, p_val, p_test, gain,
        tensor.data,
    )


def threshold_rows(
    ds: Dataset,
    va: npt.NDArray[np.intp],
    tr: npt.NDArray[np.intp],
    p_val: npt.NDArray[np.float32],
    oof: npt.NDArray[np.float64] | None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], list[str]]:
    """The rows thresholds are chosen on: validation `va`, and with `--threshold-folds` the corpus
    training rows `tr` (the first rows of the fit, in its order) scored out of fold too (`Fitted.oof`).
    Admin labels, which milter-retrain appends after them, stay out: a few dozen hand-picked rows are
    not a rate."""
    rows, probs = np.asarray(va), p_val
    if oof is not None:
        rows = np.concatenate([va, tr])
        probs = np.concatenate([p_val, oof[: len(tr)].astype(np.float32)])
    return probs, ds.y[rows], [ds.messages[i].corpus for i in rows]


def fit_config(args: argparse.Namespace) -> mdl.FitConfig:
    """The LightGBM settings from milter-train's (or milter-retrain's) command line."""
    return mdl.FitConfig(
        seed=args.seed,
        max_rounds=args.max_rounds,
        corpus_balance=args.corpus_balance,
        learning_rate=args.learning_rate,
        modern_ham_weight=args.modern_ham_weight,
        modern_spam_weight=args.modern_spam_weight,
        sender_balance=args.sender_balance,
        text_c=args.text_c,
        text_grams=args.text_grams,
        gram_scale=args.gram_scale,
        topics=args.topics,
        topic_vocab=args.topic_vocab,
        stage_labels=args.stage_labels,
        threshold_folds=args.threshold_folds,
        language_adjust=args.language_adjust,
        tree_words=args.tree_words,
        language_balance=args.language_balance,
        language_redistribute=args.language_redistribute,
    )


@dataclass(frozen=True)
class FitSetup:
    """What a fit needs besides the rows: settings, per-row weights, the split and each row's corpus."""

    cfg: mdl.FitConfig
    weights: npt.NDArray[np.float64]
    train: npt.NDArray[np.intp]
    val: npt.NDArray[np.intp]
    test: npt.NDArray[np.intp]
    corpora: list[str]
    X_train: npt.NDArray[np.float32]  # ds.X[train] with the corpora's artefact columns hidden (traps.py)
    groups: list[str]  # each row's sender (dataset.sender_key): the text stage's folds keep one together


def fit_setup(args: argparse.Namespace, ds: Dataset) -> FitSetup:
    """Shared by milter-train and milter-retrain; ValueError when a split is empty."""
    corpora = [m.corpus for m in ds.messages]
    cfg = fit_config(args)
    tr, va, te = ds.rows(TRAIN), ds.rows(VAL), ds.rows(TEST)
    if min(len(tr), len(va), len(te)) == 0:
        raise ValueError(f"empty split: train {len(tr)}, validation {len(va)}, test {len(te)}")
    senders = sender_keys(ds.messages)
    weights = mdl.sample_weights(
        ds.y,
        corpora,
        cfg.corpus_balance,
        cfg.modern_ham_weight,
        cfg.modern_spam_weight,
        senders=senders,
        sender_balance=cfg.sender_balance,
    )
    if cfg.language_balance > 0:
        languages = row_languages(ds.X, id_columns(ds.feature_names))
        before = leans(weights, ds.y, languages, HAM)
        weights = balance_languages(
            weights, ds.y, languages, cfg.language_balance, HAM, redistribute=cfg.language_redistribute
        )
        after = leans(weights, ds.y, languages, HAM)
        shown = (f"{CLASS_NAMES[k]} {lang} {before[k, lang]:.1f} -> {after[k, lang]:.1f}"
                 for k, lang in sorted(before))
        log.info("language balance %s: leans toward spam/bec %s", cfg.language_balance, ", ".join(shown))
    X_train = hide_artefacts(ds.X[tr], [corpora[i] for i in tr], ds.feature_names)
    return FitSetup(cfg, weights, tr, va, te, corpora, X_train, senders)


def run(args: argparse.Namespace) -> TrainResult:
    features, code_version = _features(args.features_module)
    ds, dropped = load_dataset(args, features, code_version)
    try:
        setup = fit_setup(args, ds)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    cfg, weights = setup.cfg, setup.weights
    tr, va, te = setup.train, setup.val, setup.test

    t0 = time.monotonic()
    fitted = mdl.fit(
        setup.X_train,
        ds.y[tr],
        weights[tr],
        ds.X[va],
        ds.y[va],
        weights[va],
        ds.feature_names,
        cfg,
        groups=[setup.groups[i] for i in tr],
    )
    log.info(
        "text stage and LightGBM: %d rounds (best %d) in %.1fs",
        fitted.booster.current_iteration(),
        fitted.booster.best_iteration,
        time.monotonic() - t0,
    )
    out = export_and_evaluate(
        ds, fitted, args=args, features=features, cfg=cfg, code_version=code_version, dropped=dropped
    )
    onnx_bytes, meta, thresholds, results, p_test, gain = (
        out.onnx_bytes,
        out.meta,
        out.thresholds,
        out.results,
        out.p_test,
        out.gain,
    )
    # Which corpus sets each threshold: the shipped one is the strictest of these.
    p_cut, y_cut, c_cut = threshold_rows(ds, va, tr, out.p_val, fitted.oof)
    meta["threshold_selection"]["per_corpus"] = threshold_breakdown(
        p_cut, y_cut, c_cut, args.target_fpr, args.tag_fpr
    )
    onnx_path, meta_path = write_model(args.out, onnx_bytes, meta, out.explainer, out.tensor_onnx)
    report_path = write_report(
        args.report / str(meta["name"]),
        meta,
        results,
        thresholds,
        p_test,
        ds.y[te],
        top_features(out.feature_names, gain, 30),
        bucket_token_map(features, ds, gain[: len(ds.feature_names)]),
        score_hard_ham(ds, onnx_bytes, thresholds),
    )
    passed = _print_summary(meta, results)
    return TrainResult(str(meta["name"]), onnx_path, meta_path, report_path, passed)


def score_hard_ham(ds: Dataset, onnx_bytes: bytes, t: Thresholds) -> list[HardHam]:
    """The fixed hardest-ham set (training/hard_ham.tsv), as far as it is in `ds`, scored by the export."""
    known = load_hard_ham()
    rows = np.array([i for i, m in enumerate(ds.messages) if m.sha256 in known], dtype=np.intp)
    if not rows.size:
        return []
    probs = mdl.onnx_probabilities(onnx_bytes, ds.X[rows])
    quarantined = decide(probs, t.spam_quarantine, t.bec_quarantine) != HAM
    tagged = decide(probs, t.spam_tag, t.bec_tag) != HAM
    out = []
    for j, i in enumerate(rows.tolist()):
        source, then = known[ds.messages[i].sha256]
        action = "quarantine" if quarantined[j] else "tag" if tagged[j] else "accept"
        score = float(probs[j, 1]) + float(probs[j, 2])
        out.append(HardHam(ds.messages[i].sha256, source, SPLIT_NAMES[ds.split[i]], score, action, then))
    return out


def _print_summary(meta: dict[str, Any], results: Any) -> bool:
    print("\nproduction question (test split): group, n, flagged, quarantined")
    for group, n, flagged, quarantined in production_rows(results):
        print(f"  {group:28s} {n:6d}  {_pct(flagged):>8}  {_pct(quarantined):>8}")
    per_corpus = {k: v for k, v in results["quarantine"]["corpus"].items() if k != "ALL"}
    rows = acceptance(per_corpus)
    print(f"\nmodel {meta['name']}  thresholds {meta['thresholds']}")
    print("acceptance on the test split (quarantine level, per corpus):")
    for corpus, name, value, target, ok in rows:
        klass = {"ham_fpr": 0, "spam_recall": 1, "bec_recall": 2}[name]
        n = sum(per_corpus[corpus].confusion[klass])  # messages of that class the number rests on
        print(f"  {corpus:22s} {name:12s} {value:.4f}  target {target:<6}  {'ok' if ok else 'FAIL'}  (n={n})")
    passed = all(r[4] for r in rows)
    print("ACCEPTANCE:", "PASS" if passed else "NOT MET")
    return passed


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2%}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    result = run(args)
    print(f"wrote {result.onnx_path}, {result.metadata_path}, {result.report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
