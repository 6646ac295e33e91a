"""Decision thresholds chosen for a target ham false-positive rate, and the decision rule they feed.

Two scores come out of the class probabilities (columns in CLASS_NAMES order: ham, spam, bec):

* the *spam* score ``P(spam) + P(bec)`` = "not ham": anything unwanted, whatever its kind;
* the *bec* score ``P(bec)``.

Each has a "tag" threshold (looser FPR) and a "quarantine" threshold (strict FPR). A threshold is
the strictest of three cuts on the ham of the threshold rows (`rule_threshold`): validation, and the
training rows scored out of fold by sender (`training.train.threshold_rows`, `--threshold-folds`), so
that every row is scored by trees that never saw its sender, as a new site's mail will be:

* the old ham corpora *pooled* at the target (0.4 % tagged, 0.1 % quarantined: the acceptance
  targets for all ham, with room for the test split's noise);
* the modern ham corpora as one group at their own targets (2 % / 0.5 %): pooled with 17,000 Enron
  ham they would hide, and they are the ham a new site sees first;
* every corpus on its own at a looser guard (3 % / 0.5 %), so no one corpus's ham (SpamAssassin's
  `hard_ham`, the bounces) is given up for the pooled figure.

The guard replaced "every corpus at the target": on a few hundred validation ham, 0.1 % means none,
so the single highest-scored SpamAssassin ham set the quarantine cut for all mail (measured: spam
quarantined 63 % under that rule, 84 % under this one, all ham quarantined 0.01 % and 0.04 %;
docs/DETECTION.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

HAM, SPAM, BEC = 0, 1, 2
Probs = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Thresholds:
    spam_tag: float
    spam_quarantine: float
    bec_tag: float
    bec_quarantine: float

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            "spam": {"tag": self.spam_tag, "quarantine": self.spam_quarantine},
            "bec": {"tag": self.bec_tag, "quarantine": self.bec_quarantine},
        }


#: A threshold no probability reaches: used for a class the model never saw in training.
DISABLED = 2.0

#: How the thresholds apply, written into the model metadata for the policy module.
SCORE_DEFINITIONS = {"spam": "p_spam + p_bec (probability the message is not ham)", "bec": "p_bec"}


def spam_score(probs: Probs) -> npt.NDArray[np.float64]:
    return probs[:, SPAM].astype(np.float64) + probs[:, BEC].astype(np.float64)


def bec_score(probs: Probs) -> npt.NDArray[np.float64]:
    return probs[:, BEC].astype(np.float64)


def threshold_for_fpr(ham_scores: npt.NDArray[np.float64], target_fpr: float) -> float:
    """Smallest threshold t with mean(ham_scores >= t) <= target_fpr.

    With n ham we may flag at most floor(target * n) of them; t sits just above the next-highest
    score. Returns a value above 1.0 (flag nothing) when even the top ham score must stay unflagged
    and it is already 1.0.
    """
    if ham_scores.size == 0:
        return 0.5  # no evidence: a neutral cut; callers always have ham in practice
    allowed = math.floor(target_fpr * ham_scores.size + 1e-9)
    ranked = np.sort(ham_scores)[::-1]
    if allowed >= ranked.size:
        return 0.0
    return float(np.nextafter(ranked[allowed], np.inf))


def per_corpus_thresholds(
    scores: npt.NDArray[np.float64], is_ham: npt.NDArray[np.bool_], corpora: Sequence[str], target_fpr: float
) -> dict[str, float]:
    """Each corpus's own threshold for the target: shows which corpus sets the shipped one."""
    names = np.asarray(corpora)
    return {
        c: threshold_for_fpr(scores[is_ham & (names == c)], target_fpr) for c in sorted(set(names[is_ham]))
    }


def threshold_breakdown(
    probs: Probs, y: npt.NDArray[np.int64], corpora: Sequence[str], quarantine_fpr: float, tag_fpr: float
) -> dict[str, dict[str, dict[str, float]]]:
    """{"spam"|"bec": {"tag"|"quarantine": {corpus: threshold}}} on the given (validation) rows."""
    is_ham = y == HAM
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind, score in (("spam", spam_score(probs)), ("bec", bec_score(probs))):
        out[kind] = {
            level: per_corpus_thresholds(score, is_ham, corpora, fpr)
            for level, fpr in (("tag", tag_fpr), ("quarantine", quarantine_fpr))
        }
    return out


