"""Memory reports (`kill -USR2`): the counters follow what the process allocates, and a live gateway's
parent, workers and prepare processes each report and keep serving."""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from gateway_support import MODEL, ROOT, Sink, make_message, send
from test_gateway_reload import LogTail, serve
from test_gateway_serve import wait_listening, with_group_killed

from milter.gateway.heap import HeapKeeper, trim_once
from milter.gateway.memreport import MemoryReporter, malloc_stats, pymalloc_arenas
from milter.gateway.metrics import GatewayMetrics
from milter.gateway.process import resident_bytes
from milter.gateway.server import default_prepare_pool

MIB = 1 << 20


class _Grown:
    """Instances of a type no other code makes, so the report's ranking can only name it for this."""

    def __init__(self, n: int) -> None:
        self.n = n


def test_a_report_ranks_first_the_type_that_grew_since_the_previous_one() -> None:
    reporter = MemoryReporter()
    # No collection in between: one would free other tests' garbage and hide the blocks added here.
    gc.collect()
    gc.disable()
    try:
        first = reporter.report()
        held = [_Grown(i) for i in range(30_000)]
        second = reporter.report()
    finally:
        gc.enable()
    name, count, change = second.top[0]
    assert (name, count, change) == ("_Grown", 30_000, 30_000), second.top[:3]
    assert second.blocks - first.blocks >= 30_000  # one small block per instance at least
    del held
    fields = reporter.report().fields()
    assert float(str(fields["rss_mib"])) > 10
    assert str(fields["top"]).count(":") == len(second.top)  # name:count(change), comma-separated


def test_arenas_follow_small_objects_and_glibc_counts_a_big_buffer() -> None:
    before = pymalloc_arenas()
    assert before is not None and before > 0
    # ~ 1,500,000 x (tuple 56 + float 24) bytes = 120 MB: more than the free room earlier tests in the
    # process can leave in partly used arenas (300,000 found room for all of them after test_training)
    small = [(i, float(i)) for i in range(1_500_000)]
    grown = pymalloc_arenas()
    assert grown is not None and grown - before >= 10, (before, grown)
    del small
    shrunk = pymalloc_arenas()
    assert shrunk is not None and shrunk < grown

    if platform.libc_ver()[0] != "glibc":
        assert malloc_stats() is None
        return
    base = malloc_stats()
    assert base is not None
    buffer = bytearray(64 * MIB)
    big = malloc_stats()
    # Counted in use wherever glibc puts it: a chunk of its own (mmapped: above its largest mmap
    # threshold) or, when earlier tests in the process left that much free in the heap, a free chunk of
    # the heap (seen in CI: 860 MB free before, mmapped unchanged, free down by the buffer).
    assert big is not None and big.in_use - base.in_use >= 63 * MIB
    assert big.mmapped - base.mmapped >= 63 * MIB or base.free - big.free >= 63 * MIB, (base, big)
    del buffer
    after = malloc_stats()
    assert after is not None and after.in_use - base.in_use < MIB, (base, after)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        kids.extend(int(p) for p in text.split())
    return kids


def _tree(root: int) -> set[int]:
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(_children(pid))
    return out


