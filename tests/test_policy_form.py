"""How the headers are formed (milter/policy/form.py): a "Re:" that answers nothing and a From that names
no mailbox are tagged at lower spam scores; bounces, list copies and our own clients are not judged."""

from __future__ import annotations

from dataclasses import replace
from email.message import EmailMessage
from typing import Any

import numpy as np
import pytest

from milter.config import PolicyConfig, parse_config
from milter.errors import ConfigError
from milter.features import extract
from milter.features.summary import Extracted, MessageSummary
from milter.policy import Policy
from milter.policy.form import names_mailbox
from milter.types import Envelope, Scores

META = {"spam": {"tag": 0.975, "quarantine": 0.99}, "bec": {"tag": 0.8, "quarantine": 0.95}}
LEANS = Scores(ham=0.36, spam=0.60, bec=0.04)  # not-ham 0.64: over both cuts, under the model's tag cut
FAINT = Scores(ham=0.60, spam=0.36, bec=0.04)  # not-ham 0.40: over the no-mailbox cut only
CLEAN = Scores(ham=0.80, spam=0.18, bec=0.02)  # not-ham 0.20: under both
SPAM = Scores(ham=0.001, spam=0.995, bec=0.004)  # the ladder quarantines


def summary(**kw: object) -> MessageSummary:
    base = MessageSummary(
        message_id="<m@test>", subject="Re: your order", from_addr="aaa-1044@idealbookclub.example",
        from_display="AAA - Car Emergency Kit", from_domain="idealbookclub.example", reply_to_addr=None,
        to_addrs=("bob@corp.test",), date=None, defects=(), from_org_domain="idealbookclub.example",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def decide(
    scores: Scores, config: PolicyConfig | None = None, client: str = "192.0.2.7", **kw: object
) -> tuple[str, ...]:
    ext = Extracted(np.zeros(1, np.float32), summary(**kw), ())
    env = Envelope(mail_from="x@relay.example", rcpt_tos=("bob@corp.test",), client_addr=client)
    d = Policy(config or PolicyConfig(), META).decide(scores, ext, env)
    return (d.verdict.value, d.action.value, *d.reasons)


# --- a reply that answers nothing --------------------------------------------------------------------


def test_a_reply_to_nothing_is_tagged_where_the_model_leans_to_spam() -> None:
    verdict, action, reason, *_ = decide(LEANS, fake_reply=True)
    assert (verdict, action) == ("spam", "tag")
    assert "answers nothing" in reason and "0.64" in reason and "at least 0.5" in reason


def test_a_reply_to_nothing_the_model_finds_harmless_is_accepted() -> None:
    assert decide(FAINT, fake_reply=True)[:2] == ("ham", "accept")  # Outlook 2001 replied like this
    assert decide(LEANS, fake_reply=False)[:2] == ("ham", "accept")


# --- a From that names no mailbox ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("display", "addr"),
    [
        (None, None),  # no From header at all
        ("citi", ""),  # a name and no address
        ("", "invalid-email-format"),  # a template's placeholder
        ("", "=?utf-8?q?singapore-post_parcel_=3celieserchaves=40hotmail=2e?="),  # "@" left as =40
    ],
    ids=["none", "name-only", "no-at", "encoded-word"],
)
def test_a_from_without_a_mailbox_is_tagged_from_a_low_score(display: str | None, addr: str | None) -> None:
    verdict, action, reason, *_ = decide(FAINT, from_display=display, from_addr=addr, from_org_domain=None,
                                         subject="Your parcel", fake_reply=False)
    assert (verdict, action) == ("spam", "tag")
    assert "names no mailbox" in reason
    assert (display is None) is reason.startswith("From names no mailbox")
    assert decide(CLEAN, from_display=display, from_addr=addr, from_org_domain=None)[:2] == ("ham", "accept")


@pytest.mark.parametrize("display", ["MAILER-DAEMON", "Mail Delivery System", " postmaster "])
def test_a_bounce_from_an_old_mta_is_not_judged_for_its_from(display: str) -> None:
    assert decide(LEANS, from_display=display, from_addr="", from_org_domain=None)[:2] == ("ham", "accept")


@pytest.mark.parametrize(
    ("addr", "mailbox"),
    [("bob@corp.test", True), ("bob@", False), ("@corp.test", False), ("bob", False), ("", False),
     (None, False), ("=?utf-8?b?Ym9iQGNvcnAudGVzdA==?=", False), ('"a@b"@corp.test', True)],
)
def test_what_counts_as_a_mailbox(addr: str | None, mailbox: bool) -> None:
    assert names_mailbox(addr) is mailbox


# --- what both share -----------------------------------------------------------------------------------

FAKE: dict[str, Any] = {"fake_reply": True}
NOBODY: dict[str, Any] = {"from_addr": "", "from_display": "citi", "from_org_domain": None}


@pytest.mark.parametrize("kw", [FAKE, NOBODY], ids=["fake-reply", "no-mailbox"])
def test_the_ladder_is_never_softened(kw: dict[str, Any]) -> None:
    assert decide(SPAM, **kw)[:2] == ("spam", "quarantine")


@pytest.mark.parametrize("kw", [FAKE, NOBODY], ids=["fake-reply", "no-mailbox"])
def test_our_clients_list_copies_and_reports_are_not_judged(kw: dict[str, Any]) -> None:
    assert decide(LEANS, **kw)[0] == "spam"
    assert decide(LEANS, client="10.1.2.3", **kw)[0] == "ham"
    assert decide(LEANS, list_mail=True, **kw)[0] == "ham"
    assert decide(LEANS, auto_report=True, **kw)[0] == "ham"


