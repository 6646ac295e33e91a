"""Phase 1 of authentication: read the header block and decide which DNS names to ask for.

This is pure and cheap on purpose: it runs on the event loop before any I/O, so it only looks at the
header block (up to the first empty line), never parses MIME, and caps the work it does. It splits
lines the way dkimpy's `rfc822_parse` does (CRLF or LF, continuation lines start with a space or tab,
an mbox "From " line is skipped), so the i-th DKIM-Signature here is the i-th one dkimpy verifies.

ARC (RFC 8617) is planned here too: the structure of the chain (one ARC-Seal, ARC-Message-Signature
and ARC-Authentication-Results per instance, instances 1..N without gaps, cv=none at i=1 and cv=pass
above) is checked without any DNS (RFC 8617 5.2 steps 1-3), so a chain that is broken on its face
costs no lookups, and only a well-formed chain's key names are fetched (milter.auth.arc verifies it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses

from milter.features.domains import is_ip, registrable

MAX_SIGNATURES = 5  # well-formed DKIM signatures looked up and verified; later ones are ignored
MAX_MALFORMED = 5  # malformed ones reported (they cost no DNS, but bound the report)
# ARC sets verified. RFC 8617 allows 50; real chains have one to three hops (a list, a forwarder, a
# mailbox provider), and each set costs up to two key lookups and a body hash in the verifier, so a
# longer chain fails here, before any lookup, rather than buying a hostile message 100 lookups.
MAX_ARC_SETS = 8
_RFC_MAX_INSTANCE = 50  # RFC 8617 4.2.1: i= is 1..50
_MAX_AAR = 8192  # the newest ARC-Authentication-Results kept for the evaluation phase
# The header block read here, on the event loop (about 4 us a field): 1 MiB of 13-byte fields held the
# loop 0.3-0.4 s. The same 256 KiB the parser reads (parse.Limits.header_bytes).
_MAX_HEADER_BYTES = 256 * 1024
_MAX_FROM = 4096

_FIELD = re.compile(rb"([\x21-\x7e]+?):")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_AAR_INSTANCE = re.compile(r"\s*i\s*=\s*([0-9]{1,3})\s*(?:;|$)")
_ARC_SEAL, _ARC_AMS, _ARC_AAR = "arc-seal", "arc-message-signature", "arc-authentication-results"
_ARC_FIELDS = (_ARC_SEAL, _ARC_AMS, _ARC_AAR)


@dataclass(frozen=True)
class SignatureRef:
    """One DKIM-Signature header: its position among them (dkimpy's `idx`) and its d=/s= tags.

    `error` is set when the header cannot even name its key (no d=/s=, bad tag syntax): such a
    signature is reported as permerror without any lookup.
    """

    index: int
    domain: str = ""
    selector: str = ""
    error: str = ""

    @property
    def key_name(self) -> str | None:
        return None if self.error else f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True)
class ArcSetRef:
    """One well-formed ARC set (RFC 8617 4.1): its instance, the ARC-Seal's d=/s=/cv= and the
    ARC-Message-Signature's d=/s=."""

    instance: int
    seal_domain: str
    seal_selector: str
    ams_domain: str
    ams_selector: str
    cv: str

    @property
    def key_names(self) -> tuple[str, str]:
        return (f"{self.seal_selector}._domainkey.{self.seal_domain}",
                f"{self.ams_selector}._domainkey.{self.ams_domain}")


@dataclass(frozen=True)
class ArcPlan:
    """The ARC chain as the header block shows it. No ARC fields: empty (status none). `error` set: the
    chain fails on its structure alone, nothing is looked up. Otherwise `sets` runs from i=1 (oldest) to
    the newest, whose ARC-Authentication-Results value (after "i=N;") is `newest_aar`."""

    sets: tuple[ArcSetRef, ...] = ()
    error: str = ""
    newest_aar: str = ""

    @property
    def present(self) -> bool:
        return bool(self.sets or self.error)

    @property
    def sealer(self) -> str:
        """The d= of the newest ARC-Seal: who vouches for the recorded results ("" if none)."""
        return self.sets[-1].seal_domain if self.sets else ""

    @property
    def key_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for s in self.sets for name in s.key_names))


@dataclass(frozen=True)
class AuthPlan:
    """What to look up for one message. `from_domain` is None unless there is exactly one From address
    with a usable domain (`from_problem` says why not)."""

    from_domain: str | None
    org_domain: str | None
    signatures: tuple[SignatureRef, ...] = ()
    from_problem: str = ""
    arc: ArcPlan = ArcPlan()

    @property
    def needs_crypto(self) -> bool:
        """Signatures or ARC sets to verify (RSA, body hashes): worth a worker process."""
        return bool(self.signatures or self.arc.sets)

    @property
    def names(self) -> tuple[str, ...]:
        """The TXT names to query, without duplicates, in a stable order."""
        wanted = [sig.key_name for sig in self.signatures if sig.key_name]
        wanted.extend(self.arc.key_names)
        if self.from_domain:
            wanted.append(f"_dmarc.{self.from_domain}")
        if self.org_domain:
            wanted.append(f"_dmarc.{self.org_domain}")
        return tuple(dict.fromkeys(n for n in wanted if n))


