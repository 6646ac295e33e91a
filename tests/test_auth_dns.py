"""milter.auth.dns / cache / fetch over real loopback UDP sockets.

A tiny DNS server (dnspython for the wire format, an asyncio DatagramProtocol for the socket) runs in
each test's event loop on 127.0.0.1 and a random free port; it counts the packets it receives, so the
cache and coalescing tests can prove that a second query never left the process.
"""

from __future__ import annotations

import asyncio
import pickle
import time
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from auth_support import FakeDns, with_server

from milter.auth import (
    Answers,
    AuthPlan,
    CachingResolver,
    DnsResolver,
    SignatureRef,
    StaticResolver,
    TxtAnswer,
    fetch,
)
from milter.auth.dns import _EDNS_PAYLOAD, Question

MARGIN = 0.5  # seconds of scheduling slack allowed on top of a deadline


def resolver(port: int, lifetime: float = 2.0) -> DnsResolver:
    return DnsResolver(nameservers=["127.0.0.1"], port=port, lifetime=lifetime)


def test_found_joins_character_strings_and_keeps_ttl() -> None:
    server = FakeDns(records={"sel._domainkey.example.com": ['"v=DKIM1; k=rsa; " "p=ABCD"', '"second"']})

    async def body(port: int) -> None:
        answer = await resolver(port).txt("Sel._DomainKey.Example.COM.")
        assert answer.status == "found"
        assert sorted(answer.records) == ["second", "v=DKIM1; k=rsa; p=ABCD"]
        assert answer.ttl == 600

    with_server(server, body)
    assert server.queries == ["sel._domainkey.example.com"]


def test_nxdomain_and_no_data_are_none_servfail_is_temperror() -> None:
    server = FakeDns(servfail={"broken.example"}, empty={"exists.example"})

    async def body(port: int) -> None:
        r = resolver(port)
        assert (await r.txt("missing.example")).status == "none"
        assert (await r.txt("exists.example")).status == "none"
        failed = await r.txt("broken.example")
        assert failed.status == "temperror"
        assert failed.reason == "servfail"

    with_server(server, body)


def test_bad_name_is_none_without_a_packet() -> None:
    server = FakeDns()

    async def body(port: int) -> None:
        for bad in ("a.." + "x" * 70 + ".example", "", " . "):
            answer = await resolver(port).txt(bad)
            assert answer.status == "none"
            assert answer.reason.startswith("bad name")

    with_server(server, body)
    assert server.queries == []


def test_silent_server_is_temperror_within_the_lifetime() -> None:
    server = FakeDns(silent={"slow.example"})

    async def body(port: int) -> None:
        start = time.monotonic()
        answer = await resolver(port, lifetime=0.3).txt("slow.example")
        elapsed = time.monotonic() - start
        assert answer.status == "temperror"
        assert answer.reason == "timeout"
        assert elapsed < 0.3 + MARGIN

    with_server(server, body)
    assert server.count("slow.example") >= 1


def plan_for(*names: str) -> AuthPlan:
    """A plan whose names are exactly `names` (as DKIM key names: selector._domainkey.domain)."""
    refs = []
    for i, name in enumerate(names):
        selector, _, domain = name.partition("._domainkey.")
        refs.append(SignatureRef(i, domain, selector))
    return AuthPlan(None, None, tuple(refs))


def test_fetch_one_deadline_for_all_names_over_sockets() -> None:
    fast, slow = "a._domainkey.fast.example", "b._domainkey.slow.example"
    server = FakeDns(records={fast: ['"v=DKIM1; p=QUJD"']}, silent={slow})

    async def body(port: int) -> None:
        start = time.monotonic()
        answers = await fetch(plan_for(fast, slow), resolver(port, lifetime=30.0), timeout=0.4)
        elapsed = time.monotonic() - start
        assert elapsed < 0.4 + MARGIN
        assert answers[fast] == TxtAnswer.found(["v=DKIM1; p=QUJD"], ttl=600.0)
        assert answers[slow].status == "temperror"

    with_server(server, body)


