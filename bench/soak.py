"""A soak of the fault matrix: real corpus mail through `milter serve` while faults are injected.

    .venv/bin/python bench/soak.py                      # the full soak: 10,000 messages, 50 clients
    .venv/bin/python bench/soak.py --short              # CI's version: 1,000 messages, every fault once
    .venv/bin/python bench/soak.py --store postgres --json /tmp/soak.json

Pieces, all on loopback and all real: `milter serve --workers N` (a subprocess in its own session,
tests/serve_support.py) with a copy of the shipped model, sender authentication on against a DNS
responder of ours, a store (SQLite file, or a throw-away schema of PostgreSQL's `test` database
reached through a TCP proxy of ours), and an aiosmtpd sink downstream. Clients send real corpus
messages, each with a unique Message-ID, XFORWARD naming an outside client (so SPF is checked), and
behave like an MTA: a 4xx or a broken connection is retried after a short back-off until a 2xx or a 5xx.

Faults, one after another on a schedule while the load runs (see docs/soak.md):
  dns_drop           the DNS responder drops half of the queries
  downstream_slow    the sink takes the message, then waits before its 250 (some waits past the
                     gateway's downstream timeout: the message is there, our 250 never is)
  downstream_4xx     the sink answers 451 to DATA
  downstream_down    the sink stops listening and drops its connections
  sighup             a model reload under load
  store_unavailable  SQLite: another connection holds an exclusive lock; PostgreSQL: the proxy is cut
  kill_worker        SIGKILL of one worker (the supervisor restarts it); for the 2 s before it the sink
                     answers 0.2-2 s late, so the kill finds copies taken downstream and not yet answered
  model_corrupt      the model file is replaced by a truncated copy, SIGHUP (must be refused, the old
                     model keeps serving), then restored, SIGHUP (must load)
  downstream_5xx     the sink answers 554 to DATA (the gateway passes it back: the message is rejected)
  kill_gateway       SIGKILL of the whole gateway (parent, workers, prepare processes), then a restart;
                     the sink lags before it as for kill_worker

The accounting at the end, by Message-ID: every message ends delivered (2xx, a copy at the sink),
quarantined (2xx "quarantined as N", row N holds its bytes) or rejected (5xx); delivered +
quarantined + rejected = sent. A 2xx without its copy or row is a lost message. Extra copies at the
sink and extra or orphan store rows are counted and each is given its cause: a SIGKILL that cut the
client's connection during that attempt, or a downstream (or store) reply lost after the message was
taken; any other is "unexplained" and fails the run, as does a lost or unfinished message, a quarantine
row without its bytes, or a fault that did not do what it should. RSS of every gateway process is
sampled throughout. Exit status 0 only when everything adds up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
import weakref
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import aiosmtplib
import dns.message
import dns.rcode
from aiosmtpd.smtp import Envelope as SMTPEnvelope
from aiosmtpd.smtp import Session

from milter.gateway.session import XForwardSMTP

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from serve_support import ServeProcess  # noqa: E402

CORPORA = ROOT / ".cache" / "corpora"
MODEL_DIR = ROOT / "models"
MAX_LINE = 998  # what an MTA hands a content filter (Postfix folds longer lines)
MAX_SIZE = 1_000_000
RCPT = "rcpt@rcpt.test"
DOWNSTREAM_TIMEOUT = 5.0  # the gateway's server.downstream_timeout in the soak
SLOW_PAST_TIMEOUT = 0.1  # share of downstream_slow replies that come after that timeout
CLIENT_TIMEOUT = 60.0
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=5"
LISTENING = "milter.gateway: listening "
KILL_SLACK = 2.0  # seconds after an attempt ended in which a SIGKILL still counts as its cause

# -- the schedule ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    name: str
    seconds: float = 0.0  # how long the fault lasts (0: a single event)
    expect: float = 5.0  # rough length of the step, for pacing the load over the schedule


def schedule(short: bool, store: str) -> list[Fault]:
    """Every fault once. SQLite's outage lasts longer than the store's 10 s busy timeout even in the
    short version: a shorter lock only delays writes, it never fails one."""
    if short:
        store_s = 12.0 if store == "sqlite" else 6.0
        return [
            Fault("dns_drop", 5), Fault("downstream_slow", 8), Fault("downstream_4xx", 4),
            Fault("downstream_down", 5), Fault("sighup", expect=3), Fault("store_unavailable", store_s),
            Fault("kill_worker", expect=8), Fault("model_corrupt", expect=8), Fault("downstream_5xx", 4),
            Fault("kill_gateway", expect=20),
        ]
    return [
        Fault("dns_drop", 20), Fault("downstream_slow", 20), Fault("downstream_4xx", 15),
        Fault("downstream_down", 20), Fault("sighup", expect=5), Fault("store_unavailable", 30),
        Fault("kill_worker", expect=10), Fault("model_corrupt", expect=10), Fault("downstream_5xx", 10),
        Fault("kill_gateway", expect=30),
    ]


# -- messages ----------------------------------------------------------------------------------


def normalise(raw: bytes) -> bytes:
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if raw.startswith(b"From "):  # an mbox separator, not a header
        raw = raw.partition(b"\r\n")[2]
    return raw


def suitable(raw: bytes) -> bool:
    """What an MTA would hand over: not huge, no line past 998, headers then a body."""
    return (
        len(raw) <= MAX_SIZE
        and b"\r\n\r\n" in raw
        and max(map(len, raw.split(b"\r\n"))) <= MAX_LINE
    )


def pick_corpus(n: int) -> list[Path]:
    """`n` messages spread evenly over every corpus and label (ham, spam, phish mixed)."""
    files = sorted(CORPORA.glob("*/*/*.eml"))
    if not files:
        raise SystemExit(f"no corpus under {CORPORA}: unpack with ../shared/corpora/unpack .cache/corpora")
    step = max(1, len(files) // n)
    chosen: list[Path] = []
    for offset in range(step):
        for f in files[offset::step]:
            if suitable(normalise(f.read_bytes())):
                chosen.append(f)
                if len(chosen) == n:
                    return chosen
    raise SystemExit(f"only {len(chosen)} suitable corpus messages, {n} asked for")


def with_message_id(raw: bytes, mid: str) -> bytes:
    """The message with its Message-ID field(s) replaced by `mid` (first field of the header)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):  # continuation of the field before
            if not dropping:
                kept.append(line)
            continue
        dropping = line.lower().startswith(b"message-id:")
        if not dropping:
            kept.append(line)
    return b"\r\n".join([f"Message-ID: {mid}".encode(), *kept]) + b"\r\n\r\n" + body


