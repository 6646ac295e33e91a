"""DNS blocklists: the client address in IP lists (Spamhaus ZEN, ...), sender and link domains in domain
lists (Spamhaus DBL, SURBL, URIBL), as Rspamd's RBL and SURBL modules and SpamAssassin's URIBL plugin do.

Why this exists beside the model: the age and reputation of a sending domain is evidence the corpora
cannot carry offline (their lists' answers of the day are gone), so no model here can learn it, and it is
what separates a domain registered for one campaign from a brand's own (docs/DETECTION.md). It is
policy, not a feature: a listing decides by the zone's configured action (`milter.policy.reputation`).

Why our own code rather than a package (pydnsbl, the one maintained one): it brings its own resolver
(aiodns / c-ares), outside the gateway's cache and its one deadline per message. The lookup is one A
query per name through the resolver sender authentication already uses; what needs care is reading the
answer, and that is here:

* only answers inside 127.0.0.0/8 are list answers. A resolver that rewrites NXDOMAIN into an address
  of its own (some ISPs' "search help" pages) would otherwise list every address on the Internet;
* the lists' refusal codes are no listing: Spamhaus answers 127.255.255.252-255 when the query is
  malformed, comes through a public or open resolver, or exceeds the free-use volume, URIBL and SURBL
  answer 127.0.0.1 when they block the querier. Read as listings they would quarantine all mail (the
  failure SpamAssassin and others shipped in 2021 when Spamhaus began answering public resolvers so).
  They are `refused` results: counted, logged with the fix (a local recursive resolver), never acted on;
* a zone with `codes` counts only those answers, each with its meaning ("127.0.1.4" = "phish domain"),
  so an admin can leave out the codes a list documents as weak (Spamhaus DBL's "abused legit" ones);
* every lookup of a message shares one deadline; a lookup still running at it is an `error` result,
  never a stall and never a listing.

The module is pure except `look_up`, which does the queries (on the event loop, as `check.fetch`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from types import MappingProxyType

from milter.auth.dns import Resolver, TxtAnswer, lookup_all, normalise_name
from milter.types import Action, Verdict

#: What a domain zone may be asked about: the sender's domains (From, envelope sender, Reply-To) and the
#: domains of the message's links.
DOMAIN_SOURCES = ("sender", "links")
#: Answers that mean "we refuse to answer you", not "listed" (module docstring).
DEFAULT_REFUSALS = ("127.255.255.0/24", "127.0.0.1/32")
#: A message's link domains looked up at most: a page of links to one tracking domain is one lookup,
#: but a spam of a hundred throwaway domains must not make a hundred queries per zone.
MAX_LINK_DOMAINS = 10
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


@dataclass(frozen=True)
class Zone:
    """One blocklist as configured (`[[reputation.zone]]`)."""

    name: str  # "zen.spamhaus.org"
    kind: str  # "ip" or "domain"
    action: Action = Action.TAG
    verdict: Verdict = Verdict.SPAM
    # answer address -> meaning; empty: any list answer (127.0.0.0/8, not a refusal) counts
    codes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    sources: tuple[str, ...] = DOMAIN_SOURCES  # domain zones: what is looked up
    refusals: tuple[str, ...] = DEFAULT_REFUSALS
    # a listing acts only when the model's not-ham score reaches this (0: always), for lists too broad to
    # decide alone (dynamic-address lists, "level 2" lists of whole networks)
    min_score: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "codes", MappingProxyType(dict(self.codes)))

    @cached_property
    def _refusal_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(net, strict=False) for net in self.refusals)

    def refused(self, address: ipaddress.IPv4Address) -> bool:
        return any(address in net for net in self._refusal_networks)


@dataclass(frozen=True)
class Subject:
    """A thing to look up: an address or a domain, and what it is to the message."""

    value: str  # "192.0.2.1" or "example.com"
    role: str  # "client address", "From domain", "envelope sender domain", "Reply-To domain", "link domain"
    source: str  # "ip", "sender" or "links"


@dataclass(frozen=True)
class Listing:
    """A subject a zone lists: what the policy acts on and the reason quotes."""

    zone: str
    subject: str
    role: str
    code: str  # the answer, "127.0.1.2"
    meaning: str  # the zone's word for the code, "" when it has none
    verdict: Verdict
    action: Action
    min_score: float = 0.0  # the zone's: the listing acts only from this not-ham score

    @property
    def reason(self) -> str:
        what = f"{self.code}: {self.meaning}" if self.meaning else self.code
        return f"{self.role} {self.subject} listed in {self.zone} ({what})"


@dataclass(frozen=True)
class ZoneResult:
    """One query's outcome, for metrics and logs: "listed", "clean", "refused" or "error"."""

    zone: str
    query: str
    result: str
    detail: str = ""


