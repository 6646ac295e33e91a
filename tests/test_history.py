"""The correspondence history (milter/history.py), its signals (milter/history_signals.py), the BEC case
generator (training/bec_cases.py) and the replay (training/replay.py) on synthetic mailboxes."""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from milter.features.context import Protected
from milter.history import (
    CorrespondenceHistory,
    HistoryLimits,
    HistoryRow,
    HistoryView,
    MessageFacts,
    machine_mail,
    normal_name,
    personal_local,
    seen_as,
    stored_facts,
)
from milter.history_signals import (
    correspondent_elsewhere,
    display_name_new_address,
    evaluate,
    first_contact_money,
    first_contact_org,
    first_contact_recipient,
    imitated,
    reply_to_unseen,
)
from training import bec_cases, replay

T0 = datetime(2001, 1, 1, tzinfo=UTC)
OURS = Protected(domains=("example.com",))
ALICE = "alice@example.com"  # one of our users
BOB = "bob@example.com"  # another


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def inbound(sender: str, *rcpts: str, display: str = "", reply_to: str = "",
            language: frozenset[str] = frozenset()) -> MessageFacts:
    return MessageFacts(sender, display, rcpts or (ALICE,), reply_to, language)


def signals_for(history: CorrespondenceHistory, facts: MessageFacts) -> dict[str, str]:
    return evaluate(facts, history.lookup(facts, OURS.names), OURS)


# --- the history -------------------------------------------------------------------------------------


def test_first_contact_then_known() -> None:
    h = CorrespondenceHistory()
    msg = inbound("jane@vendor.com")
    before = h.lookup(msg)
    assert before.address is None and before.key is None
    assert before.new_to_address == (ALICE,) and before.new_to_key == (ALICE,)
    h.observe(msg, day(0), outbound=False)
    after = h.lookup(msg)
    assert after.address is not None and after.address.inbound == 1 and after.address.outbound == 0
    assert after.key is not None and after.key.first_seen == day(0).timestamp()
    assert after.new_to_address == () and after.new_to_key == ()
    h.observe(msg, day(3), outbound=False)
    known = h.lookup(msg)
    assert known.address is not None
    assert (known.address.inbound, known.address.last_seen) == (2, day(3).timestamp())


def test_organisation_level_versus_recipient_level() -> None:
    h = CorrespondenceHistory()
    h.observe(inbound("jane@vendor.com", ALICE), day(0), outbound=False)
    # to Bob: the organisation knows jane and vendor.com, Bob does not
    to_bob = h.lookup(inbound("jane@vendor.com", BOB))
    assert to_bob.address is not None and to_bob.new_to_address == (BOB,) and to_bob.new_to_key == (BOB,)
    # a colleague of jane's: new address, known domain, and known to Alice at domain level only
    colleague = h.lookup(inbound("joe@vendor.com", ALICE))
    assert colleague.address is None and colleague.key is not None
    assert colleague.new_to_address == (ALICE,) and colleague.new_to_key == ()
    # one message to two of our users counts once for the organisation, once per pair
    h.observe(inbound("sam@other.org", ALICE, BOB), day(1), outbound=False)
    both = h.lookup(inbound("sam@other.org", ALICE, BOB))
    assert both.address is not None and both.address.inbound == 1 and both.new_to_address == ()


def test_freemail_addresses_are_their_own_correspondents() -> None:
    h = CorrespondenceHistory()
    h.observe(inbound("friend@gmail.com"), day(0), outbound=False)
    stranger = h.lookup(inbound("stranger@gmail.com"))
    assert stranger.sender_key == "stranger@gmail.com" and stranger.key is None


def test_outbound_marks_who_our_users_wrote_to() -> None:
    h = CorrespondenceHistory()
    sent = MessageFacts(ALICE, "Alice Example", ("pat@partner.net", "lee@partner.net"))
    h.observe(sent, day(0), outbound=True)
    view = h.lookup(inbound("pat@partner.net", ALICE))
    assert view.address is not None and (view.address.inbound, view.address.outbound) == (0, 1)
    assert view.key is not None and view.key.outbound == 1  # one message, two people at partner.net
    assert view.new_to_address == () and view.new_to_key == ()  # Alice wrote to them: not new to her
    assert h.lookup(inbound("pat@partner.net", BOB)).new_to_key == (BOB,)
    # our own user's name was learned from her sent mail
    assert dict(h.lookup(inbound("x@gmail.com", display="Alice Example")).name_addresses) == {ALICE: 1}


