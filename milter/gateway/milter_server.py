"""The milter listener's connections: bytes in, `FilterSession` in the middle, replies out.

One `MilterConnection` per MTA connection (Postfix opens one per SMTP session and reuses it for each
message of that session). Everything protocol-shaped is in `milter.protocol`; this module only moves
bytes, keeps time (idle timeout, SMFIR_PROGRESS while a message is decided) and hands complete
messages to the gateway. A peer that breaks the protocol is logged and disconnected: a milter stream
cannot resynchronise, and the MTA then applies its `milter_default_action` (tempfail, as documented).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from milter.gateway.logfmt import kv
from milter.protocol import codec
from milter.protocol.codec import ProtocolError
from milter.protocol.session import Close, Decide, Decision, FilterSession, Message, Send

log = logging.getLogger("milter.gateway.milter")

Decider = Callable[[Message], Awaitable[Decision]]
Tracker = Callable[[Awaitable[Decision]], "asyncio.Task[Decision]"]


@dataclass(frozen=True)
class MilterSettings:
    max_size: int  # bytes of a message kept; past it the message is refused with 552 (0: no limit)
    idle_timeout: float  # seconds without a packet from the MTA (outside a decision) before closing
    progress_interval: float  # seconds between SMFIR_PROGRESS packets while a message is decided


class MilterConnection(asyncio.Protocol):
    def __init__(
        self,
        settings: MilterSettings,
        decide: Decider,
        track: Tracker,
        on_close: Callable[[MilterConnection], None],
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._on_error = on_error
        self._decide = decide
        self._track = track
        self._on_close: Callable[[MilterConnection], None] | None = on_close
        self._decoder = codec.Decoder()
        self._session = FilterSession(max_size=settings.max_size)
        self._queue: list[codec.Command] = []
        self._busy = False
        self._idle: asyncio.TimerHandle | None = None
        self._answering: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        tcp = isinstance(peer, tuple) and len(peer) >= 2
        self.peer = f"{peer[0]}:{peer[1]}" if tcp else str(peer or "unix")
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        try:
            self._queue += self._decoder.feed(data)
        except ProtocolError as exc:
            self._drop(f"protocol error: {exc}")
            return
        self._arm_idle()
        self._run()

    def eof_received(self) -> bool:
        """The MTA closed its side. Inside a packet that is a broken peer: logged and counted like any
        other protocol error. Either way our side closes too (False)."""
        if self._decoder.buffered:
            self._drop(f"connection closed inside a packet ({self._decoder.buffered} bytes of it received)")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        if self._on_close is not None:
            self._on_close(self)
            self._on_close = None

    # -- the conversation --------------------------------------------------------------------------

    def _run(self) -> None:
        """Handle queued commands until one needs a decision (handled in a task) or none is left."""
        while self._queue and not self._busy and self._open():
            assert self.transport is not None
            command = self._queue.pop(0)
            try:
                outcome = self._session.handle(command)
            except ProtocolError as exc:
                self._drop(f"protocol error: {exc}")
                return
            if isinstance(command, codec.OptNeg):
                s = self._session
                log.debug(kv("milter_negotiated", peer=self.peer, version=s.version,
                             offered=f"{command.actions:#x}/{command.steps:#x}",
                             taken=f"{int(s.actions):#x}/{int(s.steps):#x}"))
            match outcome:
                case Send(replies):
                    self._write(replies)
                case Decide(message):
                    self._busy = True
                    self._disarm_idle()
                    # Bounded memory: no more bytes are read while the message is decided.
                    self.transport.pause_reading()
                    self._answering = asyncio.ensure_future(self._answer(message))
                case Close(reason):
                    log.debug(kv("milter_close", peer=self.peer, reason=reason))
                    self.transport.close()

    async def _answer(self, message: Message) -> None:
        # Tracked by the gateway: a stop drains it, and a client going away does not cancel it
        # (a quarantine half-committed would leave the outcome unknown).
        task = self._track(self._decide(message))
        interval = self._settings.progress_interval
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                break
            self._write((codec.PROGRESS,))  # keeps Postfix's milter_content_timeout from firing
        try:
            decision = task.result()
            replies = self._session.decided(decision)
        except Exception as exc:  # decide never raises; this is a bug, and the MTA must still hear
            log.exception(kv("milter_internal_error", peer=self.peer))
            self._drop(f"internal error: {type(exc).__name__}")
            return
        self._write(replies)
        self._busy = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self._arm_idle()
            self._run()

    def _open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def _write(self, replies: tuple[codec.Response, ...]) -> None:
        if replies and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(codec.encode(r) for r in replies))

    def _drop(self, reason: str) -> None:
        log.warning(kv("milter_dropped", peer=self.peer, reason=reason[:200]))
        self._on_error()
        self._queue.clear()
        if self.transport is not None:
            self.transport.abort()

    # -- idle timeout ------------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        self._disarm_idle()
        if not self._busy:
            loop = asyncio.get_running_loop()
            self._idle = loop.call_later(self._settings.idle_timeout, self._timed_out)

    def _disarm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _timed_out(self) -> None:
        log.info(kv("milter_timeout", peer=self.peer, after=self._settings.idle_timeout))
        if self.transport is not None:
            self.transport.close()


class Refused(asyncio.Protocol):
    """A connection over the session limit: closed at once (the MTA applies milter_default_action)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
