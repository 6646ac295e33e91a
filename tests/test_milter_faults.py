"""Failure modes through the milter front end: each has a defined reply to the MTA.

A slow scan sends SMFIR_PROGRESS so the MTA's timeout never fires; a model that fails and a store that
cannot commit end in `451 4.3.0` (policy.on_error = "tempfail") or a tagged continue ("accept"); a
message over the size limit gets `552 5.3.4`. The MTA side is a small blocking client over a real
loopback socket, written from the protocol description (packets built by hand here).
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import struct
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gateway_support import QUARANTINE_SENDER, TEST_POLICY, dribble, load_scanner, run_gateway_scenario

from milter.classifier import Classifier
from milter.errors import ModelError
from milter.gateway.server import Gateway
from milter.store import Store

Ports = Callable[[], int]
Packet = tuple[bytes, bytes]


def _pk(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + code + data


def _recv(sock: socket.socket) -> Packet:
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed by the filter")
            out += chunk
        return out

    (size,) = struct.unpack("!I", exact(4))
    body = exact(size)
    return body[:1], body[1:]


def converse(port: int, sender: str, body: bytes, chunk: int = 65535) -> list[Packet]:
    """One message, offering everything and replying to nothing but what is asked; returns every
    packet the filter sent after end of message (progress included), up to its final reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(_pk(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)))
        code, data = _recv(sock)
        assert code == b"O"
        _, _, steps = struct.unpack_from("!III", data)
        assert steps & 0x80 and steps & 0x80000  # no replies to headers and body chunks asked for
        sock.sendall(
            _pk(b"C", b"mx.sender.test\x004\x00\x19192.0.2.7\x00")
            + _pk(b"H", b"mx.sender.test\x00")
            + _pk(b"D", b"Mi\x00QID42\x00")
            + _pk(b"M", f"<{sender}>".encode() + b"\x00")
            + _pk(b"R", b"<bob@rcpt.test>\x00")
            + _pk(b"L", b"From\x00 " + sender.encode() + b"\x00")
            + _pk(b"L", b"Subject\x00 Hello\x00")
            + _pk(b"L", b"Message-ID\x00 <fault-" + str(time.monotonic_ns()).encode() + b"@test>\x00")
            + b"".join(_pk(b"B", body[i : i + chunk]) for i in range(0, len(body), chunk))
            + _pk(b"E")
        )
        out = []
        while True:
            packet = _recv(sock)
            out.append(packet)
            if packet[0] in b"acdrty":
                return out


def _final(packets: list[Packet]) -> Packet:
    return packets[-1]


async def _talk(gw: Gateway, sender: str, body: bytes, chunk: int = 65535) -> list[Packet]:
    port = int(gw.milter_address.rsplit(":", 1)[1])
    return await asyncio.to_thread(converse, port, sender, body, chunk)


MILTER: dict[str, Any] = {"listen": "", "milter_listen": "inet:127.0.0.1:0"}
BODY = b"Hi Bob,\r\n\r\nsee you at ten.\r\n"


class SlowClassifier(Classifier):
    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        time.sleep(0.6)
        return super().predict(features)


class FailingClassifier(Classifier):
    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        raise ModelError("injected inference failure")


def test_slow_scan_sends_progress_then_the_verdict(tmp_path: Path, free_port: Ports) -> None:
    async def scenario(gw: Gateway, sink: Any, store: Any) -> None:
        packets = await _talk(gw, "alice@sender.test", BODY)
        assert [c for c, _ in packets[:-1]].count(b"p") >= 3, packets
        assert {c for c, _ in packets[:-1]} <= {b"p", b"i", b"m", b"h"}
        assert _final(packets) == (b"c", b"")

    run_gateway_scenario(tmp_path, free_port, scenario, scanner=load_scanner(TEST_POLICY, SlowClassifier),
                         milter_progress_interval=0.1, **MILTER)


