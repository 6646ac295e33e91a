"""Running gateways: one in this process (`--workers 1`), or N worker processes.

Workers are processes, not threads, because the SMTP sessions themselves (aiosmtpd, pure Python) cost
CPU under the GIL. Each worker binds its own socket to the same address with SO_REUSEPORT and runs a
full event loop; the kernel spreads new connections over them, and a worker that dies takes only its
own sessions with it (their clients get no 250, so the MTA retries). The parent only supervises:
it restarts a worker that exits unexpectedly and forwards SIGTERM/SIGINT for a graceful stop.

SIGHUP (`systemctl reload`, sent to the main process) reloads the model: the single gateway, or every
worker, the parent forwarding it (see milter.gateway.reload). SIGHUP's default action is to end the
process, so it stays blocked from the start of a gateway process until its handler is installed: a
reload requested while a worker starts is held pending, then carried out, instead of killing it.
Workers inherit the blocked mask from the parent's `start`, which covers their interpreter start-up.
SIGUSR2 is held the same way: it asks for a memory report (milter.gateway.memreport), which the parent
logs for itself and forwards to every worker, and each worker to its prepare processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from typing import Any, NoReturn

from milter import errors
from milter.config import Config, host_port
from milter.errors import ConfigError, MilterError
from milter.gateway.heap import fix_mmap_threshold
from milter.gateway.logfmt import kv
from milter.gateway.memreport import MemoryReporter
from milter.gateway.reload import load_checked
from milter.gateway.server import Gateway, bind_milter, tcp_socket

log = logging.getLogger("milter.gateway.workers")

RESTART_DELAY = 1.0
#: A worker that dies this many times in a row before it listens will not start (a bad setting only
#: found while starting, a port taken): the parent gives up, exit 1, rather than restart it for ever.
MAX_EARLY_DEATHS = 3
# Signals whose default action ends the process but which mean something else here (SIGHUP: reload,
# SIGUSR2: memory report): blocked from a process's start until its handler is installed.
HELD = frozenset({signal.SIGHUP, signal.SIGUSR2})
STOP_GRACE = 30.0


@dataclass(frozen=True)
class Loaded:
    scanner: Any
    store: Any
    schema_digest: str


def load(config: Config) -> Loaded:
    """Load the model, the policy and the store (blocking: call before the loop serves).
    Raises ModelError / SchemaMismatchError / ConfigError / StoreError with a clear message."""
    from milter.features import SCHEMA
    from milter.store import Store

    store = Store.open(config.store.url)
    _finish_swap(config)
    if config.model.registry == "store":
        # before the model loads: a node joining (or restarting into) the fleet serves its model
        from milter.gateway.fleet import adopt_at_start
        from milter.registry import model_dir

        adopt_at_start(store, model_dir(config.model.path))
    # the reload's own checks, smoke scan included: a model milter-train wrote straight into
    # current.onnx (no promote) used to start serving unchecked, where a reload would have refused it
    model = config.model
    scanner = load_checked(model.path, config.policy, store, model.explain, model.provider)
    return Loaded(scanner, store, SCHEMA.digest)


def _finish_swap(config: Config) -> None:
    """A promote or rollback killed half-way left the current files of two models: finish it from the
    registry's history before loading (milter.registry.recover). A models folder this user cannot
    lock is left as it is: loading then says what is wrong with it."""
    from milter.registry import model_dir, recover

    try:
        recover(model_dir(config.model.path))
    except (OSError, ValueError) as exc:
        log.warning("cannot check %s for an interrupted model swap: %s", model_dir(config.model.path), exc)


def check_loads(config: Config) -> None:
    """Fail fast: load the model, the policy and the store once, as every worker will, and raise what
    that raised. A model or store that cannot load would otherwise only make the workers crash-loop.

    In a short-lived child, not here: what loading allocates (ONNX Runtime, the explainer, the store:
    140 MiB, measured) stayed in the parent's heap for the life of the service, which only supervises."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_check_child, args=(config, send), name="milter-check")
    proc.start()
    send.close()
    try:
        outcome = receive.recv()
    except EOFError:  # it died before it could say (a crash inside a native library)
        outcome = ("MilterError", f"the start-up check died (exit code {_exit_code(proc)})", None)
    finally:
        receive.close()
        proc.join()
    if outcome is not None:
        raise _rebuilt(*outcome)