@dataclass(frozen=True)
class Reputation:
    """What the blocklists said about one message (picklable, frozen)."""

    listings: tuple[Listing, ...] = ()
    results: tuple[ZoneResult, ...] = ()


def query_name(subject: str, zone: str) -> str | None:
    """The name to ask `zone` about `subject`: reversed octets (IPv4) or nibbles (IPv6) of an address,
    the domain itself otherwise; None for what no list can answer (an empty or malformed name)."""
    try:
        ip = ipaddress.ip_address(subject)
    except ValueError:
        domain = normalise_name(subject)
        if not domain or "." not in domain or any(not label for label in domain.split(".")):
            return None
        return f"{domain}.{zone}"
    if ip.version == 4:
        return ".".join(reversed(str(ip).split("."))) + f".{zone}"
    return ".".join(reversed(ip.exploded.replace(":", ""))) + f".{zone}"


def read_answer(
    zone: Zone, subject: Subject, answer: TxtAnswer, query: str | None = None
) -> tuple[ZoneResult, Listing | None]:
    """The zone's answer for `subject` (asked as `query`, worked out here if not given), as a result and
    the listing if there is one (module docstring)."""
    query = query or query_name(subject.value, zone.name) or subject.value
    if answer.status == "none":
        return ZoneResult(zone.name, query, "clean"), None
    if answer.status != "found":
        return ZoneResult(zone.name, query, "error", answer.reason or "no answer"), None
    listed: list[str] = []
    for record in answer.records:
        try:
            address = ipaddress.IPv4Address(record)
        except ValueError:
            return ZoneResult(zone.name, query, "error", f"not an address: {record[:40]!r}"), None
        if address not in _LOOPBACK:
            return ZoneResult(zone.name, query, "error", f"not a list answer: {record}"), None
        if zone.refused(address):
            return ZoneResult(zone.name, query, "refused", record), None
        if not zone.codes or record in zone.codes:
            listed.append(record)
    if not listed:
        unlisted = "codes not configured: " + ",".join(answer.records)
        return ZoneResult(zone.name, query, "clean", unlisted), None
    code = min(listed, key=ipaddress.IPv4Address)
    listing = Listing(zone.name, subject.value, subject.role, code, zone.codes.get(code, ""),
                      zone.verdict, zone.action, zone.min_score)
    return ZoneResult(zone.name, query, "listed", code), listing


def subjects(
    client_ip: str | None, sender_domains: Iterable[tuple[str, str]], link_domains: Sequence[str]
) -> tuple[Subject, ...]:
    """What a message offers for lookup: its client (outside clients only: the caller decides), its
    sender domains as (role, domain), its first MAX_LINK_DOMAINS distinct link domains not already a
    sender domain."""
    out: list[Subject] = []
    if client_ip:
        out.append(Subject(client_ip, "client address", "ip"))
    seen: set[str] = set()
    for role, domain in sender_domains:
        d = normalise_name(domain)
        if d and d not in seen:
            seen.add(d)
            out.append(Subject(d, role, "sender"))
    links = 0
    for domain in link_domains:
        d = normalise_name(domain)
        if d and d not in seen and links < MAX_LINK_DOMAINS:
            seen.add(d)
            links += 1
            out.append(Subject(d, "link domain", "links"))
    return tuple(out)


def asks(zone: Zone, subject: Subject) -> bool:
    """Whether `zone` lists things of `subject`'s kind (an IP zone addresses; a domain zone its sources)."""
    if zone.kind == "ip":
        return subject.source == "ip"
    return subject.source in zone.sources


# ASYNC109: one deadline over the whole fan-out, expiry giving "error" results (as check.fetch).
async def look_up(
    resolver: Resolver, zones: Sequence[Zone], targets: Sequence[Subject], timeout: float  # noqa: ASYNC109
) -> Reputation:
    """Every (zone, subject) pair the zones ask about, concurrently, within `timeout` seconds; a name two
    zones share (one list configured twice, for two sets of codes) is asked once. Never raises for DNS."""
    pairs = [
        (z, s, name) for z in zones for s in targets if asks(z, s) and (name := query_name(s.value, z.name))
    ]
    if not pairs:
        return Reputation()
    answers = await lookup_all({name: partial(resolver.query, name, "A") for _, _, name in pairs}, timeout)
    results: list[ZoneResult] = []
    listings: list[Listing] = []
    for zone, subject, name in pairs:
        result, listing = read_answer(zone, subject, answers[name], name)
        results.append(result)
        if listing is not None:
            listings.append(listing)
    return Reputation(tuple(listings), tuple(results))

