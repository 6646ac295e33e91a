"""How a prepare process's death or a stuck job is contained: `LoopProcessPool` blames only the job
whose own process died, `PreparePool` runs the others again on a new pool (also a job that came after
an idle process died), a stuck job in a gracefully retired pool is still killed, and a job only
waiting for a free process is not counted as in one.

Real spawned processes; the jobs are module-level functions (the children import this module).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any, cast

import pytest

from milter.gateway.process import PrepareFn, PrepareLimits, PreparePool, Progress
from milter.gateway.procpool import LoopProcessPool, PoolBroken, ProcessDied
from milter.types import Envelope

DIE, SLOW, HANG = b"die", b"slow", b"hang"


def fake_prepare(raw: bytes, *_: Any) -> bytes:
    """Stands in for milter.scan.prepare: dies, takes its time, or never ends, on cue."""
    if raw == DIE:
        os._exit(70)
    if raw == SLOW:
        time.sleep(1.0)
    if raw == HANG:
        while True:
            time.sleep(0.5)
    return raw.upper()


def square(x: int) -> int:
    return x * x


def slow_square(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * x


def die() -> None:
    os._exit(3)


FAKE = cast(PrepareFn, fake_prepare)


async def job(pool: PreparePool, raw: bytes, progress: Progress | None = None) -> Any:
    """`fake_prepare(raw, ...)` through the prepare pool, as a message's prepare job."""
    result: Any = await pool.run(raw, Envelope(), None, progress=progress)
    return result


def loop_pool(n: int) -> LoopProcessPool:
    return LoopProcessPool(n, multiprocessing.get_context("spawn"))


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 180))


async def until(condition: Any, limit: float = 60.0) -> None:
    """Wait (polling: these are process exits and background hand-overs) until `condition()`."""
    for _ in range(int(limit / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_only_the_job_whose_process_died_is_blamed_with_its_exit_code() -> None:
    async def main() -> None:
        p = loop_pool(2)
        try:
            assert await p.call(square, 2) == 4  # started
            outcomes = await asyncio.gather(
                p.call(slow_square, 3, 0.5), p.call(die), p.call(square, 4), return_exceptions=True
            )
            assert isinstance(outcomes[1], ProcessDied) and outcomes[1].exitcode == 3
            # the other process's job and the waiting one were not the cause: run again elsewhere
            assert all(isinstance(o, PoolBroken) or o in (9, 16) for o in (outcomes[0], outcomes[2]))
            with pytest.raises(PoolBroken):
                await p.call(square, 6)
        finally:
            p.shutdown()

    run(main())


def test_a_crashing_message_tempfails_alone_and_the_jobs_around_it_are_run_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        pool = PreparePool(lambda: loop_pool(2), FAKE)
        try:
            await job(pool, b"warm")
            outcomes = await asyncio.gather(
                job(pool, SLOW),
                job(pool, DIE, Progress("poison-id")),
                *(job(pool, b"m%d" % i) for i in range(4)),
                return_exceptions=True,
            )
            assert isinstance(outcomes[1], BrokenProcessPool)
            assert outcomes[0] == b"SLOW" and outcomes[2:] == [b"M0", b"M1", b"M2", b"M3"]
        finally:
            pool.close()

    with caplog.at_level(logging.ERROR, logger="milter.gateway"):
        run(main())
    assert "prepare_process_died id=poison-id" in caplog.text and "exitcode=70" in caplog.text


def test_a_process_that_died_while_idle_costs_the_next_message_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        pool = PreparePool(lambda: loop_pool(2), FAKE)
        try:
            await asyncio.gather(job(pool, b"a"), job(pool, b"b"))
            first = pool.current
            assert isinstance(first, LoopProcessPool)
            victim = first.processes[0]
            os.kill(victim.pid or 0, signal.SIGKILL)
            await until(lambda: "pool_process_died" in caplog.text)  # the pool saw it
            assert await job(pool, b"next") == b"NEXT"
            assert pool.current is not first
        finally:
            pool.close()

    with caplog.at_level(logging.ERROR, logger="milter.gateway"):
        run(main())
    assert "job=idle" in caplog.text and "exitcode=-9" in caplog.text


def test_a_stuck_job_in_a_gracefully_retired_pool_is_still_killed() -> None:
    async def main() -> None:
        # every job passes max_rss: the first one to finish retires the pool gracefully
        limits = PrepareLimits(max_rss=1, min_recycle_interval=0.0, kill_grace=0.5)
        pool = PreparePool(lambda: loop_pool(2), FAKE, limits)
        try:
            old = pool.current
            assert isinstance(old, LoopProcessPool)
            progress = Progress("stuck")
            hung = asyncio.ensure_future(job(pool, HANG, progress))
            await until(lambda: progress.in_process == 1)
            assert await job(pool, b"x") == b"X"  # on the other process; retires `old`
            assert pool.current is not old
            hung.cancel()  # the scan's deadline; the job stays in its process
            pool.abandon(old)
            await until(lambda: not any(p.is_alive() for p in old.processes))
        finally:
            pool.close()

    run(main())


def test_a_job_waiting_for_a_free_process_is_not_counted_as_in_one() -> None:
    async def main() -> None:
        pool = PreparePool(lambda: loop_pool(1), FAKE)
        try:
            await job(pool, b"warm")
            running, waiting = Progress("running"), Progress("waiting")
            first = asyncio.ensure_future(job(pool, SLOW, running))
            second = asyncio.ensure_future(job(pool, b"w", waiting))
            await until(lambda: running.in_process == 1)
            assert waiting.in_process == 0 and waiting.pool is None
            second.cancel()  # its deadline passes while it waits: it is dropped, never run
            with pytest.raises(asyncio.CancelledError):
                await second
            assert await first == b"SLOW"
            assert running.in_process == 0 and waiting.in_process == 0
        finally:
            pool.close()

    run(main())
