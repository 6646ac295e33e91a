"""MicroBatcher: one model call for many concurrent sessions.

ONNX Runtime scores 32 rows in about the time it takes to score one, so the gateway collects items
from concurrent sessions and calls the batch function once. Batches run one at a time in a dedicated
thread (the runtime releases the GIL; two concurrent runs would only fight over the same cores), and
items that arrive while one runs form the next batch, so batching grows with load by itself.

Waiting for company is worth it only when company is coming. Sessions announce an item while they
prepare it (`expect`); a batch waits up to `max_wait` only while announced items are still on their
way, and goes as soon as they have all arrived or `max_items` are pending. A lone message is scored at
once: a fixed wait would add `max_wait` to every message on a quiet gateway and buy nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from milter.gateway.background import stop

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

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

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
        return await fut

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
                results = await loop.run_in_executor(self._executor, self._fn, [i for i, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(live)}")
            except Exception as exc:  # every waiter gets the batch's error, the loop goes on
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
