"""ARC (RFC 8617) validation (milter.auth.arc) on real chains, and the DMARC rule's use of it.

Every chain here is built with dkimpy's `arc_sign` and RSA keys generated per module: the author's
domain DKIM-signs a message, a mailing list (lists.example.org) records what it verified in an
Authentication-Results header, rewrites the Subject and appends a footer (which breaks the author's
signature, so DMARC fails for us), and ARC-seals the result with its own key; a second hop
(relay.example.net) may seal it again. Keys are served by a StaticResolver, and the reference
outcomes once more by a real DNS server on loopback through the gateway's own resolver.
"""

from __future__ import annotations

import asyncio
import pickle
import re
from collections.abc import Mapping, Sequence

import authres
import pytest
from auth_support import SELECTOR, FakeDns, arc_seal, generate_key, sign, with_server
from test_policy_auth import decide

from milter.auth import (
    ArcResult,
    AuthResults,
    DnsResolver,
    StaticResolver,
    TxtAnswer,
    authenticate,
    evaluate,
    evaluate_evidence,
    fetch,
    gather,
    plan,
)
from milter.auth.arc import parse_recorded, verify_arc
from milter.auth.message import MAX_ARC_SETS
from milter.config import PolicyConfig
from milter.types import Action, Verdict

Records = Mapping[str, str | Sequence[str] | TxtAnswer]
AUTHOR_KEY = f"{SELECTOR}._domainkey.mail.example.com"
LIST, LIST_KEY = "lists.example.org", "fwd._domainkey.lists.example.org"
RELAY, RELAY_KEY = "relay.example.net", "hop2._domainkey.relay.example.net"
DMARC = "_dmarc.example.com"
# What the list saw on arrival: the author's signature verified, so DMARC passed.
LIST_SAW = "dkim=pass header.d=mail.example.com header.s=sel2024; dmarc=pass header.from=example.com; " \
    "spf=pass smtp.mailfrom=bounces@example.com"
FORGIVEN = f"DMARC failed after forwarding; trusted ARC sealer {LIST} recorded dmarc=pass"
QUARANTINE_FAILURES = PolicyConfig(dmarc_fail_action="quarantine")


Keys = dict[str, tuple[bytes, str]]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """(PKCS#1 PEM, key record) of the author's, the list's and the relay's keys."""
    return {name: generate_key(tmp_path_factory.mktemp(name)) for name in ("author", "list", "relay")}


def records(keys: Keys, changed: Records | None = None) -> Records:
    """Every key published and example.com's p=reject, with `changed` names answering otherwise."""
    published: dict[str, str | Sequence[str] | TxtAnswer] = {
        AUTHOR_KEY: keys["author"][1], LIST_KEY: keys["list"][1], RELAY_KEY: keys["relay"][1],
        DMARC: "v=DMARC1; p=reject",
    }
    return {**published, **(changed or {})}


def original(keys: Keys) -> bytes:
    raw = (
        b"From: Jane Smith <jane@example.com>\r\nTo: team@lists.example.org\r\nSubject: Quarterly figures\r\n"
        b"Date: Mon, 1 Jan 2024 09:00:00 +0000\r\nMessage-ID: <q1@example.com>\r\n\r\n"
        b"Hello all,\r\nthe figures are attached to the wiki page.\r\nJane\r\n"
    )
    return sign(raw, keys["author"][0])


def through_list(keys: Keys, saw: str = LIST_SAW) -> bytes:
    """The author's message as a mailing list relays it: Subject tag and footer, then sealed."""
    raw = original(keys).replace(b"Subject: Quarterly", b"Subject: [team] Quarterly")
    raw += b"-- \r\nteam mailing list\r\n"
    return arc_seal(raw, keys["list"][0], LIST, "fwd", saw)


def through_relay(keys: Keys, raw: bytes, saw: str = "arc=pass; dmarc=fail header.from=example.com") -> bytes:
    return arc_seal(raw, keys["relay"][0], RELAY, "hop2", saw)


def run(raw: bytes, published: Records, trusted: Sequence[str] = (LIST,)) -> AuthResults:
    the_plan = plan(raw)
    answers = asyncio.run(fetch(the_plan, StaticResolver(published), timeout=1.0))
    return evaluate(raw, the_plan, answers, None, trusted)


