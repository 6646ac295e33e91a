"""Releasing quarantined messages: deliver the stored bytes downstream with the stored envelope.

Order matters for a reviewer's trust: a message is marked released only after the downstream said 250,
so a failed delivery leaves it held and can simply be retried. The reverse risk (delivered, then the
store write fails) is reported as a failure naming it, so nobody releases it twice unknowingly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from milter.errors import DeliveryError, StoreError
from milter.gateway.relay import Downstream
from milter.store import Store


@dataclass(frozen=True)
class ReleaseOutcome:
    id: int
    released: bool
    labelled: bool
    detail: str  # the downstream reply, or why the message was not released

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "released": self.released, "labelled": self.labelled, "detail": self.detail}


@dataclass(frozen=True)
class _Held:
    id: int
    raw: bytes
    mail_from: str
    rcpt_tos: tuple[str, ...]


def _check(store: Store, id: int) -> _Held | str:
    """The message to deliver, or why it cannot be released."""
    row = store.get(id)
    if row is None:
        return "no message with this id"
    if not row.quarantined:
        return "not quarantined"
    if row.deleted_at is not None:
        return "deleted from the quarantine"
    if row.released_at is not None:
        return f"already released at {row.released_at.isoformat()}"
    raw = store.get_raw(id)
    if raw is None:
        return "quarantined bytes are gone"
    if not row.rcpt_tos:
        return "no envelope recipients stored"
    return _Held(id, raw, row.mail_from or "", row.rcpt_tos)


def _finish(store: Store, held: _Held, reply: str, label: bool) -> ReleaseOutcome:
    try:
        if not store.mark_released(held.id):
            return ReleaseOutcome(held.id, False, False,
                                  f"delivered ({reply}) but released or deleted meanwhile by someone else")
        labelled = label and store.set_label(held.id, "ham", "release") == 1
    except StoreError as exc:
        return ReleaseOutcome(held.id, False, False, f"delivered ({reply}) but not recorded: {exc}")
    return ReleaseOutcome(held.id, True, labelled, reply)


async def _deliver_all(
    store: Store, ids: Sequence[int], downstream: Downstream, label: bool
) -> list[ReleaseOutcome]:
    outcomes: list[ReleaseOutcome] = []
    for id in ids:  # one at a time: a review batch is small and the order of lines should be the input's
        try:
            held = await asyncio.to_thread(_check, store, id)
        except StoreError as exc:
            outcomes.append(ReleaseOutcome(id, False, False, str(exc)))
            continue
        if isinstance(held, str):
            outcomes.append(ReleaseOutcome(id, False, False, held))
            continue
        try:
            done = await downstream.deliver(held.raw, held.mail_from, held.rcpt_tos)
        except DeliveryError as exc:
            outcomes.append(ReleaseOutcome(id, False, False, str(exc)))
            continue
        outcomes.append(await asyncio.to_thread(_finish, store, held, done.reply, label))
    return outcomes


def release(
    store: Store, ids: Sequence[int], host: str, port: int, timeout: float, hostname: str, label: bool
) -> list[ReleaseOutcome]:
    """Release each id in turn; one outcome per id, in the given order."""

    async def run() -> list[ReleaseOutcome]:
        downstream = Downstream(host, port, timeout, hostname, size=1)
        try:
            return await _deliver_all(store, ids, downstream, label)
        finally:
            await downstream.close()

    return asyncio.run(run())
