"""Learned senders: the admins' labels per authenticated From domain cap the model's ladders at tag."""

from __future__ import annotations

import numpy as np
import pytest

from milter.auth import AuthResults, DkimResult, DmarcResult
from milter.config import ClassThresholds, Lists, PolicyConfig, parse_config
from milter.errors import ConfigError
from milter.features.summary import Extracted, MessageSummary
from milter.policy import Policy
from milter.policy.table import LearnedSenders, SenderLabels
from milter.types import Action, Decision, Envelope, Scores, Verdict

META = {"spam": {"tag": 0.5, "quarantine": 0.9}, "bec": {"tag": 0.3, "quarantine": 0.6}}
SPAM = Scores(ham=0.02, spam=0.97, bec=0.01)
BEC = Scores(ham=0.05, spam=0.25, bec=0.70)
GREY = Scores(ham=0.40, spam=0.55, bec=0.05)  # tag level only
SPLIT = Scores(ham=0.05, spam=0.55, bec=0.40)  # the BEC ladder tags, the spam ladder would hold
NEWS = "news@mail.bulletin.example"
# What the store returns: three releases of the newsletter (two addresses, one upper-case), one of
# a sender also confirmed as spam once, and a verdict without a From address.
LABELS = [
    (NEWS, "ham", 2),
    ("Editor@Bulletin.example", "ham", 1),
    ("offers@mixed.example", "ham", 5),
    ("offers@mixed.example", "spam", 1),
    (None, "ham", 4),
]


def dmarc(
    result: str = "pass", domain: str = "mail.bulletin.example", signer: str | None = None
) -> AuthResults:
    """DMARC `result` for `domain`, with one valid DKIM signature by `signer` (default: `domain`)."""
    dkim = (DkimResult(signer or domain, "s1", "pass"),)
    return AuthResults(dkim, DmarcResult(result, domain, "none"))  # type: ignore[arg-type]


def decide(
    scores: Scores,
    auth: AuthResults | None,
    from_addr: str = NEWS,
    config: PolicyConfig | None = None,
    labels: list[tuple[str | None, str, int]] | None = None,
    language: frozenset[str] = frozenset(),
    reply_to_domain: str | None = None,
) -> Decision:
    summary = MessageSummary(
        message_id="<m@test>",
        subject="This week",
        from_addr=from_addr,
        from_display="Bulletin",
        from_domain=from_addr.rpartition("@")[2],
        reply_to_addr=None,
        to_addrs=("bob@corp.test",),
        date=None,
        defects=(),
        auth=auth,
        language=language,
        from_org_domain="bulletin.example",
        reply_to_domain=reply_to_domain,
    )
    ext = Extracted(vector=np.zeros(1, np.float32), summary=summary, signals=())
    policy = Policy(config or PolicyConfig(), META, LABELS if labels is None else labels)
    return policy.decide(scores, ext, Envelope(rcpt_tos=("bob@corp.test",)))


def test_labels_are_counted_per_registrable_from_domain() -> None:
    learned = LearnedSenders.from_labels(LABELS, 3)
    assert dict(learned.counts) == {
        "bulletin.example": SenderLabels(3, 0),
        "mixed.example": SenderLabels(5, 1),
    }
    assert learned.vouched("bulletin.example") == SenderLabels(3, 0)
    assert learned.vouched("mixed.example") is None  # one confirmed spam ends it
    assert learned.vouched_count == 1
    assert LearnedSenders.from_labels(LABELS, 4).vouched("bulletin.example") is None
    assert LearnedSenders.from_labels(LABELS, 0).vouched("bulletin.example") is None  # 0: off


@pytest.mark.parametrize(
    ("scores", "verdict", "ladder"),
    [(SPAM, Verdict.SPAM, "spam"), (BEC, Verdict.BEC, "bec"), (SPLIT, Verdict.SPAM, "bec")],
)
def test_a_vouched_sender_passing_dmarc_is_tagged_not_quarantined(
    scores: Scores, verdict: Verdict, ladder: str
) -> None:
    assert decide(scores, dmarc(), labels=[]).action is Action.QUARANTINE  # without the labels
    d = decide(scores, dmarc())
    assert (d.verdict, d.action) == (verdict, Action.TAG)
    assert d.reasons[0] == (
        "learned sender: bulletin.example passes DMARC and admins labelled 3 of its messages ham, "
        "none spam: tagged, not quarantined"
    )
    assert d.reasons[1].startswith(f"{ladder} score ")  # the model's score stays a reason


@pytest.mark.parametrize(
    ("auth", "why"),
    [
        (None, "not checked"),
        (dmarc("fail"), "DMARC fails: anyone can write this From"),
        (dmarc("none", signer="esp.example"), "no DMARC record, and only the ESP's own signature"),
        (dmarc("temperror"), "DNS could not tell"),
    ],
)
def test_no_credit_without_dmarc_pass(auth: AuthResults | None, why: str) -> None:
    assert decide(SPAM, auth).action is Action.QUARANTINE, why