def test_ageing_drops_what_was_not_seen_for_max_age() -> None:
    h = CorrespondenceHistory(HistoryLimits(max_age_days=10))
    h.observe(inbound("old@stale.com", display="Old Timer"), day(0), outbound=False)
    h.observe(inbound("new@fresh.com", display="New Comer"), day(5), outbound=False)
    assert h.lookup(inbound("old@stale.com")).address is not None
    h.observe(inbound("new@fresh.com", display="New Comer"), day(12), outbound=False)
    gone = h.lookup(inbound("old@stale.com", display="Old Timer"))
    assert gone.address is None and gone.key is None and not gone.name_addresses
    assert gone.new_to_address == (ALICE,) and "old" not in h.locals
    assert h.lookup(inbound("new@fresh.com")).address is not None


def test_size_caps_hold_and_keep_the_most_recent() -> None:
    limits = HistoryLimits(max_pairs=6, max_correspondents=4, max_identities=3, max_per_identity=2)
    h = CorrespondenceHistory(limits)
    for i in range(30):
        h.observe(inbound(f"p{i}@d{i}.com", display=f"Person Number{i}"), day(i), outbound=False)
    assert len(h.addresses) == 4 and len(h.keys) == 4 and len(h.pairs) == 6 and len(h.key_pairs) == 6
    assert len(h.names) == 3 and len(h.locals) == 3
    assert list(h.addresses) == [f"p{i}@d{i}.com" for i in range(26, 30)]
    assert len(h) == 4 + 4 + 6 + 6 + 3 + 3
    for i in range(5):  # one name from five addresses: the two most recent stay
        h.observe(inbound(f"x{i}@y{i}.com", display="Same Person"), day(40 + i), outbound=False)
    view = h.lookup(inbound("z@z.com", display="Same Person"))
    assert set(view.name_addresses) == {"x3@y3.com", "x4@y4.com"}


def test_the_least_recently_observed_goes_first() -> None:
    h = CorrespondenceHistory(HistoryLimits(max_correspondents=2, max_age_days=10))
    h.observe(inbound("a@a.com"), day(0), outbound=False)
    h.observe(inbound("b@b.com"), day(1), outbound=False)
    h.observe(inbound("a@a.com"), day(2), outbound=False)  # a is refreshed: b is now the stalest
    h.observe(inbound("c@c.com"), day(3), outbound=False)
    assert set(h.addresses) == {"a@a.com", "c@c.com"}
    h.observe(inbound("c@c.com"), day(11.5), outbound=False)  # a: first seen day 0, last day 2: it stays
    assert set(h.addresses) == {"a@a.com", "c@c.com"} and h.addresses["a@a.com"].inbound == 2
    h.observe(inbound("c@c.com"), day(12.5), outbound=False)
    assert set(h.addresses) == {"c@c.com"}


def test_display_name_map_normalises_names() -> None:
    h = CorrespondenceHistory()
    h.observe(inbound("louise.kitchen@vendor.com", display="Kitchen, Louise"), day(0), outbound=False)
    h.observe(inbound("louise.kitchen@vendor.com", display="Louise M. Kitchen"), day(1), outbound=False)
    view = h.lookup(inbound("lk@gmail.com", display="LOUISE KITCHEN"))
    assert view.name == "kitchen louise"
    assert dict(view.name_addresses) == {"louise.kitchen@vendor.com": 2}
    assert view.name_domains == {"vendor.com"} and view.name_messages == 2
    assert h.lookup(inbound("louise.kitchen@vend0r.com")).local_domains == {"vendor.com"}


def test_names_and_local_parts() -> None:
    assert normal_name("Kitchen, Louise") == normal_name("louise  kitchen") == "kitchen louise"
    assert normal_name("Vince J. Kaminski") == normal_name("Kaminski, Vince") == "kaminski vince"
    assert normal_name("Support") == "" and normal_name("bob@example.com") == ""
    assert personal_local("jane.doe@x.com") == "jane.doe" and personal_local("info@x.com") == ""


