"""Exact per-message explanations: TreeSHAP contributions from the trees that scored the message.

Why this library: LightGBM's own `pred_contrib` computes TreeSHAP (Lundberg et al., 2020) on the very
trees it trained, and its contributions sum with the base value to the raw score of each class. The
gateway scores with the ONNX graph, which cannot compute them (its TreeEnsemble node has no per-feature
output and no node covers, which TreeSHAP needs), so every model ships the LightGBM model text beside its
graph (`current.lgb.txt`), with its sha256 in the metadata. At load the text is checked against that
digest, and against the graph itself: on probe rows the softmax of its raw scores must equal the graph's
probabilities, so an explanation can only come from the trees that scored the message.

What is explained: the model's log-odds of the verdict's class against ham (spam or bec verdicts), or of
ham against the likelier of spam and bec (ham and bulk verdicts). Softmax makes a class's raw score
meaningful only relative to another's, and a log-odds difference is still an exact sum of per-feature
contributions, so `base + sum(contributions) == score` holds exactly.

Computed only for the messages that are shown or flagged (the caller decides which): TreeSHAP costs
about a millisecond a message (bench/scan.py). An explanation weighs two of the three classes, and
TreeSHAP is additive over trees, so each class's trees are also loaded as a booster of their own
(`class_texts`, checked at load against the whole model) and only the two classes a message's
explanation weighs are walked: a third less work than LightGBM's `pred_contrib` on all the trees.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from milter.errors import ModelError
from milter.features import SCHEMA
from milter.features.describe import TOPICS, describe
from milter.stacking import TOPIC_PREFIX, TextStage
from milter.types import CLASS_NAMES, Verdict

log = logging.getLogger(__name__)

EXPLAINER_SUFFIX = ".lgb.txt"
EXPLAINER_FORMAT = "lightgbm-model-text"
#: softmax(raw scores of the text) against the graph's float32 probabilities, on the probe rows
PARITY_TOLERANCE = 1e-4
TOP_TOWARDS, TOP_AGAINST = 6, 4
#: contributions smaller than this (log-odds) are not worth a line
MIN_SHOWN = 0.01
_HAM, _SPAM, _BEC = (CLASS_NAMES.index(v.value) for v in (Verdict.HAM, Verdict.SPAM, Verdict.BEC))

Probabilities = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


def explainer_path(model_path: Path) -> Path:
    """current.onnx -> current.lgb.txt (history/<name>.onnx -> history/<name>.lgb.txt)."""
    return model_path.with_suffix(EXPLAINER_SUFFIX)


#: hashed word bucket (tok_0123) -> n-grams: the message's own, or a model's commonest training ones
Words = Mapping[str, Sequence[str]]
_NO_WORDS: Words = {}


@dataclass(frozen=True)
class Contribution:
    feature: str
    value: float  # the message's value of the feature
    contribution: float  # signed, in log-odds of `target` against `versus`
    text: str  # the feature and its value in words (milter.features.describe)

    def as_json(self) -> dict[str, Any]:
        return {"feature": self.feature, "value": self.value, "contribution": round(self.contribution, 6),
                "text": self.text}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Contribution:
        feature, value = str(raw["feature"]), float(raw["value"])
        text = str(raw.get("text") or describe(feature, value))
        return cls(feature, value, float(raw["contribution"]), text)

    def shown(self) -> str:
        """'html only, no plain-text part (+1.32)'."""
        return f"{self.text} ({self.contribution:+.2f})"


@dataclass(frozen=True)
class Explanation:
    """Why the model scored one message as it did: `base + listed + rest == score` (log-odds)."""

    model: str
    target: str  # the class explained: spam, bec or ham
    versus: str  # the class it is weighed against
    base: float  # the log-odds before looking at the message (the trees' expected value)
    score: float  # the message's log-odds
    towards: tuple[Contribution, ...]  # largest pushes towards `target`, largest first
    against: tuple[Contribution, ...]  # largest pushes towards `versus`, largest first
    rest: float  # the sum of every contribution not listed

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "target": self.target, "versus": self.versus,
            "base": round(self.base, 6), "score": round(self.score, 6), "rest": round(self.rest, 6),
            "towards": [c.as_json() for c in self.towards],
            "against": [c.as_json() for c in self.against],
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Explanation:
        """The stored form back; ValueError (or KeyError/TypeError) when it is not one."""
        return cls(
            model=str(raw["model"]), target=str(raw["target"]), versus=str(raw["versus"]),
            base=float(raw["base"]), score=float(raw["score"]), rest=float(raw["rest"]),
            towards=tuple(Contribution.from_json(c) for c in raw["towards"]),
            against=tuple(Contribution.from_json(c) for c in raw["against"]),
        )

    @property
    def contributions(self) -> tuple[Contribution, ...]:
        return (*self.towards, *self.against)

    def headline(self) -> str:
        """'spam vs ham: log-odds +7.91 (base -1.20)'."""
        return f"{self.target} vs {self.versus}: log-odds {self.score:+.2f} (base {self.base:+.2f})"

    def short(self, towards: int = 3, against: int = 1) -> str:
        """One line for a header or a log: the headline, the top pushes each way."""
        parts = [self.headline()]
        if self.towards[:towards]:
            parts.append("; ".join(c.shown() for c in self.towards[:towards]))
        if self.against[:against]:
            parts.append("against: " + "; ".join(c.shown() for c in self.against[:against]))
        return " | ".join(parts)

    def reworded(self, words: Words, examples: Words = _NO_WORDS) -> Explanation:
        """The same numbers with the hashed-word lines naming `words` (the message's own n-grams)."""
        def again(c: Contribution) -> Contribution:
            if c.feature not in words:
                return c
            text = describe(c.feature, c.value, words[c.feature], examples.get(c.feature, ()))
            return replace(c, text=text)

        return replace(self, towards=tuple(map(again, self.towards)), against=tuple(map(again, self.against)))


def target_classes(verdict: str, probs: Sequence[float]) -> tuple[int, int]:
    """(explained class, class weighed against) as indexes into CLASS_NAMES."""
    if verdict == Verdict.SPAM.value:
        return _SPAM, _HAM
    if verdict == Verdict.BEC.value:
        return _BEC, _HAM
    return _HAM, (_SPAM if probs[_SPAM] >= probs[_BEC] else _BEC)


class Explainer:
    """The LightGBM trees of one model, for contributions; built by `load`, safe to share read-only."""

    def __init__(
        self,
        booster: Any,
        model: str,
        token_examples: Mapping[str, Sequence[str]],
        stage: TextStage | None = None,
    ) -> None:
        self._booster = booster
        self._per_class = class_boosters(booster)
        self.model = model
        self.token_examples = token_examples
        # the trees read the feature vector extended by the text stage's scores (milter/stacking.py)
        self._stage = stage
        self._names = SCHEMA.names + (stage.out_names if stage else ())
        self._topics = tuple(i for i, n in enumerate(self._names) if n.startswith(TOPIC_PREFIX))
        if booster.num_feature() != len(self._names) or tuple(booster.feature_name()) != self._names:
            raise ModelError(
                f"explainer of model {model} has other features than the code's schema {SCHEMA.digest}"
                + (" and the model's text stage" if stage else "")
            )
        self._check_classes()

    def _check_classes(self) -> None:
        """The per-class boosters must add up to the whole model, bit for bit: the same trees, split."""
        X = _rows(self._extend(probe_rows()))
        whole = np.asarray(self._booster.predict(X, raw_score=True, num_threads=1), dtype=np.float64)
        split = np.stack([np.asarray(b.predict(X, raw_score=True, num_threads=1), dtype=np.float64)
                          for b in self._per_class], axis=1)
        if not np.array_equal(whole.reshape(split.shape), split):
            raise ModelError(f"explainer of model {self.model}: its trees split by class score differently")

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The trees' inputs: the schema's columns, then the text stage's scores (if any)."""
        return self._names

    def _extend(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return X if self._stage is None else self._stage.extend(X)

    @classmethod
    def load(
        cls, model_path: Path, raw_meta: Mapping[str, Any], probe: Probabilities | None
    ) -> Explainer | None:
        """The explainer the metadata names; None when the model ships none (older models).

        ModelError when it names one that is missing, does not match its digest or computes other
        scores than the graph (`probe`: the graph's probabilities for a batch).
        """
        entry = raw_meta.get("explainer")
        if entry is None:
            return None
        if not isinstance(entry, Mapping) or entry.get("format") != EXPLAINER_FORMAT:
            raise ModelError(f"model {model_path}: metadata key explainer is not a {EXPLAINER_FORMAT} entry")
        path = explainer_path(model_path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read explainer {path}: {exc.strerror}") from exc
        # Checked before LightGBM parses it: its parser aborts the process on some malformed texts
        # (a tree_sizes index that does not match), so a corrupt file must never reach it.
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise ModelError(
                f"explainer {path} does not match its metadata (sha256 differs): corrupt, from another "
                "model, or replaced while loading: retry"
            )
        booster = _booster(path, data)
        examples = entry.get("token_examples") or {}
        stage = raw_meta.get("text_stage")
        explainer = cls(booster, str(raw_meta.get("name", "?")),
                        {str(k): tuple(map(str, v)) for k, v in examples.items()},
                        None if stage is None else TextStage.from_json(stage, len(SCHEMA)))
        if probe is not None:
            explainer.check_against(probe)
        return explainer

    def check_against(self, probe: Probabilities, rows: npt.NDArray[np.float32] | None = None) -> float:
        """Max |softmax(our raw scores) - graph probabilities| on probe rows; ModelError past tolerance."""
        X = probe_rows() if rows is None else rows
        ours = softmax(self.raw_scores(X))
        theirs = np.asarray(probe(X), dtype=np.float64)
        worst = float(np.max(np.abs(ours - theirs)))
        if not worst <= PARITY_TOLERANCE:  # also catches NaN
            raise ModelError(
                f"explainer of model {self.model} computes other scores than its ONNX graph "
                f"(max probability difference {worst:.3g} > {PARITY_TOLERANCE:g}): not the same trees"
            )
        return worst

    def raw_scores(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """(n, 3) raw scores (what softmax turns into the class probabilities)."""
        out = self._booster.predict(_rows(self._extend(X)), raw_score=True, num_threads=1)
        return np.asarray(out, dtype=np.float64).reshape(len(X), len(CLASS_NAMES))

    def contributions(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """(n, 3, d + 1): per class, each feature's TreeSHAP contribution and, last, the base value.

        Per class they sum to the raw score (LightGBM's guarantee; tests/test_explain.py checks it).
        """
        out = self._booster.predict(_rows(self._extend(X)), pred_contrib=True, num_threads=1)
        return np.asarray(out, dtype=np.float64).reshape(len(X), len(CLASS_NAMES), len(self._names) + 1)

    def explain(
        self,
        X: npt.NDArray[np.float32],
        verdicts: Sequence[str],
        probs: npt.NDArray[np.float32],
        words: Sequence[Words] | None = None,
    ) -> list[Explanation]:
        """One explanation per row, of the verdict's class (see the module docstring). `words`, per row:
        the message's own n-grams per hashed word bucket; without them a bucket is named by the
        model's commonest training n-grams in it."""
        if not len(X):
            return []
        extended = self._extend(X)
        pairs = [target_classes(verdicts[i], probs[i].tolist()) for i in range(len(X))]
        phi = self._pair_contributions(extended, pairs)
        return [
            self._one(extended[i], phi[i], *pairs[i], words[i] if words is not None else _NO_WORDS)
            for i in range(len(X))
        ]

    def _pair_contributions(
        self, extended: npt.NDArray[np.float32], pairs: Sequence[tuple[int, int]]
    ) -> npt.NDArray[np.float64]:
        """Like `contributions`, but each row's TreeSHAP only for the two classes its pair names (the
        third class's slice stays zero and is never read)."""
        phi = np.zeros((len(extended), len(CLASS_NAMES), len(self._names) + 1), dtype=np.float64)
        rows = _rows(extended)
        for k, booster in enumerate(self._per_class):
            wanted = np.array([k in pair for pair in pairs])
            if wanted.any():
                out = booster.predict(rows[wanted], pred_contrib=True, num_threads=1)
                phi[wanted, k] = np.asarray(out, dtype=np.float64).reshape(int(wanted.sum()), -1)
        return phi

    def _one(
        self, x: npt.NDArray[np.float32], phi: npt.NDArray[np.float64], t: int, v: int, words: Words
    ) -> Explanation:
        diff = phi[t] - phi[v]
        base, per_feature = float(diff[-1]), diff[:-1]
        if self._topics:
            # the topic columns are one reason (TreeSHAP is additive: their sum is exact); the group
            # takes the first topic's place, the other topic columns count nothing
            per_feature = per_feature.copy()
            per_feature[self._topics[0]] = per_feature[list(self._topics)].sum()
            per_feature[list(self._topics[1:])] = 0.0
        order = np.argsort(-per_feature, kind="stable")
        towards = [int(j) for j in order[:TOP_TOWARDS] if per_feature[j] >= MIN_SHOWN]
        against = [int(j) for j in order[::-1][:TOP_AGAINST] if per_feature[j] <= -MIN_SHOWN]
        listed = float(per_feature[towards].sum() + per_feature[against].sum())
        total = float(per_feature.sum())
        return Explanation(
            model=self.model, target=CLASS_NAMES[t], versus=CLASS_NAMES[v], base=base, score=base + total,
            towards=tuple(self._item(x, per_feature, j, words) for j in towards),
            against=tuple(self._item(x, per_feature, j, words) for j in against),
            rest=total - listed,
        )

    def _item(
        self, x: npt.NDArray[np.float32], per_feature: npt.NDArray[np.float64], j: int, words: Words
    ) -> Contribution:
        if self._topics and j == self._topics[0]:
            return Contribution(TOPICS, float(len(self._topics)), float(per_feature[j]),
                                describe(TOPICS, float(len(self._topics))))
        name, value = self._names[j], float(x[j])
        text = describe(name, value, words.get(name, ()), self.token_examples.get(name, ()))
        return Contribution(name, value, float(per_feature[j]), text)


def _booster(path: Path, data: bytes) -> Any:
    import lightgbm as lgb  # imported here: only a process that explains pays for it

    try:
        booster = lgb.Booster(model_str=data.decode("utf-8"))
    except (UnicodeDecodeError, lgb.basic.LightGBMError) as exc:
        raise ModelError(f"explainer {path} is not a LightGBM model: {exc}") from exc
    if booster.num_model_per_iteration() != len(CLASS_NAMES):
        raise ModelError(f"explainer {path} is not a {len(CLASS_NAMES)}-class model")
    return booster


_TREE = re.compile(r"^Tree=\d+$", re.MULTILINE)
_END_OF_TREES = "\nend of trees\n"
#: header keys of LightGBM's model text that name the classes (tree_sizes indexes the trees: dropped,
#: LightGBM then finds them by their "Tree=" lines)
_ONE_CLASS = {"num_class": "num_class=1", "num_tree_per_iteration": "num_tree_per_iteration=1",
              "objective": "objective=regression", "tree_sizes": None}


def class_texts(text: str, classes: int = len(CLASS_NAMES)) -> tuple[str, ...]:
    """One single-output LightGBM model text per class, holding that class's trees of a multiclass text.

    A multiclass model keeps its trees iteration by iteration, class k's as trees k, k + classes, ...;
    its raw score for class k is their sum, so a booster of those trees alone computes it (and its
    TreeSHAP), as the caller checks. Written here because LightGBM has no API to select a class's trees.
    """
    starts = [m.start() for m in _TREE.finditer(text)]
    end = text.find(_END_OF_TREES)
    if not starts or end < starts[-1] or len(starts) % classes:
        raise ModelError(f"explainer text has {len(starts)} trees, not a {classes}-class model's")
    header: list[str] = []
    for line in text[: starts[0]].splitlines():
        key = line.split("=", 1)[0]
        if key in _ONE_CLASS:
            replacement = _ONE_CLASS[key]
            if replacement is not None:
                header.append(replacement)
        else:
            header.append(line)
    bounds = [*starts, end]
    trees = [text[a:b].split("\n", 1)[1].strip("\n") for a, b in itertools.pairwise(bounds)]
    return tuple(
        "\n".join(header).rstrip("\n") + "\n\n"
        + "".join(f"Tree={j}\n{tree}\n\n\n" for j, tree in enumerate(trees[k::classes]))
        + "end of trees\n\npandas_categorical:null\n"
        for k in range(classes)
    )


def class_boosters(booster: Any) -> tuple[Any, ...]:
    """One booster per class, of that class's trees (`class_texts`)."""
    import lightgbm as lgb

    try:
        return tuple(lgb.Booster(model_str=t) for t in class_texts(booster.model_to_string()))
    except lgb.basic.LightGBMError as exc:  # a model text this code cannot split: refused, not a crash
        raise ModelError(f"explainer trees cannot be split by class: {exc}") from exc


def _rows(X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    # LightGBM compares in double and the graph in float32 on float32 inputs: float32 values widened
    # exactly give both the same branches (the export rounds thresholds down for that, training/model.py).
    return np.ascontiguousarray(np.atleast_2d(X), dtype=np.float64)


def softmax(raw: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
    out: npt.NDArray[np.float64] = shifted / shifted.sum(axis=1, keepdims=True)
    return out


def probe_rows(n: int = 64, seed: int = 0) -> npt.NDArray[np.float32]:
    """Deterministic rows that reach many leaves: mostly zeros (as real vectors are) and small values,
    plus the all-zero row."""
    rng = np.random.default_rng(seed)
    shape = (n, len(SCHEMA))
    values = rng.gamma(1.0, 1.5, shape) * (rng.random(shape) < 0.3)
    values[0] = 0.0
    return values.astype(np.float32)
