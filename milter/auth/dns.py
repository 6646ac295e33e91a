"""DNS lookups for DKIM keys, DMARC and SPF records, behind a small async interface.

DKIM and DMARC need only "give me the TXT strings at this name" (the `TxtResolver` protocol); SPF also
asks for A, AAAA and MX records (the `Resolver` protocol adds `query(name, rdtype)`, whose answers are
strings too: an address's text, or "PREFERENCE HOST" for MX). Putting that behind a protocol lets the
gateway use a real resolver (`DnsResolver`, a stub resolver on dnspython's query layer), wrap it in a cache
(`milter.auth.cache.CachingResolver`), and lets tests and offline scans use `StaticResolver`. Lookups
never raise: every outcome is a `TxtAnswer` with one of three statuses, because the callers must tell
"the domain publishes nothing" (a permanent, policy-relevant fact) from "we could not find out" (a
transient failure that must not lead to rejecting mail).

`Answers` is the frozen, picklable bundle of answers for one message; it crosses into the worker
process where the CPU-bound verification runs, so it holds plain strings only.
"""

from __future__ import annotations

import asyncio
import math
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

import dns.asyncquery
import dns.entropy
import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

TxtStatus = Literal["found", "none", "temperror"]
RECORD_TYPES = frozenset({"TXT", "A", "AAAA", "MX"})

# EDNS0 with the payload size the DNS flag day 2020 recommends: 2048-bit DKIM keys do not fit the
# classic 512-byte UDP limit, and without EDNS every such lookup would need a TCP retry.
_EDNS_PAYLOAD = 1232


def normalise_name(name: str) -> str:
    """The form names are compared in: lower case, no trailing dot, no surrounding blanks."""
    return name.strip().rstrip(".").lower()


@dataclass(frozen=True)
class TxtAnswer:
    """The outcome of one lookup (TXT, or A/AAAA/MX through `Resolver.query`: the name is historical).

    status: "found" (records holds each record: a TXT record's character-strings joined, an address, an
    MX's "PREFERENCE HOST"), "none" (NXDOMAIN or no data of the type: the name publishes nothing) or
    "temperror" (timeout, SERVFAIL, any other failure).
    ttl: seconds the answer may be cached (0 when unknown; the cache then applies its own rule).
    """

    status: TxtStatus
    records: tuple[str, ...] = ()
    ttl: float = 0.0
    reason: str = ""

    @classmethod
    def found(cls, records: Sequence[str], ttl: float = 0.0) -> TxtAnswer:
        return cls("found", tuple(records), ttl)

    @classmethod
    def none(cls, reason: str = "", ttl: float = 0.0) -> TxtAnswer:
        return cls("none", (), ttl, reason)

    @classmethod
    def temperror(cls, reason: str = "") -> TxtAnswer:
        return cls("temperror", (), 0.0, reason)


#: The longest deadline a caller may ask of `lookup_all` (a typo of 1e9 seconds must not hold a message).
MAX_DEADLINE = 3600.0


def deadline_seconds(timeout: float) -> float:
    """`timeout` as a usable deadline: 0 for anything not a positive number, at most MAX_DEADLINE."""
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(value) or value <= 0 else min(value, MAX_DEADLINE)


# ASYNC109: one deadline over the whole fan-out, expiry giving temperror answers instead of raising,
# which a caller's asyncio.timeout cannot do.
async def lookup_all(
    lookups: Mapping[str, Callable[[], Awaitable[TxtAnswer]]], timeout: float  # noqa: ASYNC109
) -> dict[str, TxtAnswer]:
    """Run every lookup concurrently, all within `timeout` seconds; every key gets an answer. Lookups
    still running at the deadline are cancelled and answer temperror, as do lookups that raise or return
    something that is not a TxtAnswer. Cancelling this call propagates (after cancelling its lookups)."""
    tasks = {key: asyncio.ensure_future(call()) for key, call in lookups.items()}
    if not tasks:
        return {}
    try:
        await asyncio.wait(tasks.values(), timeout=deadline_seconds(timeout))
    finally:
        for task in tasks.values():
            if not task.done():
                task.cancel()
    return {key: _settled(task) for key, task in tasks.items()}