def test_reply_to_seen() -> None:
    h = CorrespondenceHistory()
    assert h.lookup(inbound("a@b.com")).reply_to_seen  # no Reply-To at all
    assert not h.lookup(inbound("a@b.com", reply_to="pay@gmail.com")).reply_to_seen
    h.observe(inbound("a@b.com", reply_to="pay@gmail.com"), day(0), outbound=False)
    assert h.lookup(inbound("a@b.com", reply_to="pay@gmail.com")).reply_to_seen
    # named by a@b.com, not by anyone else: one sender's Reply-To vouches for no other's
    assert not h.lookup(inbound("c@d.com", reply_to="pay@gmail.com")).reply_to_seen


def test_an_address_that_only_wrote_to_us_is_no_seen_reply_to() -> None:
    """The primer: one innocuous message from the future Reply-To makes it no 'exchanged mail'."""
    h = CorrespondenceHistory()
    h.observe(inbound("j.doe.accounts@outlook.com", display="J Doe"), day(0), outbound=False)
    hijacked = inbound("jane.doe@vendor.com", display="Jane Doe", reply_to="j.doe.accounts@outlook.com")
    assert not h.lookup(hijacked).reply_to_seen
    assert reply_to_unseen(hijacked, h.lookup(hijacked), OURS)
    h.observe(MessageFacts(ALICE, "Alice", ("j.doe.accounts@outlook.com",)), day(1), outbound=True)
    assert h.lookup(hijacked).reply_to_seen  # our users write to it: a real correspondent


def test_a_list_copy_teaches_no_reply_to() -> None:
    """List-Id costs nothing, and list copies are exempt from reply_to_unseen: it must not prime it."""
    h = CorrespondenceHistory()
    primer = MessageFacts("jane.doe@vendor.com", "Jane Doe", (ALICE,), "pay@evil.com", list_mail=True)
    h.observe(primer, day(0), outbound=False)
    assert not h.lookup(inbound("jane.doe@vendor.com", reply_to="pay@evil.com")).reply_to_seen


def test_reply_tos_go_to_the_store_per_sender_and_back() -> None:
    h = CorrespondenceHistory()
    h.observe(inbound("a@b.com", reply_to="pay@gmail.com"), day(0), outbound=False)
    rows = [r for r in h.rows() if r.kind == "reply_to"]
    assert [(r.key, r.member, r.inbound) for r in rows] == [("pay@gmail.com", "a@b.com", 1)]
    loaded = CorrespondenceHistory()
    for row in h.rows():
        loaded.put(row)
    assert loaded.lookup(inbound("a@b.com", reply_to="pay@gmail.com")).reply_to_seen
    assert len(loaded) == len(h)
    old = CorrespondenceHistory()  # a row written before Reply-Tos were kept per sender: no one's
    old.put(HistoryRow("reply_to", "pay@gmail.com", "", 1.0, day(0).timestamp(), 1, 0))
    assert not old.lookup(inbound("a@b.com", reply_to="pay@gmail.com")).reply_to_seen


@pytest.mark.parametrize("disguised", [
    "J\u0430n\u0435 Doe",  # Cyrillic a and e
    "\uff2aane Doe",  # fullwidth J
    "Jane Do\u00ade",  # soft hyphen
    "Ja\u200dne Doe",  # zero-width joiner
    "Jane\u0301 Doe",  # a combining accent
    "\u0408\u0430\u0578e D\u03bf\u0435",  # Cyrillic J, a, e; Armenian n; Greek o
    "JANE DOE",
])
def test_a_name_in_look_alike_letters_is_the_same_name(disguised: str) -> None:
    assert normal_name(disguised) == "doe jane"
    h = known_vendor()
    spoof = inbound("jane.doe.ap@outlook.com", display=disguised)
    reason = display_name_new_address(spoof, h.lookup(spoof), OURS) or ""
    assert "never from jane.doe.ap@outlook.com" in reason
    ceo = Protected(domains=OURS.domains, names=("Jane Doe",))
    view = CorrespondenceHistory().lookup(spoof, ceo.names)
    assert view.protected_name == "Jane Doe"
    assert "protected person" in (display_name_new_address(spoof, view, ceo) or "")


