"""Fuzzing the milter protocol layer.

* In process: `Decoder` + `FilterSession` over at least 100,000 seeded cases -- valid conversations
  built from real packets, then mutated (byte flips, truncation, reordering, duplicated and dropped
  packets, random command bytes, length prefixes of 0, 2**32-1 and others, inserted garbage), and pure
  garbage -- fed in random-sized slices. The only exception allowed out is ProtocolError; the decoder
  never holds more than one packet; every Decide can be answered with `decided`.
* On sockets: a real in-process Gateway with a milter listener gets hundreds of bad connections;
  each is closed by the gateway and logged, no session is left behind, and a valid conversation
  afterwards still gets its end-of-message replies.

A failing in-process case names its seed and index: MILTER_FUZZ_SEED / MILTER_FUZZ_CASES rerun it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from gateway_support import REJECT_DOMAIN, config_for, load_scanner, open_store

from milter.gateway.server import Gateway
from milter.protocol import codec
from milter.protocol import constants as c
from milter.protocol.codec import Decoder, ProtocolError, encode
from milter.protocol.session import Close, Decide, Decision, FilterSession, Send

SEED = int(os.environ.get("MILTER_FUZZ_SEED", "1729"))
CASES = int(os.environ.get("MILTER_FUZZ_CASES", "100000"))
#: The decoder holds at most one incomplete packet: its 4-byte length and up to MAX_PACKET bytes.
MAX_BUFFERED = c.MAX_PACKET + 4

Packets = list[bytes]


def pkt(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + code + data


def z(*parts: bytes) -> bytes:
    return b"".join(p + b"\0" for p in parts)


def optneg(version: int = 6, actions: int = 0x1FF, steps: int = 0x1FFFFF) -> bytes:
    return pkt(b"O", struct.pack("!III", version, actions, steps))


def macros(stage: bytes, *pairs: bytes) -> bytes:
    return pkt(b"D", stage + z(*pairs))


def connect(host: bytes = b"mx.client.test", family: bytes = b"4", port: int = 40000,
            address: bytes = b"192.0.2.1") -> bytes:
    if family == b"U":
        return pkt(b"C", z(host) + b"U")
    return pkt(b"C", z(host) + family + struct.pack("!H", port) + z(address))


def header(name: bytes, value: bytes) -> bytes:
    return pkt(b"L", z(name, value))


# -- conversations ----------------------------------------------------------------------------------

_WORDS = (b"alice", b"bob", b"carol", b"x", b"caf\xc3\xa9", b"\xff\xfe", b"a b", b"")


@dataclass
class Conversation:
    packets: Packets
    messages: int  # end-of-message packets: the decisions an unmutated run must produce


def conversation(rng: random.Random) -> Conversation:
    """A valid conversation as Postfix or sendmail could send it: the offer, one or two SMTP sessions
    (QUIT_NC between them) of 1-3 messages each, some aborted, then QUIT."""
    if rng.random() < 0.5:
        actions, steps = 0x1FF, 0x1FFFFF
    else:
        actions, steps = rng.getrandbits(9), rng.getrandbits(21)
    out: Packets = [optneg(rng.randint(2, 6), actions, steps)]
    count = 0
    for n in range(rng.choice((1, 1, 2))):  # SMTP sessions, QUIT_NC between them
        if n:
            out.append(pkt(b"K"))
        out.append(macros(b"C", b"j", b"mx.test", b"{daemon_name}", rng.choice(_WORDS)))
        family = rng.choice((b"4", b"6", b"L", b"U"))
        out.append(connect(rng.choice(_WORDS) or b"unknown", family, rng.randrange(65536),
                           b"2001:db8::1" if family == b"6" else b"192.0.2.7"))
        if rng.random() < 0.8:
            out.append(pkt(b"H", z(rng.choice(_WORDS))))
        for _ in range(rng.randint(1, 3)):
            out.append(macros(b"M", b"i", b"Q" + str(rng.randrange(999)).encode(), b"{auth_authen}",
                              rng.choice(_WORDS)))
            out.append(pkt(b"M", z(b"<" + rng.choice(_WORDS) + b"@sender.test>", b"BODY=8BITMIME")))
            for _ in range(rng.randint(1, 3)):
                out.append(pkt(b"R", z(b"<" + rng.choice(_WORDS) + b"@rcpt.test>")))
            if rng.random() < 0.3:
                out.append(pkt(b"T"))
            for _ in range(rng.randint(0, 6)):
                value = b" " + b"\n\t".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))
                out.append(header(rng.choice((b"Subject", b"From", b"X-Y", b"Received")), value))
            if rng.random() < 0.3:
                out.append(pkt(b"N"))
            for _ in range(rng.randint(0, 4)):
                out.append(pkt(b"B", rng.randbytes(rng.choice((0, 1, 17, 300, 2000)))))
            if rng.random() < 0.15:
                out.append(pkt(b"A"))  # the MTA aborted this one
                continue
            if rng.random() < 0.1:
                out.append(pkt(b"U", z(b"XYZZY")))
            out.append(macros(b"E", b"i", b"Q1"))
            out.append(pkt(b"E", rng.choice((b"", b"last piece\r\n"))))
            count += 1
    out.append(pkt(b"Q"))
    return Conversation(out, count)


_LENGTHS = (0, 1, 0xFFFFFFFF, 0x80000000, c.MAX_PACKET + 1, c.MAX_PACKET, 0x00FFFFFF, 5)


def mutate(rng: random.Random, packets: Packets) -> bytes:
    """One to three mutations: structural ones on the packet list, then byte-level ones on the stream."""
    packets = list(packets)
    byte_level: list[str] = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(("flip", "truncate", "reorder", "swap", "duplicate", "drop", "command",
                           "length", "garbage", "prepend"))
        i = rng.randrange(len(packets))
        if kind == "reorder":
            j = rng.randrange(i, len(packets)) + 1
            window = packets[i:j]
            rng.shuffle(window)
            packets[i:j] = window
        elif kind == "swap":
            j = rng.randrange(len(packets))
            packets[i], packets[j] = packets[j], packets[i]
        elif kind == "duplicate":
            packets.insert(rng.randrange(len(packets) + 1), packets[i])
        elif kind == "drop" and len(packets) > 1:
            del packets[i]
        elif kind == "command":
            p = packets[i]
            packets[i] = p[:4] + bytes([rng.randrange(256)]) + p[5:]
        elif kind == "length":
            p = packets[i]
            size = len(p) - 4
            new = rng.choice((*_LENGTHS, size - 1, size + 1, rng.getrandbits(32)))
            packets[i] = struct.pack("!I", new) + p[4:]
        elif kind == "prepend":
            packets.insert(0, rng.choice((pkt(b"M", z(b"<a@b>")), pkt(b"L", z(b"A", b"b")), pkt(b"E"),
                                          struct.pack("!I", 0xFFFFFFFF) + b"B")))
        else:
            byte_level.append(kind)
    stream = bytearray(b"".join(packets))
    for kind in byte_level:
        if not stream:
            break
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                stream[rng.randrange(len(stream))] ^= rng.randrange(1, 256)
        elif kind == "truncate":
            del stream[rng.randrange(len(stream)) :]
        else:  # garbage
            at = rng.randrange(len(stream) + 1)
            stream[at:at] = rng.randbytes(rng.randint(1, 40))
    return bytes(stream)


def garbage(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return rng.randbytes(rng.randint(0, 300))
    # Plausible framing with random command bytes and data.
    return b"".join(pkt(bytes([rng.randrange(256)]), rng.randbytes(rng.randint(0, 30)))
                    for _ in range(rng.randint(1, 10)))


def decision_for(rng: random.Random) -> Decision:
    edits = (
        codec.ChangeHeader(1, "X-Milter-Verdict", ""),
        codec.InsertHeader(0, "X-Milter-Category", "ham"),
        codec.AddHeader("Subject", "[SPAM]"),
        codec.Quarantine("held"),
    )
    final = rng.choice((codec.CONTINUE, codec.DISCARD, codec.ACCEPT, codec.ReplyCode("550 5.7.1 no"),
                        codec.ReplyCode("451 4.3.0 later")))
    return Decision(final, tuple(e for e in edits if rng.random() < 0.5))


# -- the in-process driver --------------------------------------------------------------------------


@dataclass
class Run:
    outcome: str  # "error" (ProtocolError), "closed" (QUIT), "ended" (the stream ran out)
    decisions: int
    commands: int


def drive(rng: random.Random, stream: bytes, max_size: int) -> Run:
    """What MilterConnection does with a stream, minus the sockets; asserts the layer's properties."""
    decoder = Decoder()
    session = FilterSession(max_size=max_size)
    decisions = commands = pos = 0
    while pos < len(stream):
        step = rng.choice((1, 2, 5, 64, 700, 4096, len(stream)))
        try:
            batch = decoder.feed(stream[pos : pos + step])
        except ProtocolError:
            return Run("error", decisions, commands)
        pos += step
        assert decoder.buffered <= MAX_BUFFERED, decoder.buffered
        for command in batch:
            commands += 1
            try:
                outcome = session.handle(command)
            except ProtocolError:
                return Run("error", decisions, commands)
            match outcome:
                case Send(replies):
                    for reply in replies:
                        encode(reply)
                case Decide(message):
                    if max_size:
                        assert len(message.body) <= max_size
                        assert message.too_big == (message.size > max_size)
                    message.raw()
                    decision = decision_for(rng)
                    replies = session.decided(decision)  # must never raise right after a Decide
                    assert replies[-1] == decision.final
                    assert set(replies[:-1]) | set(session.dropped_edits(decision)) == set(decision.edits)
                    for reply in replies:
                        encode(reply)
                    decisions += 1
                case Close():
                    return Run("closed", decisions, commands)
    return Run("ended", decisions, commands)


