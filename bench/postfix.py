"""The gateway inside a real Postfix: Postfix alone, with our milter, with our content filter, in one run.

    .venv/bin/python bench/postfix.py [--messages 2000] [--clients 50] [--modes alone,milter,filter]
                                      [--scan-procs 20] [--reinject-procs N] [--workers 2]
                                      [--dns local|off] [--config FILE] [--runs N] [--spool DIR]
                                      [--json FILE] [--keep DIR]

Needs root and Postfix (see tests/postfix.py). For each mode a fresh private Postfix on loopback
(tests/postfix.py: inbound smtpd -> queue -> virtual(8) Maildir) and, for the two filter modes, a fresh
`milter serve` subprocess (temp SQLite store, the shipped model and policy):

* alone:  no filter;
* milter: the inbound smtpd's `smtpd_milters` is the gateway (`--listen off --milter-listen`),
          milter_protocol 6, milter_default_action tempfail;
* filter: after-queue content filter: `content_filter=scan:[127.0.0.1]:PORT`, the `scan` transport
          limited to --scan-procs processes, the gateway relaying to the reinjection smtpd (limited to
          --reinject-procs processes: each gateway worker keeps its own pool of connections to it, and
          one more connection than it has processes waits for a greeting until the relay times out).

The same corpus messages (bench/gateway.py's `corpus()`, each with an `X-Bench-Id:` header on top)
go from --clients concurrent SMTP clients (one connection each, commands pipelined as an MTA does;
MAIL FROM the message's From, RCPT bob@test.localdomain) to the inbound smtpd, after a warm-up batch
through the same path. A message is accounted for once it is in the Maildir, quarantined by the
gateway (its store: Postfix never delivers it), or rejected (5xx) at submission.

* msgs/s: accounted messages / (last accounted - first submission);
* latency: Maildir file mtime - submission start, delivered messages only; "added" is the mode's
  percentile minus Postfix alone's in the same run;
* CPU per message: utime + stime from /proc of the process trees, over the measured batch: Postfix =
  master(8) and its descendants, sampled every 0.25 s keeping each process's last reading (daemons
  that exit, e.g. at max_use, count up to their last sample), the gateway = `milter serve`, its
  workers and their prepare processes, read after the warm-up and after the last message. The
  "exact" figures add the CPU of children reaped in between (their parents' cutime); "machine busy"
  is /proc/stat's, and what the measured processes (these two, this script, the DNS responder) do not
  account for is reported as other processes: a run with much of it was disturbed.

Each mode starts with a sync and a wait for an idle machine (--settle): the files of the last mode's
Postfix were just deleted, and their writeback would be charged to the next one's fsyncs. Disk-backed
figures vary with the disk (on the 2-core test machine Postfix alone spent 2.8 to 5.5 ms of CPU per
message, most of it in the kernel, from one run to the next); --spool /dev/shm takes the disk out.

The gateway treats loopback as an outside client (policy.internal_networks = [], so SPF is checked as
for an MX's clients; --loopback-internal keeps the shipped list) and asks the loopback DNS responder of
bench/gateway.py, which answers NXDOMAIN at once (--dns local), or does no sender auth (--dns off).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway import ROOT, Result, corpus, envelope_sender, free_port, run_dns, serve_config
from tests.postfix import DOMAIN, Postfix, running_postfix, skip_reason

MODES = ("alone", "milter", "filter")
RCPT = f"bob@{DOMAIN}"
SAMPLE_EVERY = 0.25  # seconds between /proc samples
MESSAGE_TIMEOUT = 120.0  # one SMTP transaction, replies included
BENCH_ID = re.compile(rb"^X-Bench-Id: (\S+)", re.MULTILINE)
QUARANTINE_LINE = re.compile(r"\bmessage id=\S+ .*\baction=quarantine\b")
CLK_TCK = os.sysconf("SC_CLK_TCK")
QUEUED_ID = re.compile(rb"X-Bench-Id: ([mw]\d+)")  # in a queue file's records


# -- CPU of process trees ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    ppid: int
    own: int  # utime + stime, clock ticks
    reaped: int  # cutime + cstime: children it has waited for
    comm: str


def proc_table() -> dict[tuple[int, int], ProcStat]:
    """Every process now, keyed by (pid, start time) so that a reused pid is another process."""
    out: dict[tuple[int, int], ProcStat] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        close = data.rindex(b")")
        rest = data[close + 2 :].split()
        # After "pid (comm) ": state ppid ... utime(14) stime cutime cstime ... starttime(22)
        key = (int(name), int(rest[19]))
        comm = data[data.index(b"(") + 1 : close].decode(errors="replace")
        out[key] = ProcStat(int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14]), comm)
    return out


MACHINE_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq")


def machine_seconds() -> dict[str, float]:
    """The whole machine's CPU seconds so far (all CPUs) by kind, from /proc/stat; "busy" is the sum of
    BUSY_FIELDS (steal: the hypervisor ran something else while this machine wanted to run)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1 : 1 + len(MACHINE_FIELDS)]]
    out = {name: t / CLK_TCK for name, t in zip(MACHINE_FIELDS, ticks, strict=True)}
    out["busy"] = sum(out[name] for name in BUSY_FIELDS)
    return out


