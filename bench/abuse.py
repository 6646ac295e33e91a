"""Front-end abuse against `milter serve` with real workers: honest clients' latency per attack.

    .venv/bin/python bench/abuse.py [--workers 2] [--seconds 3] [--smtp-clients 4]

Starts a sink (its own process) and `milter serve` (SMTP and milter listeners, `max_sessions` 20 per
worker, 2 s command and 3 s data timeouts, sender authentication off), then runs the attacks of
tests/test_frontend_abuse.py one after the other: garbage, lines that never end, 10 MB lines,
thousands of pipelined commands (read, and not), `max_sessions` x workers + 1000 connections, stalls
mid-DATA; on both front ends. Meanwhile honest clients in a process of their own (smtplib threads
sending fixtures/ messages, one connection each, and one milter conversation thread) keep sending;
for each attack it prints their p50 / p99 latency, failures and refusals, beside a no-attack
baseline taken first and last in the same run. Also the gateway's sessions after each attack (from
/metrics: they must be back to 0).

The helpers at the top (milter packets, a raw SMTP client, floods, honest senders) are shared with
tests/test_frontend_abuse.py, which asserts what this only measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import random
import re
import smtplib
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CRLF = b"\r\n"


# -- honest clients --------------------------------------------------------------------------------


def honest_messages() -> list[bytes]:
    """Real messages from fixtures/ (corpus samples and the BEC set), CRLF line ends, without their
    Message-ID (each send gets its own), and none with a line an SMTP server may refuse."""
    out: list[bytes] = []
    fixtures = ROOT / "fixtures"
    for path in sorted(fixtures.glob("sample/*.eml")) + sorted(fixtures.glob("bec/*.eml")):
        raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if len(raw) > 64 * 1024 or max(len(line) for line in raw.split(b"\r\n")) > 990:
            continue
        head, _, body = raw.partition(b"\r\n\r\n")
        head = re.sub(rb"(?im)^message-id:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*(?:\r\n|$)", b"", head + b"\r\n")
        out.append(head + b"\r\n" + body)
    assert len(out) >= 50, len(out)
    return out


@dataclass(frozen=True)
class Sent:
    mid: str
    started: float
    seconds: float
    code: int  # SMTP: 250 or the failure's code (0: no reply); milter: 250 for "continue"
    text: str
    refused: int  # times it was turned away (421 / closed at once) before getting through


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def send_smtp(port: int, mid: str, raw: bytes) -> Sent:
    """One message on a connection of its own; a 421 at connect (over max_sessions) is retried soon,
    for up to 30 s, as an MTA would retry later."""
    started = time.monotonic()
    refused = 0
    while True:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("alice@sender.test", ["bob@rcpt.test"], raw)
                code, text = 250, ""
                seconds = time.monotonic() - started
        except smtplib.SMTPConnectError as exc:
            if exc.smtp_code == 421 and time.monotonic() - started < 30:
                refused += 1
                time.sleep(0.05)
                continue
            code, text, seconds = exc.smtp_code, repr(exc.smtp_error), time.monotonic() - started
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))[0], repr(exc)
            seconds = time.monotonic() - started
        except smtplib.SMTPResponseException as exc:
            code, text, seconds = exc.smtp_code, repr(exc.smtp_error), time.monotonic() - started
        except (smtplib.SMTPException, OSError) as exc:
            code, text, seconds = 0, repr(exc), time.monotonic() - started
        return Sent(mid, started, seconds, code, text, refused)


def send_milter(port: int, mid: str) -> Sent:
    """One milter conversation (negotiate, one message, quit); 250 stands for "continue". Closed
    before the negotiation is answered (over max_sessions): retried soon, for up to 30 s."""
    started = time.monotonic()
    refused = 0
    while True:
        try:
            final = milter_message(port, mid.encode())
            code, text = (250, "") if final == (b"c", b"") else (0, repr(final))
        except Refused:
            if time.monotonic() - started < 30:
                refused += 1
                time.sleep(0.05)
                continue
            code, text = 0, "refused for 30 s"
        except (OSError, EOFError) as exc:
            code, text = 0, repr(exc)
        return Sent(mid, started, time.monotonic() - started, code, text, refused)


@dataclass
class HonestLoad:
    """`smtp_clients` smtplib threads and `milter_clients` milter threads, each sending one message
    per connection in a loop between start() and stop()."""

    smtp_port: int
    milter_port: int
    label: str
    messages: list[bytes]
    smtp_clients: int = 4
    milter_clients: int = 1
    smtp: list[Sent] = field(default_factory=list)
    milter: list[Sent] = field(default_factory=list)
    window: float = 0.0  # when the attack started: what was sent before does not count
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        """Start the clients, and return once every one has sent a message."""
        for i in range(self.smtp_clients):
            self._threads.append(threading.Thread(target=self._smtp_loop, args=(i,), daemon=True))
        for i in range(self.milter_clients):
            self._threads.append(threading.Thread(target=self._milter_loop, args=(i,), daemon=True))
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(self.smtp) < self.smtp_clients or len(self.milter) < self.milter_clients:
            if time.monotonic() > deadline:
                raise TimeoutError("honest clients never got going")
            time.sleep(0.02)
        self.window = time.monotonic()

    def stop(self, at_least: int = 0, within: float = 60.0) -> None:
        """Stop, once `at_least` SMTP messages sent since the window opened are done (or `within` s)."""
        deadline = time.monotonic() + within
        while len(self.during()) < at_least and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def during(self, sent: list[Sent] | None = None) -> list[Sent]:
        return [s for s in (self.smtp if sent is None else sent) if s.started >= self.window]

    def _smtp_loop(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            mid = f"<h-{self.label}-{index}-{n}@abuse.test>"
            raw = f"Message-ID: {mid}\r\n".encode() + self.messages[(index * 17 + n) % len(self.messages)]
            n += 1
            self.smtp.append(send_smtp(self.smtp_port, mid, raw))

    def _milter_loop(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            self.milter.append(send_milter(self.milter_port, f"<m-{self.label}-{index}-{n}@abuse.test>"))
            n += 1


# -- milter packets -----------------------------------------------------------------------------------


def pkt(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + code + data


def z(*parts: bytes) -> bytes:
    return b"".join(p + b"\0" for p in parts)


def optneg(actions: int = 0x1FF, steps: int = 0x1FFFFF) -> bytes:
    """Postfix's offer by default; steps=0 asks for a reply to every command."""
    return pkt(b"O", struct.pack("!III", 6, actions, steps))


