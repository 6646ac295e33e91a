"""Signals from the correspondence history (issue 17, item 2): pure functions of a message's facts, what the
history knew before it (`HistoryView`) and the site's protected identities. Each returns a reason a person
understands, or None.

Not wired into the policy yet: `python -m training.replay` measures how often each fires on real ham
before any of them may act (issue 17's bar: under 0.1 % of ham to quarantine, else tag only).

None of them judges mail from our own domains (`Protected.domains`): mail from our own people is
authenticated by other means (internal networks, DMARC on our domains, the spoof rule), and our own
people's aliases and new hires would otherwise all look like strangers. The history still *learns* from
that mail: our people's names are what an attacker borrows.
"""

from __future__ import annotations

from collections.abc import Callable

from milter.features.context import Protected
from milter.features.domains import edit_distance, in_domain, lookalike_of, skeleton
from milter.features.lexicon import FREEMAIL
from milter.history import HistoryView, MessageFacts, domain_of, is_system_mailbox, personal_local

Signal = Callable[[MessageFacts, HistoryView, Protected], "str | None"]

#: A display name is someone our users correspond with once it has come on this many messages.
KNOWN_NAME_MESSAGES = 2
#: The lexicon groups (`MessageSummary.language`, the model's lang_* features) that make first contact a
#: money request: the groups milter/policy/bec.py pairs with disguised senders, plus urgency (issue 17).
MONEY_LANGUAGE = frozenset({"payment", "bank_change", "giftcard", "urgency"})
_SHOWN = 3  # addresses quoted in a reason


def _judged(facts: MessageFacts, protected: Protected) -> bool:
    """Mail the history signals speak about: it has a sender, from outside our own domains."""
    return bool(facts.sender) and in_domain(domain_of(facts.sender), protected.domains) is None


def _known(view: HistoryView) -> bool:
    """The sender's domain (or free-mail address) has exchanged mail with the organisation."""
    return view.key is not None


def first_contact_org(facts: MessageFacts, view: HistoryView, protected: Protected) -> str | None:
    """Neither this address nor its domain has ever exchanged mail with anyone here. Catches the
    stranger posing as a partner; a new vendor's first mail looks the same, hence only a reason unless
    the replay shows otherwise."""
    if not _judged(facts, protected) or _known(view):
        return None
    what = view.sender if view.sender_key == view.sender else f"{view.sender} (domain {view.sender_key})"
    return f"first contact: {what} never exchanged mail with this organisation"


def first_contact_recipient(facts: MessageFacts, view: HistoryView, protected: Protected) -> str | None:
    """The organisation knows the sender's domain, but this recipient never exchanged mail with it.
    Catches a known vendor's (hijacked or imitated) account writing to someone new, say accounts payable."""
    if not _judged(facts, protected) or not _known(view) or not view.new_to_key:
        return None
    return f"first mail from {view.sender_key} to {', '.join(view.new_to_key[:_SHOWN])}"


def display_name_new_address(facts: MessageFacts, view: HistoryView, protected: Protected) -> str | None:
    """A display name our users correspond with (or a protected person's) from an address never seen
    with that name: the colleague, CEO or vendor contact whose name is borrowed by a new mailbox."""
    if not _judged(facts, protected):
        return None
    if view.protected_name and facts.sender not in view.protected_addresses:
        person = view.protected_name
        return f"display name shows protected person {person!r}; {facts.sender} never wrote as them"
    if view.name_messages < KNOWN_NAME_MESSAGES or facts.sender in view.name_addresses:
        return None
    if facts.machine and _system_name(view):
        return None  # a bounce's "Mail Delivery System", learned by a history from before `machine_mail`
    seen = ", ".join(sorted(view.name_addresses, key=view.name_addresses.__getitem__, reverse=True)[:_SHOWN])
    return f"display name {facts.display!r} has come from {seen}, never from {facts.sender}"


