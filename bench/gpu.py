#!/usr/bin/env python3
"""Scoring throughput by batch size: LightGBM, the shipped TreeEnsemble graph, and the tensor graph
(training/tensor_graph.py) on the CPU and, when onnxruntime has the CUDA provider, on the GPU.

Why: the TreeEnsemble node has no CUDA kernel, so the only way to score on a GPU is the compiled tensor
graph; this says, by measurement, what each way costs per batch size, and that each scores the same (the
parity column: max |probability - LightGBM's| on the real feature vectors, text stage included).

The GPU row is printed only when measured: with onnxruntime's CPU build it says "CUDA provider not
available: skipped". The CUDA session is made with `session.disable_cpu_ep_fallback = 1` (a node without a
CUDA kernel fails the session instead of silently running on the CPU) and TF32 off; the providers the
session really has and the provider of every node (from one profiled run) are printed. GPU timings include
the copies of the batch to the device and of the probabilities back, as the gateway would pay them.

Input: real feature vectors of corpus mail (an even sample, `--messages`), cycled to fill big batches.
Per batch size: one warm-up call, then calls for about `--seconds` (at least 3): rows/s = batch / median.

Usage: .venv/bin/python bench/gpu.py [--sizes 1,16,256,4096,65536] [--messages 2000] [--seconds 1]
                                     [--lightgbm-threads 0] [--corpora .cache/corpora] [--model ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from milter.classifier import load_metadata, metadata_path
from milter.config import DEFAULT_MODEL
from milter.explain import explainer_path
from milter.features import SCHEMA
from milter.scan import prepare
from milter.stacking import TextStage
from training.tensor_graph import CUDA_PROVIDER_OPTIONS, compile_booster

SIZES = (1, 16, 256, 4096, 65536)
CUDA = "CUDAExecutionProvider"
Rows = npt.NDArray[np.float32]
Scorer = Callable[[Rows], npt.NDArray[np.float32]]


@dataclass(frozen=True)
class Timing:
    batch: int
    median_s: float
    calls: int

    @property
    def rows_per_s(self) -> float:
        return self.batch / self.median_s


def feature_rows(corpora: Path, n: int) -> Rows:
    files = sorted(corpora.glob("*/*/*.eml"))
    if not files:
        sys.exit(f"no messages under {corpora}: run make corpora")
    step = max(1, len(files) // n)
    return np.stack([prepare(p.read_bytes()).vector for p in files[::step][:n]])


def timed(score: Scorer, rows: Rows, batch: int, seconds: float) -> Timing:
    data = np.ascontiguousarray(np.resize(rows, (batch, rows.shape[1])))  # the rows cycled
    score(data)  # warm-up: allocations, kernels, cuBLAS handles
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 2000):
        t0 = time.perf_counter()
        score(data)
        times.append(time.perf_counter() - t0)
    return Timing(batch, statistics.median(times), len(times))


def lightgbm_scorer(model: Path, threads: int) -> Scorer:
    """What the graphs compute, in LightGBM: the text stage (numpy, from the metadata), then the trees
    (`threads` 0: LightGBM's default, one OpenMP thread per CPU)."""
    raw = load_metadata(metadata_path(model)).raw
    stage = TextStage.from_json(raw["text_stage"], len(SCHEMA)) if raw.get("text_stage") else None
    booster = lgb.Booster(model_file=str(explainer_path(model)))

    def score(X: Rows) -> npt.NDArray[np.float32]:
        extended = stage.extend(X) if stage is not None else X
        return np.asarray(booster.predict(extended, num_threads=threads), dtype=np.float32)

    return score


def onnx_scorer(session: ort.InferenceSession) -> Scorer:
    name = session.get_inputs()[0].name

    def score(X: Rows) -> npt.NDArray[np.float32]:
        (probs,) = session.run(["probabilities"], {name: X})
        return np.asarray(probs, dtype=np.float32)

    return score


def cpu_session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def cuda_session(model: bytes, profile_dir: str | None = None) -> ort.InferenceSession:
    """CUDA only: a node without a CUDA kernel makes this fail rather than run on the CPU."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "gpu")
    return ort.InferenceSession(model, options, providers=[(CUDA, CUDA_PROVIDER_OPTIONS)])


def node_providers(model: bytes, rows: Rows) -> Counter[str]:
    """Nodes per execution provider, from the profile of one run of a CUDA session."""
    with tempfile.TemporaryDirectory() as tmp:
        session = cuda_session(model, tmp)
        onnx_scorer(session)(rows[:16])
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    placed = {
        e["name"]: e["args"]["provider"]
        for e in events
        if e.get("cat") == "Node" and "provider" in e.get("args", {})
    }
    return Counter(placed.values())


def parity(score: Scorer, reference: npt.NDArray[np.float32], rows: Rows) -> float:
    return float(np.max(np.abs(score(rows).astype(np.float64) - reference.astype(np.float64))))


def scorers(model: Path, tensor: bytes, rows: Rows, lightgbm_threads: int) -> dict[str, Scorer]:
    """Every way to score this machine has, in table order; the CUDA one only if it could be made."""
    found: dict[str, Scorer] = {
        "LightGBM predict (CPU)": lightgbm_scorer(model, lightgbm_threads),
        "ONNX TreeEnsemble, CPU provider": onnx_scorer(cpu_session(model.read_bytes())),
        "tensor graph, CPU provider": onnx_scorer(cpu_session(tensor)),
    }
    if CUDA not in ort.get_available_providers():
        print(f"CUDA provider not available: skipped (providers: {ort.get_available_providers()})")
        return found
    try:
        session = cuda_session(tensor)
    except Exception as exc:  # onnxruntime raises its own types; say why, claim nothing
        print(f"CUDA provider available but no CUDA-only session of the tensor graph: {exc}")
        print("CUDA: skipped")
        return found
    print(f"CUDA session providers: {session.get_providers()}; "
          f"nodes by provider (profiled run): {dict(node_providers(tensor, rows))}")
    found["tensor graph, CUDA provider"] = onnx_scorer(session)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="batch sizes, comma separated")
    ap.add_argument("--messages", type=int, default=2000, help="corpus messages to take feature vectors from")
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement (at least 3 calls)")
    ap.add_argument("--corpora", type=Path, default=Path(".cache/corpora"))
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--lightgbm-threads", type=int, default=0,
                    help="LightGBM predict's num_threads (0: its default, all CPUs; 1 spares small batches "
                         "the OpenMP start-up)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    rows = feature_rows(args.corpora, args.messages)
    t0 = time.perf_counter()
    tensor = compile_booster(explainer_path(args.model), graph=onnx.load(str(args.model))).SerializeToString()
    compile_s = time.perf_counter() - t0
    print(f"model {args.model} ({args.model.stat().st_size / 1e6:.2f} MB), tensor graph "
          f"{len(tensor) / 1e6:.2f} MB compiled in {compile_s:.1f} s; {len(rows)} feature vectors of corpus "
          f"mail; onnxruntime {ort.__version__}, lightgbm {lgb.__version__} (num_threads "
          f"{args.lightgbm_threads or 'default'}), {os.cpu_count()} CPUs")
    found = scorers(args.model, tensor, rows, args.lightgbm_threads)
    reference = next(iter(found.values()))(rows)
    print("\nparity: max |probability - LightGBM's| over the feature vectors; rows/s: batch / median call")
    print(f"{'scorer':34} {'parity':>9} {'batch':>7} {'rows/s':>12} {'ms/call':>10} {'calls':>6}")
    for name, score in found.items():
        gap = parity(score, reference, rows)
        for batch in sizes:
            t = timed(score, rows, batch, args.seconds)
            line = f"{name:34} {gap:9.1e} {batch:7d} {t.rows_per_s:12,.0f} {t.median_s * 1e3:10.3f}"
            print(f"{line} {t.calls:6d}", flush=True)


if __name__ == "__main__":
    main()