def _check_child(config: Config, send: Connection) -> None:
    try:
        load(config).store.close()
    except MilterError as exc:
        key = (exc.key, exc.problem) if isinstance(exc, ConfigError) else None
        send.send((type(exc).__name__, str(exc), key))
    except Exception as exc:  # not ours: the parent names it
        send.send(("MilterError", f"start-up check failed: {type(exc).__name__}: {exc}", None))
    else:
        send.send(None)
    finally:
        send.close()


def _exit_code(proc: BaseProcess) -> int | None:
    proc.join(timeout=5)
    return proc.exitcode


def _rebuilt(name: str, message: str, config_key: tuple[str, str] | None) -> MilterError:
    """The child's error as the same class of the one hierarchy (exceptions with extra constructor
    arguments do not survive pickling, so class name and text travel instead)."""
    if config_key is not None:
        return ConfigError(*config_key)
    cls = getattr(errors, name, MilterError)
    if not (isinstance(cls, type) and issubclass(cls, MilterError)):
        cls = MilterError
    return cls(message)


def listen_socket(address: str, reuse_port: bool) -> socket.socket:
    host, port = host_port(address, "server.listen")
    return tcp_socket(host, port, reuse_port)


def smtp_socket(config: Config, reuse_port: bool) -> socket.socket | None:
    return listen_socket(config.server.listen, reuse_port) if config.server.listen else None


def milter_socket(
    config: Config, reuse_port: bool, shared: socket.socket | None = None
) -> socket.socket | None:
    """This worker's milter socket: its own (SO_REUSEPORT) for inet, the parent's for a unix path
    (one file cannot be bound twice; the spawned worker receives the parent's socket)."""
    if shared is not None:
        return shared
    address = config.server.milter_listen
    return bind_milter(address, reuse_port) if address is not None else None


def _shared_unix_socket(config: Config) -> socket.socket | None:
    address = config.server.milter_listen
    if address is None or not address.startswith(("unix:", "local:")):
        return None
    return bind_milter(address, reuse_port=False)


