"""A From with several addresses (milter/policy/dmarc.py `several_from_protected`, and the impersonation
rules over every From address): the spoof of our own domain that DMARC cannot judge, and a protected
name shown in the second address, are BEC; a From that merely reads as two addresses is not."""

from __future__ import annotations

from dataclasses import replace

import pytest

from milter.auth import AuthResults, DkimResult, DmarcResult
from milter.auth.message import plan
from milter.config import PolicyConfig
from milter.features import extract
from milter.policy import Policy
from milter.types import Action, Envelope, Scores, Verdict

META = {"spam": {"tag": 0.975, "quarantine": 0.99}, "bec": {"tag": 0.8, "quarantine": 0.95}}
HAM = Scores(ham=0.98, spam=0.01, bec=0.01)
OURS = PolicyConfig(protected_domains=("example.com",), protected_names=("Jane Smith",))
OUTSIDE = Envelope(mail_from="x@relay.test", rcpt_tos=("bob@example.com",), client_addr="192.0.2.7")
INSIDE = Envelope(mail_from="x@example.com", rcpt_tos=("bob@example.com",), client_addr="10.1.2.3")


def mail(from_header: str) -> bytes:
    return (
        f"From: {from_header}\r\nTo: bob@example.com\r\nSubject: wire today\r\n"
        "Message-ID: <m1@relay.test>\r\nDate: Sun, 06 Dec 2026 10:00:00 +0000\r\n\r\n"
        "Please send the payment today.\r\n"
    ).encode()


def decide(from_header: str, envelope: Envelope = OUTSIDE, config: PolicyConfig = OURS) -> tuple[str, ...]:
    d = Policy(config, META).decide(HAM, extract(mail(from_header)), envelope)
    return (d.verdict.value, d.action.value, *d.reasons)


@pytest.mark.parametrize(
    ("from_header", "dmarc_domain"),
    [
        # a bare word first: the reader sees Jane Smith of example.com, and DMARC judges example.com
        ("x, Jane Smith <jane@example.com>", "example.com"),
        ("Support ,_<help@mail.example.com>", "mail.example.com"),  # phishing-pot's pattern, a subdomain
        ("jane@example.com, other@relay.test", None),  # two mailboxes, ours first: DMARC cannot judge it
    ],
)
def test_our_domain_among_several_from_addresses_is_bec(from_header: str, dmarc_domain: str | None) -> None:
    assert plan(mail(from_header)).from_domain == dmarc_domain
    # held without DNS answers too: the rule does not wait for DMARC to say what the reader sees
    verdict, action, reason, *_ = decide(from_header)
    assert (verdict, action) == (Verdict.BEC.value, Action.QUARANTINE.value)
    assert "addresses, one at protected domain" in reason and "example.com" in reason


def test_our_own_clients_and_single_addresses_are_not_judged() -> None:
    assert decide("x, Jane Smith <jane@example.com>", INSIDE)[:2] == ("ham", "accept")
    assert decide('"x, Jane Smith" <jane@example.com>')[:2] == ("ham", "accept")  # quoted: one address


@pytest.mark.parametrize(
    ("from_header", "config"),
    [("Smith, John <john@partner.test>", OURS), ("x, Jane Smith <jane@example.com>", PolicyConfig())],
    ids=["none-of-ours", "nothing-protected"],
)
def test_several_addresses_none_of_ours_are_only_tagged(from_header: str, config: PolicyConfig) -> None:
    verdict, action, reason, *_ = decide(from_header, config=config)
    assert (verdict, action) == ("spam", "tag")  # milter.policy.form.several_from
    assert reason.startswith("From reads as 2 addresses (an unquoted comma before ")
    assert decide("john@partner.test, jane@other.test", config=config)[2].startswith("From gives 2 addresses")


def auth(result: str, domain: str, policy: str = "reject") -> AuthResults:
    dkim = (DkimResult(domain, "s1", "pass"),) if result == "pass" else ()
    return AuthResults(dkim, DmarcResult(result, domain, policy))  # type: ignore[arg-type]


def decide_with(from_header: str, found: AuthResults, config: PolicyConfig = OURS) -> tuple[str, ...]:
    ext = extract(mail(from_header))
    ext = replace(ext, summary=replace(ext.summary, auth=found))
    d = Policy(config, META).decide(HAM, ext, OUTSIDE)
    return (d.verdict.value, d.action.value, *d.reasons)


def test_an_unquoted_comma_whose_one_address_authenticates_is_not_tagged() -> None:
    verdict, action, *reasons = decide_with("Smith, John <john@partner.test>", auth("pass", "partner.test"))
    assert (verdict, action) == ("ham", "accept")
    assert reasons[0] == (
        "From reads as 2 addresses (an unquoted comma before john@partner.test); not tagged: DMARC passed "
        "for john@partner.test"
    )
    # DMARC of another domain, or none at all, proves nothing about it
    assert decide_with("Smith, John <john@partner.test>", auth("pass", "other.test"))[:2] == ("spam", "tag")
    assert decide_with("Smith, John <john@partner.test>", auth("none", "partner.test"))[:2] == ("spam", "tag")


def test_an_unquoted_comma_no_longer_dodges_dmarc() -> None:
    # the spoof of a domain that publishes p=reject: DMARC now fails on the one address there is
    spoof = auth("fail", "bank.test")
    verdict, action, *reasons = decide_with("x, Jane Smith <jane@bank.test>", spoof, PolicyConfig())
    assert (verdict, action) == ("spam", "tag")
    assert any(r.startswith("From domain bank.test fails DMARC (p=reject") for r in reasons)
    # where the admin holds DMARC failures, the several-From tag does not let it out (policy._raised)
    quarantining = PolicyConfig(dmarc_fail_action="quarantine")
    assert decide_with("x, Jane Smith <jane@bank.test>", spoof, quarantining)[:2] == ("spam", "quarantine")
    # and of our own domain: the exact-domain spoof rule sees it too
    ours = decide_with("x, Jane Smith <jane@example.com>", auth("fail", "example.com"))
    assert ours[:2] == ("bec", "quarantine")
    spoofed = "protected domain spoofed: From domain example.com fails DMARC"
    assert any(r.startswith(spoofed) for r in ours[2:])


def test_a_protected_name_in_the_second_address_is_impersonation() -> None:
    verdict, action, reason, *_ = decide("x, Jane Smith <jane.smith.ceo@gmail.com>")
    assert (verdict, action) == ("bec", "quarantine")
    assert "'Jane Smith' is protected person Jane Smith" in reason and "gmail.com" in reason


def test_a_protected_address_shown_in_the_second_display_name_is_impersonation() -> None:
    verdict, action, reason, *_ = decide('x, "jane@example.com" <attacker@evil.test>')
    assert (verdict, action) == ("bec", "quarantine")
    assert "shows jane@example.com at protected domain example.com" in reason


def test_a_hostile_from_keeps_at_most_ten_other_addresses() -> None:
    many = ", ".join(f"u{i}@relay.test" for i in range(5000))
    summary = extract(mail(many)).summary
    assert len(summary.from_others) == 10


def test_two_from_header_fields_are_several_addresses_too() -> None:
    raw = mail("news@relay.test").replace(b"To:", b"From: Jane Smith <jane@example.com>\r\nTo:", 1)
    assert plan(raw).from_domain is None  # "several From headers": DMARC has no From domain either
    d = Policy(OURS, META).decide(HAM, extract(raw), OUTSIDE)
    assert (d.verdict, d.action) == (Verdict.BEC, Action.QUARANTINE)
    assert d.reasons[0].startswith("From gives 2 addresses, one at protected domain example.com")
