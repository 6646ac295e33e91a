"""The policy's use of DKIM / DMARC results: the exact-domain spoof rule, allow entries a domain's own
DMARC disowns, the last-resort action for DMARC failures, and a trusted ARC sealer's override. Results
are built as values here; the gateway test (test_gateway_auth.py) and test_auth_arc.py produce them
from real signatures and chains."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from milter.auth import ArcResult, AuthResults, DkimResult, DmarcResult, RecordedResult
from milter.config import ClassThresholds, Lists, PolicyConfig
from milter.errors import ConfigError
from milter.features.summary import Extracted, MessageSummary
from milter.policy import Policy
from milter.policy.bulk import dkim_mark_holds
from milter.types import Action, Decision, Envelope, Scores, Verdict

META = {"spam": {"tag": 0.5, "quarantine": 0.9}, "bec": {"tag": 0.3, "quarantine": 0.6}}
HAM = Scores(ham=0.98, spam=0.01, bec=0.01)
SPAM = Scores(ham=0.02, spam=0.97, bec=0.01)


def auth(result: str = "fail", policy: str | None = "reject", domain: str = "example.com") -> AuthResults:
    dkim = (DkimResult("mailer.test", "s1", "pass"),)  # a valid signature, but not the From domain's
    return AuthResults(dkim, DmarcResult(result, domain, policy))  # type: ignore[arg-type]


def extracted(
    results: AuthResults | None, from_addr: str = "jane@example.com", lists: bool = False
) -> Extracted:
    summary = MessageSummary(
        message_id="<m@test>", subject="Invoice", from_addr=from_addr, from_display="Jane",
        from_domain=from_addr.rpartition("@")[2], reply_to_addr=None, to_addrs=("bob@corp.test",),
        date=None, defects=(), list_mail=lists, auth=results,
    )
    return Extracted(vector=np.zeros(1, np.float32), summary=summary, signals=())


def decide(
    results: AuthResults | None,
    config: PolicyConfig | None = None,
    scores: Scores = HAM,
    from_addr: str = "jane@example.com",
    lists: bool = False,
    envelope: Envelope | None = None,
) -> Decision:
    ext = extracted(results, from_addr, lists)
    return Policy(config or PolicyConfig(), META).decide(scores, ext, envelope or Envelope())


PROTECTED = PolicyConfig(protected_domains=("example.com",))


@pytest.mark.parametrize(
    ("policy", "pct", "held"),
    [("quarantine", 0, False), ("reject", 0, True), ("quarantine", 100, True), ("none", 0, False)],
)
def test_pct_outside_the_sample_steps_the_dmarc_rule_down(policy: str, pct: int, held: bool) -> None:
    """RFC 7489 6.6.4: p=quarantine; pct=0 (how a domain asks mailing lists to rewrite From) asks that
    no failing message be held; before, the DMARC rule acted as if pct were 100. As evidence of a spoof
    of a protected domain the failure still counts."""
    results = AuthResults((DkimResult("mailer.test", "s1", "pass"),),
                          DmarcResult("fail", "example.com", policy, pct=pct))  # type: ignore[arg-type]
    d = decide(results, PolicyConfig(dmarc_fail_action="quarantine"))
    assert (d.action is Action.QUARANTINE) == held, d.reasons
    if not held and policy != "none":
        assert d.reasons[-1].endswith(f"outside its pct={pct} sample: not acted on")
    spoof = decide(results, PROTECTED)
    assert (spoof.action is Action.QUARANTINE) == (policy != "none")


def test_pct_draws_at_random_not_from_the_message() -> None:
    """The share held is the record's pct, drawn at random: a hash of the Message-ID would let the
    sender choose a Message-ID outside the sample."""
    from milter.policy.dmarc import enforced_policy

    dmarc = DmarcResult("fail", "example.com", "quarantine", pct=30)
    assert [enforced_policy(dmarc, d) for d in (0.0, 29.9, 30.0, 99.9)] == [
        "quarantine", "quarantine", "none", "none"]
    results = AuthResults((), dmarc)
    held = sum(decide(results, PolicyConfig(dmarc_fail_action="quarantine")).action is Action.QUARANTINE
               for _ in range(2000))
    assert 450 < held < 750  # 30 % of 2,000, give or take four standard deviations


def test_protected_domain_failing_enforced_dmarc_is_bec() -> None:
    d = decide(auth(), PROTECTED)
    assert (d.verdict, d.action) == (Verdict.BEC, Action.QUARANTINE)
    assert d.reasons[0] == (
        "protected domain spoofed: From domain example.com fails DMARC "
        "(p=reject; dkim=pass(mailer.test) dmarc=fail(p=reject from=example.com))"
    )


@pytest.mark.parametrize(
    ("results", "why"),
    [
        (None, "not checked (scan without --dns)"),
        (auth("pass"), "authenticated"),
        (auth("temperror"), "DNS could not tell: never a reason to hold mail"),
        (auth("fail", "none"), "p=none: the owner does not claim all its mail is aligned"),
        (auth("fail", None), "no policy"),
    ],
)
def test_no_spoof_verdict_without_an_enforced_failure(results: AuthResults | None, why: str) -> None:
    d = decide(results, PROTECTED)
    assert (d.verdict, d.action) == (Verdict.HAM, Action.ACCEPT), why


def test_another_domains_failure_is_no_spoof_of_ours() -> None:
    d = decide(auth(domain="other.test"), PROTECTED, from_addr="jane@other.test")
    assert (d.verdict, d.action) == (Verdict.SPAM, Action.TAG)  # dmarc_fail_action, not BEC
    assert not any("protected" in r for r in d.reasons)


def test_subdomain_of_a_protected_domain_counts_and_list_mail_is_not_exempt() -> None:
    d = decide(auth(domain="mail.example.com"), PROTECTED, from_addr="ceo@mail.example.com", lists=True)
    assert (d.verdict, d.action) == (Verdict.BEC, Action.QUARANTINE)


def test_spoof_rule_beats_the_allow_list() -> None:
    cfg = replace(PROTECTED, lists=Lists(allow_domains=("example.com",)))
    assert decide(auth(), cfg).action is Action.QUARANTINE


@pytest.mark.parametrize("key", ["allow_senders", "allow_domains"])
def test_allow_entry_not_applied_when_the_domain_disowns_the_message(key: str) -> None:
    entry = "jane@example.com" if key == "allow_senders" else "example.com"
    cfg = PolicyConfig(lists=Lists(**{key: (entry,)}))
    allowed = decide(auth("pass"), cfg, scores=SPAM)
    assert (allowed.verdict, allowed.action) == (Verdict.HAM, Action.ACCEPT)
    disowned = decide(auth(), cfg, scores=SPAM)
    assert (disowned.verdict, disowned.action) == (Verdict.SPAM, Action.QUARANTINE)
    assert f"allow list entry {entry} not applied: From domain example.com fails DMARC" in disowned.reasons[1]
    # under p=none a failure proves nothing, so the entry still applies
    assert decide(auth("fail", "none"), cfg, scores=SPAM).action is Action.ACCEPT


@pytest.mark.parametrize(
    ("setting", "action"),
    [("tag", Action.TAG), ("quarantine", Action.QUARANTINE), ("none", Action.ACCEPT)],
)
def test_dmarc_fail_action(setting: str, action: Action) -> None:
    d = decide(auth(), PolicyConfig(dmarc_fail_action=setting))
    assert d.action is action
    assert d.reasons[0].startswith("From domain example.com fails DMARC (p=reject")  # a reason either way
    assert d.verdict is (Verdict.HAM if action is Action.ACCEPT else Verdict.SPAM)


def test_dmarc_fail_never_softens_the_model_and_spares_list_copies() -> None:
    d = decide(auth(), scores=SPAM)
    assert (d.verdict, d.action) == (Verdict.SPAM, Action.QUARANTINE)
    assert d.reasons[0].startswith("spam score 0.98")
    listed = decide(auth(), lists=True)
    assert (listed.verdict, listed.action, listed.reasons) == (Verdict.HAM, Action.ACCEPT, ())


LEANS = Scores(ham=0.40, spam=0.55, bec=0.05)  # the spam ladder tags (0.60 >= 0.5), does not quarantine
HOLD = PolicyConfig(dmarc_fail_action="quarantine")


def test_a_configured_dmarc_quarantine_is_not_let_out_by_an_earlier_tag() -> None:
    # the spam ladder's tag comes first in the table; the admin asked for DMARC failures to be held
    d = decide(auth(), HOLD, scores=LEANS)
    assert (d.verdict, d.action) == (Verdict.SPAM, Action.QUARANTINE)
    assert d.reasons[0].startswith("From domain example.com fails DMARC (p=reject")
    assert any(r.startswith("spam score 0.60 >= tag threshold") for r in d.reasons[1:])  # kept as a reason
    # as configured by default (tag) the ladder's tag stands, and so it does where DMARC passes
    assert decide(auth(), scores=LEANS).action is Action.TAG
    assert decide(auth("pass"), HOLD, scores=LEANS).action is Action.TAG


def test_the_dmarc_floor_raises_only_a_tag() -> None:
    # an allow entry for the client's address is the admin's explicit "accept"; a stricter answer stays
    trusted_relay = replace(HOLD, lists=Lists(allow_ips=("192.0.2.0/24",)))
    relay = Envelope(client_addr="192.0.2.7")
    assert decide(auth(), trusted_relay, scores=LEANS, envelope=relay).action is Action.ACCEPT
    rejecting = replace(HOLD, spam=ClassThresholds(tag=0.5, quarantine=0.9, reject=0.95))
    assert decide(auth(), rejecting, scores=SPAM).action is Action.REJECT


def test_unknown_dmarc_fail_action_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        Policy(PolicyConfig(dmarc_fail_action="drop"), META)
    assert info.value.key == "policy.dmarc_fail_action"


@pytest.mark.parametrize(
    ("envelope", "judged"),
    [
        (Envelope(client_addr="198.51.100.7", source="REMOTE"), True),
        (Envelope(client_addr="[IPv6:2001:db8::1]"), True),
        (Envelope(client_addr="192.168.10.20"), False),  # default internal_networks
        (Envelope(client_addr="127.0.0.1"), False),  # the MTA itself, when it sends no XFORWARD
        (Envelope(client_addr="198.51.100.7", source="LOCAL"), False),  # Postfix: one of our clients
    ],
)
def test_our_own_clients_are_not_judged_by_dmarc(envelope: Envelope, judged: bool) -> None:
    d = decide(auth(), PROTECTED, envelope=envelope)
    assert (d.action is Action.QUARANTINE) is judged
    assert (d.verdict is Verdict.BEC) is judged


def test_internal_networks_are_configurable() -> None:
    cfg = replace(PROTECTED, internal_networks=("203.0.113.0/24",))
    assert decide(auth(), cfg, envelope=Envelope(client_addr="203.0.113.9")).action is Action.ACCEPT
    assert decide(auth(), cfg, envelope=Envelope(client_addr="192.168.10.20")).action is Action.QUARANTINE
    with pytest.raises(ConfigError) as info:
        Policy(PolicyConfig(internal_networks=("10.0.0.0/8", "intranet")), META)
    assert info.value.key == "policy.internal_networks[1]"


def forwarded(
    arc: str = "pass", trusted: bool = True, dmarc: str = "pass", transient: bool = False
) -> AuthResults:
    """A DMARC failure (p=reject) after a list broke the signature, with the list's ARC chain."""
    recorded = (RecordedResult("dmarc", dmarc, "example.com"), RecordedResult("dkim", "pass", "example.com"))
    sealer = "lists.example.org"
    chain = ArcResult(arc, 1, sealer, trusted, transient, sealer, recorded)  # type: ignore[arg-type]
    return replace(auth(), arc=chain)


