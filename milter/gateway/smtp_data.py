"""An SMTP DATA transfer read into one buffer, by aiosmtpd's rules (for `GatewaySMTP.smtp_DATA`).

aiosmtpd's `SMTP.smtp_DATA` reads DATA a line at a time and keeps every line as a bytearray of its own
until the end: a 9 MB message of 3 million short lines took a worker to 850 MiB, and the heap those
millions of small objects fragmented stayed with the process (docs/soak.md, "Memory over 20 minutes").
Here the transfer is taken from the stream reader in pieces as large as the socket delivers them,
checked a piece at a time with bytes methods (which run in C), and kept dot-unstuffed in one
bytearray. What is kept, what is refused and with which reply are aiosmtpd's (1.4.6), line for line:

* the end is a line `.` alone, that is `.<CRLF>` right after a CRLF (or first); a bare LF or CR ends
  nothing and is content;
* a line's leading dot is removed (RFC 5321 4.5.2);
* past `data_size_limit` bytes as received (stuffing dots and CRLFs counted, the end line not) the
  message is refused with 552, a line longer than `line_length_limit` (its CRLF counted) with 500;
  the reply comes once the end line has been read, and of the two limits the one that a line-by-line
  reader meets first wins (a line over the stream reader's limit before its bytes are counted);
* once refused, nothing more is kept.
"""

from __future__ import annotations

import asyncio

CRLF = b"\r\n"
END = b".\r\n"
#: aiosmtpd's replies for its limits; `GatewaySMTP.push` rewrites and logs them.
TOO_MUCH = "552 Error: Too much mail data"
TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
#: Raw bytes gathered before they are checked and kept: big enough that short lines are handled by the
#: ten thousand, small enough that the list of one piece's lines stays small.
PIECE = 64 * 1024


class DataBuffer:
    """The content of one DATA transfer, fed the raw stream in consecutive pieces (without its end line)."""

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self.content = bytearray()  # dot-unstuffed, complete lines only
        self.refused: str | None = None  # aiosmtpd's reply, once a limit cut in
        self._size_limit = size_limit or 0
        # aiosmtpd's stream reader has this limit too: a longer line is refused before it is counted.
        self._line_limit = line_limit
        self._size = 0
        self._open = b""  # the start of a line whose CRLF has not come yet

    def feed(self, raw: bytes) -> None:
        if self.refused is not None:
            return
        data = self._open + raw
        last = data.rfind(CRLF)
        cut = last + 2 if last >= 0 else 0
        self._open = data[cut:]
        if cut:
            self._lines(data[:cut])
        if self.refused is None and len(self._open.removesuffix(b"\r")) > self._line_limit:
            self._refuse(TOO_LONG)  # not ended yet, already too long: no need to hold it

    def _lines(self, block: bytes) -> None:
        """Complete lines, the first starting a line."""
        lines = block.split(CRLF)
        lines.pop()  # the nothing after the last CRLF
        size = self._size + len(block)
        too_much = bool(self._size_limit) and size > self._size_limit
        if max(map(len, lines)) + 2 <= self._line_limit and not too_much:
            self._size = size
            self._keep(block)
            return
        for line in lines:  # a limit cuts in within this block: which, in aiosmtpd's order
            if len(line) > self._line_limit:
                return self._refuse(TOO_LONG)
            self._size += len(line) + 2
            if self._size_limit and self._size > self._size_limit:
                return self._refuse(TOO_MUCH)
            if len(line) + 2 > self._line_limit:
                return self._refuse(TOO_LONG)
        self._keep(block)

    def _keep(self, block: bytes) -> None:
        kept = block.replace(b"\r\n.", CRLF)  # the leading dot of every line but the first ...
        self.content += memoryview(kept)[1:] if kept[:1] == b"." else kept  # ... and of the first

    def _refuse(self, reply: str) -> None:
        self.refused = reply
        self.content = bytearray()
        self._open = b""


async def receive(reader: asyncio.StreamReader, body: DataBuffer) -> None:
    """Read a DATA transfer from `reader` into `body`, up to and including its end line; what follows
    it (pipelined commands) stays in the reader."""
    staged = bytearray()
    tail = CRLF  # the last two bytes read: the DATA command's line ended with CRLF
    while True:
        try:
            chunk = await reader.readuntil(END)
        except asyncio.LimitOverrunError as e:
            # No ".<CRLF>" within the reader's limit: take what it holds, except the bytes that could
            # be the start of one (the reader leaves those).
            chunk = await reader.read(e.consumed)
        else:
            before = chunk[-5:-3] if len(chunk) >= 5 else (tail + chunk[:-3])[-2:]
            if before == CRLF:
                staged += memoryview(chunk)[:-3]
                body.feed(bytes(staged))
                return
        staged += chunk
        tail = (tail + chunk[-2:])[-2:]
        if len(staged) >= PIECE:
            body.feed(bytes(staged))
            staged.clear()
