#!/usr/bin/env python3
"""Group commits and verdict batches under contention: P writer processes on one store (issue 16).

    .venv/bin/python bench/store_contention.py [--processes 1,2,4] [--sessions 25] [--messages 5000]
                                               [--held 0.5] [--repeat 1] [--db URL | --db sqlite]
                                               [--no-history] [--json FILE] [--markdown]

Each writer process stands for one gateway worker (2 nodes x 2 workers = 4 processes) and drives the
gateway's own write paths, wired as `milter serve` wires them (milter/gateway/process.py, server.py):

  * quarantine commits through `GroupCommit` -> `Store.record_batch`, awaited by the session as the 250
    is, with the raw message bytes (real corpus messages, every k-th file of .cache/corpora/*/*);
  * verdict rows of relayed messages through `VerdictRecorder` -> `Store.record_many`;
  * both on one store executor of two threads per process (as the gateway's `milter-store` pool);
  * the correspondence history of the relayed messages through the real `HistoryKeeper` (its own thread,
    an additive upsert of its journal every second, `Store.history_apply`) unless --no-history.

C asyncio sessions per process (`--sessions`) take the process's messages one after the other as fast
as the store answers (no scan cost: the store's side alone); a share `--held` of them is quarantined,
the rest relayed. The messages are parsed and their features extracted once before the timed part
(`milter.scan.prepare`); every message sent gets its own Message-ID, `<RUN.P.I@bench.invalid>`.

Every sweep point starts on a fresh store: a new schema in the PostgreSQL database (dropped afterwards;
default the local test database) or, with `--db sqlite`, a new SQLite file in a temporary folder (with
a sqlite:/// URL, NAME-p<P>r<run>.db beside the file named, which must not exist; deleted afterwards).
At the end the store is counted by Message-ID against what was sent: `lost` is a row whose write the
caller saw succeed (or, for a verdict row, that was never reported failed) but that is not there, `dup`
a Message-ID stored twice, `phantom` a quarantine commit that failed for its caller but whose row exists
anyway; the quarantine rows are checked for their raw bytes, and the history's summed counts against
what the processes learned. Errors are counted by type (`StoreError(DeadlockDetected)` ...); deadlocks
and serialization failures are counted apart.

Prints per P: quarantine commits/s and verdict rows/s (all processes together, over the wall time from
the common start to the last process's drained recorder; the two move together, the share quarantined
being fixed), the rate against P = 1, the commit latency a session sees (p50, p99, ms), the cores kept
busy by the writers, by this machine's `postgres` processes (when the server is local) and by the whole
machine (anything else running is the difference), the mean rows per transaction actually written
(quarantine, verdicts, history), the rows stored against those sent, errors, lost / duplicated rows and
deadlocks. With --repeat N the rates, latencies and cores are the medians of N runs per point, the
counts summed. The exit status is 1 when a row was lost, duplicated or a phantom, a deadlock happened
or a writer crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, make_url, select

from milter.config import HistoryConfig
from milter.features import SCHEMA
from milter.features.summary import Extracted
from milter.gateway.history import HistoryKeeper
from milter.gateway.metrics import GatewayMetrics
from milter.gateway.recorder import GroupCommit, VerdictRecorder
from milter.history import HistoryRow, facts_from_summary
from milter.scan import ScanResult, prepare
from milter.store import Store
from milter.store.models import HISTORY, MESSAGES, QUARANTINE
from milter.types import Action, Envelope, Scores, Verdict

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT / ".cache" / "corpora"
FIXTURES = ROOT / "fixtures" / "sample"  # the test's fallback when the corpora are not unpacked
DEFAULT_DB = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
HELD_SCORES = Scores(ham=0.04, spam=0.93, bec=0.03)
RELAYED_SCORES = Scores(ham=0.96, spam=0.03, bec=0.01)
DEADLOCK_TYPES = ("DeadlockDetected", "SerializationFailure")


# --- the messages -----------------------------------------------------------------------------------


def sample_files(n: int) -> list[Path]:
    """Every k-th message file of the unpacked corpora (all sources, ham and spam), or the fixtures."""
    files = sorted(CORPORA.glob("*/*/*.eml")) or sorted(FIXTURES.glob("*.eml"))
    if not files:
        raise FileNotFoundError(f"no messages under {CORPORA} or {FIXTURES}: run `make corpora`")
    return files[:: max(1, len(files) // n)][:n]


@dataclass(frozen=True)
class Sample:
    """Prepared real messages: the bytes a quarantine row holds and what scanning extracted."""

    raws: tuple[bytes, ...]
    exts: tuple[Extracted, ...]


def load_sample(n: int, workers: int = 2) -> Sample:
    raws = [f.read_bytes() for f in sample_files(n)]
    if workers <= 1:
        return Sample(tuple(raws), tuple(map(prepare, raws)))
    with ProcessPoolExecutor(workers) as pool:
        exts = list(pool.map(prepare, raws, chunksize=16))
    return Sample(tuple(raws), tuple(exts))


def is_held(i: int, share: float) -> bool:
    """Whether message i is quarantined: spreads `share` evenly and deterministically over the indexes."""
    return int((i + 1) * share) > int(i * share)


def message_id(run: str, proc: int, i: int) -> str:
    return f"<{run}.{proc}.{i}@bench.invalid>"


# --- one writer process ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    url: str
    run: str
    proc: int
    messages: int
    sessions: int
    held: float
    history: bool
    sample: Sample


@dataclass
class Outcome:
    """What one writer process saw (pickled back to the parent)."""

    proc: int
    start: float = 0.0  # time.monotonic(): one clock for every process of the machine
    end: float = 0.0
    held_ok: list[str] = field(default_factory=list)  # Message-IDs whose commit returned an id
    held_failed: list[str] = field(default_factory=list)  # ... whose commit raised
    relayed: list[str] = field(default_factory=list)  # Message-IDs handed to the VerdictRecorder
    relayed_failed: int = 0  # rows the recorder reported lost (on_failure)
    latencies: list[float] = field(default_factory=list)  # seconds per successful commit
    commit_batches: list[int] = field(default_factory=list)  # rows per written quarantine transaction
    verdict_batches: list[int] = field(default_factory=list)
    history_batches: list[int] = field(default_factory=list)
    history_expected: int = 0  # sum of inbound + outbound counts learned (what the table must add up to)
    errors: Counter[str] = field(default_factory=Counter)
    deadlocks: int = 0
    crashed: str | None = None
    cpu: float = 0.0  # this process's CPU seconds (all its threads) over start..end
    machine: tuple[float, float] = (0.0, 0.0)  # the machine's busy and total CPU seconds over start..end
    server: float = 0.0  # CPU seconds of this machine's `postgres` processes over start..end

    def failed(self, where: str, exc: BaseException) -> None:
        self.errors[f"{where}: {error_kind(exc)}"] += 1
        self.deadlocks += is_deadlock(exc)


def error_kind(exc: BaseException) -> str:
    """`StoreError(DeadlockDetected)`: the type raised and the driver's type under it."""
    chain = list(_chain(exc))
    root = chain[-1]
    return type(exc).__name__ if root is exc else f"{type(exc).__name__}({type(root).__name__})"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def is_deadlock(exc: BaseException) -> bool:
    return any(type(e).__name__ in DEADLOCK_TYPES or "deadlock detected" in str(e).lower()
               for e in _chain(exc))


