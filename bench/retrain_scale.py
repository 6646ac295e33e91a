#!/usr/bin/env python3
"""Retraining time against the number of labelled rows: one process against Dask (issue 16, item 3).

    .venv/bin/python bench/retrain_scale.py [--rows 50000,200000] [--dask local:2] [--real 3000]
                                            [--rounds 100] [--engines one,dask]

What is timed is the part `--dask` moves to the cluster: growing the trees (`training.model.local_trees`
against `training.dask_retrain.DaskTrees`, the very functions milter-retrain calls), for a fixed number of
rounds (early stopping would make the two engines grow different numbers). The text stage, the export and
the gate run on the client either way and are left out.

Rows: `--real` corpus messages (every k-th file of .cache/corpora, ham / spam / phish as the three classes)
are prepared with the gateway's `prepare`, then padded to each size by drawing real rows with replacement
(seeded). Padding repeats rows, it invents none: LightGBM's cost grows with rows and features, not with
how many of them are distinct, so the timing is that of a store holding this many labelled messages.
With `--dask local:N` the cluster runs on this machine: on one host it can only show Dask's overhead; the
crossover a site cares about needs workers on other hosts (`--dask tcp://SCHEDULER:8786`).
`--engines one` or `--engines dask` times one engine alone, in its own process: at 1,000,000 rows the
matrix is 6.8 GB, and one host holding the caller's copy, LightGBM's bins and a local cluster's partitions
at once needs more memory than the fit itself. Each line also prints this process's peak resident memory
(a local cluster's workers are processes of their own, not counted).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from milter.features import SCHEMA
from milter.scan import prepare
from training.dask_retrain import DaskTrees, connect
from training.model import FitConfig, local_trees

ROOT = Path(__file__).resolve().parent.parent
CLASSES = {"ham": 0, "spam": 1, "phish": 2}


def vector(path: str) -> npt.NDArray[np.float32]:
    return prepare(Path(path).read_bytes()).vector


def real_rows(n: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    files = sorted(f for f in (ROOT / ".cache" / "corpora").glob("*/*/*.eml") if f.parent.name in CLASSES)
    if not files:
        sys.exit("no corpus under .cache/corpora: run `make corpora`")
    picked = files[:: max(1, len(files) // n)][:n]
    with ProcessPoolExecutor(2) as pool:
        X = np.stack(list(pool.map(vector, map(str, picked), chunksize=64)))
    return X, np.array([CLASSES[f.parent.name] for f in picked], dtype=np.int64)


def padded(X: npt.NDArray[np.float32], y: npt.NDArray[np.int64], rows: int, seed: int) -> tuple[
    npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float64]
]:
    pick = np.random.default_rng(seed).integers(0, len(y), rows)
    return X[pick], y[pick], np.ones(rows, dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="50000,200000", help="comma-separated row counts")
    ap.add_argument("--dask", default="local:2", help="local:N or tcp://SCHEDULER:PORT")
    ap.add_argument("--real", type=int, default=3000, help="real corpus messages to draw rows from")
    ap.add_argument("--rounds", type=int, default=100, help="boosting rounds per fit (fixed)")
    ap.add_argument("--engines", default="one,dask", help="which of one,dask to time")
    args = ap.parse_args()
    X, y = real_rows(args.real)
    names = list(SCHEMA.names)
    cfg = FitConfig()
    print(f"{len(y)} real rows ({np.bincount(y, minlength=3).tolist()} ham/spam/phish), {X.shape[1]} "
          f"features, {args.rounds} rounds a fit; Dask: {args.dask}")
    engines = set(args.engines.split(","))
    print(f"{'rows':>9}  {'one process':>12}  {'dask':>12}  dask / one process  peak RSS (this process)")
    with connect(args.dask) if "dask" in engines else nullcontext() as client:
        trees = DaskTrees(client, args.dask) if client is not None else None
        for rows in (int(r) for r in args.rows.split(",")):
            train = padded(X, y, rows, cfg.seed)
            single = dask = float("nan")
            if "one" in engines:
                t0 = time.perf_counter()
                local_trees(train, names, cfg, args.rounds)
                single = time.perf_counter() - t0
            if trees is not None:
                t0 = time.perf_counter()
                trees(train, names, cfg, args.rounds)
                dask = time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
            print(f"{rows:>9,}  {single:>10.1f} s  {dask:>10.1f} s  {dask / single:>18.2f}  {peak:.1f} GiB",
                  flush=True)


if __name__ == "__main__":
    main()