OPENING = (pkt(b"D", b"C" + z(b"j", b"mx.test")) + pkt(b"C", z(b"mx.client.test") + b"4"
           + struct.pack("!H", 40000) + z(b"192.0.2.1")) + pkt(b"H", z(b"helo.test")))


def message_packets(mid: bytes, sender: bytes = b"alice@sender.test", eom: bool = True) -> bytes:
    return (
        pkt(b"D", b"M" + z(b"i", b"4XYZ"))
        + pkt(b"M", z(b"<" + sender + b">", b"BODY=8BITMIME"))
        + pkt(b"R", z(b"<bob@rcpt.test>"))
        + pkt(b"L", z(b"From", b" Alice <" + sender + b">"))
        + pkt(b"L", z(b"To", b" bob@rcpt.test"))
        + pkt(b"L", z(b"Subject", b" Lunch on Friday"))
        + pkt(b"L", z(b"Message-ID", b" " + mid))
        + pkt(b"N")
        + pkt(b"B", b"See you at noon.\r\n")
        + (pkt(b"E") if eom else b"")
    )


class Refused(Exception):
    """The gateway closed a milter connection before answering the negotiation (over max_sessions)."""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += data
    return out


def read_packet(sock: socket.socket) -> tuple[bytes, bytes]:
    (size,) = struct.unpack("!I", recv_exact(sock, 4))
    body = recv_exact(sock, size)
    return body[:1], body[1:]


def until_final(sock: socket.socket) -> tuple[bytes, bytes]:
    """The final reply to one end of message (edits and progress packets skipped)."""
    while True:
        code, data = read_packet(sock)
        if code in b"acdrty":
            return code, data


