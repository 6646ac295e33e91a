#!/usr/bin/env python3
"""The GPU check of issue 15 in one process: compile, parity, every node on CUDA, throughput.

Two commands:

  prepare OUT.npz   (here, in the project's venv): the rows and LightGBM's answers the device cannot make
                    itself. The device has no corpora and none of the gateway's feature extractors
                    (selectolax, tldextract, dkimpy, ...), so the feature vectors of fixtures/ (all of its
                    .eml) are extracted here with milter.scan.prepare, and LightGBM's probabilities computed
                    here for them (text stage from models/current.json, then Booster.predict), together with
                    tests/test_tensor_graph.py's probe rows (a row reaching every split of every tree with
                    its feature at the threshold, its float32 neighbours, NaN, +-inf, +-0, +-1e-35; stored
                    sparse) and LightGBM's probabilities for those. The tensor graphs compiled here are
                    stored too, as a fallback if LightGBM cannot be imported there (then step (a) FAILs and
                    the rest still runs, on the carried graphs).

  run --data F.npz --out DIR [--allow-cpu]   (on the device, from bench/device_check.sh --run): needs only
                    numpy, onnx, onnxruntime (the GPU build) and, for (a) and the LightGBM row of the table,
                    lightgbm (scipy); milter.stacking and training.tensor_graph come from the working tree.
      (a) compile models/current.lgb.txt into the tensor graph twice: spliced into models/current.onnx
          (text stage kept: the graph the gateway would run) and alone (the trees' own input, for the
          probe rows); compared with the graphs compiled here (sha256);
      (b) parity <= 1e-5 with LightGBM on the fixtures (whole graph) and on the probe rows (trees alone),
          on the CUDA session (with --allow-cpu and no CUDA provider: on the CPU provider, and it says so);
      (c) a CUDA session with session.disable_cpu_ep_fallback = 1 and TF32 off, and a profiled run whose
          every node must be on CUDAExecutionProvider; the CUDA/cuDNN libraries the process really mapped
          are listed (from /proc/self/maps). If the strict session cannot be made, a diagnostic session
          with fallback allowed says which nodes went to the CPU;
      (d) bench/gpu.py's table (same columns) over the fixture rows cycled to each batch size: LightGBM,
          TreeEnsemble on the CPU, tensor graph on the CPU, on CUDA (numpy in, numpy out: the copies
          included, as the gateway pays them) and on CUDA with the batch already on the GPU (IOBinding:
          the kernels alone). bench/gpu.py itself needs corpora and the gateway's feature extractors.

Every check prints one line `PASS name: ...`, `FAIL name: ...` or `SKIP name: ...`; the last line is
`RESULT: PASS` or `RESULT: FAIL (names)`; exit status 0 only for PASS. Files written under --out:
summary.txt (the check lines), throughput.txt (the table), profile.json (the profiled CUDA run), and
placement.txt (nodes by provider; with a failed strict session, the diagnostic placement).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import milter  # noqa: E402,F401  (turns ONNX Runtime's telemetry off before onnxruntime is imported)

MODEL = ROOT / "models" / "current.onnx"
TEXT = ROOT / "models" / "current.lgb.txt"
METADATA = ROOT / "models" / "current.json"
SHIPPED_TENSOR = ROOT / "models" / "current.tensor.onnx"  # the compiled graph, where the model ships one
MODEL_FILES = (MODEL, TEXT, METADATA)  # what the carried rows and answers were made from
TOL = 1e-5  # the bound
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
SIZES = (1, 16, 256, 4096, 65536)
TARGET_ROWS_PER_S = 5_000_000  # the acceptance, at large batch on an H200
Rows = npt.NDArray[np.float32]
Probs = npt.NDArray[np.float64]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_stage(width: int) -> Any:
    from milter.stacking import TextStage

    raw = json.loads(METADATA.read_text(encoding="utf-8")).get("text_stage")
    return None if raw is None else TextStage.from_json(raw, width)


# --- prepare (here) ----------------------------------------------------------------------------------------


def prepare(out: Path) -> None:
    import lightgbm as lgb
    import onnx

    from milter.scan import prepare as prepare_message
    from training.tensor_graph import compile_booster, parse_model

    sys.path.insert(0, str(ROOT / "tests"))  # the probe rows of the CPU test, not a copy of them
    from test_tensor_graph import probe_rows

    files = sorted((ROOT / "fixtures").rglob("*.eml"))
    X = np.stack([prepare_message(p.read_bytes()).vector for p in files]).astype(np.float32)
    stage = text_stage(X.shape[1])
    booster = lgb.Booster(model_file=str(TEXT))
    fixtures_ref = np.asarray(booster.predict(stage.extend(X) if stage is not None else X), dtype=np.float64)

    probes = np.concatenate(list(probe_rows(parse_model(TEXT.read_text(encoding="utf-8")))))
    probes_ref = np.asarray(booster.predict(probes), dtype=np.float64)
    # sparse: the rows are zeros but for the few features that lead to one split (-0.0 kept: bit test)
    where = np.nonzero(probes.view(np.uint32))
    whole = compile_booster(TEXT, graph=onnx.load(str(MODEL))).SerializeToString()
    trees = compile_booster(TEXT).SerializeToString()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        fixtures=X,
        fixture_names=np.array([str(p.relative_to(ROOT)) for p in files]),
        fixtures_ref=fixtures_ref,
        probes_shape=np.array(probes.shape, dtype=np.int64),
        probes_row=where[0].astype(np.int32),
        probes_col=where[1].astype(np.int32),
        probes_val=probes[where],
        probes_ref=probes_ref,
        whole_graph=np.frombuffer(whole, dtype=np.uint8),
        trees_graph=np.frombuffer(trees, dtype=np.uint8),
        model_sha256=np.array([sha256(p.read_bytes()) for p in MODEL_FILES]),
        lightgbm_version=np.array(lgb.__version__),
    )
    print(f"{out}: {len(X)} fixture rows, {len(probes)} probe rows ({len(where[0])} values set), tensor "
          f"graphs {len(whole) / 1e6:.2f} MB (whole) and {len(trees) / 1e6:.2f} MB (trees), "
          f"{out.stat().st_size / 2**20:.1f} MiB; lightgbm {lgb.__version__}")


# --- run (on the device) -----------------------------------------------------------------------------------


class Report:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.lines: list[str] = []
        self.failed: list[str] = []

    def say(self, verdict: str, name: str, detail: str) -> None:
        line = f"{verdict} {name}: {detail}"
        print(line, flush=True)
        self._keep(line)
        if verdict == "FAIL":
            self.failed.append(name)

    def info(self, text: str) -> None:
        print(text, flush=True)
        self._keep(f"     {text}")

    def _keep(self, line: str) -> None:  # written as it goes: a run stopped by its timeout still says
        self.lines.append(line)
        (self.out / "summary.txt").write_text("\n".join(self.lines) + "\n", encoding="utf-8")

    def finish(self) -> int:
        result = "RESULT: PASS" if not self.failed else f"RESULT: FAIL ({', '.join(self.failed)})"
        print(result, flush=True)
        (self.out / "summary.txt").write_text("\n".join([*self.lines, result]) + "\n", encoding="utf-8")
        return 0 if not self.failed else 1


def worst(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return float("nan") if np.isnan(d).any() else float(d.max())


def probabilities(session: Any, X: Rows) -> Probs:
    (probs,) = session.run(["probabilities"], {session.get_inputs()[0].name: np.ascontiguousarray(X)})
    return np.asarray(probs, dtype=np.float64)


def mapped_libraries() -> list[str]:
    """CUDA, cuDNN and onnxruntime libraries mapped into this process (what really got loaded, and from
    where)."""
    keys = ("libcud", "libcublas", "libcurand", "libcufft", "libnvrtc", "libonnxruntime")
    found = set()
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if any(k in os.path.basename(path) for k in keys):
                found.add(path)
    return sorted(found)


def sessions_module() -> Any:
    import onnxruntime as ort

    return ort


def cuda_session(model: bytes, *, strict: bool = True, profile_prefix: str | None = None) -> Any:
    """As bench/gpu.py's cuda_session: CUDA only, no silent CPU fallback, TF32 off."""
    ort = sessions_module()
    from training.tensor_graph import CUDA_PROVIDER_OPTIONS

    options = ort.SessionOptions()
    if strict:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers: list[Any] = [(CUDA, dict(CUDA_PROVIDER_OPTIONS))]
    if not strict:
        providers.append(CPU)
    return ort.InferenceSession(model, options, providers=providers)


