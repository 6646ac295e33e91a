"""DKIM and DMARC in the gateway, end to end: a real DNS server on loopback answers the gateway's own
resolver (config [auth] nameservers), real SMTP in and out, the real model and store."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from auth_support import SELECTOR, FakeDns, arc_seal, generate_key, sign
from gateway_support import Outcome, Sink, config_for, load_scanner, open_store, running_gateway

from milter.config import AuthConfig, ClassThresholds, Config, ReputationConfig, ZoneConfig
from milter.gateway.server import Gateway

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "bec" / "ham-vendor-invoice.eml"
KEY_NAME = f"{SELECTOR}._domainkey.mail.example.com"
TIMEOUT = 0.5  # auth.timeout in these tests
Scenario = Callable[[Gateway, Sink, Any], Awaitable[None]]


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    return generate_key(tmp_path_factory.mktemp("dkim"))


def invoice(from_addr: str) -> bytes:
    """A real vendor invoice (fixtures/bec), From replaced, CRLF as SMTP carries it."""
    raw = re.sub(rb"(?m)^From: .*$", f"From: Billing <{from_addr}>".encode(), FIXTURE.read_bytes(), count=1)
    return re.sub(rb"\r?\n", b"\r\n", raw)


def run(tmp_path: Path, free_port: Callable[[], int], dns: FakeDns, scenario: Scenario,
        arc_sealers: tuple[str, ...] = (), reputation: ReputationConfig | None = None,
        **policy: Any) -> Any:
    url = f"sqlite:///{tmp_path}/gw.db"
    store = open_store(url)
    sink_port = free_port()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: dns, local_addr=("127.0.0.1", 0))
        sink = Sink()
        await sink.start(sink_port)
        cfg = config_for(free_port(), sink_port, url)
        port = transport.get_extra_info("sockname")[1]
        auth = AuthConfig(
            nameservers=(f"127.0.0.1:{port}",), timeout=TIMEOUT, trusted_arc_sealers=arc_sealers
        )
        cfg = Config(policy=replace(cfg.policy, **policy), server=cfg.server, store=cfg.store, auth=auth,
                     reputation=reputation or ReputationConfig())
        try:
            async with running_gateway(cfg, load_scanner(cfg.policy), store, real_dns=True) as gw:
                await scenario(gw, sink, store)
        finally:
            await sink.stop()
            transport.close()

    asyncio.run(main())
    return store


async def send(
    port: int,
    raw: bytes,
    client: str = "198.51.100.7",
    source: str = "REMOTE",
    mail_from: str = "bounces@sender.test",
) -> Outcome:
    """As Postfix hands over mail from `client` (XFORWARD): our policy treats the gateway's own peer,
    127.0.0.1, as internal."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30, start_tls=False)
    await smtp.connect()
    await smtp.ehlo(hostname="postfix.test")
    assert (await smtp.execute_command(b"XFORWARD", f"ADDR={client} SOURCE={source}".encode())).code == 250
    try:
        _, text = await smtp.sendmail(mail_from, ["bob@rcpt.test"], raw)
        return Outcome("", 250, text)
    except aiosmtplib.SMTPResponseException as exc:
        return Outcome("", exc.code, exc.message)
    finally:
        await smtp.quit()


def our_header(raw: bytes) -> str:
    """Our Authentication-Results value, unfolded (it is the first field of relayed mail)."""
    first = raw.split(b"\r\n\r\n", 1)[0]
    m = re.match(rb"Authentication-Results: (.*?)\r\n(?![ \t])", first + b"\r\n", re.S)
    assert m is not None, first[:200]
    return re.sub(r"\s+", " ", m.group(1).decode())