def tree(table: dict[tuple[int, int], ProcStat], root: int) -> dict[tuple[int, int], tuple[ProcStat, int]]:
    """The processes under `root` (itself included), each with its depth below it."""
    children: dict[int, list[tuple[int, int]]] = {}
    for key, st in table.items():
        children.setdefault(st.ppid, []).append(key)
    found = {key: (st, 0) for key, st in table.items() if key[0] == root}
    todo = [(root, 0)]
    while todo:
        pid, depth = todo.pop()
        for key in children.get(pid, ()):
            if key not in found:
                found[key] = (table[key], depth + 1)
                todo.append((key[0], depth + 1))
    return found


# How the gateway's processes are told apart: by depth below `milter serve` (spawned children).
GATEWAY_DEPTHS = {0: "supervisor", 1: "workers", 2: "prepare"}


def label(tree_name: str, st: ProcStat, depth: int) -> str:
    if tree_name == "gateway":
        return GATEWAY_DEPTHS.get(depth, "other")
    return st.comm


class CpuSampler:
    """Samples the trees under some root pids every SAMPLE_EVERY seconds (in a thread), keeping each
    process's last utime + stime; `mark()` starts a measurement and `since_mark()` ends it."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self._last: dict[str, dict[tuple[int, int], int]] = {name: {} for name in roots}
        self._label: dict[str, dict[tuple[int, int], str]] = {name: {} for name in roots}
        self._base: dict[str, dict[tuple[int, int], int]] = {name: {} for name in roots}
        self._exact_base: dict[str, int] = dict.fromkeys(roots, 0)
        self._machine_base: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.sample()

    def sample(self) -> dict[str, int]:
        """Take a sample now; per tree the exact total: own + reaped CPU of every live process."""
        table = proc_table()
        exact = {}
        with self._lock:
            for name, root in self.roots.items():
                procs = tree(table, root)
                self._last[name].update((key, st.own) for key, (st, _) in procs.items())
                self._label[name].update((key, label(name, st, d)) for key, (st, d) in procs.items())
                exact[name] = sum(st.own + st.reaped for st, _ in procs.values())
        return exact

    def mark(self) -> None:
        exact = self.sample()
        with self._lock:
            self._base = {name: dict(last) for name, last in self._last.items()}
            self._exact_base = exact
            self._machine_base = machine_seconds()

    def since_mark(self) -> dict[str, tuple[float, float]]:
        """Per tree: (sampled, exact) CPU seconds since mark()."""
        exact = self.sample()
        with self._lock:
            out = {}
            for name, last in self._last.items():
                base = self._base[name]
                sampled = sum(ticks - base.get(key, 0) for key, ticks in last.items())
                out[name] = (sampled / CLK_TCK, (exact[name] - self._exact_base[name]) / CLK_TCK)
            return out

    def machine(self) -> dict[str, float]:
        """The machine's CPU seconds since mark() by kind (see machine_seconds)."""
        now = machine_seconds()
        return {name: now[name] - self._machine_base.get(name, 0.0) for name in now}

    def breakdown(self, name: str) -> dict[str, float]:
        """CPU seconds since mark() of one tree by process kind (sampled), largest first."""
        with self._lock:
            base, labels = self._base[name], self._label[name]
            out: dict[str, float] = {}
            for key, ticks in self._last[name].items():
                kind = labels.get(key, "?")
                out[kind] = out.get(kind, 0.0) + (ticks - base.get(key, 0)) / CLK_TCK
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# -- SMTP submission -----------------------------------------------------------------------------


@dataclass
class Job:
    id: str
    sender: bytes
    data: bytes  # dot-stuffed, ending in CRLF . CRLF
    start: float = 0.0  # time.time() when its MAIL FROM went out
    end: float = 0.0
    code: int = 0  # the final reply (0: not sent, or the connection failed)
    reply: str = ""


