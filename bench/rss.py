"""Resident memory of every gateway process under a long mixed load: is it flat after warm-up?

    .venv/bin/python bench/rss.py [--minutes 20] [--clients 8] [--sample 10] [--warmup 2]
                                  [--workers 2] [--hostile 0.02] [--report-every 4] [--out DIR] [--seed N]

Starts `milter serve --workers 2` (tests/serve_support.py: its own session, `-v` log in OUT/serve.log)
with a SQLite store in a temporary folder, sender authentication on against bench/gateway.py's loopback
DNS responder (every name NXDOMAIN at once), and bench/gateway.py's aiosmtpd sink downstream. N clients,
each on one reused connection with XFORWARD naming an outside client (so SPF is looked up), send for
`--minutes`: every corpus message under .cache/corpora (ham, spam, phish, bounces, the big ones; in a
seeded random order, each once before any repeats), and a `--hostile` share of tests/hostile.py's
messages: its named attacks (up to 20 MB; weighted down by size, so the 20 MB one goes a few times a
run), random MIME trees and mutations of corpus messages. Every message goes as an MTA hands it to a
content filter: CRLF line endings, no line over 998 bytes (longer lines folded).

Every `--sample` seconds it reads /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile, Threads) and the
number of open files of every process under the `milter serve` pid, each labelled by its role: parent,
resource-tracker, worker-N (a spawn child of the parent), worker-N/prepare-K (spawn children of a
worker, K by pid), with the number of messages answered so far; and the number of Prometheus series
each worker exports (a label whose values grow without bound would show there).

Prints a table per role: RSS at the end of the warm-up (`--warmup` minutes), at the end, the growth,
and the least-squares slope of RSS over the samples after the warm-up (MiB per 10 minutes, % per hour).
The verdict is "flat" when every process's slope is under 5 MiB per 10 minutes and its growth from
the end of the warm-up to the end (means over the first and the last minute) under 10 %; else "GROWS",
naming the processes. A role is a slot: where its process was replaced (a prepare pool recycled after
`server.prepare_max_jobs` jobs), every process that held it counts. Writes
OUT/samples.csv, OUT/metrics.csv, OUT/summary.json and OUT/rss.png (RSS over time per process).
Every `--report-every` minutes from the warm-up's end, and once at the end, it sends SIGUSR2 to the
gateway's parent (which forwards it to the workers, and they to their prepare processes): each logs a
`memory_report` (milter/gateway/memreport.py) in serve.log, and the summary sets each process's first
report after the warm-up beside its last: glibc's bytes in use, free and mmapped, CPython's arenas
and blocks, the collector's objects, and the object types that grew most. What grew says why.
With `--trim` it then calls glibc's malloc_trim(0) in every process through gdb and prints each RSS
before and after: memory the trim gives back was free memory the allocator kept, not live objects.
Exit status 0 only for "flat".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import itertools
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import aiosmtplib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from gateway import envelope_sender, free_port, serve_config  # noqa: E402
from hostile import ATTACKS, mutate, random_message  # noqa: E402
from serve_support import ServeProcess  # noqa: E402
from soak import live_processes  # noqa: E402

CORPORA = ROOT / ".cache" / "corpora"
GATEWAY_BENCH = ROOT / "bench" / "gateway.py"
MAX_LINE = 998  # what an MTA hands a content filter (Postfix folds longer lines)
MAX_SIZE = 25_000_000  # under server.max_message_size (26,214,400) with room for the SMTP framing
RCPT = "rcpt@rcpt.test"
CLIENT_TIMEOUT = 300.0  # a 20 MB hostile message on a busy 2-core host takes a while
SLOW_S = 10.0  # messages answered later than this are listed (kind, size, reply)
MIB = 1024.0

# The verdict's thresholds, per process, over the samples after the warm-up.
FLAT_SLOPE_MIB_PER_10MIN = 5.0
FLAT_GROWTH_PCT = 10.0

# -- messages ----------------------------------------------------------------------------------

_ENDINGS = re.compile(rb"\r\n|\n|\r")
_LONG = re.compile(rb"[^\r\n]{%d}(?=[^\r\n])" % MAX_LINE)


def as_mta_sends(raw: bytes) -> bytes:
    """CRLF line endings, lines folded at 998 bytes: what Postfix hands a content filter.
    (aiosmtplib would turn every bare CR or LF into CRLF anyway.)"""
    return _LONG.sub(lambda m: m.group(0) + b"\r\n", _ENDINGS.sub(b"\r\n", raw))


def attack_weight(size: int) -> float:
    """Big attacks less often: a 20 MB one a tenth as often as a 2 MB or smaller one."""
    return min(1.0, 2_000_000 / max(1, size))


class Source:
    """The mixed load: corpus files in a seeded order (each once before any repeats), and a share
    of hostile messages: named attacks (built once), random MIME trees, mutated corpus messages."""

    def __init__(self, seed: int, hostile: float) -> None:
        self.paths = sorted(CORPORA.glob("*/*/*.eml"))
        if not self.paths:
            sys.exit(f"no corpus under {CORPORA}: unpack with ../shared/corpora/unpack .cache/corpora")
        random.Random(seed).shuffle(self.paths)
        self.hostile = hostile
        self.next_path = 0
        built = {name: as_mta_sends(a.build()) for name, a in ATTACKS.items()}
        self.attacks = {name: raw for name, raw in built.items() if len(raw) <= MAX_SIZE}
        self.names = list(self.attacks)
        self.weights = [attack_weight(len(self.attacks[n])) for n in self.names]

    async def corpus_message(self) -> tuple[str, bytes]:
        path = self.paths[self.next_path % len(self.paths)]
        self.next_path += 1
        raw = await asyncio.to_thread(path.read_bytes)
        return f"{path.parent.parent.name}/{path.parent.name}", raw

    async def next(self, rng: random.Random) -> tuple[str, bytes]:
        """(kind, bytes as sent); kind is corpus/label, attack:NAME, random or mutant."""
        if rng.random() >= self.hostile:
            kind, raw = await self.corpus_message()
            return kind, as_mta_sends(raw)
        r = rng.random()
        if r < 0.5:
            name = rng.choices(self.names, self.weights)[0]
            return f"attack:{name}", self.attacks[name]
        if r < 0.75:
            return "random", as_mta_sends(random_message(rng))
        _, raw = await self.corpus_message()
        return "mutant", as_mta_sends(mutate(rng, raw))[:MAX_SIZE]


# -- the clients -------------------------------------------------------------------------------


@dataclass
class Stats:
    done: int = 0  # messages answered (2xx, 4xx or 5xx)
    sent_bytes: int = 0
    replies: Counter[str] = field(default_factory=Counter)  # 2xx, quarantined, 4xx, 5xx
    kinds: Counter[str] = field(default_factory=Counter)
    broken: int = 0  # connections lost or refused (the message is counted again when retried)
    big: int = 0  # messages over 1 MB answered
    slow: list[tuple[float, str, int, float, str]] = field(default_factory=list)  # t, kind, size, s, reply


async def client(index: int, port: int, source: Source, start: float, deadline: float, seed: int,
                 stats: Stats) -> None:
    rng = random.Random(seed * 1000 + index)
    smtp: aiosmtplib.SMTP | None = None
    n = 0
    while time.monotonic() < deadline:
        kind, raw = await source.next(rng)
        n += 1
        t0 = time.monotonic()
        reply = "2xx"
        try:
            if smtp is None:
                # An explicit EHLO name: aiosmtplib's default asks the host's resolver per connection.
                smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=CLIENT_TIMEOUT,
                                       start_tls=False, local_hostname="localhost")
                await smtp.connect()
            await smtp.execute_command(b"XFORWARD", f"ADDR=203.0.113.{(index * 31 + n) % 250 + 1}".encode())
            _, reply = await smtp.sendmail(envelope_sender(raw), [RCPT], raw)
            reply = "quarantined" if "quarantined" in reply else "2xx"
        except aiosmtplib.SMTPResponseException as e:
            reply = f"{e.code} {e.message[:60]}"
            try:
                await smtp.rset()  # type: ignore[union-attr]
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()  # type: ignore[union-attr]
                smtp = None
        except (aiosmtplib.SMTPException, OSError):
            stats.broken += 1
            if smtp is not None:
                smtp.close()
            smtp = None
            await asyncio.sleep(0.5)
            continue
        took = time.monotonic() - t0
        if took > SLOW_S:
            stats.slow.append((round(t0 - start, 1), kind, len(raw), round(took, 1), reply))
        stats.replies[reply if reply in ("2xx", "quarantined") else f"{reply[0]}xx"] += 1
        stats.done += 1
        stats.sent_bytes += len(raw)
        if kind.startswith("attack:"):
            stats.kinds["attack"] += 1
        stats.kinds[kind] += 1
        stats.big += len(raw) > 1_000_000
    if smtp is not None:
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()


# -- processes and their memory ----------------------------------------------------------------


def children_of(root: int) -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of `root` and every live descendant."""
    procs = {pid: (ppid, cmd) for pid, (ppid, _, cmd) in live_processes().items()}
    kids: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in procs.items():
        kids[ppid].append(pid)
    out: dict[int, tuple[int, str]] = {}
    todo = [root] if root in procs else []
    while todo:
        pid = todo.pop()
        out[pid] = procs[pid]
        todo.extend(kids[pid])
    return out


