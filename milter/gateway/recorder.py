"""Batched verdict records for relayed messages.

A relayed message is already safe downstream, so its verdict row is bookkeeping: it must not delay the
reply, and a store failure must not turn into a 4xx (the sender would deliver the message twice). Rows
are queued and written in one transaction per batch (`Store.record_many`) from a store thread; a
failure is logged and counted once per lost row. `drain` writes what is queued; `close` drains and
stops (at shutdown).
Quarantined messages do not come here: their commit is awaited before the 250.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from milter.gateway.logfmt import kv
from milter.types import Envelope

if TYPE_CHECKING:
    from milter.scan import ScanResult

log = logging.getLogger("milter.gateway")

Item = tuple["ScanResult", Envelope]
WriteMany = Callable[[Sequence[Item]], int]


class VerdictRecorder:
    def __init__(
        self,
        write_many: WriteMany,
        executor: Executor,
        on_failure: Callable[[int, BaseException], None],
        max_batch: int = 256,
        max_wait: float = 0.05,
        max_pending: int = 4096,
    ) -> None:
        self._write_many = write_many
        self._executor = executor
        self._on_failure = on_failure
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._pending: list[Item] = []
        self._room = asyncio.Semaphore(max_pending)  # back-pressure when the store falls behind
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="verdict-recorder")

    async def add(self, result: ScanResult, envelope: Envelope) -> None:
        await self._room.acquire()
        self._pending.append((result, envelope))
        self._wake.set()

    async def drain(self) -> None:
        """Write everything queued so far (the recorder keeps running)."""
        while self._pending:
            await self._flush()
        await self._idle.wait()  # a batch the background task took may still be being written

    async def close(self) -> None:
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if len(self._pending) < self._max_batch:
                await asyncio.sleep(self._max_wait)  # let a batch gather: one commit for many rows
            while self._pending:
                await self._flush()

    async def _flush(self) -> None:
        batch = self._pending[: self._max_batch]
        del self._pending[: len(batch)]
        self._inflight += len(batch)
        self._idle.clear()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._write_many, batch)
        except Exception as exc:
            self._on_failure(len(batch), exc)
            log.error(
                kv("verdict_records_failed", rows=len(batch), error=type(exc).__name__, detail=str(exc)[:200])
            )
        finally:
            self._inflight -= len(batch)
            if not self._inflight:
                self._idle.set()
            for _ in batch:
                self._room.release()


QItem = tuple["ScanResult", Envelope, bytes]
WriteBatch = Callable[[Sequence[QItem]], list[int]]


class GroupCommit:
    """Quarantine commits of concurrent sessions gathered into one transaction.

    Each caller still gets its row id only after *its* row is committed (the 250 depends on it); a
    failed transaction fails every caller in it, and none of their rows exist. Classic group commit,
    with no timer: when no transaction is being written, a row is written at once; rows that arrive
    while one is being written wait for it and then go together in the next (up to `max_batch` each).
    A quiet gateway therefore pays one commit per message and no wait, a busy one a commit per batch.
    """

    def __init__(self, write_batch: WriteBatch, executor: Executor, max_batch: int = 64) -> None:
        self._write_batch = write_batch
        self._executor = executor
        self._max_batch = max_batch
        self._pending: list[tuple[QItem, asyncio.Future[int]]] = []
        # The task writing now, if any (also kept because the loop holds tasks only weakly).
        self._writer: asyncio.Task[None] | None = None

    async def commit(self, result: ScanResult, envelope: Envelope, raw: bytes) -> int:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._pending.append(((result, envelope, raw), fut))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_all(), name="quarantine-commit")
        return await fut

    async def _write_all(self) -> None:
        """Write batches until nothing is pending; the only writer while it runs."""
        loop = asyncio.get_running_loop()
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: len(batch)]
            try:
                ids = await loop.run_in_executor(
                    self._executor, self._write_batch, [item for item, _ in batch]
                )
                if len(ids) != len(batch):  # never leave a caller waiting on a row it has no id for
                    raise RuntimeError(f"store returned {len(ids)} ids for {len(batch)} rows")
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), pk in zip(batch, ids, strict=True):
                if not fut.done():
                    fut.set_result(pk)
