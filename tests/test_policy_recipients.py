"""How the message addresses its recipients (milter/policy/recipients.py): a To header that tries one
mailbox name at three or more organisations is tagged at a lower spam score."""

from __future__ import annotations

from dataclasses import replace
from email.message import EmailMessage

import numpy as np
import pytest

from milter.config import PolicyConfig, parse_config
from milter.errors import ConfigError
from milter.features import extract
from milter.features.summary import Extracted, MessageSummary
from milter.policy import Policy
from milter.policy.recipients import guessed_mailbox, organisation
from milter.types import Envelope, Scores

META = {"spam": {"tag": 0.975, "quarantine": 0.99}, "bec": {"tag": 0.8, "quarantine": 0.95}}
LEANS = Scores(ham=0.50, spam=0.45, bec=0.05)  # not-ham 0.50: over the cut, under the model's tag cut
CLEAN = Scores(ham=0.80, spam=0.18, bec=0.02)  # not-ham 0.20: under the cut
SPAM = Scores(ham=0.001, spam=0.995, bec=0.004)  # the ladder quarantines

# The shop mailbox's message, its guesses at the recipient's name (the domains made .example).
GUESSES = (
    "mstone@gestation.example", "mstone@hopkintonschools.example", "mstone@midsouth.rr.example",
    "mstone@pefchattanooga.example", "mstone@sfgconsultants.example",
)


def summary(to: tuple[str, ...] = GUESSES, **kw: object) -> MessageSummary:
    base = MessageSummary(
        message_id="<m@test>", subject="Payment status update", from_addr="2022000624@cheonan.school.example",
        from_display="Ho", from_domain="cheonan.school.example", reply_to_addr=None, to_addrs=to, date=None,
        defects=(), from_org_domain="school.example",
        bulk_evidence=("one-click unsubscribe (RFC 8058)", "DKIM signature of school.example"),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def decide(
    scores: Scores, to: tuple[str, ...] = GUESSES, config: PolicyConfig | None = None,
    client: str = "192.0.2.7", **kw: object,
) -> tuple[str, ...]:
    ext = Extracted(np.zeros(1, np.float32), summary(to, **kw), ())
    env = Envelope(mail_from="x@relay.example", rcpt_tos=("mstone@gestation.example",), client_addr=client)
    d = Policy(config or PolicyConfig(), META).decide(scores, ext, env)
    return (d.verdict.value, d.action.value, *d.reasons)


def test_one_mailbox_name_tried_at_many_organisations_is_tagged_not_bulk() -> None:
    verdict, action, reason, *_ = decide(LEANS)
    assert (verdict, action) == ("spam", "tag")
    assert reason == (
        "To tries the mailbox 'mstone' at 5 organisations (gestation, hopkintonschools, pefchattanooga, "
        "...), and it scores 0.50 as spam (at least 0.3 tags such mail)"
    )
    # under the cut the ladder judges it, and its unsubscribe header makes it the bulk mail it says it is
    assert decide(CLEAN)[:2] == ("bulk", "accept")


def test_the_ladder_is_never_softened() -> None:
    assert decide(SPAM)[:2] == ("spam", "quarantine")


@pytest.mark.parametrize(
    "to",
    [
        GUESSES[:2],  # a person's work and home address: two is not a list of guesses
        ("jane@acme.example", "jane@acme.co.uk", "jane@mail.acme.de", "jane@acme.fr"),  # one company's names
        ("ann@a.example", "bob@b.example", "cy@c.example", "dee@d.example"),  # other people elsewhere
        ("mstone@gestation.example", "mstone@[192.0.2.1]", "mstone", "@b.example", "mstone@c.example"),
    ],
    ids=["two", "one-company", "different-people", "junk"],
)
def test_what_is_not_a_list_of_guesses(to: tuple[str, ...]) -> None:
    assert guessed_mailbox(to) is None
    assert decide(LEANS, to)[:2] == ("bulk", "accept")


def test_the_most_tried_name_is_the_one_named() -> None:
    to = ("a@x.example", "a@y.example", "a@z.example", *GUESSES)
    assert guessed_mailbox(to) == (
        "mstone", ("gestation", "hopkintonschools", "pefchattanooga", "rr", "sfgconsultants")
    )
    assert guessed_mailbox(["A@x.example", "a@Y.example", "a@z.EXAMPLE"]) == ("a", ("x", "y", "z"))


def test_organisation_names_a_registrable_domain_without_its_suffix() -> None:
    assert organisation("mail.acme.co.uk") == "acme"
    assert organisation("midsouth.rr.com") == "rr"
    assert organisation("[192.0.2.1]") == ""
    assert organisation("") == ""


def test_our_own_clients_domains_lists_and_reports_are_not_judged() -> None:
    assert decide(LEANS, client="10.1.2.3")[0] != "spam"
    ours = PolicyConfig(protected_domains=("school.example",))
    assert decide(LEANS, config=ours)[0] != "spam"
    assert decide(LEANS, list_mail=True)[0] != "spam"
    assert decide(LEANS, auto_report=True)[0] != "spam"


def test_the_rule_can_be_turned_off_or_its_cut_moved() -> None:
    off = parse_config({"policy": {"harvested_recipients_tag": False}}).policy
    assert off.harvested_recipients_tag is None
    assert decide(LEANS, config=off)[0] != "spam"
    strict = parse_config({"policy": {"harvested_recipients_tag": 0.6}}).policy
    assert decide(LEANS, config=strict)[0] != "spam"
    assert decide(Scores(ham=0.3, spam=0.65, bec=0.05), config=strict)[:2] == ("spam", "tag")


@pytest.mark.parametrize("value", [1.5, -0.1, "high", True])
def test_a_bad_setting_names_its_key(value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"policy": {"harvested_recipients_tag": value}})
    assert err.value.key == "policy.harvested_recipients_tag"


def test_extraction_gives_the_rule_the_to_header() -> None:
    msg = EmailMessage()
    msg["From"] = "Ho <2022000624@cheonan.school.example>"
    msg["To"] = ", ".join(GUESSES)
    msg["Subject"] = "Payment status update for order Acknowledgement"
    msg.set_content("Please find the payment status attached.")
    ext = extract(bytes(msg))
    assert guessed_mailbox(ext.summary.to_addrs) == (
        "mstone", ("gestation", "hopkintonschools", "pefchattanooga", "rr", "sfgconsultants")
    )
    env = Envelope(mail_from="x@relay.example", rcpt_tos=(GUESSES[0],), client_addr="192.0.2.7")
    decision = Policy(PolicyConfig(), META).decide(LEANS, ext, env)
    assert (decision.verdict.value, decision.action.value) == ("spam", "tag")