def milter_message(port: int, mid: bytes) -> tuple[bytes, bytes]:
    """One honest milter conversation, as Postfix holds it: negotiate, one message, quit."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(optneg())
        try:
            code, _ = read_packet(sock)
        except (EOFError, ConnectionResetError) as exc:
            raise Refused() from exc
        assert code == b"O"
        sock.sendall(OPENING + message_packets(mid))
        final = until_final(sock)
        sock.sendall(pkt(b"Q"))
        assert sock.recv(1) == b""
        return final


# -- raw SMTP, floods ----------------------------------------------------------------------------------


class Raw:
    """A blocking SMTP client that sends exactly what it is told and reads replies line by line."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.local_port: int = self.sock.getsockname()[1]
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def line(self) -> bytes:
        while b"\r\n" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"closed; unterminated {self._buf[:80]!r}")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def reply(self) -> tuple[int, str]:
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return int(lines[-1][:3]), b"\n".join(lines).decode("ascii", "replace")

    def cmd(self, line: bytes) -> tuple[int, str]:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def open_transaction(self, sender: str = "alice@sender.test") -> None:
        assert self.reply()[0] == 220
        assert self.cmd(b"EHLO attacker.test")[0] == 250
        assert self.cmd(f"MAIL FROM:<{sender}>".encode())[0] == 250
        assert self.cmd(b"RCPT TO:<bob@rcpt.test>")[0] == 250
        assert self.cmd(b"DATA")[0] == 354

    def rest(self, timeout: float) -> tuple[bytes, str]:
        """Everything until the gateway closes: (bytes, "eof" | "reset" | "timeout")."""
        self.sock.settimeout(timeout)
        data, self._buf = self._buf, b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
            return data, "eof"
        except ConnectionResetError:
            return data, "reset"
        except TimeoutError:
            return data, "timeout"


def blast(sock: socket.socket, chunk: bytes, seconds: float) -> tuple[int, float]:
    """Send `chunk` over and over until the peer closes (bytes sent, when), or `seconds` pass."""
    sent = 0
    start = time.monotonic()
    sock.settimeout(1.0)
    while time.monotonic() - start < seconds:
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return sent, time.monotonic()
        except TimeoutError:
            continue  # the peer stopped reading for a while: keep pushing
        sent += len(chunk)
    return sent, time.monotonic()


def unread_socket(port: int) -> socket.socket:
    """A client socket with a small receive buffer, so that unread replies back up at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotuning
    sock.connect(("127.0.0.1", port))
    return sock


def send_unread(sock: socket.socket, data: bytes, quiet: float = 1.0) -> tuple[int, str]:
    """Send without ever reading, until all is sent ("all"), nothing more goes for `quiet` seconds
    ("stuck") or the gateway drops the connection ("reset")."""
    sock.setblocking(False)
    sent, last = 0, time.monotonic()
    while sent < len(data):
        if time.monotonic() - last > quiet:
            return sent, "stuck"
        try:
            n = sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
            continue
        except (BrokenPipeError, ConnectionResetError):
            return sent, "reset"
        sent, last = sent + n, time.monotonic()
    return sent, "all"


TCP_ESTABLISHED = 1


def closed_by_peer(sock: socket.socket, within: float) -> float | None:
    """Seconds until the peer closes or resets `sock` (its TCP state leaves ESTABLISHED), read from
    TCP_INFO without reading the socket; None if it is still open after `within` s."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def parallel(fn: Callable[[int], Any], n: int) -> list[Any]:
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, range(n)))


def repeat(seconds: float) -> Iterator[int]:
    """Rounds of an attack, for at least `seconds` (and at least one)."""
    start = time.monotonic()
    i = 0
    while i == 0 or time.monotonic() - start < seconds:
        yield i
        i += 1


# A separate process opens the flood: from a thread of this one, every connect() waited for the GIL
# while the gateway's loop thread worked, and 1,020 connections took 5 s to open.
_FLOOD = r"""
import json, selectors, socket, sys, time
port, count, wait = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
start = time.monotonic()
socks, connected = [], []
for _ in range(count):
    socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    connected.append(time.monotonic() - start)
opened = time.monotonic() - start
got = [b""] * count
ended = [None] * count
sel = selectors.DefaultSelector()
for i, s in enumerate(socks):
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, i)
while sel.get_map() and time.monotonic() - start < wait:
    for key, _ in sel.select(0.05):
        i = key.data
        try:
            data = socks[i].recv(65536)
        except ConnectionResetError:
            data = b""
        got[i] += data
        if not data:
            ended[i] = time.monotonic() - start - connected[i]
            sel.unregister(socks[i])
json.dump({"opened": opened, "got": [g.decode("ascii", "replace") for g in got], "ended": ended}, sys.stdout)
"""


