"""DNS blocklists ([reputation], milter/auth/dnsbl.py): query names, how answers are read (refusal codes,
hijacked NXDOMAIN, configured codes), the lookups over a real DNS server on loopback, the policy rule and
the configuration's errors. The gateway end to end is in test_gateway_auth.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest
from auth_support import FakeDns, with_server
from hypothesis import given
from hypothesis import strategies as st

from milter.auth import DnsResolver, TxtAnswer
from milter.auth.dnsbl import (
    MAX_LINK_DOMAINS,
    Listing,
    Reputation,
    Subject,
    Zone,
    look_up,
    query_name,
    read_answer,
    subjects,
)
from milter.config import Lists, PolicyConfig, parse_config
from milter.errors import ConfigError
from milter.features import extract
from milter.features.summary import Extracted, MessageSummary
from milter.gateway.reputation import Blocklists
from milter.policy import Policy
from milter.types import Action, Envelope, Scores, Verdict

ZEN = Zone("zen.spamhaus.org", "ip", Action.QUARANTINE, codes={"127.0.0.2": "SBL", "127.0.0.4": "XBL"})
DBL = Zone("dbl.spamhaus.org", "domain", Action.TAG, codes={"127.0.1.2": "spam domain"})
ANY = Zone("multi.uribl.com", "domain", Action.TAG)  # no codes: any list answer counts
CLIENT = Subject("192.0.2.99", "client address", "ip")
SHOP = Subject("landyselect.com", "From domain", "sender")


# --- query names and answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "zone", "name"),
    [
        ("192.0.2.99", "zen.spamhaus.org", "99.2.0.192.zen.spamhaus.org"),
        ("2001:db8::1", "zen.spamhaus.org",
         "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.spamhaus.org"),
        ("Landyselect.COM.", "dbl.spamhaus.org", "landyselect.com.dbl.spamhaus.org"),
        ("", "dbl.spamhaus.org", None),
        ("localhost", "dbl.spamhaus.org", None),  # one label: no list answers for it
        ("a..b", "dbl.spamhaus.org", None),
    ],
)
def test_query_names(subject: str, zone: str, name: str | None) -> None:
    assert query_name(subject, zone) == name


def test_a_listed_code_is_a_listing_with_its_meaning() -> None:
    result, listing = read_answer(ZEN, CLIENT, TxtAnswer.found(["127.0.0.4"]))
    assert result.result == "listed" and result.query == "99.2.0.192.zen.spamhaus.org"
    assert listing == Listing("zen.spamhaus.org", "192.0.2.99", "client address", "127.0.0.4", "XBL",
                              Verdict.SPAM, Action.QUARANTINE)
    assert listing.reason == "client address 192.0.2.99 listed in zen.spamhaus.org (127.0.0.4: XBL)"


def test_several_codes_give_the_lowest_configured_one() -> None:
    _, listing = read_answer(ZEN, CLIENT, TxtAnswer.found(["127.0.0.4", "127.0.0.2", "127.0.0.11"]))
    assert listing is not None and (listing.code, listing.meaning) == ("127.0.0.2", "SBL")


@pytest.mark.parametrize(
    "answer",
    ["127.255.255.254", "127.255.255.252", "127.255.255.255", "127.0.0.1"],
    ids=["public-resolver", "typo", "volume", "uribl-blocked"],
)
def test_refusal_codes_are_never_listings(answer: str) -> None:
    """Spamhaus's answers to public resolvers and URIBL's "blocked" read as listings would hold all mail."""
    for zone in (ZEN, ANY):
        result, listing = read_answer(zone, SHOP, TxtAnswer.found([answer]))
        assert listing is None and result.result == "refused" and result.detail == answer


def test_a_refusal_beside_a_code_is_still_a_refusal() -> None:
    result, listing = read_answer(ANY, SHOP, TxtAnswer.found(["127.0.0.2", "127.255.255.254"]))
    assert listing is None and result.result == "refused"


def test_an_answer_outside_127_is_a_hijacked_nxdomain_not_a_listing() -> None:
    result, listing = read_answer(ANY, SHOP, TxtAnswer.found(["198.51.100.80"]))
    assert listing is None and result.result == "error" and "198.51.100.80" in result.detail


def test_codes_not_configured_do_not_list() -> None:
    """DBL's 127.0.1.102 ("abused legit spam") is left out of DBL's codes here: no listing."""
    result, listing = read_answer(DBL, SHOP, TxtAnswer.found(["127.0.1.102"]))
    assert listing is None and result.result == "clean"
    _, listed = read_answer(ANY, SHOP, TxtAnswer.found(["127.0.1.102"]))
    assert listed is not None and listed.meaning == ""


@pytest.mark.parametrize(
    ("answer", "result"),
    [(TxtAnswer.none("nxdomain"), "clean"), (TxtAnswer.temperror("timeout"), "error"),
     (TxtAnswer.found(["not-an-address"]), "error")],
)
def test_no_answer_is_no_listing(answer: TxtAnswer, result: str) -> None:
    got, listing = read_answer(DBL, SHOP, answer)
    assert listing is None and got.result == result


@given(st.text(max_size=300), st.lists(st.text(max_size=40), max_size=4))
def test_hostile_names_and_answers_never_raise_and_never_list_outside_127(
    subject: str, records: list[str]
) -> None:
    """Whatever a message or a resolver hands over: a name for the zone or none, and a listing only for
    an answer in 127.0.0.0/8 that is no refusal."""
    name = query_name(subject, "dbl.test")
    assert name is None or (name.endswith(".dbl.test") and name == name.lower())
    _, listing = read_answer(ANY, Subject(subject, "link domain", "links"), TxtAnswer.found(records))
    if listing is not None:
        assert all(r.startswith("127.") and r != "127.0.0.1" and not r.startswith("127.255.255.")
                   for r in records)


def test_subjects_dedupe_and_cap_the_link_domains() -> None:
    links = [f"site{i}.example" for i in range(MAX_LINK_DOMAINS + 5)]
    got = subjects("192.0.2.99", [("From domain", "shop.example"), ("Reply-To domain", "Shop.Example")],
                   ["shop.example", *links])
    assert [s.value for s in got[:2]] == ["192.0.2.99", "shop.example"]
    assert [s.role for s in got].count("link domain") == MAX_LINK_DOMAINS
    assert [s.value for s in got[2:]] == links[:MAX_LINK_DOMAINS]  # the From domain is not asked twice


# --- lookups over a real DNS server ---------------------------------------------------------------------


def run_lookup(server: FakeDns, zones: list[Zone], targets: tuple[Subject, ...], timeout: float = 0.5
               ) -> tuple[Reputation, float]:
    out: list[tuple[Reputation, float]] = []

    async def body(port: int) -> None:
        resolver = DnsResolver([("127.0.0.1", port)], lifetime=timeout)
        started = time.monotonic()
        rep = await look_up(resolver, zones, targets, timeout)
        out.append((rep, time.monotonic() - started))

    with_server(server, body)
    return out[0]


def test_lookups_ask_each_zone_about_what_it_lists() -> None:
    server = FakeDns(typed={("99.2.0.192.zen.spamhaus.org", "A"): ["127.0.0.2"],
                            ("landyselect.com.dbl.spamhaus.org", "A"): ["127.0.1.2"]})
    link = Subject("tracker.example", "link domain", "links")
    rep, _ = run_lookup(server, [ZEN, DBL], (CLIENT, SHOP, link))
    assert [(x.zone, x.subject) for x in rep.listings] == [
        ("zen.spamhaus.org", "192.0.2.99"), ("dbl.spamhaus.org", "landyselect.com")]
    assert sorted(server.queries) == sorted([
        "99.2.0.192.zen.spamhaus.org", "landyselect.com.dbl.spamhaus.org",
        "tracker.example.dbl.spamhaus.org",
    ])
    assert set(server.types) == {"A"}
    assert {r.result for r in rep.results} == {"listed", "clean"}


def test_a_domain_zone_asks_only_its_sources() -> None:
    server = FakeDns()
    links_only = replace(DBL, sources=("links",))
    run_lookup(server, [links_only], (CLIENT, SHOP, Subject("tracker.example", "link domain", "links")))
    assert server.queries == ["tracker.example.dbl.spamhaus.org"]


def test_one_list_configured_twice_is_asked_once() -> None:
    server = FakeDns(typed={("landyselect.com.dbl.spamhaus.org", "A"): ["127.0.1.4"]})
    phish = Zone("dbl.spamhaus.org", "domain", Action.QUARANTINE, Verdict.BEC, codes={"127.0.1.4": "phish"})
    rep, _ = run_lookup(server, [DBL, phish], (SHOP,))
    assert server.queries == ["landyselect.com.dbl.spamhaus.org"]
    assert [(x.verdict, x.meaning) for x in rep.listings] == [(Verdict.BEC, "phish")]
    assert [r.result for r in rep.results] == ["clean", "listed"]


def test_a_silent_list_costs_one_deadline_and_lists_nothing() -> None:
    server = FakeDns(silent={"landyselect.com.dbl.spamhaus.org"},
                     typed={("99.2.0.192.zen.spamhaus.org", "A"): ["127.0.0.2"]})
    rep, took = run_lookup(server, [ZEN, DBL], (CLIENT, SHOP), timeout=0.3)
    assert [x.zone for x in rep.listings] == ["zen.spamhaus.org"]  # the answer that came still counts
    assert [r.result for r in rep.results] == ["listed", "error"]
    assert took < 1.5  # one deadline (0.3 s), not a stall; generous for a loaded machine


def test_a_resolver_that_raises_is_an_error_result() -> None:
    class Broken:
        async def txt(self, name: str) -> TxtAnswer:
            raise RuntimeError("bug")

        async def query(self, name: str, rdtype: str) -> TxtAnswer:
            raise RuntimeError("bug")

    rep = asyncio.run(look_up(Broken(), [DBL], (SHOP,), 0.5))
    assert rep.listings == () and rep.results[0].result == "error" and "RuntimeError" in rep.results[0].detail


# --- what the gateway asks ------------------------------------------------------------------------------


def summary(**kw: object) -> MessageSummary:
    base = MessageSummary(
        message_id="<m@test>", subject="Sale", from_addr="deals@landyselect.com", from_display="Hardware ACE",
        from_domain="landyselect.com", reply_to_addr=None, to_addrs=("bob@corp.test",), date=None,
        defects=(), from_org_domain="landyselect.com", link_domains=("landyselect.com", "trk.example"),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_the_gateway_asks_outside_clients_and_never_our_own_domains() -> None:
    from milter.policy.table import parse_networks

    lists = Blocklists(object(), [ZEN, DBL], 0.5, parse_networks("n", ("10.0.0.0/8",)), ("corp.test",))  # type: ignore[arg-type]
    env = Envelope(mail_from="<bounce@mail.landyselect.com>", client_addr="192.0.2.99")
    got = [(s.role, s.value) for s in lists.targets(summary(reply_to_domain="corp.test"), env)]
    assert got == [("client address", "192.0.2.99"), ("From domain", "landyselect.com"),
                   ("link domain", "trk.example")]  # envelope domain = From's; Reply-To ours
    inside = Envelope(client_addr="10.1.2.3")
    assert [s.role for s in lists.targets(summary(), inside)] == ["From domain", "link domain"]
    local = Envelope(client_addr="192.0.2.99", source="LOCAL")
    assert "client address" not in [s.role for s in lists.targets(summary(), local)]


def test_free_mail_and_skipped_domains_are_never_asked() -> None:
    lists = Blocklists(object(), [DBL], 0.5, skip_domains=("Google.com",))  # type: ignore[arg-type]
    s = summary(from_org_domain="gmail.com", reply_to_domain="hotmail.co.uk",
                link_domains=("docs.google.com", "google.com", "notgoogle.com", "trk.example"))
    got = [(t.role, t.value) for t in lists.targets(s, Envelope(mail_from="<x@ymail.com>"))]
    assert got == [("link domain", "notgoogle.com"), ("link domain", "trk.example")]
    assert lists.skipped("mail.GMAIL.com") and not lists.skipped("gmail.com.evil.example")
    cfg = parse_config({"reputation": {"skip_domains": ["Example.ORG."]}})
    assert cfg.reputation.skip_domains == ("example.org",)


def test_link_domains_come_from_the_parse() -> None:
    raw = (b"From: a@shop.example\r\nTo: b@corp.test\r\nSubject: x\r\nContent-Type: text/html\r\n\r\n"
           b'<a href="https://www.Click.Example.com/x">a</a> <a href="http://click.example.com/y">b</a> '
           b'<a href="http://198.51.100.1/z">c</a>')
    assert extract(raw).summary.link_domains == ("example.com",)  # registrable, once; no IP literal
    plain = b"From: a@shop.example\r\nSubject: x\r\n\r\nsee https://Other.example.org/p and http://a.b.example.org\r\n"
    assert extract(plain).summary.link_domains == ("example.org",)


# --- the policy rule -------------------------------------------------------------------------------------

META = {"spam": {"tag": 0.5, "quarantine": 0.9}, "bec": {"tag": 0.3, "quarantine": 0.6}}
HAM = Scores(ham=0.97, spam=0.02, bec=0.01)
SPAM = Scores(ham=0.02, spam=0.90, bec=0.08)


def listing(zone: Zone = DBL, subject: str = "landyselect.com", role: str = "From domain") -> Listing:
    return Listing(zone.name, subject, role, "127.0.1.2", "spam domain", zone.verdict, zone.action,
                   zone.min_score)


def decide(listings: tuple[Listing, ...], scores: Scores = HAM, config: PolicyConfig | None = None,
           **kw: object) -> tuple[str, str, tuple[str, ...]]:
    ext = Extracted(np.zeros(1, np.float32), summary(reputation=Reputation(listings), **kw), ())
    env = Envelope(mail_from="deals@landyselect.com", rcpt_tos=("bob@corp.test",), client_addr="192.0.2.99")
    d = Policy(config or PolicyConfig(), META).decide(scores, ext, env)
    return d.verdict.value, d.action.value, d.reasons


def test_a_listing_decides_with_its_zone_action_and_says_why() -> None:
    verdict, action, reasons = decide((listing(),))
    assert (verdict, action) == ("spam", "tag")
    assert reasons[0] == "From domain landyselect.com listed in dbl.spamhaus.org (127.0.1.2: spam domain)"


def test_no_listing_and_refused_lookups_decide_nothing() -> None:
    assert decide(())[:2] == ("ham", "accept")


def test_the_model_is_never_softened_by_a_weaker_zone() -> None:
    verdict, action, reasons = decide((listing(),), SPAM)
    assert (verdict, action) == ("spam", "quarantine") and "dbl.spamhaus.org" in reasons[0]


def test_the_strictest_listing_decides_and_the_reason_is_bounded() -> None:
    links = tuple(listing(subject=f"s{i}.example", role="link domain") for i in range(5))
    zen = listing(ZEN, "192.0.2.99", "client address")
    _, action, reasons = decide((*links, zen))
    assert action == "quarantine" and reasons[0].startswith("client address 192.0.2.99 listed in zen")
    assert reasons[0].endswith("; 3 more listed")


def test_a_zone_with_a_min_score_acts_only_where_the_model_leans_to_spam() -> None:
    broad = Zone("dnsbl-2.example", "ip", Action.TAG, min_score=0.5)
    _, listed = read_answer(broad, CLIENT, TxtAnswer.found(["127.0.0.2"]))
    assert listed is not None and listed.min_score == 0.5
    assert decide((listed,))[:2] == ("ham", "accept")  # not-ham 0.03
    leaning = Scores(ham=0.45, spam=0.5, bec=0.05)
    verdict, action, reasons = decide((listed,), leaning)
    assert (verdict, action) == ("spam", "tag") and reasons[0].startswith("client address 192.0.2.99")
    # a listing of another zone without a minimum still decides alone
    assert decide((listed, listing()))[:2] == ("spam", "tag")
    zone = {"name": "dnsbl-2.example", "kind": "ip", "min_score": 0.5}
    cfg = parse_config({"reputation": {"zone": [zone]}})
    assert cfg.reputation.zones[0].min_score == 0.5


def test_a_bec_zone_gives_a_bec_verdict() -> None:
    phish = Zone("dbl.spamhaus.org", "domain", Action.QUARANTINE, Verdict.BEC)
    assert decide((listing(phish),))[:2] == ("bec", "quarantine")


def test_an_allow_list_entry_beats_a_listing() -> None:
    allowed = PolicyConfig(lists=Lists(allow_domains=("landyselect.com",)))
    assert decide((listing(),), config=allowed)[:2] == ("ham", "accept")


def test_a_listed_bulk_sender_is_not_accepted_as_bulk() -> None:
    evidence = ("one-click unsubscribe (RFC 8058)", "Feedback-ID")
    assert decide((), bulk_evidence=evidence)[:2] == ("bulk", "accept")
    assert decide((listing(),), bulk_evidence=evidence)[:2] == ("spam", "tag")


# --- configuration ----------------------------------------------------------------------------------------


def test_zones_are_read_from_the_config() -> None:
    cfg = parse_config({"reputation": {"timeout": 0.4, "zone": [
        {"name": "ZEN.Spamhaus.org.", "kind": "ip", "action": "quarantine", "codes": {"127.0.0.2": "SBL"}},
        {"name": "dbl.spamhaus.org", "kind": "domain", "sources": ["links"], "verdict": "bec"},
    ]}})
    zen, dbl = cfg.reputation.zones
    assert cfg.reputation.timeout == 0.4
    assert (zen.name, zen.kind, zen.action, zen.codes) == ("zen.spamhaus.org", "ip", "quarantine",
                                                           (("127.0.0.2", "SBL"),))
    assert (dbl.sources, dbl.verdict, dbl.action) == (("links",), "bec", "tag")
    assert parse_config({}).reputation.zones == ()


@pytest.mark.parametrize(
    ("zone", "key"),
    [
        ({"kind": "ip"}, "reputation.zone[0].name"),
        ({"name": "zen.spamhaus.org", "kind": "url"}, "reputation.zone[0].kind"),
        ({"name": "zen.spamhaus.org", "kind": "ip", "action": "accept"}, "reputation.zone[0].action"),
        ({"name": "zen.spamhaus.org", "kind": "ip", "verdict": "ham"}, "reputation.zone[0].verdict"),
        ({"name": "zen.spamhaus.org", "kind": "ip", "codes": {"10.0.0.2": "x"}}, "reputation.zone[0].codes"),
        ({"name": "zen.spamhaus.org", "kind": "ip", "codes": ["127.0.0.2"]}, "reputation.zone[0].codes"),
        ({"name": "http://zen", "kind": "ip"}, "reputation.zone[0].name"),
        ({"name": "dbl.spamhaus.org", "kind": "domain", "sources": ["body"]},
         "reputation.zone[0].sources[0]"),
        ({"name": "zen.spamhaus.org", "kind": "ip", "refusals": ["nope"]}, "reputation.zone[0].refusals[0]"),
        ({"name": "zen.spamhaus.org", "kind": "ip", "weight": 3}, "reputation.zone[0].weight"),
        ({"name": "zen.spamhaus.org", "kind": "ip", "min_score": 1.5}, "reputation.zone[0].min_score"),
    ],
)
def test_a_broken_zone_names_its_key(zone: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"reputation": {"zone": [zone]}})
    assert err.value.key == key


def test_zones_need_the_auth_resolver() -> None:
    zone = {"name": "zen.spamhaus.org", "kind": "ip"}
    with pytest.raises(ConfigError) as err:
        parse_config({"auth": {"enabled": False}, "reputation": {"zone": [zone]}})
    assert err.value.key == "reputation.zone"
    with pytest.raises(ConfigError) as bad:
        parse_config({"reputation": {"timeout": 0}})
    assert bad.value.key == "reputation.timeout"


def test_the_dns_deadlines_must_fit_in_the_scan_timeout() -> None:
    zone = {"name": "zen.spamhaus.org", "kind": "ip"}
    raw = {"server": {"scan_timeout": 5.0}, "auth": {"timeout": 2.0},
           "reputation": {"timeout": 3.0, "zone": [zone]}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.key == "reputation.timeout" and "server.scan_timeout" in err.value.problem
    assert parse_config({**raw, "reputation": {"timeout": 2.5, "zone": [zone]}}).reputation.timeout == 2.5
    assert parse_config({**raw, "server": {"scan_timeout": 0.0}}).reputation.zones  # 0: no scan limit
