"""SPF evaluation (RFC 7208 check_host()) for a client IP, MAIL FROM and HELO, over our own resolver.

Why not pyspf: it does its DNS synchronously through a module-level lookup function. Called on the
gateway's event loop it would block every other connection for the length of the evaluation (up to a
dozen lookups), and it could not use our `Resolver`: the TTL cache and request coalescing shared with
DKIM and DMARC, the injectable static resolver of tests and offline scans. The walk itself is small.

`check_spf` has no deadline of its own (the caller wraps it in one, and cancellation propagates); it
stops on the RFC's lookup limits: ten DNS-querying terms per evaluation, nested ones included, two void
lookups, ten MX hosts per mx. It never raises: anything unexpected becomes permerror, with a reason.

Simplified on purpose: `ptr` never matches and looks nothing up (RFC 7208 section 5.5: it SHOULD NOT be
used, is slow and unreliable), though it still counts as a DNS term; `exp=` is parsed and ignored (we
produce no explanations); void lookups count the terms' own lookups (a, mx, exists), not the address
lookups of an mx's hosts, which are made concurrently.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from milter.auth.dns import Resolver, TxtAnswer
from milter.auth.message import as_domain
from milter.auth.spf import SpfResult
from milter.auth.spf_macro import MacroContext, MacroError, expand_domain

__all__ = ["check_spf"]

Address = IPv4Address | IPv6Address

_MAX_TERMS = 10
_MAX_VOIDS = 2
_MAX_MX = 10
_RESULTS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_TERM = re.compile(r"([+\-~?]?)([a-z][a-z0-9_.-]*)(.*)", re.IGNORECASE | re.DOTALL)
_DUAL_CIDR = re.compile(r"(?:/(0|[1-9]\d{0,2}))?(?://(0|[1-9]\d{0,2}))?\Z")
_PREFIX = re.compile(r"0|[1-9]\d{0,2}")


class _Abort(Exception):
    """Ends a check_host() with `result` (temperror or permerror)."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


def _permerror(reason: str) -> _Abort:
    return _Abort("permerror", reason)


@dataclass(frozen=True)
class _Term:
    """One mechanism: its qualifier's result, name, text (for reasons), and what it is about: the
    expanded domain (include, a, mx, ptr, exists) or the network (ip4, ip6), and a/mx CIDR lengths."""

    result: str
    name: str
    text: str
    target: str = ""
    network: IPv4Network | IPv6Network | None = None
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True)
class _Record:
    terms: tuple[_Term, ...]
    redirect: str | None


async def check_spf(ip: str, mail_from: str | None, helo: str | None, resolver: Resolver) -> SpfResult:
    """The SPF result for mail from `ip` with envelope sender `mail_from` (None, "" or "<>": the null
    sender, checked as postmaster@`helo`). `domain` of the result is the domain checked (for DMARC);
    "none" with an empty domain when neither names a valid multi-label domain."""
    domain = ""
    try:
        identity = _identity(mail_from, helo)
        if identity is None:
            return SpfResult("none", "", "no valid MAIL FROM or HELO domain")
        local, domain = identity
        address = _client_address(ip)
        if address is None:
            return SpfResult("permerror", domain, f"invalid client address {str(ip)[:60]!r}")
        context = MacroContext(address, local, domain, domain, (helo or "").strip() or "unknown")
        result, reason = await _Evaluation(address, resolver, context).check_host(domain)
        return SpfResult(result, domain, reason)
    except Exception as e:  # the last guard: a bug must not take the message down with it
        return SpfResult("permerror", domain, f"internal error: {type(e).__name__}")


def _identity(mail_from: str | None, helo: str | None) -> tuple[str, str] | None:
    """(local part, domain) to check: MAIL FROM's, or ("postmaster", HELO) for the null sender."""
    sender = (mail_from or "").strip()
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1].strip()
    if not sender:
        domain = _spf_domain(helo or "")
        return ("postmaster", domain) if domain else None
    local, _, domain_text = sender.rpartition("@")
    domain = _spf_domain(domain_text)
    return (local or "postmaster", domain) if domain else None