def altered_seal(raw: bytes, instance: int) -> bytes:
    """`raw` with a timestamp in ARC-Seal i=`instance` that its sealer did not sign."""
    field = arc_field(raw, b"ARC-Seal", instance)
    altered = re.sub(rb"t=(\d+)", lambda m: b"t=" + str(int(m.group(1)) - 60).encode(), field, count=1)
    assert altered != field
    return raw.replace(field, altered)


def arc_field(raw: bytes, name: bytes, instance: int) -> bytes:
    """The whole (folded) header field `name` with i=`instance`."""
    m = re.search(rb"(?mi)^" + name + rb": i=" + str(instance).encode() + rb";.*?\r\n(?![ \t])", raw, re.S)
    assert m is not None, (name, instance)
    return m.group(0)


# ---- plan ------------------------------------------------------------------------------------------


def test_plan_lists_every_sealer_key_once_beside_dkim_and_dmarc(keys: Keys) -> None:
    two_hops = through_relay(keys, through_list(keys))
    p = plan(two_hops)
    assert [(s.instance, s.seal_domain, s.ams_domain, s.cv) for s in p.arc.sets] == [
        (1, LIST, LIST, "none"), (2, RELAY, RELAY, "pass"),
    ]
    assert p.arc.sealer == RELAY and not p.arc.error
    # the seal and message signature of a hop share their key: one lookup each, fetched with the rest
    assert p.names == (AUTHOR_KEY, LIST_KEY, RELAY_KEY, DMARC)
    assert p.needs_crypto
    assert not plan(original(keys)).arc.present and plan(original(keys)).names == (AUTHOR_KEY, DMARC)


# ---- reference outcomes ----------------------------------------------------------------------------


def test_one_hop_chain_passes_though_dmarc_fails_directly(keys: Keys) -> None:
    results = run(through_list(keys), records(keys))
    assert [r.result for r in results.dkim] == ["fail"]  # the list's footer broke the author's signature
    assert (results.dmarc.result, results.dmarc.policy) == ("fail", "reject")
    arc = results.arc
    assert (arc.result, arc.instances, arc.sealer, arc.trusted, arc.reason) == ("pass", 1, LIST, True, "")
    assert arc.recorded_by == LIST
    assert {(r.method, r.result, r.domain) for r in arc.recorded} == {
        ("dkim", "pass", "mail.example.com"),
        ("dmarc", "pass", "example.com"),
        ("spf", "pass", "example.com"),
    }
    assert arc.vouches_for("example.com") == "dmarc=pass"
    assert "arc=pass (i=1 sealer lists.example.org)" in results.header_value("mx.test")
    assert results.summary().endswith(f"arc=pass(i=1 sealer={LIST} trusted)")


def test_two_hops_pass_and_the_newest_sealer_speaks(keys: Keys) -> None:
    results = run(through_relay(keys, through_list(keys)), records(keys), trusted=(LIST, RELAY))
    arc = results.arc
    assert (arc.result, arc.instances, arc.sealer, arc.recorded_by) == ("pass", 2, RELAY, RELAY)
    # the relay's own record (it saw DMARC fail, the chain pass), not the list's older one
    assert {(r.method, r.result) for r in arc.recorded} == {("dmarc", "fail")}
    assert arc.vouches_for("example.com") is None


def test_body_changed_after_sealing_fails_the_message_signature(keys: Keys) -> None:
    tampered = through_list(keys).replace(b"attached to the wiki", b"attached to this mail")
    arc = run(tampered, records(keys)).arc
    assert (arc.result, arc.recorded) == ("fail", ())
    assert arc.reason == "Most recent ARC-Message-Signature did not validate"
    assert not arc.transient


@pytest.mark.parametrize(
    ("hops", "instance", "broken"),
    [
        (1, 1, 1),
        (2, 2, 2),
        (2, 1, 2),  # the newest seal covers the older one: it is the first found broken
    ],
)
def test_altered_seal_is_a_broken_chain(keys: Keys, hops: int, instance: int, broken: int) -> None:
    raw = through_list(keys) if hops == 1 else through_relay(keys, through_list(keys))
    arc = run(altered_seal(raw, instance), records(keys), trusted=(LIST, RELAY)).arc
    assert (arc.result, arc.recorded) == ("fail", ())
    assert arc.reason == f"ARC-Seal[{broken}] did not validate"