def test_folding_leaves_other_names_apart() -> None:
    assert seen_as("Jane Doe") == "Jane Doe"  # ASCII untouched (name_tokens casefolds it)
    assert normal_name("José García") == normal_name("Jose Garcia") == "garcia jose"
    assert normal_name("Jane Dое") != normal_name("Jane Dot")
    assert normal_name("Ｊａｎｅ＠evil.test") == ""  # a fullwidth @ still shows an address


def test_machine_mail_teaches_no_names_and_is_not_judged_by_them() -> None:
    h = CorrespondenceHistory()
    for n, host in enumerate(("mx1.partner-a.com", "mx1.partner-a.com")):
        bounce = MessageFacts(f"mailer-daemon@{host}", "Mail Delivery System", (ALICE,), machine=True)
        h.observe(bounce, day(n), outbound=False)
    assert not h.names and not h.locals
    assert h.lookup(inbound("someone@partner-a.com")).key is not None  # the domain is still known
    # a history learned before machine mail was told apart: its bounces are still not judged
    h.observe(inbound("mailer-daemon@mx1.partner-a.com", display="Mail Delivery System"), day(2), False)
    h.observe(inbound("mailer-daemon@mx1.partner-a.com", display="Mail Delivery System"), day(3), False)
    other = MessageFacts("mailer-daemon@mail.partner-b.com", "Mail Delivery System", (ALICE,), machine=True)
    assert display_name_new_address(other, h.lookup(other), OURS) is None
    assert correspondent_elsewhere(other, h.lookup(other), OURS) is None
    as_person = replace(other, machine=False)
    assert display_name_new_address(as_person, h.lookup(as_person), OURS)  # what the flag prevents


def test_machine_looking_mail_borrowing_a_person_s_name_is_still_judged() -> None:
    """Auto-Submitted, a report's structure or MAIL FROM:<> cost a forger nothing: machine mail that
    wears a correspondent's name from a new address is judged as a person's mail would be. It teaches
    nothing either way."""
    h = CorrespondenceHistory()
    for n in range(3):
        h.observe(inbound("jane.doe@vendor.test", display="Jane Doe"), day(n), outbound=False)
    forged = MessageFacts("jane.doe.vendor@gmail.com", "Jane Doe", (ALICE,), machine=True)
    assert display_name_new_address(forged, h.lookup(forged), OURS)
    lookalike = MessageFacts("jane.doe@vendor-test.com", "Jane Doe", (ALICE,), machine=True)
    assert correspondent_elsewhere(lookalike, h.lookup(lookalike), OURS)


def test_what_counts_as_machine_mail() -> None:
    assert machine_mail("mailer-daemon@mx.test") and machine_mail("POSTMASTER@mx.test")
    assert machine_mail("jane@vendor.test", auto_report=True)
    assert machine_mail("jane@vendor.test", mail_from="") and machine_mail("jane@vendor.test", mail_from="<>")
    assert not machine_mail("jane@vendor.test", mail_from=None)  # not known (an offline scan)
    assert not machine_mail("jane@vendor.test", mail_from="jane@vendor.test")
    assert stored_facts("MAILER-DAEMON@mx.test", "Mail Delivery System", (ALICE,), None).machine


# --- the signals -------------------------------------------------------------------------------------


def known_vendor() -> CorrespondenceHistory:
    """Jane Doe of vendor.com has written to Alice twice; Alice wrote to mike@txu.com."""
    h = CorrespondenceHistory()
    for n in range(2):
        h.observe(inbound("jane.doe@vendor.com", display="Jane Doe"), day(n), outbound=False)
    h.observe(MessageFacts(ALICE, "Alice Example", ("mike@txu.com",)), day(2), outbound=True)
    h.observe(inbound("mike@txu.com", display="Mike Jones"), day(3), outbound=False)
    h.observe(inbound("mike@txu.com", display="Mike Jones"), day(4), outbound=False)
    return h


