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

The stage is part of the model, not of the features: its weights are learned with the trees and ship
inside the ONNX graph (Gather, MatMul, Add, Concat in front of the tree ensemble), so the gateway
still feeds the graph the feature vector alone. The same weights are written into the metadata
(`text_stage`) for the explainer, which reads the trees over the extended vector; its load check
(softmax of its raw scores equals the graph's probabilities) proves the two copies agree.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from milter.errors import ModelError

#: Names of the stage's output columns, appended after the feature schema's.
STAGE_NAMES: tuple[str, ...] = ("txt_words_unwanted", "txt_words_phishing")
FORMAT = "linear-v1"


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

    @property
    def space(self) -> int:
        """Highest gram id the table knows (0 without a wide vocabulary)."""
        return 0 if self.table is None or not self.id_columns else len(self.table) - 1

    def scores(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        # float32 throughout, as the graph computes it
        X = np.asarray(X, dtype=np.float32)
        dense = X[:, list(self.columns)] @ self.weights + self.bias
        out: npt.NDArray[np.float32] = dense.astype(np.float32)
        if self.id_columns and self.table is not None:
            ids = self.ids(X)
            out += self.table[ids].sum(axis=1, dtype=np.float32) / gram_norm(ids)[:, None]
        return out

    def ids(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        return clip_ids(X, self.id_columns, self.space)

    def extend(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The trees' input: the feature vector followed by the stage's scores."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float32))
        return np.hstack([X, self.scores(X)])

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
            **wide,
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
            stage = cls(
                columns,
                np.asarray(raw["weights"], dtype=np.float32).reshape(len(columns), -1),
                np.asarray(raw["bias"], dtype=np.float32),
                tuple(str(n) for n in raw["names"]),
                id_columns,
                table,
            )
        except (KeyError, TypeError, ValueError) as exc:  # binascii.Error is a ValueError
            raise ModelError(f"metadata key text_stage is malformed: {exc}") from exc
        finite = np.all(np.isfinite(stage.weights)) and (table is None or np.all(np.isfinite(table)))
        if any(not 0 <= c < n_features for c in columns + id_columns) or not finite:
            raise ModelError(
                "metadata key text_stage names columns outside the feature schema or non-finite weights"
            )
        return stage


def clip_ids(X: npt.NDArray[np.float32], columns: Sequence[int], space: int) -> npt.NDArray[np.int64]:
    """The gram ids of each row, clipped into 0..space as the graph's Clip does (a hand-made vector's
    odd values must not index outside the table)."""
    return np.clip(X[:, list(columns)].astype(np.int64), 0, space)


def gram_norm(ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """sqrt(number of grams), at least 1: each gram of a message counts 1/sqrt(n) (a unit-length row),
    so a long or garbled text (a base64 image decoded as text: 512 random grams) cannot add up
    hundreds of small weights into a certainty."""
    norm: npt.NDArray[np.float32] = np.sqrt(np.maximum((ids > 0).sum(axis=1), 1)).astype(np.float32)
    return norm


def stage_columns(feature_names: Sequence[str], prefix: str = "tok_") -> tuple[int, ...]:
    """The hashed word columns the stage reads."""
    return tuple(i for i, name in enumerate(feature_names) if name.startswith(prefix))


def id_columns(feature_names: Sequence[str]) -> tuple[int, ...]:
    """The gram id columns (milter/features/text.py): read by the stage, never by the trees."""
    return stage_columns(feature_names, "gram_")