def test_an_older_set_rewritten_breaks_the_newer_seal(keys: Keys) -> None:
    """The newest seal covers every older ARC field: a forged i=1 record is caught."""
    raw = through_relay(keys, through_list(keys, saw="dmarc=fail header.from=example.com"))
    aar = arc_field(raw, b"ARC-Authentication-Results", 1)
    forged = raw.replace(aar, aar.replace(b"dmarc=fail", b"dmarc=pass"))
    arc = run(forged, records(keys), trusted=(LIST, RELAY)).arc
    assert (arc.result, arc.reason) == ("fail", "ARC-Seal[2] did not validate")


@pytest.mark.parametrize(
    ("drop", "reason"),
    [
        (b"ARC-Authentication-Results", "ARC set missing or incomplete"),
        (b"ARC-Message-Signature", "ARC set missing or incomplete"),
        (b"ARC-Seal", "ARC set missing or incomplete"),
    ],
)
def test_missing_instance_member_fails_without_lookups(keys: Keys, drop: bytes, reason: str) -> None:
    raw = through_relay(keys, through_list(keys))
    broken = raw.replace(arc_field(raw, drop, 1), b"")
    p = plan(broken)
    assert p.arc.error == reason and p.arc.key_names == ()
    assert LIST_KEY not in p.names and RELAY_KEY not in p.names  # broken on its face: no DNS spent
    arc = run(broken, records(keys)).arc
    assert (arc.result, arc.reason) == ("fail", reason)


def test_a_chain_recorded_as_failed_stays_failed(keys: Keys) -> None:
    """The relay found the chain broken (arc=fail): dkimpy seals with cv=fail, the chain is over."""
    tampered = through_list(keys).replace(b"figures are", b"numbers are")
    raw = through_relay(keys, tampered, saw="arc=fail; dmarc=fail header.from=example.com")
    assert b"cv=fail" in arc_field(raw, b"ARC-Seal", 2)
    arc = run(raw, records(keys), trusted=(LIST, RELAY)).arc
    assert (arc.result, arc.reason) == ("fail", "ARC-Seal i=2 records cv=fail")


def test_wrong_cv_at_the_first_instance_fails(keys: Keys) -> None:
    raw = through_list(keys)
    seal_field = arc_field(raw, b"ARC-Seal", 1)
    arc = run(raw.replace(seal_field, seal_field.replace(b"cv=none", b"cv=pass")), records(keys)).arc
    assert (arc.result, arc.reason) == ("fail", "ARC-Seal i=1 has cv=pass")


def test_no_arc_fields_is_none(keys: Keys) -> None:
    results = run(original(keys), records(keys))
    assert (results.arc.result, results.arc.instances, results.arc.sealer) == ("none", 0, "")
    assert results.header_value("mx.test").endswith("; arc=none")
    assert re.search(r"\barc=", results.summary()) is None  # no chain, nothing to mention


def test_missing_key_fails_and_temperror_fails_as_transient(keys: Keys) -> None:
    """DNS outcomes, as defined in milter.auth.arc: no key is a broken chain; a key lookup that failed
    transiently is a fail marked `transient`, keeping the sealer's record for the policy to weigh."""
    raw = through_list(keys)
    missing = run(raw, records(keys, {LIST_KEY: TxtAnswer.none("nxdomain")}))
    assert missing.arc == ArcResult("fail", 1, LIST, trusted=True, reason=f"no key at {LIST_KEY}")
    down = run(raw, records(keys, {LIST_KEY: TxtAnswer.temperror("timeout")})).arc
    assert (down.result, down.transient, down.reason) == ("fail", True, f"key lookup failed for {LIST_KEY}")
    assert ("dmarc", "pass", "example.com") in {(r.method, r.result, r.domain) for r in down.recorded}
    revoked = run(raw, records(keys, {LIST_KEY: "v=DKIM1; k=rsa; p="})).arc
    assert revoked.result == "fail" and revoked.reason.startswith(f"bad key at {LIST_KEY}")
    assert not revoked.transient and revoked.recorded == ()


