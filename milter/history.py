"""Correspondence history: who has exchanged mail with whom at this site, and since when (issue 17).

Pure: no I/O, no clock, no module state. The caller says when a message happened and whether our users
wrote it (`outbound`); the history answers, for a new message, exactly what the history signals
(`milter.history_signals`) need, as a frozen `HistoryView`.

**Model.** The issue's table is one row per (correspondent address, correspondent domain) x (our user's
address, our domain) with first seen, last seen and a message count each way. The signals never read a
row alone: they ask "has this address / domain written to this recipient", "... to anyone here", "have we
written to it". So the history keeps exactly those projections (the GROUP BYs a store would run), each
updated by the same `observe`, and nothing else; the store keeps the same projections row by row (table
`history`, one `HistoryRow` per entry), so a gateway loads them with one read and writes a message's
changes as a handful of upserts, never a GROUP BY over the whole table:

* `pairs`      (correspondent address, our address) -> Tally
* `key_pairs`  (correspondent key, our address)     -> Tally
* `addresses`  correspondent address                -> Tally  (the whole organisation)
* `keys`       correspondent key                    -> Tally  (the whole organisation)
* `names`      normalised display name -> {address -> Tally}: which addresses a name came from
* `locals`     local part ("jane.doe", "mjones7") -> {registrable domain -> Tally}, outside free-mail
* `reply_tos`  Reply-To address -> {sender -> Tally}: which senders named it as their Reply-To

A correspondent *key* is its registrable domain, or for a free-mail provider the address itself
(`milter.policy.table.sender_key`): one gmail.com user writing to us says nothing about the next one. The
recipient domain is not a key of its own: all of `our` domains are one organisation, and no signal asks
about one of them alone.

**Mutation.** `observe` changes the history in place and returns None. A history is owned by exactly one
writer (the replay here; the gateway's store writer later) and read through `lookup`, whose answer is an
immutable snapshot. Returning a new history per message would copy tables of up to hundreds of thousands
of entries for each message, which no 0.5 ms budget allows.

**Bounds.** Two limits keep a site's history from growing forever (`HistoryLimits`): ageing drops every
entry not observed for `max_age_days`, and each table has a size cap past which the least recently
observed entry goes. Both pop from the front of tables kept in observation order, so they cost O(1) per
message. Per name (per local part) at most `max_per_identity` addresses (domains) are kept, the least
recently seen going first. Order is the order of observation: a message observed late with an old Date
refreshes its entries' place but not their `last_seen`, so such an entry can outlive `max_age_days`
until the entries in front of it age; a gateway observes in arrival order, where the two agree.
"""

from __future__ import annotations

import re
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

from milter.features.domains import registrable, sender_key
from milter.features.identity import contains_name, name_tokens
from milter.features.lexicon import FREEMAIL
from milter.features.summary import MessageSummary

if TYPE_CHECKING:
    from milter.config import HistoryConfig

K = TypeVar("K")

_DAY = 86_400.0
#: A local part that names a person ("jane.doe", "j_smith-jones"): two or more alphabetic parts of two
#: letters or more. Role addresses (info, sales, billing) are shared by thousands of unrelated
#: organisations, so they identify nobody.
_PERSONAL_LOCAL = re.compile(r"^[a-z]{2,}(?:[._-][a-z]{2,})+$")
#: Mailboxes that only machines write from: a bounce's "Mail Delivery System" names no person.
_SYSTEM_LOCALS = frozenset({"mailer-daemon", "mailerdaemon", "mail-daemon", "postmaster"})
#: Letters of other scripts that look like Latin ones, after casefolding (so an upper-case look-alike,
#: Cyrillic В for B, is listed by its lower case, в). A hand-made table, not Unicode's confusables.txt:
#: no confusables package is installed and this code must not fetch data at run time; the names compared
#: here are people's names, where these few letters are what an attacker swaps in. Both sides of every
#: comparison (the learned name and the new one) go through it, so a real Cyrillic or Greek name still
#: matches itself; that it also matches its Latin look-alike is the point.
_CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "һ": "h", "н": "h", "і": "i", "ј": "j", "к": "k", "ӏ": "l", "м": "m",
    "о": "o", "р": "p", "ԛ": "q", "г": "r", "ѕ": "s", "т": "t", "у": "y", "ү": "y", "х": "x", "с": "c",
    "ԁ": "d", "ԝ": "w",
    # Greek
    "α": "a", "β": "b", "ε": "e", "ζ": "z", "η": "n", "ι": "i", "κ": "k", "μ": "u", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "γ": "y",
    # Armenian
    "ո": "n", "ս": "u", "օ": "o", "հ": "h", "ց": "g",
    # Latin letters outside ASCII that read as ASCII ones
    "ı": "i", "ɡ": "g", "ɑ": "a", "ℓ": "l",
})