def test_first_contact_org() -> None:
    h = known_vendor()
    assert first_contact_org(inbound("eve@new.com"), h.lookup(inbound("eve@new.com")), OURS)
    for facts in (inbound("jane.doe@vendor.com"), inbound("other@vendor.com"), inbound("carol@example.com")):
        assert first_contact_org(facts, h.lookup(facts), OURS) is None


def test_first_contact_recipient() -> None:
    h = known_vendor()
    facts = inbound("jane.doe@vendor.com", BOB)
    assert "to bob@example.com" in (first_contact_recipient(facts, h.lookup(facts), OURS) or "")
    for facts in (inbound("jane.doe@vendor.com", ALICE), inbound("eve@new.com", BOB)):
        assert first_contact_recipient(facts, h.lookup(facts), OURS) is None


def test_display_name_new_address() -> None:
    h = known_vendor()
    spoof = inbound("jane.doe.ap@outlook.com", display="Doe, Jane")
    reason = display_name_new_address(spoof, h.lookup(spoof), OURS) or ""
    assert "never from jane.doe.ap@outlook.com" in reason
    real = inbound("jane.doe@vendor.com", display="Jane Doe")
    assert display_name_new_address(real, h.lookup(real), OURS) is None
    once = CorrespondenceHistory()  # a name seen on one message is nobody we correspond with yet
    once.observe(inbound("jane.doe@vendor.com", display="Jane Doe"), day(0), outbound=False)
    assert display_name_new_address(spoof, once.lookup(spoof), OURS) is None


def test_display_name_new_address_protected_person() -> None:
    ceo = Protected(domains=OURS.domains, names=("Robert Brown",))
    h = CorrespondenceHistory()
    fake = inbound("rb.office@gmail.com", display="Robert Brown, CEO")
    assert "protected person" in (display_name_new_address(fake, h.lookup(fake, ceo.names), ceo) or "")
    h.observe(inbound("rb.office@gmail.com", display="Robert Brown"), day(0), outbound=False)
    assert display_name_new_address(fake, h.lookup(fake, ceo.names), ceo) is None  # seen as him before


@pytest.mark.parametrize(
    ("sender", "display", "how"),
    [
        ("jane.doe@gmail.com", "", "free-mail"),  # personal local part at free-mail
        ("jdoe123@yahoo.com", "Jane Doe", "free-mail"),  # the name at free-mail
        ("jane.doe@vend0r.com", "", "lookalike domain vend0r.com"),
        ("jane.doe@vednor.com", "Jane Doe", "lookalike domain vednor.com"),  # two letters swapped
        ("mike@txu.net", "", "lookalike domain txu.net"),  # a short name under another suffix
        ("mike@txu-group.com", "", "lookalike domain txu-group.com"),
    ],
)
def test_correspondent_elsewhere_fires(sender: str, display: str, how: str) -> None:
    h = known_vendor()
    facts = inbound(sender, display=display)
    assert how in (correspondent_elsewhere(facts, h.lookup(facts), OURS) or "")


@pytest.mark.parametrize(
    ("sender", "display"),
    [
        ("jane.doe@vendor.com", "Jane Doe"),  # the real one
        ("jane.doe@unrelated.org", "Jane Doe"),  # another domain, not a lookalike
        ("mike@gmail.com", ""),  # a role-like local part at free-mail is anyone's
        ("someone@vend0r.com", "Someone Else"),  # a lookalike, but of nobody's name or local part
    ],
)
def test_correspondent_elsewhere_silent(sender: str, display: str) -> None:
    h = known_vendor()
    facts = inbound(sender, display=display)
    assert correspondent_elsewhere(facts, h.lookup(facts), OURS) is None


def test_correspondent_elsewhere_trusts_domains_we_write_to() -> None:
    h = known_vendor()
    h.observe(MessageFacts(ALICE, "", ("sales@vend0r.com",)), day(5), outbound=True)
    facts = inbound("jane.doe@vend0r.com")
    assert correspondent_elsewhere(facts, h.lookup(facts), OURS) is None