@functools.cache
def base_conversations() -> tuple[Conversation, ...]:
    """Conversations to mutate, built once (building one costs as much as running it)."""
    rng = random.Random(SEED)
    return tuple(conversation(rng) for _ in range(2000))


def one_case(index: int) -> tuple[str, Run]:
    rng = random.Random(SEED * 1_000_003 + index)
    max_size = rng.choice((0, 0, 64, 2500, c.MAX_PACKET))
    roll = rng.random()
    pool = base_conversations()
    if roll < 0.08:
        kind, stream = "garbage", garbage(rng)
    elif roll < 0.16:
        conv = pool[rng.randrange(len(pool))]
        run = drive(rng, b"".join(conv.packets), max_size)
        # Unmutated: every valid conversation is taken whole, whatever the slicing.
        assert (run.outcome, run.decisions) == ("closed", conv.messages), run
        return "valid", run
    else:
        kind, stream = "mutated", mutate(rng, pool[rng.randrange(len(pool))].packets)
    return kind, drive(rng, stream, max_size)


def test_fuzz_decoder_and_session_in_process() -> None:
    started = time.perf_counter()
    outcomes: dict[str, int] = {}
    decisions = commands = 0
    for index in range(CASES):
        try:
            kind, run = one_case(index)
        except Exception as exc:  # a ProtocolError here too: drive() catches those it may get
            detail = repr(exc)[:600]
            pytest.fail(f"case {index} (MILTER_FUZZ_SEED={SEED}, one_case({index})): {detail}")
        key = f"{kind}/{run.outcome}"
        outcomes[key] = outcomes.get(key, 0) + 1
        decisions += run.decisions
        commands += run.commands
    elapsed = time.perf_counter() - started
    total = sum(outcomes.values())
    print(f"\nmilter fuzz: {total} cases, {commands} commands, {decisions} decisions, {elapsed:.1f} s; "
          f"seed {SEED}; {dict(sorted(outcomes.items()))}")
    assert total == CASES
    if "MILTER_FUZZ_CASES" not in os.environ:
        assert total >= 100_000
    # The mix is not degenerate: many protocol errors, many messages decided after mutation, some
    # mutated streams that stay valid or wait for more, and every valid conversation closed cleanly.
    assert outcomes.get("mutated/error", 0) > total // 4
    assert outcomes.get("mutated/closed", 0) + outcomes.get("mutated/ended", 0) > total // 50
    assert outcomes.get("garbage/error", 0) > total // 20
    assert outcomes.get("valid/closed", 0) > total // 20
    assert decisions > total // 5


