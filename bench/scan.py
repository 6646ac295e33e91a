#!/usr/bin/env python3
"""Benchmark of the scan path (parse -> features -> model) on real corpus mail.

Prints, from one run on one sample:
  - messages/s at 1 process and at N processes (each process scores its share in batches, as `milter scan`);
  - p50 / p99 per-message latency of parse + features + model (batch of one), single process;
  - the share of time spent in parse, features and the model.

Usage: .venv/bin/python bench/scan.py [--corpora .cache/corpora] [--sample 3000] [--processes 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from milter.classifier import Classifier
from milter.config import DEFAULT_MODEL
from milter.features import GROUPS, SCHEMA, extract
from milter.features.context import Protected, build
from milter.parse import parse
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


def _init(model: str) -> None:
    global _CLF  # per worker process: one session each, loaded once
    _CLF = Classifier.load(Path(model))


def _score_share(raws: list[bytes]) -> int:
    assert _CLF is not None
    for i in range(0, len(raws), BATCH):
        chunk = raws[i : i + BATCH]
        _CLF.predict(np.stack([extract(r).vector for r in chunk]))
    return len(raws)


def throughput(raws: list[bytes], model: Path, processes: int) -> float:
    shares = [raws[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes, initializer=_init, initargs=(str(model),)) as pool:
        list(pool.map(_init_barrier, range(processes)))  # start-up outside the timed region
        t0 = time.perf_counter()
        done = sum(pool.map(_score_share, shares))
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


if __name__ == "__main__":
    main()
