"""MicroBatcher: one model call for many concurrent sessions.

ONNX Runtime scores 32 rows in about the time it takes to score one, so the gateway collects items
from concurrent sessions and calls the batch function once. Batches run one at a time in a dedicated
thread (the runtime releases the GIL; two concurrent runs would only fight over the same cores), and
items that arrive while one runs form the next batch, so batching grows with load by itself.

Waiting for company is worth it only when company is coming. Sessions announce an item while they
prepare it (`expect`); a batch waits up to `max_wait` only while announced items are still on their
way, and goes as soon as they have all arrived or `max_items` are pending. A lone message is scored at
once: a fixed wait would add `max_wait` to every message on a quiet gateway and buy nothing.

A batch that fails is scored again item by item, so one message that makes the model or the policy
raise fails alone, not with every message that happened to share its batch. A batch call that never
returns cannot be interrupted (a thread cannot be killed); `busy_for` says how long the running one
has taken, for the health check to report a wedged scorer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from milter.gateway.background import stop
from milter.gateway.logfmt import kv

log = logging.getLogger("milter.gateway")

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[Sequence[T]], Sequence[R]],
        max_items: int,
        max_wait: float,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._fn = fn
        self._max_items = max_items
        self._max_wait = max_wait
        self._on_batch = on_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._expected = 0  # items announced by `expect` and not yet submitted (or given up)
        self._wakeup = asyncio.Event()  # something is pending
        self._ready = asyncio.Event()  # a whole batch is pending, or nothing more is on its way
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milter-batch")
        self._task: asyncio.Task[None] | None = None
        self._call_started: float | None = None  # monotonic start of the batch call running now

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def busy_for(self) -> float:
        """Seconds the running batch call has taken so far; 0 while none runs."""
        started = self._call_started
        return 0.0 if started is None else time.monotonic() - started

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def close(self) -> None:
        await stop(self._task)
        self._task = None
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(RuntimeError("batcher closed"))
        self._pending.clear()
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def expect(self) -> Iterator[Callable[[T], Awaitable[R]]]:
        """Announce an item that a session is preparing, so a batch that is gathering waits for it.

        Yields the `submit` to hand it in with; leaving the block without submitting (the preparation
        failed) withdraws the announcement, so no batch waits for an item that will never come.
        """
        self._expected += 1
        arrived = False

        async def submit(item: T) -> R:
            nonlocal arrived
            if not arrived:
                arrived = True
                self._expected -= 1
            return await self.submit(item)

        try:
            yield submit
        finally:
            if not arrived:
                self._expected -= 1
                self._check_ready()

    async def submit(self, item: T) -> R:
        """The batch function's result for `item`; its exception if the batch failed."""
        if self._task is None:
            raise RuntimeError("batcher not started")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        self._wakeup.set()
        self._check_ready()
        try:
            return await fut
        except asyncio.CancelledError:
            # its caller gave up (a deadline): while the batch thread is wedged, nothing else would
            # ever take it out of the queue, and abandoned items (whole messages) would pile up there.
            # By identity: items are not comparable (arrays), and equal ones may be pending twice.
            self._pending = [entry for entry in self._pending if entry[1] is not fut]
            raise

    def _check_ready(self) -> None:
        if len(self._pending) >= self._max_items or self._expected <= 0:
            self._ready.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if len(self._pending) < self._max_items and self._expected > 0 and self._max_wait > 0:
                # Sessions are preparing items: give them a moment to join this batch.
                self._ready.clear()
                self._check_ready()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._max_wait):
                        await self._ready.wait()
            batch = self._pending[: self._max_items]
            del self._pending[: self._max_items]
            if not self._pending:
                self._wakeup.clear()
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not live:
                continue
            if self._on_batch is not None:
                self._on_batch(len(live))
            try:
                results = await self._call(loop, [i for i, _ in live])
            except Exception as exc:
                if len(live) == 1:
                    _fail(live[0][1], exc)
                    continue
                log.warning(
                    kv(
                        "batch_failed",
                        items=len(live),
                        error=type(exc).__name__,
                        detail=str(exc)[:200],
                        action="scoring_alone",
                    )
                )
                await self._score_alone(loop, live)
                continue
            for (_, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def _call(self, loop: asyncio.AbstractEventLoop, items: list[T]) -> Sequence[R]:
        """The batch function in its thread, timed for `busy_for`."""
        self._call_started = time.monotonic()
        try:
            results = await loop.run_in_executor(self._executor, self._fn, items)
        finally:
            self._call_started = None
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(items)}")
        return results

    async def _score_alone(
        self, loop: asyncio.AbstractEventLoop, live: list[tuple[T, asyncio.Future[R]]]
    ) -> None:
        """A failed batch's items one at a time: only the item that fails on its own gets an error."""
        for item, fut in live:
            if fut.done():  # its caller gave up meanwhile
                continue
            try:
                (result,) = await self._call(loop, [item])
            except Exception as exc:
                _fail(fut, exc)
                continue
            if not fut.done():
                fut.set_result(result)


def _fail(fut: asyncio.Future[R], exc: Exception) -> None:
    if not fut.done():  # its caller may have given up meanwhile
        fut.set_exception(exc)
