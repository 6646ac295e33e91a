"""The `bulk` verdict: a self-declared bulk sender (unsubscribe offer plus one more mark) that the model
would at most tag, and that no stricter rule, allow list, mailing list or DMARC failure claims."""

from __future__ import annotations

import numpy as np
import pytest

from milter.auth import AuthResults, DkimResult, DmarcResult
from milter.config import BulkConfig, ClassThresholds, DomainRule, Lists, PolicyConfig, parse_config
from milter.errors import ConfigError
from milter.features import extract
from milter.features.summary import Extracted, MessageSummary
from milter.policy import RULES, Policy
from milter.policy.bulk import bulk_sender
from milter.policy.rules import allow_ip, spam_score
from milter.types import Action, Decision, Envelope, Scores, Verdict

META = {"spam": {"tag": 0.5, "quarantine": 0.9}, "bec": {"tag": 0.3, "quarantine": 0.6}}
HAM = Scores(ham=0.97, spam=0.02, bec=0.01)
GREY = Scores(ham=0.40, spam=0.55, bec=0.05)  # spam score 0.60: tag level
SPAM = Scores(ham=0.02, spam=0.90, bec=0.08)  # spam score 0.98: quarantine level
BEC_TAG = Scores(ham=0.60, spam=0.05, bec=0.35)  # the BEC ladder tags

FROM = "news@bulletin.example"
ONE_CLICK = "one-click unsubscribe (RFC 8058)"
DKIM = "DKIM signature of bulletin.example"
NEWSLETTER = (ONE_CLICK, "Feedback-ID", DKIM)


def message(
    evidence: tuple[str, ...] = NEWSLETTER,
    auth: AuthResults | None = None,
    list_mail: bool = False,
    language: frozenset[str] = frozenset(),
    reply_to_domain: str | None = None,
) -> Extracted:
    summary = MessageSummary(
        message_id="<m@test>",
        subject="This week",
        from_addr=FROM,
        from_display="Bulletin",
        from_domain="bulletin.example",
        reply_to_addr=None,
        to_addrs=("bob@corp.test",),
        date=None,
        defects=(),
        from_org_domain="bulletin.example",
        reply_to_domain=reply_to_domain,
        language=language,
        list_mail=list_mail,
        bulk_evidence=evidence,
        auth=auth,
    )
    return Extracted(vector=np.zeros(1, np.float32), summary=summary, signals=())


def decide(
    ext: Extracted,
    scores: Scores = HAM,
    config: PolicyConfig | None = None,
    rcpts: tuple[str, ...] = ("bob@corp.test",),
) -> Decision:
    return Policy(config or PolicyConfig(), META).decide(scores, ext, Envelope(rcpt_tos=rcpts))


def verified(
    dmarc: str = "pass", policy: str | None = "none", signer: str = "bulletin.example", dkim: str = "pass"
) -> AuthResults:
    """What the gateway found: one DKIM signature by `signer` with result `dkim`, and DMARC `dmarc`."""
    return AuthResults(
        (DkimResult(signer, "s1", dkim),),  # type: ignore[arg-type]
        DmarcResult(dmarc, "bulletin.example", policy),  # type: ignore[arg-type]
    )


# --- the verdict and its reason ----------------------------------------------------------------------


def test_bulk_sender_below_tag_is_bulk_and_accepted_with_the_evidence_as_reason() -> None:
    d = decide(message())
    assert (d.verdict, d.action, d.subject_prefix) == (Verdict.BULK, Action.ACCEPT, None)
    assert d.reasons == (
        "bulk sender: one-click unsubscribe (RFC 8058), Feedback-ID, DKIM signature of bulletin.example",
    )


def test_the_same_message_without_evidence_stays_ham() -> None:
    d = decide(message(evidence=()))
    assert (d.verdict, d.action, d.reasons) == (Verdict.HAM, Action.ACCEPT, ())


def test_a_tag_level_score_stays_tagged_spam_whatever_the_evidence() -> None:
    d = decide(message(), GREY, PolicyConfig(subject_prefix="[SPAM]"))
    assert (d.verdict, d.action, d.subject_prefix) == (Verdict.SPAM, Action.TAG, "[SPAM]")
    assert not any(r.startswith("bulk sender") for r in d.reasons)


def test_quarantine_level_score_stays_spam() -> None:
    d = decide(message(), SPAM)
    assert (d.verdict, d.action) == (Verdict.SPAM, Action.QUARANTINE)
    assert not any(r.startswith("bulk sender") for r in d.reasons)


