"""The tensor graph shipped beside the TreeEnsemble graph: compiled, checked, parity-tested, described.

`milter-train` and `milter-retrain` call `export_tensor_graph` on the rows of their own parity check
(every validation and test row, and the store's labels): the booster's trees compiled into the shipped
graph by training/tensor_graph.py, its operators checked against the CUDA provider's list (`check_ops`),
and its probabilities, on the CPU provider, within `PARITY_TOL` (1e-5) of LightGBM's on every row, or the
export fails (ExportMismatchError), as the TreeEnsemble graph's own check does. The metadata's
`tensor_graph` entry names the file (current.tensor.onnx), its sha256, its operators and the parity
figure; milter.classifier loads it for the CUDA provider, milter.registry carries and checks it.

For a model already shipped (models/ holds one exported before the tensor graph existed):

    .venv/bin/python -m training.tensor_export [models/current.onnx] [--cache-dir .cache]

compiles the tensor graph from the model's LightGBM text (current.lgb.txt, the same trees), checks it
on the fixtures' feature vectors and on every cached corpus feature vector of the model's schema
(.cache/features-<digest>-*/, when training ran here: a superset of the validation and test rows), writes
current.tensor.onnx and adds the `tensor_graph` entry to current.json, everything else in it unchanged.
The compiler is deterministic: the same model gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from milter.classifier import CUDA_PROVIDER_OPTIONS, TENSOR_SUFFIX, metadata_path, tensor_graph_path
from milter.explain import explainer_path
from training import model as mdl
from training.tensor_graph import OPSET, CompileError, check_ops, compile_booster, used_ops

log = logging.getLogger("milter-train")

TENSOR_NAME = "current" + TENSOR_SUFFIX
TENSOR_FORMAT = "onnx-standard-ops"
CHUNK = 4096  # rows per onnxruntime call in the parity checks
FORMULATION = "GEMM (training/tensor_graph.py; Hummingbird, Nakandala et al., OSDI 2020)"


@dataclass(frozen=True)
class TensorExport:
    """A compiled, checked tensor graph and what the metadata says about it."""

    data: bytes
    ops: tuple[str, ...]
    max_abs_diff: float
    rows: int

    def entry(self, checked_on: str, file: str = TENSOR_NAME) -> dict[str, Any]:
        """The metadata's `tensor_graph` entry."""
        return {
            "file": file,
            "format": TENSOR_FORMAT,
            "sha256": hashlib.sha256(self.data).hexdigest(),
            "opset": OPSET,
            "formulation": FORMULATION,
            "ops": list(self.ops),
            "cuda_provider_options": dict(CUDA_PROVIDER_OPTIONS),
            "max_abs_diff": self.max_abs_diff,
            "tolerance": mdl.PARITY_TOL,
            "rows": self.rows,
            "checked_on": checked_on,
        }


def export_tensor_graph(
    model_text: str,
    onnx_bytes: bytes,
    rows: npt.NDArray[np.float32],
    reference: npt.NDArray[np.float64],
) -> TensorExport:
    """`model_text`'s trees compiled into the TreeEnsemble graph `onnx_bytes`, checked: only operators
    of tensor_graph.OPS, and probabilities within PARITY_TOL of `reference` (LightGBM's, on `rows`).
    ExportMismatchError otherwise: a model whose tensor graph is not exact does not ship."""
    try:
        graph = compile_booster(model_text, graph=onnx.load_from_string(onnx_bytes))
        check_ops(graph)
    except CompileError as exc:
        raise mdl.ExportMismatchError(f"tensor graph: {exc}") from exc
    data = graph.SerializeToString()
    probs = probabilities(data, rows)
    try:
        worst = mdl.check_parity(reference, probs)
    except mdl.ExportMismatchError as exc:
        raise mdl.ExportMismatchError(f"tensor graph: {exc}") from exc
    return TensorExport(data, tuple(sorted(used_ops(graph))), worst, len(rows))


def probabilities(data: bytes, rows: npt.NDArray[np.float32], chunk: int = CHUNK) -> npt.NDArray[np.float32]:
    """The graph's probabilities on the CPU provider, `chunk` rows a call: the GEMM formulation holds a
    (trees x leaves, rows) matrix, about 24 kB a row for the shipped model."""
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    out = [_empty(3)]
    for start in range(0, len(rows), chunk):
        part = np.ascontiguousarray(rows[start : start + chunk], dtype=np.float32)
        out.append(np.asarray(session.run([mdl.PROBA_OUTPUT], {mdl.INPUT_NAME: part})[0], dtype=np.float32))
    return np.concatenate(out)


