"""`python -m training.unseen` (`make unseen`): a source the model never saw, and how fast labels fix it.

The time-ordered test split answers "how does the model do on *newer* mail from the senders it was
trained on". Production mail mostly comes from senders the corpora never had, so this answers the
other question. It leaves one source out of training entirely (a corpus, or one sub-collection such as
`modern-bulk-ham/investigation-wheres-my-email`), trains exactly as `milter-train` does (same features,
split, weights, fit and threshold rule, on what is left), and scores every message of that source at the
thresholds that training chose.

Then it plays the learning loop: the source's K oldest messages become admin labels, weighted as
`milter-retrain` weights them (`--label-weight`), the model is refitted, and the source's remaining
messages are scored again. That is what an admin sees after releasing K messages of a new newsletter
from the quarantine and letting the nightly retrain run. The gateway's policy also acts on those
labels (milter.policy.learned): a sender that K labels vouch for is tagged, not quarantined, when its
mail authenticates. The corpora's signatures cannot be checked here, so the table shows the share of
the rest whose sender the labels vouch for, and what would stay quarantined if all of it authenticated:
an upper bound on what that rule adds, not a measurement of it.

It fits with LightGBM directly and skips the ONNX export: `milter-train` checks that the two agree.
Output: a table on stdout, and with `--json FILE` the same figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from milter.config import DEFAULT_LEARNED_SENDER_LABELS
from milter.policy.table import LearnedSenders, sender_key
from milter.types import CLASS_NAMES
from training import model as mdl
from training.corpora import read_header_block, sender_of
from training.dataset import Dataset
from training.evaluate import sliced_metrics
from training.retrain import label_groups, label_rows, label_weights
from training.thresholds import BEC, HAM, SPAM, Thresholds, choose_thresholds, decide
from training.train import _features, fit_setup, load_dataset, threshold_rows
from training.train import parse_args as train_args

log = logging.getLogger("milter-unseen")

IntRows = npt.NDArray[np.intp]


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """This tool's own options, and milter-train's (data, split and fit settings) from the rest."""
    p = argparse.ArgumentParser(
        prog="python -m training.unseen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other option is milter-train's (--corpora-src, --max-per-group, --seed, ...).",
    )
    p.add_argument(
        "--source",
        action="append",
        metavar="CORPUS[/SUB]",
        help="leave this source out (repeatable; default: modern-bulk-ham)",
    )
    p.add_argument(
        "--labels",
        default="0,10,40",
        help="comma-separated label counts K to simulate (default: %(default)s)",
    )
    p.add_argument(
        "--label-weight", type=float, default=20.0, help="as milter-retrain (default: %(default)s)"
    )
    p.add_argument(
        "--learned-sender-labels",
        type=int,
        default=DEFAULT_LEARNED_SENDER_LABELS,
        help="ham labels that vouch for a sender, as policy.learned_sender_labels (default: %(default)s)",
    )
    p.add_argument(
        "--label-ham-only",
        action="store_true",
        help="the K labels are the source's K oldest ham (as the acceptance words it), not its K oldest "
        "messages of any class; the rest of the source is scored either way",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    own, rest = p.parse_known_args(argv)
    try:
        own.label_counts = sorted({int(k) for k in own.labels.split(",") if k.strip()})
    except ValueError:
        p.error(f"--labels: not a list of integers: {own.labels!r}")
    if any(k < 0 for k in own.label_counts):
        p.error("--labels: counts must be >= 0")
    own.source = own.source or ["modern-bulk-ham"]
    return own, train_args(rest)


def source_mask(ds: Dataset, source: str) -> npt.NDArray[np.bool_]:
    """Rows of `source` ("corpus" or "corpus/sub-collection"); ValueError naming the known ones if none."""
    keys = np.array([f"{m.corpus}/{m.subcollection}" for m in ds.messages])
    corpora = np.array([m.corpus for m in ds.messages])
    mask: npt.NDArray[np.bool_] = (corpora == source) | (keys == source)
    if not mask.any():
        known = sorted(set(corpora.tolist()) | set(keys.tolist()))
        raise ValueError(f"no messages from source {source!r}; known sources: {', '.join(known)}")
    return mask


def oldest_first(ds: Dataset, rows: IntRows) -> IntRows:
    """Rows by Date (undated ones last, by manifest order): the labels an admin would give first."""

    def key(i: int) -> tuple[bool, float, int]:
        m = ds.messages[i]
        return (m.date is None, m.date.timestamp() if m.date else 0.0, m.order)

    return np.array(sorted(rows.tolist(), key=key), dtype=np.intp)


@dataclass(frozen=True)
class ClassFigures:
    """One class of the left-out source at one label count: how much of it each level flags."""

    klass: str
    n: int
    quarantined: float  # share predicted not-ham at the quarantine thresholds
    tagged_or_worse: float  # share predicted not-ham at the tag thresholds
    vouched: float  # share whose sender the labels so far vouch for (milter.policy.learned)
    quarantined_if_authenticated: float  # quarantined, less the vouched-for ones (all assumed to pass)


@dataclass(frozen=True)
class Step:
    """One refit: K labels of the source in training, figures on the source's remaining messages."""

    labels: int
    thresholds: dict[str, dict[str, float]]
    source: list[ClassFigures]
    # the cost elsewhere: known sources' test split at this step's quarantine thresholds
    known_ham_fpr: dict[str, float]
    known_recall: dict[str, float]


