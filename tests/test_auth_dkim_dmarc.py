"""DKIM verification and DMARC evaluation (milter.auth) on real signatures and fixture messages.

Messages are signed with dkimpy and an RSA key generated per test session with openssl; the public key
is "published" through a StaticResolver, so nothing here touches the network.
"""

from __future__ import annotations

import asyncio
import base64
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import authres
import pytest
from auth_support import SELECTOR, generate_key, sign
from hypothesis import given
from hypothesis import strategies as st

import milter.auth.message as message_module
from milter.auth import (
    Answers,
    AuthResults,
    SpfResult,
    StaticResolver,
    TxtAnswer,
    authenticate,
    evaluate,
    fetch,
    parse_record,
    plan,
    trusted_spf_from_headers,
)
from milter.auth.message import header_fields

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
INVOICE = FIXTURES / "bec" / "ham-vendor-invoice.eml"  # real fixture; its From is replaced per test
GMAIL_RELAYED = FIXTURES / "sample" / "modern-bulk-ham-ham-000033.eml"  # real DKIM + mx.google.com A-R
Records = Mapping[str, str | Sequence[str] | TxtAnswer]


@pytest.fixture(scope="session")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    """(PKCS#1 PEM private key, DKIM key record) for a fresh 1024-bit key."""
    return generate_key(tmp_path_factory.mktemp("dkim"))


def message(from_addr: str = "billing@example.com", body_from: Path = INVOICE) -> bytes:
    raw = body_from.read_bytes()
    return re.sub(rb"(?m)^From: .*$", f"From: Billing <{from_addr}>".encode(), raw, count=1)


def run(raw: bytes, records: Records, spf: SpfResult | None = None) -> AuthResults:
    the_plan = plan(raw)
    answers = asyncio.run(fetch(the_plan, StaticResolver(records), timeout=1.0))
    return evaluate(raw, the_plan, answers, spf)


def key_name(domain: str = "mail.example.com") -> str:
    return f"{SELECTOR}._domainkey.{domain}"


# ---- plan ------------------------------------------------------------------------------------------


def test_plan_names_key_and_dmarc_lookups(rsa_key: tuple[bytes, str]) -> None:
    raw = sign(message("billing@news.example.com"), rsa_key[0])
    p = plan(raw)
    assert (p.from_domain, p.org_domain) == ("news.example.com", "example.com")
    assert [(s.index, s.domain, s.selector) for s in p.signatures] == [(0, "mail.example.com", SELECTOR)]
    assert p.names == (key_name(), "_dmarc.news.example.com", "_dmarc.example.com")
    assert plan(sign(message(), rsa_key[0])).names == (key_name(), "_dmarc.example.com")


def test_plan_handles_crlf_folding_and_ignores_the_body() -> None:
    raw = (
        b'Received: x\r\nFrom: "Some, Body"\r\n <Some.One@Sub.Example.CO.UK>\r\n'
        b"DKIM-Signature: v=1; a=rsa-sha256; d=Example.co.uk;\r\n\ts=k1; h=from; bh=; b=\r\n"
        b"\r\nFrom: evil@attacker.test\r\nDKIM-Signature: d=attacker.test; s=x\r\n"
    )
    p = plan(raw)
    assert (p.from_domain, p.org_domain) == ("sub.example.co.uk", "example.co.uk")
    assert p.names == ("k1._domainkey.example.co.uk", "_dmarc.sub.example.co.uk", "_dmarc.example.co.uk")
    assert plan(raw.replace(b"\r\n", b"\n")) == p


@pytest.mark.parametrize(
    ("from_lines", "problem"),
    [
        (b"", "no From header"),
        (b"From: a@example.com\nFrom: b@example.com\n", "several From headers"),
        (b"From: a@example.com, b@example.org\n", "several From addresses"),
        (b"From: undisclosed\n", "no usable From domain"),
        (b"From: a@[192.0.2.1]\n", "no usable From domain"),
    ],
)
def test_plan_needs_exactly_one_from_domain(from_lines: bytes, problem: str) -> None:
    p = plan(b"Subject: x\n" + from_lines + b"\nbody\n")
    assert (p.from_domain, p.org_domain, p.from_problem) == (None, None, problem)
    assert not any(n.startswith("_dmarc.") for n in p.names)