class CountingStore:
    """The real store, with the rows of every successful write counted per transaction (from the store
    threads: list.append is atomic) and every failed history write counted as an error."""

    def __init__(self, store: Store, out: Outcome) -> None:
        self.store = store
        self.out = out

    def record_batch(self, items: Sequence[tuple[ScanResult, Envelope, bytes]]) -> list[int]:
        ids = self.store.record_batch(items, SCHEMA.digest, True)
        self.out.commit_batches.append(len(items))
        return ids

    def record_many(self, items: Sequence[tuple[ScanResult, Envelope]]) -> int:
        n = self.store.record_many(items, SCHEMA.digest, True)
        self.out.verdict_batches.append(len(items))
        return n

    # the HistoryStore protocol (milter.gateway.history)
    def history_apply(self, rows: Sequence[HistoryRow]) -> int:
        try:
            n = self.store.history_apply(rows)
        except Exception as exc:
            self.out.failed("history", exc)
            raise
        self.out.history_batches.append(n)
        return n

    def history_rows(self, since: float | None = None) -> list[HistoryRow]:
        return self.store.history_rows(since)

    def history_purge(self, before: float) -> int:
        return self.store.history_purge(before)

    def history_trim(self, caps: Mapping[str, int]) -> int:
        return self.store.history_trim(caps)


