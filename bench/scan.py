#!/usr/bin/env python3
"""Benchmark of the scan path (parse -> features -> model) on real corpus mail.

Prints, from one run on one sample:
  - messages/s at 1 process and at N processes (each process scores its share in batches, as `milter scan`);
  - p50 / p99 per-message latency of parse + features + model (batch of one), single process;
  - the share of time spent in parse, features and the model;
  - messages/s at N processes through the whole `milter scan` path (policy decision included) without
    explanations, explaining the flagged messages (the default) and explaining every message (--explain);
  - the time one explanation takes (TreeSHAP alone, and with naming the message's own hashed words);
  - `milter scan --json --workers N` end to end on the sample written to files: msgs/s with the shipped
    model, with `--explain`, and with a copy of the model that ships no explainer.

Usage: .venv/bin/python bench/scan.py [--corpora .cache/corpora] [--sample 3000] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from milter.classifier import Classifier
from milter.config import DEFAULT_MODEL, load_config
from milter.features import GROUPS, SCHEMA, bucket_words, extract
from milter.features.context import Protected, build
from milter.parse import parse
from milter.scan import Scanner, build_scanner
from milter.types import Envelope

BATCH = 64


def sample(corpora: Path, n: int, seed: int) -> list[bytes]:
    files = sorted(corpora.glob("*/*/*.eml"))
    if not files:
        sys.exit(f"no messages under {corpora}: run ../shared/corpora/unpack {corpora}")
    rng = random.Random(seed)
    return [p.read_bytes() for p in rng.sample(files, min(n, len(files)))]


def staged(raws: list[bytes], clf: Classifier) -> tuple[list[float], dict[str, float]]:
    """Per-message latency with the three stages timed separately (batch of one, as a lone SMTP session)."""
    totals = {"parse": 0.0, "features": 0.0, "model": 0.0}
    latencies = []
    for raw in raws:
        t0 = time.perf_counter()
        parsed = parse(raw)
        t1 = time.perf_counter()
        ctx = build(parsed, Envelope(), Protected())
        vec = np.zeros((1, len(SCHEMA)), dtype=np.float32)
        pos = 1
        for names, fn in GROUPS:
            vec[0, pos : pos + len(names)] = fn(ctx)[0]
            pos += len(names)
        t2 = time.perf_counter()
        clf.predict(vec)
        t3 = time.perf_counter()
        totals["parse"] += t1 - t0
        totals["features"] += t2 - t1
        totals["model"] += t3 - t2
        latencies.append(t3 - t0)
    return latencies, totals


_CLF: Classifier | None = None
_SCANNER: Scanner | None = None


def _init(model: str, explain: str = "") -> None:
    global _CLF, _SCANNER  # per worker process: one session each, loaded once
    _CLF = Classifier.load(Path(model))
    if explain:
        _SCANNER = build_scanner(load_config(None), Path(model), explain_all=explain == "all")
        if explain == "off":
            _SCANNER.explainer = None


def _scan_share(raws: list[bytes]) -> int:
    """As `milter scan` without a pool: prepare, score, decide and explain, batch by batch."""
    assert _SCANNER is not None
    for i in range(0, len(raws), BATCH):
        _SCANNER.scan_batch(raws[i : i + BATCH])
    return len(raws)


def _score_share(raws: list[bytes]) -> int:
    assert _CLF is not None
    for i in range(0, len(raws), BATCH):
        chunk = raws[i : i + BATCH]
        _CLF.predict(np.stack([extract(r).vector for r in chunk]))
    return len(raws)


def throughput(raws: list[bytes], model: Path, processes: int, explain: str = "") -> float:
    """msg/s; `explain` "" scores only (extract + model), else the Scanner path with explanations
    "off", "flagged" (what the policy does not accept) or "all"."""
    shares = [raws[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes, initializer=_init, initargs=(str(model), explain)) as pool:
        list(pool.map(_init_barrier, range(processes)))  # start-up outside the timed region
        t0 = time.perf_counter()
        done = sum(pool.map(_scan_share if explain else _score_share, shares))
        wall = time.perf_counter() - t0
    return done / wall


def _init_barrier(_: int) -> None:
    time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", type=Path, default=Path(".cache/corpora"))
    ap.add_argument("--sample", type=int, default=3000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    raws = sample(args.corpora, args.sample, args.seed)
    clf = Classifier.load(args.model)
    print(f"model {clf.name}, providers {clf.providers}, {len(raws)} messages "
          f"(mean {statistics.mean(len(r) for r in raws) / 1024:.1f} KiB)")
    staged(raws[:200], clf)  # warm caches (tldextract, lru caches, regexes)
    lat, totals = staged(raws, clf)
    lat_ms = sorted(x * 1000 for x in lat)
    total = sum(totals.values())
    print(f"latency per message, 1 process: p50 {lat_ms[len(lat_ms) // 2]:.2f} ms, "
          f"p99 {lat_ms[int(len(lat_ms) * 0.99)]:.2f} ms, max {lat_ms[-1]:.1f} ms")
    print("time share: " + ", ".join(f"{k} {v / total:.0%}" for k, v in totals.items()))
    one = throughput(raws, args.model, 1)
    many = throughput(raws, args.model, args.processes)
    print(f"throughput: 1 process {one:.0f} msg/s; {args.processes} processes {many:.0f} msg/s "
          f"(x{many / one:.2f})")
    scanned = {mode: throughput(raws, args.model, args.processes, mode) for mode in ("off", "flagged", "all")}
    share = flagged_share(raws, args.model)
    print(f"scan path, {args.processes} processes: no explanations {scanned['off']:.0f} msg/s; explaining "
          f"flagged mail {scanned['flagged']:.0f} msg/s ({share:.0%} of this sample); "
          f"explaining every message {scanned['all']:.0f} msg/s")
    explain_cost(raws[:500], args.model)
    cli = cli_throughput(raws, args.model, args.processes)
    print(f"milter scan --json --workers {args.processes}: without explainer {cli['none']:.0f} msg/s; "
          f"explaining flagged mail {cli['flagged']:.0f} msg/s; --explain {cli['all']:.0f} msg/s")


def cli_throughput(raws: list[bytes], model: Path, processes: int) -> dict[str, float]:
    """The product's own command on files, wall clock including start-up (about 3 s of it)."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mail"
        folder.mkdir()
        for i, raw in enumerate(raws):
            (folder / f"{i:05d}.eml").write_bytes(raw)
        bare = Path(tmp) / "bare" / "current.onnx"  # the model without its explainer
        bare.parent.mkdir()
        shutil.copyfile(model, bare)
        meta = json.loads(model.with_suffix(".json").read_text())
        meta.pop("explainer", None)
        bare.with_suffix(".json").write_text(json.dumps(meta))
        milter = Path(sys.executable).with_name("milter")
        for mode, extra in (("none", ["--model", str(bare)]), ("flagged", []), ("all", ["--explain"])):
            cmd = [str(milter), "scan", "--json", "--workers", str(processes), *extra, str(folder)]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, check=False)
            out[mode] = len(raws) / (time.perf_counter() - t0)
            if done.returncode not in (0, 1):
                sys.exit(f"{' '.join(cmd)} failed: {done.stderr.decode()[-500:]}")
    return out