@pytest.mark.parametrize(
    "from_line",
    [
        b"From: Smith, John <john@mail.example.com>\n",  # an unquoted comma in a display name
        b"From: x, Jane Smith <john@mail.example.com>\n",  # the same, written to dodge DMARC
        b"From: Microsoft account team ,_<john@mail.example.com>\n",
    ],
)
def test_a_bare_word_before_the_one_address_leaves_that_address_to_dmarc(from_line: bytes) -> None:
    p = plan(b"Subject: x\n" + from_line + b"\nbody\n")
    assert (p.from_domain, p.org_domain, p.from_problem) == ("mail.example.com", "example.com", "")
    assert "_dmarc.mail.example.com" in p.names and "_dmarc.example.com" in p.names


def test_plan_caps_signatures_and_keeps_malformed_ones() -> None:
    good = [f"DKIM-Signature: v=1; d=d{i}.example; s=s{i}; b=x\n".encode() for i in range(7)]
    bad = [b"DKIM-Signature: v=1; s=nodomain\n", b"DKIM-Signature: garbage without tags\n"]
    p = plan(bad[0] + b"".join(good) + bad[1] + b"From: a@example.com\n\nbody\n")
    assert [s.index for s in p.signatures if not s.error] == [1, 2, 3, 4, 5]
    assert [(s.index, s.error) for s in p.signatures if s.error] == [
        (0, "missing or bad d="),
        (8, "bad tag list"),
    ]
    assert len([n for n in p.names if "._domainkey." in n]) == 5


# ---- DKIM ------------------------------------------------------------------------------------------


def test_good_signature_passes_and_aligns_relaxed(rsa_key: tuple[bytes, str]) -> None:
    raw = sign(message(), rsa_key[0])
    results = run(raw, {key_name(): rsa_key[1], "_dmarc.example.com": "v=DMARC1; p=reject; pct=50"})
    assert [(r.domain, r.selector, r.result) for r in results.dkim] == [
        ("mail.example.com", SELECTOR, "pass")
    ]
    assert results.dkim_pass_domains == ("mail.example.com",)
    d = results.dmarc
    expected = ("pass", "example.com", "reject", "dkim", False, 50, "")
    assert (d.result, d.from_domain, d.policy, d.aligned_by, d.spf_evaluated, d.pct, d.reason) == expected


def test_strict_dkim_alignment_rejects_a_subdomain_signature(rsa_key: tuple[bytes, str]) -> None:
    raw = sign(message(), rsa_key[0])
    results = run(raw, {key_name(): rsa_key[1], "_dmarc.example.com": "v=DMARC1; p=quarantine; adkim=s"})
    assert results.dkim[0].result == "pass"
    assert (results.dmarc.result, results.dmarc.policy, results.dmarc.aligned_by) == (
        "fail",
        "quarantine",
        None,
    )


def test_signature_of_another_domain_does_not_align(rsa_key: tuple[bytes, str]) -> None:
    raw = sign(message(), rsa_key[0], domain="mailer.esp.test")
    results = run(raw, {key_name("mailer.esp.test"): rsa_key[1], "_dmarc.example.com": "v=DMARC1; p=reject"})
    assert results.dkim[0].result == "pass"
    assert results.dmarc.result == "fail"


def test_body_altered_after_signing_fails(rsa_key: tuple[bytes, str]) -> None:
    raw = sign(message(), rsa_key[0])
    assert b"$3,412.50" in raw
    results = run(
        raw.replace(b"$3,412.50", b"$9,412.50"),
        {key_name(): rsa_key[1], "_dmarc.example.com": "v=DMARC1; p=reject"},
    )
    assert (results.dkim[0].result, results.dkim[0].reason) == ("fail", "body hash mismatch")
    assert (results.dmarc.result, results.dmarc.policy) == ("fail", "reject")


def test_signed_header_altered_fails(rsa_key: tuple[bytes, str]) -> None:
    raw = sign(message(), rsa_key[0]).replace(b"Subject: Invoice INV-88213", b"Subject: Invoice INV-99999")
    results = run(raw, {key_name(): rsa_key[1]})
    assert (results.dkim[0].result, results.dkim[0].reason) == ("fail", "signature did not verify")


def test_lf_and_crlf_forms_of_a_message_verify_alike(rsa_key: tuple[bytes, str]) -> None:
    raw = sign(message(), rsa_key[0])
    crlf = re.sub(rb"\r?\n", b"\r\n", raw)
    assert run(crlf, {key_name(): rsa_key[1]}).dkim[0].result == "pass"