@dataclass(frozen=True)
class Flood:
    opened: float  # seconds to open every connection
    got: list[str]  # what each received before the gateway closed it
    ended: list[float | None]  # when the gateway closed it, after it was opened (None: never)


def flood(port: int, count: int, wait: float) -> Flood:
    """`count` connections at once, each kept open until the gateway closes it (or `wait` s pass)."""
    out = subprocess.run(
        [sys.executable, "-c", _FLOOD, str(port), str(count), str(wait)],
        capture_output=True, check=True, timeout=wait + 30,
    )
    result = json.loads(out.stdout)
    return Flood(result["opened"], result["got"], result["ended"])


def listen_backlog(port: int) -> int:
    """A listening socket's accept-queue length, as the kernel has it (ss: Send-Q of a LISTEN line)."""
    fields = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                            check=True).stdout.split()
    assert fields[0] == "LISTEN", fields
    return int(fields[2])




# -- the bench: a gateway with real workers ------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    smtp: int
    milter: int
    metrics: list[int]  # one port per worker
    max_sessions: int  # per worker
    workers: int
    command_timeout: float
    data_timeout: float
    seconds: float  # how long quick attacks are repeated


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sessions(target: Target) -> float:
    """The gateway's open sessions, all workers together (Prometheus text from each one)."""
    total = 0.0
    for port in target.metrics:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            m = re.search(rb"^milter_sessions (\S+)$", r.read(), re.MULTILINE)
        total += float(m.group(1)) if m else 0.0
    return total


def settled(target: Target, within: float = 20.0) -> str:
    started = time.monotonic()
    while (n := sessions(target)) and time.monotonic() - started < within:
        time.sleep(0.1)
    return f"{n:.0f} sessions left" if n else f"sessions 0 after {time.monotonic() - started:.1f} s"


def attack_baseline(t: Target) -> str:
    time.sleep(t.seconds)
    return ""


def attack_smtp_garbage(t: Target) -> str:
    def binary(i: int) -> str:
        c = Raw(t.smtp)
        try:
            c.reply()
            c.sock.sendall(random.Random(i).randbytes(64 * 1024))
            data, how = c.rest(t.command_timeout + 10)
        finally:
            c.close()
        return f"{data.count(CRLF)} replies, {how}"

    def printable(_: int) -> None:
        c = Raw(t.smtp)
        try:
            c.reply()
            c.sock.sendall(b"XYZZY plugh\r\n" * 10)
            c.rest(10)
        finally:
            c.close()

    notes = parallel(binary, 4)
    rounds = 0
    for _ in repeat(t.seconds / 2):
        parallel(printable, 4)
        rounds += 4
    return f"4 x 64 KiB random: {'; '.join(notes)}; {rounds} x 10 unknown commands"


def attack_milter_garbage(t: Target) -> str:
    rng = random.Random(1)

    def one(i: int) -> None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", t.milter), timeout=10) as s:
            s.sendall(bytes([1 + i % 255]) + rng.randbytes(4000))
            while s.recv(65536):
                pass

    n = 0
    for _ in repeat(t.seconds):
        parallel(one, 8)
        n += 8
    return f"{n} connections of random bytes"


def attack_unending_lines(t: Target) -> str:
    def command(_: int) -> str:
        c = Raw(t.smtp)
        try:
            c.reply()
            started = time.monotonic()
            sent, ended = blast(c.sock, b"NOOP " + b"x" * 65531, t.command_timeout + 10)
        finally:
            c.close()
        return f"command line: {sent / 2**20:.0f} MiB, closed after {ended - started:.2f} s"

    def data(_: int) -> str:
        c = Raw(t.smtp)
        try:
            c.open_transaction()
            started = time.monotonic()
            sent, ended = blast(c.sock, b"x" * 65536, t.data_timeout + 10)
            reply, _how = c.rest(5)
        finally:
            c.close()
        return f"DATA line: {sent / 2**20:.0f} MiB, closed after {ended - started:.2f} s ({reply[:9]!r})"

    with ThreadPoolExecutor(2) as pool:
        notes = [pool.submit(command, 0), pool.submit(data, 0)]
        return "; ".join(f.result() for f in notes)


