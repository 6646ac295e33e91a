"""SMTP DATA to the downstream relay, without aiosmtplib's per-line passes.

Why not `aiosmtplib.SMTP.data()`: its `SMTPProtocol.execute_data_command` normalises line endings with
`LINE_ENDINGS_REGEX.sub` and dot-stuffs with `PERIOD_REGEX.sub`, and each builds one Python object per
line before joining them. A 9 MB message of 3 million one-byte lines took a gateway worker from 224 to
~790 MiB RSS and held its event loop for 1.17 s (docs/soak.md). It then hands the whole message to
the transport in one write, which copies whatever the socket does not take at once into the
transport's own buffer: a second copy of a large message.

Here the same bytes go out (byte for byte what `SMTP.data()` sends: bare LF and bare CR become CRLF,
a line starting with "." gets another ".", the body ends with CRLF, then ".\\r\\n"), built with bytes
methods (`count`, `replace`, `translate`: C loops, no per-line objects; time and memory linear in the
size, at most ~2x the wire size for a message that needs every pass). The usual message (CRLF
already, as the gateway received it, no line starting with ".") is not copied at all. The body is
written in pieces, waiting for the transport to drain between them, so the transport never holds
more than its high-water mark and one piece.

The SMTP side stays aiosmtplib's: `SMTP.execute_command(b"DATA")` for the 354, then
`SMTPProtocol.write` and `SMTPProtocol.read_response` for the body and its reply. The only private
name used is `SMTPProtocol._drain_helper`, the stdlib flow-control hook that aiosmtplib's protocol
implements for exactly this (what `asyncio.StreamWriter.drain` awaits). The errors are those of
`SMTP.data()`: `SMTPDataError` for a reply other than 354 / 250, `SMTPServerDisconnected`,
`SMTPReadTimeoutError`, and `SMTPResponseException` for a reply that is not SMTP; the client is closed
on every error but a refusal of the whole message (`SMTP.data()` closes it on the middle two). One
difference: a reply that comes before the whole message went out stops the sending (see `send_body`).

The two halves are separate calls so that the caller knows which side of the 354 a failure is on: before
it nothing of the message was sent (a retry cannot duplicate it), after it the message may have arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus

#: Bytes per transport write. The transport buffers what the socket does not take at once and asks
#: us to pause above its high-water mark (64 KiB by default): a piece about that size keeps the
#: buffered copy that small, and a 20 MB message still takes only ~300 writes.
PIECE = 64 * 1024
END_LINE = b".\r\n"
_CR_TO_LF = bytes.maketrans(b"\r", b"\n")


def normalize_line_endings(raw: bytes) -> bytes:
    """Bare LF and bare CR to CRLF, as aiosmtplib's `LINE_ENDINGS_REGEX` (`\\r\\n|\\n|\\r(?!\\n)`) does.

    Every line ending, whichever of the three it is, first becomes one LF, then every LF becomes CRLF.
    Replacing CRLF first keeps the regex's pairing: CRLF pairs cannot overlap, and a CR before a CRLF
    ("\\r\\r\\n") is a bare CR to both. Returns `raw` itself when every CR and LF is already in a CRLF."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") == crlf and raw.count(b"\r") == crlf:
        return raw  # every LF has its CR and every CR its LF: nothing to do, and no copy
    if b"\r" in raw:
        # translate: byte for byte, several times faster than replace for a one-byte swap
        raw = raw.replace(b"\r\n", b"\n").translate(_CR_TO_LF)
    return raw.replace(b"\n", b"\r\n")