def flagged_share(raws: list[bytes], model: Path) -> float:
    scanner = build_scanner(load_config(None), model)
    results = [r for i in range(0, len(raws), BATCH) for r in scanner.scan_batch(raws[i : i + BATCH])]
    return sum(r.explanation is not None for r in results) / len(results)


def explain_cost(raws: list[bytes], model: Path) -> None:
    """Median time of one explanation (a row alone, as `quarantine show`), per row in a batch of 64 (as
    the gateway's batches of flagged mail), and of naming the message's own hashed words."""
    scanner = build_scanner(load_config(None), model)
    explainer = scanner.explainer
    if explainer is None:
        print("the model ships no explainer")
        return
    X = np.stack([extract(r).vector for r in raws])
    probs = scanner.classifier.predict(X)
    verdicts = ["spam"] * len(X)
    alone = []
    for i in range(len(X)):
        t0 = time.perf_counter()
        explainer.explain(X[i : i + 1], verdicts[:1], probs[i : i + 1])
        alone.append(time.perf_counter() - t0)
    batched = []
    for i in range(0, len(X) - BATCH + 1, BATCH):
        t0 = time.perf_counter()
        explainer.explain(X[i : i + BATCH], verdicts[:BATCH], probs[i : i + BATCH])
        batched.append((time.perf_counter() - t0) / BATCH)
    words = []
    for raw in raws:
        t0 = time.perf_counter()
        bucket_words(raw)
        words.append(time.perf_counter() - t0)
    times = {"alone": alone, "batched": batched, "words": words}
    ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"one explanation (TreeSHAP, median over {len(X)} messages): alone {ms['alone']:.2f} ms, in a "
          f"batch of {BATCH} {ms['batched']:.2f} ms a message; naming the message's own hashed words "
          f"{ms['words']:.2f} ms more")


if __name__ == "__main__":
    main()