def test_signed_mail_is_relayed_with_dkim_and_dmarc_pass(
    tmp_path: Path, free_port: Callable[[], int], rsa_key: tuple[bytes, str]
) -> None:
    pem, record = rsa_key
    dns = FakeDns(records={KEY_NAME: [f'"{record}"'], "_dmarc.example.com": ['"v=DMARC1; p=reject"']})
    raw = sign(invoice("billing@example.com"), pem)

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        out = await send(gw.address[1], raw)
        assert out.code == 250, out
        value = our_header(sink.messages[0].raw)
        assert value.startswith("gw.test; dkim=pass ")
        assert "header.d=mail.example.com" in value and "dmarc=pass" in value
        assert sink.messages[0].raw.endswith(raw)  # the signed bytes untouched below our header
        assert dns.count(KEY_NAME) == 1
        metrics = gw.metrics.render().decode()
        assert 'milter_auth_results_total{check="dkim",result="pass"} 1.0' in metrics
        assert 'milter_auth_results_total{check="dmarc",result="pass"} 1.0' in metrics
        assert "milter_auth_dns_seconds_count 1.0" in metrics

    run(tmp_path, free_port, dns, scenario)


def test_exact_spoof_of_a_protected_domain_is_quarantined_as_bec(
    tmp_path: Path, free_port: Callable[[], int], rsa_key: tuple[bytes, str]
) -> None:
    pem, record = rsa_key
    dns = FakeDns(records={KEY_NAME: [f'"{record}"'], "_dmarc.example.com": ['"v=DMARC1; p=quarantine"']})
    spoof = invoice("billing@example.com")  # no signature: from anywhere but example.com's servers
    genuine = sign(invoice("billing@example.com"), pem)

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        out = await send(gw.address[1], spoof)
        assert out.code == 250 and "quarantined as" in out.text, out
        row = await asyncio.to_thread(store.get, int(out.text.rsplit(" ", 1)[1]))
        assert row.verdict == "bec"
        assert row.reasons[0].startswith("protected domain spoofed: From domain example.com fails DMARC")
        # the same mail, signed by the domain, goes through (the model alone scores this invoice ham)
        assert (await send(gw.address[1], genuine)).code == 250
        assert len(sink.messages) == 1 and b"dmarc=pass" in sink.messages[0].raw.split(b"\r\n\r\n")[0]
        # our own users' mail is not judged by DMARC: Postfix's local clients, and internal networks
        assert (await send(gw.address[1], spoof, source="LOCAL")).code == 250
        assert (await send(gw.address[1], spoof, client="10.1.2.3")).code == 250
        assert len(sink.messages) == 3
        assert all(b"dmarc=fail" in m.raw.split(b"\r\n\r\n")[0] for m in sink.messages[1:])  # reported

    run(tmp_path, free_port, dns, scenario, protected_domains=("example.com",))