_MSGID = re.compile(rb"(?im)^Message-ID:[ \t]*(<[^>\r\n]*>)")
_FROM = re.compile(rb"(?im)^From:[^\r\n]*?([\w.+-]+@[\w-]+(?:\.[\w-]+)+)")


def header_message_id(raw: bytes) -> str:
    m = _MSGID.search(raw.partition(b"\r\n\r\n")[0])
    return m.group(1).decode() if m else "?"


def envelope_sender(raw: bytes) -> str:
    """The From address as MAIL FROM, as most senders do (SPF then checks its domain)."""
    m = _FROM.search(raw, 0, 65536)
    return m.group(1).decode() if m else "soak@sender.test"


# -- what happened -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    t0: float
    t1: float
    code: int  # the reply to the transaction; 0: the connection failed or broke
    text: str


@dataclass
class Item:
    index: int
    mid: str
    path: Path
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def final(self) -> Attempt | None:
        last = self.attempts[-1] if self.attempts else None
        return last if last is not None and last.code // 100 in (2, 5) else None


@dataclass
class Copy:
    """One copy the sink accepted (committed when it arrived, as an MTA's queue file)."""

    t: float
    reply_lost: bool = False  # the sink's 250 never went out (the gateway had given up)


@dataclass
class FaultRun:
    name: str
    t0: float
    t1: float = 0.0
    at: float | None = None  # when a SIGKILL was sent
    ok: bool = True
    detail: str = ""


@dataclass(frozen=True)
class Row:
    id: int
    mid: str | None
    t: float
    quarantined: bool
    has_raw: bool


_QUARANTINED = re.compile(r"quarantined as (\d+)")


def quarantine_row(a: Attempt) -> int | None:
    m = _QUARANTINED.search(a.text) if a.code // 100 == 2 else None
    return int(m.group(1)) if m else None


# -- the sink ----------------------------------------------------------------------------------


class Sink:
    """The downstream MTA: aiosmtpd, with modes the schedule switches (up, slow, 4xx, 5xx; down = stop)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.mode = "up"
        self.copies: dict[str, list[Copy]] = defaultdict(list)
        self.waiting = 0  # copies taken whose 250 is not sent yet
        self._server: asyncio.AbstractServer | None = None
        self._conns: weakref.WeakSet[XForwardSMTP] = weakref.WeakSet()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def protocol() -> XForwardSMTP:
            proto = XForwardSMTP(self, hostname="sink.test", data_size_limit=None, enable_SMTPUTF8=True,
                                 loop=loop)
            self._conns.add(proto)
            return proto

        self._server = await loop.create_server(protocol, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        """Down: stop listening and drop every connection (as a host whose MTA died)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for proto in list(self._conns):
            if isinstance(proto.transport, asyncio.Transport):
                proto.transport.abort()

    async def handle_DATA(self, server: XForwardSMTP, session: Session, envelope: SMTPEnvelope) -> str:
        mode = self.mode
        if mode == "4xx":
            return "451 4.3.0 soak: downstream busy, try later"
        if mode == "5xx":
            return "554 5.7.1 soak: downstream refuses this message"
        copy = Copy(time.time())
        self.copies[header_message_id(envelope.original_content or b"")].append(copy)
        if mode in ("slow", "lag"):
            past = mode == "slow" and random.random() < SLOW_PAST_TIMEOUT
            delay = DOWNSTREAM_TIMEOUT + 3.0 if past else random.uniform(0.2, 2.0)
            self.waiting += 1
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:  # the gateway hung up meanwhile
                copy.reply_lost = True
                raise
            finally:
                self.waiting -= 1
            if server.transport is None or server.transport.is_closing():
                copy.reply_lost = True
        return "250 2.0.0 Ok: queued"


# -- DNS responder -----------------------------------------------------------------------------


class DnsResponder(asyncio.DatagramProtocol):
    """NXDOMAIN for every name at once (the corpora's domains and keys are long gone), except the
    share `drop` of the queries, which it ignores (a lossy path to the resolver)."""

    def __init__(self) -> None:
        self.drop = 0.0
        self.queries = 0
        self.dropped = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # selector transports aren't subclasses

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.queries += 1
        if self.drop and random.random() < self.drop:
            self.dropped += 1
            return
        try:
            reply = dns.message.make_response(dns.message.from_wire(data))
        except Exception:
            return
        reply.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(), addr)