@pytest.mark.parametrize(
    ("key", "result", "reason"),
    [
        (None, "permerror", "no key for signature"),
        ("v=DKIM1; k=rsa; p=", "permerror", "bad key"),
        ("v=DKIM1; k=rsa; p=bm90IGEga2V5", "permerror", "bad key"),
        (TxtAnswer.temperror("timeout"), "temperror", "key lookup failed: timeout"),
        # pynacl is not installed: an Ed25519 key cannot be used, which is no evidence of forgery
        ("v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=", "neutral", "unsupported key"),
    ],
)
def test_key_problems(
    rsa_key: tuple[bytes, str], key: str | TxtAnswer | None, result: str, reason: str
) -> None:
    records: dict[str, str | TxtAnswer] = {"_dmarc.example.com": "v=DMARC1; p=reject"}
    if key is not None:
        records[key_name()] = key
    results = run(sign(message(), rsa_key[0]), records)
    assert results.dkim[0].result == result
    assert results.dkim[0].reason.startswith(reason)
    # an aligned signature whose key could not be fetched leaves DMARC undecided, not failed
    assert results.dmarc.result == ("temperror" if result == "temperror" else "fail")


def test_key_shorter_than_1024_bits_is_permerror(tmp_path: Path) -> None:
    pem, record = generate_key(tmp_path, bits=512)
    results = run(sign(message(), pem), {key_name(): record})
    assert (results.dkim[0].result, results.dkim[0].reason) == ("permerror", "public key too small: 512")


def test_unaligned_temperror_does_not_hold_dmarc_back(rsa_key: tuple[bytes, str]) -> None:
    raw = sign(message(), rsa_key[0], domain="esp.test")
    results = run(
        raw, {key_name("esp.test"): TxtAnswer.temperror(), "_dmarc.example.com": "v=DMARC1; p=reject"}
    )
    assert results.dkim[0].result == "temperror"
    assert results.dmarc.result == "fail"


def test_key_not_in_answers_is_temperror(rsa_key: tuple[bytes, str]) -> None:
    raw = sign(message(), rsa_key[0])
    results = evaluate(raw, plan(raw), Answers.of({}))
    assert (results.dkim[0].result, results.dkim[0].reason) == ("temperror", "key not fetched")
    assert results.dmarc.result == "temperror"


def test_one_good_signature_among_broken_ones_passes(rsa_key: tuple[bytes, str]) -> None:
    raw = sign(message(), rsa_key[0])
    raw = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=k; h=from; bh=AAAA; b=AAAA\n" + raw
    raw = b"DKIM-Signature: v=1; a=rsa-sha256; s=nodomain\n" + raw
    results = run(
        raw,
        {
            key_name(): rsa_key[1],
            "k._domainkey.example.com": rsa_key[1],
            "_dmarc.example.com": "v=DMARC1; p=reject",
        },
    )
    assert [r.result for r in results.dkim] == ["permerror", "fail", "pass"]
    assert results.dmarc.result == "pass"


@pytest.mark.parametrize(
    "header",
    [
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=k; h=from; b=AAAA",  # no bh=
        b"DKIM-Signature: v=1; a=rsa-md5; d=example.com; s=k; h=from; bh=AAAA; b=AAAA",  # unknown a=
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=k; h=from; bh=AAAA; b=A!!A",  # bad base64
        b"DKIM-Signature: v=1; v=1; d=example.com; s=k",  # duplicate tag
        b"DKIM-Signature: d=exa mple.com; s=k",  # bad domain
        b"DKIM-Signature: d=example.com; s=",  # empty selector
        b"DKIM-Signature: \xff\xfe\x00",
    ],
)
def test_malformed_signatures_are_permerror_and_never_raise(
    rsa_key: tuple[bytes, str], header: bytes
) -> None:
    raw = header + b"\n" + message()
    results = run(raw, {"k._domainkey.example.com": rsa_key[1], "_dmarc.example.com": "v=DMARC1; p=reject"})
    assert [r.result for r in results.dkim] == ["permerror"]
    assert results.dmarc.result == "fail"


