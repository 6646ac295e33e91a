"""One message, start to reply: prepare (process pool) -> model (micro-batched) -> action -> reply.

`MessageProcessor.handle` never raises: every outcome is an SMTP reply line, and 250 is returned only
after the downstream said 250 or the quarantine row is committed.

Verdict records of relayed messages are written after the relay, in the background: the message is
already delivered, so a store failure is logged and counted (`milter_errors{kind="store_record"}`),
never turned into a 4xx that would make the sender deliver it twice. Quarantine commits are awaited.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from milter.auth import evaluate_evidence
from milter.errors import MilterError, ScanTimeout, StoreError, smtp_reply
from milter.gateway.auth import SenderAuth
from milter.gateway.batcher import MicroBatcher
from milter.gateway.dsn import build_dsn
from milter.gateway.headers import rewrite
from milter.gateway.logfmt import kv
from milter.gateway.metrics import GatewayMetrics
from milter.gateway.procpool import LoopProcessPool, PoolBroken, ProcessDied
from milter.gateway.recorder import GroupCommit, VerdictRecorder
from milter.gateway.relay import Delivered, Downstream, needed_options
from milter.gateway.xforward import XForward
from milter.types import Action, Envelope

if TYPE_CHECKING:
    from milter.auth import AuthResults, Evidence
    from milter.auth.dnsbl import Reputation
    from milter.features.summary import Extracted
    from milter.gateway.history import HistoryKeeper
    from milter.history import HistoryLookup, HistoryRow
    from milter.scan import ScanResult

log = logging.getLogger("milter.gateway")
T = TypeVar("T")

#: What runs prepare jobs: the gateway's own process pool, or any Executor (tests use thread pools).
Pool = LoopProcessPool | Executor


async def in_pool(
    pool: Pool, fn: Callable[..., T], *args: Any, started: Callable[[], object] | None = None
) -> T:
    """`fn(*args)` in `pool`, awaited on the running loop. `started` is called when a process takes
    the job; an Executor does not say when, so for one it is called at once."""
    if isinstance(pool, LoopProcessPool):
        result: T = await pool.call(fn, *args, started=started)
        return result
    if started is not None:
        started()
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

REJECT_CODE = "550 5.7.1"
TEMPFAIL_REPLY = "451 4.7.1 Message deferred by policy, try again later"


class ClassifierLike(Protocol):
    """What the gateway reports of `milter.classifier.Classifier` (its name in logs and metrics)."""

    @property
    def name(self) -> str: ...

    @property
    def providers(self) -> Sequence[str]: ...

    # which graph scores: "tree-ensemble" or "tensor" (docs/gpu.md)
    graph: str


class ScannerLike(Protocol):
    """What the gateway needs of `milter.scan.Scanner` (a protocol so tests can inject faults)."""

    @property
    def policy(self) -> Any: ...

    @property
    def classifier(self) -> ClassifierLike: ...

    def predict(self, items: Sequence[Extracted]) -> npt.NDArray[np.float32]: ...

    def decide(
        self,
        items: Sequence[Extracted],
        envelopes: Sequence[Envelope],
        probs: npt.NDArray[np.float32],
        words_of: Any = None,
        histories: Sequence[HistoryLookup | None] | None = None,
    ) -> list[ScanResult]: ...


class StoreLike(Protocol):
    def record_batch(
        self, items: Sequence[tuple[ScanResult, Envelope, bytes | None]], schema_digest: str,
        keep_vector: bool = True,
    ) -> list[int]: ...

    def record_many(
        self, items: Sequence[tuple[ScanResult, Envelope]], schema_digest: str, keep_vector: bool = True
    ) -> int: ...

    def record(
        self,
        result: ScanResult,
        envelope: Envelope,
        raw: bytes | None,
        schema_digest: str,
        keep_vector: bool = True,
    ) -> int: ...

    def sender_labels(self) -> list[tuple[str | None, str, int]]: ...

    # the correspondence history's rows (milter.gateway.history.HistoryStore)
    def history_apply(self, rows: Sequence[HistoryRow]) -> int: ...

    def history_rows(self, since: float | None = None) -> list[HistoryRow]: ...

    def history_purge(self, before: float) -> int: ...

    def history_trim(self, caps: Mapping[str, int]) -> int: ...


PrepareFn = Callable[..., "Extracted"]


@dataclass(frozen=True)
class Inbound:
    """A message as the SMTP session received it."""

    id: str
    raw: bytes
    envelope: Envelope
    mail_options: tuple[str, ...]
    xforward: XForward


@dataclass(frozen=True)
class ProcessorSettings:
    mode: str  # "after-queue" | "before-queue"
    on_error: str  # "tempfail" | "accept"
    schema_digest: str
    keep_vector: bool
    scan_timeout: float = 0.0  # seconds; 0: no deadline
    hostname: str = "milter.localdomain"  # ours (server.hostname): the Reporting-MTA of our reports


#: At the deadline, a job that has run in its process for this share of server.scan_timeout is stuck
#: at once; one that started later gets the whole scan_timeout in its process before it is judged.
STUCK_SHARE = 0.9


class Progress:
    """A message's jobs in the prepare pool: how many a process is running now (counted until the job
    really ends, even after its caller gave up), in which pool, since when. A job that runs in its
    process for a whole scan_timeout means a stuck process, which is replaced; time spent waiting for a
    free process (overload), or on DNS or the model, does not count."""

    __slots__ = ("in_process", "msg_id", "pool", "since")

    def __init__(self, msg_id: str | None = None) -> None:
        self.msg_id = msg_id  # named in the log line of a job whose process died under it
        self.in_process = 0
        self.pool: Pool | None = None  # the pool of the latest job a process took
        self.since = 0.0  # monotonic time a process took that job

    def started(self, pool: Pool) -> None:
        self.in_process += 1
        self.pool = pool
        self.since = time.monotonic()

    def finished(self) -> None:
        self.in_process -= 1


class ModelSlot:
    """The scanner (model + policy) in use; a reload replaces it whole.

    Replacing is one reference assignment on the event loop, and the batch function reads the
    reference once per batch (`score_batch`), so a batch is scored and decided by one scanner from
    start to end: never the new model with the old thresholds, or half a batch with each.
    """

    def __init__(self, scanner: ScannerLike) -> None:
        self._scanner = scanner

    @property
    def scanner(self) -> ScannerLike:
        return self._scanner

    @property
    def name(self) -> str:
        return self._scanner.classifier.name

    def swap(self, scanner: ScannerLike) -> ScannerLike:
        """Make `scanner` current; returns the one it replaced (a running batch may still use it)."""
        old, self._scanner = self._scanner, scanner
        return old


#: What the batcher scores: the prepared message, its envelope, what the correspondence history knew.
Scoring = tuple["Extracted", Envelope, "HistoryLookup | None"]


def score_batch(slot: ModelSlot, items: Sequence[Scoring]) -> list[ScanResult]:
    """The batch function (runs in the batcher's thread): one model call, then the policy per item."""
    scanner = slot.scanner  # read once: a swap during this batch takes effect with the next one
    exts = [e for e, _, _ in items]
    envelopes, histories = [v for _, v, _ in items], [h for _, _, h in items]
    return scanner.decide(exts, envelopes, scanner.predict(exts), histories=histories)


def scan_failed_reply(exc: Exception) -> str:
    """The tempfail for a message whose scan failed."""
    return smtp_reply(exc) if isinstance(exc, MilterError) else "451 4.3.0 Scan failed, try again later"


def category_header(result: ScanResult) -> tuple[str, str]:
    """On every relayed message that was scanned: ham, bulk, spam or bec, one field a Sieve rule (or a
    mail client's filter) can sort on, whatever the action."""
    return ("X-Milter-Category", result.verdict.value)


def verdict_headers(result: ScanResult) -> list[tuple[str, str]]:
    """The fields of tagged mail: verdict, category, scores, the policy's reasons and, when the model
    explained its score, the features that moved it most (short form; `milter quarantine show` and
    `milter scan --json` have the long one)."""
    s = result.scores
    fields = [
        ("X-Milter-Verdict", result.verdict.value),
        category_header(result),
        ("X-Milter-Scores", f"ham={s.ham:.3f} spam={s.spam:.3f} bec={s.bec:.3f}"),
        ("X-Milter-Reasons", "; ".join(result.reasons) or "none"),
    ]
    if result.explanation is not None:
        fields.append(("X-Milter-Explanation", result.explanation.short()))
    return fields


def resident_bytes() -> int:
    """This process's resident memory now (not its peak, which never comes down).

    Read after every prepare job: a kept descriptor and `pread` cost 1.3 us against 8 us for an
    open, read and close each time."""
    return int(os.pread(_statm(os.getpid()), 128, 0).split()[1]) * _PAGE


_PAGE = os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _statm(pid: int) -> int:
    """This process's statm, opened once: the cache is keyed by pid because a descriptor names the
    process it was opened for, and a forked child must not read its parent's memory."""
    return os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)