@pytest.mark.parametrize("key", ["allow_senders", "allow_domains"])
def test_allow_entries_and_the_dmarc_rule_agree_on_a_trusted_arc_chain(key: str) -> None:
    entry = "jane@example.com" if key == "allow_senders" else "example.com"
    cfg = PolicyConfig(lists=Lists(**{key: (entry,)}))
    vouched = decide(forwarded(), cfg, scores=SPAM)
    assert (vouched.verdict, vouched.action) == (Verdict.HAM, Action.ACCEPT)  # the entry applies again
    assert "is on the allow list" in vouched.reasons[0]
    assert vouched.reasons[-1] == (
        "DMARC failed after forwarding; trusted ARC sealer lists.example.org recorded dmarc=pass"
    )
    for why, results in {
        "untrusted sealer": forwarded(trusted=False),
        "failed chain": forwarded(arc="fail"),
        "sealer saw dmarc=fail": forwarded(dmarc="fail"),
    }.items():
        disowned = decide(results, cfg, scores=SPAM)
        assert disowned.action is Action.QUARANTINE, why
        assert "not applied: From domain example.com fails DMARC" in disowned.reasons[1], why


def test_summary_quoted_in_reasons_mentions_the_chain() -> None:
    d = decide(forwarded(trusted=False), PolicyConfig(dmarc_fail_action="quarantine"))
    assert d.reasons[0].endswith(
        "dmarc=fail(p=reject from=example.com) arc=pass(i=1 sealer=lists.example.org))"
    )


def test_bulk_dkim_mark_follows_the_trusted_sealer() -> None:
    """The bulk rule's DKIM mark agrees with the DMARC rule: forgiven by a trusted chain, the sealer's
    validated DKIM pass stands in for ours; untrusted, failed or merely unverifiable, it does not."""
    summary = extracted(forwarded()).summary
    assert dkim_mark_holds(summary, "example.com")
    assert not dkim_mark_holds(summary, "other.test")  # the sealer recorded no pass for that domain
    for results in (forwarded(trusted=False), forwarded(arc="fail"), forwarded(arc="fail", transient=True)):
        assert not dkim_mark_holds(extracted(results).summary, "example.com")