# -- store and its outage ----------------------------------------------------------------------


class TcpProxy:
    """A TCP proxy in front of PostgreSQL that the schedule can cut: stop listening and reset every
    connection (as a database host that went away), then listen again."""

    def __init__(self, target: tuple[str, int], port: int) -> None:
        self.target = target
        self.port = port
        self._server: asyncio.AbstractServer | None = None
        self._writers: weakref.WeakSet[asyncio.StreamWriter] = weakref.WeakSet()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port, reuse_address=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def outage(self, seconds: float) -> str:
        if self._server is not None:
            self._server.close()
            self._server = None
        cut = 0
        for w in list(self._writers):
            w.transport.abort()
            cut += 1
        await asyncio.sleep(seconds)
        await self.start()
        return f"proxy cut for {seconds:.0f} s ({cut // 2} connections reset)"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.transport.abort()


class SqliteLock:
    """SQLite's outage: another connection holds the database's write lock (BEGIN EXCLUSIVE) longer
    than the gateway's busy timeout, so its commits fail."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _hold(self, seconds: float) -> float:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            got = time.time()
            time.sleep(seconds)
            conn.execute("ROLLBACK")
            return got
        finally:
            conn.close()

    async def outage(self, seconds: float) -> str:
        t0 = time.time()
        got = await asyncio.to_thread(self._hold, seconds)
        return f"exclusive lock held {seconds:.0f} s (acquired after {got - t0:.1f} s)"

    async def close(self) -> None:
        pass


@dataclass
class StoreSetup:
    url: str  # what the gateway uses
    direct_url: str  # what the accounting reads (not through the proxy)
    fault: TcpProxy | SqliteLock
    schema: str | None = None


async def setup_store(kind: str, workdir: Path, proxy_port: int) -> StoreSetup:
    if kind == "sqlite":
        path = workdir / "store.db"
        return StoreSetup(f"sqlite:///{path}", f"sqlite:///{path}", SqliteLock(path))
    import psycopg

    schema = f"soak_{secrets.token_hex(5)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    proxy = TcpProxy(("127.0.0.1", 5432), proxy_port)
    await proxy.start()
    options = f"options=-csearch_path%3D{schema}"
    return StoreSetup(
        f"postgresql+psycopg://postgres@127.0.0.1:{proxy_port}/test?{options}",
        f"postgresql+psycopg://postgres@127.0.0.1:5432/test?{options}",
        proxy,
        schema,
    )


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def read_rows(url: str) -> list[Row]:
    """Every verdict row, with whether it is quarantined and still holds its bytes."""
    from sqlalchemy import select

    from milter.store import Store
    from milter.store.models import MESSAGES, QUARANTINE

    store = Store.open(url)
    try:
        stmt = select(
            MESSAGES.c.id, MESSAGES.c.message_id, MESSAGES.c.received_at,
            QUARANTINE.c.message_pk, QUARANTINE.c.raw.is_not(None),
        ).outerjoin(QUARANTINE, QUARANTINE.c.message_pk == MESSAGES.c.id)
        with store.engine.connect() as conn:
            rows = conn.execute(stmt).all()
    finally:
        store.close()
    out = []
    for pk, mid, received, qpk, has_raw in rows:
        t = received.timestamp() if received.tzinfo else received.replace(tzinfo=_utc()).timestamp()
        out.append(Row(int(pk), mid, t, qpk is not None, bool(has_raw) if qpk is not None else False))
    return out


def _utc() -> Any:
    from datetime import UTC

    return UTC


# -- the gateway -------------------------------------------------------------------------------


class Gateway:
    """`milter serve` in its own session; the log is one file across restarts."""

    def __init__(self, workdir: Path, config: str, workers: int) -> None:
        self.serve = ServeProcess(workdir)
        self.config = config
        self.workers = workers
        self.log_path = workdir / "serve.log"
        self.incarnation = 0

    @property
    def pid(self) -> int:
        assert self.serve.proc is not None
        return int(self.serve.proc.pid)

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_log(self, text: str, count: int, since: int, limit: float) -> int:
        """Wait (at most `limit` s) until `text` appears `count` times after `since`; how many did."""
        deadline = time.monotonic() + limit
        while True:
            seen = self.log_since(since).count(text)
            if seen >= count or time.monotonic() > deadline:
                return seen
            await asyncio.sleep(0.25)

    async def launch(self, limit: float = 300.0) -> None:
        since = self.log_size()
        expect = self.workers  # one "listening" line per worker (or the single gateway)

        def ready() -> bool:
            return self.log_since(since).count(LISTENING) >= expect

        await asyncio.to_thread(self.serve.launch, self.config, ["--metrics-listen", "off"], ready, limit)
        self.incarnation += 1

    async def kill(self) -> None:
        await asyncio.to_thread(self.serve.kill)

    async def stop(self) -> None:
        await asyncio.to_thread(self.serve.stop)

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid, as the supervisor last logged them."""
        found: dict[int, int] = {}
        for m in re.finditer(r"worker_started worker=(\d+) pid=(\d+)", self.log_since(0)):
            found[int(m.group(1))] = int(m.group(2))
        return found


# -- process tree and RSS ----------------------------------------------------------------------


