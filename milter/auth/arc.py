"""ARC (RFC 8617) chain validation with dkimpy, reading keys only from pre-fetched answers.

What is used and why: dkimpy's `ARC.verify` (dkimpy 1.1.8) validates every ARC-Message-Signature and
ARC-Seal of the chain with the same canonicalisation and RSA code as its DKIM verifier, which this
project already trusts for DKIM (milter.auth.dkim); writing our own ARC crypto would only add a second,
less tested implementation of the same thing. As for DKIM, dkimpy is only fed the key records the fetch
phase already found (its `dnsfunc` reads the message's `Answers`, never the network), and its outcome is
turned into a result here. The chain's structure (RFC 8617 5.2 steps 1-3) is checked without DNS in
milter.auth.message.arc_plan, which also caps the chain at MAX_ARC_SETS.

Result (`ArcResult.result`, the RFC's chain validation status cv): none (no ARC fields), pass, or fail.
A fail says why in `reason`. Key problems are classified before dkimpy runs, since it folds them all
into "did not validate": no key at a name (NXDOMAIN, no data) or an unusable key is a plain fail; a key
lookup of the newest sealer's own key that failed transiently (timeout, SERVFAIL, past the deadline) is a
fail with `transient` set, so the policy can treat it as "could not tell" rather than as a broken chain
(milter.policy.dmarc), the same way DMARC temperror is never a reason to hold mail; any other key's
failed lookup is a plain fail (`_key_problem` says why). RFC 8617 has no temperror for cv, so the
Authentication-Results header says arc=fail with the reason.

`recorded` holds what the newest set's ARC-Authentication-Results say (parsed with authres: its dmarc,
dkim and spf results) when the chain passed, or when it could not be checked for a transient DNS
failure; never for a chain that failed: those claims are sealed by nobody. `trusted` says the newest
sealer is one the admin listed (`auth.trusted_arc_sealers`, exact domain match): a subdomain of a
trusted domain may be delegated to someone else. Nothing here raises for any input.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import authres
import dkim

from milter.auth.dkim import check_key
from milter.auth.dmarc import is_aligned
from milter.auth.dns import TxtAnswer, normalise_name
from milter.auth.message import ArcPlan, as_domain

ArcStatus = Literal["none", "pass", "fail"]
# Where each recorded method names its domain, in order of preference.
_DOMAIN_PROPERTIES = {
    "dmarc": ("header.from",), "dkim": ("header.d", "header.i"), "spf": ("smtp.mailfrom", "smtp.helo"),
}
_MAX_RECORDED = 16


@dataclass(frozen=True)
class RecordedResult:
    """One result an ARC sealer recorded: dmarc (domain: header.from), dkim (header.d) or spf (the
    domain of smtp.mailfrom, else smtp.helo)."""

    method: str
    result: str
    domain: str = ""


@dataclass(frozen=True)
class ArcResult:
    result: ArcStatus = "none"
    instances: int = 0
    sealer: str = ""  # d= of the newest ARC-Seal
    trusted: bool = False  # the sealer is in auth.trusted_arc_sealers
    transient: bool = False  # failed only because a key lookup failed transiently
    recorded_by: str = ""  # authserv-id of the newest ARC-Authentication-Results
    recorded: tuple[RecordedResult, ...] = ()
    reason: str = ""

    def vouches_for(self, from_domain: str | None) -> str | None:
        """What the newest sealer recorded that proves `from_domain` authentic before forwarding:
        "dmarc=pass", or "dkim=pass header.d=X" for a signature aligned (relaxed) with it when the sealer
        recorded no DMARC result for that domain. None otherwise, and always when a DMARC result for it
        is not pass: the sealer's own DMARC verdict is the one to believe."""
        if not from_domain:
            return None
        dmarc = [r for r in self.recorded if r.method == "dmarc" and r.domain in ("", from_domain)]
        if dmarc:
            return "dmarc=pass" if all(r.result == "pass" for r in dmarc) else None
        for r in self.recorded:
            if r.method == "dkim" and r.result == "pass" and is_aligned(r.domain, from_domain, "r"):
                return f"dkim=pass header.d={r.domain}"
        return None


def verify_arc(
    raw: bytes, arc: ArcPlan, answers: Mapping[str, TxtAnswer], trusted_sealers: Collection[str] = ()
) -> ArcResult:
    """The chain validation status of `raw`'s ARC chain (see the module docstring); never raises."""
    if not arc.present:
        return ArcResult()
    if arc.error:
        return ArcResult("fail", reason=arc.error)
    trusted = normalise_name(arc.sealer) in {normalise_name(s) for s in trusted_sealers}
    base = ArcResult("fail", len(arc.sets), arc.sealer, trusted)
    problem = _key_problem(arc, answers)
    if problem is not None:
        reason, transient = problem
        if not transient:
            return replace(base, reason=reason)
        by, recorded = parse_recorded(arc.newest_aar)
        return replace(base, transient=True, recorded_by=by, recorded=recorded, reason=reason)
    return _run_verify(raw, arc, answers, base)