def test_our_own_domain_is_not_judged_for_a_reply_to_nothing() -> None:
    ours = PolicyConfig(protected_domains=("idealbookclub.example",))
    assert decide(LEANS, config=ours, fake_reply=True)[0] == "ham"


@pytest.mark.parametrize(("key", "kw"), [("fake_reply_tag", FAKE), ("no_mailbox_tag", NOBODY)])
def test_each_rule_can_be_turned_off_or_moved(key: str, kw: dict[str, Any]) -> None:
    off = parse_config({"policy": {key: False}}).policy
    assert getattr(off, key) is None
    assert decide(LEANS, config=off, **kw)[0] == "ham"
    stricter = parse_config({"policy": {key: 0.7}}).policy
    assert decide(LEANS, config=stricter, **kw)[0] == "ham"  # 0.64 is under 0.7


@pytest.mark.parametrize("key", ["fake_reply_tag", "no_mailbox_tag", "several_from_tag"])
@pytest.mark.parametrize("value", [1.5, -0.1, "high", True])
def test_a_bad_setting_names_its_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"policy": {key: value}})
    assert err.value.key == f"policy.{key}"


# --- what extraction gives the rules -------------------------------------------------------------------


def _mail(subject: str, from_header: str | None = "Kit <kit@idealbookclub.example>", **headers: str) -> bytes:
    msg = EmailMessage()
    if from_header is not None:
        msg["From"] = from_header
    msg["To"] = "bob@corp.test"
    msg["Subject"] = subject
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Your emergency kit is waiting.")
    return bytes(msg)


@pytest.mark.parametrize(
    ("subject", "headers", "fake"),
    [
        ("Re: Your order", {}, True),
        ("AW: Ihre Bestellung", {}, True),
        ("Re: Your order", {"In_Reply_To": "<a@corp.test>"}, False),
        ("Re: Your order", {"References": "<a@corp.test>"}, False),
        ("Your order", {}, False),
        ("Fwd: Your order", {}, False),
    ],
)
def test_extraction_reads_a_reply_to_nothing(subject: str, headers: dict[str, str], fake: bool) -> None:
    assert extract(_mail(subject, **headers)).summary.fake_reply is fake


def test_a_real_message_without_from_is_tagged_end_to_end() -> None:
    ext = extract(_mail("Your parcel is waiting", from_header=None))
    assert not names_mailbox(ext.summary.from_addr)
    env = Envelope(mail_from="x@relay.example", rcpt_tos=("bob@corp.test",), client_addr="192.0.2.7")
    d = Policy(PolicyConfig(), META).decide(FAINT, ext, env)
    assert (d.verdict.value, d.action.value) == ("spam", "tag")
    assert d.reasons[0].startswith("From names no mailbox")


def test_an_unquoted_comma_in_the_display_name_is_not_a_missing_mailbox() -> None:
    # "Smith, John <j@x>" parses as two addresses, "Smith" first: the mailbox is there, after the comma;
    # what is wrong with it is that it gives two addresses
    ext = extract(_mail("Your parcel is waiting", from_header="Kundenservice, jehd <service@shop.example>"))
    assert not names_mailbox(ext.summary.from_addr)
    assert ext.summary.from_others == (("jehd", "service@shop.example"),)
    env = Envelope(mail_from="x@relay.example", rcpt_tos=("bob@corp.test",), client_addr="192.0.2.7")
    d = Policy(PolicyConfig(), META).decide(CLEAN, ext, env)
    assert (d.verdict.value, d.action.value) == ("spam", "tag")
    assert d.reasons[0] == (
        "From reads as 2 addresses (an unquoted comma before service@shop.example), and it scores 0.20 as "
        "spam"
    )
    assert not any("names no mailbox" in r for r in d.reasons)
    assert decide(FAINT, from_display="", from_addr="kundenservice", from_org_domain=None)[0] == "spam"


# --- a From with several addresses ---------------------------------------------------------------------

SEVERAL: dict[str, Any] = {"from_others": (("Microsoft", "no-reply@access.example"),)}


def test_several_from_addresses_are_tagged_at_any_score() -> None:
    verdict, action, reason, *_ = decide(CLEAN, fake_reply=False, **SEVERAL)
    assert (verdict, action) == ("spam", "tag")
    assert reason.startswith("From gives 2 addresses") and "at least" not in reason
    assert decide(CLEAN, fake_reply=False)[:2] == ("ham", "accept")


def test_several_from_addresses_from_our_clients_or_a_list_are_not_judged() -> None:
    assert decide(CLEAN, client="10.1.2.3", **SEVERAL)[0] == "ham"
    assert decide(CLEAN, list_mail=True, **SEVERAL)[0] == "ham"
    assert decide(SPAM, **SEVERAL)[:2] == ("spam", "quarantine")  # never softer than the ladder


def test_the_several_from_rule_can_be_given_a_cut_or_turned_off() -> None:
    off = parse_config({"policy": {"several_from_tag": False}}).policy
    assert decide(CLEAN, config=off, fake_reply=False, **SEVERAL)[0] == "ham"
    cut = parse_config({"policy": {"several_from_tag": 0.3}}).policy
    assert decide(CLEAN, config=cut, fake_reply=False, **SEVERAL)[0] == "ham"  # 0.20 is under 0.3
    assert decide(FAINT, config=cut, fake_reply=False, **SEVERAL)[0] == "spam"
