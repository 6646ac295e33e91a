"""What a gateway process's memory is made of, on demand: `kill -USR2 <pid>` logs a `memory_report`.

RSS alone cannot tell a leak from a fragmented heap, and the tools that can (tracemalloc, a debugger's
injected calls) are too costly to leave on or, on some VMs, break the process (docs/soak.md: gdb
could not restore a worker's extended state). This reads counters the allocators keep anyway:

* the kernel's: VmRSS and RssAnon (/proc/self/status);
* glibc's (`mallinfo2`, glibc >= 2.33): bytes in use, free bytes it holds in its arenas, and bytes
  in mmapped chunks (big buffers: a message's bytes). Free bytes here are what `malloc_trim` can give
  back; in-use bytes that keep rising are C objects that live on (ONNX Runtime, LightGBM, SQLite);
* CPython's small-object allocator: arenas (1 MiB each) and the blocks allocated in them (one per live
  small object). Arenas rising while blocks do not is fragmentation: an arena is returned only when
  every object in it is freed;
* the cyclic collector's objects by type, and the change since this process's previous report. The
  objects frozen at start-up (`gc.freeze` in serve_gateway) are not counted, so this is what the
  process has built since it began serving.

Written here because no library reads these together; `sys._debugmallocstats` prints its figures
to the C-level stderr only, so it is read through an in-memory file. Counting objects walks the
collector's lists: tens of milliseconds to half a second in a busy worker, which the event loop waits
for; a report is a diagnostic an admin asks for, not something to run every second.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

MIB = 1 << 20
TOP_TYPES = 12
_ARENAS = re.compile(rb"# arenas allocated current\s*=\s*([\d,]+)")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost",
        )
    ]


@dataclass(frozen=True)
class MallocStats:
    in_use: int  # bytes handed out by malloc and not freed (arenas and mmapped chunks)
    free: int  # bytes free in glibc's arenas: what malloc_trim can return
    mmapped: int  # bytes in chunks mmapped on their own (big allocations)


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    """glibc's `mallinfo2`, looked up once per process (as process._malloc_trim is)."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn  # type: ignore[no-any-return]


def malloc_stats() -> MallocStats | None:
    """glibc's counters, or None where there is no `mallinfo2` (musl, glibc < 2.33)."""
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return MallocStats(in_use=info.uordblks + info.hblkhd, free=info.fordblks, mmapped=info.hblkhd)


def pymalloc_arenas() -> int | None:
    """CPython's small-object arenas now allocated, from `sys._debugmallocstats` (None if unreadable)."""
    debug = getattr(sys, "_debugmallocstats", None)
    if debug is None:
        return None
    try:
        out = _scratch_fd()
    except OSError:
        return None
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        # Other threads' stderr lines in this moment (well under a millisecond) land in the file.
        os.dup2(out, 2)
        try:
            debug()
        finally:
            os.dup2(saved, 2)
        os.lseek(out, 0, os.SEEK_SET)
        text = b"".join(iter(lambda: os.read(out, 1 << 16), b""))
    except OSError:
        return None
    finally:
        os.close(saved)
        os.close(out)
    match = _ARENAS.search(text)
    return int(match.group(1).replace(b",", b"")) if match else None


def _scratch_fd() -> int:
    """A file descriptor of an anonymous file: in memory where the system has memfd (Linux), since
    the unit's file system may be read-only (ProtectSystem=strict)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("mallocstats")
    with tempfile.TemporaryFile() as f:
        return os.dup(f.fileno())


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM and RssAnon in bytes (empty where there is no /proc)."""
    wanted = {b"VmRSS", b"VmHWM", b"RssAnon"}
    found: dict[str, int] = {}
    try:
        # Bytes, not text: a report can run in a signal handler that interrupted an import, where a
        # codec lookup fails (measured: LookupError "unknown encoding: ascii").
        with open("/proc/self/status", "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                if key in wanted:
                    found[key.decode()] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return found


def object_counts() -> Counter[str]:
    """Objects the cyclic collector tracks, by type name (frozen start-up objects excluded)."""
    return Counter(type(obj).__name__ for obj in gc.get_objects())


@dataclass(frozen=True)
class MemoryReport:
    rss: int | None
    peak: int | None
    anon: int | None
    malloc: MallocStats | None
    arenas: int | None
    blocks: int
    objects: int
    top: tuple[tuple[str, int, int], ...]  # (type, count, change since the previous report)

    def fields(self) -> dict[str, object]:
        """The report as `kv` fields, sizes in MiB."""
        out: dict[str, object] = {
            "rss_mib": _mib(self.rss),
            "peak_mib": _mib(self.peak),
            "anon_mib": _mib(self.anon),
        }
        if self.malloc is not None:
            out |= {
                "malloc_in_use_mib": _mib(self.malloc.in_use),
                "malloc_free_mib": _mib(self.malloc.free),
                "malloc_mmapped_mib": _mib(self.malloc.mmapped),
            }
        out |= {
            "py_arenas": self.arenas,
            "py_blocks": self.blocks,
            "gc_objects": self.objects,
            "top": ",".join(f"{name}:{count}({change:+d})" for name, count, change in self.top),
        }
        return out


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


@dataclass
class MemoryReporter:
    """Makes reports; keeps the previous object counts so each report says what changed since."""

    previous: Counter[str] = field(default_factory=Counter)
    busy: bool = False  # a report is being made (a second signal arrived inside the first's handler)

    def report(self) -> MemoryReport:
        counts = object_counts()
        changes = {name: counts[name] - self.previous[name] for name in counts | self.previous}
        # The types that grew most since the last report, else (first report) the most numerous.
        ranked = sorted(changes, key=lambda n: (changes[n], counts[n]), reverse=True) if self.previous else [
            name for name, _ in counts.most_common()
        ]
        self.previous = counts
        status = proc_status()
        return MemoryReport(
            rss=status.get("VmRSS"),
            peak=status.get("VmHWM"),
            anon=status.get("RssAnon"),
            malloc=malloc_stats(),
            arenas=pymalloc_arenas(),
            blocks=sys.getallocatedblocks(),
            objects=counts.total(),
            top=tuple((name, counts[name], changes[name]) for name in ranked[:TOP_TYPES]),
        )