def roles(root: int, worker_index: dict[int, int]) -> dict[str, int]:
    """Role -> pid. Workers are the parent's spawn children (index from the serve log's
    `worker_started`, else by pid), prepare processes the workers' spawn children (K by pid)."""
    tree = children_of(root)
    out: dict[str, int] = {}
    workers = sorted(p for p, (pp, cmd) in tree.items() if pp == root and "resource_tracker" not in cmd)
    index = {p: worker_index.get(p, i) for i, p in enumerate(workers)}
    under: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, cmd) in sorted(tree.items()):
        if pid == root:
            out["parent"] = pid
        elif "resource_tracker" in cmd:
            out["resource-tracker" if ppid == root else f"other-{pid}"] = pid
        elif pid in index:
            out[f"worker-{index[pid]}"] = pid
        elif ppid in index:
            under[index[ppid]].append(pid)
        else:
            out[f"other-{pid}"] = pid
    for w, pids in under.items():
        for k, pid in enumerate(pids):
            out[f"worker-{w}/prepare-{k}"] = pid
    return out


STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads")


def status(pid: int) -> dict[str, int] | None:
    """The fields above (KiB; Threads a count) and open files, or None for a process gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    out = {"fds": fds}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            out[key] = int(value.split()[0])
    # a zombie (exited, not yet reaped: a recycled prepare process) has no memory lines
    return out if "VmRSS" in out else None


def series_count(port: int) -> int | None:
    """Prometheus series a worker exports (lines that are not comments), None if it did not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body = r.read().decode(errors="replace")
    except OSError:
        return None
    return sum(1 for line in body.splitlines() if line and not line.startswith("#"))


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the load started
    done: int
    role: str
    pid: int
    rss_kib: int
    hwm_kib: int
    anon_kib: int
    file_kib: int
    threads: int
    fds: int