def _settled(task: asyncio.Future[TxtAnswer]) -> TxtAnswer:
    if not task.done():
        return TxtAnswer.temperror("timeout")
    if task.cancelled():
        return TxtAnswer.temperror("cancelled")
    if (error := task.exception()) is not None:
        return TxtAnswer.temperror(f"resolver error: {type(error).__name__}")
    answer = task.result()
    return answer if isinstance(answer, TxtAnswer) else TxtAnswer.temperror("resolver returned junk")


class TxtResolver(Protocol):
    async def txt(self, name: str) -> TxtAnswer:
        """The TXT records at `name`; must not raise for DNS failures (return a temperror instead)."""
        ...


class Resolver(TxtResolver, Protocol):
    async def query(self, name: str, rdtype: str) -> TxtAnswer:
        """The `rdtype` records ("TXT", "A", "AAAA" or "MX") at `name` as strings: TXT as for `txt`, A and
        AAAA the address text, MX "PREFERENCE HOST" (host lower case, no trailing dot; "." for a null MX).
        Must not raise; an unsupported type answers temperror. `txt(name)` equals `query(name, "TXT")`."""
        ...


def record_type(rdtype: str) -> str | None:
    """`rdtype` in the form `query` compares it (upper case), or None if it is not one we support."""
    kind = str(rdtype).strip().upper()
    return kind if kind in RECORD_TYPES else None


class TypedLookups:
    """`txt` and the record-type check, once for every resolver here; subclasses answer `_query` with
    a type `record_type` accepted."""

    async def txt(self, name: str) -> TxtAnswer:
        return await self.query(name, "TXT")

    async def query(self, name: str, rdtype: str) -> TxtAnswer:
        kind = record_type(rdtype)
        if kind is None:
            return TxtAnswer.temperror(f"unsupported record type {rdtype!r}")
        return await self._query(name, kind)

    async def _query(self, name: str, kind: str) -> TxtAnswer:
        raise NotImplementedError


@dataclass(frozen=True)
class Answers(Mapping[str, TxtAnswer]):
    """Frozen, picklable name -> TxtAnswer mapping for one message (a handful of entries).

    Keys are normalised, and lookups normalise too, so "Sel._DomainKey.Example.COM." finds the entry.
    """

    entries: tuple[tuple[str, TxtAnswer], ...] = ()

    @classmethod
    def of(cls, answers: Mapping[str, TxtAnswer]) -> Answers:
        merged = {normalise_name(name): answer for name, answer in answers.items()}
        return cls(tuple(merged.items()))

    def __getitem__(self, name: str) -> TxtAnswer:
        key = normalise_name(name)
        for entry_name, answer in self.entries:
            if entry_name == key:
                return answer
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class NoResolver(TypedLookups):
    """Every lookup a temperror: what a host without a usable resolver gets, so that mail still flows
    (with results no rule acts on) instead of the gateway refusing to start."""

    def __init__(self, why: str) -> None:
        self.why = why

    async def _query(self, name: str, kind: str) -> TxtAnswer:
        return TxtAnswer.temperror(self.why)


class StaticResolver(TypedLookups):
    """Answers from a fixed mapping: tests, and offline scans where no DNS should be touched.

    Keys are a name ("example.com": its TXT records) or a name and a type ("example.com/A",
    "example.com/AAAA", "example.com/MX"; "example.com/TXT" is the same as the plain name). Values are
    one record string, a sequence of them (empty: "none"), or a ready TxtAnswer (to simulate a
    temperror, say). Names and types missing from the mapping answer "none", as NXDOMAIN would.
    """

    def __init__(self, records: Mapping[str, str | Sequence[str] | TxtAnswer] | None = None) -> None:
        self._answers: dict[tuple[str, str], TxtAnswer] = {
            _static_key(key): _as_answer(value) for key, value in (records or {}).items()
        }

    async def _query(self, name: str, kind: str) -> TxtAnswer:
        return self._answers.get((normalise_name(name), kind), TxtAnswer.none("nxdomain"))


