"""Phase 1 of authentication: read the header block and decide which DNS names to ask for.

This is pure and cheap on purpose: it runs on the event loop before any I/O, so it only looks at the
header block (up to the first empty line), never parses MIME, and caps the work it does. It splits
lines the way dkimpy's `rfc822_parse` does (CRLF or LF, continuation lines start with a space or tab,
an mbox "From " line is skipped), so the i-th DKIM-Signature here is the i-th one dkimpy verifies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses

from milter.features.domains import is_ip, registrable

MAX_SIGNATURES = 5  # well-formed DKIM signatures looked up and verified; later ones are ignored
MAX_MALFORMED = 5  # malformed ones reported (they cost no DNS, but bound the report)
# The header block read here, on the event loop (about 4 us a field): 1 MiB of 13-byte fields held the
# loop 0.3-0.4 s. The same 256 KiB the parser reads (parse.Limits.header_bytes).
_MAX_HEADER_BYTES = 256 * 1024
_MAX_FROM = 4096

_FIELD = re.compile(rb"([\x21-\x7e]+?):")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


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
class AuthPlan:
    """What to look up for one message. `from_domain` is None unless there is exactly one From address
    with a usable domain (`from_problem` says why not)."""

    from_domain: str | None
    org_domain: str | None
    signatures: tuple[SignatureRef, ...] = ()
    from_problem: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        """The TXT names to query, without duplicates, in a stable order."""
        wanted = [sig.key_name for sig in self.signatures if sig.key_name]
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
        return AuthPlan(from_domain, org, signature_refs(fields), problem)
    except Exception as e:  # header-only parsing of hostile input must never stop the pipeline
        return AuthPlan(None, None, (), f"unparsable headers: {type(e).__name__}")


def header_fields(raw: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each header field, in order. Junk lines are skipped."""
    block = _header_block(raw)
    fields: list[tuple[str, list[bytes]]] = []
    for line in re.split(rb"\r?\n", block):
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].append(line)
            continue
        m = _FIELD.match(line)
        if m is not None:
            fields.append((m.group(1).decode("ascii").lower(), [line[m.end() :]]))
    return [(name, b"".join(parts).decode("utf-8", "replace").strip()) for name, parts in fields]


def _header_block(raw: bytes) -> bytes:
    if raw.startswith((b"\n", b"\r\n")):
        return b""
    m = _HEADER_END.search(raw, 0, _MAX_HEADER_BYTES)
    return raw[: m.start()] if m else raw[:_MAX_HEADER_BYTES]


def from_domain_of(fields: list[tuple[str, str]]) -> tuple[str | None, str]:
    """(domain, "") of the single From address, or (None, why not)."""
    values = [value for name, value in fields if name == "from"]
    if len(values) != 1:
        return None, "no From header" if not values else "several From headers"
    if len(values[0]) > _MAX_FROM:  # bound the address parser's work on hostile input
        return None, "From header too long"
    addresses = [addr for _, addr in getaddresses(values) if addr]
    if len(addresses) != 1:
        return None, "no From address" if not addresses else "several From addresses"
    _, at, host = addresses[0].rpartition("@")
    domain = as_domain(host) if at else None
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