@dataclass
class Recorder:
    root: int
    log: Path
    metrics_port: int
    workers: int
    samples: list[Sample] = field(default_factory=list)
    series: list[tuple[float, int, int]] = field(default_factory=list)  # t, worker, series
    index: dict[int, int] = field(default_factory=dict)  # worker pid -> index, from the serve log
    trimmed: dict[str, tuple[int, int]] = field(default_factory=dict)  # --trim: role -> RSS KiB before, after
    report_roles: dict[int, str] = field(default_factory=dict)  # pid -> role, when asked for a report
    report_times: list[float] = field(default_factory=list)

    def worker_index(self) -> dict[int, int]:
        """Read again only when the parent has a worker we have not seen (one was restarted)."""
        tree = children_of(self.root)
        kids = {p for p, (pp, cmd) in tree.items() if pp == self.root and "resource_tracker" not in cmd}
        if not kids <= set(self.index):
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            found = re.findall(r"worker_started worker=(\d+) pid=(\d+)", text)
            self.index = {int(p): int(w) for w, p in found}
        return self.index

    def sample(self, t: float, done: int) -> list[Sample]:
        now = []
        for role, pid in sorted(roles(self.root, self.worker_index()).items()):
            st = status(pid)
            if st is None:
                continue
            now.append(Sample(round(t, 1), done, role, pid, st.get("VmRSS", 0), st.get("VmHWM", 0),
                              st.get("RssAnon", 0), st.get("RssFile", 0), st.get("Threads", 0), st["fds"]))
        self.samples.extend(now)
        for w in range(self.workers):
            n = series_count(self.metrics_port + w)
            if n is not None:
                self.series.append((round(t, 1), w, n))
        return now