def test_only_the_newest_sealers_own_key_gets_the_benefit_of_the_doubt(keys: Keys) -> None:
    """Relay (newest, trusted) over list: the relay's key timing out is "could not tell"; an earlier
    hop's key timing out is a plain fail with nothing recorded. A forger picks those other names, and a
    zone of his that never answers made a forged chain's "dmarc=pass" pass as could-not-tell."""
    raw = through_relay(keys, through_list(keys))
    sealer_down = run(raw, records(keys, {RELAY_KEY: TxtAnswer.temperror("timeout")}), trusted=(RELAY,)).arc
    assert (sealer_down.result, sealer_down.transient) == ("fail", True) and sealer_down.recorded
    other_down = run(raw, records(keys, {LIST_KEY: TxtAnswer.temperror("timeout")}), trusted=(RELAY,)).arc
    assert (other_down.result, other_down.transient, other_down.recorded) == ("fail", False, ())
    assert other_down.reason == f"key lookup failed for {LIST_KEY}, which is not the sealer's"


def test_trust_is_an_exact_sealer_domain_and_travels_in_the_evidence(keys: Keys) -> None:
    raw = through_list(keys)
    resolver = StaticResolver(records(keys))
    assert not run(raw, records(keys), trusted=("example.org",)).arc.trusted  # the parent is not the list
    assert run(raw, records(keys), trusted=("Lists.Example.Org.",)).arc.trusted
    evidence = asyncio.run(gather(raw, resolver, 1.0, trusted_arc_sealers=(LIST,)))
    shipped = pickle.loads(pickle.dumps(evidence))  # as it crosses into the worker
    results = evaluate_evidence(raw, shipped)
    assert (results.arc.result, results.arc.trusted) == ("pass", True)
    assert pickle.loads(pickle.dumps(results)) == results


def test_failed_chain_header_parses_and_carries_the_reason(keys: Keys) -> None:
    tampered = through_list(keys).replace(b"attached", b"ATTACHED")
    value = run(tampered, records(keys)).header_value("mx.test")
    clauses = {r.method: r for r in authres.AuthenticationResultsHeader.parse_value(value).results}
    assert clauses["arc"].result == "fail"
    assert clauses["arc"].reason == "Most recent ARC-Message-Signature did not validate"


# ---- hostile input ---------------------------------------------------------------------------------

HEAD = b"From: a@example.com\r\nSubject: x\r\n"
GARBAGE = [
    b"ARC-Seal: garbage without tags\r\n",
    b"ARC-Seal: i=1; cv=none; d=x.test; s=s; b=\r\nARC-Message-Signature: i=1; d=x.test\r\n",
    b"ARC-Authentication-Results: i=999999999999999999999999; x.test; none\r\n",
    b"ARC-Seal: i=0; cv=none; d=x.test; s=s; b=\r\n",
    b"ARC-Seal: i=51; cv=pass; d=x.test; s=s; b=\r\n",
    b"ARC-Seal: i=\xff\xfe; cv=none\r\n",
    b"ARC-Seal: i=1; i=1; cv=none\r\n",
    b"ARC-Authentication-Results: x.test; dmarc=pass\r\n",
    b"ARC-Seal: i=1; cv=none; d=x.test; s=s; b=\r\n" * 2,
    b"".join(
        f"ARC-Seal: i={i}; cv=pass; d=x.test; s=s; b=\r\nARC-Message-Signature: i={i}; d=x.test; s=s; "
        f"b=\r\nARC-Authentication-Results: i={i}; x.test; none\r\n".encode()
        for i in range(1, MAX_ARC_SETS + 2)
    ),
    b"ARC-Seal: i=1; cv=none; d=..; s=s; b=\r\nARC-Message-Signature: i=1; d=x.test; s=s; b=\r\n"
    b"ARC-Authentication-Results: i=1; x.test; none\r\n",
    b"ARC-Seal: i=1; cv=none; d=x.test; s=s; b=!!\r\nARC-Message-Signature: i=1; a=rsa-sha256; "
    b"d=x.test; s=s; h=from; bh=AAAA; b=!!\r\nARC-Authentication-Results: i=1; x.test; none\r\n",
    b"ARC-Seal: i=1; cv=none; d=x.test; s=s; b=" + b"A" * 300_000 + b"\r\n",
    b'ARC-Seal: i=1; cv="(\\\r\n ; d=x.test; s=s; b=\r\nARC-Message-Signature: i=1; d=x.test; s=s; b=\r\n'
    b"ARC-Authentication-Results: i=1; x.test; none\r\n",
]


