"""The ONNX classifier: model file + metadata JSON, checked against the code's feature schema at load.

Providers: CUDA first, then CPU, when onnxruntime-gpu is installed. ONNX Runtime's CUDA provider has no
kernel for tree ensembles, so a LightGBM graph runs its TreeEnsemble node on the CPU even then: we log
`session.get_providers()` (what the session really uses), never the merely available ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from milter.errors import ModelError, SchemaMismatchError
from milter.features import SCHEMA
from milter.types import CLASS_NAMES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    schema_version: str
    schema_digest: str
    class_names: tuple[str, ...]
    thresholds: Mapping[str, Mapping[str, float]]
    raw: Mapping[str, Any] = field(default_factory=dict)


def metadata_path(model_path: Path) -> Path:
    return model_path.with_suffix(".json")


def load_metadata(path: Path) -> ModelMetadata:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"model metadata {path} not found (every model ships with its .json)") from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"model metadata {path} is unreadable: {exc}") from exc
    try:
        schema = raw["schema"]
        return ModelMetadata(
            name=str(raw["name"]),
            schema_version=str(schema["version"]),
            schema_digest=str(schema["digest"]),
            class_names=tuple(raw["class_names"]),
            thresholds={k: {a: float(t) for a, t in v.items()} for k, v in raw["thresholds"].items()},
            raw=raw,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"model metadata {path} lacks or mangles a required key: {exc!r}") from exc


class Classifier:
    """Scores batches of feature vectors; one ONNX Runtime session, safe to call from several threads."""

    def __init__(self, session: ort.InferenceSession, metadata: ModelMetadata, path: Path) -> None:
        self.session = session
        self.metadata = metadata
        self.path = path
        self.providers: list[str] = list(session.get_providers())
        self._input = session.get_inputs()[0].name
        self._prob_output = str(metadata.raw.get("onnx", {}).get("output") or _probability_output(session))

    @property
    def name(self) -> str:
        return self.metadata.name

    @classmethod
    def load(cls, path: Path, providers: tuple[str, ...] | None = None) -> Classifier:
        meta = load_metadata(metadata_path(path))
        check_schema(meta)
        data = _read_checked(path, meta)
        wanted = providers or _default_providers()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one thread a worker: parallelism comes from worker processes
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(data, sess_options=options, providers=list(wanted))
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ModelError(f"cannot load model {path}: {exc}") from exc
        width = session.get_inputs()[0].shape[-1]
        if isinstance(width, int) and width != len(SCHEMA):
            raise SchemaMismatchError(
                f"model {path} expects {width} features, the code computes {len(SCHEMA)}"
            )
        clf = cls(session, meta, path)
        log.info("model %s loaded from %s; providers in use: %s", meta.name, path, clf.providers)
        if "CUDAExecutionProvider" in clf.providers:
            log.info("CUDA provider active, but tree-ensemble nodes have no CUDA kernel and run on the CPU")
        return clf

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(n, d) float32 -> (n, 3) class probabilities in CLASS_NAMES order."""
        if features.ndim != 2 or features.shape[1] != len(SCHEMA):
            raise ModelError(f"feature batch has shape {features.shape}, expected (n, {len(SCHEMA)})")
        try:
            out = self.session.run(
                [self._prob_output], {self._input: features.astype(np.float32, copy=False)}
            )
        except Exception as exc:
            raise ModelError(f"inference failed: {exc}") from exc
        probs = np.asarray(out[0], dtype=np.float32)
        if probs.shape != (features.shape[0], len(CLASS_NAMES)):
            raise ModelError(f"model returned shape {probs.shape}, expected ({features.shape[0]}, 3)")
        return probs


def _read_checked(path: Path, meta: ModelMetadata) -> bytes:
    """The ONNX bytes, checked against the metadata's sha256. Read after the JSON: promotion replaces
    current.onnx before current.json, so a racing load can only see new ONNX + old JSON, caught here."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot load model {path}: {exc.strerror}") from exc
    onnx_meta = meta.raw.get("onnx")
    expected = onnx_meta.get("sha256") if isinstance(onnx_meta, Mapping) else None
    if isinstance(expected, str) and hashlib.sha256(data).hexdigest() != expected:
        raise ModelError(
            f"cannot load model {path}: it does not match its metadata (sha256 differs); "
            "corrupt, or replaced while loading: retry"
        )
    return data


def check_schema(meta: ModelMetadata) -> None:
    if meta.schema_digest != SCHEMA.digest or meta.schema_version != SCHEMA.version:
        raise SchemaMismatchError(
            f"model {meta.name} was trained for feature schema {meta.schema_version}/{meta.schema_digest}, "
            f"this code computes {SCHEMA.version}/{SCHEMA.digest}: retrain (make train) or use a matching one"
        )
    if tuple(meta.class_names) != CLASS_NAMES:
        raise SchemaMismatchError(f"model classes {meta.class_names} differ from {CLASS_NAMES}")


def _default_providers() -> tuple[str, ...]:
    available = ort.get_available_providers()
    return tuple(p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available)


def _probability_output(session: ort.InferenceSession) -> str:
    """LightGBM exports give (label, probabilities): the last float tensor is the probabilities."""
    floats = [out for out in session.get_outputs() if "float" in out.type]
    if not floats:
        raise ModelError("model has no float output to read probabilities from")
    return str(floats[-1].name)
