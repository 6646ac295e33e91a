"""Releasing quarantined messages: deliver the stored bytes downstream with the stored envelope.

Exactly once, even when admins on several nodes release the same message at the same moment: a release
first claims the message in the store (milter/store/release.py says how, and what an abandoned claim
costs), and only the claimer delivers. After the downstream's 250 it marks the message released; when
the delivery fails it drops its claim, so the message stays held and can simply be retried. The loser of
a race gets an outcome naming the winner ("being released by another process since ...", or "already
released at ..."), never a second delivery.

The remaining risks are reported, never silent: delivered but the store write failed ("delivered ...
but not recorded"), delivered but the claim was taken over meanwhile, and a release that took over a
dead process's claim (that process may have delivered before it died).

The quarantine keeps the envelope, not the client's MAIL parameters, so a release works out the ones
the message needs (`relay.needed_options`): SMTPUTF8 for a non-ASCII address, BODY=8BITMIME for 8-bit bytes.
Without them the relay refused every non-ASCII recipient itself and the message counted as released.
Recipients the downstream (or the relay, where it lacks SMTPUTF8) still refuses are named in the
outcome (`refused`) and fail the command: the others have the message, so it is marked released, and
the admin has to get it to those by other means.

A release labelled ham also teaches the correspondence history at once (`_teach`): the sender was
wanted after all, and every gateway sharing the store knows it at its next refresh (a minute), instead
of at the next `milter history rebuild`. Best effort: the label is the record, and a rebuild learns
from it anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from milter.errors import DeliveryError, StoreError
from milter.gateway.relay import Delivered, Downstream, needed_options
from milter.history import CorrespondenceHistory, stored_facts
from milter.store import ClaimResult, ClaimState, Store
from milter.store import release as release_sql

#: Seconds after which a release's claim counts as abandoned (its process died). Every process sharing
#: the store must use the same value; a live release gives up delivering at half of it.
CLAIM_TIMEOUT_S = release_sql.STALE_AFTER_S


@dataclass(frozen=True)
class ReleaseOutcome:
    id: int
    released: bool
    labelled: bool
    detail: str  # the downstream reply, or why the message was not released
    # recipients that did not get a released message, each "address (code text)": the downstream
    # refused them (5xx) or they need SMTPUTF8, which it does not offer
    refused: tuple[str, ...] = ()

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "released": self.released, "labelled": self.labelled, "detail": self.detail,
                "refused": list(self.refused)}



@dataclass(frozen=True)
class _Held:
    id: int
    raw: bytes
    mail_from: str
    rcpt_tos: tuple[str, ...]


@dataclass(frozen=True)
class _Release:
    """One release run: its claim token and timeout, and what to do after a 250."""

    store: Store
    token: str
    claim_timeout: float
    label: bool


def _refused(claim: ClaimResult) -> str:
    """Why a message could not be claimed, in the words the release command has always used."""
    since = claim.since.isoformat() if claim.since is not None else "?"
    match claim.state:
        case ClaimState.BUSY:
            return f"being released by another process since {since} ({claim.holder})"
        case ClaimState.RELEASED:
            return f"already released at {since}"
        case ClaimState.DELETED:
            return "deleted from the quarantine"
        case ClaimState.NOT_QUARANTINED:
            return "not quarantined"
        case _:
            return "no message with this id"


def _load(store: Store, id: int) -> _Held | str:
    """The claimed message to deliver, or why it cannot be."""
    row = store.get(id)
    raw = store.get_raw(id)
    if row is None or raw is None:
        return "quarantined bytes are gone"
    if not row.rcpt_tos:
        return "no envelope recipients stored"
    return _Held(id, raw, row.mail_from or "", row.rcpt_tos)


def _abandon(run: _Release, id: int, why: str) -> ReleaseOutcome:
    """Not delivered: drop the claim so that the message can be released again."""
    try:
        run.store.abandon_release(id, run.token)
    except StoreError as exc:
        why = f"{why}; the claim could not be dropped ({exc}): release it again in {run.claim_timeout:.0f} s"
    return ReleaseOutcome(id, False, False, why)


def _finish(run: _Release, held: _Held, done: Delivered, claim: ClaimResult) -> ReleaseOutcome:
    """Delivered (to every recipient but `done.refused`): mark released (only if our claim still
    holds) and label."""
    reply = done.reply
    refused = tuple(f"{r.recipient} ({r.code} {r.text.splitlines()[0] if r.text else ''})".rstrip()
                    for r in done.refused)
    if claim.took_over:
        reply = (f"{reply}; took over the abandoned release of {claim.holder} (claimed "
                 f"{claim.since.isoformat() if claim.since else '?'}): if that one reached the downstream "
                 "before it died, this was a second delivery")
    try:
        if not run.store.finish_release(held.id, run.token):
            return ReleaseOutcome(held.id, False, False,
                                  f"delivered ({reply}) but this release's claim was taken over or the "
                                  "message purged meanwhile: it may be delivered twice")
        labelled = run.label and run.store.set_label(held.id, "ham", "release") == 1
        if labelled:
            _teach(run.store, held.id)
    except StoreError as exc:
        return ReleaseOutcome(held.id, False, False,
                              f"delivered ({reply}) but not recorded: {exc}; the message stays claimed, "
                              f"and a release after {run.claim_timeout:.0f} s would deliver it again")
    return ReleaseOutcome(held.id, True, labelled, reply, refused)


def _teach(store: Store, id: int) -> bool:
    """Add a message released as ham to the correspondence history (one transaction of deltas, as a
    gateway writes them), dated now: gateways adopt rows changed since their last read, by last seen.
    False when it could not be done (the rebuild will learn it from the label)."""
    try:
        found = store.history_sources(id - 1, 1)
        if not found or found[0].id != id:
            return False
        history = CorrespondenceHistory()
        src = found[0]
        facts = stored_facts(src.from_addr, src.from_display, src.rcpt_tos, src.reply_to)
        history.observe(facts, datetime.now(UTC), outbound=False)
        store.history_apply(list(history.rows()))
    except StoreError:
        return False
    return True


async def _release_one(run: _Release, id: int, downstream: Downstream) -> ReleaseOutcome:
    try:
        claim = await asyncio.to_thread(run.store.claim_release, id, run.token, run.claim_timeout)
    except StoreError as exc:
        return ReleaseOutcome(id, False, False, str(exc))
    if not claim.claimed:
        return ReleaseOutcome(id, False, False, _refused(claim))
    try:
        held = await asyncio.to_thread(_load, run.store, id)
    except StoreError as exc:
        return await asyncio.to_thread(_abandon, run, id, str(exc))
    if isinstance(held, str):
        return await asyncio.to_thread(_abandon, run, id, held)
    try:
        # Bounded as a whole (the downstream's timeout is per step), well inside the claim's lifetime:
        # a live release must never have its claim taken over.
        async with asyncio.timeout(run.claim_timeout / 2):
            options = needed_options(held.raw, held.mail_from, held.rcpt_tos)
            done = await downstream.deliver(held.raw, held.mail_from, held.rcpt_tos, options)
    except DeliveryError as exc:
        return await asyncio.to_thread(_abandon, run, id, str(exc))
    except TimeoutError:
        why = f"delivery took over {run.claim_timeout / 2:.0f} s, given up (the downstream may have it)"
        return await asyncio.to_thread(_abandon, run, id, why)
    return await asyncio.to_thread(_finish, run, held, done, claim)


async def _deliver_all(run: _Release, ids: Sequence[int], downstream: Downstream) -> list[ReleaseOutcome]:
    # one at a time: a review batch is small and the order of lines should be the input's
    return [await _release_one(run, id, downstream) for id in ids]


def release(
    store: Store,
    ids: Sequence[int],
    host: str,
    port: int,
    timeout: float,
    hostname: str,
    label: bool,
    claim_timeout: float = CLAIM_TIMEOUT_S,
) -> list[ReleaseOutcome]:
    """Release each id in turn; one outcome per id, in the given order."""
    run = _Release(store, release_sql.new_token(), claim_timeout, label)

    async def go() -> list[ReleaseOutcome]:
        downstream = Downstream(host, port, timeout, hostname, size=1)
        try:
            return await _deliver_all(run, ids, downstream)
        finally:
            await downstream.close()

    return asyncio.run(go())