#: After a message this big, freed heap memory is handed back to the OS (`trim_heap`).
TRIM_AFTER = 1 << 20


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def trim_heap() -> None:
    """glibc keeps the heap a big message grew, so RSS only ever rose (bench/rss.py: 35-39 MiB per
    prepare process and 60 MiB per worker over 20 minutes were free memory held; malloc_trim gave
    it back). A few milliseconds, paid only after big messages."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def measured(fn: Callable[..., Any], *args: Any) -> tuple[Any, int]:
    """Run in a prepare process: `fn(*args)` and the process's resident memory after it."""
    result = fn(*args)
    if args and isinstance(args[0], bytes) and len(args[0]) > TRIM_AFTER:
        trim_heap()
    return result, resident_bytes()


@dataclass(frozen=True)
class PrepareLimits:
    max_rss: int = 0  # bytes; 0: never recycle for memory
    max_jobs: int = 0  # jobs per pool before a new one takes over (as Postfix's max_use); 0: never
    kill_grace: float = 5.0  # seconds a retired pool's other jobs get before its processes are killed
    min_recycle_interval: float = 30.0  # memory recycles no more often (a limit set below the baseline)


class PreparePool:
    """The process pool for `prepare`, replaced whole when it must be:

    * a process died (BrokenProcessPool): a new pool; the message whose job that process ran is
      tempfailed (logged with its id and the exit code), the jobs that only waited or ran in the other
      processes are run again once on the new pool, as is a job that found the pool already broken
      (a process that died while idle);
    * a process's memory passed `max_rss` after a job: the pool is retired gracefully (its processes
      finish the jobs they hold, then exit) and a new one takes the next jobs: nothing is lost;
    * the pool ran `max_jobs` jobs: a new pool is started and warmed up while the old one goes on
      serving, then takes over, and the old one is retired gracefully. A long-lived CPython process
      fragments its small-object arenas (docs/soak.md: +13 arenas, about 13 MiB, per 9,000 messages
      with hostile mail among them, while live objects grew 2 MiB), so its memory is bounded by its
      lifetime, as Postfix bounds its daemons' with max_use;
    * a scan passed its deadline (`abandon`): retired the same way, and killed after `kill_grace`,
      since one of its processes is stuck; a job killed with it is run again once on the new pool.

    Retiring the whole pool, not the one process: a pool is broken as a whole when one of its processes
    dies (as ProcessPoolExecutor's, whose semantics `LoopProcessPool` keeps); these events are rare,
    and a pool starts in about a second.
    """

    def __init__(
        self,
        factory: Callable[[], Pool],
        prepare: PrepareFn,
        limits: PrepareLimits | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._factory = factory
        self._prepare = prepare
        self._limits = limits or PrepareLimits()
        self._metrics = metrics
        self._pool = factory()
        self._retired: dict[Pool, tuple[BaseProcess, ...]] = {}  # to be killed (or killed)
        # retired gracefully (max_jobs, max_rss): left to finish their jobs, unless one is stuck there
        self._draining: dict[Pool, tuple[BaseProcess, ...]] = {}
        self._last_memory_recycle = -math.inf
        self._jobs = 0  # on the current pool
        self._successor: asyncio.Task[None] | None = None  # warming `_warming` up to take over
        self._warming: Pool | None = None
        self._closed = False  # at shutdown a broken pool is neither replaced nor its jobs run again

    async def run(
        self, raw: bytes, envelope: Envelope, protected: Any, evidence: Evidence | None = None,
        progress: Progress | None = None,
    ) -> Extracted:
        result: Extracted = await self._call(
            progress or Progress(), self._prepare, raw, envelope, protected, evidence
        )
        return result

    async def verify(self, raw: bytes, evidence: Evidence, progress: Progress | None = None) -> AuthResults:
        """DKIM verification and DMARC evaluation of gathered evidence, in the pool (RSA, body hashes)."""
        result: AuthResults = await self._call(progress or Progress(), evaluate_evidence, raw, evidence)
        return result

    async def _call(self, progress: Progress, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in the current pool. A job the pool broke under without being its cause (it
        waited, its process was killed with the pool, or the pool was already broken when it came) is
        run once more on the new pool; only the job whose own process died is failed."""
        for attempt in (1, 2):
            pool = self._pool
            try:
                result, rss = await self._attempt(pool, progress, fn, *args)
            except BrokenProcessPool as exc:
                if self._closed:
                    raise
                if pool is self._pool:  # the first session to notice replaces it
                    log.error(kv("prepare_pool_broken", action="restarting"))
                    self._replace("broken", kill_after=None)
                if attempt == 1 and (isinstance(exc, PoolBroken) or pool in self._retired):
                    log.info(kv("prepare_job_retried", id=progress.msg_id, error=type(exc).__name__))
                    continue  # not this message's fault: run it again
                if isinstance(exc, ProcessDied):
                    log.error(kv("prepare_process_died", id=progress.msg_id, pid=exc.pid,
                                 exitcode=exc.exitcode, action="tempfail"))
                raise
            self._check_memory(rss)
            self._count_job(pool)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    async def _attempt(pool: Pool, progress: Progress, fn: Callable[..., Any], *args: Any) -> Any:
        """One try of the job in `pool`, counted in `progress` from when a process takes it until it
        ends there: a caller that gives up (the deadline) does not end a job a process runs."""
        taken = False

        def started() -> None:
            nonlocal taken
            taken = True
            progress.started(pool)

        def ended(task: asyncio.Future[Any]) -> None:
            if not task.cancelled():
                task.exception()  # seen here: nobody may await a job whose caller gave up
            if taken:
                progress.finished()

        job = asyncio.ensure_future(in_pool(pool, measured, fn, *args, started=started))
        job.add_done_callback(ended)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            if not taken:
                job.cancel()  # still waiting for a process: it need not run at all
            raise

    def _check_memory(self, rss: int) -> None:
        if self._metrics is not None:
            self._metrics.prepare_rss.set(rss)
        limit = self._limits.max_rss
        now = time.monotonic()
        if not limit or rss <= limit or now - self._last_memory_recycle < self._limits.min_recycle_interval:
            return
        self._last_memory_recycle = now
        log.warning(kv("prepare_pool_recycled", reason="max_rss", rss_mb=rss >> 20, limit_mb=limit >> 20))
        self._replace("max_rss", kill_after=None)

    def _count_job(self, pool: Pool) -> None:
        if pool is not self._pool:
            return
        self._jobs += 1
        limit = self._limits.max_jobs
        if limit and self._jobs >= limit and self._successor is None:
            self._successor = asyncio.get_running_loop().create_task(
                self._take_over(pool), name="prepare-pool-successor"
            )

    async def _take_over(self, old: Pool) -> None:
        """Start and warm up a new pool, then send new jobs there and retire `old` gracefully. Warmed
        first so that no message waits for a process to start (about a second of imports)."""
        new = self._warming = self._factory()
        try:
            n = new.max_workers if isinstance(new, LoopProcessPool) else getattr(new, "_max_workers", 1)
            await asyncio.gather(*(in_pool(new, _started) for _ in range(n)))
        except Exception as exc:  # the old pool goes on serving; tried again after max_jobs more jobs
            new.shutdown(wait=False, cancel_futures=True)
            log.error(kv("prepare_pool_successor_failed", error=type(exc).__name__, detail=str(exc)[:200]))
            self._successor = self._warming = None
            if self._pool is old:
                self._jobs = 0  # not on every job while processes cannot start (no memory, no pids)
            return
        if self._pool is old:  # not replaced meanwhile (broken, max_rss, scan_timeout)
            log.info(kv("prepare_pool_recycled", reason="max_jobs", jobs=self._jobs))
            self._install(new, "max_jobs")
        else:
            new.shutdown(wait=False)
        self._successor = self._warming = None

    @property
    def current(self) -> Pool:
        """The pool new jobs go to."""
        return self._pool

    def abandon(self, pool: Pool) -> None:
        """A job in `pool` overran its deadline: new jobs go to a new pool; the old one is killed after
        the grace. A pool already replaced for a stuck job is left to its own kill; one retired
        gracefully (max_jobs, max_rss) would wait for the stuck job for ever, so its kill is set now."""
        grace = self._limits.kill_grace
        if self._closed:
            return  # everything is being killed already
        if pool is self._pool:
            log.warning(kv("prepare_pool_recycled", reason="scan_timeout", kill_after=grace))
            self._replace("scan_timeout", kill_after=grace)
            return
        processes = self._draining.pop(pool, None)
        if processes is not None:
            log.warning(kv("prepare_pool_kill_scheduled", reason="scan_timeout", kill_after=grace))
            self._kill_later(pool, processes, grace)

    def _replace(self, reason: str, kill_after: float | None) -> None:
        self._install(self._factory(), reason, kill_after)

    def _install(self, new: Pool, reason: str, kill_after: float | None = None) -> None:
        old, self._pool = self._pool, new
        self._jobs = 0
        if self._metrics is not None:
            self._metrics.prepare_recycles.labels(reason).inc()
        if reason == "broken":
            old.shutdown(wait=False, cancel_futures=True)
            return
        processes = _processes(old)  # read first: shutdown() drops the executor's reference to them
        old.shutdown(wait=False)  # the jobs it holds still run; its processes exit after them
        if kill_after is not None:
            self._kill_later(old, processes, kill_after)
        else:
            self._forget_drained()
            self._draining[old] = processes  # kept so that a stuck job found there can still be killed

    def _kill_later(self, pool: Pool, processes: tuple[BaseProcess, ...], delay: float) -> None:
        self._retired[pool] = processes
        asyncio.get_running_loop().call_later(delay, self._kill_retired, pool)

    def _forget_drained(self) -> None:
        """Drop the gracefully retired pools whose processes have all exited."""
        for pool, processes in list(self._draining.items()):
            if not any(p.is_alive() for p in processes):
                del self._draining[pool]

    def _kill_retired(self, pool: Pool) -> None:
        _kill(self._retired.get(pool, ()))
        # the jobs killed with it learn so within moments; after that it needs no remembering
        asyncio.get_running_loop().call_later(60.0, self._retired.pop, pool, None)

    def pids(self) -> list[int]:
        """Every prepare process alive now: the current pool's, a successor's still warming up, and
        those of retired pools still finishing their jobs."""
        pools = [self._pool, *([self._warming] if self._warming is not None else [])]
        procs = [p for pool in pools for p in _processes(pool)]
        procs += [p for retired in (*self._retired.values(), *self._draining.values()) for p in retired]
        return sorted({p.pid for p in procs if p.pid is not None and p.is_alive()})

    def close(self) -> None:
        self._closed = True
        if self._successor is not None:
            self._successor.cancel()
        if self._warming is not None:
            self._warming.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for processes in (*self._retired.values(), *self._draining.values()):
            _kill(processes)


def _started() -> int:
    """A no-op job: returns once a new pool's process has started and run its initializer."""
    return os.getpid()


def _processes(pool: Pool) -> tuple[BaseProcess, ...]:
    """A pool's processes. ProcessPoolExecutor keeps them in `_processes` (CPython 3.8-3.13); a
    thread pool has none."""
    if isinstance(pool, LoopProcessPool):
        return pool.processes
    return tuple((getattr(pool, "_processes", None) or {}).values())


def _kill(processes: Sequence[BaseProcess]) -> None:
    """Kill what is left of a retired pool: the process of a stuck job, and any job still with it."""
    for proc in processes:
        if proc.is_alive():
            log.warning(kv("prepare_process_killed", pid=proc.pid))
            proc.kill()


class MessageProcessor:
    def __init__(
        self,
        settings: ProcessorSettings,
        model: ModelSlot,
        prepare: PreparePool,
        batcher: MicroBatcher[Scoring, ScanResult],
        downstream: Downstream,
        store: StoreLike,
        metrics: GatewayMetrics,
        store_executor: Executor,
        auth: SenderAuth | None = None,
        history: HistoryKeeper | None = None,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.history = history  # None: [policy.history] enabled = false
        self.model = model
        self.prepare = prepare
        self.batcher = batcher
        self.downstream = downstream
        self.store = store
        self.metrics = metrics
        self._store_executor = store_executor
        s = settings
        self.recorder = VerdictRecorder(
            lambda items: store.record_many(items, s.schema_digest, s.keep_vector),
            store_executor,
            self._records_failed,
        )
        self.quarantine = GroupCommit(
            lambda items: store.record_batch(items, s.schema_digest, s.keep_vector), store_executor
        )
        self._stages: dict[str, str] = {}  # message id -> where it is (named if a stop abandons it)

    def stage(self, msg_id: str) -> str:
        """Where the message `msg_id` is now: scan, relay, delivered (relayed, its reply not yet
        given), quarantine; or done."""
        return self._stages.get(msg_id, "done")

    async def handle(self, msg: Inbound) -> str:
        self.metrics.pending.inc()
        self._stages[msg.id] = "scan"
        try:
            reply = await self._handle(msg)
        except Exception as exc:  # a bug must still end in a 4xx, never a lost message or a hang
            log.exception(kv("internal_error", id=msg.id))
            self.metrics.errors.labels("internal").inc()
            reply = smtp_reply(exc)
        finally:
            self._stages.pop(msg.id, None)
            self.metrics.pending.dec()
            if len(msg.raw) > TRIM_AFTER:
                trim_heap()  # the worker held the SMTP session's copy of it, line by line
        self.metrics.replies.labels(reply[:1] + "xx").inc()
        return reply

    async def _handle(self, msg: Inbound) -> str:
        started = time.perf_counter()
        try:
            result = await self.scan(msg)
        except Exception as exc:
            unscanned = self.scan_failed(msg, exc)
            if unscanned is not None:
                return await self._relay(msg, None, unscanned, None, "unscanned")
            return scan_failed_reply(exc)
        self.metrics.scan_seconds.observe(time.perf_counter() - started)
        return await self._act(msg, result)

    def scan_failed(self, msg: Inbound, exc: Exception) -> list[tuple[str, str]] | None:
        """Log and count a failed scan. With policy.on_error = "accept", the fields that tag the message
        unscanned; None for a tempfail (counted here), whose reply is `scan_failed_reply(exc)`."""
        kind = type(exc).__name__
        self.metrics.errors.labels("scan").inc()
        log.error(kv("scan_failed", id=msg.id, queue_id=msg.envelope.queue_id, error=kind,
                     detail=str(exc)[:200], on_error=self.settings.on_error))
        if self.settings.on_error == "accept":
            return [("X-Milter-Verdict", "unscanned"), ("X-Milter-Reasons", f"scan failed: {kind}")]
        self.metrics.messages.labels("tempfail", "unscanned").inc()
        return None

    def with_auth_header(
        self, result: ScanResult | None, fields: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """`fields` with our Authentication-Results first, when sender authentication ran."""
        authserv_id = self.auth.authserv_id if self.auth is not None else None
        if authserv_id is not None and result is not None and result.summary.auth is not None:
            return [("Authentication-Results", result.summary.auth.header_value(authserv_id)), *fields]
        return fields

    async def scan(self, msg: Inbound) -> ScanResult:
        """Scan under server.scan_timeout; past it ScanTimeout, and a prepare process still working on
        the message is replaced (PreparePool.abandon): a stuck job must not hold a process for ever."""
        limit = self.settings.scan_timeout
        progress = Progress(msg.id)
        if not limit:
            return await self._scan(msg, progress)
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await self._scan(msg, progress)
        except TimeoutError:
            if not deadline.expired():
                raise  # a timeout of something inside, not ours
            self.metrics.scan_timeouts.inc()
            in_prepare = progress.in_process > 0  # a job only queued for a process is not there
            log.error(kv("scan_timeout", id=msg.id, queue_id=msg.envelope.queue_id, size=len(msg.raw),
                         limit=limit, in_prepare=in_prepare))
            if in_prepare:
                self._watch_stuck(progress, limit)
            raise ScanTimeout(f"scan passed server.scan_timeout = {limit:g} s") from None

    def _watch_stuck(self, progress: Progress, limit: float) -> None:
        """A job of a timed-out message is in a prepare process: its pool is abandoned once that job
        has run there for `limit` seconds (now, if it nearly has; else when it will have, if it has
        not ended by then). A job that only waited its turn for most of the deadline is not stuck."""
        ran = time.monotonic() - progress.since
        if ran >= limit * STUCK_SHARE:
            self._abandon(progress, progress.since)
            return
        asyncio.get_running_loop().call_later(limit - ran, self._abandon, progress, progress.since)

    def _abandon(self, progress: Progress, since: float) -> None:
        if progress.in_process == 0 or progress.since != since or progress.pool is None:
            return  # the job ended meanwhile (or another took its place): not stuck
        log.warning(kv("prepare_job_stuck", id=progress.msg_id,
                       seconds=round(time.monotonic() - since, 1)))
        self.prepare.abandon(progress.pool)

    async def _scan(self, msg: Inbound, progress: Progress) -> ScanResult:
        # The protected identities come from the configuration, not the model, so a reload between
        # prepare and scoring cannot make them disagree with the policy that decides.
        protected = self.model.scanner.policy.protected
        if self.auth is None:
            with self.batcher.expect() as submit:
                ext = await self.prepare.run(msg.raw, msg.envelope, protected, progress=progress)
                return await submit((ext, msg.envelope, self._history(ext, msg, protected.names)))
        # Parse and features in the pool while the DNS lookups run on the loop (bounded by
        # auth.timeout); the message is announced to the batcher only once its answers are in (a batch
        # waits a moment for announced messages, not for DNS).
        job = self.prepare.run(msg.raw, msg.envelope, protected, progress=progress)
        prepared = asyncio.ensure_future(job)
        # The blocklists need the parse (link domains): asked as soon as it is in, beside the rest of
        # the DKIM / DMARC lookups and the verification, and awaited before the batcher is told.
        listed = asyncio.ensure_future(self._blocklists(prepared, msg)) if self.auth.blocklists else None
        try:
            started = time.perf_counter()
            evidence = await self.auth.gather(msg.raw, msg.id, msg.envelope)
            self.metrics.auth_seconds.observe(time.perf_counter() - started)
            reputation = await listed if listed is not None else None
            with self.batcher.expect() as submit:
                ext = await prepared
                if evidence is not None:
                    auth = await self._verify(msg, evidence, progress)
                    ext = replace(ext, summary=replace(ext.summary, auth=auth))
                if reputation is not None:
                    ext = replace(ext, summary=replace(ext.summary, reputation=reputation))
                self._count_auth(ext)
                return await submit((ext, msg.envelope, self._history(ext, msg, protected.names)))
        finally:
            for task in (prepared, listed):
                if task is not None and not task.done():
                    task.cancel()

    async def _blocklists(self, prepared: asyncio.Future[Extracted], msg: Inbound) -> Reputation | None:
        """The [reputation] zones' answers once `prepared` is in; None if it failed (the scan reports
        that where it awaits `prepared` itself) or there are no zones."""
        blocklists = self.auth.blocklists if self.auth is not None else None
        if blocklists is None:
            return None
        try:
            ext = await asyncio.shield(prepared)
        except Exception:
            return None
        started = time.perf_counter()
        reputation = await blocklists.check(ext.summary, msg.envelope, msg.id)
        self.metrics.dnsbl_seconds.observe(time.perf_counter() - started)
        for result in reputation.results if reputation is not None else ():
            self.metrics.dnsbl_results.labels(result.zone, result.result).inc()
        return reputation

    def _history(self, ext: Extracted, msg: Inbound, names: Sequence[str]) -> HistoryLookup | None:
        """What the correspondence history knows of this sender (on the loop, which owns it)."""
        return self.history.lookup(ext.summary, msg.envelope, names) if self.history is not None else None

    async def _verify(self, msg: Inbound, evidence: Evidence, progress: Progress) -> AuthResults:
        if not evidence.plan.needs_crypto:  # DMARC over the answers alone: microseconds, here
            return evaluate_evidence(msg.raw, evidence)
        # RSA and body hashes (DKIM, ARC): in the pool
        return await self.prepare.verify(msg.raw, evidence, progress)

    def _count_auth(self, ext: Extracted) -> None:
        auth = ext.summary.auth
        if auth is None:
            return
        for sig in auth.dkim:
            self.metrics.auth_results.labels("dkim", sig.result).inc()
        self.metrics.auth_results.labels("dmarc", auth.dmarc.result).inc()
        self.metrics.auth_results.labels("arc", auth.arc.result).inc()

    async def _act(self, msg: Inbound, result: ScanResult) -> str:
        action = result.action
        if action is Action.REJECT and self.settings.mode == "before-queue":
            reason = (result.reasons[0] if result.reasons else "policy")[:120]
            self.count(msg, result, "reject", reply=REJECT_CODE)
            return f"{REJECT_CODE} Message rejected as {result.verdict.value}: {reason}".replace(
                "\r", " "
            ).replace("\n", " ")
        if action in (Action.QUARANTINE, Action.REJECT):  # after-queue never bounces: hold it instead
            return await self._quarantine(msg, result)
        if action is Action.TEMPFAIL:
            self.count(msg, result, "tempfail", reply=TEMPFAIL_REPLY[:3])
            return TEMPFAIL_REPLY
        if action is Action.TAG:
            return await self._relay(msg, result, verdict_headers(result), result.subject_prefix, "tag")
        return await self._relay(msg, result, [category_header(result)], None, "accept")

    async def _quarantine(self, msg: Inbound, result: ScanResult) -> str:
        self._at(msg, "quarantine")
        try:
            row = await self.quarantine.commit(result, msg.envelope, msg.raw)
        except Exception as exc:
            self.metrics.errors.labels("store_quarantine").inc()
            log.error(
                kv(
                    "quarantine_failed",
                    id=msg.id,
                    queue_id=msg.envelope.queue_id,
                    error=type(exc).__name__,
                    detail=str(exc)[:200],
                )
            )
            return smtp_reply(exc) if isinstance(exc, StoreError) else smtp_reply(StoreError(str(exc)))
        reply = f"250 2.0.0 Ok: quarantined as {row}"
        self.count(msg, result, "quarantine", reply="250", row=row)
        return reply

    async def _relay(
        self,
        msg: Inbound,
        result: ScanResult | None,
        headers: list[tuple[str, str]],
        prefix: str | None,
        action: str,
    ) -> str:
        authserv_id = self.auth.authserv_id if self.auth is not None else None
        out = rewrite(msg.raw, self.with_auth_header(result, headers), prefix, authserv_id)
        started = time.perf_counter()
        self._at(msg, "relay")
        try:
            delivered = await self.downstream.deliver(
                out, msg.envelope.mail_from or "", msg.envelope.rcpt_tos, msg.mail_options, msg.xforward
            )
        except MilterError as exc:
            self.metrics.errors.labels("delivery").inc()
            reply = smtp_reply(exc)
            log.warning(
                kv(
                    "relay_failed",
                    id=msg.id,
                    queue_id=msg.envelope.queue_id,
                    reply=reply,
                    detail=str(exc)[:200],
                )
            )
            return reply
        self.metrics.delivery_seconds.observe(time.perf_counter() - started)
        self._at(msg, "delivered")  # from here a message cut off by a stop would arrive twice
        for refusal in delivered.refused:
            log.warning(
                kv(
                    "recipient_refused",
                    id=msg.id,
                    rcpt=refusal.recipient,
                    code=refusal.code,
                    text=refusal.text[:200],
                )
            )
        if delivered.refused and (failed := await self._report_refused(msg, delivered)) is not None:
            return failed
        self.count(msg, result, action, reply=delivered.reply[:3])
        if result is not None:
            await self.record_later(msg, result)
        return delivered.reply

    async def _report_refused(self, msg: Inbound, delivered: Delivered) -> str | None:
        """Tell the sender about the recipients the downstream refused (milter.gateway.dsn): our 250
        will tell its MTA that every recipient is served. None when done (or not to be done: a message
        from the null sender, or a report the downstream refuses for good); else the 4xx to answer, so
        that the sender retries: its other recipients then get the message twice, none loses it."""
        sender = (msg.envelope.mail_from or "").strip().strip("<>")
        if not sender:
            log.warning(kv("dsn_skipped", id=msg.id, reason="null sender", refused=len(delivered.refused)))
            return None
        now = datetime.now(UTC)
        report = build_dsn(msg.raw, sender, delivered.refused, hostname=self.settings.hostname,
                           remote_mta=self.downstream.host, arrival=now, now=now)
        try:
            await self.downstream.deliver(report, "", [sender], needed_options(report, "", [sender]))
        except MilterError as exc:
            reply = smtp_reply(exc)
            if reply.startswith("5"):  # the sender's own address is refused downstream: nobody to tell
                log.warning(kv("dsn_refused", id=msg.id, rcpt=sender, reply=reply[:200]))
                return None
            self.metrics.errors.labels("delivery").inc()
            log.warning(kv("dsn_failed", id=msg.id, rcpt=sender, reply=reply[:200], detail=str(exc)[:200]))
            return reply
        log.info(kv("dsn_sent", id=msg.id, rcpt=sender, refused=len(delivered.refused)))
        return None

    def _at(self, msg: Inbound, stage: str) -> None:
        if msg.id in self._stages:  # handled by `handle` (the milter's actor keeps no stages)
            self._stages[msg.id] = stage

    async def record_later(self, msg: Inbound, result: ScanResult) -> None:
        """Queue the verdict of a delivered message; written in batches without holding up the reply."""
        self.recorder.start()
        if self.history is not None:
            self.history.learn(result, msg.envelope)  # delivered: the history may learn from it
        await self.recorder.add(result, msg.envelope)

    def _records_failed(self, rows: int, exc: BaseException) -> None:
        self.metrics.errors.labels("store_record").inc(rows)

    async def drain(self) -> None:
        """Write the queued verdict records now."""
        await self.recorder.drain()

    async def close(self) -> None:
        """Write the queued verdict records and stop the recorder (at shutdown)."""
        await self.recorder.close()

    def count(
        self, msg: Inbound, result: ScanResult | None, action: str, reply: str, row: int | None = None
    ) -> None:
        verdict = result.verdict.value if result is not None else "unscanned"
        self.metrics.messages.labels(action, verdict).inc()
        scores = None
        if result is not None:
            s = result.scores
            scores = f"{s.ham:.3f}/{s.spam:.3f}/{s.bec:.3f}"
        log.info(
            kv(
                "message",
                id=msg.id,
                queue_id=msg.envelope.queue_id,
                mail_from=msg.envelope.mail_from,
                rcpts=len(msg.envelope.rcpt_tos),
                size=len(msg.raw),
                verdict=verdict,
                model=result.model if result is not None else None,  # which model scored it (reloads)
                action=action,
                scores=scores,
                reply=reply,
                quarantine_id=row,
                message_id=result.summary.message_id if result is not None else None,
                # the model's top reasons for flagged mail, so a log search answers "why" too
                why=result.explanation.short(towards=3, against=0)
                if result is not None and result.explanation is not None else None,
            )
        )