def _spf_domain(text: str) -> str | None:
    """`text` as a checkable domain: well formed and multi-label (RFC 7208 section 4.3), else None."""
    domain = as_domain(text)
    return domain if domain and "." in domain else None


def _client_address(ip: str) -> Address | None:
    text = str(ip).strip().strip("[]")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address):
        if address.scope_id is not None:
            return None
        return address.ipv4_mapped or address
    return address


class _Evaluation:
    """One check_spf(): the client, the resolver, and the budget that nested include/redirect share."""

    def __init__(self, ip: Address, resolver: Resolver, context: MacroContext) -> None:
        self.ip = ip
        self.resolver = resolver
        self.context = context
        self.terms = 0
        self.voids = 0

    async def check_host(self, domain: str) -> tuple[str, str]:
        """(result, reason) for `domain`, as RFC 7208 section 4 defines check_host()."""
        try:
            record = await self._record(domain)
            if record is None:
                return "none", f"no SPF record at {domain}"
            return await self._evaluate(record)
        except _Abort as e:
            return e.result, e.reason
        except MacroError as e:
            return "permerror", str(e)

    async def _record(self, domain: str) -> _Record | None:
        name = _spf_domain(domain)
        if name is None:
            return None
        answer = await self._query(name, "TXT")
        if answer.status == "temperror":
            raise _Abort("temperror", f"TXT lookup of {name} failed: {answer.reason}")
        records = [r for r in answer.records if r.lower() == "v=spf1" or r.lower().startswith("v=spf1 ")]
        if len(records) > 1:
            raise _permerror(f"{len(records)} SPF records at {name}")
        return _parse(records[0], replace(self.context, domain=name)) if records else None

    async def _evaluate(self, record: _Record) -> tuple[str, str]:
        for term in record.terms:
            if await self._matches(term):
                return term.result, f"matched {term.text}"
        if record.redirect is None:
            return "neutral", "no mechanism matched"
        self._spend(f"redirect={record.redirect}")
        result, reason = await self.check_host(record.redirect)
        if result == "none":
            return "permerror", f"redirect={record.redirect}: {reason}"
        return result, reason

    async def _matches(self, term: _Term) -> bool:
        if term.name == "all":
            return True
        if term.network is not None:
            return self.ip in term.network  # never across address families
        self._spend(term.text)
        if term.name == "include":
            return await self._include(term.target)
        if term.name == "a":
            return self._any_within(self._records(await self._query(term.target, self._family()), True), term)
        if term.name == "mx":
            return await self._mx(term)
        if term.name == "exists":
            return bool(self._records(await self._query(term.target, "A"), True))
        return False  # ptr: never looked up, never matches

    async def _include(self, target: str) -> bool:
        result, reason = await self.check_host(target)
        if result == "pass":
            return True
        if result in ("fail", "softfail", "neutral"):
            return False
        raise _Abort("temperror" if result == "temperror" else "permerror", f"include:{target}: {reason}")

    async def _mx(self, term: _Term) -> bool:
        exchanges = self._records(await self._query(term.target, "MX"), True)
        hosts = [record.split()[-1] for record in exchanges if record.split()]
        if len(hosts) > _MAX_MX:
            raise _permerror(f"{term.text}: {len(hosts)} MX hosts, more than {_MAX_MX}")
        answers = await asyncio.gather(*(self._query(host, self._family()) for host in hosts))
        if any(self._any_within(answer.records, term) for answer in answers):
            return True
        for answer in answers:
            self._records(answer, False)  # raises temperror if a host's lookup failed
        return False

    def _family(self) -> str:
        return "A" if self.ip.version == 4 else "AAAA"

    def _any_within(self, records: tuple[str, ...], term: _Term) -> bool:
        prefix = term.cidr4 if self.ip.version == 4 else term.cidr6
        for record in records:
            try:
                network = ipaddress.ip_network(f"{record.strip()}/{prefix}", strict=False)
            except ValueError:
                continue  # junk in an answer is no address of the client's
            if self.ip in network:  # False across address families
                return True
        return False

    def _records(self, answer: TxtAnswer, void_counts: bool) -> tuple[str, ...]:
        if answer.status == "temperror":
            raise _Abort("temperror", f"DNS lookup failed: {answer.reason}")
        if answer.status == "none" and void_counts:
            self.voids += 1
            if self.voids > _MAX_VOIDS:
                raise _permerror(f"more than {_MAX_VOIDS} void lookups")
        return answer.records

    def _spend(self, text: str) -> None:
        self.terms += 1
        if self.terms > _MAX_TERMS:
            raise _permerror(f"more than {_MAX_TERMS} DNS-querying terms (at {text})")

    async def _query(self, name: str, rdtype: str) -> TxtAnswer:
        try:
            answer = await self.resolver.query(name, rdtype)
        except Exception as e:  # a resolver breaking its never-raise contract
            return TxtAnswer.temperror(f"resolver error: {type(e).__name__}")
        return answer if isinstance(answer, TxtAnswer) else TxtAnswer.temperror("resolver returned junk")


