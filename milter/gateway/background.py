"""Stopping the gateway's background tasks (micro-batcher, heap keeper, fleet follower) one way."""

from __future__ import annotations

import asyncio
import contextlib


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` (None: nothing runs) and wait until it has ended. Its cancellation is the expected
    end and is swallowed; any other exception it ended with propagates, as awaiting it would."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
