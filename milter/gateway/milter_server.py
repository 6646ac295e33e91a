"""The milter listener's connections: bytes in, `FilterSession` in the middle, replies out.

One `MilterConnection` per MTA connection (Postfix opens one per SMTP session and reuses it for each
message of that session). Everything protocol-shaped is in `milter.protocol`; this module only moves
bytes, keeps time (idle timeout, SMFIR_PROGRESS while a message is decided) and hands complete
messages to the gateway. A peer that breaks the protocol is logged and disconnected: a milter stream
cannot resynchronise, and the MTA then applies its `milter_default_action` (tempfail, as documented).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from milter.gateway.logfmt import kv
from milter.gateway.process import TRIM_AFTER, trim_heap
from milter.protocol import codec
from milter.protocol.codec import ProtocolError
from milter.protocol.session import Close, Decide, Decision, FilterSession, Message, Send

log = logging.getLogger("milter.gateway.milter")

Decider = Callable[[Message], Awaitable[Decision]]
Tracker = Callable[[Awaitable[Decision]], "asyncio.Task[Decision]"]

#: Commands handled per turn of the event loop, and bytes decoded at a time. One socket read (256 KiB)
#: can hold 50,000 packets; decoded and handled in one go, they held every other connection of the
#: worker for a third of a second or more.
COMMANDS_PER_TURN = 64
DECODE_SLICE = 4096


@dataclass(frozen=True)
class MilterSettings:
    """Two timers, as libmilter has one long one: the MTA shows a filter nothing while its SMTP client
    uploads a message (Postfix sends the headers only once the whole message is in its queue file),
    authenticates or pauses, so a healthy connection can be silent between packets for as long as an
    SMTP transaction takes. Closing it then makes the MTA apply milter_default_action (tempfail) to
    that message on every try. What cannot be healthy gets the short timer: a packet begun and not
    finished (one dribbled a byte at a time), a message whose headers and body stop before its end (the
    MTA streams them from its queue file), an MTA that does not read our replies, and a connection that
    has not sent its first packet."""

    max_size: int  # bytes of a message kept; past it the message is refused with 552 (0: no limit)
    idle_timeout: float  # seconds without a packet between packets (server.milter_timeout)
    progress_interval: float  # seconds between SMFIR_PROGRESS packets while a message is decided
    # seconds for a packet begun, replies the MTA does not read, or the first packet (server.command_timeout)
    packet_timeout: float = 300.0


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
        self._unread = bytearray()  # received, not yet decoded: at most one socket read
        self._queue: collections.deque[codec.Command] = collections.deque()
        self._busy = False
        self._write_paused = False  # the MTA is not reading our replies: take no more commands
        self._later: asyncio.Handle | None = None  # the rest of the queue, on the next turn
        self._idle: asyncio.TimerHandle | None = None
        self._idle_after = 0.0  # the running timer's seconds
        self._heard = False  # until the first whole packet, the short timer applies
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
        self._unread += data
        self._run()

    def pause_writing(self) -> None:
        # Replies pile up unread: stop taking commands (and reading) until the MTA catches up, or
        # our write buffer grows with every command it pipelines; it has the short timer to do so.
        self._write_paused = True
        self._arm_idle()
        self._sync_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._arm_idle()
        self._run()

    def eof_received(self) -> bool:
        """The MTA closed its side. Inside a packet that is a broken peer: logged and counted like any
        other protocol error. Either way our side closes too (False)."""
        # Reading resumes only once every byte received is decoded, so the decoder holds the rest.
        if self._decoder.buffered:
            self._drop(f"connection closed inside a packet ({self._decoder.buffered} bytes of it received)")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        if self._later is not None:
            self._later.cancel()
        if self._on_close is not None:
            self._on_close(self)
            self._on_close = None

    # -- the conversation --------------------------------------------------------------------------

    def _run(self) -> None:
        """Handle queued commands until one needs a decision (handled in a task), none is left, the
        MTA stops reading our replies, or this turn's share of the event loop is used up."""
        if self._later is not None:
            self._later.cancel()
            self._later = None
        budget = COMMANDS_PER_TURN
        while not self._busy and not self._write_paused and self._open():
            assert self.transport is not None
            if not self._queue and not self._decode():
                break
            if budget == 0:
                self._later = asyncio.get_running_loop().call_soon(self._run)
                break
            budget -= 1
            command = self._queue.popleft()
            try:
                outcome = self._session.handle(command)
            except ProtocolError as exc:
                self._drop(f"protocol error: {exc}")
                return
            if self._wanted_timeout() != self._idle_after:
                self._arm_idle()  # headers began (the rest follows at once), or an abort ended them
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
                    self._answering = asyncio.ensure_future(self._answer(message))
                case Close(reason):
                    log.debug(kv("milter_close", peer=self.peer, reason=reason))
                    self.transport.close()
        self._sync_reading()

    def _decode(self) -> bool:
        """Decode received bytes, a slice at a time, until a command is queued; False if none is."""
        while self._unread and not self._queue:
            piece = bytes(self._unread[:DECODE_SLICE])
            del self._unread[:DECODE_SLICE]
            try:
                commands = self._decoder.feed(piece)
            except ProtocolError as exc:
                self._drop(f"protocol error: {exc}")
                return False
            if commands:
                # Only a whole packet counts as activity: a packet dribbled a byte at a time must
                # not hold the connection (and a session slot) beyond command_timeout.
                self._queue.extend(commands)
                self._heard = True
                self._arm_idle()
            elif self._decoder.buffered and self._idle_after != self._settings.packet_timeout:
                self._arm_idle()  # a packet begun: it has the short timer, once (bytes do not renew it)
        return bool(self._queue)

    def _sync_reading(self) -> None:
        """Bounded memory: read more only when every command read so far is handled, no message is
        being decided and the MTA reads our replies. (pause/resume_reading are idempotent.)"""
        if not self._open():
            return
        assert self.transport is not None
        if self._busy or self._write_paused or self._queue or self._unread:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

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
        big = message.size > TRIM_AFTER
        del message  # the last reference to the message: what it held can go back to the OS now
        if big:
            trim_heap()  # as the SMTP path does (Processor.handle): glibc would keep the heap it grew
        self._busy = False
        if self._open():
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
        self._unread.clear()
        if self.transport is not None:
            self.transport.abort()

    # -- idle timeout ------------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        """The timer for what the connection is waiting on now (MilterSettings says which is which);
        none while a message is decided (progress packets keep the MTA waiting then)."""
        self._disarm_idle()
        if self._busy:
            return
        self._idle_after = self._wanted_timeout()
        self._idle = asyncio.get_running_loop().call_later(self._idle_after, self._timed_out)

    def _wanted_timeout(self) -> float:
        short = (self._write_paused or bool(self._decoder.buffered) or not self._heard
                 or self._session.streaming)
        return self._settings.packet_timeout if short else self._settings.idle_timeout

    def _disarm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _timed_out(self) -> None:
        log.info(kv("milter_timeout", peer=self.peer, after=self._idle_after))
        if self.transport is not None:
            if self.transport.get_write_buffer_size():
                # Replies the MTA never read: close() would wait for them, and keep the session.
                self.transport.abort()
            else:
                self.transport.close()


class Refused(asyncio.Protocol):
    """A connection over the session limit: closed at once (the MTA applies milter_default_action)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