#: The ham a new site sees first and the old corpora lack: modern newsletters, shop and account mail,
#: bounces. Each corpus is a few dozen validation messages, where "0.1 %" can only mean "none": one odd
#: message would set the threshold for everything. They form one threshold group with its own targets,
#: the modern-ham acceptance targets (2 % flagged, 0.5 % quarantined).
MODERN_HAM = ("modern-bulk-ham", "foff-milter-mailbox", "sisimai-bounces")
MODERN_GROUP = "modern ham"
#: The spam a site receives today (2020-26), against 28,000 Enron spam of 2000-05: weighted up in
#: training (model.FitConfig.modern_spam_weight), never a threshold group of its own.
MODERN_SPAM = ("cw-l-spam", "foff-milter-mailbox")
MODERN_TAG_FPR = 0.02
MODERN_QUARANTINE_FPR = 0.005


def threshold_groups(corpora: Sequence[str]) -> list[str]:
    """Each row's threshold group: its corpus, or MODERN_GROUP for the modern ham corpora."""
    return [MODERN_GROUP if c in MODERN_HAM else c for c in corpora]


def worst_corpus_threshold(
    scores: npt.NDArray[np.float64],
    is_ham: npt.NDArray[np.bool_],
    corpora: Sequence[str],
    target_fpr: float,
    group_fpr: float | None = None,
) -> float:
    """The strictest of the per-group thresholds, so every corpus (and the modern ham group, at
    `group_fpr` when given) meets its target on its own."""
    names = np.asarray(threshold_groups(corpora))
    cuts = [
        threshold_for_fpr(
            scores[is_ham & (names == c)], group_fpr if c == MODERN_GROUP and group_fpr else target_fpr
        )
        for c in sorted(set(names[is_ham]))
    ]
    return max(cuts) if cuts else threshold_for_fpr(scores[is_ham], target_fpr)


@dataclass(frozen=True)
class Guard:
    """The per-corpus ceilings under the pooled targets (see the module docstring)."""

    tag_fpr: float = 0.03
    quarantine_fpr: float = 0.005


CORPUS_GUARD = Guard()


def rule_threshold(
    scores: npt.NDArray[np.float64],
    is_ham: npt.NDArray[np.bool_],
    corpora: Sequence[str],
    pooled_fpr: float,
    guard_fpr: float,
    group_fpr: float,
) -> float:
    """The strictest of: old ham pooled at `pooled_fpr`, the modern ham group at `group_fpr`, and each
    old corpus at `guard_fpr`."""
    names = np.asarray(threshold_groups(corpora))
    modern = names == MODERN_GROUP
    old = is_ham & ~modern
    cuts = [threshold_for_fpr(scores[old], pooled_fpr)] if old.any() else []
    if (is_ham & modern).any():
        cuts.append(threshold_for_fpr(scores[is_ham & modern], group_fpr))
    cuts += [threshold_for_fpr(scores[old & (names == c)], guard_fpr) for c in sorted(set(names[old]))]
    return max(cuts) if cuts else threshold_for_fpr(scores[is_ham], pooled_fpr)


def choose_thresholds(
    probs: Probs,
    y: npt.NDArray[np.int64],
    corpora: Sequence[str],
    quarantine_fpr: float,
    tag_fpr: float,
    trained_classes: frozenset[int] = frozenset({HAM, SPAM, BEC}),
    guard: Guard = CORPUS_GUARD,
    *,
    modern_tag_fpr: float = MODERN_TAG_FPR,
    modern_quarantine_fpr: float = MODERN_QUARANTINE_FPR,
) -> Thresholds:
    """Thresholds for both scores; a class absent from training (e.g. bec without Phishing Pot) is disabled.

    Without examples its probability is a constant near zero, and a threshold fitted to ham's noise in
    that constant would flag arbitrary messages.
    """
    is_ham = y == HAM
    s, b = spam_score(probs), bec_score(probs)

    def tag(score: npt.NDArray[np.float64]) -> float:
        return rule_threshold(score, is_ham, corpora, tag_fpr, max(guard.tag_fpr, tag_fpr), modern_tag_fpr)

    def quarantine(score: npt.NDArray[np.float64]) -> float:
        return rule_threshold(
            score, is_ham, corpora, quarantine_fpr, max(guard.quarantine_fpr, quarantine_fpr),
            modern_quarantine_fpr,
        )

    if BEC not in trained_classes:
        return Thresholds(tag(s), quarantine(s), DISABLED, DISABLED)
    return Thresholds(tag(s), quarantine(s), tag(b), quarantine(b))


def decide(probs: Probs, spam_cut: float, bec_cut: float) -> npt.NDArray[np.int64]:
    """Predicted class per row at one level (tag or quarantine).

    bec if P(bec) >= bec_cut; otherwise, if the not-ham score passes spam_cut, whichever of spam/bec
    is more probable; otherwise ham.
    """
    s, b = spam_score(probs), bec_score(probs)
    out = np.full(len(probs), HAM, dtype=np.int64)
    flagged = s >= spam_cut
    out[flagged] = np.where(probs[flagged, BEC] > probs[flagged, SPAM], BEC, SPAM)
    out[b >= bec_cut] = BEC
    return out
