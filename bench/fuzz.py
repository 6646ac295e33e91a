"""Hostile mail through `prepare()` at scale: exceptions, hangs and per-message time.

    .venv/bin/python bench/fuzz.py                      # 200,000 messages, every core
    .venv/bin/python bench/fuzz.py --messages 20000 --procs 2 --json out.json
    .venv/bin/python bench/fuzz.py --only 123456 --save /tmp/m.eml   # make one message again

Message i is made from `random.Random(f"{seed}:{i}")`, so any message the run reports can be made
again by its number. The mix: the named attacks of tests/hostile.py (every 500th message, in turn),
and otherwise half random MIME trees, half mutations of real corpus messages (`.cache/corpora`,
`make corpora`; without them, mutations of random trees).

Each message is timed in CPU seconds of its process (`time.process_time`, robust to other load on
the machine) and in wall seconds. A message past `--hang` wall seconds is a hang: SIGALRM stops it
there and it is reported by number. The run fails (exit 1) on any exception or hang, or when the
p99.9 or the slowest CPU time is over `--p999-limit` / `--max-limit`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from hostile import ATTACKS, mutate, random_message  # noqa: E402

ATTACK_EVERY = 500
CORPUS_SAMPLE = 3000  # corpus messages each process loads to mutate (a sample keeps start-up short)


class Hang(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang


@dataclass
class Outcome:
    index: int
    kind: str
    size: int
    cpu: float
    wall: float
    error: str | None = None


@dataclass
class Summary:
    messages: int
    seconds: float
    exceptions: list[dict[str, object]] = field(default_factory=list)
    hangs: list[int] = field(default_factory=list)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    slowest: list[dict[str, object]] = field(default_factory=list)
    budgets: dict[str, int] = field(default_factory=dict)


_corpus: list[bytes] = []
_seed = "0"


def _load_corpus(root: Path, seed: str) -> list[bytes]:
    files = sorted(p for p in root.rglob("*.eml") if p.is_file()) if root.is_dir() else []
    rng = random.Random(f"{seed}:corpus")
    return [p.read_bytes() for p in rng.sample(files, min(CORPUS_SAMPLE, len(files)))]


def _init(corpus_dir: str, seed: str) -> None:
    global _corpus, _seed  # per-process state, set once by the pool initializer
    _corpus, _seed = _load_corpus(Path(corpus_dir), seed), seed
    signal.signal(signal.SIGALRM, _alarm)
    from milter.scan import prepare

    prepare(b"From: warmup@example.com\r\n\r\nwarm-up\r\n")  # imports and lexicons outside the timings


def make(index: int, seed: str, corpus: list[bytes]) -> tuple[str, bytes]:
    """Message `index` of the run: (what kind, bytes)."""
    if index % ATTACK_EVERY == 0:
        names = sorted(ATTACKS)
        name = names[(index // ATTACK_EVERY) % len(names)]
        return f"attack:{name}", ATTACKS[name].build()
    rng = random.Random(f"{seed}:{index}")
    if rng.random() < 0.5 or not corpus:
        base = random_message(rng)
        if not corpus and rng.random() < 0.5:
            return "mutated-random", mutate(rng, base)
        return "random", base
    return "mutated-corpus", mutate(rng, rng.choice(corpus))


def run_one(index: int, hang: float) -> tuple[Outcome, tuple[str, ...]]:
    from milter.scan import prepare

    kind, raw = make(index, _seed, _corpus)
    error = None
    budgets: tuple[str, ...] = ()
    signal.setitimer(signal.ITIMER_REAL, hang)
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        ext = prepare(raw)
        budgets = tuple(d for d in ext.summary.defects if d.startswith("Budget"))
    except Hang:
        error = "hang"
    except Exception:
        error = traceback.format_exc(limit=6)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return Outcome(index, kind, len(raw), cpu, wall, error), budgets


def _chunk(args: tuple[list[int], float]) -> list[tuple[Outcome, tuple[str, ...]]]:
    indices, hang = args
    return [run_one(i, hang) for i in indices]


def _batches(start: int, count: int, size: int) -> Iterator[list[int]]:
    for lo in range(start, start + count, size):
        yield list(range(lo, min(lo + size, start + count)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(results: list[tuple[Outcome, tuple[str, ...]]], seconds: float) -> Summary:
    cpu = [o.cpu for o, _ in results]
    out = Summary(messages=len(results), seconds=round(seconds, 1))
    for o, budgets in results:
        if o.error == "hang":
            out.hangs.append(o.index)
        elif o.error:
            out.exceptions.append({"index": o.index, "kind": o.kind, "error": o.error})
        for b in budgets:
            out.budgets[b] = out.budgets.get(b, 0) + 1
    out.cpu_ms = {
        "median": round(statistics.median(cpu) * 1000, 2),
        "p99": round(percentile(cpu, 0.99) * 1000, 1),
        "p99.9": round(percentile(cpu, 0.999) * 1000, 1),
        "max": round(max(cpu) * 1000, 1),
    }
    slow = sorted(results, key=lambda r: r[0].cpu, reverse=True)[:10]
    out.slowest = [{"index": o.index, "kind": o.kind, "bytes": o.size, "cpu_ms": round(o.cpu * 1000, 1),
                    "wall_ms": round(o.wall * 1000, 1)} for o, _ in slow]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--start", type=int, default=0, help="first message number")
    ap.add_argument("--seed", default="13")
    ap.add_argument("--procs", type=int, default=multiprocessing.cpu_count())
    ap.add_argument("--corpora", default=str(ROOT / ".cache" / "corpora"))
    ap.add_argument("--hang", type=float, default=30.0, help="wall seconds after which a message is a hang")
    ap.add_argument("--p999-limit", type=float, default=0.25, help="CPU seconds the p99.9 must stay under")
    ap.add_argument("--max-limit", type=float, default=1.0, help="CPU seconds no message may take")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--only", type=int, help="make message N, prepare it once and report")
    ap.add_argument("--save", type=Path, help="with --only: write the message's bytes here")
    args = ap.parse_args(argv)

    if args.only is not None:
        _init(args.corpora, args.seed)
        _, raw = make(args.only, args.seed, _corpus)
        if args.save:
            args.save.write_bytes(raw)
        outcome, budgets = run_one(args.only, args.hang)
        print(json.dumps({**asdict(outcome), "budgets": budgets}, indent=2))
        return 0 if outcome.error is None else 1

    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    results: list[tuple[Outcome, tuple[str, ...]]] = []
    jobs = ((batch, args.hang) for batch in _batches(args.start, args.messages, 200))
    with ctx.Pool(args.procs, initializer=_init, initargs=(args.corpora, args.seed)) as pool:
        for done in pool.imap_unordered(_chunk, jobs):
            results.extend(done)
            if len(results) % 10_000 < len(done):
                print(f"  {len(results):,} messages, {time.perf_counter() - started:.0f} s", flush=True)
    summary = summarise(results, time.perf_counter() - started)
    text = json.dumps(asdict(summary), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    cpu = summary.cpu_ms
    within = cpu["p99.9"] <= args.p999_limit * 1000 and cpu["max"] <= args.max_limit * 1000
    ok = not summary.exceptions and not summary.hangs and within
    print(f"fuzz: {'ok' if ok else 'FAILED'}: {summary.messages:,} messages, "
          f"{len(summary.exceptions)} exceptions, {len(summary.hangs)} hangs, "
          f"CPU p99.9 {cpu['p99.9']} ms (limit {args.p999_limit * 1000:.0f}), "
          f"max {cpu['max']} ms (limit {args.max_limit * 1000:.0f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