@dataclass(frozen=True)
class HistoryLimits:
    """How much history a site keeps. An entry costs about 360 bytes in memory (tracemalloc, strings
    included, 220,000 entries); the defaults bound a history at 2 x 200,000 pairs + 2 x 100,000
    correspondents + 3 x 50,000 identities x up to 8 members: 1.8 M entries, about 0.65 GiB at worst. The
    Enron replay (six mailboxes, three years, one history) ends with 6,247 entries, about 2 MiB."""

    max_age_days: float = 400.0  # longer than a year: yearly invoices and renewals stay known
    max_pairs: int = 200_000  # per pair table (address x our user, key x our user)
    max_correspondents: int = 100_000  # per correspondent table (addresses, keys)
    max_identities: int = 50_000  # display names, local parts, Reply-Tos
    max_per_identity: int = 8  # addresses per display name, domains per local part, senders per Reply-To


def stored_caps(limits: HistoryLimits) -> dict[str, int]:
    """Rows per kind the shared table keeps (`Store.history_trim`): what a history with these limits
    can hold, so trimming never drops what a gateway would keep."""
    identities = limits.max_identities * limits.max_per_identity
    return {"pair": limits.max_pairs, "key_pair": limits.max_pairs, "address": limits.max_correspondents,
            "key": limits.max_correspondents, "name": identities, "local": identities,
            "reply_to": identities}