def _class_figures(
    probs: npt.NDArray[np.float64], y: npt.NDArray[np.int64], th: Thresholds, vouched: npt.NDArray[np.bool_]
) -> list[ClassFigures]:
    quarantined = decide(probs.astype(np.float32), th.spam_quarantine, th.bec_quarantine) != HAM
    tagged = decide(probs.astype(np.float32), th.spam_tag, th.bec_tag) != HAM
    out = []
    for k, name in enumerate(CLASS_NAMES):
        rows = y == k
        if rows.any():
            shares = (quarantined[rows], tagged[rows], vouched[rows], quarantined[rows] & ~vouched[rows])
            out.append(ClassFigures(name, int(rows.sum()), *(float(x.mean()) for x in shares)))
    return out


def from_addresses(ds: Dataset, rows: IntRows) -> list[str]:
    """Each row's From address as the policy sees it ('' when unreadable or absent)."""
    addrs = []
    for i in rows.tolist():
        try:
            addrs.append(sender_of(read_header_block(ds.messages[i].path)))
        except OSError:
            addrs.append("")
    return addrs


def _known_figures(
    ds: Dataset, rows: IntRows, probs: npt.NDArray[np.float64], th: Thresholds
) -> tuple[dict[str, float], dict[str, float]]:
    """Per corpus, at the quarantine level: ham FPR, and spam + bec caught (the evaluation's metrics)."""
    pred = decide(probs.astype(np.float32), th.spam_quarantine, th.bec_quarantine)
    per_corpus = sliced_metrics(ds.y[rows], pred, [ds.messages[i].corpus for i in rows])
    fpr, recall = {}, {}
    for corpus, m in per_corpus.items():
        if corpus == "ALL":
            continue
        if m.ham_fpr is not None:
            fpr[corpus] = m.ham_fpr
        bad = [m.confusion[k] for k in (SPAM, BEC)]
        if (n := sum(sum(row) for row in bad)) > 0:
            recall[corpus] = sum(sum(row) - row[HAM] for row in bad) / n
    return fpr, recall