def test_the_tag_threshold_is_the_recipients() -> None:
    # corp.test tags from 0.02: HAM (0.03) is tagged spam there, bulk everywhere else
    strict = PolicyConfig(domains=(DomainRule("corp.test", spam=ClassThresholds(tag=0.02, quarantine=0.55)),))
    assert decide(message(), HAM, strict, rcpts=("bob@corp.test",)).verdict is Verdict.SPAM
    assert decide(message(), HAM, strict, rcpts=("bob@other.test",)).verdict is Verdict.BULK


def test_a_bec_tag_is_not_softened() -> None:
    d = decide(message(), BEC_TAG)
    assert (d.verdict, d.action) == (Verdict.BEC, Action.TAG)


@pytest.mark.parametrize(
    ("evidence", "why"),
    [
        ((ONE_CLICK,), "an unsubscribe offer alone"),
        (("List-Unsubscribe",), "a List-Unsubscribe header alone"),
        (("Feedback-ID", "Precedence: bulk"), "no way to unsubscribe"),
    ],
)
def test_one_kind_of_evidence_is_not_enough(evidence: tuple[str, ...], why: str) -> None:
    d = decide(message(evidence=evidence))
    assert (d.verdict, d.action) == (Verdict.HAM, Action.ACCEPT), why
    assert decide(message(evidence=evidence), GREY).verdict is Verdict.SPAM, why


@pytest.mark.parametrize(
    "evidence",
    [("List-Unsubscribe", "Precedence: bulk"), ("List-Unsubscribe", DKIM), (ONE_CLICK, "Feedback-ID")],
)
def test_unsubscribe_plus_any_other_mark_is_enough(evidence: tuple[str, ...]) -> None:
    d = decide(message(evidence=evidence))
    assert d.verdict is Verdict.BULK and d.reasons[0] == f"bulk sender: {', '.join(evidence)}"


def test_a_mailing_list_copy_is_not_bulk() -> None:
    assert decide(message(list_mail=True)).verdict is Verdict.HAM
    assert decide(message(list_mail=True), GREY).verdict is Verdict.SPAM


# --- stricter rules and allow lists come first -------------------------------------------------------


def test_a_bec_content_rule_decides_over_bulk_evidence() -> None:
    ext = message(language=frozenset({"bank_change", "payment"}), reply_to_domain="payee.example")
    d = decide(ext)
    assert (d.verdict, d.action) == (Verdict.BEC, Action.QUARANTINE)
    assert d.reasons[0].startswith("asks to change bank or payroll details")


def test_deny_list_and_impersonation_decide_over_bulk_evidence() -> None:
    denied = decide(message(), config=PolicyConfig(lists=Lists(deny_domains=("bulletin.example",))))
    assert (denied.verdict, denied.action) == (Verdict.SPAM, Action.QUARANTINE)
    posing = decide(message(), config=PolicyConfig(protected_names=("Bulletin",)))
    assert (posing.verdict, posing.action) == (Verdict.BEC, Action.QUARANTINE)


def test_an_allow_listed_sender_stays_ham() -> None:
    d = decide(message(), GREY, PolicyConfig(lists=Lists(allow_senders=(FROM,))))
    assert (d.verdict, d.action) == (Verdict.HAM, Action.ACCEPT)
    assert d.reasons[0] == f"sender {FROM} is on the allow list"


def test_the_rule_sits_after_the_allow_lists_and_before_the_spam_ladder() -> None:
    assert RULES.index(allow_ip) < RULES.index(bulk_sender) < RULES.index(spam_score)


# --- what authentication says about the DKIM mark -----------------------------------------------------


def test_verified_dkim_counts() -> None:
    d = decide(message(evidence=(ONE_CLICK, DKIM), auth=verified()))
    assert d.verdict is Verdict.BULK and d.reasons[0].endswith(DKIM)


@pytest.mark.parametrize(
    ("auth", "why"),
    [
        (verified("fail", "none"), "DMARC fails (p=none): the From domain did not send it"),
        (verified("none", None, dkim="fail"), "the named signature does not verify"),
        (verified("none", None, dkim="temperror"), "its key could not be fetched"),
        (verified("pass", "none", signer="esp.example"), "only another domain's signature verified"),
    ],
)
def test_dkim_mark_that_authentication_does_not_bear_out_does_not_count(auth: AuthResults, why: str) -> None:
    d = decide(message(evidence=(ONE_CLICK, DKIM), auth=auth))
    assert (d.verdict, d.action) == (Verdict.HAM, Action.ACCEPT), why
    # the other marks still count, and the reason names only those
    rest = decide(message(auth=auth))
    assert rest.verdict is Verdict.BULK, why
    assert rest.reasons[0] == "bulk sender: one-click unsubscribe (RFC 8058), Feedback-ID", why