def live_processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, command line) of every live (not zombie) process; bench/rss.py too."""
    out: dict[int, tuple[int, int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            rest = stat[stat.rindex(")") + 2 :].split()
            if rest[0] == "Z":
                continue
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        out[int(name)] = (int(rest[1]), int(rest[3]), cmd)
    return out


def session_processes(sid: int) -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of every live process in session `sid` (the gateway's own)."""
    return {pid: (ppid, cmd) for pid, (ppid, psid, cmd) in live_processes().items() if psid == sid}


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def process_roles(sid: int, workers: dict[int, int]) -> dict[str, int]:
    """Role name -> pid: parent, worker-N, worker-N/prepare-K, resource-tracker; anything else in
    the session (a prepare process whose worker died, say) is `orphan-PID`."""
    procs = session_processes(sid)
    index = {pid: i for i, pid in workers.items() if pid in procs}
    roles: dict[str, int] = {}
    prepare: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, cmd) in sorted(procs.items()):
        if pid == sid:
            roles["parent"] = pid
        elif pid in index:
            roles[f"worker-{index[pid]}"] = pid
        elif "resource_tracker" in cmd:
            roles["resource-tracker"] = pid
        elif ppid in index:
            prepare[index[ppid]].append(pid)
        elif ppid == sid and not workers:  # --workers 1: the parent's own prepare processes
            prepare[-1].append(pid)
        else:
            roles[f"orphan-{pid}"] = pid
    for i, pids in prepare.items():
        for k, pid in enumerate(pids):
            roles[f"{'' if i < 0 else f'worker-{i}/'}prepare-{k}"] = pid
    return roles


@dataclass
class RssLog:
    samples: list[tuple[float, int, str, int, int]] = field(default_factory=list)  # t, inc, role, pid, KiB
    marks: dict[str, dict[str, int]] = field(default_factory=dict)  # label -> role -> KiB

    def sample(self, gw: Gateway) -> dict[str, int]:
        if gw.serve.proc is None or gw.serve.proc.poll() is not None:
            return {}
        roles = process_roles(gw.pid, gw.worker_pids() if gw.workers > 1 else {})
        now: dict[str, int] = {}
        for role, pid in roles.items():
            kib = rss_kib(pid)
            if kib is not None:
                now[role] = kib
                self.samples.append((time.time(), gw.incarnation, role, pid, kib))
        return now

    def mark(self, label: str, gw: Gateway) -> None:
        self.marks[label] = self.sample(gw)

    def table(self) -> dict[str, dict[str, float | None]]:
        """Role -> MiB at each mark and the most seen."""
        roles = sorted({r for _, _, r, _, _ in self.samples})
        out: dict[str, dict[str, float | None]] = {}
        for role in roles:
            row: dict[str, float | None] = {
                label: round(m[role] / 1024, 1) if role in m else None for label, m in self.marks.items()
            }
            row["max"] = round(max(k for _, _, r, _, k in self.samples if r == role) / 1024, 1)
            out[role] = row
        return out


# -- the clients -------------------------------------------------------------------------------


class Load:
    """`clients` MTA-like senders; new messages released at `rate`, a 4xx retried after a back-off."""

    def __init__(self, port: int, items: list[Item], clients: int, rate: float, retry_delay: float) -> None:
        self.port = port
        self.items = items
        self.clients = clients
        self.rate = rate
        self.retry_delay = retry_delay
        self.ready: asyncio.Queue[Item] = asyncio.Queue()
        self.finished = 0
        self.done = asyncio.Event()
        self.released = asyncio.Event()
        self.client_errors: Counter[str] = Counter()

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        try:
            await self._feed()
            await self.done.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _feed(self) -> None:
        start = time.monotonic()
        for k, item in enumerate(self.items):
            await asyncio.sleep(max(0.0, start + k / self.rate - time.monotonic()))
            self.ready.put_nowait(item)
        self.released.set()

    async def _client(self, index: int) -> None:
        smtp: aiosmtplib.SMTP | None = None
        loop = asyncio.get_running_loop()
        while True:
            item = await self.ready.get()
            raw = with_message_id(normalise(item.path.read_bytes()), item.mid)
            t0 = time.time()
            code, text, smtp = await self._send(smtp, raw, item.index)
            item.attempts.append(Attempt(t0, time.time(), code, text))
            if code // 100 in (2, 5):
                self.finished += 1
                if self.finished == len(self.items):
                    self.done.set()
            else:  # as an MTA would: later, on a fresh or reused connection
                delay = self.retry_delay * random.uniform(1.0, 2.0)
                loop.call_later(delay, self.ready.put_nowait, item)

    async def _send(
        self, smtp: aiosmtplib.SMTP | None, raw: bytes, k: int
    ) -> tuple[int, str, aiosmtplib.SMTP | None]:
        try:
            if smtp is None or not smtp.is_connected:
                smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, timeout=CLIENT_TIMEOUT,
                                       start_tls=False)
                await smtp.connect()
                await smtp.ehlo()
            await smtp.execute_command(b"XFORWARD", f"ADDR=203.0.113.{k % 250 + 1}".encode())
            _, text = await smtp.sendmail(envelope_sender(raw), [RCPT], raw)
            return 250, text, smtp
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            return first.code, first.message, await _reset(smtp)
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421:  # the server closes after a 421
                _drop(smtp)
                return exc.code, exc.message, None
            return exc.code, exc.message, await _reset(smtp)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.client_errors[type(exc).__name__] += 1
            _drop(smtp)
            return 0, f"{type(exc).__name__}: {exc}"[:200], None