def cpu_session(model: bytes) -> Any:
    return sessions_module().InferenceSession(model, providers=[CPU])


def placement(session: Any, X: Rows) -> tuple[Counter[str], dict[str, str], Path]:
    """Nodes by provider and node -> provider, from the profile of one run (session made with profiling)."""
    probabilities(session, X)
    path = Path(session.end_profiling())
    events = json.loads(path.read_text(encoding="utf-8"))
    placed = {
        e["name"].removesuffix("_kernel_time"): e["args"]["provider"]
        for e in events
        if e.get("cat") == "Node" and "provider" in e.get("args", {})
    }
    return Counter(placed.values()), placed, path


def unpack(data: Any) -> tuple[Rows, Probs, Rows, Probs]:
    probes = np.zeros(tuple(data["probes_shape"]), dtype=np.float32)
    probes[data["probes_row"], data["probes_col"]] = data["probes_val"]
    return data["fixtures"], data["fixtures_ref"], probes, data["probes_ref"]


def step_compile(report: Report, data: Any) -> tuple[bytes, bytes]:
    carried = bytes(data["whole_graph"]), bytes(data["trees_graph"])
    digests = [sha256(p.read_bytes()) for p in MODEL_FILES]
    if digests != [str(d) for d in data["model_sha256"]]:
        report.say("FAIL", "models", "models/current.* differ from those the carried rows were made from: "
                   "rerun bench/gpu_wheel.sh (it rewrites the data file)")
    try:
        import lightgbm
        import onnx

        from training.tensor_graph import check_ops, compile_booster

        t0 = time.perf_counter()
        whole = compile_booster(TEXT, graph=onnx.load(str(MODEL)))
        trees = compile_booster(TEXT)
        seconds = time.perf_counter() - t0
        check_ops(whole)
        check_ops(trees)
        w, t = whole.SerializeToString(), trees.SerializeToString()
        same = "identical to" if (w, t) == carried else "NOT byte-identical to"
        report.say("PASS", "compile", f"tensor graphs compiled in {seconds:.1f} s from {TEXT.name} + "
                   f"{MODEL.name} (whole {len(w) / 1e6:.2f} MB, trees {len(t) / 1e6:.2f} MB; "
                   f"{len(whole.graph.node)} nodes, operators within tensor_graph.OPS), {same} the graphs "
                   f"compiled before carrying; lightgbm {lightgbm.__version__}")
        return w, t
    except Exception as exc:  # a missing library, a compile error: say so, carry on with the carried graphs
        report.say("FAIL", "compile", f"{type(exc).__name__}: {exc}; going on with the graphs compiled "
                   "before carrying")
        traceback.print_exc()
        return carried


