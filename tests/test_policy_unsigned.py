"""HTML mail with no DKIM signature and no unsubscribe offer is tagged at a lower spam score
(milter/policy/unsigned.py), and feature extraction says which mail that is."""

from __future__ import annotations

from dataclasses import replace
from email.message import EmailMessage
from typing import Any

import numpy as np
import pytest

from milter.auth import ArcResult, AuthResults, DkimResult, DmarcResult
from milter.config import Lists, PolicyConfig, parse_config
from milter.errors import ConfigError
from milter.features import SCHEMA, extract
from milter.features.summary import Extracted, MessageSummary
from milter.policy import Policy
from milter.types import Envelope, Scores

META = {"spam": {"tag": 0.975, "quarantine": 0.99}, "bec": {"tag": 0.8, "quarantine": 0.95}}
LEANS = Scores(ham=0.05, spam=0.90, bec=0.05)  # not-ham 0.95: under the model's own tag cut
CLEAN = Scores(ham=0.20, spam=0.75, bec=0.05)  # not-ham 0.80: under the rule's cut too
SPAM = Scores(ham=0.001, spam=0.995, bec=0.004)  # the ladder quarantines
DOMAIN = "deals.example"


def summary(**kw: object) -> MessageSummary:
    base = MessageSummary(
        message_id="<m@test>", subject="Refinance without perfect credit", from_addr=f"offers@{DOMAIN}",
        from_display="Great Rates", from_domain=DOMAIN, reply_to_addr=None, to_addrs=("bob@corp.test",),
        date=None, defects=(), from_org_domain=DOMAIN, html=True,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def decide(
    scores: Scores = LEANS, config: PolicyConfig | None = None, client: str = "192.0.2.7", **kw: object
) -> tuple[str, ...]:
    ext = Extracted(np.zeros(1, np.float32), summary(**kw), ())
    env = Envelope(mail_from=f"bounce@{DOMAIN}", rcpt_tos=("bob@corp.test",), client_addr=client)
    d = Policy(config or PolicyConfig(), META).decide(scores, ext, env)
    return (d.verdict.value, d.action.value, *d.reasons)


def verified(dkim: tuple[str, ...] = (), arc: ArcResult | None = None, dmarc: str = "none") -> AuthResults:
    """What the gateway found: one signature by DOMAIN per entry of `dkim` (its result), DMARC `dmarc`."""
    return AuthResults(
        tuple(DkimResult(DOMAIN, "s1", r) for r in dkim),  # type: ignore[arg-type]
        DmarcResult(dmarc, DOMAIN, None),  # type: ignore[arg-type]
        arc=arc or ArcResult(),
    )


def test_unsigned_html_the_model_leans_against_is_tagged_with_the_reason() -> None:
    verdict, action, reason, *_ = decide()
    assert (verdict, action) == ("spam", "tag")
    assert reason == ("HTML mail with no DKIM signature and no unsubscribe offer scores 0.95 as spam "
                      "(at least 0.93 tags such mail)")


@pytest.mark.parametrize(
    ("scores", "kw"),
    [
        (CLEAN, {}),
        (LEANS, {"html": False}),
        (LEANS, {"dkim_signers": (DOMAIN,)}),
        (LEANS, {"dkim_signers": ("esp.example",)}),
        (LEANS, {"bulk_evidence": ("List-Unsubscribe",)}),
        (LEANS, {"bulk_evidence": ("Feedback-ID",)}),
        (LEANS, {"list_mail": True}),
        (LEANS, {"auto_report": True}),
    ],
    ids=["under-the-cut", "plain-text", "signed", "signed-by-its-platform", "unsubscribe", "feedback-id",
         "list-copy", "bounce"],
)
def test_otherwise_the_model_decides(scores: Scores, kw: dict[str, Any]) -> None:
    assert decide(scores, **kw)[:2] == ("ham", "accept")


def test_the_ladder_is_never_softened() -> None:
    assert decide(SPAM)[:2] == ("spam", "quarantine")


def test_our_own_clients_and_domains_are_never_judged_by_it() -> None:
    assert decide(client="10.1.2.3")[:2] == ("ham", "accept")
    ours = PolicyConfig(protected_domains=(DOMAIN,))
    assert decide(config=ours)[:2] == ("ham", "accept")


@pytest.mark.parametrize(
    ("auth", "tagged"),
    [
        (verified(("fail",)), True),
        (verified(("permerror", "neutral")), True),
        (verified(()), True),
        (verified(("fail", "pass")), False),
        (verified(("temperror",)), False),
        (verified((), ArcResult("pass", 1, "lists.example", trusted=True)), False),
        (verified((), ArcResult("pass", 1, "relay.example", trusted=False)), True),
        (verified((), dmarc="pass"), False),
        (verified(("fail",), dmarc="fail"), True),
    ],
    ids=["broken-signature", "permerror-neutral", "none", "one-verified", "dns-error", "trusted-arc",
         "untrusted-arc", "spf-aligned-dmarc-pass", "dmarc-fail"],
)
def test_with_verification_only_a_signature_that_holds_counts(auth: AuthResults, tagged: bool) -> None:
    # the header is there either way: what verification said decides, so a forged header does not dodge it
    got = decide(dkim_signers=(DOMAIN,), auth=auth)[:2]
    assert got == (("spam", "tag") if tagged else ("ham", "accept"))


def test_an_allow_list_entry_and_the_setting_turn_it_off() -> None:
    allowed = PolicyConfig(lists=Lists(allow_domains=(DOMAIN,)))
    assert decide(config=allowed)[:2] == ("ham", "accept")
    off = parse_config({"policy": {"unsigned_html_tag": False}}).policy
    assert off.unsigned_html_tag is None
    assert decide(config=off)[:2] == ("ham", "accept")
    stricter = parse_config({"policy": {"unsigned_html_tag": 0.97}}).policy
    assert decide(config=stricter)[:2] == ("ham", "accept")
    assert decide(Scores(ham=0.02, spam=0.95, bec=0.03), stricter)[:2] == ("spam", "tag")


@pytest.mark.parametrize("key", ["unsigned_html_tag", "odd_digest_tag", "image_only_tag"])
@pytest.mark.parametrize("value", [1.5, -0.1, "high", True])
def test_a_bad_setting_names_its_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"policy": {key: value}})
    assert err.value.key == f"policy.{key}"


