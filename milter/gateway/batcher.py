"""MicroBatcher: one model call for many concurrent sessions.

ONNX Runtime scores 32 rows in about the time it takes to score one, so the gateway collects items
from concurrent sessions and calls the batch function once: after `max_items` items or `max_wait`
seconds after the first, whichever comes first. Batches run one at a time in a dedicated thread (the
runtime releases the GIL; two concurrent runs would only fight over the same cores), and items that
arrive while one runs form the next batch, so batching grows with load by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

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
        self._wakeup = asyncio.Event()  # something is pending
        self._full = asyncio.Event()  # a whole batch is pending: stop waiting for more
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milter-batch")
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(RuntimeError("batcher closed"))
        self._pending.clear()
        self._executor.shutdown(wait=True)

    async def submit(self, item: T) -> R:
        """The batch function's result for `item`; its exception if the batch failed."""
        if self._task is None:
            raise RuntimeError("batcher not started")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        self._wakeup.set()
        if len(self._pending) >= self._max_items:
            self._full.set()
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if len(self._pending) < self._max_items and self._max_wait > 0:
                # Give concurrent sessions a moment to join this batch.
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._max_wait):
                        await self._full.wait()
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