def attack_milter_unending_packet(t: Target) -> str:
    def one(i: int) -> float:
        with socket.create_connection(("127.0.0.1", t.milter), timeout=t.command_timeout + 10) as s:
            s.sendall(optneg())
            read_packet(s)
            started = time.monotonic()
            s.sendall(OPENING + struct.pack("!I", 1_000_000) + b"B" + b"x" * 10_000)
            s.settimeout(0.25)
            while time.monotonic() - started < t.command_timeout + 10:
                try:
                    if s.recv(1) == b"":
                        break
                except TimeoutError:
                    if i:
                        with contextlib.suppress(OSError):
                            s.sendall(b"x")  # one more byte of the packet
                except OSError:
                    break
            return time.monotonic() - started

    stalled, dribbled = parallel(one, 2)
    return f"stalled packet closed after {stalled:.2f} s, dribbled packet after {dribbled:.2f} s"


def attack_ten_megabyte_lines(t: Target) -> str:
    big = b"x" * (10 * 1024 * 1024)
    replies: list[str] = []

    def smtp(i: int) -> None:
        c = Raw(t.smtp)
        try:
            if i % 2 == 0:
                c.reply()
                c.sock.sendall(b"NOOP " + big + b"\r\n")
            else:
                c.open_transaction()
                c.sock.sendall(b"Subject: long\r\n\r\n" + big + b"\r\nend\r\n.\r\n")
            replies.append(c.reply()[1][:9])
            c.cmd(b"QUIT")
        finally:
            c.close()

    rounds = 0
    for _ in repeat(t.seconds):
        parallel(smtp, 2)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", t.milter), timeout=10) as s:
            s.sendall(optneg() + OPENING + struct.pack("!I", len(big) + 1) + b"B" + big[:1024 * 1024])
            while s.recv(65536):
                pass
        rounds += 1
    return (f"{rounds} rounds of a 10 MB command line, DATA line and milter packet; "
            f"replies {sorted(set(replies))}")


def attack_smtp_pipelining(t: Target) -> str:
    script = b"EHLO pipe.test\r\n" + b"MAIL FROM:<p@sender.test>\r\nRSET\r\nNOOP\r\n" * 1667 + b"QUIT\r\n"

    def reading(_: int) -> int:
        c = Raw(t.smtp)
        try:
            c.reply()
            writer = threading.Thread(target=c.sock.sendall, args=(script,))
            writer.start()
            n = 0
            while c.reply()[0] != 221:
                n += 1
            writer.join()
            return n
        finally:
            c.close()

    answered = 0
    for _ in repeat(t.seconds):
        answered += sum(parallel(reading, 2))
    silent = unread_socket(t.smtp)
    try:
        started = time.monotonic()
        sent, how = send_unread(silent, b"EHLO unread.test\r\n" * 200_000)
        closed = closed_by_peer(silent, t.command_timeout + 30)
        took = time.monotonic() - started
        dropped = "still open" if closed is None else f"closed {took:.1f} s after it began"
    finally:
        silent.close()
    return (f"{answered} pipelined commands answered; a client never reading: {sent / 2**20:.1f} MiB "
            f"sent ({how}), {dropped}")


def attack_milter_pipelining(t: Target) -> str:
    rounds = 5000
    script = (optneg(steps=0) + OPENING
              + (pkt(b"M", z(b"<p@sender.test>")) + pkt(b"R", z(b"<q@rcpt.test>")) + pkt(b"A")) * rounds
              + pkt(b"A") * 52_000 + pkt(b"Q"))

    def commands() -> int:
        with socket.create_connection(("127.0.0.1", t.milter), timeout=60) as s:
            writer = threading.Thread(target=s.sendall, args=(script,))
            writer.start()
            n = 0
            with contextlib.suppress(EOFError):
                while True:
                    read_packet(s)
                    n += 1
            writer.join()
            return n

    def messages() -> int:
        mids = [f"<pipelined-{i}@abuse.test>".encode() for i in range(100)]
        with socket.create_connection(("127.0.0.1", t.milter), timeout=60) as s:
            s.sendall(optneg() + OPENING + b"".join(message_packets(m) for m in mids) + pkt(b"Q"))
            read_packet(s)
            return sum(until_final(s) == (b"c", b"") for _ in mids)

    with ThreadPoolExecutor(2) as pool:
        replies, accepted = pool.submit(commands), pool.submit(messages)
        note = (f"{replies.result()} replies to {2 * rounds + 3} + 52,000 commands; "
                f"{accepted.result()}/100 pipelined messages")
    silent = unread_socket(t.milter)
    try:
        started = time.monotonic()
        sent, how = send_unread(silent, optneg(steps=0) * 1_000_000)
        closed = closed_by_peer(silent, t.command_timeout + 30)
        took = time.monotonic() - started
        dropped = "still open" if closed is None else f"closed {took:.1f} s after it began"
    finally:
        silent.close()
    return f"{note}; an MTA never reading: {sent / 2**20:.1f} of 16.2 MiB sent ({how}), {dropped}"