def result_of(ext: Extracted, mid: str, held: bool) -> ScanResult:
    summary = replace(ext.summary, message_id=mid)
    if held:
        return ScanResult(Verdict.SPAM, Action.QUARANTINE, HELD_SCORES, ("spam score 0.93", *ext.signals[:3]),
                          "bench", summary, ext.vector)
    return ScanResult(Verdict.HAM, Action.ACCEPT, RELAYED_SCORES, (), "bench", summary, ext.vector,
                      teaches=True)


async def drive(job: Job, store: Store, out: Outcome, barrier: Barrier | None) -> None:
    counting = CountingStore(store, out)
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="milter-store")
    history_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milter-history")

    def records_failed(n: int, exc: BaseException) -> None:
        out.relayed_failed += n
        out.failed("verdicts", exc)

    recorder = VerdictRecorder(counting.record_many, executor, records_failed)
    quarantine = GroupCommit(counting.record_batch, executor)
    keeper = HistoryKeeper(HistoryConfig(), counting, history_executor, GatewayMetrics())
    shadow = keeper._new_journal()  # the same limits as the keeper's journal: never aged, never capped
    if job.history:
        await keeper.load()
    recorder.start()
    if job.history:
        keeper.start()
    n_sample = len(job.sample.raws)
    pending = iter(range(job.messages))

    async def session(k: int) -> None:
        for i in pending:  # one iterator for all sessions: each takes the next message
            mid = message_id(job.run, job.proc, i)
            j = (i * 7919 + job.proc * 104_729) % n_sample  # the processes do not walk in step
            ext = job.sample.exts[j]
            env = Envelope(mail_from=ext.summary.from_addr or "", rcpt_tos=ext.summary.to_addrs[:3]
                           or ("user@example.com",), client_addr="203.0.113.9",
                           queue_id=f"Q{job.proc}X{i}")
            if is_held(i, job.held):
                result = result_of(ext, mid, True)
                t0 = time.perf_counter()
                try:
                    await quarantine.commit(result, env, job.sample.raws[j])
                except Exception as exc:
                    out.held_failed.append(mid)
                    out.failed("quarantine", exc)
                else:
                    out.latencies.append(time.perf_counter() - t0)
                    out.held_ok.append(mid)
            else:
                result = result_of(ext, mid, False)
                await recorder.add(result, env)
                out.relayed.append(mid)
                if job.history:
                    keeper.learn(result, env)
                    shadow.observe(facts_from_summary(result.summary, env.rcpt_tos),
                                   datetime.now(UTC), result.outbound)
            await asyncio.sleep(0)  # another session's turn, as a real one would await its client

    if barrier is not None:
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 300.0)
    local_server = job.url.startswith("postgresql")  # a SQLite run's idle server is no part of it
    cpu0, machine0, server0 = time.process_time(), machine_cpu(), server_cpu() if local_server else {}
    out.start = time.monotonic()
    await asyncio.gather(*(session(k) for k in range(job.sessions)))
    await recorder.drain()
    out.end = time.monotonic()
    cpu1, machine1, server1 = time.process_time(), machine_cpu(), server_cpu() if local_server else {}
    out.server = sum(t - server0.get(pid, 0.0) for pid, t in server1.items())
    out.cpu = cpu1 - cpu0
    out.machine = (machine1[0] - machine0[0], machine1[1] - machine0[1])
    await recorder.close()
    if job.history:
        await keeper.close()  # the last journal write (not timed)
    out.history_expected = sum(r.inbound + r.outbound for r in shadow.rows())
    executor.shutdown(wait=True)
    history_executor.shutdown(wait=True)