async def _reset(smtp: aiosmtplib.SMTP | None) -> aiosmtplib.SMTP | None:
    if smtp is None:
        return None
    try:
        await smtp.rset()
        return smtp
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        _drop(smtp)
        return None


def _drop(smtp: aiosmtplib.SMTP | None) -> None:
    if smtp is not None:
        smtp.close()


# -- the faults --------------------------------------------------------------------------------


@dataclass
class Soak:
    gateway: Gateway
    sink: Sink
    dns: DnsResponder
    store: StoreSetup
    model: Path  # the gateway's copy of current.onnx
    rss: RssLog
    runs: list[FaultRun] = field(default_factory=list)


class FaultFailed(Exception):
    pass


async def f_dns_drop(s: Soak, f: Fault, run: FaultRun) -> str:
    before = s.dns.dropped, s.dns.queries
    s.dns.drop = 0.5
    try:
        await asyncio.sleep(f.seconds)
    finally:
        s.dns.drop = 0.0
    dropped, queries = s.dns.dropped - before[0], s.dns.queries - before[1]
    if not dropped:
        raise FaultFailed(f"no DNS query dropped ({queries} queries in the window)")
    return f"{dropped} of {queries} queries dropped"


def sink_mode(mode: str) -> Callable[[Soak, Fault, FaultRun], Awaitable[str]]:
    async def fault(s: Soak, f: Fault, run: FaultRun) -> str:
        copies = sum(map(len, s.sink.copies.values()))
        s.sink.mode = mode
        try:
            await asyncio.sleep(f.seconds)
        finally:
            s.sink.mode = "up"
        return f"sink {mode} for {f.seconds:.0f} s ({sum(map(len, s.sink.copies.values())) - copies} copies)"

    return fault


async def f_downstream_down(s: Soak, f: Fault, run: FaultRun) -> str:
    await s.sink.stop()
    try:
        await asyncio.sleep(f.seconds)
    finally:
        await s.sink.start()
    return f"sink stopped for {f.seconds:.0f} s"


async def _sighup_and_wait(s: Soak, text: str) -> int:
    since = s.gateway.log_size()
    os.kill(s.gateway.pid, signal.SIGHUP)
    return await s.gateway.wait_log(text, s.gateway.workers, since, 90)


async def f_sighup(s: Soak, f: Fault, run: FaultRun) -> str:
    ok = await _sighup_and_wait(s, "model reloaded:")
    if ok < s.gateway.workers:
        raise FaultFailed(f"{ok} of {s.gateway.workers} workers logged 'model reloaded'")
    return f"{ok} workers reloaded"


