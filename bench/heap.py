"""CPU per message of `prepare()` with glibc's default malloc thresholds and with the gateway's fixed ones.

    .venv/bin/python bench/heap.py [--messages 4000] [--pairs 3]

Each run is a fresh process (thresholds are per process, set before anything else): it frees a 20 MB
buffer first, as after a big message (that is what makes glibc's default raise its thresholds), warms
up on 300 messages, then times `prepare()` over `--messages` corpus messages (.cache/corpora, seeded
order) in CPU seconds. Runs alternate default / fixed, `--pairs` times; prints each run, the medians
and their ratio. milter.gateway.heap.fix_mmap_threshold is what the workers and prepare processes call.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN = """
import random, sys, time
from pathlib import Path
if sys.argv[1] == "fixed":
    from milter.gateway.heap import fix_mmap_threshold
    assert fix_mmap_threshold()
from milter.features.context import Protected
from milter.scan import prepare
from milter.types import Envelope
skip = {".json", ".tsv", ".csv", ".md", ".txt"}
paths = sorted(p for p in Path(".cache/corpora").rglob("*") if p.is_file() and p.suffix not in skip)
random.Random(3).shuffle(paths)
msgs = [p.read_bytes() for p in paths[: int(sys.argv[2])]]
big = bytearray(20 << 20)
del big
env, prot = Envelope(), Protected()
for m in msgs[:300]:
    prepare(m, env, prot)
t = time.process_time()
for m in msgs:
    prepare(m, env, prot)
print((time.process_time() - t) / len(msgs) * 1000)
"""


def run(mode: str, messages: int) -> float:
    out = subprocess.run([sys.executable, "-c", RUN, mode, str(messages)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return float(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--pairs", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, list[float]] = {"default": [], "fixed": []}
    for i in range(args.pairs):
        for mode in results:
            ms = run(mode, args.messages)
            results[mode].append(ms)
            print(f"pair {i + 1}: {mode:8s} {ms:.3f} ms per message", flush=True)
    default, fixed = (statistics.median(results[m]) for m in ("default", "fixed"))
    print(f"median: default {default:.3f} ms, fixed {fixed:.3f} ms, fixed / default = {fixed / default:.3f}")


if __name__ == "__main__":
    main()
