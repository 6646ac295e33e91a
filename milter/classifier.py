"""The ONNX classifier: model file + metadata JSON, checked against the code's feature schema at load.

Two graphs of the same trees may ship with a model (docs/gpu.md):

* the TreeEnsemble graph (`current.onnx`, always): one `ai.onnx.ml` TreeEnsembleClassifier node, which
  ONNX Runtime's CUDA provider has no kernel for. It is scored on the CPU provider only: listing CUDA
  for it would not move the trees to the GPU, only copy data there and back.
* the tensor graph (`current.tensor.onnx`, named in the metadata's `tensor_graph` entry with its own
  sha256; training/tensor_graph.py compiles it): the same trees as MatMul / Gather / LessOrEqual / ...,
  which the CUDA provider runs. Older models have none.

`[model] provider` picks: "cpu" the TreeEnsemble graph on the CPU; "auto" (default) and "cuda" the tensor
graph on CUDA when it can be had. That CUDA session is made with `session.disable_cpu_ep_fallback = 1`
(a node without a CUDA kernel fails the session instead of running on the CPU behind our back), TF32
off, and a profiled run at load must show every node on CUDAExecutionProvider and probabilities equal
to the TreeEnsemble graph's on probe rows. When any of that fails the CPU graph scores, and the reason is
logged once per load (WARNING; with provider = "cuda" asked for, an ERROR line too). `Classifier.graph`
and `.providers` say what really scores the mail; nothing reports a provider merely available.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
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


#: The two graphs a model may be scored with (`Classifier.graph`).
TREE_ENSEMBLE, TENSOR = "tree-ensemble", "tensor"
#: What [model] provider may say.
PROVIDER_SETTINGS: tuple[str, ...] = ("auto", "cpu", "cuda")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
#: current.onnx -> current.tensor.onnx (history/<name>.onnx -> history/<name>.tensor.onnx)
TENSOR_SUFFIX = ".tensor.onnx"
#: The CUDA session's provider options: TF32 off, so that the text stage's MatMul stays float32 as on the
#: CPU (the same as training.tensor_graph.CUDA_PROVIDER_OPTIONS; the gateway does not import training/).
CUDA_PROVIDER_OPTIONS: dict[str, str] = {"use_tf32": "0"}
#: The CUDA graph's probabilities against the CPU graph's on the probe rows at load. Both are within 1e-5
#: of LightGBM (checked at export); past this they are not the same trees, or the device computes wrong.
CUDA_PARITY_TOLERANCE = 1e-4
PROBE_ROWS = 64


def tensor_graph_path(model_path: Path) -> Path:
    return model_path.with_suffix(TENSOR_SUFFIX)


@dataclass(frozen=True)
class TensorGraph:
    """The compiled tensor graph a model ships, its bytes checked against the metadata's sha256."""

    path: Path
    data: bytes
    ops: tuple[str, ...]


class CudaUnavailable(Exception):
    """Why no CUDA session of the tensor graph could be made (the CPU graph scores instead)."""