async def f_model_corrupt(s: Soak, f: Fault, run: FaultRun) -> str:
    good = s.model.read_bytes()
    s.model.write_bytes(good[: len(good) // 2])  # a copy cut short: what a full disk leaves behind
    try:
        refused = await _sighup_and_wait(s, "model reload failed, keeping")
    finally:
        s.model.write_bytes(good)
    reloaded = await _sighup_and_wait(s, "model reloaded:")
    n = s.gateway.workers
    if refused < n or reloaded < n:
        raise FaultFailed(f"corrupt model refused by {refused}/{n} workers, good one reloaded by "
                          f"{reloaded}/{n}")
    return f"corrupt model refused by {refused}/{n} workers; restored model reloaded by {reloaded}/{n}"


async def f_store_unavailable(s: Soak, f: Fault, run: FaultRun) -> str:
    since = s.gateway.log_size()
    detail = await s.store.fault.outage(f.seconds)
    failed = s.gateway.log_since(since).count("quarantine_failed")
    return f"{detail}; {failed} quarantine commits failed meanwhile"


async def _lagging(s: Soak) -> int:
    """Make the sink answer 0.2-2 s late for a moment, so that a SIGKILL finds messages between the
    downstream taking them and our 250 (with an instant sink that window is too short to hit)."""
    s.sink.mode = "lag"
    await asyncio.sleep(2.0)
    return s.sink.waiting


async def f_kill_worker(s: Soak, f: Fault, run: FaultRun) -> str:
    pids = s.gateway.worker_pids()
    if not pids:
        raise FaultFailed("no worker pid in the log (--workers 1?)")
    index, pid = min(pids.items())
    since = s.gateway.log_size()
    s.rss.mark("pre_kill_worker", s.gateway)
    waiting = await _lagging(s)
    os.kill(pid, signal.SIGKILL)
    run.at = time.time()
    s.sink.mode = "up"
    seen = await s.gateway.wait_log(LISTENING, 1, since, 120)
    if not seen:
        raise FaultFailed(f"worker {index} (pid {pid}) not back after 120 s")
    await asyncio.sleep(1.0)
    left = process_roles(s.gateway.pid, s.gateway.worker_pids())
    orphans = sorted(r for r in left if r.startswith("orphan"))
    return f"worker {index} pid {pid} killed ({waiting} copies awaiting the sink's 250), restarted as " \
        f"{s.gateway.worker_pids().get(index)}" + (
        f"; left behind: {', '.join(orphans)}" if orphans else ""
    )


async def f_kill_gateway(s: Soak, f: Fault, run: FaultRun) -> str:
    s.rss.mark("pre_kill_gateway", s.gateway)
    old = s.gateway.pid
    waiting = await _lagging(s)
    run.at = time.time()
    await s.gateway.kill()
    s.sink.mode = "up"
    t0 = time.time()
    await s.gateway.launch()
    back = time.time() - t0
    s.rss.mark("restarted", s.gateway)
    return f"gateway pid {old} killed with its process group ({waiting} copies awaiting the sink's 250); " \
        f"back as {s.gateway.pid} in {back:.1f} s"


FAULTS: dict[str, Callable[[Soak, Fault, FaultRun], Awaitable[str]]] = {
    "dns_drop": f_dns_drop,
    "downstream_slow": sink_mode("slow"),
    "downstream_4xx": sink_mode("4xx"),
    "downstream_down": f_downstream_down,
    "sighup": f_sighup,
    "store_unavailable": f_store_unavailable,
    "kill_worker": f_kill_worker,
    "model_corrupt": f_model_corrupt,
    "downstream_5xx": sink_mode("5xx"),
    "kill_gateway": f_kill_gateway,
}


async def run_schedule(s: Soak, faults: Sequence[Fault], gap: float) -> None:
    await asyncio.sleep(gap)
    for f in faults:
        run = FaultRun(f.name, time.time())
        s.runs.append(run)
        print(f"  {time.strftime('%H:%M:%S')} fault {f.name} ...", flush=True)
        try:
            run.detail = await FAULTS[f.name](s, f, run)
        except FaultFailed as exc:
            run.ok, run.detail = False, str(exc)
        except Exception as exc:  # report it, go on: the accounting still tells what happened
            run.ok, run.detail = False, f"{type(exc).__name__}: {exc}"
        run.t1 = time.time()
        print(f"  {time.strftime('%H:%M:%S')}   {'ok' if run.ok else 'FAILED'}: {run.detail}", flush=True)
        await asyncio.sleep(gap)


# -- the accounting ----------------------------------------------------------------------------


def attempt_at(item: Item, t: float) -> Attempt | None:
    """The attempt during (or, if the gateway went on after the client left, after) which `t` fell."""
    before = [a for a in item.attempts if a.t0 <= t]
    return before[-1] if before else None


def cause(item: Item, t: float, kills: Sequence[tuple[float, str]], what: str) -> str:
    """Why a copy or row at time `t` is not the one the client was told about (its attempt failed)."""
    a = attempt_at(item, t)
    if a is None:
        return "unexplained: before any attempt"
    if a.code // 100 == 2 and a is item.final:
        return "unexplained: beside the acknowledged one"
    if a.code == 0:
        for at, kind in kills:
            if a.t0 <= at <= a.t1 + KILL_SLACK:
                return f"{kind} after the {what} was taken, before the client heard 250"
        return "unexplained: connection lost without a SIGKILL"
    if what == "copy" and a.code // 100 == 4 and "4.4.1" in a.text:
        return "downstream reply lost after DATA (gateway gave up), client told 451"
    if what == "row" and a.code // 100 == 4 and "store" in a.text.lower():
        return "store commit's reply lost (outage), client told 451"
    return f"unexplained: attempt answered {a.code} {a.text[:60]}"


def account(
    items: Sequence[Item],
    copies: dict[str, list[Copy]],
    rows: Sequence[Row],
    kills: Sequence[tuple[float, str]],
) -> dict[str, Any]:
    by_mid = {i.mid: i for i in items}
    rows_by_mid: dict[str | None, list[Row]] = defaultdict(list)
    for r in rows:
        rows_by_mid[r.mid].append(r)
    delivered = quarantined = rejected = 0
    unfinished: list[str] = []
    lost: list[str] = []
    phantom: list[str] = []  # 2xx "delivered" whose attempt left no copy (an earlier one did)
    extra_copies: Counter[str] = Counter()
    extra_rows: Counter[str] = Counter()
    orphan_rows: Counter[str] = Counter()
    delivered_but_rejected: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for item in items:
        final = item.final
        cs = sorted(copies.get(item.mid, []), key=lambda c: c.t)
        held = rows_by_mid.get(item.mid, [])
        acked_copy: Copy | None = None
        acked_row: int | None = None
        if final is None:
            unfinished.append(item.mid)
        elif final.code // 100 == 5:
            rejected += 1
        elif (row := quarantine_row(final)) is not None:
            quarantined += 1
            acked_row = row
            if not any(r.id == row and r.quarantined and r.has_raw for r in held):
                lost.append(item.mid)
        else:
            delivered += 1
            during = [c for c in cs if c.t >= final.t0]
            if during:
                acked_copy = during[0]
            elif cs:
                phantom.append(item.mid)
                acked_copy = cs[-1]
            else:
                lost.append(item.mid)
        for c in cs:
            if c is acked_copy:
                continue
            why = cause(item, c.t, kills, "copy")
            told_5xx = final is not None and final.code // 100 == 5
            (delivered_but_rejected if told_5xx else extra_copies)[why] += 1
            examples.setdefault(why, item.mid)
        for r in held:
            if r.id == acked_row or (not r.quarantined and final is not None and acked_copy is not None):
                continue  # the quarantine row it was told about, or a delivered message's verdict
            why = cause(item, r.t, kills, "row")
            (extra_rows if acked_row is not None else orphan_rows)[why] += 1
            examples.setdefault(why, item.mid)
    foreign = [r for r in rows if r.mid not in by_mid]
    if foreign:
        orphan_rows["unexplained: row for a Message-ID never sent"] += len(foreign)
    no_raw = sum(1 for r in rows if r.quarantined and not r.has_raw)
    unexplained = sum(
        n for c in (extra_copies, extra_rows, orphan_rows, delivered_but_rejected) for k, n in c.items()
        if k.startswith("unexplained")
    )
    verdict_rows = sum(1 for r in rows if not r.quarantined)
    return {
        "sent": len(items),
        "delivered": delivered,
        "quarantined": quarantined,
        "rejected": rejected,
        "unfinished": len(unfinished),
        "lost": len(lost),
        "lost_message_ids": lost[:50],
        "unfinished_message_ids": unfinished[:50],
        "phantom_250": len(phantom),
        "adds_up": delivered + quarantined + rejected == len(items),
        "duplicate_copies_at_sink": dict(extra_copies),
        "duplicate_quarantine_rows": dict(extra_rows),
        "delivered_but_client_told_5xx": dict(delivered_but_rejected),
        "orphan_rows": dict(orphan_rows),
        "quarantine_rows_without_raw": no_raw,
        "verdict_rows_of_relayed": verdict_rows,
        "verdict_rows_missing": max(0, delivered - verdict_rows),
        "unexplained": unexplained,
        "examples": examples,
        "attempts": sum(len(i.attempts) for i in items),
        "replies": dict(Counter(f"{a.code // 100}xx" if a.code else "conn" for i in items
                                for a in i.attempts)),
    }


LOG_EVENTS = (
    "internal_error", "scan_failed", "quarantine_failed", "relay_failed", "verdict_records_failed",
    "worker_died", "prepare_pool_broken", "model reload failed", "model reloaded:", "Traceback",
)


def log_counts(text: str) -> dict[str, int]:
    return {e: text.count(e) for e in LOG_EVENTS}


# -- the run -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_config(workdir: Path, model: Path, store_url: str, sink: int, dns_port: int, listen: int,
                   workers: int) -> str:
    return f"""
[model]
path = "{model}"

[server]
listen = "127.0.0.1:{listen}"
downstream = "127.0.0.1:{sink}"
workers = {workers}
downstream_timeout = {DOWNSTREAM_TIMEOUT}
hostname = "gw.soak.test"

[store]
url = "{store_url}"

[auth]
enabled = true
timeout = 1.0
nameservers = ["127.0.0.1:{dns_port}"]
"""


async def sample_rss(s: Soak, every: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.to_thread(s.rss.sample, s.gateway)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.time()
    faults = schedule(args.short, args.store)
    if args.faults:
        wanted = set(args.faults.split(","))
        faults = [f for f in faults if f.name in wanted]
    gap = 3.0 if args.short else 10.0
    planned = sum(max(f.seconds, f.expect) + gap for f in faults) + gap
    rate = args.rate or args.messages / planned
    print(f"picking {args.messages} corpus messages ...", flush=True)
    run_id = secrets.token_hex(3)
    paths = pick_corpus(args.messages)
    items = [Item(k, f"<soak-{run_id}-{k:05d}@soak.test>", p) for k, p in enumerate(paths)]

    model_dir = workdir / "models"
    model_dir.mkdir()
    for name in ("current.onnx", "current.lgb.txt", "current.tensor.onnx", "current.json"):  # every file
        shutil.copy2(MODEL_DIR / name, model_dir / name)
    sink = Sink(free_port())
    await sink.start()
    dns_resp = DnsResponder()
    dns_port = free_port()
    loop = asyncio.get_running_loop()
    dns_transport, _ = await loop.create_datagram_endpoint(
        lambda: dns_resp, local_addr=("127.0.0.1", dns_port)
    )
    store = await setup_store(args.store, workdir, free_port())
    listen = free_port()
    gw = Gateway(workdir, gateway_config(workdir, model_dir / "current.onnx", store.url, sink.port, dns_port,
                                         listen, args.workers), args.workers)
    s = Soak(gw, sink, dns_resp, store, model_dir / "current.onnx", RssLog())
    print(f"starting the gateway ({args.workers} workers, store {args.store}) in {workdir} ...", flush=True)
    t_launch = time.time()
    await gw.launch()
    print(f"  ready in {time.time() - t_launch:.1f} s", flush=True)
    stop_sampling = asyncio.Event()
    try:
        await asyncio.sleep(1.0)
        s.rss.mark("before", gw)
        sampler = asyncio.create_task(sample_rss(s, args.rss_interval, stop_sampling))
        print(f"load: {len(items)} messages, {args.clients} clients, {rate:.1f} msgs/s over "
              f"~{planned:.0f} s; faults: {', '.join(f.name for f in faults)}", flush=True)
        load = Load(listen, items, args.clients, rate, args.retry_delay)
        t_load = time.time()
        load_task = asyncio.create_task(load.run())
        await run_schedule(s, faults, gap)
        try:
            await asyncio.wait_for(load.released.wait(), None)
            await asyncio.wait_for(asyncio.shield(load_task), args.drain_timeout)
        except TimeoutError:
            left = len(items) - load.finished
            print(f"  {left} messages unfinished after {args.drain_timeout:.0f} s", flush=True)
            load_task.cancel()
            await asyncio.gather(load_task, return_exceptions=True)
        load_seconds = time.time() - t_load
        await asyncio.sleep(1.0)
        s.rss.mark("after", gw)
        stop_sampling.set()
        await sampler
    finally:
        stop_sampling.set()
        await gw.stop()
        await sink.stop()
        dns_transport.close()
        await store.fault.close()
    try:
        rows = await asyncio.to_thread(read_rows, store.direct_url)
    finally:
        if store.schema is not None and not args.keep:
            drop_schema(store.schema)
    kills = [(r.at, r.name) for r in s.runs if r.at is not None]
    report = account(items, sink.copies, rows, kills)
    report.update(
        command=" ".join([".venv/bin/python", "bench/soak.py", *sys.argv[1:]]),
        store=args.store,
        workers=args.workers,
        clients=args.clients,
        rate=round(rate, 2),
        load_seconds=round(load_seconds, 1),
        wall_seconds=round(time.time() - started, 1),
        faults=[asdict(r) for r in s.runs],
        faults_failed=[r.name for r in s.runs if not r.ok],
        rss_mib=s.rss.table(),
        gateway_log=log_counts(gw.log_since(0)),
        dns={"queries": dns_resp.queries, "dropped": dns_resp.dropped},
        client_errors=dict(load.client_errors),
        latency_p50_s=_pct(items, 0.5),
        latency_p99_s=_pct(items, 0.99),
        workdir=str(workdir),
    )
    report["ok"] = bool(
        report["lost"] == 0 and report["unfinished"] == 0 and report["adds_up"] and report["unexplained"] == 0
        and report["phantom_250"] == 0 and report["quarantine_rows_without_raw"] == 0
        and not report["faults_failed"]
    )
    return report


def _pct(items: Sequence[Item], q: float) -> float | None:
    """Seconds from a message's first attempt to its final reply (retries included)."""
    spans = sorted(i.attempts[-1].t1 - i.attempts[0].t0 for i in items if i.final is not None)
    return round(spans[min(len(spans) - 1, int(q * len(spans)))], 2) if spans else None


def print_report(r: dict[str, Any]) -> None:
    print()
    print(f"sent {r['sent']}: delivered {r['delivered']} + quarantined {r['quarantined']} + rejected "
          f"{r['rejected']} = {r['delivered'] + r['quarantined'] + r['rejected']}"
          f"  ({'adds up' if r['adds_up'] else 'DOES NOT ADD UP'}); unfinished {r['unfinished']}")
    print(f"LOST: {r['lost']}   phantom 250s: {r['phantom_250']}   quarantine rows without raw: "
          f"{r['quarantine_rows_without_raw']}   unexplained: {r['unexplained']}")
    for key in ("duplicate_copies_at_sink", "duplicate_quarantine_rows", "delivered_but_client_told_5xx",
                "orphan_rows"):
        total = sum(r[key].values())
        print(f"{key.replace('_', ' ')}: {total}")
        for why, n in sorted(r[key].items(), key=lambda kv: -kv[1]):
            print(f"    {n:5d}  {why}  (e.g. {r['examples'].get(why)})")
    print(f"verdict rows of relayed messages: {r['verdict_rows_of_relayed']} "
          f"(missing: {r['verdict_rows_missing']}, written in the background and lost in outages/SIGKILLs)")
    print(f"attempts {r['attempts']}, replies {r['replies']}, client errors {r['client_errors']}")
    print(f"first attempt to final reply: p50 {r['latency_p50_s']} s, p99 {r['latency_p99_s']} s")
    print(f"DNS: {r['dns']}; gateway log: {r['gateway_log']}")
    print("\nfaults:")
    for f in r["faults"]:
        took = f["t1"] - f["t0"]
        print(f"  {f['name']:18s} {'ok' if f['ok'] else 'FAILED':6s} {took:6.1f} s  {f['detail']}")
    print("\nRSS per process, MiB (before the load, before each SIGKILL, after the restart, after the load;"
          " max seen):")
    marks = [m for m in ("before", "pre_kill_worker", "pre_kill_gateway", "restarted", "after")
             if any(m in row for row in r["rss_mib"].values())]
    print(f"  {'process':28s}" + "".join(f"{m:>18s}" for m in [*marks, "max"]))
    for role, row in r["rss_mib"].items():
        cells = "".join(f"{'' if row.get(m) is None else row[m]:>18}" for m in [*marks, "max"])
        print(f"  {role:28s}{cells}")
    print(f"\nload {r['load_seconds']} s at {r['rate']} msgs/s offered; wall {r['wall_seconds']} s")
    print(f"rerun: {r['command']}")
    print("RESULT:", "OK" if r["ok"] else "FAILED")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="CI's version: 1,000 messages, short faults")
    ap.add_argument("--schedule", choices=("full", "short"), help="the same as --short when 'short'")
    ap.add_argument("--messages", type=int, help="messages to send (default 10,000; 1,000 with --short)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2, help="gateway worker processes (at least 2)")
    ap.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--faults", help="only these faults, comma-separated (default: all)")
    ap.add_argument("--rate", type=float, help="new messages per second (default: spread over the schedule)")
    ap.add_argument("--retry-delay", type=float, default=1.0, help="client back-off after a 4xx, s (x1-2)")
    ap.add_argument("--drain-timeout", type=float, default=300.0,
                    help="after the schedule, how long to wait for every message's final reply")
    ap.add_argument("--rss-interval", type=float, default=5.0)
    ap.add_argument("--workdir", type=Path, help="keep the gateway's config, log and store here")
    ap.add_argument("--keep", action="store_true", help="keep the PostgreSQL schema")
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)
    args.short = args.short or args.schedule == "short"
    args.messages = args.messages or (1000 if args.short else 10_000)
    if args.workers < 2:
        ap.error("--workers must be at least 2: kill_worker needs a worker process to kill")
    with contextlib.ExitStack() as stack:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        report = asyncio.run(soak(args, workdir))
        print_report(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