def _key_problem(arc: ArcPlan, answers: Mapping[str, TxtAnswer]) -> tuple[str, bool] | None:
    """(reason, transient) for the first unusable key, permanent problems first (they fail the chain
    whatever a retry finds); None when every key is a usable record.

    Only the newest sealer's own keys get the benefit of the doubt: whoever forges a chain chooses the
    other keys' names, and a zone of their own that never answers would otherwise have the forged
    chain's claims (dmarc=pass for a protected domain) read as "could not tell". The sealer's zone is
    the admin's trusted party's, which a forger cannot silence."""
    transient = None
    sealer_keys = f"._domainkey.{normalise_name(arc.sealer)}"
    for name in arc.key_names:
        answer = answers.get(name)
        if answer is None or answer.status == "temperror":
            if not name.endswith(sealer_keys):
                return f"key lookup failed for {name}, which is not the sealer's", False
            transient = transient or f"key lookup failed for {name}"
            continue
        if answer.status == "none" or not answer.records:
            return f"no key at {name}", False
        try:
            check_key(name, answer.records[0])
        except Exception as e:
            return f"bad key at {name}: {_why(e)}", False
    return (transient, True) if transient else None


def _run_verify(raw: bytes, arc: ArcPlan, answers: Mapping[str, TxtAnswer], base: ArcResult) -> ArcResult:
    wanted = set(arc.key_names)

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        key = normalise_name(name.decode("ascii", "replace"))
        answer = answers.get(key) if key in wanted else None  # the plan's keys, nothing else
        return answer.records[0].encode("ascii") if answer is not None and answer.records else None

    try:
        verifier = dkim.ARC(bytes(raw), logger=_silent_logger(), minkey=1024)
        cv, data, reason = verifier.verify(dnsfunc=dnsfunc)
    except Exception as e:  # dkimpy raises more than DKIMException on hostile input (IndexError, ...)
        return replace(base, reason=f"verifier error: {type(e).__name__}")
    if cv != dkim.CV_Pass:
        return replace(base, reason=_why_text(str(reason)) or "chain did not validate")
    return _passed(arc, data, base)


def _passed(arc: ArcPlan, data: Any, base: ArcResult) -> ArcResult:
    """A validated chain, once dkimpy's view of it is the plan's: the sealer we judge trust by must be
    the one whose seal verified (the two parsers read the header block independently)."""
    newest = data[0] if isinstance(data, list) and data else {}
    sealer = as_domain(bytes(newest.get("as-domain", b"")).decode("ascii", "replace"))
    if newest.get("instance") != len(arc.sets) or sealer != arc.sealer:
        return replace(base, reason="verifier and plan disagree on the newest ARC set")
    aar = bytes(newest.get("aar-value", b"")).decode("utf-8", "replace")
    by, recorded = parse_recorded(re.sub(r"^\s*i\s*=\s*[0-9]+\s*;", "", aar, count=1))
    return replace(base, result="pass", recorded_by=by, recorded=recorded)


def parse_recorded(value: str) -> tuple[str, tuple[RecordedResult, ...]]:
    """(authserv-id, dmarc/dkim/spf results) of an ARC-Authentication-Results value without its i=;
    ("", ()) when authres cannot parse it."""
    if not value or len(value) > 8192:
        return "", ()
    try:
        header = authres.AuthenticationResultsHeader.parse_value(" ".join(value.split()))
    except Exception:  # authres raises its own SyntaxError and friends on malformed values
        return "", ()
    results = [_recorded(r) for r in header.results]
    kept = tuple(r for r in results if r is not None)[:_MAX_RECORDED]
    return str(header.authserv_id or ""), kept


def _recorded(result: Any) -> RecordedResult | None:
    method = str(getattr(result, "method", "") or "").lower()
    if method not in _DOMAIN_PROPERTIES:
        return None
    props = {
        f"{p.type}.{p.name}".lower(): str(p.value or "")
        for p in getattr(result, "properties", ()) or ()
    }
    values = [props.get(key, "") for key in _DOMAIN_PROPERTIES[method]]
    domains = [as_domain(v.rpartition("@")[2]) for v in values if v]
    status = str(getattr(result, "result", "") or "").lower()
    return RecordedResult(method, status, next((d for d in domains if d), ""))


def _why(e: BaseException) -> str:
    return _why_text(str(e)) or type(e).__name__


def _why_text(text: str) -> str:
    """A short, header-safe reason: up to any dumped value, printable ASCII only (as milter.auth.dkim)."""
    text = text.split("(", 1)[0].strip()
    return re.sub(r"[^\x20-\x7e]|[\"\\@;]", "?", text)[:80]


def _silent_logger() -> logging.Logger:
    """dkimpy logs every failed seal at ERROR; the result carries the reason. A Logger built directly
    belongs to no hierarchy, so this changes no global logging state."""
    return logging.Logger("milter.auth.arc.dkimpy", logging.CRITICAL + 1)