def test_fuzz_length_prefixes_never_make_the_decoder_wait_for_more_than_one_packet() -> None:
    rng = random.Random(SEED)
    for length in (0xFFFFFFFF, 0x80000000, c.MAX_PACKET + 1, 0x01000000):
        for prefix in (b"", optneg(), optneg() + connect()):
            decoder = Decoder()
            decoder.feed(prefix)
            with pytest.raises(ProtocolError, match="packet length"):
                decoder.feed(struct.pack("!I", length) + b"B" + rng.randbytes(rng.randrange(100)))

    # The largest packet allowed, arriving in socket-sized reads: held until complete, never more.
    decoder = Decoder()
    stream = pkt(b"B", rng.randbytes(c.MAX_PACKET - 1)) + pkt(b"A")
    got: list[codec.Command] = []
    for pos in range(0, len(stream), 65536):
        got += decoder.feed(stream[pos : pos + 65536])
        assert decoder.buffered <= MAX_BUFFERED
    assert [type(x) for x in got] == [codec.Body, codec.Abort] and decoder.buffered == 0


# -- on sockets: a real gateway ---------------------------------------------------------------------

CLOSE_TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def milter_gateway(tmp_path: Path, free_port: Callable[[], int], **server: object
                         ) -> AsyncIterator[Gateway]:
    """A started Gateway listening for the milter protocol only, on a loopback port of its own."""
    from milter.auth import StaticResolver
    from milter.features import SCHEMA
    from milter.scan import prepare

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    url = f"sqlite:///{tmp_path}/gw.db"
    cfg = config_for(free_port(), free_port(), url, listen="", milter_listen=f"inet:127.0.0.1:{port}",
                     **server)
    gw = Gateway(cfg, load_scanner(cfg.policy), open_store(url), prepare=prepare,
                 schema_digest=SCHEMA.digest, resolver=StaticResolver({}))
    await gw.start(milter_sock=sock)
    try:
        assert gw.milter_address == f"inet:127.0.0.1:{port}"
        yield gw
    finally:
        await gw.close(grace=10)


