"""The text stage: linear scores over the hashed word columns, fed to the trees as extra features.

Trees add evidence a few splits at a time; a message's words are hundreds of weak signals that only
count when summed. A linear model sums them (what SpamAssassin's and Rspamd's Bayes do), and its
scores become two more columns for the trees: "the words read like unwanted mail" and "like
phishing". Measured on the sender split (docs/DETECTION.md): at the same modern-ham false-positive
rate, spam caught rose by 2 to 3 points and the plain-text 419 and stock-pump spam the trees missed
is caught.

The stage reads the words twice: the 1,024 hashed columns the trees also see, and, for the unwanted-mail
score, the wide vocabulary: the message's first 512 distinct grams as ids among 2^18
(milter/features/text.py), which the trees never read. Each gram present adds its weight, scaled by
1/sqrt(number of grams) so that a long or garbled text cannot sum hundreds of small weights into a
certainty. On the sender split (docs/DETECTION.md, three seeds) the wide part raised spam caught at the
tag level's false-positive rates from 93.9-95.6 to 97.5-97.6 %; a stronger wide part (gram_scale 20-30)
caught more but tagged an automated test-report sender's 819 messages as phishing.

The stage also says what the text is about: `topics`, a dense summary of the wide vocabulary (latent
semantic analysis: a truncated SVD of the tf-idf of the 16,384 commonest grams of the training corpora,
learned without labels; `training.model.fit_topics`). Each of its 128 columns is one direction in "what
kind of text is this", and the trees read them like any feature. Measured on the sender split, three
seeds (docs/DETECTION.md, "What the text is about"): modern ham quarantined fell from 1 of 143 to none
on each seed and all ham quarantined from 0.09-0.13 % to 0.01-0.11 %, while spam and phishing moved by
no more than two fits of one recipe differ. A pretrained encoder (WordLlama's 256-dimension token
embeddings, the only package found that ships its weights) did as well for ham and better for phishing,
but its weights are derived from LLaMA 2's, whose licence is not the package's MIT; the topics are
learned from our own corpora and ship inside the graph.

The stage is part of the model, not of the features: its weights are learned with the trees and ship
inside the ONNX graph (Gather, MatMul, Add, Concat in front of the tree ensemble), so the gateway
still feeds the graph the feature vector alone. The same weights are written into the metadata
(`text_stage`) for the explainer, which reads the trees over the extended vector; its load check
(softmax of its raw scores equals the graph's probabilities) proves the two copies agree.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from milter.errors import ModelError

#: Names of the stage's output columns, appended after the feature schema's.
STAGE_NAMES: tuple[str, ...] = ("txt_words_unwanted", "txt_words_phishing")
FORMAT = "linear-v1"
TOPIC_PREFIX = "txt_topic_"
#: |v| below this is a text without any known gram: its topics stay zero (no division by zero)
TOPIC_EPS = 1e-12
#: The sums' precision: "float64" (every model since) or "float32" (models exported before it).
PRECISIONS = ("float32", "float64")
TOPIC_CHUNK = 256  # messages at a time for the stage's float64 gathers in numpy (training: tens of thousands)


def topic_names(k: int) -> tuple[str, ...]:
    return tuple(f"{TOPIC_PREFIX}{j:02d}" for j in range(k))


@dataclass(frozen=True, eq=False)
class TopicProjection:
    """topics = v / max(|v|, eps) with v = sum of table[1 + j] over the message's gram ids that are
    vocab[j]: each known gram adds its idf-weighted direction in the SVD's k-dimensional space, and
    only the direction counts (a message's length says nothing about what it is about). Gram ids
    outside `vocab` add nothing."""

    vocab: npt.NDArray[np.int64]  # (V,) sorted gram ids 1..space
    table: npt.NDArray[np.float32]  # (V + 1, k), float16 values; row 0 (not in the vocabulary) is zero
    _remaps: dict[int, npt.NDArray[np.int64]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        v = self.vocab
        if (
            v.ndim != 1
            or self.table.ndim != 2
            or self.table.shape[0] != len(v) + 1
            or np.any(self.table[0] != 0)
            or (len(v) and (v[0] < 1 or np.any(np.diff(v) <= 0)))
        ):
            raise ValueError(
                "text stage topics: vocab must be sorted ids >= 1, table (len(vocab) + 1, k), row 0 zero"
            )

    @property
    def names(self) -> tuple[str, ...]:
        return topic_names(self.table.shape[1])

    def _index(self, space: int) -> npt.NDArray[np.int64]:
        # a cache in a frozen value: filled once per space (one in practice); a race computes it twice
        if space not in self._remaps:
            self._remaps[space] = self.remap(space)
        return self._remaps[space]

    def remap(self, space: int) -> npt.NDArray[np.int64]:
        """(space + 1,) gram id -> row of `table` (0: not in the vocabulary)."""
        out = np.zeros(space + 1, dtype=np.int64)
        kept = self.vocab[self.vocab <= space]
        out[kept] = np.searchsorted(self.vocab, kept) + 1
        return out

    def __call__(self, ids: npt.NDArray[np.int64], space: int) -> npt.NDArray[np.float32]:
        # In float64, as the graph computes it: a sum of at most 512 float16 values is exact in float64
        # in any order, so numpy and ONNX Runtime agree on v to the bit, and the rest (a norm and a
        # division) to within float64 rounding, far below a float32 step. Summed in float32, their orders
        # differed in the last bits and once flipped a tree's split (the explainer's check refused a
        # retrain's candidate: 0.0007 > 1e-4).
        # Only the gathered rows are widened (the same values: float16 is exact in float32 and float64),
        # and the index is built once per space: widening the whole table (16 MB) and rebuilding the
        # index (2 MB) on every call made one message's explanation 4.8 ms instead of 1.3 (bench/scan.py).
        rows = self._index(space)[ids]
        out = np.empty((len(rows), self.table.shape[1]), dtype=np.float32)
        for start in range(0, len(rows), TOPIC_CHUNK):  # the gathered rows are 0.5 MB a message
            v = self.table[rows[start : start + TOPIC_CHUNK]].astype(np.float64).sum(axis=1)
            norm = np.sqrt((v * v).sum(axis=1, keepdims=True))
            out[start : start + TOPIC_CHUNK] = v / np.maximum(norm, TOPIC_EPS)
        return out

    def as_json(self) -> dict[str, Any]:
        # float16: the table is rounded to it when fitted (training.model.fit_topics), so nothing is lost
        # and the model's files are half the size (16,385 x 128 values: 4 MB, not 8)
        return {
            "vocab_i32le_b64": base64.b64encode(self.vocab.astype("<i4").tobytes()).decode("ascii"),
            "table_shape": list(self.table.shape),
            "table_f16le_b64": base64.b64encode(self.table.astype("<f2").tobytes()).decode("ascii"),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> TopicProjection:
        vocab = np.frombuffer(base64.b64decode(raw["vocab_i32le_b64"], validate=True), dtype="<i4")
        rows, width = (int(n) for n in raw["table_shape"])
        blob = base64.b64decode(raw["table_f16le_b64"], validate=True)
        table = np.frombuffer(blob, dtype="<f2").astype(np.float32).reshape(rows, width)
        return cls(vocab.astype(np.int64), table)


@dataclass(frozen=True, eq=False)
class TextStage:
    """scores = X[:, columns] @ weights + bias + (sum of table[id] over the ids in X[:, id_columns]) /
    sqrt(number of ids), one score per name (log-odds of a linear model). The second part is the wide
    vocabulary: each id column holds one of the message's hashed grams (0: none, whose table row is
    zero), so the sum is a sparse dot product over up to 2^18 grams computed as a gather."""

    columns: tuple[int, ...]
    weights: npt.NDArray[np.float32]  # (len(columns), len(names))
    bias: npt.NDArray[np.float32]  # (len(names),)
    names: tuple[str, ...] = STAGE_NAMES
    id_columns: tuple[int, ...] = ()
    table: npt.NDArray[np.float32] | None = None  # (space + 1, len(names)); row 0 is zero
    topics: TopicProjection | None = None  # what the text is about, from the same gram ids
    #: what the scores are summed in (PRECISIONS); the graph sums in the same. Models exported before
    #: float64 summing read "float32" (the key is absent from their metadata).
    precision: str = "float64"

    def __post_init__(self) -> None:
        shape = (len(self.columns), len(self.names))
        if self.weights.shape != shape or self.bias.shape != (len(self.names),):
            raise ValueError(
                f"text stage: weights {self.weights.shape} and bias {self.bias.shape} do not fit "
                f"{len(self.columns)} columns and {len(self.names)} outputs"
            )
        if self.id_columns and (
            self.table is None
            or self.table.ndim != 2
            or self.table.shape[1] != len(self.names)
            or np.any(self.table[0] != 0)
        ):
            raise ValueError("text stage: id columns need a table of (space + 1) rows, row 0 zero")
        if self.topics is not None and not self.id_columns:
            raise ValueError("text stage: topics are read from the gram id columns, and there are none")
        if self.precision not in PRECISIONS:
            raise ValueError(f"text stage: precision {self.precision!r} is not one of {PRECISIONS}")

    @property
    def space(self) -> int:
        """Highest gram id the table knows (0 without a wide vocabulary)."""
        return 0 if self.table is None or not self.id_columns else len(self.table) - 1

    def scores(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        X = np.asarray(X, dtype=np.float32)
        if self.precision == "float32":
            return self._scores32(X)
        out = np.empty((len(X), len(self.names)), dtype=np.float32)
        for start in range(0, len(X), TOPIC_CHUNK):  # the gathered table rows, in float64
            out[start : start + TOPIC_CHUNK] = self._scores64(X[start : start + TOPIC_CHUNK])
        return out

    def _scores64(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        # In float64, then rounded to float32 once, as the graph computes them. Summed in float32, numpy
        # (BLAS) and ONNX Runtime (MLAS) add in other orders and differ in the last bits: measured, a
        # txt_words_phishing of -11.2670078 here and -11.2669960 in the graph (12 float32 steps) fell on
        # both sides of a split at -11.2669969, and the explainer's check refused a retrain's candidate
        # (0.000687 > 1e-4). In float64 the orders differ by ~1e-16 relative, and the float32 results
        # agree unless a sum lies within that of a float32 rounding boundary.
        dense = X[:, list(self.columns)].astype(np.float64) @ self.weights.astype(np.float64)
        out = dense + self.bias.astype(np.float64)
        if self.id_columns and self.table is not None:
            ids = self.ids(X)
            wide = self.table[ids].astype(np.float64).sum(axis=1)
            out = out + wide / gram_norm(ids, np.float64)[:, None]
        return out.astype(np.float32)

    def _scores32(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        # float32 throughout, as the graphs of models exported before float64 summing compute them
        dense = X[:, list(self.columns)] @ self.weights + self.bias
        out: npt.NDArray[np.float32] = dense.astype(np.float32)
        if self.id_columns and self.table is not None:
            ids = self.ids(X)
            out += self.table[ids].sum(axis=1, dtype=np.float32) / gram_norm(ids)[:, None]
        return out

    def ids(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        return clip_ids(X, self.id_columns, self.space)

    @property
    def out_names(self) -> tuple[str, ...]:
        """The columns the stage appends to the trees' input: its scores, then its topics (if any)."""
        return self.names + (self.topics.names if self.topics is not None else ())

    def outputs(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(n, len(out_names)): the scores, then the topics (what the graph's `text_scores` holds)."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float32))
        scores = self.scores(X)
        if self.topics is None:
            return scores
        return np.hstack([scores, self.topics(self.ids(X), self.space)])

    def extend(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The trees' input: the feature vector followed by the stage's outputs."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float32))
        return np.hstack([X, self.outputs(X)])

    def as_json(self) -> dict[str, Any]:
        wide = {}
        if self.id_columns and self.table is not None:
            # 2^18 x 2 weights: as JSON numbers they would be 10 MB of metadata, as float32 bytes 2 MB
            wide = {
                "id_columns": list(self.id_columns),
                "table_shape": list(self.table.shape),
                "table_f32le_b64": base64.b64encode(self.table.astype("<f4").tobytes()).decode("ascii"),
            }
        return {
            "format": FORMAT,
            "names": list(self.names),
            "columns": list(self.columns),
            "weights": self.weights.tolist(),
            "bias": self.bias.tolist(),
            "precision": self.precision,
            **wide,
            **({"topics": self.topics.as_json()} if self.topics is not None else {}),
        }

    @classmethod
    def from_json(cls, raw: Any, n_features: int) -> TextStage:
        """ModelError naming what is wrong when the metadata entry is not a stage for `n_features`."""
        if not isinstance(raw, Mapping) or raw.get("format") != FORMAT:
            raise ModelError(f"metadata key text_stage is not a {FORMAT} entry")
        try:
            columns = tuple(int(c) for c in raw["columns"])
            id_columns = tuple(int(c) for c in raw.get("id_columns", ()))
            table = None
            if id_columns:
                rows, width = (int(n) for n in raw["table_shape"])
                blob = base64.b64decode(raw["table_f32le_b64"], validate=True)
                table = np.frombuffer(blob, dtype="<f4").astype(np.float32).reshape(rows, width)
            topics = TopicProjection.from_json(raw["topics"]) if raw.get("topics") is not None else None
            stage = cls(
                columns,
                np.asarray(raw["weights"], dtype=np.float32).reshape(len(columns), -1),
                np.asarray(raw["bias"], dtype=np.float32),
                tuple(str(n) for n in raw["names"]),
                id_columns,
                table,
                topics,
                str(raw.get("precision", "float32")),
            )
        except (KeyError, TypeError, ValueError) as exc:  # binascii.Error is a ValueError
            raise ModelError(f"metadata key text_stage is malformed: {exc}") from exc
        finite = (
            np.all(np.isfinite(stage.weights))
            and (table is None or np.all(np.isfinite(table)))
            and (stage.topics is None or np.all(np.isfinite(stage.topics.table)))
        )
        if any(not 0 <= c < n_features for c in columns + id_columns) or not finite:
            raise ModelError(
                "metadata key text_stage names columns outside the feature schema or non-finite weights"
            )
        return stage


def clip_ids(X: npt.NDArray[np.float32], columns: Sequence[int], space: int) -> npt.NDArray[np.int64]:
    """The gram ids of each row, clipped into 0..space as the graph's Clip does (a hand-made vector's
    odd values must not index outside the table)."""
    return np.clip(X[:, list(columns)].astype(np.int64), 0, space)


def gram_norm(ids: npt.NDArray[np.int64], dtype: type[np.floating[Any]] = np.float32) -> npt.NDArray[Any]:
    """sqrt(number of grams), at least 1: each gram of a message counts 1/sqrt(n) (a unit-length row),
    so a long or garbled text (a base64 image decoded as text: 512 random grams) cannot add up
    hundreds of small weights into a certainty."""
    norm: npt.NDArray[Any] = np.sqrt(np.maximum((ids > 0).sum(axis=1), 1)).astype(dtype)
    return norm


def stage_columns(feature_names: Sequence[str], prefix: str = "tok_") -> tuple[int, ...]:
    """The hashed word columns the stage reads."""
    return tuple(i for i, name in enumerate(feature_names) if name.startswith(prefix))


def id_columns(feature_names: Sequence[str]) -> tuple[int, ...]:
    """The gram id columns (milter/features/text.py): read by the stage, never by the trees."""
    return stage_columns(feature_names, "gram_")
