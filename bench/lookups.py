#!/usr/bin/env python3
"""CPU per DNS lookup of the gateway's resolver (milter.auth.DnsResolver) against dnspython's own
asyncio resolver (what DnsResolver used until 2026-12-04), on loopback.

A responder in its own process (bench/gateway.py's: NXDOMAIN for every name, at once) answers; each
resolver looks up --names distinct TXT names, --in-flight at a time, in one event loop, and the
loop's process CPU (`time.process_time`) per lookup is printed, alternating the two --runs times.
Nothing leaves the host.

Usage: .venv/bin/python bench/lookups.py [--names 3000] [--in-flight 50] [--runs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from milter.auth import DnsResolver

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def gateway_resolver(port: int, names: list[str], in_flight: int) -> None:
    resolver = DnsResolver(nameservers=["127.0.0.1"], port=port)
    await bounded(names, in_flight, resolver.txt)


async def dnspython_resolver(port: int, names: list[str], in_flight: int) -> None:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port)]
    resolver.lifetime, resolver.timeout = 2.0, 0.5
    resolver.use_edns(0, 0, 1232)  # as the gateway asks (milter.auth.dns._EDNS_PAYLOAD)

    async def one(name: str) -> None:
        with contextlib.suppress(dns.exception.DNSException):  # NXDOMAIN: every name's outcome here
            await resolver.resolve(name, "TXT", search=False)

    await bounded(names, in_flight, one)


async def bounded(names: list[str], in_flight: int, lookup: Callable[[str], Awaitable[object]]) -> None:
    gate = asyncio.Semaphore(in_flight)

    async def one(name: str) -> None:
        async with gate:
            await lookup(name)

    await asyncio.gather(*(one(n) for n in names))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--names", type=int, default=3000)
    parser.add_argument("--in-flight", type=int, default=50)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    port = free_port()
    responder = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "postfix.py"), "--dns-server", str(port)]
    )
    try:
        time.sleep(1.5)  # the responder imports dnspython before it binds
        names = [f"_dmarc.host{i}.example{i % 97}.com" for i in range(args.names)]
        rows: dict[str, list[float]] = {"DnsResolver (gateway)": [], "dnspython asyncresolver": []}
        for _ in range(args.runs):
            for label, fn in zip(rows, (gateway_resolver, dnspython_resolver), strict=True):
                start = time.process_time()
                asyncio.run(fn(port, names, args.in_flight))
                rows[label].append((time.process_time() - start) / len(names) * 1000)
        for label, figures in rows.items():
            shown = ", ".join(f"{f:.3f}" for f in figures)
            print(f"{label:24} CPU per lookup: {shown} ms ({args.names} names, {args.in_flight} in flight)")
    finally:
        responder.kill()
        responder.wait()


if __name__ == "__main__":
    main()