async def serve_gateway(
    config: Config,
    loaded: Loaded,
    sock: socket.socket | None,
    worker_index: int = 0,
    milter_sock: socket.socket | None = None,
    listening: EventType | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully. `listening` is set once it serves."""
    from milter.scan import prepare

    gateway = Gateway(
        config,
        loaded.scanner,
        loaded.store,
        prepare=prepare,
        schema_digest=loaded.schema_digest,
        worker_index=worker_index,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # What start-up allocated (modules, model, store, config) lives as long as the process: frozen
    # out of the cyclic collector, full collections no longer walk it. Measured with bench/gateway.py:
    # 40-51 ms event-loop stalls per full collection before; none during load after. Here, in the
    # process's entry point, not in Gateway: freezing is process-wide.
    gc.collect()
    gc.freeze()
    await gateway.start(sock, milter_sock)
    if listening is not None:
        listening.set()
    loop.add_signal_handler(signal.SIGHUP, gateway.request_reload)
    reporter = MemoryReporter()
    loop.add_signal_handler(signal.SIGUSR2, _log_memory, reporter, worker_index, gateway)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)  # a SIGHUP or SIGUSR2 held since start-up fires now
    try:
        await stop.wait()
    finally:
        log.info(kv("stopping", worker=worker_index))
        await gateway.close(grace=STOP_GRACE)
        await asyncio.to_thread(loaded.store.close)


def _log_memory(reporter: MemoryReporter, worker_index: int, gateway: Gateway) -> None:
    """SIGUSR2: what this gateway process's memory is made of (milter.gateway.memreport), then the
    same asked of its prepare processes, so one signal to the main pid reports every process."""
    log.info(kv("memory_report", worker=worker_index, pid=os.getpid(), **reporter.report().fields()))
    for pid in gateway.prepare_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR2)


def run_single(config: Config) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)  # until serve_gateway handles them
    fix_mmap_threshold()
    loaded = load(config)
    sock = smtp_socket(config, reuse_port=False)
    asyncio.run(serve_gateway(config, loaded, sock, milter_sock=milter_socket(config, reuse_port=False)))


def _worker_main(
    config: Config,
    index: int,
    log_level: int,
    shared: socket.socket | None = None,
    listening: EventType | None = None,
) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)  # already, from the parent; kept explicit
    fix_mmap_threshold()  # before any thread has a heap of its own
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s worker={index} %(name)s: %(message)s"
    )
    if log_level > logging.DEBUG:  # as in the serve command: aiosmtpd's and alembic's lines are noise
        for noisy in ("mail.log", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    loaded = load(config)
    sock = smtp_socket(config, reuse_port=True)
    msock = milter_socket(config, reuse_port=True, shared=shared)
    asyncio.run(
        serve_gateway(config, loaded, sock, worker_index=index, milter_sock=msock, listening=listening)
    )


def run_workers(config: Config, log_level: int) -> None:
    """Start config.server.workers processes and keep them running until SIGTERM/SIGINT."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)  # held until on_reload and on_report are installed
    check_loads(config)
    for probe in (smtp_socket(config, reuse_port=True), milter_socket(config, reuse_port=True)):
        if probe is not None:
            probe.close()
    shared = _shared_unix_socket(config)
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    procs: dict[int, BaseProcess] = {}
    listening: dict[int, EventType] = {}  # set by each worker once it serves

    def start(index: int) -> BaseProcess:
        listening[index] = ctx.Event()
        proc = ctx.Process(
            target=_worker_main,
            args=(config, index, log_level, shared, listening[index]),
            name=f"milter-worker-{index}",
        )
        # The child inherits the signal mask: blocked, a SIGHUP during its start-up waits for its handler.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        log.info(kv("worker_started", worker=index, pid=proc.pid))
        return proc

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()  # SIGTERM: the worker drains its messages in flight

    def on_reload(_signum: int, _frame: object) -> None:
        if stopping:
            return
        sent = [index for index, proc in procs.items() if _send(proc, signal.SIGHUP)]
        log.info(kv("reload_forwarded", workers=",".join(map(str, sent))))

    reporter = MemoryReporter()

    def on_report(_signum: int, _frame: object) -> None:
        # The main pid is the one an admin knows (systemd's MAINPID): each worker reports its own and
        # asks its prepare processes. multiprocessing's resource tracker, which has no handler, was
        # started while the parent held SIGUSR2 blocked and keeps it blocked: a signal to every
        # process of the unit (plain `systemctl kill`) leaves it pending there, harmless.
        # A plain Python handler can be entered again by a second signal; that one is dropped.
        if reporter.busy:
            return
        reporter.busy = True
        try:
            log.info(kv("memory_report", role="parent", pid=os.getpid(), **reporter.report().fields()))
        finally:
            reporter.busy = False
        for proc in procs.values():
            _send(proc, signal.SIGUSR2)

    signal.signal(signal.SIGHUP, on_reload)
    signal.signal(signal.SIGUSR2, on_report)
    for i in range(config.server.workers):
        procs[i] = start(i)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
    early_deaths = dict.fromkeys(procs, 0)  # per worker: deaths in a row before it listened
    while procs:
        wait([p.sentinel for p in procs.values()], timeout=1.0)
        for index, proc in list(procs.items()):
            if proc.is_alive():
                continue
            proc.join()
            del procs[index]
            if stopping:
                continue
            early_deaths[index] = 0 if listening[index].is_set() else early_deaths[index] + 1
            if early_deaths[index] >= MAX_EARLY_DEATHS:
                _give_up(procs, index, proc.exitcode, early_deaths[index])
            log.error(kv("worker_died", worker=index, exitcode=proc.exitcode, action="restarting"))
            time.sleep(RESTART_DELAY)
            if stopping:  # SIGTERM during the delay: on_signal did not know of this worker
                log.info(kv("worker_not_restarted", worker=index, reason="stopping"))
                continue
            procs[index] = start(index)
            if stopping:  # SIGTERM while it started, before on_signal could see it in procs
                _send(procs[index], signal.SIGTERM)


def _give_up(procs: dict[int, BaseProcess], index: int, exitcode: int | None, deaths: int) -> NoReturn:
    """A worker keeps dying before it listens: stop the others gracefully and fail (exit 1), so that
    the service manager reports a failed start instead of a gateway restarting a worker for ever."""
    log.error(
        kv(
            "worker_crashloop",
            worker=index,
            exitcode=exitcode,
            deaths=deaths,
            action="giving_up",
            hint="see the worker's error above",
        )
    )
    for proc in procs.values():
        _send(proc, signal.SIGTERM)
    for proc in procs.values():
        proc.join(STOP_GRACE + 10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    raise MilterError(
        f"worker {index} died {deaths} times in a row before it was listening (last exit code "
        f"{exitcode}); giving up"
    )


def _send(proc: BaseProcess, signum: int) -> bool:
    """Signal a worker that is still running; False if it is gone (its restart loads the new model)."""
    if proc.pid is None or not proc.is_alive():
        return False
    try:
        os.kill(proc.pid, signum)
    except ProcessLookupError:
        return False
    return True