def test_model_failure_tempfails_or_continues_tagged_unscanned(tmp_path: Path, free_port: Ports) -> None:
    async def tempfail(gw: Gateway, sink: Any, store: Any) -> None:
        packets = await _talk(gw, "alice@sender.test", BODY)
        assert packets == [(b"y", b"451 4.3.0 Content scanner unavailable, try again later\x00")]

    async def accept(gw: Gateway, sink: Any, store: Any) -> None:
        packets = await _talk(gw, "alice@sender.test", BODY)
        assert _final(packets) == (b"c", b"")
        inserted = [d for c, d in packets if c == b"i"]
        assert any(b"X-Milter-Verdict\x00 unscanned\x00" in d for d in inserted), packets

    (tmp_path / "t").mkdir()
    run_gateway_scenario(tmp_path / "t", free_port, tempfail,
                         scanner=load_scanner(TEST_POLICY, FailingClassifier), **MILTER)
    on_accept = replace(TEST_POLICY, on_error="accept")
    run_gateway_scenario(tmp_path, free_port, accept, scanner=load_scanner(on_accept, FailingClassifier),
                         policy=on_accept, **MILTER)


def test_store_that_cannot_commit_tempfails_a_quarantine(tmp_path: Path, free_port: Ports) -> None:
    url = f"sqlite:///{tmp_path}/gw.db"
    store = Store.open(url, busy_timeout_ms=200)
    lock = sqlite3.connect(tmp_path / "gw.db", isolation_level=None)

    async def scenario(gw: Gateway, sink: Any, st: Any) -> None:
        lock.execute("BEGIN EXCLUSIVE")
        held = await _talk(gw, QUARANTINE_SENDER, BODY)
        lock.execute("ROLLBACK")
        assert held == [(b"y", b"451 4.3.0 Quarantine store unavailable, try again later\x00")]
        # Once the store commits again, the same message is held and Postfix is told to discard its copy.
        again = await _talk(gw, QUARANTINE_SENDER, BODY)
        assert _final(again) == (b"d", b"")
        assert len(st.quarantine_list()) == 1

    run_gateway_scenario(tmp_path, free_port, scenario, store=store, **MILTER)
    lock.close()


def test_message_over_the_size_limit_gets_552(tmp_path: Path, free_port: Ports) -> None:
    async def scenario(gw: Gateway, sink: Any, store: Any) -> None:
        big = (b"x" * 76 + b"\r\n") * 200  # 15,600 bytes in four chunks, over a 10,000-byte limit
        assert await _talk(gw, "alice@sender.test", big, chunk=4000) == [
            (b"y", b"552 5.3.4 Message too big for system\x00")
        ]
        # The next message is judged on its own.
        assert _final(await _talk(gw, "alice@sender.test", BODY)) == (b"c", b"")
        assert store.quarantine_list() == []

    run_gateway_scenario(tmp_path, free_port, scenario, max_message_size=10_000, **MILTER)


# -- the two timers ----------------------------------------------------------------------------------

PACKET_TIMEOUT = 0.5  # server.command_timeout, scaled down
IDLE_TIMEOUT = 6.0  # server.milter_timeout, scaled down
ENVELOPE = (_pk(b"C", b"mx.test\x004" + struct.pack("!H", 25) + b"192.0.2.1\x00")
            + _pk(b"H", b"helo.test\x00") + _pk(b"M", b"<a@sender.test>\x00")
            + _pk(b"R", b"<b@rcpt.test>\x00"))
CONTENT = _pk(b"L", b"Subject\x00 hi\x00") + _pk(b"B", b"body\r\n") + _pk(b"E")


async def _bare_filter(script: Callable[[int], Any]) -> Any:
    """A MilterConnection alone on a loopback port (every message continues), and `script(port)`
    run against it in a thread: the timers without a gateway around them."""
    from milter.gateway.milter_server import MilterConnection, MilterSettings
    from milter.protocol import codec
    from milter.protocol.session import Decision

    settings = MilterSettings(max_size=0, idle_timeout=IDLE_TIMEOUT, progress_interval=10.0,
                              packet_timeout=PACKET_TIMEOUT)

    async def decide(message: Any) -> Decision:
        return Decision(codec.CONTINUE)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: MilterConnection(settings, decide, asyncio.ensure_future, lambda c: None), "127.0.0.1", 0)
    try:
        return await asyncio.to_thread(script, server.sockets[0].getsockname()[1])
    finally:
        server.close()