def step_cuda(
    report: Report, whole: bytes, trees: bytes, X: Rows, out: Path, *, soft: bool
) -> tuple[Any, Any] | None:
    """(c): the strict CUDA sessions of both graphs and the placement of every node; None if not made
    (`soft`, from --allow-cpu: that is a SKIP, not a FAIL, e.g. the GPU build on a machine without a GPU)."""
    try:
        strict_whole = cuda_session(whole, profile_prefix=str(out / "profile"))
        strict_trees = cuda_session(trees)
    except Exception as exc:
        report.say("SKIP" if soft else "FAIL", "cuda-session", f"no CUDA session with CPU fallback "
                   f"disabled: {type(exc).__name__}: {exc}" + ("; --allow-cpu: parity checked on the CPU "
                   "provider instead, nothing is claimed about a GPU" if soft else ""))
        try:  # why: where would the nodes go with fallback allowed?
            diag = cuda_session(whole, strict=False, profile_prefix=str(out / "diagnostic"))
            counts, placed, _ = placement(diag, X[:16])
            on_cpu = sorted(n for n, p in placed.items() if p != CUDA)
            (out / "placement.txt").write_text(
                f"diagnostic session (fallback allowed), providers {diag.get_providers()}\n"
                f"nodes by provider: {dict(counts)}\nnot on CUDA:\n" + "\n".join(on_cpu) + "\n",
                encoding="utf-8")
            report.info(f"diagnostic session with fallback allowed: nodes by provider {dict(counts)}; "
                        f"not on CUDA ({len(on_cpu)}): {on_cpu[:20]} (all in placement.txt)")
        except Exception as diag_exc:
            report.info(f"diagnostic session failed too: {type(diag_exc).__name__}: {diag_exc}")
        return None
    report.say("PASS", "cuda-session", f"made with session.disable_cpu_ep_fallback=1, use_tf32=0; "
               f"providers {strict_whole.get_providers()}")
    counts, placed, profile = placement(strict_whole, X[:16])
    profile.replace(out / "profile.json")
    off = sorted(n for n, p in placed.items() if p != CUDA)
    (out / "placement.txt").write_text(
        f"strict CUDA session, providers {strict_whole.get_providers()}\nnodes by provider (profiled run): "
        f"{dict(counts)}\n" + "\n".join(f"{p}\t{n}" for n, p in sorted(placed.items())) + "\n",
        encoding="utf-8")
    if placed and not off:
        report.say("PASS", "all-nodes-on-cuda", f"profiled run: {dict(counts)} (profile.json, placement.txt)")
    else:
        report.say("FAIL", "all-nodes-on-cuda", f"profiled run: {dict(counts)}; not on CUDA: {off[:20]}")
    libs = mapped_libraries()
    report.info("libraries mapped: " + (", ".join(libs) or "none found"))
    return strict_whole, strict_trees