def test_real_fixture_signature_without_its_key_is_permerror() -> None:
    raw = GMAIL_RELAYED.read_bytes()
    results = run(raw, {})
    assert [(r.domain, r.selector, r.result) for r in results.dkim] == [
        ("peteforamerica.com", "ngpweb3", "permerror")
    ]
    assert (results.dmarc.result, results.dmarc.from_domain) == ("none", "peteforamerica.com")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\n\n",
        b"\x00\xff\xfe garbage \x80" * 50,
        b"no headers at all, just text",
        b" leading continuation\nFrom: a@example.com\n\nx",
        b"From: a@example.com\nDKIM-Signature: v=1; d=example.com; s=k\n",  # no blank line, no body
        b"From: a@example.com\nbroken header line\nDKIM-Signature: v=1; d=example.com; s=k; h=from\n\nbody",
    ],
)
def test_garbage_never_raises(raw: bytes) -> None:
    results = run(raw, {"_dmarc.example.com": "v=DMARC1; p=reject"})
    assert results.dmarc.result in {"none", "fail"}
    assert all(r.result == "permerror" for r in results.dkim)


@pytest.mark.parametrize("path", sorted((FIXTURES / "edge").glob("*.eml")), ids=lambda p: p.name)
def test_edge_fixtures_never_raise(path: Path) -> None:
    raw = path.read_bytes()
    results = asyncio.run(
        authenticate(raw, StaticResolver({}), timeout=0.5, trusted_authserv_ids=["mx.test"])
    )
    assert results.dmarc.result in {"none", "fail", "permerror"}
    assert "dmarc=" in results.header_value("mx.test")


# ---- DMARC policy discovery ------------------------------------------------------------------------


def test_no_signature_and_reject_policy_fails() -> None:
    results = run(message(), {"_dmarc.example.com": "v=DMARC1; p=reject; rua=mailto:d@example.com"})
    assert results.dkim == ()
    assert (results.dmarc.result, results.dmarc.policy, results.dmarc.aligned_by) == ("fail", "reject", None)


def test_no_record_is_none_and_unrelated_txt_is_not_a_record() -> None:
    assert run(message(), {}).dmarc.result == "none"
    other = run(message(), {"_dmarc.example.com": ["google-site-verification=abc", "v=spf1 -all"]})
    assert (other.dmarc.result, other.dmarc.policy) == ("none", None)


def test_org_domain_fallback_uses_sp_then_p() -> None:
    raw = message("billing@eu.news.example.com")
    with_sp = run(raw, {"_dmarc.example.com": "v=DMARC1; p=reject; sp=quarantine"})
    assert (with_sp.dmarc.result, with_sp.dmarc.policy) == ("fail", "quarantine")
    without_sp = run(raw, {"_dmarc.example.com": "v=dmarc1; p=reject"})
    assert without_sp.dmarc.policy == "reject"
    own = run(
        raw, {"_dmarc.eu.news.example.com": "v=DMARC1; p=none", "_dmarc.example.com": "v=DMARC1; p=reject"}
    )
    assert own.dmarc.policy == "none"


def test_record_lookup_temperror_is_temperror_and_stops_fallback() -> None:
    raw = message("billing@news.example.com")
    results = run(
        raw, {"_dmarc.news.example.com": TxtAnswer.temperror(), "_dmarc.example.com": "v=DMARC1; p=reject"}
    )
    assert (results.dmarc.result, results.dmarc.policy) == ("temperror", None)


@pytest.mark.parametrize(
    ("records", "result", "policy"),
    [
        (["v=DMARC1; p=reject", "v=DMARC1; p=none"], "permerror", None),
        (["v=DMARC1; p=bogus"], "permerror", None),
        (["v=DMARC1; rua=mailto:agg@example.com"], "fail", "none"),  # RFC 7489 6.6.3: acts as p=none
        (["v=DMARC1; p=Quarantine; sp=bogus; junk; pct=500"], "fail", "quarantine"),
    ],
)
def test_record_syntax(records: list[str], result: str, policy: str | None) -> None:
    results = run(message(), {"_dmarc.example.com": records})
    assert (results.dmarc.result, results.dmarc.policy) == (result, policy)


def test_parse_record_tags() -> None:
    record = parse_record("v=DMARC1;p=reject;sp=none;adkim=s;aspf=S;pct=25;fo=1")
    assert record is not None
    assert (record.policy, record.subdomain_policy, record.adkim, record.aspf, record.pct) == (
        "reject",
        "none",
        "s",
        "s",
        25,
    )
    assert parse_record("v=DMARC1; p=") is None


# ---- trusted SPF -----------------------------------------------------------------------------------