def test_cache_answers_repeat_without_a_packet_until_ttl_expires() -> None:
    name = "sel._domainkey.example.com"
    server = FakeDns(records={name: ['"v=DKIM1; p=QUJD"']}, ttl=60)
    now = [1000.0]

    async def body(port: int) -> None:
        cache = CachingResolver(resolver(port), clock=lambda: now[0])
        first = await cache.txt(name)
        second = await cache.txt(name.upper() + ".")
        assert first == second
        assert first.status == "found"
        assert server.count(name) == 1
        now[0] += 61  # past the record's TTL
        assert (await cache.txt(name)).status == "found"
        assert server.count(name) == 2

    with_server(server, body)


def test_cache_caps_ttl_and_keeps_none_longer_than_temperror() -> None:
    server = FakeDns(records={"long.example": ['"x"']}, ttl=86400, servfail={"bad.example"})
    now = [0.0]

    async def body(port: int) -> None:
        cache = CachingResolver(
            resolver(port), negative_ttl=30, max_ttl=100, temperror_ttl=5, clock=lambda: now[0]
        )
        for _ in range(2):
            assert (await cache.txt("long.example")).status == "found"
            assert (await cache.txt("nx.example")).status == "none"
            assert (await cache.txt("bad.example")).status == "temperror"
        assert [server.count(n) for n in ("long.example", "nx.example", "bad.example")] == [1, 1, 1]
        now[0] = 6  # past temperror_ttl: a failing server is asked again, the others are not
        await cache.txt("bad.example")
        await cache.txt("nx.example")
        assert [server.count(n) for n in ("nx.example", "bad.example")] == [1, 2]
        now[0] = 50  # past negative_ttl, within the capped TTL
        await cache.txt("long.example")
        await cache.txt("nx.example")
        assert [server.count(n) for n in ("long.example", "nx.example")] == [1, 2]
        now[0] = 101  # past max_ttl although the record said a day
        await cache.txt("long.example")
        assert server.count("long.example") == 2
        uncached = CachingResolver(resolver(port), temperror_ttl=0)
        await uncached.txt("bad.example")
        await uncached.txt("bad.example")
        assert server.count("bad.example") == 4

    with_server(server, body)


def test_one_lost_packet_is_retried_within_the_deadline() -> None:
    server = FakeDns(records={"flaky.example": ['"v=DMARC1; p=none"']}, drop_first=1)

    async def body(port: int) -> None:
        answer = await resolver(port, lifetime=2.0).txt("flaky.example")
        assert answer.status == "found"
        assert server.count("flaky.example") == 2  # the first packet was dropped, a retry answered

    with_server(server, body)


def test_cache_coalesces_concurrent_lookups_into_one_query() -> None:
    name = "sel._domainkey.example.com"
    server = FakeDns(records={name: ['"v=DKIM1; p=QUJD"']}, delay=0.2)

    async def body(port: int) -> None:
        cache = CachingResolver(resolver(port))
        answers = await asyncio.gather(*(cache.txt(name) for _ in range(8)))
        assert {a.status for a in answers} == {"found"}
        assert server.count(name) == 1

    with_server(server, body)


def test_cache_waiter_timing_out_does_not_cancel_the_shared_query() -> None:
    name = "slowish.example"
    server = FakeDns(records={name: ['"v=spf1 -all"']}, delay=0.3)

    async def body(port: int) -> None:
        cache = CachingResolver(resolver(port))
        impatient = await fetch(plan_for(f"s._domainkey.{name}"), cache, timeout=0.05)
        assert impatient[f"s._domainkey.{name}"].status == "temperror"
        patient = await asyncio.gather(cache.txt(name), cache.txt(name))
        assert [a.status for a in patient] == ["found", "found"]
        assert server.count(name) == 1

    with_server(server, body)


def test_cache_is_bounded_and_drops_the_oldest() -> None:
    server = FakeDns(records={n: ['"x"'] for n in ("a.example", "b.example", "c.example")})

    async def body(port: int) -> None:
        cache = CachingResolver(resolver(port), max_entries=2)
        for n in ("a.example", "b.example", "c.example", "c.example", "b.example", "a.example"):
            await cache.txt(n)
        assert len(cache) == 2
        assert [server.count(n) for n in ("a.example", "b.example", "c.example")] == [2, 1, 1]

    with_server(server, body)


