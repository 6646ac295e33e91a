"""DMARC (RFC 7489): policy discovery from pre-fetched answers, identifier alignment, the result.

Discovery (6.6.3): the record at _dmarc.<From domain>, else at _dmarc.<organisational domain>, where
`sp=` (if valid) replaces `p=`. Of the TXT strings at a name, only those starting with v=DMARC1
(compared case-insensitively) count; none means "no record here", several is a permerror. A record
without a valid p= is treated as p=none when it has a rua= reporting address and is a permerror
otherwise, as 6.6.3 step 6 says; an invalid sp= is ignored (p= applies) rather than voiding the
record, which is a deliberate simplification. Unknown tags and malformed tag segments are ignored.
pct= is parsed and reported; sampling is left to the caller's policy.

Result: pass if an aligned DKIM signature passed, or an SPF pass (ours or a trusted upstream's) is
aligned; none without a From domain or without a record; temperror if a record lookup failed
transiently; permerror for an unusable record; otherwise fail, except that it is temperror when no
aligned pass exists but an aligned DKIM signature (or the aligned SPF check) ended in temperror: a
retry could still pass, and a transient DNS failure must not make a legitimate message look like a
forgery.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from milter.auth.dkim import DkimResult
from milter.auth.dns import TxtAnswer
from milter.auth.message import org_domain, parse_tags
from milter.auth.spf import SpfResult

DmarcStatus = Literal["pass", "fail", "none", "temperror", "permerror"]
Policy = Literal["none", "quarantine", "reject"]
_POLICIES: dict[str, Policy] = {"none": "none", "quarantine": "quarantine", "reject": "reject"}
_VERSION = re.compile(r"\s*v\s*=\s*dmarc1\s*(;|$)", re.IGNORECASE)


@dataclass(frozen=True)
class DmarcResult:
    result: DmarcStatus
    from_domain: str | None
    policy: Policy | None = None
    aligned_by: Literal["dkim", "spf"] | None = None
    spf_evaluated: bool = False
    pct: int = 100
    reason: str = ""


@dataclass(frozen=True)
class DmarcRecord:
    policy: Policy
    subdomain_policy: Policy | None = None
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"
    pct: int = 100


def parse_record(text: str) -> DmarcRecord | None:
    """A DMARC record from its TXT string; None if it has no usable policy (see module docstring)."""
    tags = parse_tags(text, strict=False)
    if tags is None:
        return None
    policy = _POLICIES.get(tags.get("p", "").lower())
    if policy is None:
        if ":" not in tags.get("rua", ""):
            return None
        policy = "none"
    return DmarcRecord(
        policy,
        _POLICIES.get(tags.get("sp", "").lower()),
        "s" if tags.get("adkim", "").lower() == "s" else "r",
        "s" if tags.get("aspf", "").lower() == "s" else "r",
        _pct(tags.get("pct", "")),
    )


def _pct(text: str) -> int:
    return int(text) if re.fullmatch(r"[0-9]{1,3}", text) and int(text) <= 100 else 100


def is_aligned(domain: str, from_domain: str, mode: Literal["r", "s"]) -> bool:
    """Strict: the same name. Relaxed: the same organisational domain (RFC 7489 3.1)."""
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return domain == from_domain
    return bool(domain) and org_domain(domain) == org_domain(from_domain)


def discover(
    from_domain: str, org: str | None, answers: Mapping[str, TxtAnswer]
) -> tuple[DmarcRecord | None, Policy | None, DmarcStatus | None, str]:
    """(record, applicable policy, early result, reason); early result set when no alignment check
    is needed (none / temperror / permerror)."""
    names = [(f"_dmarc.{from_domain}", False)]
    if org and org != from_domain:
        names.append((f"_dmarc.{org}", True))
    for name, is_org in names:
        texts, status, reason = _record_texts(name, answers.get(name))
        if status is not None:
            return None, None, status, reason
        if not texts:
            continue
        if len(texts) > 1:
            return None, None, "permerror", f"several DMARC records at {name}"
        record = parse_record(texts[0])
        if record is None:
            return None, None, "permerror", f"no valid p= at {name}"
        policy = (record.subdomain_policy or record.policy) if is_org else record.policy
        return record, policy, None, ""
    return None, None, "none", "no DMARC record"


def _record_texts(name: str, answer: TxtAnswer | None) -> tuple[list[str], DmarcStatus | None, str]:
    if answer is None:
        return [], "temperror", f"{name} not fetched"
    if answer.status == "temperror":
        return [], "temperror", f"lookup of {name} failed"
    return [t for t in answer.records if _VERSION.match(t)], None, ""


def evaluate_dmarc(
    from_domain: str | None,
    org: str | None,
    dkim_results: Sequence[DkimResult],
    spf: SpfResult | None,
    answers: Mapping[str, TxtAnswer],
    why_no_from: str = "",
) -> DmarcResult:
    spf_evaluated = spf is not None
    if not from_domain:
        return DmarcResult("none", None, spf_evaluated=spf_evaluated, reason=why_no_from or "no From domain")
    record, policy, early, reason = discover(from_domain, org, answers)
    if record is None or policy is None:
        return DmarcResult(early or "none", from_domain, spf_evaluated=spf_evaluated, reason=reason)
    dkim_aligned = [r for r in dkim_results if is_aligned(r.domain, from_domain, record.adkim)]
    spf_aligned = spf is not None and is_aligned(spf.domain, from_domain, record.aspf)
    spf_status = spf.result.lower() if spf is not None and spf_aligned else ""
    result: DmarcStatus = "fail"
    aligned_by: Literal["dkim", "spf"] | None = None
    reason = "no aligned pass"
    if any(r.result == "pass" for r in dkim_aligned):
        result, aligned_by, reason = "pass", "dkim", ""
    elif spf_status == "pass":
        result, aligned_by, reason = "pass", "spf", ""
    elif spf_status == "temperror" or any(r.result == "temperror" for r in dkim_aligned):
        result, reason = "temperror", "aligned check failed transiently"
    return DmarcResult(result, from_domain, policy, aligned_by, spf_evaluated, record.pct, reason)