def plan(raw: bytes) -> AuthPlan:
    """Phase 1 (pure): From domain, organisational domain and DKIM signatures of `raw`."""
    try:
        fields = header_fields(bytes(raw))
        from_domain, problem = from_domain_of(fields)
        org = org_domain(from_domain) if from_domain else None
        return AuthPlan(from_domain, org, signature_refs(fields), problem, arc_plan(fields))
    except Exception as e:  # header-only parsing of hostile input must never stop the pipeline
        return AuthPlan(None, None, (), f"unparsable headers: {type(e).__name__}")


def header_fields(raw: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each header field, in order. Junk lines are skipped."""
    block = _header_block(raw)
    fields: list[tuple[str, list[bytes]]] = []
    for line in block.split(b"\n"):
        if line.endswith(b"\r"):  # lines end in LF or CRLF: as re.split(rb"\r?\n") cut them, in C
            line = line[:-1]
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].append(line)
            continue
        m = _FIELD.match(line)
        if m is not None:
            fields.append((m.group(1).decode("ascii").lower(), [line[m.end() :]]))
    return [(name, b"".join(parts).decode("utf-8", "replace").strip()) for name, parts in fields]


def _header_block(raw: bytes) -> bytes:
    """`raw` up to the blank line that ends its header (within the first _MAX_HEADER_BYTES): where
    `\r?\n\r?\n` would first match, found with `bytes.find` (a regex with an optional first character
    has no literal to skip ahead with, and scanned a 256 KiB block a character at a time)."""
    if raw.startswith((b"\n", b"\r\n")):
        return b""
    found = (raw.find(b"\n\n", 0, _MAX_HEADER_BYTES), raw.find(b"\n\r\n", 0, _MAX_HEADER_BYTES))
    ends = [i for i in found if i >= 0]
    if not ends:
        return raw[:_MAX_HEADER_BYTES]
    end = min(ends)
    return raw[: end - 1] if end and raw[end - 1 : end] == b"\r" else raw[:end]


def from_domain_of(fields: list[tuple[str, str]]) -> tuple[str | None, str]:
    """(domain, "") of the single From address, or (None, why not)."""
    values = [value for name, value in fields if name == "from"]
    if len(values) != 1:
        return None, "no From header" if not values else "several From headers"
    if len(values[0]) > _MAX_FROM:  # bound the address parser's work on hostile input
        return None, "From header too long"
    addresses = [addr for _, addr in getaddresses(values) if addr]
    if not addresses:
        return None, "no From address"
    # An unquoted comma in a display name ("Smith, John <john@example.com>", or phishing's "Microsoft
    # account team ,_<no-reply@...>") parses as a bare word and the real address. The word names no
    # domain, so the one address that does is the From domain DMARC judges, as the reader's client shows
    # it: otherwise "x, Jane <jane@example.com>" from anywhere would dodge example.com's p=reject. Two
    # addresses with domains are several From addresses, which RFC 7489 6.6.1 leaves to the receiver.
    mailboxes = [addr for addr in addresses if "@" in addr]
    if len(mailboxes) > 1:
        return None, "several From addresses"
    if not mailboxes:
        return None, "no usable From domain"
    domain = as_domain(mailboxes[0].rpartition("@")[2])
    return (domain, "") if domain else (None, "no usable From domain")


def as_domain(text: str) -> str | None:
    """`text` as a lower-case DNS name (IDNs to A-labels), or None if it is not one."""
    host = text.strip().rstrip(".").lower()
    if not host or is_ip(host):
        return None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(host) > 253 or _DOMAIN.fullmatch(host) is None:
        return None
    return host


def org_domain(domain: str) -> str:
    """Organisational domain (RFC 7489 3.2) via the public suffix list; the name itself if none."""
    return registrable(domain) or domain


def signature_refs(fields: list[tuple[str, str]]) -> tuple[SignatureRef, ...]:
    refs: list[SignatureRef] = []
    good = bad = 0
    values = [value for name, value in fields if name == "dkim-signature"]
    for index, value in enumerate(values):
        ref = _signature_ref(index, value)
        if ref.error and bad < MAX_MALFORMED:
            bad += 1
            refs.append(ref)
        elif not ref.error and good < MAX_SIGNATURES:
            good += 1
            refs.append(ref)
    return tuple(refs)


def _signature_ref(index: int, value: str) -> SignatureRef:
    tags = parse_tags(value, strict=True)
    if tags is None:
        return SignatureRef(index, error="bad tag list")
    domain = as_domain(tags.get("d", ""))
    selector = tags.get("s", "").strip().lower()
    if domain is None:
        return SignatureRef(index, error="missing or bad d=")
    if len(selector) > 200 or _DOMAIN.fullmatch(selector) is None:
        return SignatureRef(index, domain=domain, error="missing or bad s=")
    return SignatureRef(index, domain, selector)


def arc_plan(fields: list[tuple[str, str]]) -> ArcPlan:
    """The ARC chain of the header fields, its structure checked (RFC 8617 5.2 steps 1-3)."""
    arc_fields = [(name, value) for name, value in fields if name in _ARC_FIELDS]
    if not arc_fields:
        return ArcPlan()
    if len(arc_fields) > 3 * MAX_ARC_SETS:
        return ArcPlan(error=f"more than {MAX_ARC_SETS} ARC sets")
    by_instance: dict[tuple[str, int], str] = {}
    for name, value in arc_fields:
        instance = _arc_instance(name, value)
        if instance is None:
            return ArcPlan(error=f"{name} without a valid i=")
        if (name, instance) in by_instance:
            return ArcPlan(error=f"several {name} with i={instance}")
        by_instance[name, instance] = value
    newest = max(i for _, i in by_instance)
    if newest > MAX_ARC_SETS:
        return ArcPlan(error=f"more than {MAX_ARC_SETS} ARC sets")
    if len(by_instance) != 3 * newest:  # each of 1..newest has all three, or some instance lacks one
        return ArcPlan(error="ARC set missing or incomplete")
    sets = []
    for i in range(1, newest + 1):
        ref = _arc_set(i, by_instance[_ARC_SEAL, i], by_instance[_ARC_AMS, i])
        if isinstance(ref, str):
            return ArcPlan(error=ref)
        sets.append(ref)
    aar = _AAR_INSTANCE.sub("", by_instance[_ARC_AAR, newest], count=1)
    return ArcPlan(tuple(sets), newest_aar=aar[:_MAX_AAR])


def _arc_instance(name: str, value: str) -> int | None:
    """The i= of an ARC field (first in an ARC-Authentication-Results, a tag otherwise), if in 1..50."""
    if name == _ARC_AAR:
        m = _AAR_INSTANCE.match(value)
        text = m.group(1) if m else ""
    else:
        tags = parse_tags(value, strict=True)
        text = (tags or {}).get("i", "")
    if not text.isascii() or not text.isdigit() or len(text) > 3:
        return None
    instance = int(text)
    return instance if 1 <= instance <= _RFC_MAX_INSTANCE else None


def _arc_set(instance: int, seal: str, ams: str) -> ArcSetRef | str:
    """The set's reference, or why it is malformed (which fails the chain)."""
    seal_tags, ams_tags = parse_tags(seal, strict=True), parse_tags(ams, strict=True)
    if seal_tags is None or ams_tags is None:
        return f"ARC set {instance}: bad tag list"
    seal_key, ams_key = _key_of(seal_tags), _key_of(ams_tags)
    if seal_key is None or ams_key is None:
        return f"ARC set {instance}: missing or bad d= or s="
    cv = seal_tags.get("cv", "").lower()
    if cv == "fail":
        return f"ARC-Seal i={instance} records cv=fail"
    if cv != ("none" if instance == 1 else "pass"):  # RFC 8617 5.1.1 / 5.2 step 3
        shown = cv if cv.isascii() and cv.isalpha() and len(cv) <= 10 else "?"  # it goes into a header
        return f"ARC-Seal i={instance} has cv={shown or 'nothing'}"
    return ArcSetRef(instance, *seal_key, *ams_key, cv)


def _key_of(tags: dict[str, str]) -> tuple[str, str] | None:
    domain = as_domain(tags.get("d", ""))
    selector = tags.get("s", "").strip().lower()
    if domain is None or len(selector) > 200 or _DOMAIN.fullmatch(selector) is None:
        return None
    return domain, selector


def parse_tags(text: str, strict: bool) -> dict[str, str] | None:
    """A DKIM/DMARC tag=value list (RFC 6376 3.2), values stripped.

    strict (DKIM): tag names are case-sensitive (RFC 6376 3.2), and a segment without "=", a bad tag
    name or a repeated tag makes the list invalid (None). Lenient (DMARC): names are lower-cased,
    such segments are skipped and the first occurrence of a tag wins.
    """
    tags: dict[str, str] = {}
    for segment in text.split(";"):
        if not segment.strip():
            continue
        name, eq, value = segment.partition("=")
        name = name.strip() if strict else name.strip().lower()
        bad = not eq or _TAG_NAME.fullmatch(name) is None or name in tags
        if bad and strict:
            return None
        if not bad:
            tags[name] = value.strip()
    return tags
