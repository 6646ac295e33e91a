"""A process pool driven by the event loop: a socket per process, jobs pickled down it, results read by
`loop.add_reader` on the loop's own thread (issue 12: the prepare processes' hand-off).

Why not ProcessPoolExecutor, which the prepare pool used until 2026-12-05: through `run_in_executor` a
job crosses a call queue fed by a thread, a result pipe read by a manager thread, a lock-guarded work
table and `call_soon_threadsafe` back into the loop. Measured alone (bench/handoff.py, a no-op job on a
3 KB message, two spawned processes, 8 in flight): 0.15-0.16 ms of CPU per job, parent and children,
against 0.07-0.08 ms for a socket per process read by the loop; in the gateway's workers its manager
thread alone held the GIL for 8 % of the samples (py-spy, bench/postfix.py). Nothing in the standard
library or in a maintained package offers an asyncio-native process pool with ProcessPoolExecutor's
failure semantics (aiomultiprocess runs coroutines in its children and has no broken-pool notion), so
this is the small one the gateway needs, with those semantics kept where `PreparePool` relies on them:

* a job is a picklable callable and its arguments; its result or its exception (with the child's
  traceback as the cause) comes back to the awaiting caller;
* each process runs one job at a time; jobs wait in order for a free process; a caller that stops
  waiting (a deadline) leaves its job to finish, and the result is dropped;
* a process that dies breaks the pool: its own job fails with `ProcessDied` (once its exit code is
  known), every other job it held or that was waiting fails with `PoolBroken` (not its fault: a caller
  may run it again elsewhere), the other processes are killed, and later calls raise `PoolBroken` at
  once; both are `BrokenProcessPool`;
* `shutdown(wait=False)` refuses new jobs and lets the processes finish what they hold and what waits
  (unless `cancel_futures`), then they exit; `wait=True` closes every process's socket (the child then
  exits) and joins them;
* the processes are started on the first job, all at once, with `blocked_signals` blocked for the
  length of the start (a blocked mask survives fork and exec, so a child is born with them blocked).

A job is framed as an 8-byte length and a pickle. The loop never blocks on a big message: a send that
fills the socket buffer resumes when the socket is writable (`add_writer`), and a result is assembled
from what each read returns. The child blocks on its socket, which is all it does between jobs; when
its parent goes away the socket reads end of file and it exits.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import pickle
import signal
import socket
import struct
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any

from milter.gateway.logfmt import kv

log = logging.getLogger("milter.gateway")

_HEAD = struct.Struct("!Q")
# Bytes asked of the socket per read. A result is a few KB; recv allocates what is asked before it
# trims, and past glibc's mmap threshold (128 KiB) that allocation would be an mmap per result.
_READ = 1 << 16
_JOIN_TIMEOUT = 5.0  # seconds `shutdown(wait=True)` gives a process to exit before killing it
_REAP_INTERVAL, _REAP_TRIES = 0.5, 240  # a retired child's exit is looked for this often, this long
# A dead child's socket reads end of file a moment before the kernel makes it a zombie: its exit code
# is looked for this often, this many times, before its job is failed without one.
_EXIT_INTERVAL, _EXIT_TRIES = 0.01, 100


class PoolBroken(BrokenProcessPool):
    """The pool broke, but not in this job's process: the job (waiting, or held by a process that was
    killed with the pool) can be run again on another pool."""


class ProcessDied(BrokenProcessPool):
    """The process running this job died (or was killed) under it."""

    def __init__(self, message: str, pid: int | None = None, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[Any, ...]:  # the extra arguments survive pickling
        return (type(self), (str(self), self.pid, self.exitcode))


class RemoteTraceback(Exception):
    """The cause attached to an exception raised in a child: its traceback there, as text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


@dataclass
class _Job:
    frame: memoryview | None  # length and pickle, as sent; dropped once handed to the socket
    future: asyncio.Future[Any]
    started: Callable[[], object] | None = None  # told when a process takes the job (not while it waits)


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    sock: socket.socket
    job: _Job | None = None
    inbox: bytearray = field(default_factory=bytearray)
    outbox: memoryview | None = None  # the rest of a frame the socket would not take at once
    writing: bool = False  # waiting for the socket to take the rest (add_writer)
    closed: bool = False


