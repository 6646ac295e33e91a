"""Metrics on the held-out test split, per corpus and per sub-collection, and the acceptance check.

Pooled numbers hide exactly what matters here (a few modern newsletters among 17,000 Enron ham), so
every metric is computed per corpus and per sub-collection as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from milter.types import CLASS_NAMES
from training.thresholds import BEC, HAM, MODERN_HAM, SPAM, Probs, Thresholds, decide

#: Acceptance target on the test split, per corpus (quarantine level).
TARGET_HAM_FPR = 0.001
TARGET_SPAM_RECALL = 0.98
TARGET_BEC_RECALL = 0.97


@dataclass(frozen=True)
class Metrics:
    """Counts and rates for one slice of the test split at one threshold level."""

    n: int
    confusion: tuple[tuple[int, ...], ...]  # rows: true class, columns: predicted, CLASS_NAMES order

    def _row(self, k: int) -> tuple[int, ...]:
        return self.confusion[k]

    def _rate(self, num: int, den: int) -> float | None:
        return num / den if den else None

    @property
    def ham_fpr(self) -> float | None:
        """Ham not accepted as ham (tagged or quarantined as spam or bec)."""
        row = self._row(HAM)
        return self._rate(sum(row) - row[HAM], sum(row))

    @property
    def spam_recall(self) -> float | None:
        """Spam caught (predicted spam or bec: either way it is not delivered as clean)."""
        row = self._row(SPAM)
        return self._rate(sum(row) - row[HAM], sum(row))

    @property
    def bec_recall(self) -> float | None:
        """BEC caught (predicted spam or bec)."""
        row = self._row(BEC)
        return self._rate(sum(row) - row[HAM], sum(row))

    @property
    def bec_exact_recall(self) -> float | None:
        """BEC predicted as bec specifically."""
        row = self._row(BEC)
        return self._rate(row[BEC], sum(row))

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "confusion": [list(r) for r in self.confusion],
            "ham_fpr": self.ham_fpr,
            "spam_recall": self.spam_recall,
            "bec_recall": self.bec_recall,
            "bec_exact_recall": self.bec_exact_recall,
        }


def confusion(y: npt.NDArray[np.int64], pred: npt.NDArray[np.int64]) -> tuple[tuple[int, ...], ...]:
    k = len(CLASS_NAMES)
    mat = np.zeros((k, k), dtype=np.int64)
    np.add.at(mat, (y, pred), 1)
    return tuple(tuple(int(v) for v in row) for row in mat)


def metrics_for(y: npt.NDArray[np.int64], pred: npt.NDArray[np.int64]) -> Metrics:
    return Metrics(n=len(y), confusion=confusion(y, pred))


def sliced_metrics(
    y: npt.NDArray[np.int64], pred: npt.NDArray[np.int64], keys: Sequence[str]
) -> dict[str, Metrics]:
    """Metrics for the whole set ("ALL") and for each distinct key (corpus or corpus/sub-collection)."""
    names = np.asarray(keys)
    out = {"ALL": metrics_for(y, pred)}
    for key in sorted(set(keys)):
        mask = names == key
        out[key] = metrics_for(y[mask], pred[mask])
    return out


#: Spam sources from 2020 on (each must be caught on its own, not only pooled).
MODERN_SPAM = ("cw-l-spam", "foff-milter-mailbox")


def group_keys(corpora: Sequence[str], y: npt.NDArray[np.int64]) -> list[str]:
    """Each row's production group: "modern ham", "old ham", "spam", "phishing" (the bec class)."""
    names = {HAM: "old ham", SPAM: "spam", BEC: "phishing"}
    return [
        "modern ham" if k == HAM and c in MODERN_HAM else names[int(k)]
        for c, k in zip(corpora, y.tolist(), strict=True)
    ]


def evaluate(
    probs: Probs,
    y: npt.NDArray[np.int64],
    corpora: Sequence[str],
    subs: Sequence[str],
    thresholds: Thresholds,
) -> dict[str, dict[str, dict[str, Metrics]]]:
    """{level: {"corpus"|"subcollection"|"group": {key: Metrics}}} for the tag and quarantine levels.

    At the tag level a ham "FPR" is the share *flagged* (tagged or quarantined), at the quarantine level
    the share quarantined: the two numbers an admin asks for.
    """
    levels = {
        "quarantine": decide(probs, thresholds.spam_quarantine, thresholds.bec_quarantine),
        "tag": decide(probs, thresholds.spam_tag, thresholds.bec_tag),
    }
    sub_keys = [f"{c}/{s}" for c, s in zip(corpora, subs, strict=True)]
    groups = group_keys(corpora, y)
    return {
        level: {
            "corpus": sliced_metrics(y, pred, corpora),
            "subcollection": sliced_metrics(y, pred, sub_keys),
            "group": sliced_metrics(y, pred, groups),
        }
        for level, pred in levels.items()
    }


def acceptance(per_corpus: dict[str, Metrics]) -> list[tuple[str, str, float | None, float, bool]]:
    """(corpus, metric, value, target, passed) for every corpus that has the class in question.

    Corpora with a handful of messages of a class (the 37 spam that slipped onto mailing lists) are
    listed like the others: the report says how many rows each number rests on.
    """
    rows: list[tuple[str, str, float | None, float, bool]] = []
    for corpus, m in per_corpus.items():
        if m.ham_fpr is not None:
            rows.append((corpus, "ham_fpr", m.ham_fpr, TARGET_HAM_FPR, m.ham_fpr <= TARGET_HAM_FPR))
        if m.spam_recall is not None:
            rows.append(
                (
                    corpus,
                    "spam_recall",
                    m.spam_recall,
                    TARGET_SPAM_RECALL,
                    m.spam_recall >= TARGET_SPAM_RECALL,
                )
            )
        if m.bec_recall is not None:
            rows.append(
                (corpus, "bec_recall", m.bec_recall, TARGET_BEC_RECALL, m.bec_recall >= TARGET_BEC_RECALL)
            )
    return rows
