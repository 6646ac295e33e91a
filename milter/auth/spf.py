"""SPF results: the value type, and results relayed by a trusted upstream MTA.

Evaluating SPF (RFC 7208) needs the connecting IP, the envelope sender and HELO, and an iterative walk
of include:/redirect=/a/mx mechanisms with up to ten further DNS lookups, which does not fit the
"plan the names, fetch them all at once, evaluate offline" design of the DKIM / DMARC part; it runs
beside the fetch instead (milter.auth.check.gather). Where we cannot check it ourselves (no client
address: an offline scan, a relay that sends no XFORWARD) but the border MTA (Postfix with an SPF policy
daemon, say) already did, it records the result in an
Authentication-Results header under its own authserv-id; this module takes the SPF result from such a
header, and ONLY from headers whose authserv-id the operator lists: anyone can write an
Authentication-Results header into a message, so the border MTA must also strip incoming headers
carrying its own id (RFC 8601 section 5).

Where the gateway itself knows the client IP, `milter.auth.spf_check.check_spf` evaluates SPF, and
that result takes precedence over any header.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import authres

from milter.auth.message import as_domain, header_fields

_MAX_HEADERS = 20
_MAX_VALUE = 8192


@dataclass(frozen=True)
class SpfResult:
    """An SPF result (pass, fail, softfail, neutral, none, temperror, permerror) for `domain`, the
    MAIL FROM domain (or the HELO name when MAIL FROM was empty). `reason` says why, for logs (set by
    milter.auth.spf_check); it takes no part in equality."""

    result: str
    domain: str
    reason: str = field(default="", compare=False)


def trusted_spf_from_headers(raw: bytes, authserv_ids: Collection[str]) -> SpfResult | None:
    """The first SPF result in an Authentication-Results header from one of `authserv_ids`
    (case-insensitive), topmost header first. Malformed headers are skipped; never raises."""
    trusted = {i.strip().lower() for i in authserv_ids if i.strip()}
    if not trusted:
        return None
    try:
        values = [v for n, v in header_fields(bytes(raw)) if n == "authentication-results"]
    except Exception:
        return None
    for value in values[:_MAX_HEADERS]:
        header = _parse(value)
        if header is None or str(header.authserv_id or "").lower() not in trusted:
            continue
        for result in header.results:
            spf = _spf_of(result)
            if spf is not None:
                return spf
    return None


def _parse(value: str) -> Any:
    if len(value) > _MAX_VALUE:
        return None
    try:
        return authres.AuthenticationResultsHeader.parse_value(value)
    except Exception:  # authres raises its own SyntaxError and friends on malformed values
        return None


def _spf_of(result: Any) -> SpfResult | None:
    if getattr(result, "method", None) != "spf":
        return None
    identities = (getattr(result, "smtp_mailfrom", None), getattr(result, "smtp_helo", None))
    domains = [as_domain(str(i).rpartition("@")[2]) for i in identities if i]
    domain = next((d for d in domains if d), None)
    status = str(getattr(result, "result", "") or "").lower()
    return SpfResult(status, domain) if domain and status else None