def test_a_subdomain_signature_verifies_the_mark() -> None:
    d = decide(message(evidence=(ONE_CLICK, DKIM), auth=verified(signer="mail.bulletin.example")))
    assert d.verdict is Verdict.BULK


def test_mail_its_domain_disowns_is_no_bulk() -> None:
    # DMARC fails under p=reject: the DMARC rule (tag by default) decides, the marks are forgeries
    d = decide(message(auth=verified("fail", "reject")))
    assert (d.verdict, d.action) == (Verdict.SPAM, Action.TAG)
    assert d.reasons[0].startswith("From domain bulletin.example fails DMARC (p=reject")


# --- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize("action", [Action.TAG, Action.QUARANTINE])
def test_the_action_comes_from_the_config(action: Action) -> None:
    config = parse_config({"policy": {"bulk": {"action": action.value}, "subject_prefix": "[BULK]"}}).policy
    d = decide(message(), config=config)
    assert (d.verdict, d.action) == (Verdict.BULK, action)
    assert d.subject_prefix == ("[BULK]" if action is Action.TAG else None)


def test_disabled_keeps_the_models_verdict() -> None:
    config = parse_config({"policy": {"bulk": {"enabled": False}}}).policy
    assert decide(message(), config=config).verdict is Verdict.HAM
    assert decide(message(), GREY, config).verdict is Verdict.SPAM


def test_a_domain_rule_sets_its_own_bulk_action_and_the_strictest_recipient_wins() -> None:
    config = parse_config({"policy": {"domain": [{"domain": "corp.test", "bulk_action": "tag"}]}}).policy
    assert decide(message(), config=config, rcpts=("bob@corp.test",)).action is Action.TAG
    assert decide(message(), config=config, rcpts=("ann@sales.corp.test",)).action is Action.TAG
    assert decide(message(), config=config, rcpts=("bob@other.test",)).action is Action.ACCEPT
    both = decide(message(), config=config, rcpts=("bob@other.test", "bob@corp.test"))
    assert (both.verdict, both.action) == (Verdict.BULK, Action.TAG)


def test_action_override_caps_the_bulk_action() -> None:
    config = PolicyConfig(domains=(DomainRule("corp.test", action_override="tag", bulk_action="quarantine"),))
    d = decide(message(), config=config)
    assert (d.verdict, d.action) == (Verdict.BULK, Action.TAG)
    assert d.reasons[1] == "recipient domain corp.test rule: quarantine -> tag"


def test_a_domain_rule_does_not_turn_a_disabled_rule_on() -> None:
    config = parse_config(
        {"policy": {"bulk": {"enabled": False}, "domain": [{"domain": "corp.test", "bulk_action": "tag"}]}}
    ).policy
    assert decide(message(), config=config).verdict is Verdict.HAM


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (PolicyConfig(bulk=BulkConfig(action="reject")), "policy.bulk.action"),
        (
            PolicyConfig(domains=(DomainRule("corp.test", bulk_action="drop"),)),
            "policy.domain[corp.test].bulk_action",
        ),
    ],
)
def test_a_policy_built_in_code_is_checked_too(config: PolicyConfig, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Policy(config, META)
    assert info.value.key == key


# --- from the message's own headers -------------------------------------------------------------------


def newsletter(extra: str = "") -> bytes:
    return (
        "From: Bulletin <news@bulletin.example>\r\nTo: bob@corp.test\r\nSubject: This week\r\n"
        "Message-ID: <issue-42@bulletin.example>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        "List-Unsubscribe: <https://bulletin.example/u/42>, <mailto:u@bulletin.example>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        f"{extra}MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
        "This week's news.\r\n\r\nUnsubscribe: https://bulletin.example/u/42\r\n"
    ).encode()


def test_evidence_from_real_headers_reaches_the_rule() -> None:
    signed = newsletter(
        "Feedback-ID: 42:bulletin:esp\r\n"
        "DKIM-Signature: v=1; a=rsa-sha256; d=bulletin.example; s=s1; h=from:to:subject; bh=x; b=y\r\n"
    )
    ext = extract(signed)
    assert ext.summary.bulk_evidence == (ONE_CLICK, "Feedback-ID", DKIM)
    d = decide(ext, HAM)
    assert d.verdict is Verdict.BULK
    assert d.reasons[0] == f"bulk sender: {ONE_CLICK}, Feedback-ID, {DKIM}"
    assert decide(extract(newsletter()), HAM).verdict is Verdict.HAM  # one-click alone
