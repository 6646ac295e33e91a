"""`Gateway`: one event loop's SMTP listener, scanner, relay, store and metrics, wired together.

Built from the configuration plus the already-loaded scanner and store (so tests and the `serve`
command load those once and can inject faults). `workers` runs several of these in processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import Envelope as SMTPEnvelope
from aiosmtpd.smtp import Session

from milter.config import Config, host_port, milter_address
from milter.gateway.auth import build_sender_auth
from milter.gateway.batcher import MicroBatcher
from milter.gateway.fleet import FleetFollower, FleetSettings, FleetStore, node_name
from milter.gateway.heap import HeapKeeper, fix_mmap_threshold, keep_heap
from milter.gateway.history import HistoryKeeper
from milter.gateway.logfmt import kv, new_message_id
from milter.gateway.memreport import MemoryReporter
from milter.gateway.metrics import GatewayMetrics, MetricsServer
from milter.gateway.milter_act import MilterActor
from milter.gateway.milter_server import MilterConnection, MilterSettings, Refused
from milter.gateway.process import (
    Inbound,
    MessageProcessor,
    ModelSlot,
    Pool,
    PrepareFn,
    PrepareLimits,
    PreparePool,
    ProcessorSettings,
    ScannerLike,
    Scoring,
    StoreLike,
    score_batch,
)
from milter.gateway.procpool import LoopProcessPool
from milter.gateway.relay import DEFAULT_POOL_SIZE, Downstream
from milter.gateway.reload import ModelReloader, ReloadResult, load_checked
from milter.gateway.session import TOO_MANY_RECIPIENTS, TOO_MANY_SESSIONS, GatewaySMTP
from milter.protocol import codec
from milter.protocol.session import Decision, Message
from milter.registry import model_dir
from milter.types import Envelope

if TYPE_CHECKING:
    from milter.auth import Resolver
    from milter.scan import ScanResult

log = logging.getLogger("milter.gateway")

WARMUP_MESSAGE = b"From: warmup@localhost\r\nSubject: warmup\r\n\r\nwarmup\r\n"
#: The answer to a transaction begun (MAIL) or completed (DATA) once the gateway is stopping: the drain
#: waits for the messages it already has, and a new one would be cut off by its end (RFC 5321 4.3.2).
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
#: /healthz reports a model batch that has run longer than server.scan_timeout (or than this, with no
#: scan_timeout): every message waits behind it, and each one times out; it cannot be interrupted.
BATCH_STUCK_AFTER = 60.0


class _Busy(asyncio.Protocol):
    """Answers a connection over the session limit with 421 and closes it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(TOO_MANY_SESSIONS.encode() + b"\r\n")
        transport.close()


def _prepare_process_init(heap_trim_interval: float = 0.0) -> None:
    """Set up a prepare process before its first job.

    Ctrl-C in a terminal signals the whole process group: the prepare processes leave stopping to
    their gateway, which drains its messages (they still need these processes) and then shuts the pool.

    Then the feature code is run once and what that allocated (modules, the public-suffix list,
    lexicons) is frozen out of the cyclic collector: otherwise each full collection walked it all,
    40-54 ms per collection under bench/gateway.py, and every message waiting meanwhile paid for it.

    Every `heap_trim_interval` seconds a thread gives glibc's free memory back, as the worker's
    HeapKeeper does (the prepare processes held 6-33 MiB free each in bench/rss.py's run I).
    """
    fix_mmap_threshold()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # `systemctl kill -s USR2` signals every process of the unit: a report here, not a dead process.
    signal.signal(signal.SIGUSR2, functools.partial(_report_memory, MemoryReporter()))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})  # blocked since birth (submit)
    _exit_with_parent()
    if heap_trim_interval > 0:
        keeper = threading.Thread(
            target=keep_heap, args=(heap_trim_interval,), daemon=True, name="heap-keeper"
        )
        keeper.start()
    from milter.features.context import Protected
    from milter.scan import prepare

    try:
        prepare(WARMUP_MESSAGE, Envelope(), Protected())
    except Exception:  # the gateway's own warm-up reports a broken prepare; this is only a head start
        log.exception(kv("prepare_warmup_failed"))
    gc.collect()
    gc.freeze()


