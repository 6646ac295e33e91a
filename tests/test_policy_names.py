"""Names as the policy compares them: the root's trailing dot, Unicode domains (IDN), and a learned
sender that a DNS blocklist lists. Real feature extraction and the real Policy, hand-made scores."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np

from milter.auth import AuthResults, DkimResult, DmarcResult
from milter.auth.dnsbl import Listing, Reputation
from milter.config import Lists, PolicyConfig, parse_config
from milter.features import extract
from milter.features.summary import Extracted, MessageSummary
from milter.policy import Policy
from milter.types import Action, Decision, Envelope, Scores, Verdict

META = {"spam": {"tag": 0.5, "quarantine": 0.9}, "bec": {"tag": 0.3, "quarantine": 0.6}}
HAM = Scores(ham=0.98, spam=0.01, bec=0.01)
IDN = "xn--bcher-kva.de"  # bücher.de, as mail and DNS carry it


def decide(cfg: PolicyConfig, from_header: str, mail_from: str = "bounce@relay.test",
           auth: AuthResults | None = None, rcpt: str = "bob@corp.test") -> Decision:
    raw = (f"From: {from_header}\r\nTo: {rcpt}\r\nSubject: hello\r\nMessage-ID: <m1@x.test>\r\n"
           "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nhi there\r\n").encode()
    policy = Policy(cfg, META)
    ext = extract(raw, Envelope(mail_from=mail_from), policy.protected)
    if auth is not None:
        ext = replace(ext, summary=replace(ext.summary, auth=auth))
    return policy.decide(HAM, ext, Envelope(mail_from=mail_from, rcpt_tos=(rcpt,), client_addr="203.0.113.9"))


def test_a_trailing_dot_does_not_dodge_the_deny_list() -> None:
    cfg = PolicyConfig(lists=Lists(deny_senders=("scammer@gmail.com",)))
    assert decide(cfg, "Scammer <scammer@gmail.com>").action is Action.QUARANTINE
    assert decide(cfg, "Scammer <scammer@gmail.com.>").action is Action.QUARANTINE
    assert decide(cfg, "Scammer <x@y.test>", mail_from="<Scammer@Gmail.com.>").action is Action.QUARANTINE


def test_a_trailing_dot_does_not_dodge_the_several_from_rule() -> None:
    """A From naming a protected address beside another: DMARC cannot judge it, this rule holds it."""
    cfg = PolicyConfig(protected_domains=("example.com",))
    for header in ("jane@example.com, x@relay.test", "jane@example.com., x@relay.test"):
        d = decide(cfg, header)
        assert (d.verdict, d.action) == (Verdict.BEC, Action.QUARANTINE), header


def _dmarc(result: Literal["pass", "fail"]) -> AuthResults:
    return AuthResults((DkimResult("mailer.test", "s1", "pass"),), DmarcResult(result, IDN, "reject"))


def test_a_domain_written_in_unicode_matches_the_mail_of_that_domain() -> None:
    """Config entries in Unicode are stored in A-labels: before, a protected bücher.de held every
    message of the site's own colleagues (xn--bcher-kva.de read as a lookalike of it), and a denied
    one matched nothing."""
    protected = parse_config({"policy": {"protected_domains": ["Bücher.de."]}}).policy
    assert protected.protected_domains == (IDN,)  # stored as compared, for every reader of the config
    genuine = decide(protected, f"Bob <bob@{IDN}>", auth=_dmarc("pass"))
    assert genuine.action is Action.ACCEPT, genuine.reasons
    spoofed = decide(protected, f"Bob <bob@{IDN}>", auth=_dmarc("fail"))
    assert spoofed.action is Action.QUARANTINE
    denied = parse_config({"policy": {"lists": {"deny_domains": ["bücher.de"]}}}).policy
    assert decide(denied, f"x <x@{IDN}>").action is Action.QUARANTINE
    rule = parse_config({"policy": {"domain": [{"domain": "bücher.de", "action_override": "tag"}]}}).policy
    assert rule.domains[0].domain == IDN


def _bulletin(**fields: object) -> Extracted:
    summary = MessageSummary(
        message_id="<m@test>", subject="This week", from_addr="news@mail.bulletin.example",
        from_display="Bulletin", from_domain="mail.bulletin.example", reply_to_addr=None,
        to_addrs=("bob@corp.test",), date=None, defects=(), from_org_domain="bulletin.example",
    )
    return Extracted(np.zeros(1, np.float32), replace(summary, **fields), ())  # type: ignore[arg-type]


def test_a_learned_sender_does_not_silence_a_blocklist() -> None:
    """The admins' labels cap the model's score at tag; a listing that holds the message holds it
    whatever the score. Before, the higher score made the learned-sender rule fire first and tag."""
    auth = AuthResults((DkimResult("mail.bulletin.example", "s1", "pass"),),
                       DmarcResult("pass", "mail.bulletin.example", "none"))
    listing = Listing("zen.spamhaus.org", "192.0.2.99", "client address", "127.0.0.4", "XBL",
                      Verdict.SPAM, Action.QUARANTINE)
    policy = Policy(PolicyConfig(), META, [("news@mail.bulletin.example", "ham", 3)])
    env = Envelope(rcpt_tos=("bob@corp.test",), client_addr="192.0.2.99")
    listed = _bulletin(auth=auth, reputation=Reputation((listing,)))
    for scores in (Scores(0.8, 0.15, 0.05), Scores(0.02, 0.95, 0.03)):
        assert policy.decide(scores, listed, env).action is Action.QUARANTINE, scores
    # unlisted, the labels still cap the model's quarantine at tag
    d = policy.decide(Scores(0.02, 0.95, 0.03), _bulletin(auth=auth), env)
    assert d.action is Action.TAG and "learned sender" in d.reasons[0]


def test_unicode_names_are_read_the_way_a_reader_and_the_owner_mean_them() -> None:
    """UTS #46, not Python's IDNA 2003 codec (which maps ß to ss: straße.de is strasse.de, someone
    else's); a protected domain in A-labels is still the name a reader sees for lookalikes; an SMTPUTF8
    sender's Unicode domain meets an entry written in Unicode; no recipient makes the rules raise."""
    cfg = parse_config({"policy": {"lists": {"deny_domains": ["straße.de"]}}}).policy
    assert cfg.lists.deny_domains == ("xn--strae-oqa.de",)
    protected = parse_config({"policy": {"protected_domains": ["bücher.de"]}}).policy
    lookalike = decide(protected, "Bob <bob@bucher.de>")
    assert (lookalike.verdict, lookalike.action) == (Verdict.BEC, Action.QUARANTINE), lookalike.reasons
    denied = parse_config({"policy": {"lists": {"deny_domains": ["bücher.de"],
                                                "deny_senders": ["jörg@bücher.de"]}}}).policy
    assert decide(denied, "x <x@y.test>", mail_from="<x@Bücher.de>").action is Action.QUARANTINE
    assert decide(denied, "x <x@y.test>", mail_from=f"<jörg@{IDN}.>").action is Action.QUARANTINE
    policy = Policy(parse_config({"policy": {"domain": [{"domain": "bücher.de", "action_override": "tag"}]}}
                                 ).policy, META)
    for odd in ("a@\u3000", "a@", "@", "a@b\udcff.test", "a@xn--.test", f"a@sub.{IDN}."):
        policy.rules_for(odd)  # never raises
    assert policy.rules_for("a@sub.bücher.de").domain == IDN