def correspondent_elsewhere(facts: MessageFacts, view: HistoryView, protected: Protected) -> str | None:
    """A known correspondent's display name or local part from a lookalike of their domain, or from
    free-mail when they wrote from an organisation's domain: a vendor thread continued from vend0r.com,
    the CFO writing from gmail. At free-mail only a local part that names a person counts (jane.doe@,
    not info@: role addresses at gmail.com are anyone's). Not for a MAILER-DAEMON's or postmaster's
    bounce whose name only such mailboxes wore: every MTA's has the same local part and display name,
    and no correspondent. Other machine mail is judged: Auto-Submitted or MAIL FROM:<> costs a forger
    nothing."""
    domain = domain_of(facts.sender)
    if not _judged(facts, protected) or not domain:
        return None
    if facts.machine and is_system_mailbox(facts.sender) and _system_name(view):
        return None
    free = domain in FREEMAIL
    name_homes: frozenset[str] = frozenset()
    if view.name_messages >= KNOWN_NAME_MESSAGES and facts.sender not in view.name_addresses:
        name_homes = view.name_domains - FREEMAIL - {domain}
    local_homes = view.local_domains - {domain} if personal_local(facts.sender) or not free else frozenset()
    homes = name_homes | local_homes
    if not homes:
        return None
    who = f"display name {facts.display!r}" if name_homes else repr(facts.sender.partition("@")[0])
    if free:
        return f"known correspondent {who} of {', '.join(sorted(homes)[:_SHOWN])} now writes from free-mail"
    if view.key is not None and view.key.outbound:
        return None  # our users write to this domain: a real, separate correspondent
    target = imitated(domain, homes)
    if target is None:
        return None
    return f"known correspondent {who} of {target} now writes from lookalike domain {domain}"


def imitated(domain: str, homes: frozenset[str]) -> str | None:
    """The correspondent's domain that `domain` imitates. `lookalike_of` first; it skips names under four
    letters, where a near-match against every protected domain is often chance, and counts a swap of two
    letters as two edits. Here the candidate is already tied to the correspondent by name or local part,
    so a swap counts at any length, and short names (txu.com) are checked too: the same name under another
    suffix (txu.net), one edit (ttxu.com), or a word added with a hyphen (txu-group.com)."""
    ordered = tuple(sorted(homes))
    if (target := lookalike_of(domain, ordered)) is not None:
        return target
    label = domain.partition(".")[0]
    for home in ordered:
        home_label = home.partition(".")[0]
        if _transposed(label, home_label):
            return home
        if len(home_label) >= 4:
            continue  # lookalike_of has judged the rest
        if skeleton(label) == skeleton(home_label) or edit_distance(label, home_label, 1) <= 1:
            return home
        if label.startswith(home_label + "-") or label.endswith("-" + home_label):
            return home
    return None


def _transposed(a: str, b: str) -> bool:
    """`a` is `b` with two neighbouring letters swapped (caiso -> caios): one slip of the eye, but two
    edits to Levenshtein, so `lookalike_of` lets it pass for names under nine letters."""
    if len(a) != len(b) or a == b:
        return False
    diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]


def reply_to_unseen(facts: MessageFacts, view: HistoryView, protected: Protected) -> str | None:
    """Replies would go to an address the site has never exchanged mail with: the changed-bank-details
    reply from a real (hijacked) or spoofed sender, answered by the attacker. A Reply-To in the sender's
    own organisation's domain (billing@ for sales@) and a list's Reply-To are how mail normally works."""
    rt = facts.reply_to
    if not _judged(facts, protected) or view.reply_to_seen or facts.list_mail or not rt:
        return None
    rt_domain = domain_of(rt)
    if in_domain(rt_domain, protected.domains) is not None:
        return None
    if rt_domain == domain_of(facts.sender) and rt_domain not in FREEMAIL:
        return None
    return f"Reply-To {rt} has never exchanged mail with this organisation"


def first_contact_money(facts: MessageFacts, view: HistoryView, protected: Protected) -> str | None:
    """First contact that talks about payments, bank details, gift cards or urgency: the stranger asking
    for money. Real business does this too (a new supplier's first invoice), so measure before acting."""
    if first_contact_org(facts, view, protected) is None:
        return None
    groups = facts.language & MONEY_LANGUAGE
    if not groups:
        return None
    return f"first contact from {view.sender_key} talks about {', '.join(sorted(groups))}"


#: Every signal, by name, in the order the replay reports them.
SIGNALS: tuple[tuple[str, Signal], ...] = (
    ("first_contact_org", first_contact_org),
    ("first_contact_recipient", first_contact_recipient),
    ("display_name_new_address", display_name_new_address),
    ("correspondent_elsewhere", correspondent_elsewhere),
    ("reply_to_unseen", reply_to_unseen),
    ("first_contact_money", first_contact_money),
)


def evaluate(facts: MessageFacts, view: HistoryView, protected: Protected) -> dict[str, str]:
    """Every signal that fires: name -> reason."""
    fired = ((name, signal(facts, view, protected)) for name, signal in SIGNALS)
    return {name: reason for name, reason in fired if reason is not None}


def _system_name(view: HistoryView) -> bool:
    """The display name was only ever worn by MAILER-DAEMON / postmaster mailboxes: a bounce's name
    ("Mail Delivery System"), learned by a history from before machine mail taught no names. A
    person's name borrowed by machine-looking mail (an auto-reply header costs nothing) is not."""
    return all(is_system_mailbox(addr) for addr in view.name_addresses)