def _parse(text: str, context: MacroContext) -> _Record:
    """A record's terms, its macros expanded for `context`; permerror (raised) on any syntax error."""
    terms: list[_Term] = []
    redirect: str | None = None
    seen: set[str] = set()
    for token in text.split(" ")[1:]:
        if not token:
            continue
        term = _TERM.fullmatch(token)
        if term is None:
            raise _permerror(f"invalid term {token[:60]!r}")
        qualifier, name, rest = term[1], term[2].lower(), term[3]
        if not rest.startswith("="):
            terms.append(_mechanism(_RESULTS[qualifier or "+"], name, rest, token, context))
            continue
        if qualifier or (name in seen and name in ("redirect", "exp")):
            raise _permerror(f"invalid modifier {token[:60]!r}")
        seen.add(name)
        if name == "redirect":
            redirect = expand_domain(rest[1:], context)
        # exp= and unknown modifiers are ignored (RFC 7208 sections 6.2 and 6)
    return _Record(tuple(terms), redirect)


def _mechanism(result: str, name: str, rest: str, token: str, context: MacroContext) -> _Term:
    if name == "all" and not rest:
        return _Term(result, name, token)
    if name in ("ip4", "ip6") and rest.startswith(":"):
        return _Term(result, name, token, network=_network(name, rest[1:]))
    if name in ("include", "exists") and rest.startswith(":"):
        return _Term(result, name, token, expand_domain(rest[1:], context))
    if name in ("a", "mx", "ptr"):
        cidr = _DUAL_CIDR.search(rest) if name != "ptr" else None
        spec = rest[: cidr.start()] if cidr else rest
        cidr4, cidr6 = (int(cidr[1] or 32), int(cidr[2] or 128)) if cidr else (32, 128)
        if cidr4 > 32 or cidr6 > 128 or (spec and not spec.startswith(":")):
            raise _permerror(f"invalid mechanism {token[:60]!r}")
        target = expand_domain(spec[1:], context) if spec else context.domain
        return _Term(result, name, token, target, cidr4=cidr4, cidr6=cidr6)
    raise _permerror(f"unknown or malformed mechanism {token[:60]!r}")


def _network(name: str, text: str) -> IPv4Network | IPv6Network:
    address, slash, length = text.partition("/")
    longest = 32 if name == "ip4" else 128
    if (slash and _PREFIX.fullmatch(length) is None) or "%" in address:
        raise _permerror(f"invalid {name} network {text[:60]!r}")
    try:
        parsed = IPv4Address(address) if name == "ip4" else IPv6Address(address)
        return ipaddress.ip_network(f"{parsed}/{length or longest}", strict=False)
    except ValueError as e:
        raise _permerror(f"invalid {name} network {text[:60]!r}") from e