def step_parity(report: Report, name: str, session: Any, X: Rows, ref: Probs, where: str) -> None:
    gap = worst(probabilities(session, X), ref)
    verdict = "PASS" if gap <= TOL else "FAIL"
    report.say(verdict, name, f"max |p - LightGBM| = {gap:.2e} over {len(X)} rows ({where}; bound {TOL:g})")


def step_shipped(report: Report, whole: bytes, X: Rows, ref: Probs, *, gpu: bool) -> None:
    """models/current.tensor.onnx (the compiled graph as the model ships it, for the classifier's CUDA path):
    the same bytes as compiled here, or else checked on its own (strict CUDA session, parity)."""
    shipped = SHIPPED_TENSOR.read_bytes()
    if shipped == whole:
        report.info(f"{SHIPPED_TENSOR.name}: byte-identical to the graph compiled here: the checks hold")
        return
    report.info(f"{SHIPPED_TENSOR.name}: not byte-identical to the graph compiled here: checked on its own")
    try:
        session = cuda_session(shipped) if gpu else cpu_session(shipped)
    except Exception as exc:
        report.say("FAIL", "shipped-tensor-graph", f"no {'strict CUDA' if gpu else 'CPU'} session: "
                   f"{type(exc).__name__}: {exc}")
        return
    step_parity(report, "parity-shipped-tensor-graph", session, X, ref,
                f"{SHIPPED_TENSOR.name}, {'CUDA provider, CPU fallback disabled' if gpu else 'CPU provider'}")


def lightgbm_scorer(X_width: int) -> Callable[[Rows], Probs] | None:
    try:
        import lightgbm as lgb
    except Exception as exc:
        print(f"LightGBM not importable here ({type(exc).__name__}: {exc}): its row is left out")
        return None
    stage = text_stage(X_width)
    booster = lgb.Booster(model_file=str(TEXT))

    def score(X: Rows) -> Probs:
        return np.asarray(booster.predict(stage.extend(X) if stage is not None else X), dtype=np.float64)

    return score


def bound_scorer(session: Any) -> Callable[[Rows], Callable[[], Probs]]:
    """The batch copied to the GPU once; each call runs the graph on it and leaves the output there."""
    ort = sessions_module()
    name = session.get_inputs()[0].name

    def bind(X: Rows) -> Callable[[], Probs]:
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(X), "cuda", 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, value)
        binding.bind_output("probabilities", "cuda", 0)

        def call() -> Probs:
            session.run_with_iobinding(binding)  # synchronous: returns when the GPU is done
            return np.empty((0, 3))

        call.value = value  # type: ignore[attr-defined]  # keep the device buffer alive
        call.outputs = binding  # type: ignore[attr-defined]
        return call

    return bind