class LoopProcessPool:
    """`max_workers` spawned processes running jobs for the event loop that first calls `call`."""

    def __init__(
        self,
        max_workers: int,
        mp_context: SpawnContext,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        blocked_signals: Iterable[signal.Signals] = (),
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self._context = mp_context
        self._initializer = initializer
        self._initargs = initargs
        self._blocked = frozenset(blocked_signals)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._waiting: collections.deque[_Job] = collections.deque()
        self._shut = False
        self._broken: str | None = None

    @property
    def processes(self) -> tuple[BaseProcess, ...]:
        """The processes started (none before the first job)."""
        return tuple(w.process for w in self._workers)

    async def call(
        self, fn: Callable[..., Any], *args: Any, started: Callable[[], object] | None = None
    ) -> Any:
        """`fn(*args)` in one of the processes; raises what it raised, `ProcessDied` if its process
        died, `PoolBroken` if the pool broke otherwise, RuntimeError after `shutdown`. `started` is
        called (on the loop) when a process takes the job: until then it only waits its turn."""
        if self._broken is not None:
            raise PoolBroken(self._broken)
        if self._shut:
            raise RuntimeError("cannot schedule new jobs after shutdown")
        loop = asyncio.get_running_loop()
        if self._loop is not None and loop is not self._loop:
            raise RuntimeError("a LoopProcessPool serves the event loop that started it")
        if not self._workers:
            self._start(loop)
        job = _Job(_frame((fn, args)), loop.create_future(), started)
        self._waiting.append(job)
        self._dispatch()
        return await job.future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shut = True
        if cancel_futures:
            for job in self._waiting:
                job.future.cancel()
            self._waiting.clear()
        if wait:
            for w in self._workers:
                self._close(w)
            for w in self._workers:
                w.process.join(_JOIN_TIMEOUT)
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join(_JOIN_TIMEOUT)
            self._fail_all("the pool was shut down")
            return
        self._dispatch()  # no new jobs: the idle processes are told to exit, the busy ones after theirs

    # -- the loop's side ---------------------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # The first spawn of a process starts multiprocessing's resource tracker, and that start
        # *unblocks* SIGINT and SIGTERM on its way out instead of restoring the mask: started later,
        # inside our block, it would hand the first child a mask without SIGINT.
        resource_tracker.ensure_running()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, self._blocked) if self._blocked else None
        try:
            for _ in range(self.max_workers):
                ours, theirs = socket.socketpair()
                try:
                    process = self._context.Process(
                        target=_serve, args=(theirs, self._initializer, self._initargs), daemon=True
                    )
                    process.start()
                except BaseException:
                    ours.close()
                    raise
                finally:
                    theirs.close()  # the child has its own copy now
                ours.setblocking(False)
                worker = _Worker(process, ours)
                self._workers.append(worker)
                self._idle.append(worker)
                loop.add_reader(ours.fileno(), self._readable, worker)
        except BaseException:
            for w in self._workers:
                self._close(w)
                w.process.kill()
            self._workers.clear()
            self._idle.clear()
            raise
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _dispatch(self) -> None:
        while self._waiting and self._idle:
            job = self._waiting.popleft()
            if job.future.done():  # its caller stopped waiting before it started
                continue
            worker = self._idle.pop()
            worker.job = job
            frame, job.frame = job.frame, None  # a big message is not kept twice while its job runs
            assert frame is not None
            if job.started is not None:
                job.started()
            self._send(worker, frame)
        if self._shut and not self._waiting:
            for worker in self._idle:
                self._close(worker)  # end of file: the child exits
                self._reap(worker.process, _REAP_TRIES)
            self._idle.clear()

    def _send(self, worker: _Worker, frame: memoryview) -> None:
        worker.outbox = frame
        self._flush(worker)

    def _flush(self, worker: _Worker) -> None:
        out = worker.outbox
        assert out is not None and self._loop is not None
        try:
            while out:
                out = out[worker.sock.send(out) :]
        except BlockingIOError:  # the socket's buffer is full: the rest when the child has read some
            worker.outbox = out
            if not worker.writing:
                worker.writing = True
                self._loop.add_writer(worker.sock.fileno(), self._flush, worker)
            return
        except OSError:
            self._died(worker)
            return
        worker.outbox = None
        if worker.writing:
            worker.writing = False
            self._loop.remove_writer(worker.sock.fileno())

    def _readable(self, worker: _Worker) -> None:
        try:
            chunk = worker.sock.recv(_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._died(worker)
            return
        inbox = worker.inbox
        inbox += chunk
        while len(inbox) >= _HEAD.size:
            (size,) = _HEAD.unpack_from(inbox)
            if len(inbox) < _HEAD.size + size:
                return
            data = bytes(inbox[_HEAD.size : _HEAD.size + size])
            del inbox[: _HEAD.size + size]
            self._finished(worker, data)
            if worker.closed:
                return

    def _finished(self, worker: _Worker, data: bytes) -> None:
        job, worker.job = worker.job, None
        if job is not None and not job.future.done():
            try:
                ok, value, remote = pickle.loads(data)
            except Exception as exc:  # a result class the parent cannot import, say
                job.future.set_exception(exc)
            else:
                if ok:
                    job.future.set_result(value)
                else:
                    value.__cause__ = RemoteTraceback(remote)
                    job.future.set_exception(value)
        if not worker.closed:
            self._idle.append(worker)
        self._dispatch()

    def _died(self, worker: _Worker) -> None:
        """A process's socket closed under us: it died (or was killed). The pool is broken; only the
        job that process held is its victim, the others fail with `PoolBroken` to be run again."""
        if worker.closed:
            return
        own, worker.job = worker.job, None
        self._broken = (
            f"a pool process (pid {worker.process.pid}) terminated abruptly; the process pool is not "
            "usable any more"
        )
        self._close(worker)  # before the others are killed: their deaths are not this one's
        for w in self._workers:
            self._close(w)
            if w.process.is_alive():
                w.process.kill()
            self._reap(w.process, _REAP_TRIES)
        self._fail_all(self._broken)
        self._report_death(worker.process, own, _EXIT_TRIES)

    def _report_death(self, process: BaseProcess, job: _Job | None, tries: int) -> None:
        """Log the dead process's exit code and fail its job with it, once the kernel has it (polled:
        `is_alive` collects an exited child without blocking the loop)."""
        loop = self._loop
        if process.is_alive() and tries > 0 and loop is not None and not loop.is_closed():
            loop.call_later(_EXIT_INTERVAL, self._report_death, process, job, tries - 1)
            return
        code = process.exitcode
        log.error(
            kv(
                "pool_process_died",
                pid=process.pid,
                exitcode=code,
                job="running" if job is not None else "idle",
            )
        )
        if job is not None and not job.future.done():
            job.future.set_exception(
                ProcessDied(
                    f"the pool process (pid {process.pid}) running this job terminated abruptly"
                    + (f" (exit code {code})" if code is not None else ""),
                    process.pid,
                    code,
                )
            )

    def _fail_all(self, why: str) -> None:
        jobs = [w.job for w in self._workers if w.job is not None] + list(self._waiting)
        self._waiting.clear()
        self._idle.clear()
        for w in self._workers:
            w.job = None
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(PoolBroken(why))

    def _reap(self, process: BaseProcess, tries: int) -> None:
        """Collect a retired child's exit status once it has exited (`is_alive` waits for it without
        blocking), so that a pool retired while the gateway runs on leaves no zombie behind."""
        loop = self._loop
        if process.is_alive() and tries > 0 and loop is not None and not loop.is_closed():
            loop.call_later(_REAP_INTERVAL, self._reap, process, tries - 1)

    def _close(self, worker: _Worker) -> None:
        if worker.closed:
            return
        worker.closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.remove_reader(worker.sock.fileno())
            if worker.writing:
                loop.remove_writer(worker.sock.fileno())
        worker.writing = False
        worker.outbox = None
        worker.sock.close()


def _frame(job: tuple[Callable[..., Any], tuple[Any, ...]]) -> memoryview:
    """The job pickled behind room for its length, then the length filled in: the message is copied
    once (into the buffer), not again to put a header in front of it."""
    buf = io.BytesIO()
    buf.write(bytes(_HEAD.size))
    pickle.dump(job, buf, protocol=pickle.HIGHEST_PROTOCOL)
    frame = buf.getbuffer()
    _HEAD.pack_into(frame, 0, len(frame) - _HEAD.size)
    return frame


# -- the child's side -------------------------------------------------------------------------------


def _serve(sock: socket.socket, initializer: Callable[..., object] | None, initargs: tuple[Any, ...]) -> None:
    """A pool process: run the initializer, then jobs until the parent closes the socket."""
    if initializer is not None:
        initializer(*initargs)
    with sock:
        while (head := _receive(sock, _HEAD.size)) is not None:
            (size,) = _HEAD.unpack(head)
            data = _receive(sock, size)
            if data is None:
                return
            reply = _run(data)
            try:
                sock.sendall(_HEAD.pack(len(reply)) + reply)
            except OSError:  # the parent is gone
                return


def _run(data: bytearray) -> bytes:
    try:
        fn, args = pickle.loads(data)
        outcome: tuple[bool, Any, str] = (True, fn(*args), "")
    except Exception as exc:
        outcome = (False, exc, "".join(traceback.format_exception(exc)))
    try:
        return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # an unpicklable result or exception still answers the job
        what = "result" if outcome[0] else "exception"
        failure = RuntimeError(f"the job's {what} cannot be pickled: {exc!r}")
        return pickle.dumps((False, failure, outcome[2]), protocol=pickle.HIGHEST_PROTOCOL)


def _receive(sock: socket.socket, size: int) -> bytearray | None:
    """Exactly `size` bytes, or None at end of file."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return buf
