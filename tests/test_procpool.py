"""milter.gateway.procpool.LoopProcessPool: real spawned processes, real sockets.

The jobs are module-level functions here (spawned children import this module by name). What is
checked is the part of ProcessPoolExecutor's contract the prepare pool relies on (milter.gateway.process):
results and exceptions come back to the right caller, a dead process breaks the pool loudly, shutdown is
graceful unless asked otherwise, a caller that gives up does not get another's result, and a big message
neither blocks the event loop nor is cut.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pytest

from milter.gateway.procpool import LoopProcessPool, RemoteTraceback


def square(x: int) -> int:
    return x * x


def slow_square(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * x


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def fail(message: str) -> None:
    raise ValueError(message)


def die() -> None:
    os._exit(3)


def digest(data: bytes) -> tuple[int, str, bytes]:
    return len(data), hashlib.sha256(data).hexdigest(), data[-1000:] * 300  # a big result too


def unpicklable() -> Any:
    return lambda: None


def in_proc(pid: int | None) -> bool:
    """The process still has a /proc entry (running, or exited and not yet collected: a zombie)."""
    return os.path.exists(f"/proc/{pid}")


def pool(n: int = 2) -> LoopProcessPool:
    return LoopProcessPool(n, multiprocessing.get_context("spawn"))


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_results_come_back_to_their_callers_in_any_order() -> None:
    async def main() -> None:
        p = pool(2)
        try:
            # 20 jobs on 2 processes, the early ones the slowest: each caller gets its own answer
            jobs = [p.call(slow_square, i, 0.05 if i < 4 else 0.0) for i in range(20)]
            assert await asyncio.gather(*jobs) == [i * i for i in range(20)]
            assert len(p.processes) == 2 and all(proc.is_alive() for proc in p.processes)
        finally:
            p.shutdown()

    run(main())


def test_an_exception_comes_back_with_the_childs_traceback() -> None:
    async def main() -> None:
        p = pool(1)
        try:
            with pytest.raises(ValueError, match="bad input") as caught:
                await p.call(fail, "bad input")
            assert isinstance(caught.value.__cause__, RemoteTraceback)
            assert "in fail" in str(caught.value.__cause__)
            with pytest.raises(RuntimeError, match="cannot be pickled"):
                await p.call(unpicklable)
            assert await p.call(square, 7) == 49  # the process is still serving
        finally:
            p.shutdown()

    run(main())


def test_a_process_that_dies_breaks_the_pool_for_every_job_it_held_or_that_waited() -> None:
    async def main() -> None:
        p = pool(2)
        try:
            assert await p.call(square, 2) == 4  # started
            outcomes = await asyncio.gather(
                p.call(slow_square, 3, 0.5), p.call(die), p.call(square, 4), p.call(square, 5),
                return_exceptions=True,
            )
            # the dying job, and the jobs still waiting or running when it died, fail loudly
            assert isinstance(outcomes[1], BrokenProcessPool)
            assert isinstance(outcomes[0], BrokenProcessPool)
            assert all(isinstance(o, BrokenProcessPool) or o in (16, 25) for o in outcomes[2:])
            with pytest.raises(BrokenProcessPool):
                await p.call(square, 6)  # and at once afterwards
            for proc in p.processes:  # the survivors are killed, not left running
                proc.join(10)
                assert not proc.is_alive()
        finally:
            p.shutdown()

    run(main())


def test_a_process_killed_while_idle_breaks_the_pool_too() -> None:
    async def main() -> None:
        p = pool(2)
        try:
            await asyncio.gather(p.call(square, 1), p.call(square, 2))
            os.kill(p.processes[0].pid or 0, signal.SIGKILL)
            p.processes[0].join(10)
            await asyncio.sleep(0.2)  # its socket's end of file reaches the loop
            with pytest.raises(BrokenProcessPool):
                await p.call(square, 3)
        finally:
            p.shutdown()

    run(main())


def test_shutdown_without_wait_finishes_what_it_holds_then_the_processes_exit() -> None:
    async def main() -> None:
        p = pool(1)
        running = asyncio.ensure_future(p.call(slow_square, 3, 0.3))
        waiting = asyncio.ensure_future(p.call(square, 4))
        await asyncio.sleep(0.1)
        p.shutdown(wait=False)
        with pytest.raises(RuntimeError, match="after shutdown"):
            await p.call(square, 5)
        assert await running == 9 and await waiting == 16
        proc = p.processes[0]
        # The pool itself collects the child's exit (no zombie left): its /proc entry goes. Not asked
        # through `proc`, whose is_alive() and exitcode would collect it themselves.
        for _ in range(100):
            if not in_proc(proc.pid):
                break
            await asyncio.sleep(0.05)  # polling for the child's exit after its last job
        assert not in_proc(proc.pid)
        assert proc.exitcode == 0

    run(main())


def test_shutdown_can_cancel_the_jobs_still_waiting() -> None:
    async def main() -> None:
        p = pool(1)
        running = asyncio.ensure_future(p.call(slow_square, 3, 0.3))
        waiting = asyncio.ensure_future(p.call(square, 4))
        await asyncio.sleep(0.1)
        p.shutdown(wait=False, cancel_futures=True)
        assert await running == 9
        with pytest.raises(asyncio.CancelledError):
            await waiting

    run(main())


def test_a_caller_that_gives_up_does_not_get_another_callers_result() -> None:
    async def main() -> None:
        p = pool(1)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(p.call(slow_square, 3, 0.5), 0.1)
            # the process is still busy with 3*3; the next job waits for it and gets its own answer
            started = time.monotonic()
            assert await p.call(square, 11) == 121
            assert time.monotonic() - started >= 0.3
            # a job whose caller gave up before it started is skipped, not run
            slow = asyncio.ensure_future(p.call(pid_after, 0.3))
            skipped = asyncio.ensure_future(p.call(die))
            await asyncio.sleep(0.05)
            skipped.cancel()
            assert await slow > 0
            assert await p.call(square, 12) == 144  # die() never ran
        finally:
            p.shutdown()

    run(main())


def test_a_big_message_crosses_whole_without_blocking_the_loop() -> None:
    """32 MiB down and 300 KB back. The child is stopped (SIGSTOP) while the message is sent, so the
    socket's buffer fills: the loop must go on serving other tasks meanwhile, not wait in a blocking
    send (a watchdog thread resumes the child after 5 s, so a loop that did block shows as few ticks
    rather than a hung test)."""
    data = os.urandom(32 << 20)

    async def main() -> None:
        p = pool(1)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        try:
            await p.call(square, 1)  # started
            pid = p.processes[0].pid or 0
            os.kill(pid, signal.SIGSTOP)
            watchdog = threading.Timer(5.0, os.kill, (pid, signal.SIGCONT))
            watchdog.start()
            clock = asyncio.ensure_future(ticker())
            job = asyncio.ensure_future(p.call(digest, data))
            await asyncio.sleep(0.5)
            assert not job.done()
            assert ticks > 50  # the loop ran on while the stopped child could not read
            watchdog.cancel()
            os.kill(pid, signal.SIGCONT)
            size, sha, tail = await job
            clock.cancel()
            assert (size, sha, tail) == (len(data), hashlib.sha256(data).hexdigest(), data[-1000:] * 300)
        finally:
            p.shutdown()

    run(main())


def test_shutdown_with_wait_ends_every_process() -> None:
    async def main() -> list[Any]:
        p = pool(2)
        await asyncio.gather(p.call(square, 1), p.call(square, 2))
        procs = list(p.processes)
        p.shutdown(wait=True)
        return procs

    for proc in run(main()):
        assert not proc.is_alive()
