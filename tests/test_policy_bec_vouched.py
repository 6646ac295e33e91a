"""A disguised sender talking money (milter/policy/bec.py) is not held once the admins have vouched for
that very sender and its own domain authenticates the message; the other BEC pretexts still are."""

from __future__ import annotations

from dataclasses import replace
from email.message import EmailMessage

import numpy as np
import pytest

from milter.auth import AuthResults, DkimResult, DmarcResult
from milter.config import Lists, PolicyConfig
from milter.features import extract
from milter.features.summary import Extracted, MessageSummary
from milter.policy import Policy
from milter.types import Action, Decision, Envelope, Scores, Verdict

META = {"spam": {"tag": 0.975, "quarantine": 0.99}, "bec": {"tag": 0.8, "quarantine": 0.95}}
HAM = Scores(ham=0.99, spam=0.005, bec=0.005)  # the model finds the invoice harmless
ROOFER = "gandiroofingsolutions@gmail.com"
# three released invoices (policy.learned_sender_labels is 3)
VOUCHED: list[tuple[str | None, str, int]] = [(ROOFER, "ham", 3)]


def dmarc(result: str = "pass", domain: str = "gmail.com") -> AuthResults:
    return AuthResults((DkimResult(domain, "s1", "pass"),), DmarcResult(result, domain, "none"))  # type: ignore[arg-type]


def summary(from_addr: str = ROOFER, **kw: object) -> MessageSummary:
    base = MessageSummary(
        message_id="<m@test>", subject="Pay invoice C M 1542A from G&I Roofing Solutions, LLC",
        from_addr=from_addr, from_display="G&I Roofing Solutions, LLC", from_domain="gmail.com",
        reply_to_addr=None, to_addrs=("bob@corp.test",), date=None, defects=(), from_org_domain="gmail.com",
        freemail_sender=True, disguised_sender=True, language=frozenset({"payment", "money"}), auth=dmarc(),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


Labels = list[tuple[str | None, str, int]]


def decide(s: MessageSummary, labels: Labels | None = None, config: PolicyConfig | None = None) -> Decision:
    ext = Extracted(np.zeros(1, np.float32), s, ())
    env = Envelope(mail_from=s.from_addr, rcpt_tos=("bob@corp.test",), client_addr="192.0.2.7")
    return Policy(config or PolicyConfig(), META, labels or []).decide(HAM, ext, env)


def held(d: Decision) -> bool:
    return (d.verdict, d.action) == (Verdict.BEC, Action.QUARANTINE)


def test_an_unknown_disguised_sender_talking_money_is_held() -> None:
    d = decide(summary())
    assert held(d)
    assert d.reasons[0] == (
        f"display name 'G&I Roofing Solutions, LLC' disguises the sender {ROOFER} and the message is "
        "about money"
    )


def test_a_sender_the_admins_vouched_for_is_not_held_and_says_why() -> None:
    d = decide(summary(), VOUCHED)
    assert (d.verdict, d.action) == (Verdict.HAM, Action.ACCEPT)
    assert (
        f"display name 'G&I Roofing Solutions, LLC' disguises the sender {ROOFER} and the message is about "
        f"money; not held: the admins labelled 3 messages of {ROOFER} as wanted and DMARC passed"
    ) in d.reasons


@pytest.mark.parametrize(
    ("s", "labels"),
    [
        (summary(auth=None), VOUCHED),  # no DNS answer: nothing proves the sender is the one vouched for
        (summary(auth=dmarc("fail")), VOUCHED),  # a spoof of the vouched address
        (summary(auth=dmarc(domain="other.example")), VOUCHED),  # DMARC of another domain
        (summary(), [("g.and.i.roofing@gmail.com", "ham", 9)]),  # free-mail counts per address
        (summary(), [(ROOFER, "ham", 2)]),  # under policy.learned_sender_labels
        (summary(), [*VOUCHED, (ROOFER, "bec", 1)]),  # one confirmed fraud ends it
    ],
    ids=["no-auth", "dmarc-fail", "other-domain", "other-address", "too-few", "once-bad"],
)
def test_without_an_authenticated_vouched_sender_it_is_still_held(
    s: MessageSummary, labels: Labels
) -> None:
    assert held(decide(s, labels))


def test_an_allow_entry_for_the_address_counts_when_the_message_authenticates() -> None:
    allowed = PolicyConfig(lists=Lists(allow_senders=(ROOFER,)))
    d = decide(summary(), config=allowed)
    assert (d.verdict, d.action) == (Verdict.HAM, Action.ACCEPT)
    assert f"not held: {ROOFER} is on the allow list and DMARC passed" in " | ".join(d.reasons)
    assert held(decide(summary(auth=None), config=allowed))  # the allow list alone does not prove who sent it


def test_a_vouched_sender_asking_to_change_bank_details_is_still_held() -> None:
    changed = summary(language=frozenset({"payment", "bank_change", "urgency"}))
    d = decide(changed, VOUCHED)
    assert held(d)
    assert d.reasons[0].startswith("asks to change bank or payroll details")


def test_extraction_gives_the_rule_what_it_reads() -> None:
    msg = EmailMessage()
    msg["From"] = f"\"G&I Roofing Solutions, LLC\" <{ROOFER}>"
    msg["To"] = "bob@corp.test"
    msg["Subject"] = "Pay invoice C M 1542A from G&I Roofing Solutions, LLC"
    msg.set_content("Hello, please find your invoice attached. The payment of $1,250.00 is due by Friday.")
    s = replace(extract(bytes(msg)).summary, auth=dmarc())
    assert s.disguised_sender and s.freemail_sender and "payment" in s.language
    assert held(decide(s))
    assert not held(decide(s, VOUCHED))
