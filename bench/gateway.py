"""Gateway throughput and added latency: N concurrent SMTP clients -> `milter serve` -> a real sink.

    .venv/bin/python bench/gateway.py [--clients 50] [--messages 3000] [--workers 2] [--rate R] [--runs N]
                                      [--dns system|local|off]

Runs the same real corpus messages (../shared/corpora, unpacked under .cache/corpora) twice: straight to
the sink, then through the gateway (a `milter serve` subprocess relaying to that sink), each client on
one reused connection like an MTA's, sending XFORWARD with an outside client address as Postfix does
(so the gateway checks SPF for the message's From domain, used as MAIL FROM). Prints messages/s and
p50/p99 per-message latency for both, and the added latency (gateway minus direct) at p50 and p99. The
sink runs in its own process.

DKIM / DMARC lookups go to a responder on loopback that answers every name at once with NXDOMAIN
(`--dns local`, the default: a resolver whose cache holds every answer, so the figures are the
gateway's own cost, as with the peers' network checks off), to the system resolver (`--dns system`,
what `milter serve` uses; its latency and losses then dominate p99: each message waits at most
auth.timeout), or nowhere (`--dns off`: [auth] enabled = false).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT / ".cache" / "corpora"
MAX_LINE = 998  # what an MTA hands a content filter (Postfix folds longer lines)


def corpus(limit: int) -> list[bytes]:
    """Up to `limit` messages spread evenly over all corpora and labels (every k-th of the sorted paths).

    Until 2026-11-28 this took every k-th file but stopped at `limit`, half-way down the sorted list:
    every message was Enron's. Figures before that date are for Enron mail only."""
    files = sorted(CORPORA.glob("*/*/*.eml"))
    if not files:
        sys.exit(f"no corpus under {CORPORA}: unpack with ../shared/corpora/unpack .cache/corpora")
    out = []
    for f in files[:: max(1, len(files) // limit)]:
        raw = f.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if len(raw) <= 1_000_000 and max(map(len, raw.split(b"\r\n"))) <= MAX_LINE:
            out.append(raw)
    return out[:limit]


# -- DNS responder (own process) ----------------------------------------------------------------


def run_dns(port: int) -> None:
    """Answer every query at once with NXDOMAIN: the cost of DNS without the network's latency."""
    import socket

    import dns.message
    import dns.rcode

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    while True:
        data, addr = sock.recvfrom(4096)
        try:
            reply = dns.message.make_response(dns.message.from_wire(data))
        except Exception:
            continue
        reply.set_rcode(dns.rcode.NXDOMAIN)
        sock.sendto(reply.to_wire(), addr)


def serve_config(mode: str, base: str | None, port: int, tmp: str, history: bool = True) -> str | None:
    """The config file to serve with: `base` plus the [auth] table the --dns mode needs, and
    `[policy.history] enabled = false` for --history off."""
    text = Path(base).read_text() if base else ""
    extra = ""
    if mode != "system":
        if "[auth]" in text:
            sys.exit("--dns local / off set [auth] themselves: use a --config without an [auth] table")
        auth = f'nameservers = ["127.0.0.1:{port}"]' if mode == "local" else "enabled = false"
        extra += f"\n[auth]\n{auth}\n"
    if not history:
        if "[policy.history]" in text:
            sys.exit("--history off sets [policy.history] itself: use a --config without that table")
        extra += "\n[policy.history]\nenabled = false\n"
    if not extra:
        return base
    path = Path(tmp) / "bench.toml"
    path.write_text(text + extra)
    return str(path)


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid` and its live descendants (the gateway,
    its workers and their prepare processes), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo.extend(c for c, (parent, _) in stats.items() if parent == p)
    return total


# -- sink (own process) ------------------------------------------------------------------------


def run_sink(port: int) -> None:
    from aiosmtpd.smtp import SMTP

    class Handler:
        count = 0

        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            Handler.count += 1
            return "250 2.0.0 Ok"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = Handler()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="sink", data_size_limit=None), "127.0.0.1", port
        )
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- load --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    wall: float
    latencies: list[float]
    failures: int
    quarantined: tuple[float, ...] = ()  # latencies of the messages answered "quarantined"

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall

    def pct(self, q: float, latencies: Sequence[float] | None = None) -> float:
        lat = sorted(self.latencies if latencies is None else latencies)
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")


_FROM = re.compile(rb"(?im)^From:[^\r\n]*?([\w.+-]+@[\w-]+(?:\.[\w-]+)+)")


def envelope_sender(raw: bytes) -> str:
    """The message's From address as MAIL FROM, as most senders do (SPF then checks its domain)."""
    m = _FROM.search(raw, 0, 65536)
    return m.group(1).decode() if m else "bench@sender.test"


async def load(
    port: int,
    messages: list[bytes],
    total: int,
    clients: int,
    rate: float | None = None,
    xforward: bool = False,
) -> Result:
    """Closed loop (each client sends its next message when the last is answered), or paced at `rate`
    messages/s in all: message k is due at start + k / rate, so latency is measured at that offered
    load instead of at saturation, where it is only queueing. With `xforward` each message says, as
    Postfix would, that it came from an outside client (203.0.113.x): the gateway then checks SPF."""
    queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait((i, messages[i % len(messages)]))
    latencies: list[float] = []
    quarantined: list[float] = []
    failures = 0
    start = time.perf_counter()

    async def client() -> None:
        nonlocal failures
        # An explicit EHLO name: aiosmtplib's default is socket.getfqdn(), per connection, which asks
        # the host's DNS resolver on a host whose name is not in /etc/hosts (150 queries per run).
        # "localhost" is what getfqdn() gave on the machine where the figures were measured.
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, timeout=60, start_tls=False, local_hostname="localhost"
        )
        await smtp.connect()
        while not queue.empty():
            k, raw = queue.get_nowait()
            if rate is not None:
                await asyncio.sleep(max(0.0, start + k / rate - time.perf_counter()))
            t0 = time.perf_counter()
            try:
                if xforward:
                    await smtp.execute_command(b"XFORWARD", f"ADDR=203.0.113.{k % 250 + 1}".encode())
                _, reply = await smtp.sendmail(envelope_sender(raw), ["rcpt@rcpt.test"], raw)
                latencies.append(time.perf_counter() - t0)
                if "quarantined" in reply:
                    quarantined.append(latencies[-1])
            except aiosmtplib.SMTPResponseException:
                failures += 1
                await smtp.rset()
        await smtp.quit()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return Result(time.perf_counter() - t0, latencies, failures, tuple(quarantined))


async def wait_port(port: int, limit: float = 120) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            ok = (await reader.readline()).startswith(b"220")
            writer.close()
            if ok:
                return True
        except OSError:
            pass
        await asyncio.sleep(0.25)
    return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def report(name: str, r: Result) -> None:
    print(
        f"{name:>8}: {len(r.latencies)} msgs in {r.wall:.1f} s = {r.rate:.0f} msgs/s, "
        f"p50 {r.pct(0.5):.1f} ms, p99 {r.pct(0.99):.1f} ms, failures {r.failures}"
    )
    if r.quarantined:
        q = r.quarantined
        print(f"{'':>8}  of which quarantined: {len(q)}, p50 {r.pct(0.5, q):.1f} ms, "
              f"p99 {r.pct(0.99, q):.1f} ms")


def run_once(
    sink_port: int, gw_port: int, messages: list[bytes], args: argparse.Namespace, gw_pid: int
) -> tuple[float, float, float, float]:
    """Both phases, one after the other; (gateway msgs/s, added p50 ms, added p99 ms, gateway CPU ms
    per message: the whole process tree's CPU over the gateway phase, over the messages answered)."""
    direct = asyncio.run(load(sink_port, messages, args.messages, args.clients, args.rate))
    report("direct", direct)
    cpu0 = tree_cpu(gw_pid)
    gateway = asyncio.run(load(gw_port, messages, args.messages, args.clients, args.rate, xforward=True))
    cpu = (tree_cpu(gw_pid) - cpu0) * 1000 / max(1, len(gateway.latencies))
    report("gateway", gateway)
    p50, p99 = gateway.pct(0.5) - direct.pct(0.5), gateway.pct(0.99) - direct.pct(0.99)
    print(f"   added: p50 {p50:.1f} ms, p99 {p99:.1f} ms; throughput {gateway.rate:.0f} msgs/s; "
          f"gateway CPU {cpu:.2f} ms per message")
    return gateway.rate, p50, p99, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--messages", type=int, default=3000, help="messages per phase")
    ap.add_argument("--corpus", type=int, default=1000, help="distinct corpus messages to cycle through")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--rate", type=float, help="pace the load at this many msgs/s (default: as fast as answered)"
    )
    ap.add_argument("--db", help="store URL (default: a new SQLite file in a temporary folder)")
    ap.add_argument("--gateway-log", help="keep the gateway's log in this file (default: discarded)")
    ap.add_argument("--runs", type=int, default=1, help="repeat both phases; prints the medians at the end")
    ap.add_argument("--config", help="milter config file (model, policy); flags below override it")
    ap.add_argument("--dns", choices=("local", "system", "off"), default="local", help="see above")
    ap.add_argument("--history", choices=("on", "off"), default="on",
                    help="off: [policy.history] enabled = false (to measure what the history costs)")
    ap.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dns-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sink:
        run_sink(args.sink)
        return
    if args.dns_server:
        run_dns(args.dns_server)
        return
    messages = corpus(args.corpus)
    sink_port, gw_port, dns_port = free_port(), free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--sink", str(sink_port)])]
    if args.dns == "local":
        procs.append(subprocess.Popen([sys.executable, __file__, "--dns-server", str(dns_port)]))
    with tempfile.TemporaryDirectory() as tmp:
        config = serve_config(args.dns, args.config, dns_port, tmp, history=args.history == "on")
        cmd = [
            sys.executable,
            "-c",
            "from milter.cli import main; main()",
            "serve",
            "--listen",
            f"127.0.0.1:{gw_port}",
            "--downstream",
            f"127.0.0.1:{sink_port}",
            "--db",
            args.db or f"sqlite:///{tmp}/b.db",
            "--workers",
            str(args.workers),
            "--metrics-listen",
            "off",
        ]
        if config:
            cmd[4:4] = ["--config", config]
        # The gateway logs a line per message, as in production; to a file, not over the figures.
        log_path = Path(args.gateway_log or f"{tmp}/gateway.log")
        gateway_log = log_path.open("wb")
        gateway_proc = subprocess.Popen(cmd, cwd=ROOT, stderr=gateway_log)
        procs.append(gateway_proc)
        try:
            if not asyncio.run(wait_port(sink_port)):
                sys.exit(f"the sink does not answer on port {sink_port}")
            if not asyncio.run(wait_port(gw_port)):
                tail = log_path.read_bytes()[-3000:].decode(errors="replace")
                sys.exit(f"the gateway does not answer on port {gw_port}; its log ends:\n{tail}")
            median_kib = statistics.median(map(len, messages)) / 1024
            print(
                f"{len(messages)} corpus messages (median {median_kib:.1f} KiB), "
                f"{args.clients} clients, {args.messages} messages per phase, "
                f"{args.workers} gateway workers, DNS {args.dns}, history {args.history}"
            )
            warm = min(200, args.messages)
            asyncio.run(load(gw_port, messages, warm, args.clients, xforward=True))  # warm-up
            rows = [run_once(sink_port, gw_port, messages, args, gateway_proc.pid) for _ in range(args.runs)]
            if args.runs > 1:
                rate, p50, p99, cpu = (statistics.median(col) for col in zip(*rows, strict=True))
                print(
                    f"  median of {args.runs} runs: throughput {rate:.0f} msgs/s, "
                    f"added p50 {p50:.1f} ms, p99 {p99:.1f} ms, gateway CPU {cpu:.2f} ms per message"
                )
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=60)
            gateway_log.close()


if __name__ == "__main__":
    main()