def milter_port(gw: Gateway) -> int:
    return int(gw.milter_address.rsplit(":", 1)[1])


@dataclass
class Closed:
    local_port: int
    received: bytes
    reset: bool


async def bad_connection(port: int, stream: bytes, eof: bool = False) -> Closed:
    """Send `stream` (then end our side if `eof`) and wait for the gateway to close the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    local_port = writer.get_extra_info("sockname")[1]
    received = b""
    reset = False
    try:
        writer.write(stream)
        if eof:
            writer.write_eof()
        async with asyncio.timeout(CLOSE_TIMEOUT):
            while True:
                try:
                    data = await reader.read(65536)
                except ConnectionResetError:
                    reset = True
                    break
                if not data:
                    break
                received += data
    except TimeoutError:
        pytest.fail(f"the gateway left a connection open for {CLOSE_TIMEOUT} s after {stream[:80]!r}")
    finally:
        writer.close()
    return Closed(local_port, received, reset)


async def in_batches(port: int, streams: list[bytes], eof: bool = False, size: int = 25) -> list[Closed]:
    """Concurrent, but below server.max_sessions (a connection over it is refused without a log line)."""
    out: list[Closed] = []
    for i in range(0, len(streams), size):
        out += await asyncio.gather(*(bad_connection(port, s, eof) for s in streams[i : i + size]))
    return out


async def settled(gw: Gateway) -> None:
    """Every session closed and every decision finished (within 10 s): nothing leaked."""
    for _ in range(500):
        if not (gw._sessions or gw._inflight):
            break
        await asyncio.sleep(0.02)
    assert not gw._sessions, f"{len(gw._sessions)} milter sessions left open"
    assert not gw._inflight, f"{len(gw._inflight)} decisions never finished"
    assert gw.metrics.registry.get_sample_value("milter_sessions") == 0


def logged(caplog: pytest.LogCaptureFixture, event: str) -> dict[int, str]:
    """Log lines of one event by the peer's port (the client's local port)."""
    lines: dict[int, str] = {}
    for record in caplog.records:
        message = record.getMessage()
        if message.startswith(event + " ") and "peer=127.0.0.1:" in message:
            port = int(message.split("peer=127.0.0.1:", 1)[1].split()[0])
            lines[port] = message
    return lines


def errors(gw: Gateway, kind: str) -> float:
    return gw.metrics.registry.get_sample_value("milter_errors_total", {"kind": kind}) or 0.0


def simulate(stream: bytes, byte_by_byte: bool) -> str:
    """The in-process layer's verdict on a stream: "error", "decide", "closed" or "waiting"."""
    decoder, session = Decoder(), FilterSession()
    pieces: Iterator[bytes] = (
        (stream[i : i + 1] for i in range(len(stream))) if byte_by_byte else iter([stream])
    )
    try:
        for piece in pieces:
            for command in decoder.feed(piece):
                outcome = session.handle(command)
                if isinstance(outcome, Decide):
                    return "decide"
                if isinstance(outcome, Close):
                    return "closed"
    except ProtocolError:
        return "error"
    return "waiting"


