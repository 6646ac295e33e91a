"""DKIM + DMARC (+ ARC) for one message in three phases: plan (pure), fetch (all the I/O), evaluate (pure).

Why three phases: the gateway runs on one event loop and pushes CPU work (RSA, canonicalising big
bodies) to a process pool. Mixing DNS into verification, as dkimpy's own API does, would either block
the loop or ship sockets into workers. So the header block says which TXT names are needed (`plan`),
they are all fetched concurrently under one deadline on the loop (`fetch`), and the verdict is
computed from the message plus the frozen, picklable answers in a worker (`evaluate`). Neither fetch
nor evaluate raises for any input; every failure becomes a result (temperror, permerror, neutral).
ARC chains ride along: their key names are planned and fetched with the DKIM keys (same deadline, no
extra round trip) and verified in the same worker call (milter.auth.arc).
SPF needs an iterative walk and cannot be planned: `gather` runs `check_spf` beside the fetch, under the
same deadline, when the caller knows the client; otherwise a trusted upstream result may be used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass
from functools import partial

from milter.auth.arc import ArcResult, verify_arc
from milter.auth.dkim import DkimResult, verify_signatures
from milter.auth.dmarc import DmarcResult, evaluate_dmarc
from milter.auth.dns import Answers, Resolver, TxtResolver, deadline_seconds, lookup_all
from milter.auth.message import AuthPlan, plan
from milter.auth.results import AuthResults
from milter.auth.spf import SpfResult, trusted_spf_from_headers
from milter.auth.spf_check import check_spf

__all__ = [
    "Evidence", "SpfClient", "authenticate", "evaluate", "evaluate_evidence", "fetch", "gather", "plan",
]


@dataclass(frozen=True)
class SpfClient:
    """What SPF is checked for: the connecting client's address, the envelope sender, HELO."""

    ip: str
    mail_from: str | None
    helo: str | None


@dataclass(frozen=True)
class Evidence:
    """What the I/O phase found for one message, picklable, for `evaluate_evidence` in a worker."""

    plan: AuthPlan
    answers: Answers
    trusted_authserv_ids: tuple[str, ...] = ()
    spf: SpfResult | None = None  # our own check, when the client was known
    trusted_arc_sealers: tuple[str, ...] = ()  # auth.trusted_arc_sealers, for ArcResult.trusted


# ASYNC109: the timeout is part of the contract on purpose: it is one deadline over the whole fan-out,
# and expiry yields temperror answers instead of raising, which a caller's asyncio.timeout cannot do.
async def fetch(plan: AuthPlan, resolver: TxtResolver, timeout: float) -> Answers:  # noqa: ASYNC109
    """Phase 2: look up every name of `plan` concurrently, all within `timeout` seconds.

    Every name gets an answer; lookups still running at the deadline are cancelled and answer
    temperror, as do lookups that raise or return something that is not a TxtAnswer. Cancelling
    fetch itself propagates (after cancelling its lookups), as asyncio code must.
    """
    names = plan.names
    if not names:
        return Answers()
    return Answers.of(await lookup_all({name: partial(resolver.txt, name) for name in names}, timeout))


def evaluate(
    raw: bytes,
    plan: AuthPlan,
    answers: Answers,
    trusted_spf: SpfResult | None = None,
    trusted_arc_sealers: Collection[str] = (),
) -> AuthResults:
    """Phase 3 (pure, CPU only): verify the signatures and ARC chain of `plan` and evaluate DMARC
    from `answers`."""
    dkim = _dkim(raw, plan, answers)
    try:
        dmarc = evaluate_dmarc(
            plan.from_domain, plan.org_domain, dkim, trusted_spf, answers, plan.from_problem
        )
    except Exception as e:  # a bug here must not turn into a rejection: report "could not tell"
        dmarc = DmarcResult("temperror", plan.from_domain, reason=f"internal error: {type(e).__name__}")
    return AuthResults(dkim, dmarc, trusted_spf, _arc(raw, plan, answers, trusted_arc_sealers))


def _dkim(raw: bytes, plan: AuthPlan, answers: Answers) -> tuple[DkimResult, ...]:
    try:
        return verify_signatures(raw, plan.signatures, answers)
    except Exception as e:
        why = f"internal error: {type(e).__name__}"
        return tuple(DkimResult(s.domain, s.selector, "neutral", why) for s in plan.signatures)


def _arc(raw: bytes, plan: AuthPlan, answers: Answers, trusted: Collection[str]) -> ArcResult:
    try:
        return verify_arc(raw, plan.arc, answers, trusted)
    except Exception as e:  # verify_arc does not raise; should it, the chain is simply not believed
        return ArcResult("fail", reason=f"internal error: {type(e).__name__}")


async def gather(
    raw: bytes,
    resolver: Resolver,
    timeout: float,  # noqa: ASYNC109 (as for fetch)
    trusted_authserv_ids: Collection[str] = (),
    client: SpfClient | None = None,
    trusted_arc_sealers: Collection[str] = (),
) -> Evidence:
    """Phases 1 and 2 (on the event loop): read the header block, look everything up (DKIM and ARC
    keys, DMARC records); with `client`, check SPF meanwhile, under the same deadline."""
    started = asyncio.get_running_loop().time()
    the_plan = plan(raw)
    spf_task = None
    if client is not None:
        spf_task = asyncio.ensure_future(check_spf(client.ip, client.mail_from, client.helo, resolver))
    answers = await fetch(the_plan, resolver, timeout)
    spf = None
    if spf_task is not None:
        left = deadline_seconds(timeout) - (asyncio.get_running_loop().time() - started)
        spf = await _spf_within(spf_task, left)
    return Evidence(the_plan, answers, tuple(trusted_authserv_ids), spf, tuple(trusted_arc_sealers))


async def _spf_within(task: asyncio.Future[SpfResult], seconds: float) -> SpfResult:
    try:
        return await asyncio.wait_for(task, max(0.0, seconds))
    except TimeoutError:  # wait_for cancelled the walk
        return SpfResult("temperror", "", "SPF check past the deadline")
    except Exception as e:  # check_spf does not raise; should it, the message goes on without SPF
        return SpfResult("temperror", "", f"internal error: {type(e).__name__}")


def evaluate_evidence(raw: bytes, evidence: Evidence) -> AuthResults:
    """Phase 3 for gathered evidence (in a worker): our SPF result, else a trusted upstream's, then
    `evaluate`."""
    spf = evidence.spf or trusted_spf_from_headers(raw, evidence.trusted_authserv_ids)
    return evaluate(raw, evidence.plan, evidence.answers, spf, evidence.trusted_arc_sealers)


async def authenticate(
    raw: bytes,
    resolver: Resolver,
    timeout: float = 2.0,  # noqa: ASYNC109 (as for fetch)
    trusted_authserv_ids: Collection[str] = (),
    trusted_arc_sealers: Collection[str] = (),
) -> AuthResults:
    """plan + fetch + evaluate in one call (tests); the gateway runs evaluate in a worker."""
    evidence = await gather(
        raw, resolver, timeout, trusted_authserv_ids, trusted_arc_sealers=trusted_arc_sealers
    )
    return evaluate_evidence(raw, evidence)