def test_cache_does_not_keep_answers_too_big_to_be_a_record_the_checks_need() -> None:
    """The cache is bounded in entries and the sender picks the names: 2,000 answers of 59 KiB each
    held 116 MiB. An answer over MAX_CACHED_CHARS is used, not kept; an ordinary one is kept."""
    from milter.auth.cache import MAX_CACHED_CHARS

    asked: list[str] = []

    class Inner:
        async def txt(self, name: str) -> TxtAnswer:
            asked.append(name)
            size = MAX_CACHED_CHARS + 1 if name == "big.example" else 12
            return TxtAnswer.found(["y" * size], ttl=600.0)

    async def main() -> None:
        cache = CachingResolver(Inner())
        for _ in range(2):
            assert len((await cache.txt("big.example")).records[0]) > MAX_CACHED_CHARS
            assert (await cache.txt("small.example")).status == "found"
        assert (asked.count("big.example"), asked.count("small.example"), len(cache)) == (2, 1, 1)

    asyncio.run(main())


class Misbehaving:
    """A resolver breaking the contract in every way fetch must survive."""

    async def txt(self, name: str) -> Any:
        behaviour = name.split(".")[2]  # s._domainkey.<behaviour>.x
        if behaviour == "raise":
            raise RuntimeError("boom")
        if behaviour == "cancel":
            raise asyncio.CancelledError
        if behaviour == "junk":
            return "not an answer"
        if behaviour == "hang":
            await asyncio.sleep(3600)
        return TxtAnswer.found(["ok"])


@pytest.mark.parametrize("timeout", [0.2, 0.0, -1.0, float("nan")])
def test_fetch_never_raises_and_answers_every_name(timeout: float) -> None:
    names = ("s._domainkey.raise.x", "s._domainkey.cancel.x", "s._domainkey.junk.x", "s._domainkey.hang.x")

    async def main() -> Answers:
        return await fetch(plan_for(*names, "s._domainkey.good.x"), Misbehaving(), timeout)

    start = time.monotonic()
    answers = asyncio.run(main())
    assert time.monotonic() - start < 0.2 + MARGIN
    assert set(answers) == {*names, "s._domainkey.good.x"}
    assert {answers[n].status for n in names} == {"temperror"}
    # an answer available at once (a cache hit, say) still counts when the budget is already spent
    assert answers["s._domainkey.good.x"].status == "found"


def test_answers_are_a_frozen_picklable_mapping() -> None:
    answers = Answers.of({"_DMARC.Example.COM.": TxtAnswer.found(["v=DMARC1; p=none"], 300)})
    assert answers["_dmarc.example.com"].records == ("v=DMARC1; p=none",)
    assert answers.get("_dmarc.EXAMPLE.com") is not None
    assert answers.get("other") is None
    assert list(answers) == ["_dmarc.example.com"]
    assert pickle.loads(pickle.dumps(answers)) == answers
    with pytest.raises(AttributeError):
        answers.entries = ()  # type: ignore[misc]


def test_static_resolver() -> None:
    static = StaticResolver(
        {"A.example.": "one", "b.example": ["x", "y"], "c.example": [], "d.example": TxtAnswer.temperror()}
    )

    async def main() -> list[TxtAnswer]:
        return [
            await static.txt(n) for n in ("a.example", "B.EXAMPLE", "c.example", "d.example", "e.example")
        ]

    a, b, c, d, e = asyncio.run(main())
    assert (a.status, a.records) == ("found", ("one",))
    assert b.records == ("x", "y")
    assert (c.status, d.status, e.status) == ("none", "temperror", "none")