def test_imitated() -> None:
    homes = frozenset({"caiso.com", "txu.com"})
    assert imitated("caios.com", homes) == "caiso.com" and imitated("ttxu.com", homes) == "txu.com"
    assert imitated("cisco.com", homes) is None and imitated("abc.com", homes) is None


def test_reply_to_unseen() -> None:
    h = known_vendor()
    bad = inbound("jane.doe@vendor.com", reply_to="vendor.accounts@outlook.com")
    assert "vendor.accounts@outlook.com" in (reply_to_unseen(bad, h.lookup(bad), OURS) or "")
    for facts in (
        inbound("jane.doe@vendor.com", reply_to="billing@vendor.com"),  # the sender's own organisation
        inbound("jane.doe@vendor.com", reply_to="carol@example.com"),  # one of ours
        inbound("jane.doe@vendor.com", reply_to="mike@txu.com"),  # a known correspondent
        MessageFacts("jane.doe@vendor.com", "", (ALICE,), "other@gmail.com", list_mail=True),
    ):
        assert reply_to_unseen(facts, h.lookup(facts), OURS) is None


def test_first_contact_money() -> None:
    h = known_vendor()
    money = frozenset({"payment", "bank_change"})
    stranger = inbound("ap@new-supplier.com", language=money)
    assert "bank_change, payment" in (first_contact_money(stranger, h.lookup(stranger), OURS) or "")
    for facts in (inbound("jane.doe@vendor.com", language=money), inbound("hi@new-supplier.com")):
        assert first_contact_money(facts, h.lookup(facts), OURS) is None


def test_no_signal_judges_our_own_domain() -> None:
    h = CorrespondenceHistory()
    h.observe(inbound("jane.doe@vendor.com", display="Carol Ours"), day(0), outbound=False)
    h.observe(inbound("jane.doe@vendor.com", display="Carol Ours"), day(1), outbound=False)
    facts = inbound("carol@example.com", display="Carol Ours", reply_to="x@gmail.com",
                    language=frozenset({"payment"}))
    assert evaluate(facts, h.lookup(facts), OURS) == {}
    assert evaluate(facts, HistoryView(), OURS) == {}


# --- the BEC case generator --------------------------------------------------------------------------

REAL = (
    b"Message-ID: <1.2@vendor.com>\nDate: Mon, 2 Apr 2001 10:00:00 -0700\nFrom: jane.doe@vendor.com\n"
    b"To: alice@example.com\nSubject: March invoice\nMime-Version: 1.0\n"
    b"Content-Type: text/plain; charset=us-ascii\nX-From: Jane Doe <jane.doe@vendor.com>\n"
    b"X-To: Alice Example\n\nHi Alice,\n  the March invoice is attached.\nJane\n"
)


def headers(raw: bytes) -> list[tuple[str, str]]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [(k.lower(), str(v)) for k, v in msg.items()]


def differing(a: bytes, b: bytes) -> set[str]:
    """Header names whose values differ between two messages, plus "body"."""
    ha, hb = headers(a), headers(b)
    names = {k for k, _ in ha} | {k for k, _ in hb}
    out = {n for n in names if [v for k, v in ha if k == n] != [v for k, v in hb if k == n]}
    return out | ({"body"} if bec_cases.body_of(a) != bec_cases.body_of(b) else set())


def test_freemail_case_differs_only_in_from() -> None:
    case = bec_cases.freemail_name(REAL, "Doe, Jane", seed=7)
    assert case.counterpart == REAL and differing(case.attack, REAL) == {"from"}
    assert case.attacker == f"jane.doe@{bec_cases.PROVIDERS[7 % 5]}"
    assert dict(headers(case.attack))["from"] == f'"Doe, Jane" <{case.attacker}>'
    assert [k for k, _ in headers(case.attack)] == [k for k, _ in headers(REAL)]  # same place, same order


def test_lookalike_case_differs_only_in_from() -> None:
    case = bec_cases.lookalike_vendor(REAL, "Jane Doe", "jane.doe@vendor.com", seed=3, domain="vendor.com")
    assert case.counterpart == REAL and differing(case.attack, REAL) == {"from"}
    local, _, fake = case.attacker.partition("@")
    assert local == "jane.doe" and fake != "vendor.com" and case.technique == bec_cases.TECHNIQUES[3]


