#!/usr/bin/env python3
"""What the DNS blocklists ([reputation] zones) cost the gateway per message: names asked, queries sent
and CPU, on real corpus mail, against a loopback responder.

Every --every-th corpus message is parsed once (`milter.features.extract`, outside the timing), given a
client address from a pool of --clients addresses (198.18.0.0/15, the benchmarking range), and checked
as the gateway checks it (`milter.gateway.reputation.Blocklists`: an IP zone and a domain zone for
sender and link domains), --in-flight messages at a time through the gateway's resolver and cache. Pass
1 starts with an empty cache, pass 2 repeats the same mail on the warm cache. The responder
(bench/postfix.py's: NXDOMAIN for every name, at once) runs in its own process; nothing leaves the host.
CPU is this process's (`time.process_time`) per message.

Usage: .venv/bin/python bench/dnsbl.py [--every 20] [--clients 500] [--in-flight 50]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import subprocess
import sys
import time
from pathlib import Path

from milter.auth import CachingResolver, DnsResolver, TxtAnswer
from milter.auth.dnsbl import Zone, asks
from milter.features import extract
from milter.features.summary import MessageSummary
from milter.gateway.reputation import Blocklists
from milter.types import Action, Envelope

ROOT = Path(__file__).resolve().parent.parent
ZONES = (
    Zone("zen.spamhaus.org", "ip", Action.QUARANTINE, codes={"127.0.0.2": "SBL", "127.0.0.4": "XBL"}),
    Zone("dbl.spamhaus.org", "domain", Action.QUARANTINE, codes={"127.0.1.2": "spam domain"}),
)


class Counting:
    """The responder-facing resolver, counting the queries that get past the cache."""

    def __init__(self, inner: DnsResolver) -> None:
        self.inner = inner
        self.sent = 0

    async def txt(self, name: str) -> TxtAnswer:
        return await self.query(name, "TXT")

    async def query(self, name: str, rdtype: str) -> TxtAnswer:
        self.sent += 1
        return await self.inner.query(name, rdtype)


def corpus_mail(corpora: Path, every: int) -> list[Path]:
    files = sorted(corpora.glob("*/*/*.eml"))
    return files[::every]


async def one_pass(lists: Blocklists, mail: list[tuple[MessageSummary, Envelope]], in_flight: int) -> float:
    gate = asyncio.Semaphore(in_flight)

    async def one(summary: MessageSummary, envelope: Envelope) -> None:
        async with gate:
            await lists.check(summary, envelope, "bench")

    start = time.process_time()
    await asyncio.gather(*(one(s, e) for s, e in mail))
    return time.process_time() - start


async def measure(port: int, mail: list[tuple[MessageSummary, Envelope]], in_flight: int) -> None:
    counting = Counting(DnsResolver([("127.0.0.1", port)], lifetime=1.0))
    lists = Blocklists(CachingResolver(counting, max_entries=10_000), ZONES, 1.0)
    asked = [sum(asks(z, s) for z in ZONES for s in lists.targets(su, en)) for su, en in mail]
    print(f"{len(mail)} messages; names a message asks: mean {statistics.mean(asked):.2f}, "
          f"median {statistics.median(asked):g}, max {max(asked)}")
    for label in ("cold cache", "warm cache"):
        before = counting.sent
        cpu = await one_pass(lists, mail, in_flight)
        sent = counting.sent - before
        print(f"{label}: {sent / len(mail):.2f} queries sent a message, "
              f"CPU {cpu / len(mail) * 1000:.3f} ms a message ({in_flight} in flight)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", type=Path, default=ROOT / ".cache" / "corpora")
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--in-flight", type=int, default=50)
    ap.add_argument("--port", type=int, default=53531)
    args = ap.parse_args()
    files = corpus_mail(args.corpora, args.every)
    if not files:
        sys.exit(f"no corpus mail under {args.corpora} (make corpora)")
    base = int(ipaddress.IPv4Address("198.18.0.1"))
    mail = [
        (extract(path.read_bytes()).summary,
         Envelope(client_addr=str(ipaddress.IPv4Address(base + i % args.clients)), source="REMOTE"))
        for i, path in enumerate(files)
    ]
    responder = subprocess.Popen([sys.executable, str(ROOT / "bench" / "postfix.py"), "--dns-server",
                                  str(args.port)], stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.5)  # the responder imports dnspython before it binds
        asyncio.run(measure(args.port, mail, args.in_flight))
    finally:
        responder.kill()
        responder.wait()


if __name__ == "__main__":
    main()