def test_trusted_spf_pass_aligns_dmarc() -> None:
    records = {"_dmarc.example.com": "v=DMARC1; p=reject"}
    results = run(message(), records, SpfResult("pass", "bounces.example.com"))
    assert (results.dmarc.result, results.dmarc.aligned_by, results.dmarc.spf_evaluated) == (
        "pass",
        "spf",
        True,
    )
    strict = run(
        message(),
        {"_dmarc.example.com": "v=DMARC1; p=reject; aspf=s"},
        SpfResult("pass", "bounces.example.com"),
    )
    assert strict.dmarc.result == "fail"
    unaligned = run(message(), records, SpfResult("pass", "esp.test"))
    assert (unaligned.dmarc.result, unaligned.dmarc.spf_evaluated) == ("fail", True)
    softfail = run(message(), records, SpfResult("softfail", "example.com"))
    assert softfail.dmarc.result == "fail"


def test_spf_taken_only_from_trusted_authserv_ids() -> None:
    raw = GMAIL_RELAYED.read_bytes()
    assert trusted_spf_from_headers(raw, ["MX.Google.com"]) == SpfResult("pass", "bounce.myngp.com")
    assert trusted_spf_from_headers(raw, ["mx.example.net"]) is None
    assert trusted_spf_from_headers(raw, []) is None


def test_forged_or_malformed_authentication_results_are_ignored() -> None:
    head = (
        b"Authentication-Results: mx.attacker.test; spf=pass smtp.mailfrom=example.com\n"
        b"Authentication-Results: mx.ours.test; spf=pass smtp.mailfrom=;;; (((\n"
        b"Authentication-Results: mx.ours.test; dkim=pass header.d=example.com\n"
        b"Authentication-Results: mx.ours.test; spf=pass smtp.mailfrom=<> smtp.helo=example.com\n"
    )
    tail = b"From: a@example.com\n\nbody\n"
    helo = b"Authentication-Results: mx.ours.test; spf=softfail smtp.helo=relay.example.org\n"
    assert trusted_spf_from_headers(head + helo + tail, ["mx.ours.test"]) == SpfResult(
        "softfail", "relay.example.org"
    )
    assert trusted_spf_from_headers(head + tail, ["mx.ours.test"]) is None
    results = asyncio.run(
        authenticate(head + tail, StaticResolver({"_dmarc.example.com": "v=DMARC1; p=reject"}))
    )
    assert (results.spf, results.dmarc.result, results.dmarc.spf_evaluated) == (None, "fail", False)


# ---- rendering, end to end, pickling ---------------------------------------------------------------


def test_header_value_round_trips_through_authres(rsa_key: tuple[bytes, str]) -> None:
    raw = sign(message(), rsa_key[0])
    records = {key_name(): rsa_key[1], "_dmarc.example.com": "v=DMARC1; p=reject"}
    results = run(raw, records, SpfResult("pass", "example.com"))
    value = results.header_value("mx.example.net")
    parsed = authres.AuthenticationResultsHeader.parse_value(value)
    assert parsed.authserv_id == "mx.example.net"
    clauses = {r.method: r for r in parsed.results}
    assert (clauses["dkim"].result, clauses["dkim"].header_d) == ("pass", "mail.example.com")
    assert (clauses["spf"].result, clauses["spf"].smtp_mailfrom) == ("pass", "example.com")
    assert "dmarc=pass (p=reject) header.from=example.com" in value
    assert results.summary() == (
        "dkim=pass(mail.example.com) dmarc=pass(p=reject from=example.com via=dkim) spf=pass(example.com)"
    )


def test_header_value_with_failures_and_no_signature_parses(rsa_key: tuple[bytes, str]) -> None:
    raw = sign(message(), rsa_key[0]).replace(b"$3,412.50", b"$1")
    value = run(raw, {key_name(): rsa_key[1]}).header_value("mx.example.net")
    assert 'dkim=fail reason="body hash mismatch" header.d=mail.example.com' in value
    authres.AuthenticationResultsHeader.parse_value(value)  # must be valid syntax
    unsigned = run(message(), {}).header_value("mx")
    assert unsigned == "mx; dkim=none; dmarc=none header.from=example.com; arc=none"
    assert run(b"Subject: no from\n\n", {}).summary() == "dkim=none dmarc=none"


def test_authenticate_end_to_end_and_results_pickle(rsa_key: tuple[bytes, str]) -> None:
    raw = sign(message(), rsa_key[0])
    resolver = StaticResolver({key_name(): rsa_key[1], "_dmarc.example.com": "v=DMARC1; p=reject"})
    results = asyncio.run(authenticate(raw, resolver))
    assert (results.dkim[0].result, results.dmarc.result) == ("pass", "pass")
    the_plan = plan(raw)
    answers = asyncio.run(fetch(the_plan, resolver, 1.0))
    assert pickle.loads(pickle.dumps((the_plan, answers, results))) == (the_plan, answers, results)