def ask_reports(rec: Recorder, t: float) -> None:
    """SIGUSR2 to the gateway's parent, as an admin sends it: the parent forwards it to every worker and
    each worker to its prepare processes, and each logs a `memory_report` (milter.gateway.memreport)
    in serve.log. Remembers which role each pid held, to read the reports by role."""
    for role, pid in roles(rec.root, rec.worker_index()).items():
        rec.report_roles[pid] = role
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec.root, signal.SIGUSR2)
    rec.report_times.append(round(t, 1))


REPORT = re.compile(r"memory_report (?:worker=\d+ |role=\w+ )?pid=(\d+) (.*)")


def memory_reports(rec: Recorder) -> dict[str, list[dict[str, str]]]:
    """Role -> its memory reports in serve.log, in order (a recycled slot: all its processes')."""
    text = rec.log.read_text(errors="replace") if rec.log.exists() else ""
    out: dict[str, list[dict[str, str]]] = defaultdict(list)
    for pid, rest in REPORT.findall(text):
        role = rec.report_roles.get(int(pid))
        if role is not None and role != "parent":
            out[role].append(dict(kv.split("=", 1) for kv in rest.split() if "=" in kv))
    return out


REPORT_COLUMNS = ("rss_mib", "malloc_in_use_mib", "malloc_free_mib", "malloc_mmapped_mib", "py_arenas",
                  "py_blocks", "gc_objects")


def print_reports(reports: dict[str, list[dict[str, str]]]) -> None:
    """The first report after the warm-up and the last, per role: where the memory went."""
    if not reports:
        return
    print("\nmemory reports (SIGUSR2), first after the warm-up -> last; MiB except counts:")
    print(f"  {'process':24s}" + "".join(f"{c.removesuffix('_mib'):>24s}" for c in REPORT_COLUMNS))
    for role, rows in sorted(reports.items()):
        first, last = rows[0], rows[-1]
        cells = "".join(f"{first.get(c, '?') + ' -> ' + last.get(c, '?'):>24s}" for c in REPORT_COLUMNS)
        print(f"  {role:24s}{cells}")
    for role, rows in sorted(reports.items()):
        if len(rows) > 1 and not role.count("/"):
            print(f"  {role} object types grown most since its previous report: {rows[-1].get('top', '?')}")


def trim_all(rec: Recorder) -> dict[str, tuple[int, int]]:
    """Role -> (VmRSS KiB, VmRSS KiB after glibc's malloc_trim(0), called in the process through gdb).
    What the trim gives back was free memory the allocator kept, not live objects."""
    out: dict[str, tuple[int, int]] = {}
    for role, pid in sorted(roles(rec.root, rec.worker_index()).items()):
        before = status(pid)
        subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "call (int)malloc_trim(0)"],
                       capture_output=True, timeout=60, check=False)
        after = status(pid)
        if before is not None and after is not None:
            out[role] = (before["VmRSS"], after["VmRSS"])
    return out


# -- analysis ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoleSummary:
    role: str
    pids: int  # distinct pids seen after the warm-up (more than 1: the process was replaced)
    warm_mib: float  # RSS at the first sample after the warm-up
    end_mib: float
    max_mib: float
    hwm_mib: float  # VmHWM at the end
    growth_mib: float
    growth_pct: float
    slope_mib_10min: float  # least squares over the samples after the warm-up
    slope_pct_hour: float
    last_half_mib_10min: float  # the same over the second half of them: is growth slowing down?
    anon_growth_mib: float
    threads: str  # at warm-up end -> at the end
    fds: str

    @property
    def flat(self) -> bool:
        return self.slope_mib_10min < FLAT_SLOPE_MIB_PER_10MIN and self.growth_pct < FLAT_GROWTH_PCT


def slope_per_10min(rows: list[Sample]) -> float:
    if len(rows) < 3 or rows[-1].t == rows[0].t:
        return 0.0
    fit = statistics.linear_regression([r.t for r in rows], [r.rss_kib / MIB for r in rows])
    return fit.slope * 600


def _minute_mean(rows: list[Sample], start: float) -> Sample:
    """The samples of the minute from `start`, as one: mean RSS and anonymous RSS, the last one's rest."""
    window = [r for r in rows if start <= r.t <= start + 60] or rows[-1:]
    return replace(window[-1], rss_kib=round(statistics.fmean(r.rss_kib for r in window)),
                   anon_kib=round(statistics.fmean(r.anon_kib for r in window)))