def _mail(html: bool, headers: dict[str, str]) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Great Rates <offers@mail.{DOMAIN}>"
    msg["To"] = "bob@corp.test"
    msg["Subject"] = "Refinance without perfect credit"
    for name, value in headers.items():
        msg[name] = value
    msg.set_content("Rates are down. Reply today.")
    if html:
        msg.add_alternative("<html><body><p>Rates are <b>down</b>.</p></body></html>", subtype="html")
    return bytes(msg)


def test_extraction_says_what_the_rule_reads() -> None:
    bare = extract(_mail(True, {})).summary
    assert (bare.html, bare.dkim_signers, bare.auto_report, bare.bulk_evidence) == (True, (), False, ())
    signed = extract(_mail(True, {"DKIM-Signature": f"v=1; a=rsa-sha256; d=mail.{DOMAIN}; s=s1; b=AAAA"}))
    assert signed.summary.dkim_signers == (DOMAIN,)  # registrable, as the alignment rules compare
    plain = extract(_mail(False, {"Auto-Submitted": "auto-replied"})).summary
    assert (plain.html, plain.auto_report) == (False, True)


# --- a digest that holds no messages ------------------------------------------------------------------

DIGEST_SPAM = b"""From: Coca-Cola <win@promo.example>
To: bob@corp.test
Subject: Congratulations, you won!
MIME-Version: 1.0
Content-Type: multipart/digest; boundary="b1"

--b1
Content-Type: text/html; charset=utf-8

<html><body><a href="https://promo.example/claim">Claim your prize</a></body></html>
--b1--
"""

LIST_DIGEST = b"""From: users-request@lists.example
To: bob@corp.test
Subject: users Digest, Vol 12, Issue 3
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: text/plain

Today's Topics: 1. Re: build fails
--outer
Content-Type: multipart/digest; boundary="d"

--d

From: alice@example.org
Subject: Re: build fails

Try make clean.
--d
Content-Type: message/rfc822

From: carol@example.org
Subject: Re: build fails

Works now.
--d--
--outer--
"""


def _forwarded(inner: bytes) -> bytes:
    head = b"From: bob@corp.test\nTo: abuse@corp.test\nSubject: Fwd: look\nMIME-Version: 1.0\n"
    head += b'Content-Type: multipart/mixed; boundary="f"\n\n--f\nContent-Type: text/plain\n\nSee attached.\n'
    return head + b"--f\nContent-Type: message/rfc822\n\n" + inner + b"\n--f--\n"