_HEADER_END_REFERENCE = re.compile(rb"\r?\n\r?\n")


def _header_fields_reference(raw: bytes) -> list[tuple[str, str]]:
    """header_fields as it read with regular expressions for the blank line and the line ends."""
    if raw.startswith((b"\n", b"\r\n")):
        block = b""
    else:
        m = _HEADER_END_REFERENCE.search(raw, 0, message_module._MAX_HEADER_BYTES)
        block = raw[: m.start()] if m else raw[: message_module._MAX_HEADER_BYTES]
    fields: list[tuple[str, list[bytes]]] = []
    for line in re.split(rb"\r?\n", block):
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].append(line)
            continue
        m = message_module._FIELD.match(line)
        if m is not None:
            fields.append((m.group(1).decode("ascii").lower(), [line[m.end() :]]))
    return [(name, b"".join(parts).decode("utf-8", "replace").strip()) for name, parts in fields]


@given(st.lists(st.sampled_from([b"From: a@b.example", b"X:", b" folded", b"\tmore", b"\r", b"\n", b"\r\n",
                                 b"\n\r\n", b"\r\r\n", b"junk", b":", b"DKIM-Signature: v=1; d=x", b"\xff"]),
                max_size=30))
def test_header_fields_reads_as_the_regular_expressions_did(pieces: list[bytes]) -> None:
    """The blank line and the line ends found with bytes methods: the same fields as the patterns
    gave, for every mix of LF, CRLF, lone CR, folding and junk."""
    raw = b"".join(pieces)
    assert header_fields(raw) == _header_fields_reference(raw)


def test_header_fields_stop_at_the_first_blank_line_and_at_the_budget() -> None:
    assert header_fields(b"A: 1\r\nB: 2\r\n\r\nC: 3\r\n") == [("a", "1"), ("b", "2")]
    assert header_fields(b"A: 1\nB: 2\n\nC: 3\n") == [("a", "1"), ("b", "2")]
    assert header_fields(b"A: 1\r\n\nC: 3") == [("a", "1")]
    assert header_fields(b"A: 1\r\n \r\nC: 3") == [("a", "1"), ("c", "3")]  # a blank-looking fold
    huge = b"A: 1\r\n" + b"X: " + b"y" * (message_module._MAX_HEADER_BYTES) + b"\r\n\r\nB: 2"
    assert [name for name, _ in header_fields(huge)] == ["a", "x"]
    assert header_fields(huge) == _header_fields_reference(huge)


def _der_len(n: int) -> bytes:
    if n < 128:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _rsa_record(modulus: int, exponent: int) -> str:
    """A DKIM key record of an RSA public key (PKCS#1 RSAPublicKey, which dkimpy reads)."""
    def der_int(v: int) -> bytes:
        b = v.to_bytes((v.bit_length() + 8) // 8, "big")
        return b"\x02" + _der_len(len(b)) + b

    body = der_int(modulus) + der_int(exponent)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(b"\x30" + _der_len(len(body)) + body).decode()


@pytest.mark.parametrize(
    ("bits", "exponent", "why"),
    [
        (8192, 65537, "RSA key of 8192 bits"),
        (2048, (1 << 2047) | 1, "unusable RSA public exponent"),  # a huge exponent: minutes of pow()
        (2048, 65536, "unusable RSA public exponent"),  # even
    ],
)
def test_keys_that_only_cost_time_are_refused_before_verifying(
    tmp_path: Path, bits: int, exponent: int, why: str
) -> None:
    """RFC 8301's 4096-bit bound and an odd exponent up to 2**32: a sender's key of huge modulus and
    exponent held a worker for seconds per signature (hours for a longer one), past scan_timeout."""
    from milter.auth.dkim import check_key

    modulus = (1 << (bits - 1)) | 1 | (12345 << 8)
    with pytest.raises(ValueError, match=why):
        check_key(key_name(), _rsa_record(modulus, exponent))
    pem, record = generate_key(tmp_path, 2048)
    check_key(key_name(), record)  # a real key passes
    raw = sign(message(), pem)
    hostile = run(raw, {key_name(): _rsa_record(modulus, exponent), "_dmarc.example.com": "v=DMARC1; p=none"})
    assert hostile.dkim[0].result == "permerror" and hostile.dkim[0].reason.startswith("bad key")
    assert run(raw, {key_name(): record}).dkim[0].result == "pass"