def summarise(samples: list[Sample], warmup: float, until: float) -> list[RoleSummary]:
    by_role: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.t):  # two threads sample at the load's end
        by_role[s.role].append(s)
    out = []
    for role, rows in sorted(by_role.items()):
        post = [r for r in rows if warmup <= r.t <= until]
        if len(post) < 2:
            continue
        # A role is a slot: when its process is replaced (prepare pools are recycled every
        # server.prepare_max_jobs jobs), the host pays for the slot, so every incarnation counts.
        # The ends are minute means, not single samples: one big message moves a sample by 20 MiB.
        first, last = _minute_mean(post, post[0].t), _minute_mean(post, post[-1].t - 60)
        slope = slope_per_10min(post)
        warm = first.rss_kib / MIB
        out.append(RoleSummary(
            role=role, pids=len({r.pid for r in post}), warm_mib=round(warm, 1),
            end_mib=round(last.rss_kib / MIB, 1), max_mib=round(max(r.rss_kib for r in post) / MIB, 1),
            hwm_mib=round(last.hwm_kib / MIB, 1), growth_mib=round((last.rss_kib - first.rss_kib) / MIB, 1),
            growth_pct=round(100 * (last.rss_kib - first.rss_kib) / max(1, first.rss_kib), 1),
            slope_mib_10min=round(slope, 2), slope_pct_hour=round(100 * slope * 6 / max(warm, 1e-9), 1),
            last_half_mib_10min=round(slope_per_10min(post[len(post) // 2 :]), 2),
            anon_growth_mib=round((last.anon_kib - first.anon_kib) / MIB, 1),
            threads=f"{first.threads}->{last.threads}", fds=f"{first.fds}->{last.fds}",
        ))
    return out


def print_table(rows: list[RoleSummary], warmup: float) -> None:
    print(f"\nRSS per process, MiB (warm-up end = first sample after {warmup / 60:g} min; "
          "slope = least squares over the samples after it)")
    head = (f"{'process':24s}{'warm-up':>9s}{'end':>9s}{'max':>9s}{'HWM':>9s}{'growth':>9s}{'%':>7s}"
            f"{'MiB/10min':>11s}{'%/hour':>8s}{'2nd half':>10s}{'anon':>8s}  threads  fds      pids")
    print(head)
    for r in rows:
        print(f"{r.role:24s}{r.warm_mib:9.1f}{r.end_mib:9.1f}{r.max_mib:9.1f}{r.hwm_mib:9.1f}"
              f"{r.growth_mib:+9.1f}{r.growth_pct:+7.1f}{r.slope_mib_10min:+11.2f}{r.slope_pct_hour:+8.1f}"
              f"{r.last_half_mib_10min:+10.2f}{r.anon_growth_mib:+8.1f}  {r.threads:8s} {r.fds:8s} {r.pids}")


def plot(samples: list[Sample], done: list[tuple[float, int]], warmup: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_role: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.t):  # two threads sample at the load's end
        by_role[s.role].append(s)
    fig, (top, bottom, rate) = plt.subplots(3, 1, figsize=(10, 9), sharex=True,
                                            gridspec_kw={"height_ratios": [3, 3, 1]})
    for role, rows in sorted(by_role.items()):
        ax = bottom if "prepare" in role or "tracker" in role else top
        ax.plot([r.t / 60 for r in rows], [r.rss_kib / MIB for r in rows], label=role, linewidth=1)
    for ax, title in ((top, "parent and workers"), (bottom, "prepare processes, resource tracker")):
        ax.axvline(warmup / 60, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel("RSS, MiB")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, ncol=3, loc="lower right")
        ax.grid(alpha=0.3)
    pairs = list(itertools.pairwise(done))
    rate.plot([t2 / 60 for (_, _), (t2, _) in pairs],
              [(b - a) / max(1e-9, t2 - t1) for (t1, a), (t2, b) in pairs],
              color="black", linewidth=0.8)
    rate.set_ylabel("msgs/s")
    rate.set_xlabel("minutes since the load started")
    rate.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def write_outputs(out: Path, rec: Recorder, summary: dict[str, object]) -> None:
    with (out / "samples.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(Sample.__dataclass_fields__)
        w.writerows(asdict(s).values() for s in rec.samples)
    with (out / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("t", "worker", "series"))
        w.writerows(rec.series)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


# -- the run -----------------------------------------------------------------------------------


def answers(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                return s.recv(64).startswith(b"220")
        except OSError:
            return False

    return ready


def two_free_ports() -> int:
    """A port P with P + 1 also free: worker N serves metrics on metrics_listen's port + N."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def short(role: str) -> str:
    return role.replace("worker-", "w").replace("/prepare-", "p").replace("resource-tracker", "rt")


async def run_load(args: argparse.Namespace, port: int, rec: Recorder, source: Source,
                   stats: Stats) -> tuple[float, list[tuple[float, int]]]:
    start = time.monotonic()
    deadline = start + args.minutes * 60
    progress: list[tuple[float, int]] = []
    stop = threading.Event()

    next_report = args.warmup * 60

    async def sampler() -> None:
        nonlocal next_report
        while True:
            t = time.monotonic() - start
            done = stats.done
            now = await asyncio.to_thread(rec.sample, t, done)
            if args.report_every and t >= next_report:
                ask_reports(rec, t)
                next_report += args.report_every * 60
            progress.append((t, done))
            rate = done / t if t > 0 else 0.0
            cells = " ".join(f"{short(s.role)}={s.rss_kib / MIB:.0f}" for s in now)
            print(f"[{t / 60:5.1f} min] {done:6d} msgs ({rate:5.1f}/s) broken {stats.broken}  "
                  f"RSS MiB: {cells}", flush=True)
            if stop.is_set():
                return
            await asyncio.sleep(max(0.0, start + len(progress) * args.sample - time.monotonic()))

    task = asyncio.create_task(sampler())
    await asyncio.gather(*(client(i, port, source, start, deadline, args.seed, stats)
                           for i in range(args.clients)))
    wall = time.monotonic() - start
    # The judged window ends with this sample: --linger and --trim come after it.
    await asyncio.to_thread(rec.sample, wall, stats.done)
    if args.report_every:
        ask_reports(rec, wall)
        await asyncio.sleep(5)  # a busy worker answers within a second or two
    if args.linger:
        print(f"load over; the gateway idles {args.linger:g} s (sampled on)", flush=True)
        await asyncio.sleep(args.linger)
    if args.trim:
        rec.trimmed = await asyncio.to_thread(trim_all, rec)
    stop.set()
    await task
    return wall, progress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=2.0, help="minutes of warm-up before the judged part")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hostile", type=float, default=0.02, help="share of hostile messages")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--linger", type=float, default=0.0,
                    help="seconds the gateway stays up, idle and sampled, after the load (to inspect it)")
    ap.add_argument("--trim", action="store_true",
                    help="after the load (and --linger), call malloc_trim(0) in every gateway process "
                         "through gdb and report its RSS before and after: retained free memory vs live")
    ap.add_argument("--report-every", type=float, default=4.0,
                    help="minutes between memory reports (SIGUSR2) from the warm-up's end, one at the "
                         "end; 0: none")
    ap.add_argument("--out", default="/tmp/rss", help="folder for serve.log, samples, summary and plot")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.log").unlink(missing_ok=True)
    warmup = args.warmup * 60

    t0 = time.monotonic()
    source = Source(args.seed, args.hostile)
    size = sum(map(len, source.attacks.values())) / 1e6
    print(f"{len(source.paths)} corpus files, {len(source.attacks)} named attacks built ({size:.0f} MB) "
          f"in {time.monotonic() - t0:.0f} s", flush=True)
    sink_port, gw_port, dns_port, metrics_port = free_port(), free_port(), free_port(), two_free_ports()
    helpers = [subprocess.Popen([sys.executable, str(GATEWAY_BENCH), "--sink", str(sink_port)]),
               subprocess.Popen([sys.executable, str(GATEWAY_BENCH), "--dns-server", str(dns_port)])]
    serve = ServeProcess(out)
    stats = Stats()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base.toml"
            base.write_text(f"""[server]
listen = "127.0.0.1:{gw_port}"
downstream = "127.0.0.1:{sink_port}"
workers = {args.workers}
metrics_listen = "127.0.0.1:{metrics_port}"
hostname = "gw.rss.test"

[store]
url = "sqlite:///{tmp}/rss.db"
""")
            config = serve_config("local", str(base), dns_port, tmp)
            assert config is not None
            t0 = time.monotonic()
            serve.launch(Path(config).read_text(), [], answers(gw_port), timeout=300)
            assert serve.proc is not None
            print(f"gateway ready in {time.monotonic() - t0:.0f} s (pid {serve.proc.pid}); load for "
                  f"{args.minutes:g} min, {args.clients} clients, {args.hostile:.0%} hostile", flush=True)
            rec = Recorder(serve.proc.pid, out / "serve.log", metrics_port, args.workers)
            wall, progress = asyncio.run(run_load(args, gw_port, rec, source, stats))
            serve.stop()
    finally:
        serve.stop()
        for p in helpers:
            p.terminate()
        for p in helpers:
            p.wait(timeout=30)

    rows = summarise(rec.samples, warmup, round(wall, 1))
    log = (out / "serve.log").read_text(errors="replace")
    events = Counter(re.sub(r" id=.*in_prepare=", " in_prepare=", e) for e in re.findall(
        r"prepare_pool_recycled reason=\w+|prepare_pool_broken|scan_timeout id=.*?in_prepare=\w+|"
        r"worker_started|worker_died|Traceback", log))
    series = {w: (min(n for _, ww, n in rec.series if ww == w), max(n for _, ww, n in rec.series if ww == w))
              for w in range(args.workers) if any(ww == w for _, ww, _ in rec.series)}
    growing = [r.role for r in rows if not r.flat]
    verdict = "flat" if rows and not growing else "GROWS"

    print(f"\n{stats.done} messages answered in {wall:.0f} s = {stats.done / wall:.1f} msgs/s "
          f"({stats.sent_bytes / 1e9:.2f} GB; {stats.big} over 1 MB), broken connections {stats.broken}")
    print("replies: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.replies.items())))
    mix = sorted(((k, v) for k, v in stats.kinds.items() if not k.startswith("attack:")),
                 key=lambda kv: -kv[1])
    print("mix: " + ", ".join(f"{k} {v}" for k, v in mix))
    print("attacks: " + ", ".join(f"{k[7:]} {v}" for k, v in sorted(stats.kinds.items())
                                  if k.startswith("attack:")))
    print("gateway log: " + (", ".join(f"{k} {v}" for k, v in sorted(events.items())) or "no events"))
    print("Prometheus series per worker (min..max over the run): "
          + ", ".join(f"worker-{w} {lo}..{hi}" for w, (lo, hi) in series.items()))
    slowest = sorted(stats.slow, key=lambda s: -s[3])
    print(f"answered after more than {SLOW_S:g} s: {len(slowest)}; "
          "slowest (minute, kind, size, seconds, reply):")
    for t, kind, size, took, reply in slowest[:12]:
        print(f"  {t / 60:5.1f}  {kind:36s} {size:>10,d}  {took:6.1f}  {reply}")
    print_table(rows, warmup)
    reports = memory_reports(rec)
    print_reports(reports)
    if rec.trimmed:
        print("\nafter the load, malloc_trim(0) in each process (gdb): RSS MiB before -> after (given back)")
        for role, (before, after) in rec.trimmed.items():
            print(f"  {role:24s}{before / MIB:8.1f} -> {after / MIB:6.1f}  ({(before - after) / MIB:5.1f})")
    print(f"\nverdict: {verdict} (flat: every process's slope after the warm-up < "
          f"{FLAT_SLOPE_MIB_PER_10MIN:g} MiB per 10 min and its growth < {FLAT_GROWTH_PCT:g} %)"
          + (f"; grows: {', '.join(growing)}" if growing else ""))

    summary = dict(
        args=vars(args), wall_s=round(wall, 1), messages=stats.done, msgs_per_s=round(stats.done / wall, 2),
        sent_bytes=stats.sent_bytes, over_1mb=stats.big, broken=stats.broken, replies=dict(stats.replies),
        kinds=dict(stats.kinds), slow=slowest, gateway_events=dict(events), metrics_series=series,
        thresholds=dict(slope_mib_per_10min=FLAT_SLOPE_MIB_PER_10MIN, growth_pct=FLAT_GROWTH_PCT),
        verdict=verdict, growing=growing, trimmed_kib=rec.trimmed, memory_reports=reports,
        report_times=rec.report_times, roles=[asdict(r) for r in rows],
        progress=progress,
    )
    write_outputs(out, rec, summary)
    plot(rec.samples, progress, warmup, out / "rss.png")
    print(f"wrote {out}/samples.csv, metrics.csv, summary.json, rss.png, serve.log")
    sys.exit(0 if verdict == "flat" else 1)


if __name__ == "__main__":
    main()