def limits_of(config: HistoryConfig) -> HistoryLimits:
    """The bounds `[policy.history]` sets (one definition for the gateway and `milter history rebuild`):
    `max_entries` per pair and correspondent table, a quarter of it for identities (each holds up to
    `max_per_identity` members)."""
    n = config.max_entries
    return HistoryLimits(max_age_days=float(config.max_age_days), max_pairs=n, max_correspondents=n,
                         max_identities=max(1, n // 4))


@dataclass(frozen=True, slots=True)
class Tally:
    """One entry: when it was first and last seen (POSIX seconds), and messages each way."""

    first_seen: float
    last_seen: float
    inbound: int = 0  # messages the correspondent sent to us
    outbound: int = 0  # messages our users sent to the correspondent

    @property
    def messages(self) -> int:
        return self.inbound + self.outbound

    def add(self, when: float, outbound: bool) -> Tally:
        return Tally(
            min(self.first_seen, when), max(self.last_seen, when),
            self.inbound + (not outbound), self.outbound + outbound,
        )


def _new(when: float, outbound: bool) -> Tally:
    return Tally(when, when, int(not outbound), int(outbound))


def combined(a: Tally, b: Tally) -> Tally:
    """Two tallies of one entry (kept apart: two gateway processes, or the store and a journal) as one."""
    return Tally(min(a.first_seen, b.first_seen), max(a.last_seen, b.last_seen),
                 a.inbound + b.inbound, a.outbound + b.outbound)


#: The tables, as the store names them (`HistoryRow.kind`).
KINDS = ("pair", "key_pair", "address", "key", "reply_to", "name", "local")


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One entry of one table, as the store keeps it (table `history`, milter.store.models). `key` and
    `member` per kind: pair and key_pair (correspondent address or key, our user's address); address,
    key (the address or key, ''); reply_to (the Reply-To address, the sender that named it; '' in rows
    written before it was kept per sender); name (normalised display name, address); local (local part,
    registrable domain)."""

    kind: str
    key: str
    member: str
    first_seen: float
    last_seen: float
    inbound: int = 0
    outbound: int = 0

    @property
    def tally(self) -> Tally:
        return Tally(self.first_seen, self.last_seen, self.inbound, self.outbound)


@dataclass(frozen=True)
class MessageFacts:
    """What the history and its signals read from one message (decoded, lower-cased addresses)."""

    sender: str  # From addr-spec ('' when none)
    display: str = ""  # From display name, decoded ('' when none)
    recipients: tuple[str, ...] = ()  # envelope recipients (inbound: our users; outbound: theirs)
    reply_to: str = ""  # first Reply-To addr-spec ('' when none)
    language: frozenset[str] = frozenset()  # lexicon.LANGUAGE groups in subject + body
    list_mail: bool = False  # a mailing list's copy (List-Id / List-Post)
    # A machine wrote it (`machine_mail`): a bounce, an auto-reply, a read receipt. Its display name
    # ("Mail Delivery System") and local part are the software's, not a person's.
    machine: bool = False


def machine_mail(sender: str, auto_report: bool = False, mail_from: str | None = None) -> bool:
    """Mail from software, not a person: a report or auto-reply (`MessageSummary.auto_report`), the
    null envelope sender (`mail_from` ''; None: not known, as offline), or a MAILER-DAEMON / postmaster
    mailbox. Every MTA's bounces carry the same few display names, so learning them would tie "Mail
    Delivery System" to one MTA and tag every other MTA's bounce as a borrowed name."""
    if auto_report or (mail_from is not None and not mail_from.strip().strip("<>")):
        return True
    return is_system_mailbox(sender)


def is_system_mailbox(address: str) -> bool:
    """MAILER-DAEMON@ or postmaster@ (any case): an MTA's own mailbox."""
    return address.rpartition("@")[0].lower() in _SYSTEM_LOCALS


def facts_from_summary(
    summary: MessageSummary, recipients: Iterable[str], mail_from: str | None = None
) -> MessageFacts:
    """The facts of a message as feature extraction summarised it: one definition for gateway and replay.
    `mail_from`: the envelope sender where known ('' the null sender), for `machine_mail`."""
    sender = (summary.from_addr or "").lower()
    return MessageFacts(
        sender=sender,
        display=summary.from_display or "",
        recipients=addresses(recipients),
        reply_to=(summary.reply_to_addr or "").lower(),
        language=summary.language,
        list_mail=summary.list_mail,
        machine=machine_mail(sender, summary.auto_report, mail_from),
    )


def stored_facts(
    from_addr: str | None, from_display: str | None, recipients: Iterable[str], reply_to: str | None
) -> MessageFacts:
    """The facts of a message from its stored verdict row (`milter history rebuild`, a release): what
    `facts_from_summary` made of it at the gateway, from the columns that keep it (the row keeps neither
    the envelope sender nor whether it was a report: only a system mailbox marks it `machine` here)."""
    sender = (from_addr or "").lower()
    return MessageFacts(sender=sender, display=from_display or "", recipients=addresses(recipients),
                        reply_to=(reply_to or "").lower(), machine=machine_mail(sender))


def addresses(recipients: Iterable[str]) -> tuple[str, ...]:
    """Envelope recipients as the history keys them: bare, lower-cased, each once, addresses only."""
    return tuple(dict.fromkeys(r.strip().strip("<>").lower() for r in recipients if "@" in r))


def normal_name(display: str) -> str:
    """A display name as a person reads it: case, punctuation, word order and initials ignored, so
    "Kitchen, Louise" is "Louise Kitchen" and "Vince J. Kaminski" is "Vince Kaminski"; and what a reader
    cannot see ignored too (`seen_as`), so "Jаnе Doe" in Cyrillic letters is Jane Doe. '' for a name of
    fewer than two words (a first name or "Support" identifies nobody) or one showing an address."""
    display = seen_as(display)
    if "@" in display:
        return ""
    words = sorted(t for t in name_tokens(display) if len(t) > 1 and not t.isdigit())
    return " ".join(words) if len(words) >= 2 else ""


def seen_as(text: str) -> str:
    """`text` as a reader sees it, for comparing names: compatibility forms folded (fullwidth Ｊ is J),
    accents and invisible format characters (soft hyphen, zero-width joiner) dropped, and the Cyrillic and
    Greek letters that look Latin made Latin (`_CONFUSABLES`). Here, not in milter.features.identity:
    the model's features read names through that module, and their values must not change."""
    if text.isascii():
        return text  # nothing to fold, and most names are ASCII: the common case costs nothing
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(c for c in decomposed if unicodedata.category(c) not in ("Mn", "Cf"))
    return unicodedata.normalize("NFC", kept).casefold().translate(_CONFUSABLES)


def shows_name(display: str, name: str) -> bool:
    """Whether display name `display` shows the person `name` to a reader: `contains_name` over both
    as seen (`seen_as`), so a protected name in look-alike letters is still that name."""
    return contains_name(seen_as(display), seen_as(name))


def personal_local(address: str) -> str:
    """The local part when it names a person ("jane.doe"), else ''."""
    local = address.rpartition("@")[0].lower()
    return local if _PERSONAL_LOCAL.match(local) else ""


def domain_of(address: str) -> str:
    """Registrable domain of an address ('' when none)."""
    return registrable(address.rpartition("@")[2]) if "@" in address else ""


@dataclass(frozen=True)
class HistoryView:
    """What the history knows about one message's sender, name and Reply-To, before that message."""

    sender: str = ""
    sender_key: str = ""  # registrable domain, or the address for free-mail
    address: Tally | None = None  # this address with the whole organisation
    key: Tally | None = None  # this domain (key) with the whole organisation
    new_to_address: tuple[str, ...] = ()  # recipients this address never exchanged mail with
    new_to_key: tuple[str, ...] = ()  # recipients this domain (key) never exchanged mail with
    name: str = ""  # normalised display name
    name_addresses: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # addr -> msgs
    local_domains: frozenset[str] = frozenset()  # domains (not free-mail) the sender's local part came from
    protected_name: str = ""  # the protected person the display name contains ('' none)
    protected_addresses: frozenset[str] = frozenset()  # addresses seen for that person's name
    reply_to_seen: bool = False  # the Reply-To address is known (or there is none)

    @property
    def name_messages(self) -> int:
        return sum(self.name_addresses.values())

    @property
    def name_domains(self) -> frozenset[str]:
        return frozenset(domain_of(a) for a in self.name_addresses)


@dataclass(frozen=True)
class HistoryLookup:
    """One inbound message's facts and what the history knew about them: what the policy's history
    rules read (`milter.policy.history`)."""

    facts: MessageFacts
    view: HistoryView


class CorrespondenceHistory:
    """The history of one site (see the module docstring); `observe` writes, `lookup` reads."""

    def __init__(self, limits: HistoryLimits | None = None) -> None:
        self.limits = limits or HistoryLimits()
        # Every table is kept in the order entries were last observed (move_to_end on each update), so
        # the stalest entry is always first: ageing and the size caps pop from the front, O(1) a message,
        # instead of scanning the tables (a daily scan cost 2.7 ms at only 6,000 entries).
        self.pairs: OrderedDict[tuple[str, str], Tally] = OrderedDict()
        self.key_pairs: OrderedDict[tuple[str, str], Tally] = OrderedDict()
        self.addresses: OrderedDict[str, Tally] = OrderedDict()
        self.keys: OrderedDict[str, Tally] = OrderedDict()
        self.reply_tos: OrderedDict[str, dict[str, Tally]] = OrderedDict()
        self.names: OrderedDict[str, dict[str, Tally]] = OrderedDict()
        self.locals: OrderedDict[str, dict[str, Tally]] = OrderedDict()

    def __len__(self) -> int:
        """Entries held, all tables together (what the limits bound)."""
        nested = sum(len(v) for t in (self.names, self.locals, self.reply_tos) for v in t.values())
        return len(self.pairs) + len(self.key_pairs) + len(self.addresses) + len(self.keys) + nested

    # --- writing -------------------------------------------------------------------------------------

    def observe(self, facts: MessageFacts, when: datetime, outbound: bool) -> None:
        """Record one message. Inbound: `facts.sender` wrote to our `facts.recipients`. Outbound: our
        user `facts.sender` wrote to the correspondents `facts.recipients`."""
        now = when.timestamp()
        if not facts.sender:
            return
        if outbound:
            for rcpt in facts.recipients:
                self._pair(rcpt, facts.sender, now, outbound=True)
                self._local(rcpt, now)
            correspondents = facts.recipients
        else:
            for rcpt in facts.recipients:
                self._pair(facts.sender, rcpt, now, outbound=False)
            correspondents = (facts.sender,)
            if not facts.machine:  # a bounce's name, local part and Reply-To are its software's
                self._inbound_identity(facts, now)
        # organisation level: a message counts once however many of our users (or of theirs) it went to
        lim = self.limits
        for addr in dict.fromkeys(correspondents):
            _bump(self.addresses, addr, now, outbound, lim.max_correspondents)
        for key in dict.fromkeys(filter(None, map(sender_key, correspondents))):
            _bump(self.keys, key, now, outbound, lim.max_correspondents)
        # the name teaches who it belongs to either way: our own people's names come from their sent mail
        if not facts.machine and (name := normal_name(facts.display)):
            self._bump_identity(self.names, name, facts.sender, now)
        self.expire(now)

    def _pair(self, correspondent: str, ours: str, now: float, outbound: bool) -> None:
        if key := sender_key(correspondent):
            _bump(self.pairs, (correspondent, ours), now, outbound, self.limits.max_pairs)
            _bump(self.key_pairs, (key, ours), now, outbound, self.limits.max_pairs)

    def _inbound_identity(self, facts: MessageFacts, now: float) -> None:
        """What an inbound message teaches besides the pairs: that this sender names its Reply-To (kept
        per sender: one sender's Reply-To vouches for no other's), where the sender's local part lives.
        A list's Reply-To is the list's, and List-Id costs a sender nothing: it teaches no Reply-To."""
        if facts.reply_to and facts.reply_to != facts.sender and not facts.list_mail:
            self._bump_identity(self.reply_tos, facts.reply_to, facts.sender, now)
        self._local(facts.sender, now)

    def _local(self, correspondent: str, now: float) -> None:
        """Where a correspondent's local part lives (from their mail, or ours to them)."""
        local, _, host = correspondent.rpartition("@")
        domain = registrable(host) if local else ""
        if domain and domain not in FREEMAIL:  # a local part at gmail.com is anyone's
            self._bump_identity(self.locals, local, domain, now)

    def _bump_identity(
        self, table: OrderedDict[str, dict[str, Tally]], ident: str, member: str, now: float
    ) -> None:
        members = table.get(ident)
        if members is None:
            members = table[ident] = {}
            if len(table) > self.limits.max_identities:
                table.popitem(last=False)
        else:
            table.move_to_end(ident)
        old = members.get(member)
        members[member] = _new(now, False) if old is None else old.add(now, False)
        # an identity's members age here (a handful), since the table ages only whole identities
        cutoff = now - self.limits.max_age_days * _DAY
        for stale in [m for m, t in members.items() if t.last_seen < cutoff]:
            del members[stale]
        if len(members) > self.limits.max_per_identity:
            del members[min(members, key=lambda m: members[m].last_seen)]

    # --- exchange with the store ---------------------------------------------------------------------

    def rows(self) -> Iterator[HistoryRow]:
        """Every entry as a store row (see `HistoryRow`)."""
        flat: tuple[tuple[str, OrderedDict[str, Tally]], ...] = (
            ("address", self.addresses), ("key", self.keys))
        paired: tuple[tuple[str, OrderedDict[tuple[str, str], Tally]], ...] = (
            ("pair", self.pairs), ("key_pair", self.key_pairs))
        nested: tuple[tuple[str, OrderedDict[str, dict[str, Tally]]], ...] = (
            ("name", self.names), ("local", self.locals), ("reply_to", self.reply_tos))
        for kind, pairs in paired:
            for (key, member), t in pairs.items():
                yield HistoryRow(kind, key, member, t.first_seen, t.last_seen, t.inbound, t.outbound)
        for kind, table in flat:
            for key, t in table.items():
                yield HistoryRow(kind, key, "", t.first_seen, t.last_seen, t.inbound, t.outbound)
        for kind, idents in nested:
            for key, members in idents.items():
                for member, t in members.items():
                    yield HistoryRow(kind, key, member, t.first_seen, t.last_seen, t.inbound, t.outbound)

    def put(self, row: HistoryRow, add: bool = False) -> None:
        """Set one entry from a store row (`add`: add it to what is held instead), as the most recently
        observed; the size caps apply, ageing does not (`expire` does that). Rows given in `last_seen`
        order rebuild the tables' order. Unknown kinds are ignored: a newer gateway may have written them."""
        lim = self.limits
        if row.kind in ("pair", "key_pair"):
            pairs = self.pairs if row.kind == "pair" else self.key_pairs
            _set(pairs, (row.key, row.member), row.tally, add, lim.max_pairs)
        elif row.kind in ("address", "key"):
            flat = self.addresses if row.kind == "address" else self.keys
            _set(flat, row.key, row.tally, add, lim.max_correspondents)
        elif row.kind in ("name", "local", "reply_to"):
            # a reply_to row written before Reply-Tos were kept per sender has member '': no sender's
            table = {"name": self.names, "local": self.locals, "reply_to": self.reply_tos}[row.kind]
            members = table.get(row.key)
            if members is None:
                members = table[row.key] = {}
                if len(table) > lim.max_identities:
                    table.popitem(last=False)
            else:
                table.move_to_end(row.key)
            old = members.get(row.member)
            members[row.member] = combined(old, row.tally) if add and old is not None else row.tally
            if len(members) > lim.max_per_identity:
                del members[min(members, key=lambda m: members[m].last_seen)]

    def merge(self, other: CorrespondenceHistory) -> None:
        """Add every entry of `other` (a journal of messages observed since) to this history."""
        for row in other.rows():
            self.put(row, add=True)

    # --- ageing --------------------------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Drop the entries not seen for `max_age_days` before `now` (POSIX seconds), stalest first.
        Runs on every `observe`; costs one look at each table's front when nothing is stale."""
        cutoff = now - self.limits.max_age_days * _DAY
        _expire(self.pairs, cutoff)
        _expire(self.key_pairs, cutoff)
        _expire(self.addresses, cutoff)
        _expire(self.keys, cutoff)
        for nested in (self.names, self.locals, self.reply_tos):
            while nested and max(t.last_seen for t in next(iter(nested.values())).values()) < cutoff:
                nested.popitem(last=False)

    # --- reading -------------------------------------------------------------------------------------

    def lookup(self, facts: MessageFacts, protected_names: Iterable[str] = ()) -> HistoryView:
        """What the signals need about `facts` (an inbound message), before it is observed.
        `protected_names`: the configured protected people, whose names are checked as well."""
        sender = facts.sender
        key = sender_key(sender) if sender else ""
        name = normal_name(facts.display)
        local = sender.rpartition("@")[0]
        display = facts.display
        protected = next((p for p in protected_names if display and shows_name(display, p)), "")
        seen_for_protected = self.names.get(normal_name(protected), {}) if protected else {}
        return HistoryView(
            sender=sender,
            sender_key=key,
            address=self.addresses.get(sender),
            key=self.keys.get(key),
            new_to_address=tuple(r for r in facts.recipients if (sender, r) not in self.pairs),
            new_to_key=tuple(r for r in facts.recipients if (key, r) not in self.key_pairs),
            name=name,
            name_addresses=MappingProxyType(
                {a: t.messages for a, t in self.names.get(name, {}).items()} if name else {}
            ),
            local_domains=frozenset(self.locals.get(local, ())) if local else frozenset(),
            protected_name=protected,
            protected_addresses=frozenset(seen_for_protected),
            reply_to_seen=self._reply_to_seen(facts),
        )

    def _reply_to_seen(self, facts: MessageFacts) -> bool:
        """No Reply-To, or one our users have written to, or one this sender has named before in mail
        the history learned from. Not an address that merely wrote to us: one innocuous message from
        it would otherwise vouch for it as any hijacked vendor's Reply-To."""
        rt = facts.reply_to
        if not rt or rt == facts.sender:
            return True
        written = self.addresses.get(rt)
        return (written is not None and written.outbound > 0) or facts.sender in self.reply_tos.get(rt, {})


def _bump(table: OrderedDict[K, Tally], key: K, now: float, outbound: bool, cap: int) -> None:
    old = table.get(key)
    if old is None:
        table[key] = _new(now, outbound)
        if len(table) > cap:
            table.popitem(last=False)  # the least recently observed entry
    else:
        table[key] = old.add(now, outbound)
        table.move_to_end(key)


def _set(table: OrderedDict[K, Tally], key: K, tally: Tally, add: bool, cap: int) -> None:
    old = table.get(key)
    table[key] = combined(old, tally) if add and old is not None else tally
    table.move_to_end(key)
    if old is None and len(table) > cap:
        table.popitem(last=False)


def _expire(table: OrderedDict[K, Tally], cutoff: float) -> None:
    while table and next(iter(table.values())).last_seen < cutoff:
        table.popitem(last=False)