def machine_cpu() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine, all cores (/proc/stat; zeros elsewhere)."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = 100.0  # USER_HZ
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / tick, sum(fields) / tick


def server_cpu() -> dict[int, float]:
    """CPU seconds of every process of this machine named `postgres` (the server and its backends; a
    backend that exits meanwhile is missed), by pid; empty where /proc cannot tell."""
    found: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name_end = text.rfind(")")
        if text[text.find("(") + 1:name_end] != "postgres":
            continue
        fields = text[name_end + 2:].split()
        found[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / 100.0  # utime, stime
    return found


def writer(job: Job, barrier: Barrier | None, results: Any) -> None:
    """A writer process's body: open the store, wait for the others, drive, send the outcome back."""
    logging.basicConfig(level=logging.CRITICAL)  # the failures are counted; the log would only repeat them
    out = Outcome(job.proc)
    try:
        store = Store.open(job.url)
        try:
            with store.engine.connect(), store.engine.connect():
                pass  # two pooled connections ready, one per store thread: no connect inside the timing
            asyncio.run(drive(job, store, out, barrier))
        finally:
            store.close()
    except BaseException as exc:  # reported, not lost: the parent counts what this process left behind
        out.crashed = f"{type(exc).__name__}: {exc}"
        if barrier is not None:
            barrier.abort()
    results.put(out)


# --- one sweep point -----------------------------------------------------------------------------------


@dataclass
class Point:
    """One run of P processes, counted against the store."""

    processes: int
    sessions: int
    messages: int  # per process
    wall: float
    held_sent: int
    held_ok: int
    held_stored: int
    relayed_sent: int
    relayed_stored: int
    lost: int
    dup: int
    phantom: int
    raw_missing: int  # stored quarantined message without its raw bytes (or of another size)
    history_expected: int
    history_stored: int
    latencies_ms: list[float]
    commit_batches: list[int]
    verdict_batches: list[int]
    history_batches: list[int]
    errors: Counter[str]
    deadlocks: int
    crashed: list[str]
    cpu: float  # the writer processes' CPU seconds, together
    machine: tuple[float, float]  # busy and total CPU seconds of the machine (writer 0's window)
    server: float  # CPU seconds of the local `postgres` processes (writer 0's window)

    @property
    def writer_cores(self) -> float:
        """Cores the writers kept busy, on average over the wall time."""
        return self.cpu / self.wall if self.wall > 0 else 0.0

    @property
    def server_cores(self) -> float:
        """Cores the local PostgreSQL server kept busy (0 for SQLite or a server elsewhere)."""
        total = self.machine[1]
        return (os.cpu_count() or 1) * self.server / total if total > 0 else float("nan")

    @property
    def machine_cores(self) -> float:
        """Cores the whole machine kept busy meanwhile: writers, the database server, and anything else."""
        busy, total = self.machine
        return (os.cpu_count() or 1) * busy / total if total > 0 else float("nan")

    @property
    def commits_per_s(self) -> float:
        return self.held_ok / self.wall if self.wall > 0 else 0.0

    @property
    def verdicts_per_s(self) -> float:
        return sum(self.verdict_batches) / self.wall if self.wall > 0 else 0.0

    def pct(self, q: float) -> float:
        ms = sorted(self.latencies_ms)
        return ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")

    @property
    def clean(self) -> bool:
        """No lost, duplicated or phantom row, no missing raw bytes, history exact, no error, no crash."""
        return not (self.lost or self.dup or self.phantom or self.raw_missing or self.errors or self.crashed
                    or self.deadlocks or self.history_stored != self.history_expected)


def run_point(url: str, processes: int, sessions: int, messages: int, sample: Sample,
              held: float = 0.5, history: bool = True, timeout: float = 600.0) -> Point:
    """P writer processes against `url` (a fresh store: the counts assume no other rows), counted."""
    Store.open(url).close()  # migrated once here, not raced by the writers
    run = f"b{secrets.token_hex(4)}"
    ctx = mp.get_context("spawn")  # no engine or event loop inherited from this process
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=writer, name=f"writer-{p}",
                    args=(Job(url, run, p, messages, sessions, held, history, sample), barrier, results))
        for p in range(processes)
    ]
    for proc in procs:
        proc.start()
    outs: list[Outcome] = []
    deadline = time.monotonic() + timeout
    try:
        while len(outs) < processes:
            outs.append(results.get(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return count(url, run, processes, sessions, messages, outs)


def count(url: str, run: str, processes: int, sessions: int, messages: int, outs: list[Outcome]) -> Point:
    held_ok = {m for o in outs for m in o.held_ok}
    held_failed = {m for o in outs for m in o.held_failed}
    relayed = {m for o in outs for m in o.relayed}
    relayed_reported = sum(o.relayed_failed for o in outs)
    with Store.open(url) as store, store.engine.connect() as conn:
        m, q = MESSAGES.c, QUARANTINE.c
        rows = conn.execute(
            select(m.message_id, m.action, q.size, func.length(q.raw))
            .select_from(MESSAGES.outerjoin(QUARANTINE, q.message_pk == m.id))
            .where(m.message_id.like(f"<{run}.%"))
        ).all()
        history_stored = int(conn.execute(
            select(func.coalesce(func.sum(HISTORY.c.inbound + HISTORY.c.outbound), 0))).scalar_one())
    stored = Counter(str(r[0]) for r in rows)
    raw_missing = sum(1 for mid, action, size, length in rows
                      if mid in held_ok and (size is None or size != length or action != "quarantine"))
    lost = len(held_ok - stored.keys())
    relayed_missing = len(relayed - stored.keys())
    lost += max(0, relayed_missing - relayed_reported)  # a row reported failed is counted, not lost
    return Point(
        processes=processes, sessions=sessions, messages=messages,
        wall=max((o.end for o in outs), default=0.0) - min((o.start for o in outs), default=0.0),
        held_sent=len(held_ok) + len(held_failed), held_ok=len(held_ok),
        held_stored=len(held_ok & stored.keys()), relayed_sent=len(relayed),
        relayed_stored=len(relayed & stored.keys()), lost=lost,
        dup=sum(n - 1 for n in stored.values() if n > 1),
        phantom=len(held_failed & stored.keys()), raw_missing=raw_missing,
        history_expected=sum(o.history_expected for o in outs), history_stored=history_stored,
        latencies_ms=[x * 1000 for o in outs for x in o.latencies],
        commit_batches=[n for o in outs for n in o.commit_batches],
        verdict_batches=[n for o in outs for n in o.verdict_batches],
        history_batches=[n for o in outs for n in o.history_batches],
        errors=sum((o.errors for o in outs), Counter()),
        deadlocks=sum(o.deadlocks for o in outs),
        cpu=sum(o.cpu for o in outs),
        machine=next((o.machine for o in outs if o.proc == 0), (0.0, 0.0)),
        server=next((o.server for o in outs if o.proc == 0), 0.0),
        crashed=[f"writer-{o.proc}: {o.crashed}" for o in outs if o.crashed]
        + ([f"{processes - len(outs)} writer(s) sent no outcome"] if len(outs) < processes else []),
    )


# --- fresh stores --------------------------------------------------------------------------------------


@contextmanager
def fresh_store(db: str, tag: str) -> Iterator[str]:
    """A store URL with nothing in it: a new schema of the PostgreSQL database (dropped afterwards), or a
    new SQLite file (`sqlite`: in a temporary folder; a sqlite:/// URL: that file, which must not exist)."""
    if db == "sqlite":
        with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
            yield f"sqlite:///{tmp}/store.db"
        return
    url = make_url(db)
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        path = path.with_name(f"{path.stem}-{tag}{path.suffix}")
        if path.exists():
            sys.exit(f"{path} exists: give a SQLite file that does not (the counts need an empty store)")
        try:
            yield url.set(database=str(path)).render_as_string(hide_password=False)
        finally:
            for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                p.unlink(missing_ok=True)
        return
    import psycopg

    schema = f"bench_{secrets.token_hex(5)}"
    admin_url = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            sep = "&" if url.query else "?"
            yield f"{url.render_as_string(hide_password=False)}{sep}options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


# --- the table -----------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _mean(values: Sequence[int]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarise(points: Sequence[Point]) -> dict[str, Any]:
    """One line of the table from the repeats of one P (medians of rates and latencies, summed counts)."""
    errors: Counter[str] = sum((p.errors for p in points), Counter())
    return {
        "processes": points[0].processes,
        "runs": len(points),
        "commits_per_s": _median([p.commits_per_s for p in points]),
        "verdicts_per_s": _median([p.verdicts_per_s for p in points]),
        "p50_ms": _median([p.pct(0.50) for p in points]),
        "p99_ms": _median([p.pct(0.99) for p in points]),
        "commit_batch": _mean([n for p in points for n in p.commit_batches]),
        "verdict_batch": _mean([n for p in points for n in p.verdict_batches]),
        "history_batch": _mean([n for p in points for n in p.history_batches]),
        "held": sum(p.held_stored for p in points), "held_sent": sum(p.held_sent for p in points),
        "relayed": sum(p.relayed_stored for p in points),
        "relayed_sent": sum(p.relayed_sent for p in points),
        "history": f"{sum(p.history_stored for p in points)}/{sum(p.history_expected for p in points)}",
        "lost": sum(p.lost for p in points), "dup": sum(p.dup for p in points),
        "phantom": sum(p.phantom for p in points), "raw_missing": sum(p.raw_missing for p in points),
        "deadlocks": sum(p.deadlocks for p in points),
        "writer_cores": _median([p.writer_cores for p in points]),
        "machine_cores": _median([p.machine_cores for p in points]),
        "server_cores": _median([p.server_cores for p in points]),
        "errors": dict(errors), "crashed": [c for p in points for c in p.crashed],
    }


COLUMNS = ("P", "commits/s", "verdicts/s", "x P=1", "p50 ms", "p99 ms", "cores w/pg/all", "rows/txn q/v/h",
           "stored q (sent)", "stored v (sent)", "history", "lost", "dup", "dl", "errors")


def table_rows(lines: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The table's cells: `x P=1` is the total rate against one process (both rates move together: the
    share quarantined is fixed), `cores` the writers', the local PostgreSQL server's and the whole
    machine's busy cores, `history` the
    summed counts stored / learned, `dl` deadlocks and serialization failures."""
    base = lines[0] if lines and lines[0]["processes"] == 1 else None
    out: list[tuple[str, ...]] = []
    for s in lines:
        ratio = f"{s['commits_per_s'] / base['commits_per_s']:.2f}" if base and base["commits_per_s"] else "-"
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(s["errors"].items())) or "none"
        if s["phantom"] or s["raw_missing"]:
            errors += f"; phantom {s['phantom']}, raw missing {s['raw_missing']}"
        if s["crashed"]:
            errors += "; CRASHED: " + "; ".join(s["crashed"])
        out.append((
            str(s["processes"]), f"{s['commits_per_s']:.0f}", f"{s['verdicts_per_s']:.0f}", ratio,
            f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}",
            f"{s['writer_cores']:.2f}/{s['server_cores']:.2f}/{s['machine_cores']:.2f}",
            f"{s['commit_batch']:.1f}/{s['verdict_batch']:.0f}/{s['history_batch']:.0f}",
            f"{s['held']} ({s['held_sent']})", f"{s['relayed']} ({s['relayed_sent']})", s["history"],
            str(s["lost"]), str(s["dup"]), str(s["deadlocks"]), errors,
        ))
    return out


def print_table(lines: list[dict[str, Any]], markdown: bool = False) -> None:
    rows = [COLUMNS, *table_rows(lines)]
    if markdown:
        for i, row in enumerate(rows):
            print("| " + " | ".join(row) + " |")
            if i == 0:
                print("|" + "---|" * len(row))
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row[:-1], widths, strict=False)) + "  " + row[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", default="1,2,4", help="writer processes per sweep point, comma-separated")
    ap.add_argument("--sessions", type=int, default=25, help="concurrent sessions per process")
    ap.add_argument("--messages", type=int, default=5000,
                    help="messages per process (5000: a few seconds a run; 2000 lasted under one)")
    ap.add_argument("--held", type=float, default=0.5, help="share of the messages quarantined")
    ap.add_argument("--distinct", type=int, default=400, help="distinct corpus messages to cycle through")
    ap.add_argument("--repeat", type=int, default=1, help="runs per point (medians of the rates)")
    ap.add_argument("--db", default=DEFAULT_DB, help="PostgreSQL URL (a fresh schema per run), `sqlite`, or "
                    "a sqlite:/// URL of a new file")
    ap.add_argument("--no-history", action="store_true", help="leave out the correspondence history writes")
    ap.add_argument("--json", type=Path, help="also write the table's figures here")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown too")
    args = ap.parse_args()
    sweep = [int(p) for p in args.processes.split(",")]
    sample = load_sample(args.distinct)
    sizes = sorted(len(r) for r in sample.raws)
    backend = "sqlite" if args.db == "sqlite" else make_url(args.db).get_backend_name()
    print(f"{backend}: {args.sessions} sessions x {args.messages} messages per process, {args.held:.0%} "
          f"quarantined, {len(sizes)} distinct corpus messages (raw median "
          f"{sizes[len(sizes) // 2] / 1024:.1f} KiB, mean {statistics.fmean(sizes) / 1024:.1f} KiB), "
          f"history {'off' if args.no_history else 'on'}, {args.repeat} run(s) per point", flush=True)
    lines = []
    for processes in sweep:
        points = []
        for r in range(args.repeat):
            with fresh_store(args.db, f"p{processes}r{r}") as url:
                point = run_point(url, processes, args.sessions, args.messages, sample, args.held,
                                  not args.no_history)
            points.append(point)
            print(f"  P={processes} run {r + 1}: {point.wall:.1f} s, {point.commits_per_s:.0f} commits/s, "
                  f"{point.verdicts_per_s:.0f} verdicts/s, p99 {point.pct(0.99):.1f} ms, "
                  f"{'clean' if point.clean else 'NOT CLEAN'}", flush=True)
        lines.append(summarise(points))
    print()
    print_table(lines)
    if args.markdown:
        print()
        print_table(lines, markdown=True)
    if args.json:
        args.json.write_text(json.dumps(lines, indent=1))
    if any(s["lost"] or s["dup"] or s["phantom"] or s["deadlocks"] or s["crashed"] for s in lines):
        sys.exit(1)


if __name__ == "__main__":
    main()