def dot_stuff(body: bytes) -> bytes:
    """Another "." before every line that starts with one (RFC 5321 4.5.2), as aiosmtplib's
    `PERIOD_REGEX` (`(?m)^\\.`) does. `body` must be normalised: then a line starts at 0 or after LF."""
    if b"\n." in body:  # checked first: a scan costs no memory, a replace always copies
        body = body.replace(b"\n.", b"\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body


@dataclass(frozen=True)
class DataPayload:
    """A message as it goes on the wire after the 354: `body`, then `end` (the CRLF the body may lack,
    and the end line). Built only by `encode`, so a body here is always normalised and dot-stuffed."""

    body: bytes = field(repr=False)  # megabytes in a log line help nobody
    end: bytes

    @classmethod
    def encode(cls, raw: bytes) -> DataPayload:
        body = dot_stuff(normalize_line_endings(raw))
        # Kept apart rather than appended: appending would copy the whole body once more.
        end = END_LINE if body.endswith(b"\r\n") else b"\r\n" + END_LINE
        return cls(body, end)

    @property
    def size(self) -> int:
        return len(self.body) + len(self.end)

    def wire(self) -> bytes:
        """Everything after the 354 in one buffer (a copy: for tests and tools, not for sending)."""
        return self.body + self.end

    def body_pieces(self, size: int = PIECE) -> Iterator[bytes]:
        # A slice is a copy, but of one piece at a time and freed once written: a memoryview would
        # save those copies, yet aiosmtplib's `write` is typed (and documented) for bytes.
        for start in range(0, len(self.body), size):
            yield self.body[start : start + size]


async def start_data(client: aiosmtplib.SMTP) -> None:
    """Send DATA and require 354. Nothing of the message has been sent when this raises.

    `SMTP.execute_command` times the reply out with the client's timeout and closes the client on a
    disconnect or a timeout, as `SMTP.data()` does (and on a 421, which `SMTP.data()` leaves to the
    caller: the relay's RSET then fails and it closes the client anyway); any other reply is
    `SMTPDataError`, as there."""
    response = await client.execute_command(b"DATA")
    if response.code != SMTPStatus.start_input:
        raise aiosmtplib.SMTPDataError(response.code, response.message)


async def send_body(client: aiosmtplib.SMTP, payload: DataPayload) -> SMTPResponse:
    """After `start_data`: send the message and return the downstream's 250 for it.

    `client.timeout` bounds the whole of it, sending and the reply, as it bounds `SMTP.data()`'s
    reply wait (which starts once the whole message sits in the transport's buffer). A reply other
    than 250 is `SMTPDataError`. A reply that comes before the whole message went out (a downstream
    refusing it early, then usually closing) ends the sending; the client is then closed, since where
    the downstream stands in the DATA stream is unknown, and such a reply that is a 250 is treated as
    a lost connection: the end line was never sent, so the message cannot have been accepted."""
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        try:
            async with asyncio.timeout(client.timeout):
                response, complete = await _exchange(protocol, payload)
        except TimeoutError as exc:
            raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc
    except BaseException:
        # Lost, timed out, cancelled, or a reply aiosmtplib cannot parse (SMTPResponseException, which
        # leaves its read buffer unconsumed): part of a message may sit in the downstream's DATA state,
        # so this connection cannot be reused, whatever the error.
        client.close()
        raise
    if not complete:
        client.close()
        if response.code == SMTPStatus.completed:
            raise aiosmtplib.SMTPServerDisconnected(
                f"downstream answered {response.code} before the end of the message"
            )
    if response.code != SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


async def _exchange(protocol: SMTPProtocol, payload: DataPayload) -> tuple[SMTPResponse, bool]:
    """Write the payload with flow control while waiting for the reply: (reply, whether all was sent)."""
    # The reply is awaited from before the first byte goes out: aiosmtplib's protocol keeps incoming
    # data only while a read is pending (it drops "unsolicited" data otherwise), and a downstream may
    # answer, then close, while the body is still going out. `SMTP.data()` is safe here because it
    # writes everything and reads at once; we write over many loop iterations.
    reply = asyncio.ensure_future(protocol.read_response(timeout=None))  # the caller's deadline bounds it
    complete = False
    try:
        await asyncio.sleep(0)  # let `read_response` start (arm the protocol) before we write
        # A failed write or drain means the connection is gone: connection_lost has given (or is about
        # to give) `reply` its outcome, an early reply or SMTPServerDisconnected.
        with contextlib.suppress(aiosmtplib.SMTPServerDisconnected, OSError):
            for piece in payload.body_pieces():
                if reply.done():  # answered early: stop sending, take the answer
                    break
                protocol.write(piece)
                # Returns at once unless the transport's buffer is over its high-water mark.
                await protocol._drain_helper()
            else:
                if not reply.done():
                    protocol.write(payload.end)
                    # Handed over: from here a 250 means delivered, whatever happens to the socket.
                    complete = True
        return await reply, complete
    finally:
        if not reply.done():
            reply.cancel()
        elif not reply.cancelled():
            reply.exception()  # mark it retrieved: no "exception was never retrieved" at exit