def test_query_returns_addresses_and_mx_as_text() -> None:
    server = FakeDns(
        records={"example.com": ['"v=spf1 -all"']},
        typed={
            ("example.com", "A"): ["192.0.2.1", "192.0.2.2"],
            ("example.com", "AAAA"): ["2001:DB8::1"],
            ("example.com", "MX"): ["10 Mail.Example.COM.", "20 backup.example.net."],
            ("nullmx.example", "MX"): ["0 ."],
        },
    )

    async def body(port: int) -> None:
        r = resolver(port)
        a = await r.query("Example.COM.", "A")
        assert (a.status, sorted(a.records), a.ttl) == ("found", ["192.0.2.1", "192.0.2.2"], 600)
        assert (await r.query("example.com", "aaaa")).records == ("2001:db8::1",)
        mx = await r.query("example.com", "MX")
        assert sorted(mx.records) == ["10 mail.example.com", "20 backup.example.net"]
        assert (await r.query("nullmx.example", "MX")).records == ("0 .",)
        assert await r.query("example.com", "TXT") == await r.txt("example.com")
        no_data = await r.query("nullmx.example", "A")  # the name exists, without A records
        assert (no_data.status, no_data.reason) == ("none", "no data")
        assert (await r.query("missing.example", "A")).reason == "nxdomain"
        unsupported = await r.query("example.com", "PTR")
        assert unsupported.status == "temperror"

    with_server(server, body)
    assert server.count("example.com", "A") == 1
    assert server.count("example.com", "AAAA") == 1
    assert server.count("example.com", "MX") == 1
    assert server.count("example.com", "PTR") == 0  # refused before any packet


def test_query_servfail_is_temperror() -> None:
    server = FakeDns(servfail={"broken.example"})

    async def body(port: int) -> None:
        answer = await resolver(port).query("broken.example", "A")
        assert (answer.status, answer.reason) == ("temperror", "servfail")

    with_server(server, body)


def test_cache_keeps_and_coalesces_each_type_apart() -> None:
    name = "example.com"
    server = FakeDns(
        records={name: ['"v=spf1 a -all"']},
        typed={(name, "A"): ["192.0.2.1"], (name, "MX"): ["10 mx.example.com."]},
        delay=0.1,
    )
    now = [0.0]

    async def body(port: int) -> None:
        cache = CachingResolver(resolver(port), clock=lambda: now[0])
        answers = await asyncio.gather(
            *(cache.query(name, kind) for kind in ("A", "a", "MX", "TXT") for _ in range(3)), cache.txt(name)
        )
        assert [a.records for a in answers[:6]] == [("192.0.2.1",)] * 6
        assert [a.records for a in answers[6:9]] == [("10 mx.example.com",)] * 3
        assert {a.records for a in answers[9:]} == {("v=spf1 a -all",)}
        assert [server.count(name, t) for t in ("A", "MX", "TXT")] == [1, 1, 1]
        assert len(cache) == 3
        assert (await cache.query(name, "AAAA")).status == "none"
        await cache.query(name, "AAAA")  # a none answer is cached per type too
        assert server.count(name, "AAAA") == 1
        now[0] = 601  # past the TTL: every type is asked again
        await cache.query(name, "A")
        assert [server.count(name, t) for t in ("A", "MX", "TXT")] == [2, 1, 1]
        assert (await cache.query(name, "SRV")).status == "temperror"
        assert server.count(name, "SRV") == 0

    with_server(server, body)


def test_cache_over_a_txt_only_resolver() -> None:
    class TxtOnly:
        async def txt(self, name: str) -> TxtAnswer:
            return TxtAnswer.found([f"txt of {name}"], ttl=60)

    async def main() -> tuple[TxtAnswer, TxtAnswer]:
        cache = CachingResolver(TxtOnly())
        return await cache.query("x.example", "TXT"), await cache.query("x.example", "A")

    txt, a = asyncio.run(main())
    assert txt.records == ("txt of x.example",)
    assert a.status == "temperror"


def test_cache_gives_back_expired_entries_without_being_asked_again() -> None:
    """A burst of new names fills the cache; once their answers expire, the next sweep drops them
    (they used to stay until asked again or pushed out by newer ones: docs/soak.md)."""
    from milter.auth.cache import SWEEP_EVERY

    class Nothing:
        async def txt(self, name: str) -> TxtAnswer:
            return TxtAnswer.none("NXDOMAIN")

    now = [1000.0]

    async def main() -> None:
        cache = CachingResolver(Nothing(), negative_ttl=300, clock=lambda: now[0])
        for i in range(SWEEP_EVERY - 1):
            await cache.txt(f"burst{i}.example")
        assert len(cache) == SWEEP_EVERY - 1
        now[0] += 299
        await cache.txt("still-fresh.example")  # the sweep runs, but nothing has expired yet
        assert len(cache) == SWEEP_EVERY
        now[0] += 2
        for i in range(SWEEP_EVERY):
            await cache.txt(f"later{i}.example")
        # the second sweep (at the last of these stores) dropped the expired burst; the rest stays
        assert len(cache) == 1 + SWEEP_EVERY

    asyncio.run(main())