def test_reply_to_case_differs_only_where_documented() -> None:
    case = bec_cases.reply_to_bank(REAL, "jane.doe@vendor.com", seed=4, domain="vendor.com")
    assert differing(case.attack, case.counterpart) == {"reply-to"}
    assert differing(case.counterpart, REAL) == {"body"}
    assert dict(headers(case.attack))["reply-to"] == case.attacker
    body = bec_cases.body_of(case.attack).decode()
    assert body.startswith(bec_cases.PRETEXTS[4 % 3]) and bec_cases.body_of(REAL).decode() in body


@pytest.mark.parametrize("technique", bec_cases.TECHNIQUES)
def test_lookalike_domain_techniques(technique: str) -> None:
    seed = bec_cases.TECHNIQUES.index(technique)
    fake, used = bec_cases.lookalike_domain("vendor.com", seed)
    assert used == technique and fake != "vendor.com"
    assert bec_cases.lookalike_domain("vendor.com", seed) == (fake, used)  # deterministic
    assert imitated(fake, frozenset({"vendor.com"})) == "vendor.com"


def test_set_header_handles_folded_and_missing_fields() -> None:
    raw = b"From: a@b.com\nTo: x@y.com,\n\tz@y.com\nSubject: s\n\nbody\n"
    assert bec_cases.set_header(raw, "To", "q@y.com") == b"From: a@b.com\nTo: q@y.com\nSubject: s\n\nbody\n"
    added = bec_cases.set_header(raw, "Reply-To", "r@s.com")
    assert added.startswith(b"From: a@b.com\nReply-To: r@s.com\nTo: x@y.com,\n\tz@y.com\n")
    assert bec_cases.remove_header(added, "reply-to") == raw
    twice = b"From: a@b.com\nTo: x@y.com\nTo: z@y.com\n\nbody\n"  # a second field goes: one From, one To
    assert bec_cases.set_header(twice, "To", "q@y.com") == b"From: a@b.com\nTo: q@y.com\n\nbody\n"


# --- the replay on synthetic mailboxes ---------------------------------------------------------------


def eml(sender: str, to: str, when: datetime, body: str = "Thanks, see you then.", xfrom: str = "") -> bytes:
    head = (f"Message-ID: <{hashlib.sha1((sender + str(when) + body).encode()).hexdigest()}@x>\n"
            f"Date: {format_datetime(when)}\nFrom: {sender}\nTo: {to}\nSubject: note\nMime-Version: 1.0\n"
            "Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: 7bit\n"
            f"X-From: {xfrom or sender}\n")
    return (head + "\n" + body + "\n").encode()


def write_corpus(root: Path, rows: list[tuple[str, bytes, str]]) -> Path:
    """rows: (label, message, sha256 as the manifest states it) -> corpus dir with MANIFEST.tsv."""
    corpus = root / "enron-spam-raw"  # the name training.corpora reads mailboxes from
    (corpus / "ham").mkdir(parents=True)
    lines = ["relative_path\tlabel\tsha256\tsize_bytes\tsource_repo\tsource_path"]
    for i, (label, raw, sha) in enumerate(rows):
        rel = f"ham/{i:06d}.eml"
        (corpus / rel).write_bytes(raw)
        lines.append(f"{rel}\t{label}\t{sha}\t{len(raw)}\tx/y\ttraining_data/{label}/smith-j/inbox/{i}")
    (corpus / "MANIFEST.tsv").write_text("\n".join(lines) + "\n")
    return corpus


def sha(n: int, sampled: bool = False) -> str:
    """A manifest sha256 whose first eight hex digits put it in case slice 0 (sampled) or slice 1."""
    return ("00000000" if sampled else "00000001") + f"{n:056x}"


OWNER = "john.smith@example.com"