def _closed_after(sock: socket.socket) -> float:
    """Seconds until the filter closes the connection."""
    started = time.monotonic()
    assert sock.recv(1) == b""
    return time.monotonic() - started


def test_a_silent_data_phase_is_no_timeout() -> None:
    """Postfix sends the headers only once the SMTP client's whole message is in its queue file, so
    the milter hears nothing for as long as the upload takes. Before, the connection was closed after
    command_timeout of that silence and Postfix tempfailed the message (a slow 20 MB upload took
    longer than the default 300 s, on every try)."""
    gap = 3 * PACKET_TIMEOUT

    def mta(port: int) -> Packet:
        with socket.create_connection(("127.0.0.1", port), timeout=IDLE_TIMEOUT) as sock:
            sock.sendall(_pk(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)))
            assert _recv(sock)[0] == b"O"
            sock.sendall(ENVELOPE)  # no replies: the filter asks for none before end of message
            time.sleep(gap)  # the client uploads its message; the MTA says nothing meanwhile
            sock.sendall(CONTENT)
            return _recv(sock)

    assert asyncio.run(_bare_filter(mta)) == (b"c", b"")

    def aborted_then_idle(port: int) -> Packet:
        """A message's headers, then ABORT (the client said RSET), then a pause as long as the client
        likes before the next message: the short timer of a message in progress must end with it."""
        with socket.create_connection(("127.0.0.1", port), timeout=IDLE_TIMEOUT) as sock:
            sock.sendall(_pk(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)))
            assert _recv(sock)[0] == b"O"
            sock.sendall(ENVELOPE + _pk(b"L", b"Subject\x00 first\x00") + _pk(b"A"))
            time.sleep(gap)
            sock.sendall(ENVELOPE + CONTENT)
            return _recv(sock)

    assert asyncio.run(_bare_filter(aborted_then_idle)) == (b"c", b"")


def test_what_cannot_be_healthy_keeps_the_short_timer() -> None:
    """A connection that never negotiates, a packet begun and never finished (stalled, or a byte at a
    time) and a message that stops between its headers and its end (which the MTA streams from its
    queue file) are closed after command_timeout, not after the long silence a healthy one may keep."""

    def unfinished(port: int) -> tuple[float, float, float, float]:
        with socket.create_connection(("127.0.0.1", port), timeout=IDLE_TIMEOUT) as mute:
            before_negotiating = _closed_after(mute)
        with socket.create_connection(("127.0.0.1", port), timeout=IDLE_TIMEOUT) as sock:
            sock.sendall(_pk(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)))
            assert _recv(sock)[0] == b"O"
            sock.sendall(ENVELOPE + struct.pack("!I", 1000) + b"L")  # half a header packet
            stalled = _closed_after(sock)
        with socket.create_connection(("127.0.0.1", port), timeout=IDLE_TIMEOUT) as sock:
            sock.sendall(_pk(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)))
            assert _recv(sock)[0] == b"O"
            sock.sendall(ENVELOPE + struct.pack("!I", 1000) + b"L")
            dribbled = dribble(sock, 0.1, IDLE_TIMEOUT / 2)  # a byte of the packet every tenth of a second
        with socket.create_connection(("127.0.0.1", port), timeout=IDLE_TIMEOUT) as sock:
            sock.sendall(_pk(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)))
            assert _recv(sock)[0] == b"O"
            sock.sendall(ENVELOPE + CONTENT[: -len(_pk(b"E"))])  # headers and body, no end of message
            no_end = _closed_after(sock)
        return before_negotiating, stalled, dribbled, no_end

    times = asyncio.run(_bare_filter(unfinished))
    assert all(PACKET_TIMEOUT - 0.1 <= t < PACKET_TIMEOUT + 1.5 for t in times), times