def test_static_resolver_typed_keys() -> None:
    static = StaticResolver(
        {
            "Example.COM.": "v=spf1 mx -all",
            "example.com/A": "192.0.2.1",
            "Example.com./aaaa": ["2001:db8::1", "2001:db8::2"],
            "example.com/MX": ["10 mx.example.com"],
            "other.example/TXT": "explicit txt",
            "odd/key.example": "a slash that names no type",
            "down.example/A": TxtAnswer.temperror("timeout"),
        }
    )

    async def main() -> list[TxtAnswer]:
        return [
            await static.txt("example.com"),
            await static.query("example.com", "TXT"),
            await static.query("EXAMPLE.com", "A"),
            await static.query("example.com", "AAAA"),
            await static.query("example.com", "mx"),
            await static.txt("other.example"),
            await static.txt("odd/key.example"),
            await static.query("down.example", "A"),
            await static.query("down.example", "TXT"),
            await static.query("example.com", "PTR"),
        ]

    txt, txt2, a, aaaa, mx, other, odd, down, down_txt, ptr = asyncio.run(main())
    assert txt == txt2
    assert txt.records == ("v=spf1 mx -all",)
    assert a.records == ("192.0.2.1",)
    assert aaaa.records == ("2001:db8::1", "2001:db8::2")
    assert mx.records == ("10 mx.example.com",)
    assert other.records == ("explicit txt",)
    assert odd.records == ("a slash that names no type",)
    assert (down.status, down_txt.status, ptr.status) == ("temperror", "none", "temperror")


def test_a_server_that_fails_is_dropped_and_the_next_one_answers() -> None:
    """SERVFAIL (or REFUSED) from one server: the lookup asks the next configured one, and does not ask
    the failing one again; NXDOMAIN from a server is final (no second opinion is sought)."""
    broken = FakeDns(servfail={"example.org", "missing.example", "slow.example"})
    good = FakeDns(records={"example.org": ['"v=spf1 -all"']}, silent={"slow.example"})

    async def listen(protocol: FakeDns) -> tuple[asyncio.DatagramTransport, int]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: protocol, local_addr=("127.0.0.1", 0))
        return transport, transport.get_extra_info("sockname")[1]

    async def main() -> None:
        ends = [await listen(broken), await listen(good)]
        ports = [port for _, port in ends]
        try:
            r = DnsResolver(nameservers=[("127.0.0.1", p) for p in ports], lifetime=2.0)
            answer = await r.txt("example.org")
            assert (answer.status, answer.records) == ("found", ("v=spf1 -all",))
            assert (broken.count("example.org"), good.count("example.org")) == (1, 1)
            assert (await r.txt("nothing.example")).reason == "nxdomain"
            assert (broken.count("nothing.example"), good.count("nothing.example")) == (1, 0)
            both_fail = DnsResolver(nameservers=[("127.0.0.1", ports[0])] * 2, lifetime=2.0)
            failed = await both_fail.txt("missing.example")
            assert (failed.status, failed.reason) == ("temperror", "servfail")
            # one server failed, the other never answered: the lifetime ran out, and that is the reason
            quick = DnsResolver(nameservers=[("127.0.0.1", p) for p in ports], lifetime=0.4)
            slow = await quick.txt("slow.example")
            assert (slow.status, slow.reason) == ("temperror", "timeout")
            assert broken.count("slow.example") == 1 and good.count("slow.example") >= 2
        finally:
            for t, _ in ends:
                t.close()

    asyncio.run(main())