@pytest.mark.parametrize(
    ("raw", "odd"),
    [(DIGEST_SPAM, True), (LIST_DIGEST, False), (_forwarded(DIGEST_SPAM), False)],
    ids=["html-in-a-digest", "a-list-digest-of-messages", "such-a-digest-forwarded-whole"],
)
def test_extraction_finds_a_digest_that_holds_no_messages(raw: bytes, odd: bool) -> None:
    assert extract(raw).summary.odd_digest is odd


def test_an_odd_digest_the_model_leans_against_is_tagged() -> None:
    leans = Scores(ham=0.3, spam=0.6, bec=0.1)
    verdict, action, reason, *_ = decide(leans, html=False, odd_digest=True)
    assert (verdict, action) == ("spam", "tag")
    assert reason == "a digest that holds no messages, scored 0.70 as spam (at least 0.5 tags such mail)"
    assert decide(Scores(ham=0.6, spam=0.3, bec=0.1), html=False, odd_digest=True)[:2] == ("ham", "accept")
    assert decide(leans, html=False, odd_digest=True, list_mail=True)[:2] == ("ham", "accept")
    assert decide(leans, client="10.1.2.3", html=False, odd_digest=True)[:2] == ("ham", "accept")
    assert decide(SPAM, html=False, odd_digest=True)[:2] == ("spam", "quarantine")
    off = parse_config({"policy": {"odd_digest_tag": False}}).policy
    assert decide(leans, off, html=False, odd_digest=True)[:2] == ("ham", "accept")


def _picture_mail(text: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Daily Burn <offers@mail.{DOMAIN}>"
    msg["To"] = "bob@corp.test"
    msg["Subject"] = "Fat-Burning Coffee Is Here"
    msg.set_content("Open the picture.")
    msg.add_alternative(f'<html><body><a href="https://{DOMAIN}/c"><img src="https://{DOMAIN}/a.png"></a>'
                        f"<p>{text}</p></body></html>", subtype="html")
    return bytes(msg)


@pytest.mark.parametrize(
    ("raw", "image_only"),
    [
        (_picture_mail("Click the image."), True),
        (_picture_mail("Our autumn range is in. " * 8), False),  # a picture beside a paragraph of text
        (_mail(False, {}), False),
    ],
    ids=["a-picture-and-a-line", "a-picture-and-a-paragraph", "plain-text"],
)
def test_extraction_finds_html_that_is_pictures(raw: bytes, image_only: bool) -> None:
    ext = extract(raw)
    assert ext.summary.image_only is image_only
    assert bool(ext.vector[SCHEMA.names.index("html_image_only")]) is image_only  # the model's own fact


SIGNED_BULK: dict[str, Any] = {
    "dkim_signers": (DOMAIN,),
    "bulk_evidence": ("one-click unsubscribe (RFC 8058)", f"DKIM signature of {DOMAIN}"),
}


LEANS_PICTURE = Scores(ham=0.3, spam=0.6, bec=0.1)  # not-ham 0.7: over the rule's cut, far under the model's


def test_pictures_with_almost_no_text_the_model_leans_against_are_tagged_signed_or_not() -> None:
    leans = LEANS_PICTURE
    verdict, action, reason, *_ = decide(leans, image_only=True, **SIGNED_BULK)
    assert (verdict, action) == ("spam", "tag")  # before the bulk rule: an unsubscribe header is no excuse
    assert reason == ("HTML that is images with almost no text, and it scores 0.70 as spam "
                      "(at least 0.5 tags such mail)")
    assert decide(leans, **SIGNED_BULK)[:2] == ("bulk", "accept")  # the same mail with text in it


@pytest.mark.parametrize(
    ("scores", "kw"),
    [
        (Scores(ham=0.6, spam=0.3, bec=0.1), {}),
        (LEANS_PICTURE, {"list_mail": True}),
        (LEANS_PICTURE, {"auto_report": True}),
        (LEANS_PICTURE, {"client": "10.1.2.3"}),
        (LEANS_PICTURE, {"config": parse_config({"policy": {"image_only_tag": False}}).policy}),
    ],
    ids=["under-the-cut", "list-copy", "bounce", "internal-client", "off"],
)
def test_pictures_are_otherwise_left_to_the_model(scores: Scores, kw: dict[str, Any]) -> None:
    assert decide(scores, image_only=True, dkim_signers=(DOMAIN,), **kw)[:2] == ("ham", "accept")


def test_pictures_the_ladder_would_quarantine_stay_quarantined() -> None:
    assert decide(SPAM, image_only=True, dkim_signers=(DOMAIN,))[:2] == ("spam", "quarantine")
