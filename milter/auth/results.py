"""The outcome of authenticating one message, and its renderings.

`header_value` builds an RFC 8601 Authentication-Results value with authres, so quoting and syntax are
the library's; every value that reaches it is either a validated DNS name or one of our own short
reason strings. `summary` is a compact one-line form for logs and verdict reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import authres
import authres.arc
import authres.dmarc

from milter.auth.arc import ArcResult
from milter.auth.dkim import DkimResult
from milter.auth.dmarc import DmarcResult
from milter.auth.spf import SpfResult


@dataclass(frozen=True)
class AuthResults:
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcResult
    spf: SpfResult | None = None
    arc: ArcResult = field(default_factory=ArcResult)

    @property
    def dkim_pass_domains(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.domain for r in self.dkim if r.result == "pass"))

    def header_value(self, authserv_id: str) -> str:
        """The value of an Authentication-Results header (without the field name)."""
        results: list[Any] = [_dkim_clause(r) for r in self.dkim]
        if not results:
            results.append(authres.DKIMAuthenticationResult(result="none"))
        if self.spf is not None:  # "none" for want of a valid sender domain has no smtp.mailfrom
            mailfrom = self.spf.domain or None
            results.append(authres.SPFAuthenticationResult(result=self.spf.result, smtp_mailfrom=mailfrom))
        results.append(_dmarc_clause(self.dmarc))
        results.append(_arc_clause(self.arc))
        header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results)
        return str(header.header_value())

    def summary(self) -> str:
        """E.g. "dkim=pass(example.com) dmarc=fail(p=reject from=example.com) spf=pass(example.com)
        arc=pass(i=1 sealer=lists.example.org trusted)"; arc only where the message carries a chain."""
        dkim = " ".join(f"dkim={r.result}({r.domain or '?'})" for r in self.dkim) or "dkim=none"
        d = self.dmarc
        dmarc_bits = [f"p={d.policy}" if d.policy else "", f"from={d.from_domain}" if d.from_domain else ""]
        if d.aligned_by:
            dmarc_bits.append(f"via={d.aligned_by}")
        detail = " ".join(b for b in dmarc_bits if b)
        parts = [dkim, f"dmarc={d.result}({detail})" if detail else f"dmarc={d.result}"]
        if self.spf is not None:
            parts.append(f"spf={self.spf.result}({self.spf.domain})")
        if self.arc.result != "none":
            parts.append(_arc_summary(self.arc))
        return " ".join(parts)


def _dkim_clause(r: DkimResult) -> Any:
    clause = authres.DKIMAuthenticationResult(result=r.result, reason=r.reason or None)
    if r.domain:
        clause.header_d = r.domain
    if r.selector:
        clause.header_s = r.selector
    return clause


def _dmarc_clause(d: DmarcResult) -> Any:
    comment = f"p={d.policy}" if d.policy else None
    clause = authres.dmarc.DMARCAuthenticationResult(result=d.result, result_comment=comment)
    if d.from_domain:
        clause.header_from = d.from_domain
    return clause


def _arc_clause(a: ArcResult) -> Any:
    comment = f"i={a.instances} sealer {a.sealer}" if a.sealer else None
    return authres.arc.ARCAuthenticationResult(
        result=a.result, reason=a.reason or None, result_comment=comment
    )


def _arc_summary(a: ArcResult) -> str:
    bits = [f"i={a.instances}" if a.instances else "", f"sealer={a.sealer}" if a.sealer else ""]
    bits.append("trusted" if a.trusted and a.sealer else "")
    if a.result == "fail":
        bits.append("transient" if a.transient else "")
    detail = " ".join(b for b in bits if b)
    return f"arc={a.result}({detail})" if detail else f"arc={a.result}"
