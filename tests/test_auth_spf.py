"""milter.auth.spf_check (RFC 7208 check_host) and milter.auth.spf_macro.

Most cases run over StaticResolver (keys "name" for TXT, "name/A", "name/AAAA", "name/MX"); two run the
whole path over a loopback DNS server through CachingResolver(DnsResolver). `Counting` records every
lookup, so tests can show what was (not) asked for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from ipaddress import ip_address

import pytest
from auth_support import FakeDns, with_server

from milter.auth import CachingResolver, DnsResolver, SpfResult, StaticResolver, TxtAnswer, check_spf
from milter.auth.spf_macro import MacroContext, MacroError, expand, expand_domain

Records = Mapping[str, str | Sequence[str] | TxtAnswer]

IP = "192.0.2.10"
SENDER = "user@example.com"
HELO = "mx.sender.test"


class Counting:
    """A StaticResolver that remembers every (name, type) asked for."""

    def __init__(self, records: Records) -> None:
        self.inner = StaticResolver(records)
        self.asked: list[tuple[str, str]] = []

    async def txt(self, name: str) -> TxtAnswer:
        return await self.query(name, "TXT")

    async def query(self, name: str, rdtype: str) -> TxtAnswer:
        self.asked.append((name.lower(), rdtype))
        return await self.inner.query(name, rdtype)


def spf(
    records: Records | Counting, ip: str = IP, mail_from: str | None = SENDER, helo: str | None = HELO
) -> SpfResult:
    resolver = records if isinstance(records, Counting) else StaticResolver(records)
    return asyncio.run(check_spf(ip, mail_from, helo, resolver))


def result(records: Records | Counting, ip: str = IP, mail_from: str | None = SENDER) -> str:
    return spf(records, ip, mail_from).result


# --- mechanisms that pass -------------------------------------------------------------------------


def test_ip4_pass_and_fail() -> None:
    records = {"example.com": "v=spf1 ip4:192.0.2.0/24 -all"}
    passed = spf(records)
    assert (passed.result, passed.domain) == ("pass", "example.com")
    assert "ip4:192.0.2.0/24" in passed.reason
    assert result(records, ip="198.51.100.1") == "fail"


def test_ip6_pass_and_fail() -> None:
    records = {"example.com": "v=spf1 ip6:2001:db8::/32 -all"}
    assert result(records, ip="2001:db8::cb01") == "pass"
    assert result(records, ip="2001:db9::1") == "fail"
    assert result(records, ip="192.0.2.10") == "fail"  # an IPv4 client never matches ip6


def test_a_mechanism_with_and_without_domain() -> None:
    records = {
        "example.com": "v=spf1 a a:out.example.net/24 -all",
        "example.com/A": "192.0.2.10",
        "out.example.net/A": "198.51.100.1",
    }
    assert result(records) == "pass"
    assert result(records, ip="198.51.100.200") == "pass"  # within out.example.net's /24
    assert result(records, ip="192.0.2.11") == "fail"  # example.com's own A is /32
    assert result(records, ip="203.0.113.1") == "fail"


def test_mx_mechanism() -> None:
    records = {
        "example.com": "v=spf1 mx -all",
        "example.com/MX": ["10 mx1.example.com", "20 mx2.example.com"],
        "mx1.example.com/A": "198.51.100.1",
        "mx2.example.com/A": ["203.0.113.5", "192.0.2.10"],
    }
    assert result(records) == "pass"
    assert result(records, ip="198.51.100.1") == "pass"
    assert result(records, ip="198.51.100.2") == "fail"


def test_include_pass_matches_and_its_fail_does_not() -> None:
    records = {
        "example.com": "v=spf1 include:_spf.provider.test ~all",
        "_spf.provider.test": "v=spf1 ip4:192.0.2.0/24 -all",
    }
    assert result(records) == "pass"
    # the include's own "fail" means only "no match": the outer ~all decides
    assert result(records, ip="198.51.100.1") == "softfail"


def test_include_neutral_and_softfail_are_no_match() -> None:
    for inner in ("v=spf1 ?all", "v=spf1 ~all", "v=spf1"):
        records = {"example.com": "v=spf1 include:inner.test -all", "inner.test": inner}
        assert result(records) == "fail", inner


def test_redirect_used_only_without_a_match() -> None:
    records = {
        "example.com": "v=spf1 ip4:203.0.113.1 redirect=_spf.example.net",
        "_spf.example.net": "v=spf1 ip4:192.0.2.10 ?all",
    }
    assert result(records) == "pass"
    assert result(records, ip="203.0.113.1") == "pass"
    assert result(records, ip="198.51.100.1") == "neutral"  # the redirect target's ?all
    counting = Counting({**records, "example.com": "v=spf1 -all redirect=_spf.example.net"})
    assert result(counting) == "fail"  # all matched: the redirect is not followed
    assert ("_spf.example.net", "TXT") not in counting.asked


def test_redirect_macros_see_the_target_domain() -> None:
    records = {
        "example.com": "v=spf1 redirect=_spf.example.net",
        "_spf.example.net": "v=spf1 exists:%{d}.%{o}.check.test -all",
        "_spf.example.net.example.com.check.test/A": "127.0.0.2",
    }
    assert result(records) == "pass"


def test_exists_with_macros() -> None:
    records = {
        "example.com": "v=spf1 exists:%{ir}.%{l}._ip.%{d} -all",
        "10.2.0.192.user._ip.example.com/A": "127.0.0.2",
    }
    assert result(records) == "pass"
    assert result(records, ip="192.0.2.11") == "fail"
    assert result(records, mail_from="other@example.com") == "fail"


def test_exists_looks_up_a_even_for_an_ipv6_client() -> None:
    counting = Counting({"example.com": "v=spf1 exists:%{v}.%{d} -all", "ip6.example.com/A": "127.0.0.2"})
    assert result(counting, ip="2001:db8::1") == "pass"
    assert ("ip6.example.com", "A") in counting.asked


# --- default results ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("v=spf1 ip4:203.0.113.0/24 -all", "fail"),
        ("v=spf1 ip4:203.0.113.0/24 ~all", "softfail"),
        ("v=spf1 ip4:203.0.113.0/24 ?all", "neutral"),
        ("v=spf1 ip4:203.0.113.0/24", "neutral"),  # nothing matched, no redirect
        ("v=spf1", "neutral"),
        ("v=spf1 +all", "pass"),
        ("v=spf1 all", "pass"),
        ("v=spf1 -ip4:192.0.2.10 +all", "fail"),
        ("v=spf1 ~ip4:192.0.2.10 +all", "softfail"),
        ("v=spf1 ?ip4:192.0.2.10 +all", "neutral"),
        ("V=SPF1 IP4:192.0.2.10 -ALL", "pass"),
        ("v=spf1  ip4:192.0.2.10   -all ", "pass"),
        ("v=spf1 foo=bar exp=explain.%{d} -all", "fail"),  # unknown modifiers and exp= are ignored
    ],
)
def test_qualifiers_and_defaults(record: str, expected: str) -> None:
    assert result({"example.com": record}) == expected


def test_none_without_a_record() -> None:
    assert spf({}) == SpfResult("none", "example.com")
    others = {"example.com": ["v=spf10 -all", "google-site-verification=abc", "v=spf1x"]}
    assert result(others) == "none"
    assert result({"example.com": ["v=spf1 -all", "unrelated"]}) == "fail"


@pytest.mark.parametrize(
    "mail_from", ["user@localhost", "user@[192.0.2.1]", "user@bad..example", "user@-x.com"]
)
def test_none_for_an_invalid_sender_domain(mail_from: str) -> None:
    counting = Counting({})
    assert spf(counting, mail_from=mail_from) == SpfResult("none", "")
    assert counting.asked == []


# --- permerror ------------------------------------------------------------------------------------


def test_two_records_are_permerror() -> None:
    assert result({"example.com": ["v=spf1 -all", "v=spf1 +all"]}) == "permerror"


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 ip4:192.0.2.300 -all",
        "v=spf1 ip4:192.0.2.0/33 -all",
        "v=spf1 ip4:192.0.2.0/024 -all",
        "v=spf1 ip4:192.0.02.1 -all",
        "v=spf1 ip4 -all",
        "v=spf1 ip6:2001:db8::/129 -all",
        "v=spf1 ip6:192.0.2.1 -all",
        "v=spf1 ip6:fe80::1%eth0 -all",
        "v=spf1 a/33 -all",
        "v=spf1 a//129 -all",
        "v=spf1 a: -all",
        "v=spf1 a:1.2.3.4 -all",  # a top label must not be all digits
        "v=spf1 a:example.com/ -all",
        "v=spf1 mx:%{x}.example.com -all",
        "v=spf1 include -all",
        "v=spf1 include: -all",
        "v=spf1 exists:%{i}.example.com/24 -all",
        "v=spf1 all:example.com",
        "v=spf1 -foo=bar +all",  # modifiers take no qualifier
        "v=spf1 ?exp=x.example +all",
        "v=spf1 redirect=a.example redirect=b.example",
        "v=spf1 exp=a.example exp=b.example -all",
        "v=spf1 +all foo",  # a syntax error after a match still voids the record
        "v=spf1 =foo -all",
        "v=spf1 ip4:192.0.2.10\t-all",
    ],
)
def test_syntax_errors_are_permerror(record: str) -> None:
    assert result({"example.com": record}) == "permerror"


@pytest.mark.parametrize("mechanism", ["foo", "foo:example.com", "ip5:192.0.2.10", "a.b", "include.x:y.com"])
def test_unknown_mechanism_is_permerror(mechanism: str) -> None:
    assert result({"example.com": f"v=spf1 {mechanism} +all"}) == "permerror"


def includes(count: int) -> dict[str, str]:
    records = {f"i{n}.example.net": "v=spf1 -all" for n in range(count)}
    records["example.com"] = "v=spf1 " + " ".join(f"include:i{n}.example.net" for n in range(count)) + " -all"
    return records


def test_ten_dns_terms_are_allowed_eleven_are_permerror() -> None:
    assert result(includes(10)) == "fail"
    eleven = spf(includes(11))
    assert eleven.result == "permerror"
    assert "DNS-querying terms" in eleven.reason


def test_the_term_limit_spans_nested_records_and_counts_every_kind() -> None:
    chain = {f"l{n}.example.net": f"v=spf1 include:l{n + 1}.example.net -all" for n in range(12)}
    chain["example.com"] = "v=spf1 include:l0.example.net ip4:192.0.2.10"
    assert result(chain) == "permerror"
    looping = {"example.com": "v=spf1 include:example.com -all"}
    assert result(looping) == "permerror"
    # a, mx, ptr, exists and redirect count too: 2 + 2 + 2 + 2 + 2 terms, then the redirect is the 11th
    # (the two exists find nothing: two void lookups, which are allowed)
    records = {
        "example.com": "v=spf1 a a mx mx ptr ptr exists:x.test exists:x.test include:e.test include:e.test "
        "redirect=r.test",
        "example.com/A": "203.0.113.1",
        "example.com/MX": "10 example.com",
        "e.test": "v=spf1 -all",
        "r.test": "v=spf1 +all",
    }
    assert result(records, ip="198.51.100.1") == "permerror"
    records["example.com"] = records["example.com"].replace("ptr ptr ", "ptr ")
    assert result(records, ip="198.51.100.1") == "pass"


def test_two_void_lookups_are_allowed_three_are_permerror() -> None:
    two = {"example.com": "v=spf1 a:v1.example.net mx:v2.example.net -all"}
    assert result(two) == "fail"
    three = spf({"example.com": "v=spf1 a:v1.example.net mx:v2.example.net exists:v3.example.net -all"})
    assert three.result == "permerror"
    assert "void" in three.reason


def test_include_without_spf_record_is_permerror() -> None:
    assert result({"example.com": "v=spf1 include:nothing.example.net +all"}) == "permerror"
    plain = {"example.com": "v=spf1 include:plain.example.net +all", "plain.example.net": "hello"}
    assert result(plain) == "permerror"
    broken = {"example.com": "v=spf1 include:bad.example.net +all", "bad.example.net": "v=spf1 foo"}
    assert result(broken) == "permerror"
    assert result({"example.com": "v=spf1 redirect=nothing.example.net"}) == "permerror"


def test_more_than_ten_mx_hosts_is_permerror() -> None:
    def records(hosts: int) -> dict[str, str | list[str]]:
        return {
            "example.com": "v=spf1 mx -all",
            "example.com/MX": [f"{n} mx{n}.example.com" for n in range(hosts)],
            f"mx{hosts - 1}.example.com/A": IP,
        }

    assert result(records(10)) == "pass"
    assert result(records(11)) == "permerror"


# --- temperror ------------------------------------------------------------------------------------


def test_txt_temperror() -> None:
    assert result({"example.com": TxtAnswer.temperror("timeout")}) == "temperror"
    down = TxtAnswer.temperror()
    nested: Records = {"example.com": "v=spf1 include:down.example.net -all", "down.example.net": down}
    assert result(nested) == "temperror"
    redirected: Records = {"example.com": "v=spf1 redirect=down.example.net", "down.example.net": down}
    assert result(redirected) == "temperror"


def test_address_lookup_temperror() -> None:
    down = TxtAnswer.temperror()
    records: dict[str, str | TxtAnswer] = {"example.com": "v=spf1 a -all", "example.com/A": down}
    assert result(records) == "temperror"
    records["example.com"] = "v=spf1 ip4:192.0.2.10 a -all"
    assert result(records) == "pass"  # decided before the failing lookup
    mx: Records = {
        "example.com": "v=spf1 mx -all",
        "example.com/MX": ["10 up.example.com", "20 down.example.com"],
        "up.example.com/A": "203.0.113.1",
        "down.example.com/A": down,
    }
    assert result(mx) == "temperror"
    assert result(mx, ip="203.0.113.1") == "pass"  # a host matched: the other's failure is moot
    assert result({"example.com": "v=spf1 mx -all", "example.com/MX": down}) == "temperror"
    assert result({"example.com": "v=spf1 exists:x.test -all", "x.test/A": down}) == "temperror"


# --- identities, clients, CIDR --------------------------------------------------------------------


@pytest.mark.parametrize("mail_from", ["", "<>", " <> ", None])
def test_null_sender_checks_postmaster_at_helo(mail_from: str | None) -> None:
    records = {
        "mx.sender.test": "v=spf1 exists:%{l}.%{o}.%{d}.%{h}.check.test -all",
        "postmaster.mx.sender.test.mx.sender.test.mx.sender.test.check.test/A": "127.0.0.2",
    }
    checked = spf(records, mail_from=mail_from)
    assert (checked.result, checked.domain) == ("pass", "mx.sender.test")


def test_null_sender_without_a_usable_helo_is_none() -> None:
    for helo in (None, "", "localhost", "[192.0.2.1]", "192.0.2.1"):
        assert spf({}, mail_from="<>", helo=helo) == SpfResult("none", "")


def test_sender_without_local_part_is_postmaster_and_brackets_are_stripped() -> None:
    records = {"example.com": "v=spf1 exists:%{l}.%{d} -all", "postmaster.example.com/A": "127.0.0.2"}
    assert result(records, mail_from="example.com") == "pass"
    assert result(records, mail_from="@example.com") == "pass"
    assert result(records, mail_from="<postmaster@Example.COM>") == "pass"
    assert result(records, mail_from="user@example.com") == "fail"


def test_ipv4_mapped_ipv6_client_is_ipv4() -> None:
    mapped = "::ffff:192.0.2.10"
    assert result({"example.com": "v=spf1 ip4:192.0.2.0/24 -all"}, ip=mapped) == "pass"
    assert result({"example.com": "v=spf1 ip6:::ffff:0:0/96 -all"}, ip=mapped) == "fail"
    counting = Counting({"example.com": "v=spf1 a -all", "example.com/A": IP, "example.com/AAAA": mapped})
    assert result(counting, ip=mapped) == "pass"
    assert ("example.com", "A") in counting.asked
    assert ("example.com", "AAAA") not in counting.asked
    macro = {"example.com": "v=spf1 exists:%{i}.%{v}.x.test -all", "192.0.2.10.in-addr.x.test/A": "127.0.0.2"}
    assert result(macro, ip=mapped) == "pass"


def test_address_families_never_cross() -> None:
    both = {"example.com": "v=spf1 a -all", "example.com/AAAA": "2001:db8::1"}
    assert result(both) == "fail"  # IPv4 client, only AAAA published
    v4 = {"example.com": "v=spf1 a -all", "example.com/A": "192.0.2.10"}
    assert result(v4, ip="2001:db8::1") == "fail"
    assert result({"example.com": "v=spf1 ip4:0.0.0.0/0 -all"}, ip="2001:db8::1") == "fail"
    assert result({"example.com": "v=spf1 ip6:::/0 -all"}) == "fail"
    assert result({"example.com": "v=spf1 ip6:::/0 -all"}, ip="2001:db8::1") == "pass"


@pytest.mark.parametrize(
    ("record", "ip", "expected"),
    [
        ("v=spf1 ip4:192.0.2.0/31 -all", "192.0.2.1", "pass"),
        ("v=spf1 ip4:192.0.2.0/31 -all", "192.0.2.2", "fail"),
        ("v=spf1 ip4:192.0.2.10/32 -all", "192.0.2.10", "pass"),
        ("v=spf1 ip4:192.0.2.10/32 -all", "192.0.2.11", "fail"),
        ("v=spf1 ip4:192.0.2.10 -all", "192.0.2.11", "fail"),
        ("v=spf1 ip4:192.0.2.77/24 -all", "192.0.2.200", "pass"),  # host bits are ignored
        ("v=spf1 ip4:0.0.0.0/0 -all", "203.0.113.9", "pass"),
        ("v=spf1 ip6:2001:db8::1/128 -all", "2001:db8::2", "fail"),
        ("v=spf1 ip6:2001:db8::/127 -all", "2001:db8::1", "pass"),
        ("v=spf1 a/24 -all", "192.0.2.200", "pass"),
        ("v=spf1 a/24 -all", "192.0.3.1", "fail"),
        ("v=spf1 a/0 -all", "203.0.113.9", "pass"),
        ("v=spf1 a//64 -all", "2001:db8::ffff", "pass"),
        ("v=spf1 a/24//64 -all", "2001:db8:0:1::1", "fail"),
        ("v=spf1 a:host.example.net/24//64 -all", "198.51.100.99", "pass"),
        ("v=spf1 a:host.example.net/24//64 -all", "2001:db8:0:1::ffff", "pass"),
        ("v=spf1 a:host.example.net/24//64 -all", "2001:db8:0:2::1", "fail"),
        ("v=spf1 a:host.example.net//64 -all", "198.51.100.99", "fail"),  # IPv4 stays /32
        ("v=spf1 mx//64 -all", "2001:db8:0:3::abcd", "pass"),
        ("v=spf1 mx/16 -all", "203.0.255.1", "pass"),
        ("v=spf1 mx -all", "203.0.113.2", "fail"),
    ],
)
def test_cidr_lengths(record: str, ip: str, expected: str) -> None:
    records = {
        "example.com": record,
        "example.com/A": "192.0.2.10",
        "example.com/AAAA": "2001:db8::1",
        "host.example.net/A": "198.51.100.1",
        "host.example.net/AAAA": "2001:db8:0:1::1",
        "example.com/MX": "10 mx.example.com",
        "mx.example.com/A": "203.0.113.1",
        "mx.example.com/AAAA": "2001:db8:0:3::1",
    }
    assert result(records, ip=ip) == expected


def test_ptr_never_matches_and_looks_nothing_up() -> None:
    counting = Counting({"example.com": "v=spf1 ptr ptr:example.com -all"})
    assert result(counting) == "fail"
    assert counting.asked == [("example.com", "TXT")]


# --- never raises ---------------------------------------------------------------------------------


class Raising:
    async def txt(self, name: str) -> TxtAnswer:
        return await self.query(name, "TXT")

    async def query(self, name: str, rdtype: str) -> TxtAnswer:
        if rdtype == "TXT":
            return TxtAnswer.found(["v=spf1 a mx -all"])
        raise RuntimeError("resolver bug")


def test_never_raises() -> None:
    assert spf({}, ip="not an ip").result == "permerror"
    assert spf({}, ip="fe80::1%eth0").result == "permerror"
    assert spf({"example.com": "v=spf1 " + " ".join(["a:%{l}.x.com"] * 500)}).result == "permerror"
    assert spf({"example.com": "v=spf1 a:" + "%{l}." * 5000 + "x.com"}).result == "neutral"  # truncated
    assert asyncio.run(check_spf(IP, SENDER, HELO, Raising())).result == "temperror"
    junk = {"example.com": "v=spf1 \x00 \udcff %{", "example.net": "v=spf1 include:%{i}%{d}\u00e9.com"}
    assert result(junk) == "permerror"
    assert result(junk, mail_from="x@example.net") == "permerror"
    assert spf({}, mail_from="\udcff@\x00").result == "none"


def test_internal_error_becomes_permerror() -> None:
    class Broken:
        async def txt(self, name: str) -> TxtAnswer:
            return await self.query(name, "TXT")

        async def query(self, name: str, rdtype: str) -> TxtAnswer:
            return TxtAnswer("found", records=None)  # type: ignore[arg-type]

    broken = asyncio.run(check_spf(IP, SENDER, HELO, Broken()))
    assert (broken.result, broken.domain) == ("permerror", "example.com")
    assert broken.reason.startswith("internal error")


# --- macros (RFC 7208 section 7.4) ----------------------------------------------------------------

EXAMPLE = "strong-bad@email.example.com"


def context(ip: str = "192.0.2.3", local: str = "strong-bad") -> MacroContext:
    return MacroContext(ip_address(ip), local, "email.example.com", "email.example.com", "mx.example.org")


@pytest.mark.parametrize(
    ("macro", "expanded"),
    [
        ("%{s}", EXAMPLE),
        ("%{o}", "email.example.com"),
        ("%{d}", "email.example.com"),
        ("%{d4}", "email.example.com"),
        ("%{d3}", "email.example.com"),
        ("%{d2}", "example.com"),
        ("%{d1}", "com"),
        ("%{dr}", "com.example.email"),
        ("%{d2r}", "example.email"),
        ("%{l}", "strong-bad"),
        ("%{l-}", "strong.bad"),
        ("%{lr}", "strong-bad"),
        ("%{lr-}", "bad.strong"),
        ("%{l1r-}", "strong"),
        ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
        ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
        ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
        ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
        ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
        ("%{h}.%{p}", "mx.example.org.unknown"),
        ("a%%b%_c%-d", "a%b c%20d"),
        ("%{L}", "strong-bad"),
        ("%{d2R.}", "example.email"),
        ("%{d2r+}", "email.example.com"),  # split on "+" only: one part
        ("%{i2}", "2.3"),
    ],
)
def test_rfc_macro_examples(macro: str, expanded: str) -> None:
    assert expand(macro, context()) == expanded


def test_ipv6_macro_example() -> None:
    expanded = expand("%{ir}.%{v}._spf.%{d2}", context("2001:db8::cb01"))
    assert expanded == "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
    assert expand("%{i}", context("2001:db8::1")).startswith("2.0.0.1.0.d.b.8.")


def test_upper_case_macros_are_url_escaped() -> None:
    ctx = context(local="a/b c")
    assert expand("%{L}", ctx) == "a%2Fb%20c"
    assert expand("%{l}", ctx) == "a/b c"


@pytest.mark.parametrize(
    "bad", ["%", "%{", "%{d", "%{x}", "%{c}", "%{r}", "%{t}", "%{d0}", "%{dq}", "%x", "a b", "é"]
)
def test_invalid_macros(bad: str) -> None:
    with pytest.raises(MacroError):
        expand(bad, context())


def test_domain_spec_end_and_length() -> None:
    assert expand_domain("%{d2}", context()) == "example.com"
    assert expand_domain("_spf.example.com.", context()) == "_spf.example.com."
    for bad in ("example", "example.123", "example.com/24", "%{d}.", ""):
        with pytest.raises(MacroError):
            expand_domain(bad, context())
    long = expand_domain("%{l}." * 60 + "example.com", context(local="a" * 20))
    assert len(long) <= 253
    assert long.endswith("." + "a" * 20 + ".example.com")
    assert long.startswith("a" * 20 + ".")  # whole labels were dropped from the left
    assert len(long) > 253 - 21


# --- over a loopback DNS server -------------------------------------------------------------------


def test_over_real_dns_with_cache() -> None:
    server = FakeDns(
        records={
            "example.com": ['"v=spf1 include:_spf.example.net mx:example.com/24 -all"'],
            "_spf.example.net": ['"v=spf1 a:out.example.net ip6:2001:db8:1::/48 ~all"'],
        },
        typed={
            ("out.example.net", "A"): ["198.51.100.1"],
            ("example.com", "MX"): ["10 mx.example.com.", "20 MX2.Example.COM."],
            ("mx2.example.com", "A"): ["192.0.2.1"],
        },
    )

    async def body(port: int) -> None:
        resolver = CachingResolver(DnsResolver(nameservers=["127.0.0.1"], port=port))
        first = await check_spf(IP, SENDER, HELO, resolver)
        assert (first.result, first.domain) == ("pass", "example.com")  # mx2's /24
        assert (await check_spf("198.51.100.1", SENDER, HELO, resolver)).result == "pass"  # include's a
        assert (await check_spf("2001:db8:1::5", SENDER, HELO, resolver)).result == "pass"  # include's ip6
        assert (await check_spf("203.0.113.1", SENDER, HELO, resolver)).result == "fail"

    with_server(server, body)
    for name, rdtype in [("example.com", "TXT"), ("_spf.example.net", "TXT"), ("out.example.net", "A"),
                         ("example.com", "MX"), ("mx2.example.com", "A")]:
        assert server.count(name, rdtype) == 1, (name, rdtype)  # the later checks were answered by the cache


def test_over_real_dns_servfail_is_temperror() -> None:
    server = FakeDns(
        records={"example.com": ['"v=spf1 ip4:203.0.113.1 a:broken.example.net -all"']},
        servfail={"broken.example.net"},
    )

    async def body(port: int) -> None:
        resolver = CachingResolver(DnsResolver(nameservers=["127.0.0.1"], port=port, lifetime=1.0))
        start = time.monotonic()
        assert (await check_spf(IP, SENDER, HELO, resolver)).result == "temperror"
        assert (await check_spf("203.0.113.1", SENDER, HELO, resolver)).result == "pass"
        assert time.monotonic() - start < 2.0

    with_server(server, body)
    assert server.count("broken.example.net", "A") >= 1