def test_spf_checked_for_the_outside_client_can_carry_dmarc(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    """Unsigned mail from the domain's own servers passes DMARC through aligned SPF (checked by the
    gateway for the XFORWARD client); the same mail from elsewhere is the spoof."""
    dns = FakeDns(records={
        "example.com": ['"v=spf1 ip4:198.51.100.0/24 include:_spf.example.com -all"'],
        "_spf.example.com": ['"v=spf1 a:out.example.com -all"'],
        "_dmarc.example.com": ['"v=DMARC1; p=reject"'],
    }, typed={("out.example.com", "A"): ["203.0.113.25"]})
    raw = invoice("billing@example.com")

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        own = await send(gw.address[1], raw, client="198.51.100.7", mail_from="bounces@example.com")
        via_include = await send(gw.address[1], raw, client="203.0.113.25", mail_from="bounces@example.com")
        spoof = await send(gw.address[1], raw, client="192.0.2.99", mail_from="bounces@example.com")
        assert (own.code, via_include.code) == (250, 250)
        assert "quarantined as" in spoof.text
        for relayed in sink.messages:
            value = our_header(relayed.raw)
            assert "spf=pass smtp.mailfrom=example.com" in value and "dmarc=pass" in value
        row = await asyncio.to_thread(store.get, int(spoof.text.rsplit(" ", 1)[1]))
        assert row.verdict == "bec" and "spf=fail(example.com)" in row.reasons[0]
        assert len(sink.messages) == 2

    run(tmp_path, free_port, dns, scenario, protected_domains=("example.com",))


def test_dmarc_failure_elsewhere_is_tagged_not_quarantined(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    records = {"_dmarc.bank.test": ['"v=DMARC1; p=reject"'], "_dmarc.news.test": ['"v=DMARC1; p=none"']}
    dns = FakeDns(records=records)

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        assert (await send(gw.address[1], invoice("alerts@bank.test"))).code == 250
        assert (await send(gw.address[1], invoice("hello@news.test"))).code == 250
        disowned, unenforced = (m.raw.split(b"\r\n\r\n")[0] for m in sink.messages)
        assert b"dmarc=fail" in disowned and b"X-Milter-Verdict: spam" in disowned
        assert b"From domain bank.test fails DMARC (p=reject" in disowned.replace(b"\r\n ", b" ")
        # p=none: the owner has not said its mail is all aligned; the failure is reported, not acted on
        assert b"dmarc=fail" in unenforced and b"X-Milter-Verdict" not in unenforced

    run(tmp_path, free_port, dns, scenario)


def test_dns_that_never_answers_costs_the_timeout_not_the_message(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    dns = FakeDns(silent={"_dmarc.example.com", "sender.test"})  # DMARC record and the SPF walk hang

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        started = time.monotonic()
        out = await send(gw.address[1], invoice("billing@example.com"))
        elapsed = time.monotonic() - started
        assert out.code == 250
        assert "dmarc=temperror" in our_header(sink.messages[0].raw)
        assert "spf=temperror" in our_header(sink.messages[0].raw)
        metrics = gw.metrics.render().decode()
        assert 'milter_auth_results_total{check="dmarc",result="temperror"} 1.0' in metrics
        assert elapsed < TIMEOUT + 3.0  # one deadline per message, however many lookups hang
        assert dns.count("_dmarc.example.com") >= 1 and dns.count("sender.test") >= 1

    run(tmp_path, free_port, dns, scenario, protected_domains=("example.com",))


def test_a_broken_gather_costs_the_results_not_the_message(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """milter.auth never raises by design; should a bug make it, the message goes on without results."""
    import milter.gateway.auth as gateway_auth
    from milter.auth import StaticResolver

    auth = gateway_auth.SenderAuth(StaticResolver({}), TIMEOUT, "gw.test")
    good = asyncio.run(auth.gather(invoice("billing@example.com"), "m1"))
    assert good is not None and good.plan.from_domain == "example.com"

    async def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(gateway_auth, "gather", broken)
    assert asyncio.run(auth.gather(invoice("billing@example.com"), "m2")) is None
    assert "auth_gather_failed" in caplog.text and "id=m2" in caplog.text and "RuntimeError" in caplog.text


def test_a_host_without_a_resolver_still_passes_mail(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No /etc/resolv.conf (dnspython refuses to build a resolver): the gateway starts, says so, and
    every check ends in temperror, which no rule acts on."""
    import dns.resolver

    import milter.gateway.auth as gateway_auth
    from milter.auth import evaluate_evidence

    def no_config(*args: object, **kwargs: object) -> None:
        raise dns.resolver.NoResolverConfiguration("no nameservers")  # type: ignore[no-untyped-call]

    monkeypatch.setattr(gateway_auth, "DnsResolver", no_config)
    auth = gateway_auth.build_sender_auth(AuthConfig(), "gw.test")
    assert auth is not None
    assert "auth_no_resolver" in caplog.text and "auth.nameservers" in caplog.text
    raw = invoice("billing@example.com")
    evidence = asyncio.run(auth.gather(raw, "m1"))
    assert evidence is not None
    assert evaluate_evidence(raw, evidence).dmarc.result == "temperror"


def test_senders_the_admins_released_are_tagged_after_a_reload(
    tmp_path: Path, free_port: Callable[[], int], rsa_key: tuple[bytes, str]
) -> None:
    """milter.policy.learned end to end: released and labelled ham in the store, read on reload, and
    honoured only for mail the From domain authenticates (DMARC pass)."""
    pem, record = rsa_key
    dns = FakeDns(records={KEY_NAME: [f'"{record}"'], "_dmarc.example.com": ['"v=DMARC1; p=none"']})
    genuine = sign(invoice("billing@example.com"), pem)
    forged = invoice("billing@example.com")  # same From, not signed: DMARC fails (p=none)

    async def quarantined_id(port: int, raw: bytes) -> int:
        out = await send(port, raw)
        assert out.code == 250 and "quarantined as" in out.text, out
        return int(out.text.rsplit(" ", 1)[1])

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        port = gw.address[1]
        ids = [await quarantined_id(port, genuine) for _ in range(3)]  # every message is quarantined here
        for pk in ids:
            assert await asyncio.to_thread(store.set_label, pk, "ham", "admin-release") == 1
        await quarantined_id(port, genuine)  # labels count from the next reload (start, SIGHUP), not before
        assert (await gw.reloader.reload()).ok
        out = await send(port, genuine)
        assert out.code == 250 and "quarantined" not in out.text, out
        head = re.sub(r"\r\n[ \t]+", " ", sink.messages[-1].raw.split(b"\r\n\r\n", 1)[0].decode())
        assert "X-Milter-Verdict: spam" in head
        assert (
            "X-Milter-Reasons: learned sender: example.com passes DMARC and admins labelled 3 of its "
            "messages ham, none spam: tagged, not quarantined; spam score" in head
        )
        await quarantined_id(port, forged)  # a spoofer gets nothing from the sender's reputation
        # one message of the sender confirmed as spam, and the credit is gone at the next reload
        await asyncio.to_thread(store.set_label, ids[0], "spam", "admin")
        assert (await gw.reloader.reload()).ok
        await quarantined_id(port, genuine)

    run(tmp_path, free_port, dns, scenario, spam=ClassThresholds(tag=0.0, quarantine=0.0))


def test_forwarded_mail_with_a_trusted_arc_chain_is_not_punished(
    tmp_path: Path, free_port: Callable[[], int], rsa_key: tuple[bytes, str]
) -> None:
    """milter.auth.arc on the serving path: a list breaks the author's signature (DMARC p=reject fails
    directly) but seals what it verified; its key is fetched with the others, once, and the trusted
    chain spares the protected domain's message the spoof verdict. The same chain tampered after
    sealing is quarantined."""
    pem, record = rsa_key
    list_pem, list_record = generate_key(tmp_path)
    list_key = "fwd._domainkey.lists.example.org"
    dns = FakeDns(records={
        KEY_NAME: [f'"{record}"'], list_key: [f'"{list_record}"'],
        "_dmarc.example.com": ['"v=DMARC1; p=reject"'],
    })
    relayed = sign(invoice("billing@example.com"), pem).replace(b"\r\nSubject: ", b"\r\nSubject: [team] ", 1)
    saw = "dkim=pass header.d=mail.example.com; dmarc=pass header.from=example.com"
    forwarded = arc_seal(relayed + b"-- \r\nteam list\r\n", list_pem, "lists.example.org", "fwd", saw)
    tampered = forwarded.replace(b"-- \r\nteam list", b"-- \r\nteam list, edited")

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        out = await send(gw.address[1], forwarded)
        assert out.code == 250 and "quarantined" not in out.text, out
        head = re.sub(r"\r\n[ \t]+", " ", sink.messages[0].raw.split(b"\r\n\r\n", 1)[0].decode())
        value = our_header(sink.messages[0].raw)
        assert "dmarc=fail" in value and "arc=pass (i=1 sealer lists.example.org)" in value
        assert "X-Milter-Verdict" not in head  # accepted untouched: neither spoof verdict nor DMARC tag
        out = await send(gw.address[1], tampered)
        assert "quarantined as" in out.text, out
        row = await asyncio.to_thread(store.get, int(out.text.rsplit(" ", 1)[1]))
        assert row.verdict == "bec" and "arc=fail(i=1 sealer=lists.example.org trusted)" in row.reasons[0]
        assert dns.count(list_key) == 1  # fetched with the DKIM key and DMARC record, then cached
        metrics = gw.metrics.render().decode()
        assert 'milter_auth_results_total{check="arc",result="pass"} 1.0' in metrics
        assert 'milter_auth_results_total{check="arc",result="fail"} 1.0' in metrics

    run(tmp_path, free_port, dns, scenario, arc_sealers=("lists.example.org",),
        protected_domains=("example.com",))


# --- DNS blocklists ([reputation]) ----------------------------------------------------------------------

ZEN = ZoneConfig("zen.test", "ip", action="quarantine", codes=(("127.0.0.2", "SBL"),))
DBL = ZoneConfig("dbl.test", "domain", action="quarantine", codes=(("127.0.1.2", "spam domain"),))
LISTS = ReputationConfig(zones=(ZEN, DBL), timeout=TIMEOUT)


def test_a_listed_client_or_sender_domain_is_quarantined_with_the_listing_as_reason(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    """The same invoice the model scores ham: delivered from a clean client and domain, held when the
    client address or the From domain is listed; our own clients' addresses are never asked."""
    dns = FakeDns(typed={("99.2.0.192.zen.test", "A"): ["127.0.0.2"],
                         ("listed.example.dbl.test", "A"): ["127.0.1.2"]})

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        clean = await send(gw.address[1], invoice("billing@example.com"))
        assert clean.code == 250 and "quarantined" not in clean.text
        by_ip = await send(gw.address[1], invoice("billing@example.com"), client="192.0.2.99")
        by_domain = await send(gw.address[1], invoice("billing@listed.example"))
        for out, reason in (
            (by_ip, "client address 192.0.2.99 listed in zen.test (127.0.0.2: SBL)"),
            (by_domain, "From domain listed.example listed in dbl.test (127.0.1.2: spam domain)"),
        ):
            assert "quarantined as" in out.text, out
            row = await asyncio.to_thread(store.get, int(out.text.rsplit(" ", 1)[1]))
            assert (row.verdict, row.reasons[0]) == ("spam", reason)
        assert (await send(gw.address[1], invoice("billing@example.com"), client="10.1.2.3")).code == 250
        assert len(sink.messages) == 2 and dns.count("3.2.1.10.zen.test") == 0
        assert dns.count("7.100.51.198.zen.test", "A") == 1 and dns.count("example.com.dbl.test", "A") == 1
        metrics = gw.metrics.render().decode()
        assert 'milter_dnsbl_results_total{result="listed",zone="zen.test"} 1.0' in metrics
        assert 'milter_dnsbl_results_total{result="listed",zone="dbl.test"} 1.0' in metrics

    run(tmp_path, free_port, dns, scenario, reputation=LISTS)


def test_a_list_that_refuses_us_or_never_answers_holds_nothing(
    tmp_path: Path, free_port: Callable[[], int], caplog: pytest.LogCaptureFixture
) -> None:
    """Spamhaus's answer to a public resolver (127.255.255.254) is logged with the fix and counted, never
    acted on; a silent list costs the deadline, not the message."""
    dns = FakeDns(
        typed={("7.100.51.198.zen.test", "A"): ["127.255.255.254"]}, silent={"example.com.dbl.test"}
    )

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        started = time.monotonic()
        first = await send(gw.address[1], invoice("billing@example.com"))
        elapsed = time.monotonic() - started
        second = await send(gw.address[1], invoice("billing@example.com"))
        assert (first.code, second.code) == (250, 250) and len(sink.messages) == 2
        assert all(b"X-Milter-Verdict" not in m.raw.split(b"\r\n\r\n")[0] for m in sink.messages)
        assert TIMEOUT * 0.8 < elapsed < TIMEOUT + 5  # waited for the silent list, once, bounded
        metrics = gw.metrics.render().decode()
        assert 'milter_dnsbl_results_total{result="refused",zone="zen.test"} 2.0' in metrics
        assert dns.count("7.100.51.198.zen.test") == 1  # the second message's answer came from the cache
        assert 'milter_dnsbl_results_total{result="error",zone="dbl.test"} 2.0' in metrics

    with caplog.at_level("WARNING", logger="milter.gateway"):
        run(tmp_path, free_port, dns, scenario, reputation=LISTS)
    refusals = [r.getMessage() for r in caplog.records if "dnsbl_refused" in r.getMessage()]
    assert len(refusals) == 1 and "zone=zen.test" in refusals[0] and "local recursive resolver" in refusals[0]