def test_another_domain_passing_dmarc_gets_no_credit_from_these_labels() -> None:
    d = decide(SPAM, dmarc(domain="evil.example"), from_addr="news@evil.example")
    assert d.action is Action.QUARANTINE


def test_a_sender_with_a_spam_label_gets_no_credit() -> None:
    d = decide(SPAM, dmarc(domain="mixed.example"), from_addr="offers@mixed.example")
    assert d.action is Action.QUARANTINE


def test_the_rule_never_raises_the_action_and_stays_quiet_below_quarantine() -> None:
    d = decide(GREY, dmarc())
    assert d.action is Action.TAG and d.reasons[0].startswith("spam score 0.60 >= tag threshold")
    ham = decide(Scores(ham=0.99, spam=0.005, bec=0.005), dmarc())
    assert (ham.action, ham.reasons) == (Action.ACCEPT, ())


def test_reject_is_capped_too() -> None:
    config = PolicyConfig(spam=ClassThresholds(tag=0.5, quarantine=0.9, reject=0.95))
    assert decide(SPAM, dmarc(), labels=[], config=config).action is Action.REJECT
    capped = decide(SPAM, dmarc(), config=config)
    assert capped.action is Action.TAG and capped.reasons[0].endswith("tagged, not rejected")


def test_bec_content_rules_and_deny_lists_still_decide() -> None:
    # a vouched-for sender's hijacked mailbox asking for changed bank details, replies going elsewhere
    bank = decide(
        BEC, dmarc(), language=frozenset({"bank_change", "payment"}), reply_to_domain="payee.example"
    )
    assert (bank.verdict, bank.action) == (Verdict.BEC, Action.QUARANTINE)
    denied = decide(SPAM, dmarc(), config=PolicyConfig(lists=Lists(deny_domains=("bulletin.example",))))
    assert denied.action is Action.QUARANTINE and "deny" in denied.reasons[0]


def test_setting_is_read_from_the_config_and_checked() -> None:
    cfg = parse_config({"policy": {"learned_sender_labels": 0}})
    assert cfg.policy.learned_sender_labels == 0
    assert decide(SPAM, dmarc(), config=cfg.policy).action is Action.QUARANTINE
    with pytest.raises(ConfigError) as info:
        parse_config({"policy": {"learned_sender_labels": -1}})
    assert info.value.key == "policy.learned_sender_labels"


def test_free_mail_counts_per_address_not_per_provider() -> None:
    labels: list[tuple[str | None, str, int]] = [
        ("ann@gmail.com", "ham", 1), ("bob@gmail.com", "ham", 1), ("cy@gmail.com", "ham", 1),
        ("dee@gmail.com", "ham", 3),
    ]
    assert LearnedSenders.from_labels(labels, 3).vouched("gmail.com") is None
    gmail = dmarc(domain="gmail.com")
    # three users released once each vouch for none of them, nor for Gmail's other users
    assert decide(BEC, gmail, from_addr="ann@gmail.com", labels=labels).action is Action.QUARANTINE
    assert decide(BEC, gmail, from_addr="eve@gmail.com", labels=labels).action is Action.QUARANTINE
    d = decide(BEC, gmail, from_addr="dee@gmail.com", labels=labels)
    assert d.action is Action.TAG and d.reasons[0].startswith("learned sender: dee@gmail.com passes DMARC")


def test_dmarc_for_another_from_domain_is_no_credit() -> None:
    # DMARC's From domain and the summary's From address disagree: trust neither
    assert decide(SPAM, dmarc(domain="other.example")).action is Action.QUARANTINE


def test_without_a_dmarc_record_an_aligned_dkim_signature_vouches() -> None:
    d = decide(SPAM, dmarc("none", signer="bulletin.example"))  # the parent domain signs: aligned
    assert d.action is Action.TAG
    assert d.reasons[0].startswith("learned sender: bulletin.example passes DKIM and admins labelled 3")


def test_bulk_labels_vouch_like_ham() -> None:
    # a newsletter the admins labelled bulk (wanted, in its own folder) three times
    labels: list[tuple[str | None, str, int]] = [(NEWS, "bulk", 2), ("editor@bulletin.example", "ham", 1)]
    assert LearnedSenders.from_labels(labels, 3).vouched("bulletin.example") == SenderLabels(3, 0)
    d = decide(SPAM, dmarc(), labels=labels)
    assert (d.verdict, d.action) == (Verdict.SPAM, Action.TAG)
    assert d.reasons[0].startswith("learned sender: bulletin.example passes DMARC and admins labelled 3")
    unknown = LearnedSenders.from_labels([(NEWS, "promo", 3)], 3)  # not a label we know: never vouches
    assert unknown.counts["bulletin.example"] == SenderLabels(0, 3)