def distinct(count: int) -> list[bytes]:
    """`count` different corpus messages, spread evenly over all corpora (`corpus()` skips the odd
    message too big or with too long a line, so ask it for a few more and pick evenly among them)."""
    pool = corpus(count + count // 10)
    return [pool[i * len(pool) // count] for i in range(count)] if len(pool) > count else pool


def make_jobs(messages: Sequence[bytes], count: int, prefix: str) -> list[Job]:
    jobs = []
    for k in range(count):
        raw = messages[k % len(messages)]
        bench_id = f"{prefix}{k}"
        data = b"X-Bench-Id: " + bench_id.encode() + b"\r\n" + raw
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        data = re.sub(rb"(?m)^\.", b"..", data) + b".\r\n"
        jobs.append(Job(bench_id, envelope_sender(raw).encode(), data))
    return jobs


class Connection:
    """A plain SMTP client connection: EHLO once, then pipelined MAIL/RCPT/DATA per message."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = cls(reader, writer)
        for command in (None, b"EHLO client.bench.test\r\n"):
            if command is not None:
                writer.write(command)
            code, text = await conn.reply()
            if code // 100 != 2:
                conn.close()
                raise ConnectionError(f"{code} {text}")
        return conn

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line.rstrip().decode(errors="replace"))
            if line[3:4] != b"-":
                return int(line[:3]), " | ".join(lines)

    async def send(self, job: Job) -> tuple[int, str]:
        self.writer.write(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (job.sender, RCPT.encode()))
        replies = [await self.reply() for _ in range(3)]
        if replies[2][0] == 354:
            self.writer.write(job.data)
            return await self.reply()
        self.writer.write(b"RSET\r\n")
        await self.reply()
        return next((r for r in replies if r[0] >= 400), replies[2])

    def close(self) -> None:
        self.writer.close()

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 5)
        self.close()


async def submit(port: int, jobs: list[Job], clients: int, limit: float) -> None:
    """Send every job over `clients` connections (opened before the first message); each job ends
    with its reply code, 0 for a broken connection or when `limit` seconds ran out."""
    todo = list(reversed(jobs))
    conns: list[Connection | None] = list(
        await asyncio.gather(*(Connection.open(port) for _ in range(clients)))
    )

    async def client(i: int) -> None:
        while todo:
            job = todo.pop()
            job.start = time.time()
            try:
                conn = conns[i]
                if conn is None:
                    conn = await asyncio.wait_for(Connection.open(port), 30)
                    conns[i] = conn
                job.code, job.reply = await asyncio.wait_for(conn.send(job), MESSAGE_TIMEOUT)
            except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
                job.code, job.reply = 0, f"{type(exc).__name__}: {exc}"
            job.end = time.time()
            broken = conns[i]
            if job.code in (0, 421) and broken is not None:
                broken.close()
                conns[i] = None

    try:
        async with asyncio.timeout(limit):
            await asyncio.gather(*(client(i) for i in range(clients)))
    except TimeoutError:
        print(f"  submission stopped after {limit:.0f} s: {len(todo)} messages not sent", flush=True)
    finally:
        await asyncio.gather(*(c.quit() for c in conns if c is not None))


# -- the gateway ---------------------------------------------------------------------------------


class GatewayProcess:
    """`milter serve` in its own session (a Ctrl-C here does not reach it; stop() does)."""

    def __init__(self, argv: list[str], log_path: Path, workers: int) -> None:
        self.log_path = log_path
        self.workers = workers
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, limit: float = 180.0) -> None:
        """Every worker logged `listening` (after its warm-up); SystemExit with the log otherwise."""
        deadline = time.monotonic() + limit
        while len(re.findall(r"\blistening\b", self.log())) < self.workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"the gateway did not start; its log ends:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=40)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers (prepare processes) of a hard stop
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def gateway(mode: str, port: int, downstream: int, config: str, tmp: Path, workers: int
            ) -> Iterator[GatewayProcess]:
    listen = ["--listen", "off", "--milter-listen", f"inet:127.0.0.1:{port}"] if mode == "milter" \
        else ["--listen", f"127.0.0.1:{port}"]
    argv = [sys.executable, "-c", "from milter.cli import main; main()", "serve", "--config", config,
            *listen, "--downstream", f"127.0.0.1:{downstream}", "--db", f"sqlite:///{tmp}/store.db",
            "--workers", str(workers), "--metrics-listen", "off"]
    gw = GatewayProcess(argv, tmp / "gateway.log", workers)
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.stop()


def reinjection_limit(pf: Postfix, procs: int) -> None:
    """Set the reinjection smtpd's process limit (tests/postfix.py: 10) and reload Postfix."""
    pf.postconf("-F", f"127.0.0.1:{pf.reinject_port}/inet/process_limit={procs}")
    postfix = shutil.which("postfix", path=os.environ.get("PATH", "") + ":/usr/sbin") or "postfix"
    subprocess.run([postfix, "-c", str(pf.config_dir), "reload"], check=True, capture_output=True,
                   timeout=60, stdin=subprocess.DEVNULL)
    time.sleep(1.0)  # master(8) re-reads master.cf on the SIGHUP that reload sends


def queued_ids(pf: Postfix) -> set[str]:
    """Bench ids of the messages still in Postfix's queue (read from the queue files)."""
    out: set[str] = set()
    for sub in ("incoming", "active", "deferred", "hold"):
        for path in (pf.queue_dir / sub).rglob("*"):
            if path.is_file():
                with contextlib.suppress(OSError):
                    out.update(m.group(1).decode() for m in QUEUED_ID.finditer(path.read_bytes()[:262144]))
    return out


def gateway_config(args: argparse.Namespace, dns_port: int, tmp: str) -> str:
    """The shipped model and policy (or --config's tables); [auth] as --dns says; loopback clients
    outside unless asked."""
    path = serve_config(args.dns, str(args.config) if args.config else None, dns_port, tmp)
    assert path is not None
    if not args.loopback_internal:
        with open(path, "a") as f:
            f.write("\n[policy]\ninternal_networks = []\n")
    return path


# -- one mode --------------------------------------------------------------------------------------


@dataclass
class Figures:
    mode: str
    messages: int
    delivered: int = 0
    quarantined: int = 0
    rejected: int = 0  # 5xx at submission
    tempfailed: int = 0  # 4xx at submission
    failed: int = 0  # connection broken or not sent
    bounced: int = 0  # refused after the queue (Postfix's log: status=bounced; warm-up included)
    deferred: int = 0  # still in Postfix's queue at the end
    missing: int = 0  # accepted, yet neither delivered, quarantined nor queued
    duplicates: int = 0
    wall: float = float("nan")
    rate: float = float("nan")
    ratio: float = float("nan")  # rate / Postfix alone's in the same run
    p50: float = float("nan")  # ms, delivered messages
    p99: float = float("nan")
    added_p50: float = float("nan")
    added_p99: float = float("nan")
    reply_p50: float = float("nan")  # ms, submission start to the final SMTP reply
    reply_p99: float = float("nan")
    postfix_cpu_ms: float = float("nan")  # per accounted message
    gateway_cpu_ms: float = float("nan")
    postfix_cpu_exact_ms: float = float("nan")
    gateway_cpu_exact_ms: float = float("nan")
    client_cpu_ms: float = float("nan")  # this script's submission
    dns_cpu_ms: float = float("nan")  # the loopback DNS responder
    machine_busy_ms: float = float("nan")  # every CPU's busy time over the batch, per message
    machine_ms: dict[str, float] = field(default_factory=dict)  # /proc/stat over the batch, per message
    breakdown_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # tree -> kind -> ms/msg
    notes: list[str] = field(default_factory=list)

    @property
    def accounted(self) -> int:
        return self.delivered + self.quarantined + self.rejected

    @property
    def other_cpu_ms(self) -> float:
        """Busy time none of the measured processes account for: other load on the machine."""
        ours = self.postfix_cpu_exact_ms + self.client_cpu_ms * self.messages / max(1, self.accounted)
        gw = 0.0 if self.mode == "alone" else self.gateway_cpu_exact_ms
        return self.machine_busy_ms - ours - gw - self.dns_cpu_ms

    @property
    def total_cpu_ms(self) -> float:
        gw = 0.0 if self.mode == "alone" else self.gateway_cpu_ms
        return self.postfix_cpu_ms + gw


def maildir_ids(pf: Postfix) -> dict[str, float]:
    """Bench id -> mtime of each delivered file (a second copy of an id is kept under id + '#')."""
    out: dict[str, float] = {}
    new = pf.maildir / "new"
    if not new.is_dir():
        return out
    for entry in os.scandir(new):
        with open(entry.path, "rb") as f:
            m = BENCH_ID.search(f.read(65536))
        if m is not None:
            key = m.group(1).decode()
            while key in out:
                key += "#"
            out[key] = entry.stat().st_mtime
    return out


def count_files(pf: Postfix) -> int:
    try:
        return sum(1 for _ in os.scandir(pf.maildir / "new"))
    except FileNotFoundError:
        return 0


def quarantine_lines(gw: GatewayProcess | None) -> int:
    return len(QUARANTINE_LINE.findall(gw.log())) if gw is not None else 0


def quarantined_ids(db: Path) -> dict[str, float]:
    """Bench id -> commit time of each message in the gateway's quarantine (read after it stopped)."""
    from milter.store import Store

    out: dict[str, float] = {}
    if not db.exists():
        return out
    with Store.open(f"sqlite:///{db}") as store:
        for row in store.quarantine_list(limit=10**9):
            m = BENCH_ID.search((store.get_raw(row.id) or b"")[:65536])
            if m is not None:
                at = row.received_at
                out[m.group(1).decode()] = (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()
    return out


def drain(pf: Postfix, gw: GatewayProcess | None, expect: int, base_files: int, base_q: int,
          limit: float) -> None:
    """Wait until `expect` more messages are in the Maildir or quarantined than at the baseline, or
    only deferred mail is left, or `limit` seconds passed."""
    deadline = time.monotonic() + limit
    last_progress, seen = time.monotonic(), -1
    while time.monotonic() < deadline:
        done = count_files(pf) - base_files + quarantine_lines(gw) - base_q
        if done >= expect:
            return
        if done != seen:
            seen, last_progress = done, time.monotonic()
        elif time.monotonic() - last_progress > 5:
            queue = pf.queue()
            if all(m.get("queue_name") in ("deferred", "hold") for m in queue):
                print(f"  {expect - done} messages not delivered; Postfix queue: {len(queue)} deferred/held",
                      flush=True)
                return
            last_progress = time.monotonic()
        time.sleep(SAMPLE_EVERY)
    print(f"  drain stopped after {limit:.0f} s", flush=True)


def warm_up(pf: Postfix, gw: GatewayProcess | None, messages: Sequence[bytes], args: argparse.Namespace
            ) -> None:
    if args.warmup <= 0:
        return
    jobs = make_jobs(messages, args.warmup, "w")
    base_files, base_q = count_files(pf), quarantine_lines(gw)
    asyncio.run(submit(pf.inbound_port, jobs, min(args.clients, len(jobs)), args.submit_timeout))
    accepted = sum(1 for j in jobs if j.code == 250)
    drain(pf, gw, accepted, base_files, base_q, min(args.drain_timeout, 120.0))


def run_mode(mode: str, messages: Sequence[bytes], args: argparse.Namespace, config: str,
             keep: Path | None, run: int, dns_pid: int | None) -> Figures:
    fig = Figures(mode, args.messages)
    with tempfile.TemporaryDirectory(prefix=f"bench-postfix-{mode}-") as tmp_name, \
            contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        gw_port = free_port()
        inbound: dict[str, str] = {}
        main: dict[str, str] = {"scan_destination_concurrency_limit": str(args.scan_procs)}
        if mode == "milter":
            inbound["smtpd_milters"] = f"inet:127.0.0.1:{gw_port}"
            main.update(milter_protocol="6", milter_default_action="tempfail")
        gw = None
        if mode == "milter":  # first: Postfix's own start-up probe of its smtpd would meet no milter
            gw = stack.enter_context(gateway(mode, gw_port, free_port(), config, tmp, args.workers))
        pf = stack.enter_context(running_postfix(gw_port if mode == "filter" else None, inbound, main,
                                                 scan_procs=args.scan_procs))
        if mode == "filter":
            reinjection_limit(pf, args.reinject_procs)
            gw = stack.enter_context(gateway(mode, gw_port, pf.reinject_port, config, tmp, args.workers))
        master = pf.master_pid()
        assert master is not None
        roots = {"postfix": master} | ({"gateway": gw.proc.pid} if gw is not None else {})
        if dns_pid is not None:
            roots["dns"] = dns_pid
        sampler = stack.enter_context(CpuSampler(roots))

        warm_up(pf, gw, messages, args)
        jobs = make_jobs(messages, args.messages, "m")
        base_files, base_q = count_files(pf), quarantine_lines(gw)
        client0 = resource.getrusage(resource.RUSAGE_SELF)
        sampler.mark()
        asyncio.run(submit(pf.inbound_port, jobs, args.clients, args.submit_timeout))
        client1 = resource.getrusage(resource.RUSAGE_SELF)
        accepted = sum(1 for j in jobs if j.code == 250)
        drain(pf, gw, accepted, base_files, base_q, args.drain_timeout)
        time.sleep(1.0)  # let the last store writes and log lines settle; counted in the CPU
        cpu = sampler.since_mark()
        machine = sampler.machine()
        breakdown = {name: sampler.breakdown(name) for name in roots}

        delivered = {k: t for k, t in maildir_ids(pf).items() if k.startswith("m")}
        queued = {k for k in queued_ids(pf) if k.startswith("m")}
        maillog = pf.log()
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"run{run}-{mode}-maillog").write_text(maillog)
        if gw is not None:
            gw.stop()
            if keep is not None:
                shutil.copy(gw.log_path, keep / f"run{run}-{mode}-gateway.log")
            gw_log = gw.log()
            problems = [ln for ln in gw_log.splitlines() if " WARNING " in ln or " ERROR " in ln]
            fig.notes += [f"gateway log: {len(problems)} WARNING/ERROR lines", *problems[:5]]
        quarantined = {k: t for k, t in quarantined_ids(tmp / "store.db").items() if k.startswith("m")}

    warnings = [ln for ln in maillog.splitlines()
                if "warning:" in ln or "milter-reject" in ln or "status=deferred" in ln]
    if warnings:
        fig.notes += [f"maillog: {len(warnings)} warning/milter-reject/deferred lines", *warnings[:5]]
    by_id = {j.id: j for j in jobs}
    firsts = [j.start for j in jobs if j.start]
    fig.duplicates = sum(1 for bench_id in delivered if bench_id.endswith("#"))
    ok = {k: t for k, t in delivered.items() if not k.endswith("#") and k in by_id}
    fig.delivered, fig.quarantined = len(ok), len(quarantined)
    fig.rejected = sum(1 for j in jobs if j.code >= 500)
    fig.tempfailed = sum(1 for j in jobs if 400 <= j.code < 500)
    fig.failed = sum(1 for j in jobs if j.code == 0)
    fig.bounced = len(re.findall(rf"to=<{re.escape(RCPT)}>.*status=bounced", maillog))
    fig.deferred = len(queued)
    fig.missing = sum(1 for j in jobs if j.code == 250 and j.id not in ok and j.id not in quarantined
                      and j.id not in queued)
    codes: dict[str, int] = {}
    for j in jobs:
        if j.code != 250:
            key = f"{j.code} {j.reply[:100]}"
            codes[key] = codes.get(key, 0) + 1
    fig.notes += [f"{n} x {reply}" for reply, n in sorted(codes.items(), key=lambda kv: -kv[1])[:5]]

    ends = list(ok.values()) + list(quarantined.values()) + [j.end for j in jobs if j.code >= 500]
    if firsts and ends:
        fig.wall = max(ends) - min(firsts)
        fig.rate = fig.accounted / fig.wall
    latencies = [t - by_id[k].start for k, t in ok.items()]
    lat = Result(fig.wall, latencies, 0)
    fig.p50, fig.p99 = lat.pct(0.5), lat.pct(0.99)
    replies = Result(fig.wall, [j.end - j.start for j in jobs if j.code], 0)
    fig.reply_p50, fig.reply_p99 = replies.pct(0.5), replies.pct(0.99)
    n = max(1, fig.accounted)
    fig.postfix_cpu_ms, fig.postfix_cpu_exact_ms = (1000 * c / n for c in cpu["postfix"])
    if "gateway" in cpu:
        fig.gateway_cpu_ms, fig.gateway_cpu_exact_ms = (1000 * c / n for c in cpu["gateway"])
    client = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
    fig.client_cpu_ms = 1000 * client / max(1, len(jobs))
    fig.dns_cpu_ms = 1000 * cpu["dns"][1] / n if "dns" in cpu else 0.0
    fig.machine_ms = {name: round(1000 * sec / n, 3) for name, sec in machine.items()}
    fig.machine_busy_ms = fig.machine_ms["busy"]
    fig.breakdown_ms = {name: {kind: round(1000 * sec / n, 3) for kind, sec in kinds.items() if sec > 0}
                        for name, kinds in breakdown.items()}
    return fig


# -- reporting -------------------------------------------------------------------------------------


def table(figs: Sequence[Figures]) -> str:
    head = (f"{'mode':<7}{'msgs/s':>8}{'x alone':>9}{'p50 ms':>9}{'p99 ms':>9}{'+p50':>8}{'+p99':>8}"
            f"{'PF ms/msg':>11}{'GW ms/msg':>11}{'sum':>7}  delivered/quar/rej/tempf/fail/bounce/defer/miss")
    rows = [head]
    for f in figs:
        gw = "-" if f.mode == "alone" else f"{f.gateway_cpu_ms:.2f}"
        counts = "/".join(str(c) for c in (f.delivered, f.quarantined, f.rejected, f.tempfailed, f.failed,
                                            f.bounced, f.deferred, f.missing))
        rows.append(f"{f.mode:<7}{f.rate:>8.0f}{f.ratio:>9.2f}{f.p50:>9.0f}{f.p99:>9.0f}"
                    f"{f.added_p50:>8.0f}{f.added_p99:>8.0f}{f.postfix_cpu_ms:>11.2f}{gw:>11}"
                    f"{f.total_cpu_ms:>7.2f}  {counts}")
    return "\n".join(rows)


def details(f: Figures) -> str:
    lines = [f"  {f.mode}: {f.accounted} of {f.messages} accounted in {f.wall:.2f} s; SMTP reply p50 "
             f"{f.reply_p50:.0f} ms p99 {f.reply_p99:.0f} ms; CPU incl. reaped children: Postfix "
             f"{f.postfix_cpu_exact_ms:.2f}, gateway {f.gateway_cpu_exact_ms:.2f} ms/msg; "
             f"this client {f.client_cpu_ms:.2f}, DNS responder {f.dns_cpu_ms:.2f} ms/msg; machine busy "
             f"{f.machine_busy_ms:.2f} ms/msg (system {f.machine_ms.get('system', 0):.2f}, steal "
             f"{f.machine_ms.get('steal', 0):.2f}), of which other processes {f.other_cpu_ms:.2f}; "
             f"duplicates {f.duplicates}"]
    for name in ("postfix", "gateway"):
        if kinds := f.breakdown_ms.get(name):
            lines.append(f"    {name} CPU ms/msg: " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()))
    lines += [f"    {note}" for note in f.notes]
    return "\n".join(lines)


def checks(figs: dict[str, Figures]) -> list[str]:
    out = []
    milter, filt, alone = figs.get("milter"), figs.get("filter"), figs.get("alone")
    if milter is not None and filt is not None:
        out.append(f"milter msgs/s >= filter: {milter.rate:.0f} vs {filt.rate:.0f}: "
                   f"{'yes' if milter.rate >= filt.rate else 'NO'}")
        out.append(f"milter gateway CPU < filter: {milter.gateway_cpu_ms:.2f} vs {filt.gateway_cpu_ms:.2f} "
                   f"ms/msg: {'yes' if milter.gateway_cpu_ms < filt.gateway_cpu_ms else 'NO'}; Postfix + "
                   f"gateway {milter.total_cpu_ms:.2f} vs {filt.total_cpu_ms:.2f}: "
                   f"{'yes' if milter.total_cpu_ms < filt.total_cpu_ms else 'NO'}")
    if milter is not None and alone is not None:
        out.append(f"milter >= 0.45 x alone: {milter.ratio:.2f}: {'yes' if milter.ratio >= 0.45 else 'NO'}")
    return out


def settle(limit: float) -> None:
    """Before a mode: write back what the last one left (its Postfix's files were just deleted, and
    their writeback and discards would be charged to this one's fsyncs), then wait up to `limit`
    seconds for the machine to go idle (busy below a fifth of one CPU over half a second)."""
    os.sync()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = machine_seconds()
        time.sleep(0.5)
        if machine_seconds()["busy"] - before["busy"] < 0.1:
            return


def measure(messages: Sequence[bytes], args: argparse.Namespace, config: str, run: int,
            dns_pid: int | None) -> list[Figures]:
    figs = []
    for mode in args.modes:
        print(f"run {run}, {mode}: ...", flush=True)
        settle(args.settle)
        figs.append(run_mode(mode, messages, args, config, args.keep, run, dns_pid))
    alone = next((f for f in figs if f.mode == "alone"), None)
    for f in figs:
        if alone is not None:
            f.ratio = f.rate / alone.rate
            f.added_p50, f.added_p99 = f.p50 - alone.p50, f.p99 - alone.p99
    return figs


def no_nan(value: Any) -> Any:
    """NaN (a figure that does not apply, e.g. the gateway's CPU without a gateway) as JSON null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000, help="measured messages per mode")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES))
    ap.add_argument("--scan-procs", type=int, default=20,
                    help="process limit (and destination concurrency) of Postfix's scan transport")
    ap.add_argument("--reinject-procs", type=int,
                    help="process limit of the reinjection smtpd (tests/postfix.py: 10); default: the "
                         "larger of 10 and workers x scan processes (each worker pools its connections)")
    ap.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    ap.add_argument("--dns", choices=("local", "off"), default="local",
                    help="local: loopback NXDOMAIN responder; off: [auth] enabled = false")
    ap.add_argument("--loopback-internal", action="store_true",
                    help="keep policy.internal_networks (loopback clients are then ours: no SPF)")
    ap.add_argument("--warmup", type=int, default=200, help="messages sent through each setup first")
    ap.add_argument("--runs", type=int, default=1, help="repeat all modes; medians at the end")
    ap.add_argument("--settle", type=float, default=15.0,
                    help="before each mode: sync, then wait up to this many seconds for an idle machine")
    ap.add_argument("--submit-timeout", type=float, default=600.0, help="seconds for a batch's submission")
    ap.add_argument("--drain-timeout", type=float, default=300.0, help="seconds to wait for delivery")
    ap.add_argument("--spool", type=Path,
                    help="make every temporary folder (Postfix's queue and Maildir, the gateway's store) "
                         "under this one, e.g. /dev/shm to take the disk out (default: the system's)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--config", type=Path,
                    help="gateway config to start from (no [auth] table: --dns sets it; no [policy] table)")
    ap.add_argument("--keep", type=Path, help="copy each mode's mail log and gateway log into this folder")
    ap.add_argument("--dns-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dns_server:
        run_dns(args.dns_server)
        return
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(args.modes) - set(MODES):
        ap.error(f"unknown modes: {', '.join(sorted(unknown))}")
    if reason := skip_reason():
        sys.exit(reason)
    if args.spool is not None:
        tempfile.tempdir = str(args.spool)  # tests/postfix.py's mkdtemp too
    if args.reinject_procs is None:
        args.reinject_procs = max(10, args.workers * args.scan_procs)

    def interrupted(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM: clean up as for Ctrl-C

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (&)
    messages = distinct(args.messages)
    median_kib = statistics.median(map(len, messages)) / 1024
    print(f"{len(messages)} corpus messages (median {median_kib:.1f} KiB), {args.messages} per mode "
          f"+ {args.warmup} warm-up, {args.clients} clients, modes {','.join(args.modes)}, "
          f"scan processes {args.scan_procs}, reinjection smtpd processes {args.reinject_procs}, "
          f"{args.workers} gateway workers, DNS {args.dns}, spool {tempfile.gettempdir()}, "
          f"{os.cpu_count()} CPUs", flush=True)
    dns_port = free_port()
    dns = None
    if args.dns == "local":
        dns = subprocess.Popen([sys.executable, __file__, "--dns-server", str(dns_port)],
                               stdin=subprocess.DEVNULL, start_new_session=True)
    runs: list[list[Figures]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-postfix-") as tmp:
            config = gateway_config(args, dns_port, tmp)
            for run in range(1, args.runs + 1):
                figs = measure(messages, args, config, run, dns.pid if dns is not None else None)
                runs.append(figs)
                print(f"\nrun {run}:\n{table(figs)}")
                for f in figs:
                    print(details(f))
                for line in checks({f.mode: f for f in figs}):
                    print("  " + line)
                print(flush=True)
    finally:
        if dns is not None:
            dns.terminate()
            dns.wait(timeout=10)
    if args.runs > 1:
        medians = []
        for i, mode in enumerate(args.modes):
            rows = [r[i] for r in runs]
            med = Figures(mode, args.messages)
            for name in ("rate", "ratio", "p50", "p99", "added_p50", "added_p99", "postfix_cpu_ms",
                         "gateway_cpu_ms"):
                setattr(med, name, statistics.median(getattr(r, name) for r in rows))
            medians.append(med)
        print(f"medians of {args.runs} runs (counts not aggregated):\n{table(medians)}")
        for line in checks({f.mode: f for f in medians}):
            print("  " + line)
    if args.json:
        out: dict[str, Any] = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "cpus": os.cpu_count(),
            "runs": [[asdict(f) | {"accounted": f.accounted, "total_cpu_ms": f.total_cpu_ms} for f in figs]
                     for figs in runs],
        }
        args.json.write_text(json.dumps(no_nan(out), indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
