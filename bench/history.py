#!/usr/bin/env python3
"""What the correspondence history costs the gateway per message, measured on the gateway's own code path.

    .venv/bin/python bench/history.py [--messages 6000] [--corpus enron-spam-raw] [--db URL]
                                      [--flush-every 200]

Real mail (a corpus's ham and spam, every k-th file) is prepared first (parse + features, not timed).
Then each message goes through exactly what `milter serve` adds for the history, on one thread as on
the gateway's event loop, timed in CPU time (`time.thread_time`):

  * `HistoryKeeper.lookup` (facts + the history's view of the sender),
  * the policy's history rules: `Policy.decide` with that lookup minus `Policy.decide` without one,
    both timed on the same message (the shipped model's thresholds, a protected domain configured),
  * `HistoryKeeper.learn` when the decision teaches (delivered ham, bulk, or tagged only for being new);

and every `--flush-every` messages the keeper writes its journal to a real store (SQLite in a temporary
folder unless --db), timed as CPU of the writing thread and spread over the messages. The gateway writes
every `flush_seconds` (1 s), which at the gateway's 200-400 messages/s is the default here. Prints the
median, mean and p99 of the on-loop part, the store part per message, and their sum against issue 17's
budget of 0.5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from milter.classifier import Classifier
from milter.config import DEFAULT_MODEL, HistoryConfig, PolicyConfig
from milter.features.summary import Extracted
from milter.gateway.history import HistoryKeeper
from milter.gateway.metrics import GatewayMetrics
from milter.history import HistoryRow
from milter.policy import Policy
from milter.scan import ScanResult, prepare
from milter.store import Store
from milter.types import Envelope, Scores

ROOT = Path(__file__).resolve().parent.parent
BUDGET_MS = 0.5
SCORES = Scores(ham=0.97, spam=0.02, bec=0.01)  # the history rules run whatever the model says


def sample(corpus: Path, n: int) -> tuple[list[bytes], list[str]]:
    """Every k-th message (bytes) and its label (the corpus folder: ham, spam, ...)."""
    files = sorted(corpus.glob("*/*.eml"))
    if not files:
        sys.exit(f"no messages under {corpus}: run `make corpora`")
    picked = files[:: max(1, len(files) // n)][:n]
    return [f.read_bytes() for f in picked], [f.parent.name for f in picked]


def envelope_of(ext: Extracted) -> Envelope:
    return Envelope(rcpt_tos=ext.summary.to_addrs[:3] or ("user@example.com",), client_addr="203.0.113.9")


class TimedStore:
    """The real store, with the CPU its history writes cost counted (in the writing thread)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cpu = 0.0
        self.rows = 0

    def history_apply(self, rows: Sequence[HistoryRow]) -> int:
        t0 = time.thread_time()
        n = self.store.history_apply(rows)
        self.cpu += time.thread_time() - t0
        self.rows += len(rows)
        return n

    def history_rows(self, since: float | None = None) -> list[HistoryRow]:
        return self.store.history_rows(since)

    def history_purge(self, before: float) -> int:
        return self.store.history_purge(before)

    def history_trim(self, caps: Mapping[str, int]) -> int:
        return self.store.history_trim(caps)


async def run(
    exts: list[Extracted], labels: list[str], store: TimedStore, flush_every: int
) -> tuple[list[float], dict[str, list[int]]]:
    """CPU seconds per message on the loop, and per label [messages, tagged by the history rules]."""
    metrics = GatewayMetrics()
    clf = Classifier.load(DEFAULT_MODEL)
    policy = Policy(PolicyConfig(protected_domains=("enron.com",)), clf.metadata.thresholds)
    names = policy.protected.names
    keeper = HistoryKeeper(HistoryConfig(), store, ThreadPoolExecutor(max_workers=1), metrics)
    assert await keeper.load()
    per_message: list[float] = []
    tagged: dict[str, list[int]] = {}
    for i, (ext, label) in enumerate(zip(exts, labels, strict=True)):
        env = envelope_of(ext)
        t0 = time.thread_time()
        policy.decide(SCORES, ext, env)
        without = time.thread_time() - t0
        t0 = time.thread_time()
        found = keeper.lookup(ext.summary, env, names)
        decision = policy.decide(SCORES, ext, env, found)
        if decision.teaches:
            result = ScanResult(decision.verdict, decision.action, SCORES, decision.reasons, "bench",
                                ext.summary, ext.vector, teaches=True, outbound=decision.outbound)
            keeper.learn(result, env)
        per_message.append(time.thread_time() - t0 - without)
        counts = tagged.setdefault(label, [0, 0])
        counts[0] += 1
        counts[1] += decision.action.value == "tag"
        if (i + 1) % flush_every == 0:
            await keeper.flush()
    await keeper.flush()
    return per_message, tagged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=6000)
    ap.add_argument("--corpus", default="enron-spam-raw")
    ap.add_argument("--db", help="store URL (default: SQLite in a temporary folder)")
    ap.add_argument("--flush-every", type=int, default=200, help="messages per history write")
    args = ap.parse_args()
    raws, labels = sample(ROOT / ".cache" / "corpora" / args.corpus, args.messages)
    with ProcessPoolExecutor(2) as pool:
        exts = list(pool.map(prepare, raws, chunksize=64))
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(args.db or f"sqlite:///{tmp}/h.db")
        timed = TimedStore(store)
        per_message, tagged = asyncio.run(run(exts, labels, timed, args.flush_every))
        stats = store.history_stats()
        store.close()
    ms = sorted(x * 1000 for x in per_message)
    n = len(ms)
    median, mean, p99 = statistics.median(ms), statistics.fmean(ms), ms[int(0.99 * (n - 1))]
    write = timed.cpu * 1000 / n
    print(f"{n} messages of {args.corpus} ({'given store' if args.db else 'SQLite'}), "
          f"write every {args.flush_every} messages")
    for label, (seen, hit) in sorted(tagged.items()):
        print(f"  {label}: {hit} of {seen} tagged by the history rules ({100 * hit / seen:.2f} %; "
              "model score held at ham: the rules alone, on a history built from this sample only)")
    print(f"  on the loop (lookup + history rules + learn): median {median:.3f} ms, mean {mean:.3f} ms, "
          f"p99 {p99:.3f} ms")
    print(f"  store writes: {timed.rows} rows, {write:.3f} ms CPU per message")
    print(f"  total per message (mean + writes): {mean + write:.3f} ms of the {BUDGET_MS} ms budget "
          f"({'within' if mean + write < BUDGET_MS else 'OVER'}); history rows at the end: "
          f"{stats.total}")


if __name__ == "__main__":
    main()
