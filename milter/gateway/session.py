"""The SMTP session: aiosmtpd's `SMTP` plus XFORWARD, a DATA timeout, and clearer limit replies.

`XForwardSMTP` is the reusable part (XFORWARD in EHLO and as a command); `GatewaySMTP` adds what
the gateway needs: the DATA timeout, DATA read into one buffer (milter.gateway.smtp_data), holding
the idle timer while a message is processed, and a session counter for the concurrency limit.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
from collections.abc import Callable
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP, Session, syntax

from milter.gateway.logfmt import kv
from milter.gateway.smtp_data import DataBuffer, receive
from milter.gateway.xforward import ATTRIBUTES, XForward, XForwardError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# `<local@domain>` with a dot-atom local part and a plain domain, then optional ESMTP parameters.
_PLAIN_PATH = re.compile(r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                         r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:\s+(.*?))?\s*$")
# Postfix's own answer to an XFORWARD from a client not in smtpd_authorized_xforward_hosts.
XFORWARD_FORBIDDEN = "550 5.7.0 Error: insufficient authorization"

log = logging.getLogger("milter.gateway.session")
_aiosmtpd_log = logging.getLogger("mail.log")  # where aiosmtpd logs a connection lost during DATA

TOO_MANY_SESSIONS = "421 4.7.0 Too many connections, try again later"
TOO_BIG = "552 5.3.4 Message too big for system"
# RFC 5321 4.5.3.1.10: a client that gets it sends the other recipients in another transaction
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TIMEOUT_REPLY = "421 4.4.2 Timeout exceeded, closing connection"
LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
#: Without a message size limit, an unterminated DATA line is still refused past this many bytes.
DEFAULT_LINE_CAP = 25 * 1024 * 1024
# aiosmtpd's own replies for our limits, without enhanced status codes; rewritten (and logged) here.
_REWRITES: dict[bytes, tuple[str, str]] = {
    b"552 Error: Too much mail data": (TOO_BIG, "message_too_big"),
    b"552 Error: message size exceeds fixed maximum message size": (TOO_BIG, "declared_size_too_big"),
    b"500 Line too long (see RFC5321 4.5.3.1.6)": (LINE_TOO_LONG, "line_too_long"),
    b"500 Command line too long": ("500 5.5.2 Command line too long", "command_too_long"),
}


class XForwardSMTP(SMTP):
    """aiosmtpd SMTP that advertises and accepts Postfix's XFORWARD."""

    def __init__(
        self, handler: Any, *, xforward_hosts: tuple[IPNetwork, ...] | None = None, **kwargs: Any
    ) -> None:
        self.xforward = XForward()
        self._xforward_hosts = xforward_hosts  # None: every client may send XFORWARD
        super().__init__(handler, **kwargs)
        # aiosmtpd keeps these limits in a class-level dict that every session clears and bumps;
        # an instance dict keeps sessions from changing each other's limits.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.command_size_limits["MAIL"] += 26 + 10  # SIZE=... and SMTPUTF8 parameters

    def _set_post_data_state(self) -> None:
        # XFORWARD attributes describe one transaction: forget them after DATA, RSET, HELO/EHLO.
        super()._set_post_data_state()  # type: ignore[no-untyped-call]
        self.xforward = XForward()

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 Syntax: EHLO hostname")
            return
        self._set_rset_state()  # type: ignore[no-untyped-call]
        session = self._current_session()
        session.extended_smtp = True
        session.host_name = hostname
        lines = [f"250-{self.hostname}"]
        if self.data_size_limit:
            lines.append(f"250-SIZE {self.data_size_limit}")
        lines.append("250-8BITMIME")
        if self.enable_SMTPUTF8:
            lines.append("250-SMTPUTF8")
        if self._xforward_allowed():
            lines.append("250-XFORWARD " + " ".join(ATTRIBUTES))
        lines.append("250 HELP")
        await self.push("\r\n".join(lines))

    @syntax("XFORWARD attribute=value ...")
    async def smtp_XFORWARD(self, arg: str | None) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        if not self._xforward_allowed():
            log.warning(kv("xforward_refused", peer=self._peer_text(), reason="not in server.xforward_hosts"))
            await self.push(XFORWARD_FORBIDDEN)
            return
        envelope = self.envelope
        if envelope is not None and envelope.mail_from:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        try:
            self.xforward = self.xforward.updated(arg)
        except XForwardError as exc:
            log.info(kv("xforward_rejected", peer=self._peer_text(), reply=exc.reply))
            await self.push(exc.reply)
            return
        await self.push("250 2.0.0 Ok")

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's MAIL/RCPT address parser, with a fast path for the plain `<local@domain>` an MTA sends.

        aiosmtpd parses every address with the email package's RFC 5322 header parser, which was a tenth
        of a worker's time under load; anything not plainly `<dot-atom@domain>` still goes through it.
        """
        m = _PLAIN_PATH.match(arg)
        if m is None:
            return super()._getaddr(arg)  # type: ignore[no-any-return]
        addr = m.group(1)
        limit = self.local_part_limit
        if limit and len(addr.rpartition("@")[0]) > limit:
            return None, None
        return addr, m.group(2) or ""

    def _xforward_allowed(self) -> bool:
        if self._xforward_hosts is None:
            return True
        peer = self.session.peer if self.session is not None else None
        host = peer[0] if isinstance(peer, tuple) and peer else None
        try:
            ip = ipaddress.ip_address(str(host))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._xforward_hosts)

    def _current_session(self) -> Session:
        # A method, not a property: aiosmtpd's __init__ runs inspect.getmembers(self), which would
        # evaluate a property before any session exists.
        assert self.session is not None
        return self.session

    def _peer_text(self) -> str:
        peer = self.session.peer if self.session is not None else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{peer[0]}:{peer[1]}"
        return str(peer)


class GatewaySMTP(XForwardSMTP):
    """The gateway's session; `on_close` is called once when the connection ends.

    Front-end abuse it survives (tests/test_frontend_abuse.py): a DATA line that never ends is cut off
    at the message size limit, a client that pipelines commands without reading the replies is
    dropped at the command timeout, and pipelined commands give the event loop back after each reply.
    """

    def __init__(
        self, handler: Any, *, data_timeout: float, on_close: Callable[[], None], **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self._data_timeout = data_timeout
        self._on_close: Callable[[], None] | None = on_close
        self._line_cap = self.data_size_limit or DEFAULT_LINE_CAP
        self._in_data = False
        self._line_bytes = 0  # bytes received since the last CRLF, counted during DATA only
        self._after_cr = False

    def connection_lost(self, error: Exception | None) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        # aiosmtpd keeps every byte of a DATA line until its CRLF (even once the line is too long to
        # accept), so a line that never ended grew the worker by all the client sent until
        # data_timeout: 300 MB in one second on loopback. Past the size limit the message is refused
        # for its line anyway (the reply aiosmtpd would give at the end), so say so now and close.
        if self._in_data and self._unterminated(data) > self._line_cap:
            self._in_data = False
            log.info(kv("line_too_long", peer=self._peer_text(), reply=LINE_TOO_LONG, closed="yes"))
            if self.transport is not None and not self.transport.is_closing():
                assert isinstance(self.transport, asyncio.WriteTransport)
                self.transport.write(LINE_TOO_LONG.encode() + b"\r\n")
                self.transport.close()
            return
        super().data_received(data)

    def _unterminated(self, data: bytes) -> int:
        """Bytes of the current DATA line so far, this chunk included (a CRLF may span two chunks)."""
        end = data.rfind(b"\r\n")
        if end >= 0:
            self._line_bytes = len(data) - end - 2
        elif self._after_cr and data[:1] == b"\n":
            self._line_bytes = len(data) - 1
        else:
            self._line_bytes += len(data)
        self._after_cr = data.endswith(b"\r")
        return self._line_bytes

    def _timeout_cb(self) -> None:
        log.info(kv("session_timeout", peer=self._peer_text()))
        transport = self.transport
        if transport is not None and not transport.is_closing():
            # Best effort: tell the client why (RFC 5321 4.5.3.2 allows 421 before closing).
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(TIMEOUT_REPLY.encode() + b"\r\n")
            if transport.get_write_buffer_size():
                # The client is not reading its replies (it pipelined without reading): close() would
                # wait for them to be flushed, and so keep the session, forever.
                transport.abort()
                return
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def smtp_DATA(self, arg: str) -> None:
        # The command timeout was reset when DATA arrived; the whole transfer gets data_timeout.
        self._reset_timeout(self._data_timeout)
        self._line_bytes, self._after_cr, self._in_data = 0, False, True
        try:
            await self._data(arg)
        finally:
            self._in_data = False

    async def _data(self, arg: str) -> None:
        """aiosmtpd's `SMTP.smtp_DATA` (1.4.6), but the message is read into one buffer.

        aiosmtpd keeps every DATA line as an object of its own until the end of DATA, so a message of
        millions of short lines cost a worker hundreds of MiB and left its heap fragmented
        (docs/soak.md, "Memory over 20 minutes"); milter.gateway.smtp_data reads it by the same rules.
        Replies, envelope.content / original_content and the DATA hook are aiosmtpd's; only the
        deprecated `process_message` handler API is not offered (the gateway's handler has handle_DATA).
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        body = DataBuffer(self.data_size_limit, self.line_length_limit)
        try:
            await receive(self._reader, body)
        except asyncio.CancelledError:
            _aiosmtpd_log.info("Connection lost during DATA")
            self._writer.close()
            raise
        if body.refused is not None:
            await self.push(body.refused)
            self._set_post_data_state()
            return
        original = bytes(body.content)
        del body  # the message is held once from here on
        content: str | bytes = original
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")
                    return
        envelope.content = content
        envelope.original_content = original
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    def hold_timeout(self) -> None:
        """Stop the idle timer while the gateway itself works on a message (scan, relay)."""
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    def resume_timeout(self) -> None:
        if self.transport is not None:
            self._reset_timeout()

    async def push(self, status: AnyStr) -> None:
        raw = status.encode("ascii", "replace") if isinstance(status, str) else status
        rewrite = _REWRITES.get(raw)
        if rewrite is not None:
            reply, event = rewrite
            log.info(kv(event, peer=self._peer_text(), reply=reply))
            raw = reply.encode("ascii")
        await super().push(raw)
        # aiosmtpd takes pipelined commands from its buffer without returning to the event loop
        # (drain() does not yield while the socket takes the replies): one write of 32,000 EHLOs held
        # every other session of the worker for 2.4 s. One turn of the loop per reply shares it.
        await asyncio.sleep(0)
