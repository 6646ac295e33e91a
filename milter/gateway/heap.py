"""Keep glibc's heaps from holding memory the gateway no longer uses.

A worker's memory rose over a 20-minute load while its live objects did not (bench/rss.py with
memory reports, docs/soak.md run I): glibc's free bytes went from 39 to 63 MiB and from 61 to 83 MiB
in the two workers, while Python's arenas, its objects and glibc's bytes in use stayed where they were.
The cause is glibc's adaptive thresholds: after it frees an mmapped block (a 20 MB message), it raises
its mmap threshold to that size and its trim threshold to twice that, so every later buffer up to
20 MB comes out of a thread's heap, the heap fragments around those buffers, and up to 40 MB free at
its top is kept. A worker has nine or ten threads, each with a heap of its own.

* `fix_mmap_threshold`, called at the start of every worker and prepare process, sets both thresholds
  (256 KiB, 1 MiB), which turns the adaptation off: run K of docs/soak.md is flat, glibc's free memory
  4-7 MiB in each worker;
* `HeapKeeper` (workers, an asyncio task) and `keep_heap` (prepare processes, a thread) give whatever
  free memory is still kept back with `malloc_trim` every `server.heap_trim_interval` seconds, when
  there is more than 8 MiB of it. Alone (run J) this did not stop the rise; it stays as a second line
  for allocation patterns the thresholds do not cover. A message over 1 MiB also trims at once
  (`process.trim_heap`).

The trim runs in a thread: it takes each arena's lock in turn, so the event loop waits at most for
one arena's walk, not all of them. Not glibc (musl): nothing to set or trim, and nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time

from milter.gateway.background import stop
from milter.gateway.logfmt import kv
from milter.gateway.memreport import malloc_stats
from milter.gateway.metrics import GatewayMetrics
from milter.gateway.process import resident_bytes, trim_heap

log = logging.getLogger("milter.gateway.heap")

#: Below this much free memory in glibc's arenas a trim is not worth its walk.
TRIM_FREE_MIN = 8 << 20

#: Allocations from this size up get pages of their own (mmap), returned to the system when freed.
MMAP_THRESHOLD = 256 << 10
#: Free memory at the top of a heap past this size goes back to the system at once.
TRIM_THRESHOLD = 1 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def fix_mmap_threshold() -> bool:
    """Stop glibc from raising its mmap and trim thresholds after each big free. By default, once a
    20 MB message is freed, every allocation up to 20 MB (a 500 KB message, its pickled copy for the
    prepare process, a result) is carved out of a thread's heap instead of mmapped, the heap fragments
    around them, and up to 40 MB free at a heap's top is kept. Setting both thresholds turns that
    adaptation off (mallopt(3)). Call at a process's start, before its threads. False where there is
    no glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mmap_set = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and mmap_set


def trim_once(metrics: GatewayMetrics | None = None) -> tuple[int, int] | None:
    """Trim if glibc holds at least TRIM_FREE_MIN free: (RSS before, RSS after), else None."""
    stats = malloc_stats()  # None where there is no glibc, and so no malloc_trim either
    if stats is None or stats.free < TRIM_FREE_MIN:
        return None
    before = resident_bytes()
    started = time.perf_counter()
    trim_heap()
    after = resident_bytes()
    if metrics is not None:
        metrics.heap_trims.inc()
        metrics.heap_trimmed.inc(max(0, before - after))
    log.debug(kv("heap_trimmed", rss_mib=_mib(after), returned_mib=_mib(before - after),
                 ms=round((time.perf_counter() - started) * 1000, 1)))
    return before, after


def _mib(n: int) -> float:
    return round(n / (1 << 20), 1)


def keep_heap(interval: float) -> None:
    """A prepare process's keeper: a thread that trims every `interval` seconds, for the process's life
    (a daemon thread; the prepare processes have no event loop of their own to run a task on)."""
    if malloc_stats() is None:
        return
    while True:
        time.sleep(interval)
        try:
            trim_once()
        except Exception:
            log.exception(kv("heap_trim_failed"))


class HeapKeeper:
    """A background task of one gateway process: a trim every `interval` seconds (0: never)."""

    def __init__(self, interval: float, metrics: GatewayMetrics | None = None) -> None:
        self._interval = interval
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._interval > 0 and malloc_stats() is not None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="heap-keeper")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await asyncio.to_thread(trim_once, self._metrics)
            except Exception:  # giving memory back must never take the worker down
                log.exception(kv("heap_trim_failed"))

    async def close(self) -> None:
        await stop(self._task)
        self._task = None
