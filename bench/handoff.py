#!/usr/bin/env python3
"""CPU per task of handing work to another process and getting the result back, two ways:

* ProcessPoolExecutor through `loop.run_in_executor` (what the gateway's prepare pool does);
* a pipe per process that the event loop reads (`loop.add_reader`), the cheaper hand-off that
  docs/milter.md weighed;
* milter.gateway.procpool.LoopProcessPool, which the gateway's prepare pool uses since 2026-12-05
  (a socket per process read by the loop, with ProcessPoolExecutor's failure semantics).

The task does nothing: it takes a 3 KB message and returns what `prepare` returns in size (a float32
vector of 1,700 and a small summary), so what is measured is the hand-off alone. Two spawned processes,
--in-flight tasks at a time; CPU is the parent's `time.process_time` plus the children's user + system
time from /proc, per task.

Usage: .venv/bin/python bench/handoff.py [--tasks 10000] [--in-flight 8] [--runs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import pickle
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from milter.gateway.procpool import LoopProcessPool

PAYLOAD = os.urandom(3000)
RESULT = (np.zeros(1700, dtype=np.float32), {"subject": "x" * 60, "from": "a@example.org"}, ("signal",))
WARM_UP = 20


def work(raw: bytes) -> Any:
    return RESULT


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def measured(pids: list[int], tasks: int, call: Callable[[], Awaitable[Any]], in_flight: int) -> float:
    gate = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with gate:
            await call()

    parent, children = time.process_time(), cpu_seconds(pids)
    await asyncio.gather(*(one() for _ in range(tasks)))
    return (time.process_time() - parent + cpu_seconds(pids) - children) / tasks * 1000


async def executor(tasks: int, in_flight: int) -> float:
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, work, PAYLOAD) for _ in range(WARM_UP)))
        pids = list(pool._processes)  # a benchmark reads the pool's pids, nothing more
        return await measured(pids, tasks, lambda: loop.run_in_executor(pool, work, PAYLOAD), in_flight)


async def loop_pool(tasks: int, in_flight: int) -> float:
    pool = LoopProcessPool(2, multiprocessing.get_context("spawn"))
    try:
        await asyncio.gather(*(pool.call(work, PAYLOAD) for _ in range(WARM_UP)))
        pids = [p.pid for p in pool.processes if p.pid]
        return await measured(pids, tasks, lambda: pool.call(work, PAYLOAD), in_flight)
    finally:
        pool.shutdown()


def child(conn: Connection) -> None:
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        conn.send_bytes(pickle.dumps(work(pickle.loads(data)), protocol=5))


async def pipes(tasks: int, in_flight: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    processes = []
    for _ in range(2):
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=child, args=(theirs,), daemon=True)
        process.start()
        processes.append((process, ours))
        idle.put_nowait(ours)

    async def call() -> Any:
        conn = await idle.get()
        try:
            done: asyncio.Future[Any] = loop.create_future()

            def readable() -> None:
                loop.remove_reader(conn.fileno())
                done.set_result(pickle.loads(conn.recv_bytes()))

            loop.add_reader(conn.fileno(), readable)
            conn.send_bytes(pickle.dumps(PAYLOAD, protocol=5))
            return await done
        finally:
            idle.put_nowait(conn)

    try:
        await asyncio.gather(*(call() for _ in range(WARM_UP)))
        return await measured([p.pid for p, _ in processes if p.pid], tasks, call, in_flight)
    finally:
        for process, conn in processes:
            conn.close()
            process.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    rows: dict[str, list[float]] = {"ProcessPoolExecutor": [], "pipe per process": [], "LoopProcessPool": []}
    for _ in range(args.runs):
        for label, way in zip(rows, (executor, pipes, loop_pool), strict=True):
            rows[label].append(asyncio.run(way(args.tasks, args.in_flight)))
    for label, figures in rows.items():
        shown = ", ".join(f"{f:.3f}" for f in figures)
        print(f"{label:20} CPU per task, parent and children: {shown} ms "
              f"({args.tasks} tasks, {args.in_flight} in flight)")


if __name__ == "__main__":
    main()