def _spawned(parent: int) -> list[int]:
    """A process's multiprocessing children, not its resource tracker (a USR2 there would end it)."""
    kids = _children(parent)
    return [p for p in kids if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_sigusr2_to_the_main_pid_and_to_prepare_processes_reports_and_ends_none(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    listen, sink_port = free_port(), free_port()
    proc = serve(tmp_path, listen, sink_port, MODEL, workers=2)
    assert proc.stderr is not None
    log = LogTail(proc.stderr)

    async def main() -> None:
        sink = Sink()
        await sink.start(sink_port)
        try:
            await wait_listening(listen, proc)
            assert (await send(listen, make_message("before@test"))).code == 250
            await log.wait_for(r"worker_started worker=1 ", 1, proc)
            workers = _spawned(proc.pid)
            prepare = {w: _spawned(w) for w in workers}
            assert all(prepare.values()), prepare  # each worker's pool has started its processes
            os.kill(proc.pid, signal.SIGUSR2)  # as `systemctl kill -s USR2 --kill-whom=main` would
            await log.wait_for(r"memory_report role=parent pid=", 1, proc)
            await log.wait_for(r"memory_report worker=\d pid=\d+ rss_mib=[\d.]+ .*py_arenas=\d+ ", 2, proc)
            targets = [pid for pids in prepare.values() for pid in pids]
            # each worker forwards it to its prepare processes
            await log.wait_for(r"memory_report role=prepare pid=\d+ rss_mib=", len(targets), proc)
            reported = {int(line.split(" pid=")[1].split()[0]) for line in log.matching("role=prepare")}
            assert reported == set(targets)
            for pid in targets:  # and one signalled on its own reports too
                os.kill(pid, signal.SIGUSR2)
            await log.wait_for(r"memory_report role=prepare pid=\d+ rss_mib=", 2 * len(targets), proc)
            # As plain `systemctl kill -s USR2` does: every process of the unit at once, the resource
            # tracker too, so prepare processes get it directly and forwarded, one inside the other.
            everyone = _tree(proc.pid)
            for _ in range(3):
                for pid in everyone:
                    os.kill(pid, signal.SIGUSR2)
                await asyncio.sleep(0.2)
            await log.wait_for(r"memory_report role=parent pid=", 4, proc)
            assert (await send(listen, make_message("after@test"))).code == 250
            # nobody ended: the same workers, prepare processes and resource tracker are there
            assert _spawned(proc.pid) == workers
            assert {w: _spawned(w) for w in workers} == prepare
            assert _tree(proc.pid) == everyone
        finally:
            await sink.stop()

    try:
        asyncio.run(main())
        assert not log.matching("worker_died|Traceback|BrokenProcessPool|memory_report_failed")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "\n".join(log.lines[-30:])
    finally:
        with_group_killed(proc)


# -- the heap keeper -------------------------------------------------------------------------------


def _holes(mib: int) -> list[bytearray]:
    """Free memory glibc keeps: `2 * mib` MiB of 64 KiB buffers, written (so resident), and every other
    one freed. The holes lie between live buffers, so nothing but malloc_trim can give them back."""
    buffers = [bytearray(b"x" * (64 << 10)) for _ in range(mib * 32)]
    return buffers[::2]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_once_gives_back_what_glibc_kept_and_counts_it() -> None:
    kept = _holes(48)
    stats = malloc_stats()
    assert stats is not None and stats.free >= 40 * MIB, stats
    metrics = GatewayMetrics()
    trimmed = trim_once(metrics)
    assert trimmed is not None
    before, after = trimmed
    assert before - after >= 32 * MIB, (before, after)
    assert metrics.heap_trims._value.get() == 1
    assert metrics.heap_trimmed._value.get() == before - after
    assert len(kept) == 48 * 16  # the live half is still there


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_the_heap_keeper_trims_on_its_interval_and_stops_when_closed() -> None:
    metrics = GatewayMetrics()

    async def main() -> None:
        keeper = HeapKeeper(0.05, metrics)
        keeper.start()
        kept = _holes(16)
        await asyncio.sleep(0.5)
        assert metrics.heap_trims._value.get() >= 1
        await keeper.close()
        done = metrics.heap_trims._value.get()
        more = _holes(16)
        await asyncio.sleep(0.3)
        assert metrics.heap_trims._value.get() == done
        assert kept and more
        off = HeapKeeper(0.0, metrics)
        off.start()  # 0: never
        await asyncio.sleep(0.2)
        assert metrics.heap_trims._value.get() == done
        await off.close()

    asyncio.run(main())


def _holes_then_wait(seconds: float) -> tuple[int, int]:
    """In a prepare process: RSS with 32 MiB of freed holes, and RSS `seconds` later."""
    kept = _holes(32)
    before = resident_bytes()
    time.sleep(seconds)
    after = resident_bytes()
    assert kept
    return before, after


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
@pytest.mark.parametrize("interval", [0.1, 0.0])
def test_prepare_processes_trim_on_their_own_interval(interval: float) -> None:
    async def main() -> tuple[int, int]:
        pool = default_prepare_pool(1, heap_trim_interval=interval)()
        try:
            result: tuple[int, int] = await asyncio.wait_for(pool.call(_holes_then_wait, 1.0), 60)
            return result
        finally:
            pool.shutdown()

    before, after = asyncio.run(main())
    if interval:
        assert before - after >= 24 * MIB, (before, after)
    else:
        assert abs(before - after) < 4 * MIB, (before, after)


_AFTER_A_BIG_FREE = """
import sys
from milter.gateway.heap import fix_mmap_threshold
from milter.gateway.memreport import malloc_stats
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
big = bytearray(20 << 20)  # a 20 MB message, mmapped, then freed: glibc's default raises its threshold
del big
base = malloc_stats()
held = [bytearray(1 << 20) for _ in range(10)]  # ten 1 MiB buffers after it
print((malloc_stats().mmapped - base.mmapped) >> 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_after_a_big_message_mid_sized_buffers_still_get_pages_of_their_own() -> None:
    def mmapped_mib(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _AFTER_A_BIG_FREE, mode], capture_output=True,
                             check=True, cwd=ROOT, timeout=60)
        return int(out.stdout)

    assert mmapped_mib("fixed") >= 10  # returned to the system as soon as each is freed
    assert mmapped_mib("default") == 0  # glibc's own adaptation: carved out of the heap


def test_a_report_asked_for_inside_a_report_is_dropped(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A prepare process signalled directly and by its worker at once: the second signal's handler
    runs inside the first's report. It must not start a report of its own there (measured before the
    guard: a LookupError from the codec registry, mid-import)."""
    from milter.gateway import memreport
    from milter.gateway.server import _report_memory

    reporter = MemoryReporter()
    counted = memreport.object_counts
    calls: list[int] = []

    def counts_with_a_second_signal() -> Counter[str]:
        calls.append(1)
        if len(calls) == 1:
            _report_memory(reporter, signal.SIGUSR2, None)
        return counted()

    monkeypatch.setattr(memreport, "object_counts", counts_with_a_second_signal)
    _report_memory(reporter, signal.SIGUSR2, None)
    err = capfd.readouterr().err
    assert err.count("memory_report role=prepare") == 1, err
    assert len(calls) == 1 and not reporter.busy
    _report_memory(reporter, signal.SIGUSR2, None)  # and the next signal is served again
    assert capfd.readouterr().err.count("memory_report role=prepare") == 1


def test_resident_bytes_of_a_forked_child_are_its_own() -> None:
    """The statm descriptor is kept open per process: a child forked after the parent read its memory
    must read its own, not the parent's (the descriptor names the process that opened it)."""
    parent = resident_bytes()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        before = resident_bytes()
        grown = bytearray(128 << 20)
        grown[::4096] = b"\x01" * len(range(0, len(grown), 4096))  # touch every page
        os.write(write_end, str(resident_bytes() - before).encode())
        os._exit(0)
    os.close(write_end)
    child_growth = int(os.read(read_end, 64))
    os.waitpid(pid, 0)
    os.close(read_end)
    assert child_growth >= 100 << 20
    assert resident_bytes() - parent < 64 << 20  # and the parent's own figure did not grow with it
