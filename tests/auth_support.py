"""Shared by the authentication tests: a DNS server on loopback, an RSA key, dkimpy signing and ARC
sealing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

SELECTOR = "sel2024"
SIGNED = ["from", "to", "subject", "date", "message-id"]


@dataclass
class FakeDns(asyncio.DatagramProtocol):
    """TXT records by name; names in `servfail` answer SERVFAIL, in `silent` never answer; everything
    else is NXDOMAIN, except `empty` names, which exist without TXT data. `delay` postpones replies.

    `typed` holds other records by (name, type), type "A", "AAAA" or "MX", in presentation form
    ("192.0.2.1", "10 mx.example.com"; names are absolute). A name with records of some type (TXT
    included) or in `empty` answers the other types with no data. `queries` lists the names asked for,
    `types` the query type of each, in the same order."""

    records: dict[str, list[str]] = field(default_factory=dict)
    typed: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    ttl: int = 600
    servfail: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    empty: set[str] = field(default_factory=set)
    delay: float = 0.0
    drop_first: int = 0  # ignore this many packets first (a lossy network or a rate-limiting resolver)
    queries: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        name = query.question[0].name.to_text(omit_final_dot=True).lower()
        self.queries.append(name)
        self.types.append(dns.rdatatype.to_text(query.question[0].rdtype))
        if name in self.silent or len(self.queries) <= self.drop_first:
            return
        reply = self._reply(query, name).to_wire()
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, self.transport.sendto, reply, addr)
        else:
            self.transport.sendto(reply, addr)

    def _reply(self, query: dns.message.Message, name: str) -> dns.message.Message:
        rdtype = dns.rdatatype.to_text(query.question[0].rdtype)
        if rdtype != "TXT":
            return self._typed_reply(query, name, rdtype)
        response = dns.message.make_response(query)
        if name in self.records:
            rrset = dns.rrset.from_text_list(
                query.question[0].name, self.ttl, "IN", "TXT", self.records[name]
            )
            response.answer.append(rrset)
        elif name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.empty:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    def _typed_reply(self, query: dns.message.Message, name: str, rdtype: str) -> dns.message.Message:
        response = dns.message.make_response(query)
        if (name, rdtype) in self.typed:
            rrset = dns.rrset.from_text_list(
                query.question[0].name, self.ttl, "IN", rdtype, self.typed[name, rdtype],
                origin=dns.name.root, relativize=False,
            )
            response.answer.append(rrset)
        elif name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.empty and name not in self.records and all(n != name for n, _ in self.typed):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    def count(self, name: str, rdtype: str | None = None) -> int:
        """Queries for `name` (of type `rdtype` only, if given)."""
        return sum(
            1 for n, t in zip(self.queries, self.types, strict=True) if n == name and rdtype in (None, t)
        )


def with_server(server: FakeDns, body: Callable[[int], Awaitable[None]]) -> None:
    """Run `body(port)` in a fresh event loop while `server` listens on a free loopback port."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
        try:
            await body(transport.get_extra_info("sockname")[1])
        finally:
            transport.close()

    asyncio.run(main())


def generate_key(directory: Path, bits: int = 1024) -> tuple[bytes, str]:
    """(PKCS#1 PEM private key, DKIM key record) for a fresh RSA key (dkim.sign needs PKCS#1, which
    OpenSSL 3 writes only with -traditional)."""
    pem_path = directory / f"key{bits}.pem"
    genrsa = ["openssl", "genrsa", "-traditional", "-out", str(pem_path), str(bits)]
    subprocess.run(genrsa, check=True, capture_output=True)
    der = subprocess.run(
        ["openssl", "rsa", "-in", str(pem_path), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return pem_path.read_bytes(), f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def sign(raw: bytes, pem: bytes, domain: str = "mail.example.com", selector: str = SELECTOR) -> bytes:
    header = dkim.sign(
        raw, selector.encode(), domain.encode(), pem, include_headers=[h.encode() for h in SIGNED]
    )
    return bytes(header) + raw


def arc_seal(raw: bytes, pem: bytes, domain: str, selector: str, saw: str) -> bytes:
    """What a forwarder does (RFC 8617): record what it verified in an Authentication-Results header of
    its own (authserv-id `domain`, results `saw`), then ARC-seal with dkimpy as `domain`/`selector`."""
    received = f"Authentication-Results: {domain}; {saw}\r\n".encode() + raw
    arc_set = dkim.arc_sign(received, selector.encode(), domain.encode(), pem, domain.encode())
    assert arc_set, "dkimpy declined to seal"
    return b"".join(arc_set) + received


@contextlib.contextmanager
def dns_in_thread(server: FakeDns) -> Iterator[int]:
    """Serve `server` on a loopback port from a thread of its own (for code that runs its own event
    loop, such as the CLI); yields the port."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    ports: list[int] = []

    async def start() -> None:
        transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
        ports.append(transport.get_extra_info("sockname")[1])
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    started.wait(10)
    try:
        yield ports[0]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if server.transport is not None:
            server.transport.close()
        loop.close()