def _flood_note(t: Target, port: int, smtp: bool) -> str:
    """Over the limit: SMTP says 421 4.7.0; a milter connection is closed at once (told apart from
    one let in by when it closed, which a full accept queue blurs: see "opened in")."""
    count = t.max_sessions * t.workers + 1000
    f = flood(port, count, t.command_timeout + 15)
    left = sum(1 for e in f.ended if e is None)
    if smtp:
        busy = sum(1 for g in f.got if g.startswith("421 4.7.0"))
        let_in = sum(1 for g in f.got if g.startswith("220 "))
    else:
        busy = sum(1 for e in f.ended if e is not None and e < t.command_timeout - 0.3)
        let_in = count - busy - left
    return (f"{count} connections opened in {f.opened:.2f} s; {busy} refused at once, {let_in} let in "
            f"(closed by the timeout), {left} left open")


def attack_smtp_flood(t: Target) -> str:
    return _flood_note(t, t.smtp, smtp=True)


def attack_milter_flood(t: Target) -> str:
    return _flood_note(t, t.milter, smtp=False)


def attack_smtp_stall(t: Target) -> str:
    def one(i: int) -> str:
        c = Raw(t.smtp)
        try:
            c.open_transaction()
            started = time.monotonic()
            c.sock.sendall(b"Subject: half\r\n\r\nfirst half\r\n")
            if i:  # a line every half second, never the end
                c.sock.settimeout(0.5)
                while time.monotonic() - started < t.data_timeout + 10:
                    try:
                        c._buf += c.sock.recv(65536)
                        break
                    except TimeoutError:
                        c.sock.sendall(b"one more line\r\n")
            data, _how = c.rest(t.data_timeout + 10)
            return f"{time.monotonic() - started:.2f} s {data[:9]!r}"
        finally:
            c.close()

    return "closed after " + ", ".join(parallel(one, 3))


def attack_milter_stall(t: Target) -> str:
    def one(i: int) -> float:
        with socket.create_connection(("127.0.0.1", t.milter), timeout=t.command_timeout + 10) as s:
            s.sendall(optneg())
            read_packet(s)
            started = time.monotonic()
            s.sendall(OPENING + message_packets(f"<stall-{i}@abuse.test>".encode(), eom=False))
            s.recv(1)
            return time.monotonic() - started

    return "closed after " + ", ".join(f"{x:.2f} s" for x in parallel(one, 3))


ATTACKS: list[tuple[str, Callable[[Target], str]]] = [
    ("baseline (no attack)", attack_baseline),
    ("smtp garbage", attack_smtp_garbage),
    ("milter garbage", attack_milter_garbage),
    ("unending lines", attack_unending_lines),
    ("milter unending packet", attack_milter_unending_packet),
    ("10 MB lines", attack_ten_megabyte_lines),
    ("smtp pipelining", attack_smtp_pipelining),
    ("milter pipelining", attack_milter_pipelining),
    ("smtp flood", attack_smtp_flood),
    ("milter flood", attack_milter_flood),
    ("smtp stall mid-DATA", attack_smtp_stall),
    ("milter stall mid-message", attack_milter_stall),
    ("baseline again", attack_baseline),
]


def honest_process(smtp: int, milter: int, label: str, clients: int, conn: Any) -> None:
    """Honest clients in a process of their own, so that attacking threads do not slow them."""
    load = HonestLoad(smtp, milter, label, honest_messages(), smtp_clients=clients)
    load.start()
    conn.send("started")
    conn.recv()
    load.stop(at_least=5)
    during, milter_during = load.during(), load.during(load.milter)
    conn.send({
        "smtp": [s.seconds for s in during],
        "milter": [s.seconds for s in milter_during],
        "failed": [f"{s.code} {s.text}"[:120] for s in load.smtp + load.milter if s.code != 250],
        "refused": sum(s.refused for s in load.smtp + load.milter),
    })