def _report_memory(reporter: MemoryReporter, _signum: int, _frame: object) -> None:
    """SIGUSR2 in a prepare process: its memory report on stderr, where its gateway's log goes. The
    handler runs inside whatever job the process is doing, so nothing may escape it into that job.
    A signal that arrives while a report is being made (sent directly and forwarded by the worker, as
    `systemctl kill` does) is dropped rather than starting a report inside the report."""
    if reporter.busy:
        return
    reporter.busy = True
    try:
        line = kv("memory_report", role="prepare", pid=os.getpid(), **reporter.report().fields()) + "\n"
        os.write(sys.stderr.fileno(), line.encode())  # one write: its sibling may report at the same time
    except Exception:
        log.exception(kv("memory_report_failed"))
    finally:
        reporter.busy = False


def _exit_with_parent() -> None:
    """End this prepare process when its gateway process ends, however it ends.

    A SIGKILLed worker cannot shut its pool down, and its prepare processes, re-parented to init,
    lived on (bench/soak.py: two of ~88 MiB per killed worker, still there after the gateway stopped).
    The pipe from the parent closes when the parent dies, which ends `join` here.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


#: Signals a prepare process is born with blocked. A Ctrl-C on the process group that lands while a
#: child still imports, before `_prepare_process_init` ignores SIGINT, printed a KeyboardInterrupt
#: traceback per child; a blocked mask survives fork and exec, so blocking it for the length of the
#: start covers the child from its first instruction (the gateway's own SIGINT meanwhile stays pending
#: and is handled as soon as the mask is restored). SIGUSR2 (a memory report) would end a child that
#: has no handler yet; the initializer unblocks it.
PREPARE_BLOCKED_SIGNALS = frozenset({signal.SIGINT, signal.SIGUSR2})


def default_prepare_pool(processes: int, heap_trim_interval: float = 0.0) -> Callable[[], LoopProcessPool]:
    # spawn, not fork: forking a process that runs an event loop and ONNX Runtime threads is unsafe.
    def make() -> LoopProcessPool:
        return LoopProcessPool(
            processes,
            multiprocessing.get_context("spawn"),
            initializer=_prepare_process_init,
            initargs=(heap_trim_interval,),
            blocked_signals=PREPARE_BLOCKED_SIGNALS,
        )

    return make


def to_envelope(session: Session, envelope: SMTPEnvelope, server: GatewaySMTP) -> Envelope:
    """The session's facts, with the original client's (XFORWARD) where Postfix sent them."""
    xf = server.xforward
    peer = session.peer
    peer_addr = peer[0] if isinstance(peer, tuple) and peer else None
    mail_from = envelope.mail_from or ""
    return Envelope(
        mail_from="" if mail_from == "<>" else mail_from,
        rcpt_tos=tuple(envelope.rcpt_tos),
        client_addr=xf.client_addr or peer_addr,
        client_name=xf.known("NAME"),
        helo=xf.known("HELO") or session.host_name,
        queue_id=xf.known("IDENT"),
        source=xf.known("SOURCE"),
    )


LISTEN_BACKLOG = 1024  # MTAs open connections in bursts when a queue is flushed


def tcp_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening, non-blocking TCP socket; with `reuse_port` several workers can bind the address."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def bind_milter(address: str, reuse_port: bool) -> socket.socket:
    """A listening socket for server.milter_listen. A unix socket's stale file is replaced, and the
    socket is made writable for the MTA's user (Postfix's smtpd runs as `postfix`): put it in a
    directory only the MTA and the gateway can reach."""
    where = milter_address(address, "server.milter_listen")
    if where.path is None:
        assert where.host is not None and where.port is not None
        return tcp_socket(where.host, where.port, reuse_port)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(where.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(where.path)
    os.chmod(where.path, 0o666)
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def batch_settings(config: Config, classifier: object) -> tuple[int, float]:
    """(most items, wait in ms) of the micro-batcher: [model] gpu_batch_* while the tensor graph scores
    on CUDA (a GPU call costs about the same for hundreds of rows as for one), server.batch_* on the CPU.
    Chosen at start: a reload that changes the graph keeps the batcher it found (a restart adapts it)."""
    if getattr(classifier, "on_gpu", False):
        return config.model.gpu_batch_size, config.model.gpu_batch_wait_ms
    return config.server.batch_max, config.server.batch_wait_ms


class _Handler:
    """aiosmtpd hook object: DATA goes to the processor, shielded from the client going away."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def handle_RCPT(
        self, server: GatewaySMTP, session: Session, envelope: SMTPEnvelope, address: str, options: list[str]
    ) -> str:
        """aiosmtpd's own RCPT handling, with server.max_recipients: past it 452 4.5.3, and the client
        (Postfix, any MTA) sends the rest in another transaction. Without it a transaction could name
        any number of recipients (memory), and one the downstream limits (Postfix's
        smtpd_recipient_limit) was refused as a whole with a 4xx on every try."""
        limit = self._gateway.config.server.max_recipients
        if limit and len(envelope.rcpt_tos) >= limit:
            log.info(kv("recipients_limited", peer=session.peer, limit=limit))
            return TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_MAIL(
        self, server: GatewaySMTP, session: Session, envelope: SMTPEnvelope, address: str, options: list[str]
    ) -> str:
        """aiosmtpd's own MAIL handling, unless the gateway is stopping: then 421 and the session ends."""
        if self._gateway.stopping:
            return self._refuse(server, session, "MAIL")
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    def _refuse(self, server: GatewaySMTP, session: Session, command: str) -> str:
        log.info(kv("transaction_refused", peer=session.peer, command=command, reason="stopping"))
        # after the reply is written (aiosmtpd writes it when this hook returns, before it yields)
        if server.transport is not None:
            asyncio.get_running_loop().call_soon(server.transport.close)
        return SHUTTING_DOWN

    async def handle_DATA(self, server: GatewaySMTP, session: Session, envelope: SMTPEnvelope) -> str:
        if self._gateway.stopping:  # the sender keeps the message; the drain cannot promise to finish it
            return self._refuse(server, session, "DATA")
        raw = envelope.original_content or b""
        msg = Inbound(
            id=new_message_id(),
            raw=raw,
            envelope=to_envelope(session, envelope, server),
            mail_options=tuple(o.upper() for o in envelope.mail_options),
            xforward=server.xforward,
        )
        server.hold_timeout()
        try:
            # Once the message is complete it is processed to the end even if the client disconnects:
            # cancelling halfway through a relay would leave its outcome unknown.
            return await asyncio.shield(self._gateway.track(self._gateway.processor.handle(msg), msg.id))
        finally:
            server.resume_timeout()