def with_entry(meta: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """`meta` with its `tensor_graph` entry set, placed after `explainer` (the graphs' files together);
    every other key keeps its place and value."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if key != "tensor_graph":
            out[key] = value
        if key == "explainer":
            out["tensor_graph"] = dict(entry)
    out.setdefault("tensor_graph", dict(entry))
    return out


# --- a model already shipped ---------------------------------------------------------------------------


def fixture_rows(root: Path) -> npt.NDArray[np.float32]:
    from milter.scan import prepare

    paths = sorted((root / "fixtures").rglob("*.eml"))
    return np.stack([prepare(p.read_bytes()).vector for p in paths]) if paths else _empty()


def cached_rows(cache_dir: Path, schema_digest: str, width: int) -> npt.NDArray[np.float32]:
    """Every feature vector cached by training for this schema (all splits), deduplicated."""
    blocks = []
    for shard in sorted(cache_dir.glob(f"features-{schema_digest[:16]}-*/shard-*.npz")):
        with np.load(shard, allow_pickle=False) as data:
            X = data["X"]
            if X.ndim == 2 and X.shape[1] == width:
                blocks.append(np.asarray(X, dtype=np.float32))
    return np.unique(np.concatenate(blocks), axis=0) if blocks else _empty(width)


def _empty(width: int = 0) -> npt.NDArray[np.float32]:
    return np.zeros((0, width), dtype=np.float32)


def lightgbm_reference(
    booster: lgb.Booster, onnx_bytes: bytes, rows: npt.NDArray[np.float32]
) -> npt.NDArray[np.float64]:
    """LightGBM's probabilities on the trees' very input: the features and the graph's own text-stage
    scores (as milter-train's parity check: float32 summation order must not flip a split)."""
    out = [np.zeros((0, 3), dtype=np.float64)]
    for start in range(0, len(rows), CHUNK):
        part = rows[start : start + CHUNK]
        _, stage = mdl.onnx_outputs(onnx_bytes, part)
        out.append(mdl.predict_extended(booster, part if stage is None else np.hstack([part, stage])))
    return np.concatenate(out)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def export_shipped(model_path: Path, root: Path, cache_dir: Path) -> TensorExport:
    """Compile, check and write the tensor graph of the model at `model_path`; add its metadata entry."""
    meta_file = metadata_path(model_path)
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    onnx_bytes = model_path.read_bytes()
    if hashlib.sha256(onnx_bytes).hexdigest() != meta["onnx"]["sha256"]:
        raise mdl.ExportMismatchError(f"{model_path} does not match its metadata's sha256")
    text = explainer_path(model_path).read_text(encoding="utf-8")
    booster = lgb.Booster(model_str=text)
    width = len(meta["schema"]["feature_names"])
    fixtures = fixture_rows(root)
    cached = cached_rows(cache_dir, meta["schema"]["digest"], width)
    rows = np.concatenate([fixtures, cached]) if len(cached) else fixtures
    log.info("tensor graph of %s: checking %d rows (%d fixtures, %d cached corpus vectors)",
             meta["name"], len(rows), len(fixtures), len(cached))
    done = export_tensor_graph(text, onnx_bytes, rows, lightgbm_reference(booster, onnx_bytes, rows))
    checked = f"fixtures/ ({len(fixtures)} messages)" + (
        f" and every cached corpus feature vector ({len(cached)})" if len(cached) else ""
    )
    tensor_file = tensor_graph_path(model_path)
    _write_atomic(tensor_file, done.data)
    entry = done.entry(checked, file=TENSOR_NAME if model_path.name == "current.onnx" else tensor_file.name)
    _write_atomic(meta_file, (json.dumps(with_entry(meta, entry), indent=2) + "\n").encode("utf-8"))
    return done


def main(argv: Sequence[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(prog="python -m training.tensor_export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, default=root / "models" / "current.onnx")
    p.add_argument("--cache-dir", type=Path, default=root / ".cache",
                   help="training's feature cache, for the corpus rows (default: %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        done = export_shipped(args.model, root, args.cache_dir)
    except (mdl.ExportMismatchError, OSError, KeyError, ValueError) as exc:
        print(f"tensor export: ERROR {exc}", file=sys.stderr)
        return 1
    print(f"wrote {tensor_graph_path(args.model)} ({len(done.data) / 1e6:.2f} MB, {len(done.ops)} operators; "
          f"max |diff| vs LightGBM {done.max_abs_diff:.3g} on {done.rows} rows) and its entry in "
          f"{metadata_path(args.model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