def measure(t: Target, name: str, attack: Callable[[Target], str], clients: int) -> str:
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    label = re.sub(r"\W+", "-", name)
    child = ctx.Process(target=honest_process, args=(t.smtp, t.milter, label, clients, theirs))
    child.start()
    try:
        mine.recv()
        started = time.monotonic()
        try:
            note = attack(t)
        except Exception as exc:  # an attack that broke is a finding too; report it and go on
            note = f"attack failed: {exc!r}"[:200]
        took = time.monotonic() - started
        mine.send("stop")
        r = mine.recv()
    finally:
        child.join(60)
    smtp, milter = r["smtp"], r["milter"]
    line = (f"{name:<26} {took:5.1f} s  n={len(smtp):4d}  p50 {percentile(smtp, 0.5) * 1000:7.1f} ms  "
            f"p99 {percentile(smtp, 0.99) * 1000:7.1f} ms  | milter n={len(milter):3d} "
            f"p99 {percentile(milter, 0.99) * 1000:7.1f} ms | failed {len(r['failed'])} "
            f"refused {r['refused']}")
    print(line, flush=True)
    if note:
        print(f"{'':28}{note}", flush=True)
    print(f"{'':28}{settled(t)}" + (f"; failures: {r['failed'][:2]}" if r["failed"] else ""), flush=True)
    return line


def run_sink(port: int) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.gateway import run_sink as sink

    sink(port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0, help="how long quick attacks are repeated")
    ap.add_argument("--smtp-clients", type=int, default=4, help="honest smtplib threads")
    ap.add_argument("--only", help="run only the attacks whose name contains this (baselines always run)")
    ap.add_argument("--gateway-log", help="keep the gateway's log in this file (default: discarded)")
    args = ap.parse_args()
    sink_port, smtp, milter, metrics = free_port(), free_port(), free_port(), free_port()
    t = Target(smtp, milter, [metrics + i for i in range(args.workers)], 20, args.workers, 2.0, 3.0,
               args.seconds)
    ctx = multiprocessing.get_context("spawn")
    sink = ctx.Process(target=run_sink, args=(sink_port,), daemon=True)
    sink.start()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "abuse.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{smtp}"\nmilter_listen = "inet:127.0.0.1:{milter}"\n'
            f'downstream = "127.0.0.1:{sink_port}"\nworkers = {args.workers}\n'
            f"max_sessions = {t.max_sessions}\n"
            f"command_timeout = {t.command_timeout}\ndata_timeout = {t.data_timeout}\n"
            f'metrics_listen = "127.0.0.1:{metrics}"\nhostname = "gw.bench"\n'
            f'[store]\nurl = "sqlite:///{tmp}/abuse.db"\n[auth]\nenabled = false\n'
        )
        log = Path(args.gateway_log or f"{tmp}/gateway.log")
        with log.open("wb") as out:
            gw = subprocess.Popen([sys.executable, "-c", "from milter.cli import main; main()", "serve",
                                   "--config", str(config)], cwd=ROOT, stderr=out, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    sessions(t)  # every worker answers /metrics once it listens
                    Raw(smtp).close()
                    break
                except OSError:
                    if gw.poll() is not None or time.monotonic() > deadline:
                        sys.exit(f"milter serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
                    time.sleep(0.5)
            print(f"milter serve, {args.workers} workers, max_sessions {t.max_sessions} each, "
                  f"command_timeout {t.command_timeout} s, data_timeout {t.data_timeout} s; honest: "
                  f"{args.smtp_clients} SMTP threads + 1 milter thread in their own process. Latency per "
                  f"honest message, SMTP "
                  f"(connect to 250), during each attack:", flush=True)
            for name, attack in ATTACKS:
                if args.only and args.only not in name and attack is not attack_baseline:
                    continue
                measure(t, name, attack, args.smtp_clients)
        finally:
            gw.terminate()
            try:
                gw.wait(30)
            except subprocess.TimeoutExpired:
                gw.kill()
            sink.terminate()


if __name__ == "__main__":
    main()
