"""GatewaySMTP's DATA (one buffer, milter.gateway.smtp_data) against aiosmtpd's own, on loopback sockets.

Every test talks SMTP over a real socket to a listening `GatewaySMTP`; most send the same bytes, split
the same way, to a plain aiosmtpd `SMTP` too, and require the same reply (up to the gateway's rewording
of the limit replies) and the same envelope.content / original_content. Seeded random streams mix
dot-stuffed lines, bare LF and CR, 8-bit bytes, lines around the line-length limit and size limits
around the message's size, sent in random pieces so that CRLFs and end lines are split across reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from milter.gateway.session import LINE_TOO_LONG, TIMEOUT_REPLY, TOO_BIG, GatewaySMTP
from milter.gateway.smtp_data import PIECE

SEED = 1313
LINE_LIMIT = SMTP.line_length_limit  # 1001: content 999 + CRLF is the longest line taken
# aiosmtpd's replies for its limits, as the gateway words them (session._REWRITES).
REWORDED = {
    "552 Error: Too much mail data": TOO_BIG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": LINE_TOO_LONG,
}
_END_LINE = re.compile(rb"(?:^|\r\n)\.\r\n")


class Capture:
    """A DATA hook that keeps what aiosmtpd (or the gateway's override) hands it."""

    def __init__(self) -> None:
        self.got: list[tuple[str | bytes | None, bytes | None]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.got.append((envelope.content, envelope.original_content))
        return "250 2.0.0 Ok"


Factory = Callable[[Capture], SMTP]


def gateway_smtp(size_limit: int | None = None, data_timeout: float = 30.0, **options: Any) -> Factory:
    def make(handler: Capture) -> SMTP:
        return GatewaySMTP(
            handler, data_timeout=data_timeout, on_close=lambda: None, data_size_limit=size_limit,
            hostname="gw.test", loop=asyncio.get_running_loop(), **({"enable_SMTPUTF8": True} | options),
        )

    return make


def aiosmtpd_smtp(size_limit: int | None = None, **options: Any) -> Factory:
    def make(handler: Capture) -> SMTP:
        return SMTP(handler, data_size_limit=size_limit, hostname="ref.test", loop=asyncio.get_running_loop(),
                    **({"enable_SMTPUTF8": True} | options))

    return make


@contextlib.asynccontextmanager
async def listening(factory: Factory) -> AsyncIterator[tuple[int, Capture]]:
    handler = Capture()
    server = await asyncio.get_running_loop().create_server(lambda: factory(handler), "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), handler
    finally:
        server.close()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        client = cls(*await asyncio.open_connection("127.0.0.1", port, limit=1 << 20))
        assert (await client.reply()).startswith("220")
        return client

    async def reply(self, wait: float = 30.0) -> str:
        """The last line of the next reply ('' at EOF)."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), wait)
            if not line or line[3:4] != b"-":
                return line.decode("ascii", "replace").rstrip("\r\n")

    async def command(self, line: bytes) -> str:
        self.writer.write(line + b"\r\n")
        return await self.reply()

    async def send(self, pieces: Sequence[bytes]) -> None:
        for piece in pieces:
            self.writer.write(piece)
            await self.writer.drain()
            if len(pieces) > 1:
                await asyncio.sleep(0.002)  # a read of its own on the server side, most of the time

    async def start_data(self) -> None:
        assert (await self.command(b"EHLO client.test")).startswith("250")
        assert (await self.command(b"MAIL FROM:<alice@sender.test>")).startswith("250")
        assert (await self.command(b"RCPT TO:<bob@rcpt.test>")).startswith("250")
        assert (await self.command(b"DATA")).startswith("354")

    def close(self) -> None:
        self.writer.close()


async def transfer(port: int, pieces: Sequence[bytes]) -> str:
    """One message's DATA, sent in `pieces` (the end line included); the reply to it."""
    client = await Client.connect(port)
    try:
        await client.start_data()
        await client.send(pieces)
        return await client.reply()
    finally:
        client.close()


def split(stream: bytes, rng: random.Random, cuts: int) -> list[bytes]:
    points = sorted({rng.randrange(1, len(stream)) for _ in range(cuts)} if len(stream) > 1 else set())
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


@dataclass(frozen=True)
class Result:
    reply: str
    got: list[tuple[str | bytes | None, bytes | None]]


async def both(
    pieces: Sequence[bytes], size_limit: int | None = None, **options: Any
) -> tuple[Result, Result]:
    """The same transfer to the gateway's session and to aiosmtpd's: (gateway, aiosmtpd)."""
    results = []
    for factory in (gateway_smtp(size_limit, **options), aiosmtpd_smtp(size_limit, **options)):
        async with listening(factory) as (port, handler):
            reply = await transfer(port, pieces)
            results.append(Result(reply, handler.got))
    return results[0], results[1]


def assert_same(gw: Result, ref: Result) -> None:
    assert gw.reply == REWORDED.get(ref.reply, ref.reply)
    assert gw.got == ref.got


# -- streams -------------------------------------------------------------------------------------------


def random_line(rng: random.Random, long_share: float) -> bytes:
    kind = rng.random()
    if kind < long_share:  # around the line-length limit: 999 fits, 1000-1001 refused, 1002+ by the reader
        return bytes([rng.choice(b".ab")]) * rng.randrange(LINE_LIMIT - 3, LINE_LIMIT + 3)
    if kind < 0.3:
        return rng.choice([b"", b".", b"..", b"...", b".x", b"x.", b". ", b" .", b"a\nb", b"\n.", b".\n",
                           b"a\rb", b"\r", b"\n", b"\r.", b"\xc3\xa9t\xc3\xa9", b"\xff\xfe", b"\x00"])
    return bytes(rng.randrange(32, 127) for _ in range(rng.randrange(0, 80)))


def random_body(rng: random.Random, lines: int, long_share: float) -> bytes:
    """Raw DATA content, ending in CRLF, with no end line in it: lines ended by CRLF, now and then by a
    bare LF or CR (so that they run on)."""
    parts = []
    for _ in range(lines):
        parts.append(random_line(rng, long_share))
        parts.append(rng.choices([b"\r\n", b"\n", b"\r"], [0.9, 0.05, 0.05])[0])
    body = b"".join(parts) + b"\r\n"
    while (m := _END_LINE.search(body)) is not None:  # "." alone would end the message early
        body = body[: m.end() - 3] + b"." + body[m.end() - 3 :]
    return body


# -- tests ---------------------------------------------------------------------------------------------


def test_dot_stuffed_lines_come_back_unstuffed_byte_exact() -> None:
    wire = (b"..\r\n...\r\n.x\r\n..x\r\nx.\r\n\r\n.\n\r\n. \r\n.\r.\r\n a\r\n..\r\n"
            b"\xc3\xa9\r\n.\xff\r\n")
    unstuffed = b".\r\n..\r\nx\r\n.x\r\nx.\r\n\r\n\n\r\n \r\n\r.\r\n a\r\n.\r\n\xc3\xa9\r\n\xff\r\n"
    gw, ref = asyncio.run(both([wire + b".\r\n"]))
    assert gw.got == [(unstuffed, unstuffed)]
    assert gw.reply == "250 2.0.0 Ok"
    assert_same(gw, ref)
    # The same, one byte at a time: every CRLF, stuffing dot and the end line split across reads.
    gw, _ = asyncio.run(both([bytes([b]) for b in wire + b".\r\n"]))
    assert gw.got == [(unstuffed, unstuffed)]


def test_a_message_of_200000_short_lines_arrives_intact() -> None:
    lines = [b"." * (i % 3) + str(i).encode() for i in range(200_000)]  # a third of them stuffed on the wire
    wire = b"".join(b"." + line + b"\r\n" if line[:1] == b"." else line + b"\r\n" for line in lines)
    expected = b"".join(line + b"\r\n" for line in lines)

    async def run() -> tuple[str, list[tuple[str | bytes | None, bytes | None]]]:
        async with listening(gateway_smtp()) as (port, handler):
            pieces = [wire[i : i + 100_000] for i in range(0, len(wire), 100_000)]
            reply = await transfer(port, [*pieces, b".\r\n"])
            return reply, handler.got

    reply, got = asyncio.run(run())
    assert reply == "250 2.0.0 Ok"
    assert len(got) == 1 and got[0][1] == expected and got[0][0] is got[0][1]


@pytest.mark.parametrize(
    "wire",
    [
        b".\r\n",  # no content at all
        b"\r\n.\r\n",  # one empty line
        b"a\n.\r\nb\r\n.\r\n",  # "." after a bare LF is content, not the end
        b"a\r.\r\nb\r\n.\r\n",  # nor after a bare CR
        b"a\n.\n\r\n.\r\n",
        b"x\r\r\n.\r\n",  # CR CR LF: the line ends at the CRLF, then the end
        b"line one\nline two\rline three\r\n..\n\r\n.\r\n",
        b"x.\r\n.\r\n",  # a line ending in a dot, then the end
        b"x\r\n.\r\nRSET\r\n",  # what follows the end line is the next command
    ],
)
def test_crlf_bare_lf_and_bare_cr_as_aiosmtpd_has_them(wire: bytes) -> None:
    rng = random.Random(SEED)
    for pieces in ([wire], [bytes([b]) for b in wire], split(wire, rng, 3)):
        assert_same(*asyncio.run(both(pieces)))


@pytest.mark.parametrize(
    ("content", "size_limit", "reply"),
    [
        (999, None, "250 2.0.0 Ok"),  # 999 + CRLF = 1001: the longest line taken
        (1000, None, LINE_TOO_LONG),
        (1002, None, LINE_TOO_LONG),  # past the stream reader's limit too
        (999, 1500, TOO_BIG),  # the line that passes the size limit is refused for size
        (1000, 1500, TOO_BIG),  # ... also when it is too long (aiosmtpd counts bytes first)
        (1002, 1500, LINE_TOO_LONG),  # ... unless the reader refused it before it was counted
    ],
)
def test_which_limit_a_line_meets_first(content: int, size_limit: int | None, reply: str) -> None:
    wire = b"a" * 600 + b"\r\n" + b"b" * content + b"\r\n.\r\n"
    gw, ref = asyncio.run(both([wire], size_limit))
    assert gw.reply == reply
    assert_same(gw, ref)


@pytest.mark.parametrize(
    "options", [{}, {"decode_data": True}, {"decode_data": True, "enable_SMTPUTF8": False}]
)
def test_random_streams_as_aiosmtpd_reads_them(options: dict[str, Any]) -> None:
    rng = random.Random(f"{SEED}{sorted(options.items())}")
    outcomes: set[str] = set()

    async def run() -> None:
        for case in range(60):
            big = case % 10 == 0  # several PIECEs of short lines
            body = random_body(rng, rng.randrange(3000, 6000), 0.0002) if big else \
                random_body(rng, rng.randrange(1, 40), 0.03)
            longest = max(len(line) for line in body.split(b"\r\n"))
            size_limit = None
            if rng.random() < 0.5:  # around the body's size, above the cut of an unended line
                size_limit = max(int(len(body) * rng.uniform(0.6, 1.3)), longest + 100)
            pieces = split(body + b".\r\n", rng, rng.randrange(0, 12))
            gw, ref = await both(pieces, size_limit, **options)
            assert_same(gw, ref)
            outcomes.add(gw.reply[:3])

    asyncio.run(run())
    assert outcomes >= {"250", "552", "500"}, outcomes  # the streams reached every outcome


def test_a_body_larger_than_a_piece_with_stuffing_on_every_boundary() -> None:
    line = b"." + b"y" * 98 + b"\r\n"  # 101 bytes on the wire; PIECE is not a multiple of it
    count = 3 * PIECE // len(line)
    gw, ref = asyncio.run(both([line * count + b".\r\n"]))
    assert gw.got == [(line[1:] * count,) * 2]
    assert_same(gw, ref)


def test_oversize_is_refused_after_the_end_and_the_session_goes_on() -> None:
    async def run() -> None:
        async with listening(gateway_smtp(size_limit=10_000)) as (port, handler):
            client = await Client.connect(port)
            await client.start_data()
            await client.send([b"0123456789" * 10 + b"\r\n"] * 300)  # 30,600 bytes
            with pytest.raises(TimeoutError):  # no reply before the end of DATA (RFC 5321 4.2.5)
                await client.reply(wait=0.5)
            await client.send([b".\r\n"])
            assert await client.reply() == TOO_BIG
            await client.start_data()  # the session goes on
            await client.send([b"small\r\n.\r\n"])
            assert await client.reply() == "250 2.0.0 Ok"
            client.close()
            assert [original for _, original in handler.got] == [b"small\r\n"]

    asyncio.run(run())


def test_a_long_line_is_refused_at_the_end_and_an_unending_one_at_the_cap() -> None:
    async def run() -> None:
        async with listening(gateway_smtp(size_limit=64 * 1024, data_timeout=60)) as (port, handler):
            client = await Client.connect(port)
            await client.start_data()
            await client.send([b"x" * 5000 + b"\r\n", b".\r\n"])
            assert await client.reply() == LINE_TOO_LONG
            assert await client.command(b"RSET") == "250 OK"
            await client.start_data()
            # No CRLF: past the cut (the size limit) the session is answered and closed, long before
            # the DATA timeout. The reply may be lost: closing with our bytes unread, the server resets.
            with contextlib.suppress(ConnectionError):
                await client.send([b"y" * 16_384] * 12)
            with contextlib.suppress(ConnectionError):
                assert await client.reply(wait=10) in (LINE_TOO_LONG, "")
                assert await client.reply(wait=10) == ""  # EOF
            client.close()
            assert handler.got == []

    asyncio.run(run())


def test_a_stalled_transfer_ends_at_the_data_timeout() -> None:
    async def run() -> None:
        async with listening(gateway_smtp(data_timeout=0.5)) as (port, handler):
            client = await Client.connect(port)
            await client.start_data()
            await client.send([b"half a message\r\n"])
            assert await client.reply(wait=10) == TIMEOUT_REPLY
            assert await client.reply() == ""
            client.close()
            assert handler.got == []

    asyncio.run(run())


def test_commands_pipelined_after_the_end_line_are_answered() -> None:
    async def run() -> None:
        async with listening(gateway_smtp()) as (port, handler):
            client = await Client.connect(port)
            await client.start_data()
            await client.send([b"one\r\n.\r\nMAIL FROM:<c@sender.test>\r\nRCPT TO:<d@rcpt.test>\r\nDATA\r\n"
                               b"two\r\n.\r\nQUIT\r\n"])
            replies = [await client.reply() for _ in range(6)]
            client.close()
            assert [r[:3] for r in replies] == ["250", "250", "250", "354", "250", "221"]
            assert [original for _, original in handler.got] == [b"one\r\n", b"two\r\n"]

    asyncio.run(run())
