"""The relay's DATA (milter.gateway.relay_data) against aiosmtplib's own `SMTP.data()`, on loopback sockets.

Every tricky message goes through `Downstream.deliver` (the gateway's path) to one listener and through
plain `aiosmtplib.SMTP.data()` to another of the same kind, and the two must receive the same thing:
an aiosmtpd sink (what a downstream MTA stores) and a raw wire recorder (every byte between the 354
and the end line). The faults check the retry boundary: a failure before the 354 to DATA on a reused
connection is retried once, any failure after it never is; a downstream's refusal passes back as
`passthrough` made it from `SMTP.data()`'s SMTPDataError before.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiosmtplib
import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from gateway_support import Sink

from milter.errors import DeliveryError
from milter.gateway.relay import Downstream, passthrough
from milter.gateway.relay_data import DataPayload, dot_stuff, normalize_line_endings
from milter.gateway.session import XForwardSMTP

SEED = 1313
SENDER, RCPT = "a@sender.test", "b@rcpt.test"
HEAD = b"From: a@sender.test\r\nTo: b@rcpt.test\r\nSubject: x\r\n\r\n"

CASES: dict[str, bytes] = {
    "dot-lines": HEAD + b".leading\r\n..two\r\n...three\r\nmiddle.\r\n.\r\nend\r\n",
    "lone-dot": HEAD + b".\r\n",
    "lone-dot-last-no-eol": HEAD + b"text\r\n.",
    "first-line-dot": b".first line\r\nSubject: x\r\n\r\nbody\r\n",
    "dot-dot-lines": b"\r\n..\r\n..\r\n...\r\n",
    "lone-dot-lines-bare-lf": b".\n" * 1000,
    "bare-lf": b"Subject: x\n\nline1\nline2\n.\n..\n",
    "bare-cr": b"Subject: x\r\rline1\rline2\r.\r..\r",
    "mixed": b"a\r\nb\nc\rd\r\r\ne\n\rf\r\n\n.\r\r.\n\r\r\n\n\r",
    "no-trailing-newline": HEAD + b"no newline at the end",
    "ends-in-cr": HEAD + b"ends in a CR\r",
    "only-crlf": b"\r\n",
    "empty": b"",
    "8bit": b"Subject: \xff\xfe\r\n\r\n\x80\x81\xc3\xa9\x00\x7f.\r\n.\xff\r\n\xff\r\xfe\n",
    "1mb-line": HEAD + b"y" * 1_000_000 + b"\r\n",
    "1mb-line-no-eol": HEAD + b"." + b"y" * 1_000_000,
    "300k-one-byte-lines": HEAD + b"a\n" * 300_000,
    "300k-one-byte-lines-crlf": HEAD + b"a\r\n" * 150_000 + b".\r\n" * 150_000,
}


def aiosmtplib_wire(raw: bytes) -> bytes:
    """What aiosmtplib's `execute_data_command` writes after the 354, from its own module's pieces."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(raw)) + b".\r\n"


# -- the encoding alone, against aiosmtplib's functions ------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_payload_is_aiosmtplib_s_bytes(name: str) -> None:
    raw = CASES[name]
    assert DataPayload.encode(raw).wire() == aiosmtplib_wire(raw)


def test_payload_random_streams_are_aiosmtplib_s_bytes() -> None:
    """Short random messages over the bytes that matter (CR, LF, ".", 8-bit): every pairing occurs."""
    rng = random.Random(SEED)
    atoms = (b"\r", b"\n", b"\r\n", b".", b"..", b"a", b"\xff", b"\x00", b" ")
    for _ in range(20_000):
        raw = b"".join(rng.choices(atoms, k=rng.randrange(0, 24)))
        assert DataPayload.encode(raw).wire() == aiosmtplib_wire(raw), raw


def test_a_normalised_message_without_leading_dots_is_not_copied() -> None:
    raw = HEAD + b"plain\r\nlines.\r\n" * 1000
    payload = DataPayload.encode(raw)
    assert payload.body is raw and payload.end == b".\r\n"
    assert normalize_line_endings(raw) is raw and dot_stuff(raw) is raw
    assert "body" not in repr(payload)  # a payload in a log line is not megabytes long


# -- a raw wire recorder -------------------------------------------------------------------------


