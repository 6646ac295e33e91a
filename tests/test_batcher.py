"""MicroBatcher's failure containment: a failing batch is scored again item by item, so only the item
that fails on its own gets the error; a caller that gives up leaves nothing queued; `busy_for` shows a
batch call that does not return."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from milter.gateway.batcher import MicroBatcher


def test_a_failing_batch_fails_only_the_item_that_fails_alone() -> None:
    calls: list[list[int]] = []

    def fn(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if -1 in items:
            raise ValueError("one bad item")
        return [i * 2 for i in items]

    async def main() -> None:
        b: MicroBatcher[int, int] = MicroBatcher(fn, max_items=8, max_wait=0.0)
        b.start()
        try:
            # the five are pending together when the batcher wakes: one batch, with the bad item in it
            outcomes = await asyncio.gather(*(b.submit(i) for i in (1, 2, -1, 3, 4)), return_exceptions=True)
            assert outcomes[:2] == [2, 4] and outcomes[3:] == [6, 8]
            assert isinstance(outcomes[2], ValueError)
            assert any(len(c) > 1 and -1 in c for c in calls), "the bad item never shared a batch"
            assert await b.submit(5) == 10
        finally:
            await b.close()

    asyncio.run(main())


def test_a_caller_that_gives_up_leaves_nothing_queued_and_a_hung_call_shows() -> None:
    release = threading.Event()

    def fn(items: Sequence[int]) -> list[int]:
        if 0 in items:
            release.wait(60)  # a model or policy call that does not return
        return [i * 2 for i in items]

    async def main() -> None:
        b: MicroBatcher[int, int] = MicroBatcher(fn, max_items=8, max_wait=0.0)
        b.start()
        try:
            hung = asyncio.ensure_future(b.submit(0))
            for _ in range(1000):  # until the batcher has taken it (polling its queue)
                if not b._pending:
                    break
                await asyncio.sleep(0.01)
            for i in range(1, 6):  # their deadlines pass while the thread is stuck
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(b.submit(i), 0.05)
            assert b._pending == []  # not held for a batch that will never come
            assert b.busy_for() > 0
            release.set()
            assert await hung == 0
            assert b.busy_for() == 0
            assert await b.submit(7) == 14
        finally:
            release.set()
            await b.close()

    asyncio.run(main())