def timed(call: Callable[[], object], seconds: float) -> tuple[float, int]:
    call()  # warm-up: allocations, kernels, cuBLAS handles
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 2000):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def step_table(report: Report, scorers: dict[str, Callable[[Rows], Callable[[], object]]],
               gaps: dict[str, float], X: Rows, sizes: list[int], seconds: float, out: Path) -> None:
    head = (f"{'scorer':44} {'parity':>9} {'batch':>7} {'rows/s':>12} {'ms/call':>10} {'calls':>6}")
    lines = ["parity: max |probability - LightGBM's| over the fixture rows; rows/s: batch / median", head]
    print("\n" + "\n".join(lines), flush=True)
    best: dict[str, float] = {}
    for name, make in scorers.items():
        for batch in sizes:
            data = np.ascontiguousarray(np.resize(X, (batch, X.shape[1])))  # the rows cycled
            median, calls = timed(make(data), seconds)
            best[name] = max(best.get(name, 0.0), batch / median)
            line = (f"{name:44} {gaps.get(name, float('nan')):9.1e} {batch:7d} {batch / median:12,.0f} "
                    f"{median * 1e3:10.3f} {calls:6d}")
            print(line, flush=True)
            lines.append(line)
    (out / "throughput.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name in (n for n in scorers if "CUDA" in n):
        rate = best[name]
        verdict = "PASS" if rate >= TARGET_ROWS_PER_S else "FAIL"
        if "copies" in name:  # the bar is for the GPU itself; with the copies it is information
            verdict = "INFO"
        report.say(verdict, f"throughput ({name})", f"best {rate:,.0f} rows/s at batch <= {max(sizes)} "
                   f"(target {TARGET_ROWS_PER_S:,} rows/s)")


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out)
    t_start = time.perf_counter()
    ort = sessions_module()
    available = ort.get_available_providers()
    report.info(f"python {platform.python_version()}, numpy {np.__version__}, onnxruntime {ort.__version__} "
                f"from {Path(ort.__file__).parent}, providers available {available}")
    report.info(f"LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')}")
    with np.load(args.data) as data:
        X, fixtures_ref, probes, probes_ref = unpack(data)
        whole, trees = step_compile(report, data)
    report.info(f"{len(X)} fixture rows, {len(probes)} probe rows")

    # LightGBM here, if it loads, against the answers carried (same rows; made where the fixtures could be
    # read): the reference itself checked
    lgb_score = lightgbm_scorer(X.shape[1])
    if lgb_score is not None:
        report.info(f"LightGBM here vs carried reference: {worst(lgb_score(X), fixtures_ref):.1e}")

    cpu_whole, cpu_te = cpu_session(whole), cpu_session(MODEL.read_bytes())
    sessions = None
    if CUDA in available:
        sessions = step_cuda(report, whole, trees, X, out, soft=args.allow_cpu)
    elif args.allow_cpu:
        report.say("SKIP", "cuda-session", f"no CUDA provider in this onnxruntime ({available}); "
                   "--allow-cpu: parity checked on the CPU provider instead, nothing is claimed about a GPU")
    else:
        report.say("FAIL", "cuda-session", f"no CUDA provider in this onnxruntime ({available}): is the GPU "
                   "wheel first on PYTHONPATH?")

    if sessions is not None:
        gpu_whole, gpu_trees = sessions
        step_parity(report, "parity-fixtures", gpu_whole, X, fixtures_ref, "whole graph, CUDA provider")
        step_parity(report, "parity-split-edges", gpu_trees, probes, probes_ref, "trees alone, CUDA provider")
    elif args.allow_cpu:
        step_parity(report, "parity-fixtures", cpu_whole, X, fixtures_ref, "whole graph, CPU provider")
        step_parity(report, "parity-split-edges", cpu_session(trees), probes, probes_ref,
                    "trees alone, CPU provider")

    if SHIPPED_TENSOR.exists():
        step_shipped(report, whole, X, fixtures_ref, gpu=sessions is not None)

    scorers: dict[str, Callable[[Rows], Callable[[], object]]] = {}
    if lgb_score is not None:
        scorers["LightGBM predict (CPU)"] = lambda d: lambda: lgb_score(d)
    scorers["ONNX TreeEnsemble, CPU provider"] = lambda d: lambda: probabilities(cpu_te, d)
    scorers["tensor graph, CPU provider"] = lambda d: lambda: probabilities(cpu_whole, d)
    gaps = {
        "ONNX TreeEnsemble, CPU provider": worst(probabilities(cpu_te, X), fixtures_ref),
        "tensor graph, CPU provider": worst(probabilities(cpu_whole, X), fixtures_ref),
    }
    if lgb_score is not None:
        gaps["LightGBM predict (CPU)"] = worst(lgb_score(X), fixtures_ref)
    if sessions is not None:
        gpu_whole = sessions[0]
        name = "tensor graph, CUDA provider (copies incl.)"
        scorers[name] = lambda d: lambda: probabilities(gpu_whole, d)
        gaps[name] = worst(probabilities(gpu_whole, X), fixtures_ref)
        bound = "tensor graph, CUDA, batch on GPU (IOBinding)"
        scorers[bound] = bound_scorer(gpu_whole)
        call = scorers[bound](X)
        call()
        gaps[bound] = worst(call.outputs.copy_outputs_to_cpu()[0], fixtures_ref)  # type: ignore[attr-defined]
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    step_table(report, scorers, gaps, X, sizes, args.seconds, out)
    report.info(f"wall time {time.perf_counter() - t_start:.0f} s")
    return report.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the data file (here, in the project's venv)")
    p.add_argument("out", type=Path)
    r = sub.add_parser("run", help="the checks (on the device)")
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--allow-cpu", action="store_true",
                   help="without a CUDA provider: check parity on the CPU provider and SKIP the CUDA steps")
    r.add_argument("--sizes", default=",".join(map(str, SIZES)))
    r.add_argument("--seconds", type=float, default=1.0, help="time per measurement (at least 3 calls)")
    args = ap.parse_args()
    if args.command == "prepare":
        prepare(args.out)
    else:
        sys.exit(run(args))


if __name__ == "__main__":
    main()