@pytest.mark.parametrize("fields", GARBAGE)
def test_garbage_arc_fields_fail_and_never_raise(fields: bytes) -> None:
    raw = HEAD + fields + b"\r\nbody\r\n"
    published = {"s._domainkey.x.test": "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC"}
    results = asyncio.run(authenticate(raw, StaticResolver(published), trusted_arc_sealers=("x.test",)))
    assert results.arc.result == "fail" and results.arc.reason
    assert results.arc.recorded == ()
    authres.AuthenticationResultsHeader.parse_value(results.header_value("mx.test"))


def test_truncated_chains_never_pass_and_never_raise(keys: Keys) -> None:
    raw = through_relay(keys, through_list(keys))
    published = records(keys)
    for cut in range(40, len(raw) - 4, max(1, len(raw) // 40)):
        arc = run(raw[:cut], published, trusted=(LIST, RELAY)).arc
        assert arc.result in ("none", "fail"), cut
        assert arc.recorded == () or arc.transient, cut


def test_verify_arc_survives_a_plan_that_lies(keys: Keys) -> None:
    """The plan and dkimpy read the header block separately; if they disagree, nothing is believed."""
    raw = through_list(keys)
    claimed = plan(through_relay(keys, raw))  # two sets claimed, one in the message
    answers = asyncio.run(fetch(claimed, StaticResolver(records(keys)), 1.0))
    arc = verify_arc(raw, claimed.arc, answers, (RELAY,))
    assert (arc.result, arc.recorded) == ("fail", ())
    assert arc.reason == "verifier and plan disagree on the newest ARC set"
    assert verify_arc(raw, plan(raw).arc, answers, (LIST,)).result == "pass"  # the honest plan passes


@pytest.mark.parametrize(
    "value",
    ["", "no semicolon here", "x.test; dmarc", "x.test; dkim=pass header.d=" + "a" * 9000, "\x00\x01;;;"],
)
def test_unparsable_recorded_results_are_empty(value: str) -> None:
    assert parse_recorded(value) == ("", ())


# ---- the real DNS path -----------------------------------------------------------------------------


def test_reference_outcomes_with_keys_served_on_loopback(keys: Keys) -> None:
    """Pass, broken message signature and broken seal, the keys fetched over UDP from a DNS server on
    127.0.0.1 by the gateway's own resolver, each ARC key asked for once per message."""
    good = through_relay(keys, through_list(keys))
    cases = {
        "pass": good,
        "Most recent ARC-Message-Signature did not validate": good.replace(b"wiki page", b"wiki site"),
        "ARC-Seal[2] did not validate": altered_seal(good, 2),
    }
    dns = FakeDns(records={
        AUTHOR_KEY: [f'"{keys["author"][1]}"'], LIST_KEY: [f'"{keys["list"][1]}"'],
        RELAY_KEY: [f'"{keys["relay"][1]}"'], DMARC: ['"v=DMARC1; p=reject"'],
    })
    outcomes: dict[str, AuthResults] = {}

    async def body(port: int) -> None:
        resolver = DnsResolver(["127.0.0.1"], port=port, lifetime=2.0)
        for name, raw in cases.items():
            outcomes[name] = await authenticate(raw, resolver, 2.0, trusted_arc_sealers=(RELAY,))

    with_server(dns, body)
    assert (outcomes["pass"].arc.result, outcomes["pass"].arc.sealer) == ("pass", RELAY)
    for reason in list(cases)[1:]:
        assert (outcomes[reason].arc.result, outcomes[reason].arc.reason) == ("fail", reason)
    assert all(r.dmarc.result == "fail" for r in outcomes.values())  # DMARC fails directly each time
    assert dns.count(LIST_KEY) == dns.count(RELAY_KEY) == len(cases)


# ---- the policy on real chains ---------------------------------------------------------------------


def test_forwarded_mail_without_arc_is_punished(keys: Keys) -> None:
    relayed = original(keys).replace(b"Subject: Quarterly", b"Subject: [team] Quarterly")
    results = run(relayed, records(keys))
    assert (results.dmarc.result, results.arc.result) == ("fail", "none")
    d = decide(results, QUARANTINE_FAILURES)
    assert (d.verdict, d.action) == (Verdict.SPAM, Action.QUARANTINE)
    assert d.reasons[0].startswith("From domain example.com fails DMARC (p=reject")


def test_trusted_valid_chain_with_dmarc_pass_is_not_punished(keys: Keys) -> None:
    results = run(through_list(keys), records(keys))
    d = decide(results, QUARANTINE_FAILURES)
    assert (d.verdict, d.action) == (Verdict.HAM, Action.ACCEPT)
    assert d.reasons == (FORGIVEN,)
    # our own domain, forwarded: no exact-domain spoof either
    protected = PolicyConfig(protected_domains=("example.com",), dmarc_fail_action="quarantine")
    assert decide(results, protected).action is Action.ACCEPT


@pytest.mark.parametrize(
    ("trusted", "saw", "why"),
    [
        ((), LIST_SAW, "the sealer is not trusted"),
        (("relay.example.net",), LIST_SAW, "another sealer is trusted"),
        ((LIST,), "dkim=fail header.d=mail.example.com; dmarc=fail header.from=example.com",
         "the trusted sealer recorded dmarc=fail"),
        ((LIST,), "dkim=pass header.d=mail.example.com; dmarc=fail header.from=example.com",
         "the sealer's own DMARC verdict wins over its DKIM result"),
        ((LIST,), "dkim=pass header.d=mailer.esp.test", "a DKIM pass not aligned with the From domain"),
        ((LIST,), "dmarc=pass header.from=other.test", "a DMARC pass for another From domain"),
        ((LIST,), "spf=pass smtp.mailfrom=example.com", "SPF alone is no DMARC verdict"),
    ],
)
def test_chain_that_does_not_vouch_changes_nothing(
    keys: Keys, trusted: tuple[str, ...], saw: str, why: str
) -> None:
    results = run(through_list(keys, saw=saw), records(keys), trusted=trusted)
    assert results.arc.result == "pass", why
    d = decide(results, QUARANTINE_FAILURES)
    assert (d.verdict, d.action) == (Verdict.SPAM, Action.QUARANTINE), why
    assert not any("after forwarding" in r for r in d.reasons), why


def test_trusted_sealer_recording_an_aligned_dkim_pass_vouches(keys: Keys) -> None:
    saw = "dkim=pass header.d=mail.example.com header.s=sel2024"
    results = run(through_list(keys, saw=saw), records(keys))
    d = decide(results, QUARANTINE_FAILURES)
    assert d.action is Action.ACCEPT
    assert d.reasons == (f"DMARC failed after forwarding; trusted ARC sealer {LIST} recorded "
                         "dkim=pass header.d=mail.example.com",)


def test_a_failed_trusted_chain_changes_nothing(keys: Keys) -> None:
    tampered = through_list(keys).replace(b"figures are", b"numbers are")
    results = run(tampered, records(keys))
    assert (results.arc.result, results.arc.trusted) == ("fail", True)
    assert decide(results, QUARANTINE_FAILURES).action is Action.QUARANTINE


def test_an_unverifiable_trusted_chain_is_not_acted_on(keys: Keys) -> None:
    """A key lookup that timed out is "could not tell", like DMARC temperror: never a reason to hold."""
    down = records(keys, {LIST_KEY: TxtAnswer.temperror("timeout")})
    d = decide(run(through_list(keys), down), QUARANTINE_FAILURES)
    assert (d.verdict, d.action) == (Verdict.HAM, Action.ACCEPT)
    assert d.reasons == (
        f"DMARC failed after forwarding; trusted ARC sealer {LIST} could not be verified "
        f"(key lookup failed for {LIST_KEY}): not acted on",
    )
    # the same outage for an untrusted sealer: the failure stands
    untrusted = run(through_list(keys), down, trusted=())
    assert decide(untrusted, QUARANTINE_FAILURES).action is Action.QUARANTINE