class Classifier:
    """Scores batches of feature vectors; one ONNX Runtime session, safe to call from several threads.

    `graph` is TREE_ENSEMBLE or TENSOR, `providers` what the session really uses, `fallback` why the
    tensor graph on CUDA was not used when it was wanted (None otherwise)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        metadata: ModelMetadata,
        path: Path,
        graph: str = TREE_ENSEMBLE,
        fallback: str | None = None,
    ) -> None:
        self.session = session
        self.metadata = metadata
        self.path = path
        self.graph = graph
        self.fallback = fallback
        self.providers: list[str] = list(session.get_providers())
        self._input = session.get_inputs()[0].name
        self._prob_output = str(metadata.raw.get("onnx", {}).get("output") or _probability_output(session))

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def on_gpu(self) -> bool:
        """The tensor graph on the CUDA provider scores (placement checked at load)."""
        return self.graph == TENSOR and CUDA in self.providers

    def describe(self) -> str:
        """'the tensor graph on CUDAExecutionProvider': what scores the mail, for logs."""
        return f"the {self.graph} graph on {self.providers[0] if self.providers else '?'}"

    @classmethod
    def load(
        cls, path: Path, providers: tuple[str, ...] | None = None, provider: str = "auto"
    ) -> Classifier:
        """The model at `path` (and its metadata beside it). `provider` is [model] provider; `providers`,
        when given, forces the TreeEnsemble graph on exactly those (validation and tools use the CPU)."""
        if provider not in PROVIDER_SETTINGS:
            raise ModelError(f"provider must be one of {', '.join(PROVIDER_SETTINGS)}, got {provider!r}")
        meta = load_metadata(metadata_path(path))
        check_schema(meta)
        data = _read_checked(path, meta)
        tensor, absent = read_tensor_graph(path, meta)  # read even for the CPU: a mismatched pair is refused
        cpu = _session(data, path, providers or (CPU,))
        _check_width(cpu, path)
        clf = cls(cpu, meta, path)
        if providers is None and provider != "cpu":
            clf = _with_cuda(cls, clf, tensor, absent, provider)
        log.info("model %s loaded from %s: scoring with %s; providers in use: %s",
                 meta.name, path, clf.describe(), clf.providers)
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


def _session(data: bytes, path: Path, providers: tuple[str, ...]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one thread a worker: parallelism comes from worker processes
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(data, sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise ModelError(f"cannot load model {path}: {exc}") from exc


def _check_width(session: ort.InferenceSession, path: Path) -> None:
    width = session.get_inputs()[0].shape[-1]
    if isinstance(width, int) and width != len(SCHEMA):
        raise SchemaMismatchError(f"model {path} expects {width} features, the code computes {len(SCHEMA)}")


def _with_cuda(
    cls: type[Classifier], cpu: Classifier, tensor: TensorGraph | None, absent: str, provider: str
) -> Classifier:
    """`cpu`'s model scored by its tensor graph on CUDA when that can be had, else `cpu` itself, the
    reason logged: once per load, so a reload says it again but a message never does."""
    try:
        available = ort.get_available_providers()
        if CUDA not in available:
            raise CudaUnavailable(f"onnxruntime offers no {CUDA} (its providers: {available})")
        if tensor is None:
            raise CudaUnavailable(absent)
        _preload_cuda_libraries()
        session = cuda_session(tensor.data)
        _check_cuda_parity(session, cpu)
    except Exception as exc:  # whatever went wrong, the CPU graph scores: the gateway must keep scoring
        reason = str(exc) if isinstance(exc, CudaUnavailable) else f"{type(exc).__name__}: {exc}"
        if provider == "auto" and CUDA not in ort.get_available_providers():
            # the ordinary CPU host (onnxruntime's CPU build): nothing is wrong, nothing to warn about
            log.info("model %s: no CUDA session (%s)", cpu.name, reason)
        else:
            log.warning("model %s: no CUDA session of the tensor graph, %s scores the mail instead: %s",
                        cpu.name, cpu.describe(), reason)
        if provider == "cuda":
            log.error("[model] provider = \"cuda\" is set, but model %s is scored on the CPU (%s)",
                      cpu.name, reason)
        return cls(cpu.session, cpu.metadata, cpu.path, TREE_ENSEMBLE, reason)
    return cls(session, cpu.metadata, cpu.path, TENSOR)


def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the `gpu` extra's nvidia wheels (site-packages/nvidia/...),
    where the system's loader does not look, before the CUDA session needs them: without this the
    service only finds them through LD_LIBRARY_PATH. onnxruntime-gpu >= 1.21 has `preload_dlls`; a
    library it cannot load is left to the session, whose failure then names it."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload(directory="")  # "" : the nvidia site packages first, then the default search path
    except Exception as exc:  # the session's own error is the one to report
        log.debug("onnxruntime.preload_dlls: %s", exc)


def cuda_session(data: bytes) -> ort.InferenceSession:
    """A CUDA-only session of a tensor graph whose every node is checked to run on CUDA; CudaUnavailable
    (with the reason) otherwise.

    `session.disable_cpu_ep_fallback` makes a node without a CUDA kernel fail the session rather than run
    on the CPU; the profile of one run then shows where each node really ran (ONNX Runtime may still
    move small shape computations to the CPU, which that setting is meant to refuse: checked, not
    assumed)."""
    with tempfile.TemporaryDirectory(prefix="milter-cuda-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # the GPU computes; CPU threads would only spin, one set a worker
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "placement")
        try:
            session = ort.InferenceSession(data, options, providers=[(CUDA, CUDA_PROVIDER_OPTIONS)])
            session.run(None, {session.get_inputs()[0].name: probe_rows(1)})
            profile = Path(session.end_profiling())
            events = json.loads(profile.read_text(encoding="utf-8"))
        except Exception as exc:  # onnxruntime raises its own types (no device, no kernel, ...)
            raise CudaUnavailable(f"the CUDA session could not be made: {type(exc).__name__}: {exc}") from exc
    check_placement(session.get_providers(), events)
    return session


def node_placement(events: Any) -> dict[str, str]:
    """Node name -> the provider it ran on, from an onnxruntime profile (a list of trace events)."""
    if not isinstance(events, list):
        return {}
    return {
        str(e["name"]): str(e["args"]["provider"])
        for e in events
        if isinstance(e, dict) and e.get("cat") == "Node" and "provider" in (e.get("args") or {})
    }


def check_placement(session_providers: list[str], events: Any) -> None:
    """CudaUnavailable unless the session uses CUDA and every profiled node ran on it."""
    if CUDA not in session_providers:
        raise CudaUnavailable(f"the session does not use {CUDA} (it uses {session_providers})")
    placed = node_placement(events)
    if not placed:
        raise CudaUnavailable("the profiled run shows no node: placement unknown")
    elsewhere = sorted({n for n, p in placed.items() if p != CUDA})
    if elsewhere:
        raise CudaUnavailable(f"{len(elsewhere)} node(s) ran off CUDA, e.g. {elsewhere[:3]}")


def probe_rows(n: int = PROBE_ROWS) -> npt.NDArray[np.float32]:
    """Fixed rows for the load-time checks: mostly zeros (as most features of a message are) and
    non-negative values of several magnitudes."""
    rng = np.random.default_rng(15)
    rows = rng.random((n, len(SCHEMA)), dtype=np.float32) * np.float32(10.0) ** rng.integers(
        -2, 4, size=(n, len(SCHEMA))
    ).astype(np.float32)
    rows[rng.random(rows.shape) < 0.7] = 0.0
    return np.ascontiguousarray(rows, dtype=np.float32)


def _check_cuda_parity(session: ort.InferenceSession, cpu: Classifier) -> None:
    X = probe_rows()
    try:
        (got,) = session.run([cpu._prob_output], {session.get_inputs()[0].name: X})
    except Exception as exc:
        raise CudaUnavailable(f"the CUDA session failed on the probe rows: {exc}") from exc
    worst = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - cpu.predict(X).astype(np.float64))))
    if not worst <= CUDA_PARITY_TOLERANCE:  # NaN too
        raise CudaUnavailable(
            f"the tensor graph on CUDA differs from the CPU graph by {worst:.3g} > {CUDA_PARITY_TOLERANCE:g}"
        )


def read_tensor_graph(path: Path, meta: ModelMetadata) -> tuple[TensorGraph | None, str]:
    """(the tensor graph, '') or (None, why there is none). ModelError when the file does not match its
    digest (corrupt, or caught mid-swap: retry), even when only the CPU will score: a model whose files do
    not belong together is not loaded."""
    entry = meta.raw.get("tensor_graph")
    if entry is None:
        return None, f"model {meta.name} ships no tensor graph (metadata has no tensor_graph entry)"
    if not isinstance(entry, Mapping) or not isinstance(entry.get("sha256"), str):
        raise ModelError(f"model {path}: metadata key tensor_graph lacks its sha256")
    tpath = tensor_graph_path(path)
    try:
        data = tpath.read_bytes()
    except FileNotFoundError:
        return None, f"its tensor graph {tpath} is missing"
    except OSError as exc:
        raise ModelError(f"cannot read tensor graph {tpath}: {exc.strerror}") from exc
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ModelError(
            f"cannot load model {path}: tensor graph {tpath.name} does not match its metadata (sha256 "
            "differs); corrupt, from another model, or replaced while loading: retry"
        )
    return TensorGraph(tpath, data, tuple(str(op) for op in entry.get("ops", ()))), ""


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


def _probability_output(session: ort.InferenceSession) -> str:
    """LightGBM exports give (label, probabilities): the last float tensor is the probabilities."""
    floats = [out for out in session.get_outputs() if "float" in out.type]
    if not floats:
        raise ModelError("model has no float output to read probabilities from")
    return str(floats[-1].name)