def bad_streams(rng: random.Random) -> list[tuple[str, bytes]]:
    """Connections that must each end in a protocol error, whatever the TCP segmentation."""
    valid = optneg() + macros(b"C", b"j", b"mx") + connect() + pkt(b"H", z(b"helo.test"))
    mail = pkt(b"M", z(b"<a@sender.test>")) + pkt(b"R", z(b"<b@rcpt.test>"))
    fixed: list[tuple[str, bytes]] = [
        ("max_length", struct.pack("!I", 0xFFFFFFFF)),
        ("max_length_with_data", struct.pack("!I", 0xFFFFFFFF) + b"B" + b"x" * 5000),
        ("max_length_after_optneg", optneg() + struct.pack("!I", 0xFFFFFFFF) + b"B"),
        ("max_length_mid_message", valid + mail + struct.pack("!I", 0xFFFFFFFF) + b"L"),
        ("zero_length", struct.pack("!I", 0)),
        ("zero_length_after_optneg", optneg() + struct.pack("!I", 0)),
        ("oversized", struct.pack("!I", c.MAX_PACKET + 1) + b"B"),
        ("old_version", optneg(version=1)),
        ("connect_before_optneg", connect()),
        ("mail_before_optneg", pkt(b"M", z(b"<a@b>"))),
        ("macros_before_optneg", macros(b"C", b"j", b"mx")),
        ("eom_before_optneg", pkt(b"E")),
        ("rcpt_before_mail", valid + pkt(b"R", z(b"<b@rcpt.test>"))),
        ("header_before_mail", valid + header(b"Subject", b" hi")),
        ("body_before_mail", valid + pkt(b"B", b"text")),
        ("eom_before_mail", valid + pkt(b"E")),
        ("unknown_command", valid + pkt(b"Z", b"data")),
        ("reply_code_as_command", optneg() + pkt(b"c")),
        ("header_without_nul", valid + mail + pkt(b"L", b"Subject: hi")),
        ("connect_bad_family", optneg() + pkt(b"C", z(b"host") + b"X\0\0" + z(b"1.2.3.4"))),
        ("data_with_payload", valid + mail + pkt(b"T", b"x")),
    ]
    out = list(fixed)
    for _ in range(60):
        out.append(("garbage", bytes([rng.randrange(1, 256)]) + rng.randbytes(rng.randrange(3, 300))))
    for _ in range(40):
        out.append(("random_command", valid + pkt(bytes([rng.choice(b"abcdefFGIJPSVWXYZ\0\xff")]),
                                                  rng.randbytes(rng.randrange(0, 50)))))
    # Mutated conversations the in-process layer refuses both whole and byte by byte (so the
    # gateway refuses them however the bytes arrive), and that never reach a decision.
    mutated = 0
    while mutated < 180:
        conv = conversation(rng)
        first_eom = next(i for i, p in enumerate(conv.packets) if p[4:5] in (b"E", b"Q"))
        stream = mutate(rng, conv.packets[:first_eom])
        if simulate(stream, False) == "error" and simulate(stream, True) == "error":
            out.append(("mutated", stream))
            mutated += 1
    for name, stream in out:
        assert simulate(stream, False) == simulate(stream, True) == "error", name
    return out


