"""Sender authentication: DKIM verification, ARC validation and DMARC evaluation for raw RFC 822 messages.

Three phases keep DNS I/O out of the CPU-bound part (see milter.auth.check): `plan(raw)` reads the
header block, `await fetch(plan, resolver, timeout)` does every TXT lookup under one deadline, and
`evaluate(raw, plan, answers, trusted_spf)` verifies and decides, purely, in a worker if need be.
`authenticate` chains them. SPF is evaluated by `check_spf` (run by `gather` when the caller knows the
client), or else taken from a trusted upstream Authentication-Results header.
"""

from __future__ import annotations

from milter.auth.arc import ArcResult, RecordedResult
from milter.auth.cache import CachingResolver
from milter.auth.check import Evidence, SpfClient, authenticate, evaluate, evaluate_evidence, fetch, gather
from milter.auth.dkim import DkimResult
from milter.auth.dmarc import DmarcRecord, DmarcResult, parse_record
from milter.auth.dns import Answers, DnsResolver, NoResolver, Resolver, StaticResolver, TxtAnswer, TxtResolver
from milter.auth.message import ArcPlan, ArcSetRef, AuthPlan, SignatureRef, plan
from milter.auth.results import AuthResults
from milter.auth.spf import SpfResult, trusted_spf_from_headers
from milter.auth.spf_check import check_spf

__all__ = [
    "Answers",
    "ArcPlan",
    "ArcResult",
    "ArcSetRef",
    "AuthPlan",
    "AuthResults",
    "CachingResolver",
    "DkimResult",
    "DmarcRecord",
    "DmarcResult",
    "DnsResolver",
    "Evidence",
    "NoResolver",
    "RecordedResult",
    "Resolver",
    "SignatureRef",
    "SpfClient",
    "SpfResult",
    "StaticResolver",
    "TxtAnswer",
    "TxtResolver",
    "authenticate",
    "check_spf",
    "evaluate",
    "evaluate_evidence",
    "fetch",
    "gather",
    "parse_record",
    "plan",
    "trusted_spf_from_headers",
]