def test_a_truncated_answer_is_asked_again_over_tcp() -> None:
    """A UDP answer with the TC bit (too big for the server's UDP limit) is asked again over TCP, and
    the full answer is what comes back."""
    name = "big._domainkey.example.com"
    key = '"v=DKIM1; k=rsa; p=' + "A" * 230 + '" "' + "B" * 230 + '"'
    tcp_queries: list[str] = []

    def full(query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text_list(query.question[0].name, 300, "IN", "TXT", [key]))
        return response

    class TruncatingUdp(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            response = dns.message.make_response(dns.message.from_wire(data))
            response.flags |= dns.flags.TC
            self.transport.sendto(response.to_wire(), addr)

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(2), "big")
        query = dns.message.from_wire(await reader.readexactly(size))
        tcp_queries.append(query.question[0].name.to_text(omit_final_dot=True))
        wire = full(query).to_wire()
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        writer.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(tcp, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        udp, _ = await loop.create_datagram_endpoint(TruncatingUdp, local_addr=("127.0.0.1", port))
        try:
            answer = await DnsResolver(nameservers=["127.0.0.1"], port=port).txt(name)
            assert answer.status == "found"
            assert answer.records == ("v=DKIM1; k=rsa; p=" + "A" * 230 + "B" * 230,)
            assert tcp_queries == [name]
        finally:
            udp.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_the_query_on_the_wire_is_the_one_dnspython_would_send() -> None:
    """`Question` packs the query by hand: dnspython reads it back as its own make_query's, for each
    record type we ask (id, RD, one question, EDNS0 with our payload size, nothing else)."""
    for kind in ("TXT", "A", "AAAA", "MX"):
        question = Question.of("sel._domainkey.example.com", kind)
        sent = dns.message.from_wire(question.wire)
        expected = dns.message.make_query(
            "sel._domainkey.example.com", kind, use_edns=0, payload=_EDNS_PAYLOAD
        )
        expected.id = question.id
        assert sent == expected
        assert sent.flags == expected.flags and sent.edns == 0 and sent.payload == _EDNS_PAYLOAD
        assert question.message() == expected and question.message().id == question.id
        assert question.answered_by(dns.message.make_response(expected))


def test_datagrams_that_do_not_answer_the_query_are_ignored() -> None:
    """A forger races the real server: answers with another id, another name or type, a query echoed
    back (no QR), and garbage reach the socket first; each is dropped and the real answer counts."""
    good = "v=spf1 -all"

    def forgeries(query: dns.message.Message) -> list[bytes]:
        other_id = dns.message.make_response(query)
        other_id.id = (query.id + 1) % 65536
        other_id.answer.append(dns.rrset.from_text(query.question[0].name, 300, "IN", "TXT", '"forged"'))
        other_name = dns.message.make_response(
            dns.message.make_query("forged.example.net", "TXT", id=query.id)
        )
        other_name.answer.append(dns.rrset.from_text("forged.example.net.", 300, "IN", "TXT", '"forged"'))
        other_type = dns.message.make_response(
            dns.message.make_query(query.question[0].name, "A", id=query.id)
        )
        forged = [other_id, other_name, other_type, query]
        return [m.to_wire() for m in forged] + [b"\x00\x01junk"]

    class Racing(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            query = dns.message.from_wire(data)
            for forged in forgeries(query):
                self.transport.sendto(forged, addr)
            response = dns.message.make_response(query)
            response.answer.append(dns.rrset.from_text(query.question[0].name, 300, "IN", "TXT", f'"{good}"'))
            self.transport.sendto(response.to_wire(), addr)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(Racing, local_addr=("127.0.0.1", 0))
        port = udp.get_extra_info("sockname")[1]
        try:
            answer = await resolver(port).txt("Example.COM")
            assert (answer.status, answer.records, answer.ttl) == ("found", (good,), 300.0)
        finally:
            udp.close()

    asyncio.run(main())


def test_a_refusal_without_the_question_still_counts_as_the_answer() -> None:
    """Servers may answer REFUSED with an empty question section; that is this server's answer (it is
    dropped for the lookup, a temperror here), not a forgery to wait past until the deadline."""

    class Refusing(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            response = dns.message.make_response(dns.message.from_wire(data))
            response.question = []
            response.set_rcode(dns.rcode.REFUSED)
            self.transport.sendto(response.to_wire(), addr)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(Refusing, local_addr=("127.0.0.1", 0))
        port = udp.get_extra_info("sockname")[1]
        try:
            start = time.monotonic()
            answer = await resolver(port, lifetime=2.0).txt("example.com")
            assert answer.status == "temperror" and answer.reason == "servfail"
            assert time.monotonic() - start < 1.0  # not the lifetime
        finally:
            udp.close()

    asyncio.run(main())
