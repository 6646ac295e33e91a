"""A From domain on an often-abused TLD is tagged at a lower spam score (milter/policy/abused_tld.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from milter.config import Lists, PolicyConfig, parse_config
from milter.errors import ConfigError
from milter.features.summary import Extracted, MessageSummary
from milter.policy import Policy
from milter.types import Envelope, Scores

META = {"spam": {"tag": 0.9, "quarantine": 0.99}, "bec": {"tag": 0.8, "quarantine": 0.95}}
LEANS = Scores(ham=0.40, spam=0.55, bec=0.05)  # not-ham 0.60: under the model's own tag cut
CLEAN = Scores(ham=0.70, spam=0.25, bec=0.05)  # not-ham 0.30
SPAM = Scores(ham=0.001, spam=0.995, bec=0.004)  # the ladder quarantines


def decide(domain: str, scores: Scores, config: PolicyConfig | None = None, **kw: object) -> tuple[str, ...]:
    summary = MessageSummary(
        message_id="<m@test>", subject="THIS sound frequency makes you smarter?",
        from_addr=f"brain_training@{domain}", from_display="Brain Training", from_domain=domain,
        reply_to_addr=None, to_addrs=("bob@corp.test",), date=None, defects=(), from_org_domain=domain,
    )
    ext = Extracted(np.zeros(1, np.float32), replace(summary, **kw), ())  # type: ignore[arg-type]
    env = Envelope(mail_from=f"bounce@{domain}", rcpt_tos=("bob@corp.test",), client_addr="192.0.2.7")
    d = Policy(config or PolicyConfig(), META).decide(scores, ext, env)
    return (d.verdict.value, d.action.value, *d.reasons)


def test_an_abused_tld_sender_the_model_leans_against_is_tagged_with_the_reason() -> None:
    verdict, action, reason, *_ = decide("fipie.shop", LEANS)
    assert (verdict, action) == ("spam", "tag")
    assert reason == ("sender domain fipie.shop is on an often-abused TLD (.shop) and scores 0.60 as spam "
                      "(at least 0.5 tags such mail)")


@pytest.mark.parametrize(
    ("domain", "scores"),
    [("fipie.shop", CLEAN), ("fipie.com", LEANS), ("shop.example.com", LEANS)],
    ids=["under-the-cut", "ordinary-tld", "tld-word-elsewhere"],
)
def test_otherwise_the_model_decides(domain: str, scores: Scores) -> None:
    assert decide(domain, scores)[:2] == ("ham", "accept")


def test_the_ladder_is_never_softened() -> None:
    assert decide("fipie.shop", SPAM)[:2] == ("spam", "quarantine")


def test_an_allow_list_entry_and_the_setting_turn_it_off() -> None:
    allowed = PolicyConfig(lists=Lists(allow_domains=("fipie.shop",)))
    assert decide("fipie.shop", LEANS, allowed)[:2] == ("ham", "accept")
    off = parse_config({"policy": {"abused_tld_tag": False}}).policy
    assert off.abused_tld_tag is None
    assert decide("fipie.shop", LEANS, off)[:2] == ("ham", "accept")
    stricter = parse_config({"policy": {"abused_tld_tag": 0.7}}).policy
    assert decide("fipie.shop", LEANS, stricter)[:2] == ("ham", "accept")
    assert decide("fipie.shop", Scores(ham=0.25, spam=0.7, bec=0.05), stricter)[:2] == ("spam", "tag")


def test_our_own_domain_on_such_a_tld_is_not_judged_by_it() -> None:
    ours = PolicyConfig(protected_domains=("fipie.shop",))
    assert decide("fipie.shop", LEANS, ours)[:2] == ("ham", "accept")


def test_an_unsubscribe_header_does_not_make_it_bulk() -> None:
    evidence = ("one-click unsubscribe (RFC 8058)", "DKIM signature of fipie.shop")
    assert decide("fipie.com", LEANS, bulk_evidence=evidence)[:2] == ("bulk", "accept")
    assert decide("fipie.shop", LEANS, bulk_evidence=evidence)[:2] == ("spam", "tag")


def test_a_recipient_domain_rule_keeps_it() -> None:
    cfg = parse_config({"policy": {"domain": [{"domain": "corp.test", "spam": {"tag": 0.95}}]}}).policy
    assert decide("fipie.shop", LEANS, cfg)[:2] == ("spam", "tag")


@pytest.mark.parametrize("value", [1.5, -0.1, "0.5", True])
def test_a_broken_setting_names_its_key(value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"policy": {"abused_tld_tag": value}})
    assert err.value.key == "policy.abused_tld_tag"


@pytest.mark.parametrize("domain", ["promosprout.help", "cookfest.bar", "countrystaff.autos", "pawhop.skin"])
def test_the_policy_judges_cheap_tlds_the_features_list_lacks(domain: str) -> None:
    from milter.features.lexicon import SUSPICIOUS_TLDS

    assert domain.rpartition(".")[2] not in SUSPICIOUS_TLDS  # the model's input, fixed with the model
    assert decide(domain, LEANS)[:2] == ("spam", "tag")
    features_only = parse_config({"policy": {"abused_tlds": []}}).policy
    assert decide(domain, LEANS, features_only)[:2] == ("ham", "accept")
    assert decide("fipie.shop", LEANS, features_only)[:2] == ("spam", "tag")


def test_an_admin_adds_a_tld() -> None:
    cfg = parse_config({"policy": {"abused_tlds": [".Zip", "best"]}}).policy
    assert decide("deals.best", LEANS, cfg)[:2] == ("spam", "tag")
    assert decide("deals.best", LEANS)[:2] == ("ham", "accept")
    assert decide("promosprout.help", LEANS, cfg)[:2] == ("ham", "accept")  # the list replaces the default


@pytest.mark.parametrize("value", [["not a tld"], ["x.y"], [""], "help", [3]])
def test_a_broken_tld_list_names_its_key(value: object) -> None:
    with pytest.raises(ConfigError) as err:
        Policy(parse_config({"policy": {"abused_tlds": value}}).policy, META)
    assert err.value.key == "policy.abused_tlds"
