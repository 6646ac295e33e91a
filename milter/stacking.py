"""The text stage: linear scores over the hashed word columns, fed to the trees as extra features.

Trees add evidence a few splits at a time; a message's words are hundreds of weak signals that only
count when summed. A linear model sums them (what SpamAssassin's and Rspamd's Bayes do), and its
scores become two more columns for the trees: "the words read like unwanted mail" and "like
phishing". Measured on the sender split (docs/DETECTION.md): at the same modern-ham false-positive
rate, spam caught rose by 2 to 3 points and the plain-text 419 and stock-pump spam the trees missed
is caught.

The stage is part of the model, not of the features: its weights are learned with the trees and ship
inside the ONNX graph (Gather, MatMul, Add, Concat in front of the tree ensemble), so the gateway
still feeds the graph the feature vector alone. The same weights are written into the metadata
(`text_stage`) for the explainer, which reads the trees over the extended vector; its load check
(softmax of its raw scores equals the graph's probabilities) proves the two copies agree.
"""

from __future__ import annotations

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
    """scores = X[:, columns] @ weights + bias, one score per name (log-odds of a linear model)."""

    columns: tuple[int, ...]
    weights: npt.NDArray[np.float32]  # (len(columns), len(names))
    bias: npt.NDArray[np.float32]  # (len(names),)
    names: tuple[str, ...] = STAGE_NAMES

    def __post_init__(self) -> None:
        shape = (len(self.columns), len(self.names))
        if self.weights.shape != shape or self.bias.shape != (len(self.names),):
            raise ValueError(
                f"text stage: weights {self.weights.shape} and bias {self.bias.shape} do not fit "
                f"{len(self.columns)} columns and {len(self.names)} outputs"
            )

    def scores(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        # float32 throughout, as the graph computes it
        out: npt.NDArray[np.float32] = (
            np.asarray(X, dtype=np.float32)[:, list(self.columns)] @ self.weights + self.bias
        ).astype(np.float32)
        return out

    def extend(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The trees' input: the feature vector followed by the stage's scores."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float32))
        return np.hstack([X, self.scores(X)])

    def as_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "names": list(self.names),
            "columns": list(self.columns),
            "weights": self.weights.tolist(),
            "bias": self.bias.tolist(),
        }

    @classmethod
    def from_json(cls, raw: Any, n_features: int) -> TextStage:
        """ModelError naming what is wrong when the metadata entry is not a stage for `n_features`."""
        if not isinstance(raw, Mapping) or raw.get("format") != FORMAT:
            raise ModelError(f"metadata key text_stage is not a {FORMAT} entry")
        try:
            columns = tuple(int(c) for c in raw["columns"])
            stage = cls(
                columns,
                np.asarray(raw["weights"], dtype=np.float32).reshape(len(columns), -1),
                np.asarray(raw["bias"], dtype=np.float32),
                tuple(str(n) for n in raw["names"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"metadata key text_stage is malformed: {exc}") from exc
        if any(not 0 <= c < n_features for c in columns) or not np.all(np.isfinite(stage.weights)):
            raise ModelError(
                "metadata key text_stage names columns outside the feature schema or non-finite weights"
            )
        return stage


def stage_columns(feature_names: Sequence[str], prefix: str = "tok_") -> tuple[int, ...]:
    """The hashed word columns the stage reads."""
    return tuple(i for i, name in enumerate(feature_names) if name.startswith(prefix))