def _static_key(key: str) -> tuple[str, str]:
    name, slash, suffix = key.rpartition("/")
    kind = record_type(suffix) if slash else None
    return (normalise_name(name), kind) if kind is not None else (normalise_name(key), "TXT")


def _as_answer(value: str | Sequence[str] | TxtAnswer) -> TxtAnswer:
    if isinstance(value, TxtAnswer):
        return value
    if isinstance(value, str):
        return TxtAnswer.found((value,), ttl=300.0)
    records = tuple(value)
    return TxtAnswer.found(records, ttl=300.0) if records else TxtAnswer.none("no data")


#: Response codes that end a lookup; any other makes the lookup ask the next server.
_FINAL = frozenset({dns.rcode.NOERROR, dns.rcode.NXDOMAIN})


class DnsResolver(TypedLookups):
    """A stub resolver for TXT, A, AAAA and MX lookups that never raise, on dnspython's names and
    message parser (`Question` packs the query, `_udp` sends it; TCP is dnspython's query layer).

    With `nameservers=None` it reads the system configuration (/etc/resolv.conf; dnspython raises
    NoResolverConfiguration here if there is none, which is a deployment error worth surfacing at
    start-up). Tests pass explicit loopback `nameservers` and `port`; a (address, port) entry carries
    its own port (configuration's "IP:PORT"). `lifetime` bounds each lookup, retries included.

    Why not dnspython's `asyncresolver.Resolver`, which this used until 2026-12-04: its resolution
    machinery (per-lookup state objects, `Answer`, the chaining pass) cost 0.28-0.33 ms of CPU per
    lookup, 0.21 ms through the same library's `dns.asyncquery` (3,000 TXT lookups on loopback, 50 in
    flight), and lookups were a fifth of the gateway workers' Python time in bench/postfix.py. This
    does what the resolver did, in its order: each try asks every server in turn, a fresh socket and
    source port per query, answers from other addresses or with other ids ignored, a truncated answer
    asked again over TCP; SERVFAIL or REFUSED drops that server for the lookup; NXDOMAIN and NODATA
    are final. Since 2026-12-05 the query is packed by `Question` and sent by `_udp` (the same
    behaviour; 0.12-0.14 ms a lookup, and DNS 24 -> 10 % of the workers' samples under bench/postfix.py).
    Why not c-ares (aiodns, 0.07 ms): docs/milter.md, "Where the milter path's CPU goes".
    """

    def __init__(
        self,
        nameservers: Sequence[str | tuple[str, int]] | None = None,
        port: int = 53,
        lifetime: float = 2.0,
    ) -> None:
        if nameservers is None:
            system = dns.resolver.Resolver()
            nameservers = [(str(ns), system.port) for ns in system.nameservers]
        self._servers: tuple[tuple[str, int], ...] = tuple(
            (ns[0], ns[1]) if isinstance(ns, tuple) else (ns, port) for ns in nameservers
        )
        if not self._servers:
            raise ValueError("no nameservers to ask")
        self._lifetime = lifetime
        # A UDP query lost on the way is only retried once the try times out; with one try per
        # lifetime a single lost packet cost the message the whole deadline. Tries of a quarter of it
        # leave room for three retries and still wait long enough for a recursive resolver that is
        # slow on a name it has not cached. Measured through this machine's resolver, 482 names with
        # 20 in flight: 126 timed out with one try, 11 with four.
        self._try_timeout = max(0.05, lifetime / 4)

    async def _query(self, name: str, kind: str) -> TxtAnswer:
        if not normalise_name(name):
            return TxtAnswer.none("bad name: empty")
        try:
            request = Question.of(normalise_name(name), kind)
        except (dns.exception.DNSException, ValueError) as e:
            return TxtAnswer.none(f"bad name: {type(e).__name__}")
        response = await self._exchange(request)
        if isinstance(response, TxtAnswer):
            return response
        if response.rcode() == dns.rcode.NXDOMAIN:
            return TxtAnswer.none("nxdomain")
        try:
            chain = response.resolve_chaining()
        except dns.exception.DNSException as e:  # a CNAME loop, a chain too long, a name mismatch
            return TxtAnswer.temperror(f"bad answer: {type(e).__name__}")
        if chain.answer is None:
            return TxtAnswer.none("no data")
        try:
            records = tuple(_as_text(kind, rdata) for rdata in chain.answer)
        except (AttributeError, TypeError, ValueError) as e:  # an rdata not of the type asked for
            return TxtAnswer.temperror(f"bad answer: {type(e).__name__}")
        return TxtAnswer.found(records, float(chain.answer.ttl)) if records else TxtAnswer.none("no data")

    async def _exchange(self, request: Question) -> dns.message.QueryMessage | TxtAnswer:
        """The first NOERROR or NXDOMAIN response to `request` within the lifetime, or the temperror."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lifetime
        servers = list(self._servers)
        failure = "timeout"
        while servers:
            for server in list(servers):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return TxtAnswer.temperror("timeout")
                try:
                    response = await self._ask(request, server, min(self._try_timeout, remaining))
                except dns.exception.Timeout:
                    continue
                except (dns.exception.DNSException, OSError, ValueError, EOFError) as e:
                    failure = type(e).__name__
                    servers.remove(server)
                    continue
                if isinstance(response, dns.message.QueryMessage) and response.rcode() in _FINAL:
                    return response
                failure = "servfail"  # SERVFAIL, REFUSED and the rest: this server cannot answer
                servers.remove(server)
        return TxtAnswer.temperror(failure)

    @staticmethod
    async def _ask(
        request: Question,
        server: tuple[str, int],
        timeout: float,  # noqa: ASYNC109 (a per-try timeout, within the lookup's deadline)
    ) -> dns.message.Message:
        address, port = server
        try:
            return await _udp(request, (address, port), timeout)
        except dns.message.Truncated:
            return await dns.asyncquery.tcp(request.message(), address, timeout=timeout, port=port)


# The header and OPT record of every query we send: RD set, one question, EDNS0 version 0 with our
# payload size and no options (RFC 1035 4.1.1, RFC 6891 6.1.2).
_FLAGS_RD = int(dns.flags.RD)
_OPT = struct.pack("!BHHIH", 0, int(dns.rdatatype.OPT), _EDNS_PAYLOAD, 0, 0)
_IN = int(dns.rdataclass.IN)
#: Answers that may come back without the question (dnspython's `Message.is_response` allows it too).
_QUESTIONLESS = frozenset({dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED})


@dataclass(frozen=True)
class Question:
    """One query, its wire form packed once: what a lookup sends, and what an answer must match.

    Why not `dns.message.make_query(...).to_wire()`: dnspython builds a query as a message object (an
    rrset for the question, EDNS option objects) and renders it through its general renderer: 45 % of
    the CPU of a lookup on loopback. The query is always the same shape, so its header, question and
    OPT record are packed here; the name is still dnspython's (`dns.name.from_text`: IDNA, label and
    length checks), answers are still parsed by `dns.message.from_wire`, and the rare TCP retry sends
    dnspython's own message (`message`), with the same id.
    """

    id: int
    qname: dns.name.Name
    rdtype: dns.rdatatype.RdataType
    wire: bytes

    @classmethod
    def of(cls, name: str, kind: str) -> Question:
        qname = dns.name.from_text(name)
        rdtype = dns.rdatatype.from_text(kind)
        qid = dns.entropy.random_16()
        header = struct.pack("!6H", qid, _FLAGS_RD, 1, 0, 0, 1)
        labels = cast(bytes, qname.to_wire())  # bytes when no file is given
        return cls(qid, qname, rdtype, header + labels + struct.pack("!HH", rdtype, _IN) + _OPT)

    def answered_by(self, response: dns.message.Message) -> bool:
        """`response` answers this query: a response (QR), our id, a standard query, and our question
        (a name compared as DNS compares names, without case), or none where the server refuses."""
        if not response.flags & dns.flags.QR or response.id != self.id:
            return False
        if dns.opcode.from_flags(response.flags) != dns.opcode.QUERY:
            return False
        if not response.question:
            return response.rcode() in _QUESTIONLESS
        return len(response.question) == 1 and (
            (q := response.question[0]).name == self.qname and q.rdtype == self.rdtype and q.rdclass == _IN
        )

    def message(self) -> dns.message.QueryMessage:
        """The same query as a dnspython message (for dnspython's TCP exchange)."""
        query = dns.message.make_query(self.qname, self.rdtype, use_edns=0, payload=_EDNS_PAYLOAD)
        query.id = self.id
        return query


async def _udp(request: Question, server: tuple[str, int], timeout: float) -> dns.message.Message:  # noqa: ASYNC109
    """`request` over UDP from a fresh socket (a new random source port per query), its answer read by
    the event loop when it arrives; datagrams that are not an answer to it (another id, another
    question, unparsable) are ignored, as dnspython's `udp(ignore_unexpected=True, ignore_errors=True)`
    did. The socket is connected, so the kernel drops datagrams from any other address or port.

    Why not `dns.asyncquery.udp`, which this used until 2026-12-05: its socket layer (a datagram
    transport and protocol per query, a receive loop over its own backend) was most of the rest of a
    lookup's CPU: 0.25-0.31 ms a lookup with it, 0.12-0.14 ms with this and `Question` (bench/lookups.py).
    Raises dns.exception.Timeout, OSError (an unreachable server: ICMP), or dns.message.Truncated for an
    answer with TC set."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(dns.inet.af_for_address(server[0]), socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect(server)
        sock.send(request.wire)
        answer: asyncio.Future[dns.message.Message] = loop.create_future()
        loop.add_reader(sock.fileno(), _read_answer, sock, request, answer)
        try:
            async with asyncio.timeout(timeout):
                return await answer
        except TimeoutError:
            raise dns.exception.Timeout(timeout=timeout) from None  # type: ignore[no-untyped-call]
        finally:
            loop.remove_reader(sock.fileno())
    finally:
        sock.close()


def _read_answer(sock: socket.socket, request: Question, answer: asyncio.Future[dns.message.Message]) -> None:
    """Every datagram waiting on `sock`; the first that answers `request` (or says it was truncated)
    settles `answer`."""
    while not answer.done():
        try:
            data = sock.recv(65535)
        except BlockingIOError:
            return
        except OSError as e:  # ICMP port unreachable, reported on a connected socket
            answer.set_exception(e)
            return
        try:
            response = dns.message.from_wire(data, raise_on_truncation=True)
        except dns.message.Truncated as e:
            if request.answered_by(e.message()):  # type: ignore[no-untyped-call]
                answer.set_exception(e)
            continue
        except Exception:
            continue
        if request.answered_by(response):
            answer.set_result(response)


def _as_text(kind: str, rdata: Any) -> str:
    if kind == "TXT":
        return b"".join(rdata.strings).decode("utf-8", "replace")
    if kind == "MX":
        return f"{int(rdata.preference)} {rdata.exchange.to_text(omit_final_dot=True).lower()}"
    return str(rdata.address)