def run_source(
    ds: Dataset,
    targs: argparse.Namespace,
    source: str,
    counts: Sequence[int],
    label_weight: float,
    min_ham: int = DEFAULT_LEARNED_SENDER_LABELS,
    ham_only: bool = False,
) -> list[Step]:
    """Leave `source` out, then add its K oldest messages (`ham_only`: its K oldest ham) as labels for
    each K in `counts`."""
    setup = fit_setup(targs, ds)
    held = source_mask(ds, source)
    keep = ~held[setup.train]
    tr, va = setup.train[keep], setup.val[~held[setup.val]]
    X_tr = setup.X_train[keep]
    known_test = setup.test[~held[setup.test]]
    source_rows = oldest_first(ds, np.flatnonzero(held))
    sender_of_row = dict(zip(source_rows.tolist(), from_addresses(ds, source_rows), strict=True))
    pool = source_rows[ds.y[source_rows] == HAM] if ham_only else source_rows
    steps = []
    for k in counts:
        if k >= len(pool):
            log.warning(
                "%s: %d labels would leave none of its %d %s to score; skipped",
                source,
                k,
                len(pool),
                "ham" if ham_only else "messages",
            )
            continue
        labels = pool[:k]
        rest = source_rows[~np.isin(source_rows, labels)]
        w_lab = label_weights(ds.y[labels], ds.y[tr], setup.weights[tr], label_weight)
        X_lab, y_lab, w_fit = label_rows(ds.X[labels], ds.y[labels], w_lab, setup.cfg.min_data_in_leaf)
        fit_rows = np.concatenate([tr, labels])
        booster = mdl.fit(
            np.concatenate([X_tr, X_lab]),
            np.concatenate([ds.y[tr], y_lab]),
            np.concatenate([setup.weights[tr], w_fit]),
            ds.X[va],
            ds.y[va],
            setup.weights[va],
            ds.feature_names,
            setup.cfg,
            groups=[setup.groups[i] for i in tr] + label_groups(len(labels), len(y_lab)),
            labels=np.concatenate([np.zeros(len(tr), dtype=bool), np.ones(len(y_lab), dtype=bool)]),
        )
        trained = frozenset(int(c) for c in np.unique(ds.y[fit_rows]))
        p_cut, y_cut, c_cut = threshold_rows(
            ds, va, tr, mdl.predict(booster, ds.X[va]).astype(np.float32), booster.oof
        )
        th = choose_thresholds(
            p_cut,
            y_cut,
            c_cut,
            targs.target_fpr,
            targs.tag_fpr,
            trained,
            modern_tag_fpr=targs.modern_tag_fpr,
            modern_quarantine_fpr=targs.modern_quarantine_fpr,
        )
        learned = LearnedSenders.from_labels(
            ((sender_of_row[i], CLASS_NAMES[int(ds.y[i])], 1) for i in labels.tolist()), min_ham
        )
        vouched = np.array(
            [learned.vouched(sender_key(sender_of_row[i])) is not None for i in rest.tolist()], dtype=bool
        )
        source_figures = _class_figures(mdl.predict(booster, ds.X[rest]), ds.y[rest], th, vouched)
        fpr, recall = _known_figures(ds, known_test, mdl.predict(booster, ds.X[known_test]), th)
        steps.append(Step(k, th.as_dict(), source_figures, fpr, recall))
        log.info("%s: %d labels done", source, k)
    return steps


def render(source: str, steps: Sequence[Step]) -> str:
    """One block per source: the source's rows, then what each refit costs on the known sources."""
    lines = [
        f"left out: {source}",
        f"  {'labels':>6}  {'class':5} {'n':>6}  {'quarantined':>11}  {'tagged+':>8}  {'vouched':>8}"
        f"  {'quarantined if authenticated':>28}",
    ]
    for s in steps:
        lines += [
            f"  {s.labels:>6}  {f.klass:5} {f.n:>6}  {f.quarantined:>11.1%}  {f.tagged_or_worse:>8.1%}"
            f"  {f.vouched:>8.1%}  {f.quarantined_if_authenticated:>28.1%}"
            for f in s.source
        ]
    lines.append("  known sources, test split, quarantine level (ham FPR / caught):")
    for s in steps:
        known = [f"{c} {v:.2%}" for c, v in s.known_ham_fpr.items()]
        known += [f"{c} {v:.1%}" for c, v in s.known_recall.items()]
        lines.append(f"  {s.labels:>6}  ham FPR: {', '.join(known[: len(s.known_ham_fpr)])}")
        lines.append(f"  {'':>6}  caught:  {', '.join(known[len(s.known_ham_fpr) :])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    own, targs = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if targs.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    features, code_version = _features(targs.features_module)
    ds, _ = load_dataset(targs, features, code_version)
    results = {}
    for source in own.source:
        try:
            steps = run_source(
                ds, targs, source, own.label_counts, own.label_weight, own.learned_sender_labels,
                own.label_ham_only,
            )
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(render(source, steps), flush=True)
        results[source] = [asdict(s) for s in steps]
    if own.json is not None:
        own.json.write_text(
            json.dumps({"label_weight": own.label_weight, "sources": results}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