def test_fuzz_bad_connections_are_closed_logged_and_leave_nothing_behind(
    tmp_path: Path, free_port: Callable[[], int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="milter.gateway.milter")
    cases = bad_streams(random.Random(SEED))
    assert len(cases) >= 300

    async def main() -> None:
        async with milter_gateway(tmp_path, free_port) as gw:
            port = milter_port(gw)
            closed = await in_batches(port, [stream for _, stream in cases])
            await settled(gw)
            dropped = logged(caplog, "milter_dropped")
            missing = [name for (name, _), conn in zip(cases, closed, strict=True)
                       if conn.local_port not in dropped]
            assert not missing, f"closed without a milter_dropped line: {missing}"
            assert errors(gw, "milter_protocol") == len(cases)
            # Aborted, not closed politely: nothing of a half-read stream is answered after the error.
            assert all("reason=\"protocol error: " in dropped[conn.local_port] for conn in closed)

            # The worker is not wedged: a real conversation, two messages on one connection.
            await valid_conversation(port)
            await settled(gw)

    asyncio.run(main())


def test_fuzz_truncated_packets_are_closed_and_logged(
    tmp_path: Path, free_port: Callable[[], int], caplog: pytest.LogCaptureFixture
) -> None:
    """A packet cut short, then either our side closed (EOF) or left open: the gateway closes
    the connection (at once on EOF, after server.command_timeout otherwise) and says so."""
    caplog.set_level(logging.INFO, logger="milter.gateway.milter")
    rng = random.Random(SEED)
    conv = conversation(rng).packets
    conv = conv[: next(i for i, p in enumerate(conv) if p[4:5] == b"E")]  # no message to decide
    stream = b"".join(conv)
    boundaries = {sum(len(p) for p in conv[:i]) for i in range(len(conv) + 1)}
    cuts = [n for n in range(1, len(stream)) if n not in boundaries]  # inside a packet, never between
    truncated = [stream[: rng.choice(cuts)] for _ in range(30)] + [
        struct.pack("!I", 5)[:2],  # half a length
        struct.pack("!I", c.MAX_PACKET) + b"B" + b"x" * 100_000,  # the largest packet, far from complete
    ]
    assert all(simulate(s, False) == "waiting" for s in truncated)

    async def main() -> None:
        async with milter_gateway(tmp_path, free_port, command_timeout=1.0) as gw:
            port = milter_port(gw)
            started = time.monotonic()
            left_open = await in_batches(port, truncated[:10], size=10)
            assert time.monotonic() - started >= 0.9  # closed by the idle timeout, not before
            timed_out = logged(caplog, "milter_timeout")
            assert all(conn.local_port in timed_out for conn in left_open)

            at_eof = await in_batches(port, truncated, eof=True)
            await settled(gw)
            await valid_conversation(port)
            await settled(gw)
            # A stream that ends inside a packet is a broken peer too: it must be logged.
            reported = logged(caplog, "milter_dropped")
            unlogged = [s[:40] for s, conn in zip(truncated, at_eof, strict=True)
                        if conn.local_port not in reported]
            assert not unlogged, f"{len(unlogged)} of {len(truncated)} truncated streams closed silently"

    asyncio.run(main())


def test_fuzz_connections_breaking_around_a_decision_leave_nothing_behind(
    tmp_path: Path, free_port: Callable[[], int], caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage after an answered message, an MTA gone before the answer, an abort followed by a
    command out of order while the message is decided: answered where the MTA still listens, then
    dropped and logged; no session or decision left over."""
    caplog.set_level(logging.INFO, logger="milter.gateway.milter")
    rng = random.Random(SEED)
    opening = optneg() + macros(b"C", b"j", b"mx.test") + connect() + pkt(b"H", z(b"helo.test"))

    async def answered_then(port: int, after: bytes, together: bool) -> tuple[int, list[tuple[bytes, bytes]]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        local_port = writer.get_extra_info("sockname")[1]
        try:
            message = message_packets(b"<bob@rcpt.test>", b"Around a decision")
            writer.write(opening + message + (after if together else b""))
            assert (await asyncio.wait_for(read_packet(reader), 10))[0] == b"O"
            replies = await until_final(reader)
            if not together:
                writer.write(after)
            async with asyncio.timeout(CLOSE_TIMEOUT):
                with contextlib.suppress(ConnectionResetError):
                    while await reader.read(65536):
                        pass
            return local_port, replies
        finally:
            writer.close()

    async def gone_before_the_answer(port: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(opening + message_packets(b"<bob@rcpt.test>", b"Nobody waits"))
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with milter_gateway(tmp_path, free_port) as gw:
            port = milter_port(gw)
            junk = [bytes([rng.randrange(1, 256)]) + rng.randbytes(20) for _ in range(5)]
            after_answer = await asyncio.gather(*(answered_then(port, j, together=False) for j in junk))
            # Queued behind the message: taken after its answer, and the header has no MAIL any more.
            out_of_order = await asyncio.gather(*(
                answered_then(port, pkt(b"A") + header(b"Subject", b" late"), together=True) for _ in range(5)
            ))
            await asyncio.gather(*(gone_before_the_answer(port) for _ in range(5)))
            await settled(gw)
            dropped = logged(caplog, "milter_dropped")
            for local_port, replies in (*after_answer, *out_of_order):
                assert replies[-1] == (b"c", b""), replies
                assert local_port in dropped
            assert errors(gw, "milter_protocol") == 10
            assert "milter_internal_error" not in caplog.text
            await valid_conversation(port)
            await settled(gw)

    asyncio.run(main())


# -- a valid conversation, as Postfix holds it ------------------------------------------------------


async def read_packet(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    (size,) = struct.unpack("!I", await reader.readexactly(4))
    body = await reader.readexactly(size)
    return body[:1], body[1:]


async def until_final(reader: asyncio.StreamReader) -> list[tuple[bytes, bytes]]:
    """Replies to one end of message: edits, then the final reply (progress packets skipped)."""
    got: list[tuple[bytes, bytes]] = []
    async with asyncio.timeout(60):
        while True:
            code, data = await read_packet(reader)
            if code == b"p":
                continue
            got.append((code, data))
            if code in b"acdrty":
                return got


def message_packets(rcpt: bytes, subject: bytes) -> bytes:
    return (
        macros(b"M", b"i", b"4XYZ", b"{auth_type}", b"")
        + pkt(b"M", z(b"<alice@sender.test>", b"BODY=8BITMIME"))
        + pkt(b"R", z(rcpt))
        + header(b"From", b" Alice <alice@sender.test>")
        + header(b"To", b" " + rcpt)
        + header(b"Subject", b" " + subject)
        + header(b"Message-ID", b" <" + subject.replace(b" ", b".") + b"@sender.test>")
        + pkt(b"B", b"See you at noon.\r\n")
        + macros(b"E", b"i", b"4XYZ")
        + pkt(b"E")
    )


async def valid_conversation(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(optneg())
        code, data = await asyncio.wait_for(read_packet(reader), 10)
        assert code == b"O"
        version, actions, steps = struct.unpack_from("!III", data)
        assert version == 6 and actions & 0x10 and steps & 0x80  # CHGHDRS, and no replies per header
        writer.write(macros(b"C", b"j", b"mx.test") + connect() + pkt(b"H", z(b"helo.test")))
        writer.write(message_packets(b"<bob@rcpt.test>", b"Lunch on Friday"))
        accepted = await until_final(reader)
        assert accepted[-1] == (b"c", b"")  # accept: the MTA continues with our edits
        category = b"\0\0\0\0X-Milter-Category\0"  # inserted at index 0, on top
        assert any(code == b"i" and data.startswith(category) for code, data in accepted), accepted
        writer.write(message_packets(f"<carol@{REJECT_DOMAIN}>".encode(), b"Second message"))
        rejected = await until_final(reader)
        assert rejected[-1][0] == b"y" and rejected[-1][1].startswith(b"550 5.7.1 ")
        writer.write(pkt(b"Q"))
        assert await asyncio.wait_for(reader.read(), 10) == b""  # QUIT: closed politely, nothing more
    finally:
        writer.close()