@dataclass
class WireSink:
    """A minimal SMTP server that keeps, per message, the exact bytes after its 354 (end line included).

    `plan` says what to do at each DATA, in order (then "ok"): "ok"; "drop-at-data" (close instead of
    answering DATA); "drop-after-354" (read a little of the body, then close); "stall" (354, then read
    nothing more); "early-554" (354, read a little, answer 554, half-close, read to EOF)."""

    plan: list[str] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)
    connections: int = 0
    data_commands: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 wire.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-wire.test\r\n250 8BITMIME\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 Bye\r\n")
                    break
                elif verb == b"DATA":
                    if not await self._data(reader, writer):
                        break
                else:  # MAIL, RCPT, RSET, NOOP
                    writer.write(b"250 Ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Handle one DATA; False: the connection ends here."""
        self.data_commands += 1
        mode = self.plan.pop(0) if self.plan else "ok"
        if mode == "drop-at-data":
            return False
        writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        await writer.drain()
        if mode == "drop-after-354":
            await reader.read(65536)
            return False
        if mode == "stall":
            await asyncio.sleep(60)  # cancelled when the test's loop ends
            return False
        if mode == "early-554":
            await reader.read(65536)
            writer.write(b"554 5.3.4 Refused early\r\n")
            writer.write_eof()
            while await reader.read(1 << 20):  # to EOF: closing with unread data would send a RST
                pass
            return False
        # "\r\n" first: the end line of an empty body is the first line of the data.
        self.received.append((b"\r\n" + await reader.readuntil(b"\r\n.\r\n"))[2:])
        writer.write(b"250 2.0.0 Ok: queued\r\n")
        return True


@contextlib.asynccontextmanager
async def wire_sink(plan: list[str] | None = None) -> AsyncIterator[WireSink]:
    sink = WireSink(plan=list(plan or ()))
    server = await asyncio.start_server(sink.handle, "127.0.0.1", 0, limit=1 << 26)
    sink.port = int(server.sockets[0].getsockname()[1])
    try:
        yield sink
    finally:
        server.close()


class LongLineSMTP(XForwardSMTP):
    """aiosmtpd that takes the 1 MB line (its default refuses lines over 1001 bytes, as RFC 5321 may)."""

    line_length_limit = 1 << 22


class LongLineSink(Sink):
    smtp_class = LongLineSMTP


async def plain_data(port: int, raw: bytes) -> aiosmtplib.SMTPResponse:
    """The reference: the same message through aiosmtplib's own `SMTP.data()`."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False,
                             local_hostname="ref.test")
    await client.connect()
    try:
        await client.ehlo()
        await client.mail(SENDER)
        await client.rcpt(RCPT)
        return await client.data(raw)
    finally:
        client.close()


def downstream(port: int, timeout: float = 10.0) -> Downstream:
    return Downstream("127.0.0.1", port, timeout, "gw.test", size=1)  # one connection: reused


# -- the same bytes reach the downstream ---------------------------------------------------------


def test_wire_bytes_are_smtp_data_s() -> None:
    """Byte for byte on the socket, every case in turn over one reused connection."""

    async def main() -> None:
        async with wire_sink() as ours, wire_sink() as ref:
            ds = downstream(ours.port)
            try:
                for name, raw in CASES.items():
                    got = await ds.deliver(raw, SENDER, [RCPT])
                    assert got.code == 250, name
                    await plain_data(ref.port, raw)
                    assert ours.received[-1] == ref.received[-1] == aiosmtplib_wire(raw), name
            finally:
                await ds.close()
            assert ours.connections == 1 and ours.data_commands == len(CASES)

    asyncio.run(main())


def test_aiosmtpd_sink_stores_what_smtp_data_delivers() -> None:
    async def main() -> None:
        ours, ref = LongLineSink(), LongLineSink()
        ds = downstream(await ours.start())
        ref_port = await ref.start()
        try:
            for name, raw in CASES.items():
                assert (await ds.deliver(raw, SENDER, [RCPT])).code == 250, name
                assert (await plain_data(ref_port, raw)).code == 250, name
                assert ours.messages[-1].raw == ref.messages[-1].raw, name
        finally:
            await ds.close()
            await ours.stop()
            await ref.stop()
        assert len(ours.messages) == len(ref.messages) == len(CASES)

    asyncio.run(main())


# -- faults: the same outcomes as `SMTP.data()`, and the retry boundary at the 354 ----------------


def test_554_at_the_end_of_data_passes_back_as_before() -> None:
    async def main() -> None:
        sink = Sink()
        port = await sink.start()
        sink.behaviour.data_reply = "554 5.6.0 Content refused"
        ds = downstream(port)
        try:
            raw = HEAD + b"refuse me\r\n"
            with pytest.raises(aiosmtplib.SMTPDataError) as ref:
                await plain_data(port, raw)
            expected = passthrough(ref.value.code, ref.value.message, "message")
            with pytest.raises(DeliveryError) as got:
                await ds.deliver(raw, SENDER, [RCPT])
            assert (str(got.value), got.value.smtp_code, got.value.smtp_status, got.value.smtp_text) == (
                str(expected), expected.smtp_code, expected.smtp_status, expected.smtp_text)
            assert (got.value.smtp_code, got.value.smtp_status) == (554, "5.6.0")
            # as before: RSET, and the connection is reused for the next message
            sink.behaviour.data_reply = None
            assert (await ds.deliver(raw, SENDER, [RCPT])).code == 250
            assert [m.raw for m in sink.messages] == [raw]
        finally:
            await ds.close()
            await sink.stop()

    asyncio.run(main())


@pytest.mark.parametrize("size", [100, 4_000_000])
def test_drop_after_354_is_not_retried(size: int) -> None:
    """The connection is reused (a reused one is what a failure before the 354 retries), the downstream
    closes after its 354 (a 4 MB body: while the body is going out): 451, one DATA, no second copy."""

    async def main() -> None:
        async with wire_sink(["ok", "drop-after-354"]) as wire:
            ds = downstream(wire.port)
            try:
                first = HEAD + b"first\r\n"
                assert (await ds.deliver(first, SENDER, [RCPT])).code == 250
                with pytest.raises(DeliveryError) as exc:
                    await ds.deliver(HEAD + b"b" * size + b"\r\n", SENDER, [RCPT])
                assert (exc.value.smtp_code, exc.value.smtp_status) == (451, "4.4.1")
                assert (wire.connections, wire.data_commands) == (1, 2)
                assert wire.received == [first + b".\r\n"]
                # the broken connection was not pooled: the next message opens a fresh one
                assert (await ds.deliver(first, SENDER, [RCPT])).code == 250
                assert (wire.connections, wire.data_commands) == (2, 3)
            finally:
                await ds.close()

    asyncio.run(main())


def test_drop_before_354_on_a_reused_connection_is_retried_once() -> None:
    async def main() -> None:
        async with wire_sink(["ok", "drop-at-data"]) as wire:
            ds = downstream(wire.port)
            try:
                one, two = HEAD + b"one\r\n", HEAD + b"two\r\n"
                assert (await ds.deliver(one, SENDER, [RCPT])).code == 250
                assert (await ds.deliver(two, SENDER, [RCPT])).code == 250
                assert (wire.connections, wire.data_commands) == (2, 3)
                assert wire.received == [one + b".\r\n", two + b".\r\n"]  # each exactly once
            finally:
                await ds.close()

    asyncio.run(main())


def test_stalled_downstream_times_out_once_not_retried() -> None:
    """354, then the downstream reads nothing: the writes fill the socket buffers and flow control
    waits; the client's timeout still ends it (one DATA, a 451, in about the timeout)."""

    async def main() -> None:
        async with wire_sink(["ok", "stall"]) as wire:
            ds = downstream(wire.port, timeout=0.5)
            try:
                assert (await ds.deliver(HEAD + b"x\r\n", SENDER, [RCPT])).code == 250
                start = time.monotonic()
                with pytest.raises(DeliveryError) as exc:
                    await ds.deliver(HEAD + b"s" * 32_000_000 + b"\r\n", SENDER, [RCPT])
                assert time.monotonic() - start < 3
                assert exc.value.smtp_code == 451 and "SMTPReadTimeoutError" in str(exc.value)
                assert (wire.connections, wire.data_commands) == (1, 2)
            finally:
                await ds.close()

    asyncio.run(main())


def test_early_refusal_while_sending_passes_back_as_smtp_data_would() -> None:
    """The downstream answers 554 after 64 KiB of a 4 MB body and half-closes: `SMTP.data()` (whole
    message buffered, then the reply read) gets the 554, and so does the relay, which stops sending."""

    async def main() -> None:
        raw = HEAD + b"e" * 4_000_000 + b"\r\n"
        async with wire_sink(["early-554"]) as ref:
            with pytest.raises(aiosmtplib.SMTPDataError) as reference:
                await plain_data(ref.port, raw)
        expected = passthrough(reference.value.code, reference.value.message, "message")
        async with wire_sink(["early-554"]) as wire:
            ds = downstream(wire.port)
            try:
                with pytest.raises(DeliveryError) as got:
                    await ds.deliver(raw, SENDER, [RCPT])
                outcome = (got.value.smtp_code, got.value.smtp_status, got.value.smtp_text)
                assert outcome == (expected.smtp_code, expected.smtp_status, expected.smtp_text)
                assert outcome == (554, "5.3.4", "Refused early")
                assert (wire.connections, wire.data_commands) == (1, 1)
            finally:
                await ds.close()

    asyncio.run(main())