class Gateway:
    def __init__(
        self,
        config: Config,
        scanner: ScannerLike,
        store: StoreLike,
        *,
        prepare: PrepareFn,
        schema_digest: str,
        prepare_pool: Callable[[], Pool] | None = None,
        worker_index: int = 0,
        resolver: Resolver | None = None,
    ) -> None:
        self.config = config
        srv = config.server
        self._xforward_hosts = tuple(ipaddress.ip_network(n, strict=False) for n in srv.xforward_hosts)
        self.metrics = GatewayMetrics()
        self.model = ModelSlot(scanner)
        clf = scanner.classifier
        self.metrics.set_model(clf.name, clf.providers, clf.graph)
        # SIGHUP (serve) and tests call this; it reloads config.model.path, not the path loaded first.
        # The reload rereads the store's labels too (learned senders, milter.policy.learned).
        self.reloader = ModelReloader(
            self.model, Path(config.model.path), config.policy, self.metrics,
            loader=functools.partial(load_checked, store=store, explain=config.model.explain,
                                     provider=config.model.provider),
        )
        self._registry_executor: ThreadPoolExecutor | None = None
        self.fleet: FleetFollower | None = None
        if config.model.registry == "store":
            # its own thread: a store that hangs, or a model's validation, never delays verdict commits
            self._registry_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milter-registry")
            fleet = FleetSettings(node_name(srv.node_name), model_dir(Path(config.model.path)),
                                  config.model.registry_poll_seconds)
            # the real Store has the registry methods; StoreLike only names what messages need
            self.fleet = FleetFollower(fleet, cast(FleetStore, store), self.model, self.reloader,
                                       self.metrics, self._registry_executor)
        # As many prepare processes per worker as there are cores, not cores / workers: a burst that
        # lands on one worker can then use every core (bench/gateway.py at 300 msgs/s: p99 added
        # latency 11-12 ms instead of 18-20; saturated, 834 msgs/s instead of 747). Idle ones cost
        # memory only.
        processes = self._prepare_processes = max(1, os.cpu_count() or 1)
        self._prepare_pool = PreparePool(
            prepare_pool or default_prepare_pool(processes, srv.heap_trim_interval),
            prepare,
            PrepareLimits(max_rss=srv.prepare_max_rss_mb << 20, max_jobs=srv.prepare_max_jobs),
            self.metrics,
        )
        self._store_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="milter-store")
        hist = config.policy.history
        # its own thread: history writes never queue with the quarantine commits (milter.gateway.history)
        self._history_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milter-history")
        self.history = (
            HistoryKeeper(hist, store, self._history_executor, self.metrics) if hist.enabled else None
        )
        batch_max, batch_wait_ms = batch_settings(config, scanner.classifier)
        self.batcher: MicroBatcher[Scoring, ScanResult] = MicroBatcher(
            partial(score_batch, self.model),
            batch_max,
            batch_wait_ms / 1000.0,
            on_batch=self.metrics.batch_size.observe,
        )
        host, port = host_port(srv.downstream, "server.downstream")
        self.downstream = Downstream(
            host,
            port,
            srv.downstream_timeout,
            srv.hostname,
            size=min(DEFAULT_POOL_SIZE, max(1, srv.max_sessions)),
        )
        settings = ProcessorSettings(
            mode=srv.mode,
            on_error=config.policy.on_error,
            schema_digest=schema_digest,
            keep_vector=config.store.keep_feature_vectors,
            scan_timeout=srv.scan_timeout,
            hostname=srv.hostname,
        )
        self.processor = MessageProcessor(
            settings,
            self.model,
            self._prepare_pool,
            self.batcher,
            self.downstream,
            store,
            self.metrics,
            self._store_executor,
            build_sender_auth(
                config.auth, srv.hostname, resolver, config.policy.internal_networks, config.reputation,
                config.policy.protected_domains,
            ),
            self.history,
        )
        self.milter = MilterActor(self.processor, srv.milter_quarantine)
        self._milter_settings = MilterSettings(
            max_size=srv.max_message_size,
            idle_timeout=srv.milter_timeout,
            progress_interval=srv.milter_progress_interval,
            packet_timeout=srv.command_timeout,
        )
        self._worker_index = worker_index
        self._heap = HeapKeeper(srv.heap_trim_interval, self.metrics)
        self._handler = _Handler(self)
        self._sessions: set[GatewaySMTP | MilterConnection] = set()
        self._inflight: dict[asyncio.Task[Any], str | None] = {}  # message tasks -> message id
        self.stopping = False  # close() began: new transactions are refused
        self._server: asyncio.Server | None = None
        self._milter_server: asyncio.Server | None = None
        self._metrics_server: MetricsServer | None = None
        self.metrics_port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(
        self, sock: socket.socket | None = None, milter_sock: socket.socket | None = None
    ) -> None:
        """Warm up the scanner, then listen: SMTP on `sock` or server.listen (unless that is empty),
        the milter protocol on `milter_sock` or server.milter_listen (if set)."""
        self.batcher.start()
        await self._warm_up()
        self._heap.start()
        if self.history is not None:
            self.history.start()  # loads in the background: until then the history is "unknown"
        if self.fleet is not None:
            self.fleet.start()  # its first poll adopts the fleet's model if start-up could not
        loop = asyncio.get_running_loop()
        srv = self.config.server
        if sock is not None:
            # backlog again: create_server calls listen() itself, with 100 unless told (the kernel then
            # drops SYNs of a connection burst, and each costs its client a 1 s retransmit)
            self._server = await loop.create_server(self._protocol, sock=sock, backlog=LISTEN_BACKLOG)
        elif srv.listen:
            host, port = host_port(srv.listen, "server.listen")
            self._server = await loop.create_server(
                self._protocol, host, port, reuse_address=True, backlog=LISTEN_BACKLOG
            )
        if milter_sock is None and srv.milter_listen is not None:
            milter_sock = bind_milter(srv.milter_listen, reuse_port=False)
        if milter_sock is not None:
            self._milter_server = await loop.create_server(
                self._milter_protocol, sock=milter_sock, backlog=LISTEN_BACKLOG
            )
        if self.config.server.metrics_listen:
            mhost, mport = host_port(self.config.server.metrics_listen, "server.metrics_listen")
            self._metrics_server = MetricsServer(self.metrics, self.health)
            self.metrics_port = await self._metrics_server.start(
                mhost, mport + self._worker_index if mport else 0
            )
        log.info(
            kv(
                "listening",
                addr=self.address if self._server is not None else None,
                milter=self.milter_address if self._milter_server is not None else None,
                mode=self.config.server.mode,
                metrics_port=self.metrics_port,
                downstream=self.config.server.downstream,
                pid=os.getpid(),
            )
        )

    async def _warm_up(self) -> None:
        """Start every prepare process and run the model once, so the first messages are not slow.

        One warm-up message per process, submitted together: the pool starts processes only when a
        job finds none idle, and one started under the first burst of mail held messages back for
        the second it takes to start (bench/gateway.py's first run after a start showed it at p99).

        A model that fails here is logged, not fatal: a model that cannot load was already refused,
        and policy.on_error decides what happens to mail while inference fails (tempfail, or accept
        unscanned); refusing to start would override an operator's on_error = "accept"."""
        env = Envelope()
        protected = self.model.scanner.policy.protected
        runs = [
            self._prepare_pool.run(WARMUP_MESSAGE, env, protected) for _ in range(self._prepare_processes)
        ]
        ext = (await asyncio.gather(*runs))[0]
        try:
            await self.batcher.submit((ext, env, None))
        except Exception as exc:
            self.metrics.errors.labels("scan").inc()
            log.error(kv("model_warmup_failed", error=type(exc).__name__, detail=str(exc)[:200],
                         on_error=self.config.policy.on_error))

    def prepare_pids(self) -> list[int]:
        """This gateway's prepare processes (to forward a memory report request to)."""
        return self._prepare_pool.pids()

    def request_reload(self) -> None:
        """What SIGHUP does: reload the model in the background (see milter.gateway.reload)."""
        self.reloader.request()

    async def reload_model(self) -> ReloadResult:
        """Reload the model now and say how it went; the old model keeps serving if it fails."""
        return await self.reloader.reload()

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        name = self._server.sockets[0].getsockname()
        return name[0], name[1]

    @property
    def milter_address(self) -> str:
        """Where the milter listens, in Postfix's notation (`inet:HOST:PORT` or `unix:PATH`)."""
        assert self._milter_server is not None
        name = self._milter_server.sockets[0].getsockname()
        return f"inet:{name[0]}:{name[1]}" if isinstance(name, tuple) else f"unix:{name}"

    def health(self) -> str | None:
        if self.config.server.listen and (self._server is None or not self._server.is_serving()):
            return "smtp listener closed"
        if self.config.server.milter_listen is not None and (
            self._milter_server is None or not self._milter_server.is_serving()
        ):
            return "milter listener closed"
        if not self.batcher.running:
            return "model batcher stopped"
        busy, limit = self.batcher.busy_for(), self.config.server.scan_timeout or BATCH_STUCK_AFTER
        if busy > limit:  # a model or policy call that never returns: every message now times out
            return f"model batch running for {busy:.0f} s (limit {limit:g} s)"
        return None

    async def close(self, grace: float = 30.0) -> None:
        """Stop accepting, let messages in progress finish (up to `grace` s), then close everything.
        Open sessions get 421 to a new transaction meanwhile; a message still unfinished at the
        deadline is logged (`message_abandoned`): its client gets no reply and will send it again."""
        self.stopping = True
        deadline = asyncio.get_running_loop().time() + grace
        for server in (self._server, self._milter_server):
            if server is not None:
                server.close()
        if self.fleet is not None:
            await self.fleet.close()  # before the reloader: a poll may be about to request a reload
        await self.reloader.close()
        await self._heap.close()
        await self._drain(deadline)
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        for server in (self._server, self._milter_server):
            if server is not None:
                await server.wait_closed()
        await self.processor.close()
        if self.history is not None:
            await self.history.close()
        self._history_executor.shutdown(wait=True)
        await self.batcher.close()
        await self.downstream.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        self._prepare_pool.close()
        self._store_executor.shutdown(wait=True)
        if self._registry_executor is not None:
            self._registry_executor.shutdown(wait=True)

    async def _drain(self, deadline: float) -> None:
        """Wait for every message in progress, including one that began after the stop (its DATA was
        already complete), until none is left or the deadline passes."""
        loop = asyncio.get_running_loop()
        if self._inflight:
            log.info(kv("draining", messages=len(self._inflight)))
        while self._inflight and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._inflight), timeout=left)
        for task, msg_id in list(self._inflight.items()):
            stage = self.processor.stage(msg_id) if msg_id is not None else "milter"
            log.error(kv("message_abandoned", id=msg_id, stage=stage, reason="shutdown grace passed",
                         task=task.get_name()))

    # -- sessions ----------------------------------------------------------------------------------

    def track(self, coro: Any, msg_id: str | None = None) -> asyncio.Task[Any]:
        """Run a message's coroutine as a task the stop drains (`msg_id` names it if abandoned)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._inflight[task] = msg_id
        task.add_done_callback(self._untrack)
        return task

    def _untrack(self, task: asyncio.Task[Any]) -> None:
        self._inflight.pop(task, None)

    async def _milter_decide(self, message: Message) -> Decision:
        """The milter's decision, unless the gateway is stopping: then a tempfail, the MTA keeps it."""
        if self.stopping:
            log.info(kv("transaction_refused", command="milter", reason="stopping"))
            return Decision(codec.ReplyCode(SHUTTING_DOWN))
        return await self.milter.decide(message)

    def _over_limit(self) -> bool:
        limit = self.config.server.max_sessions
        if len(self._sessions) < limit:
            return False
        self.metrics.errors.labels("too_many_sessions").inc()
        log.warning(kv("session_refused", reason="max_sessions", limit=limit))
        return True

    def _milter_protocol(self) -> asyncio.BaseProtocol:
        if self._over_limit():
            return Refused()

        def closed(conn: MilterConnection) -> None:
            self._sessions.discard(conn)
            self.metrics.sessions.set(len(self._sessions))

        conn = MilterConnection(
            self._milter_settings, self._milter_decide, self.track, closed,
            on_error=lambda: self.metrics.errors.labels("milter_protocol").inc(),
        )
        self._sessions.add(conn)
        self.metrics.sessions.set(len(self._sessions))
        return conn

    def _protocol(self) -> asyncio.BaseProtocol:
        srv = self.config.server
        if self._over_limit():
            return _Busy()
        session: GatewaySMTP

        def closed() -> None:
            self._sessions.discard(session)
            self.metrics.sessions.set(len(self._sessions))

        session = GatewaySMTP(
            self._handler,
            data_timeout=srv.data_timeout,
            on_close=closed,
            data_size_limit=srv.max_message_size or None,
            enable_SMTPUTF8=True,
            hostname=srv.hostname,
            ident="milter",
            timeout=srv.command_timeout,
            xforward_hosts=self._xforward_hosts,
            loop=asyncio.get_running_loop(),
        )
        self._sessions.add(session)
        self.metrics.sessions.set(len(self._sessions))
        return session