def test_replay_counts_on_synthetic_mailbox(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        ("ham", eml("jane.doe@vendor.com", OWNER, day(0)), sha(1)),  # warm-up: only taught
        ("ham", eml(OWNER, "pat@partner.net", day(1)), sha(2)),  # the owner's own: outbound
        ("ham", eml("jane.doe@vendor.com", OWNER, day(40)), sha(3)),  # known: silent
        ("ham", eml("pat@partner.net", OWNER, day(41)), sha(4)),  # we wrote to them: silent
        ("ham", eml("eve@new.com", OWNER, day(42), "Please pay the overdue invoice."), sha(5)),
        ("ham", eml("mary@example.com", OWNER, day(43)), sha(6)),  # one of ours: never judged by a signal
        # filed in the owner's mailbox from a list: the replay's recipient is the owner, whom Jane knows
        ("ham", eml("jane.doe@vendor.com", "team@example.com", day(44)), sha(9)),
        ("ham", eml("jane.doe@vendor.com", "x@example.com", day(44)).replace(b"Date:", b"X-Date:"), sha(7)),
        ("spam", eml("spam@spam.biz", OWNER, day(45), "Wire transfer payment urgent"), sha(8)),
    ]
    corpus = write_corpus(tmp_path, rows)
    out = tmp_path / "report.json"
    args = ["--corpus", corpus.name, "--cache-dir", str(tmp_path), "--our-domain", "example.com",
            "--warmup-days", "30", "--max-cases", "0", "--json", str(out)]
    assert replay.main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["owners"] == {"smith-j": OWNER}
    assert (report["ham"], report["undated"], report["outbound"], report["warmup"]) == (8, 1, 1, 1)
    assert (report["judged"], report["judged_external"]) == (5, 4)
    assert report["fires"] == {"first_contact_org": 1, "first_contact_recipient": 0,
                               "display_name_new_address": 0, "correspondent_elsewhere": 0,
                               "reply_to_unseen": 0, "first_contact_money": 1}
    assert report["money_groups"]["payment"] == 1
    # the printed table says the same: 1 of 5 judged, 1 of 4 from outside
    lines = [line.split() for line in printed.splitlines()]
    assert ["first_contact_org", "1", "20.000", "%", "25.000", "%"] in lines
    assert ["first_contact_money", "1", "20.000", "%", "25.000", "%"] in lines
    assert ["reply_to_unseen", "0", "0.000", "%", "0.000", "%"] in lines
    assert "ham 8 (undated, skipped: 1); outbound (owner's own) 1; inbound in warm-up 1; judged 5" in printed
    assert "first 30 days of each mailbox only teach the history" in printed


def test_replay_builds_and_judges_cases(tmp_path: Path) -> None:
    # Jane Doe (display name only in X-From, as in the Enron export) writes five times in warm-up; her
    # sixth message, after it, is sampled (slice 0) and becomes one case of each kind.
    xfrom = "Jane Doe <jane.doe@vendor.com>@ENRON <IMCEANOTES-x>"
    rows = [("ham", eml("jane.doe@vendor.com", OWNER, day(n), f"note {n}", xfrom), sha(n)) for n in range(5)]
    later = eml("jane.doe@vendor.com", OWNER, day(40), "The March figures.", xfrom)
    rows.append(("ham", later, sha(9, sampled=True)))
    mail, undated = replay.load_mail(write_corpus(tmp_path, rows))
    assert undated == 0 and mail[0].display == "Jane Doe"
    owners = replay.owners_of(mail, OURS.domains)
    tallies, entries = replay.replay(mail, owners, OURS, warmup_days=30)
    assert tallies.judged == 1 and entries > 0
    assert sorted(c.kind for c in tallies.cases) == sorted(bec_cases.KINDS)
    assert all(c.caught and c.counterpart_right_silent and c.counterpart_silent for c in tallies.cases)
    # another slice: this message is not sampled, so no cases
    assert replay.replay(mail, owners, OURS, warmup_days=30, case_slice=1)[0].cases == []


def test_xfrom_name() -> None:
    assert replay.xfrom_name("Kitchen, Louise </O=ENRON/OU=NA/CN=RECIPIENTS/CN=LK>") == "Kitchen, Louise"
    assert replay.xfrom_name('"Jim Lokay" <Lokay@bigfoot.com>@ENRON <IMCEANOTES-x>') == "Jim Lokay"
    assert replay.xfrom_name("VKaminski@aol.com@ENRON <IMCEANOTES-VKam>") == ""
    assert replay.xfrom_name(None) == ""
