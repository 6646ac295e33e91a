"""Following the fleet's model registry ([model] registry = "store"): adopt the current model, check in.

Several gateway nodes share one store; `milter model promote` writes a model there and makes it the
fleet's current one (milter.store.registry). No operator visits each node: every worker process polls
the store every `registry_poll_seconds` and, when the fleet's (name, sha256) is not what it serves:

1. fetches the files and installs them in its local model directory with milter.registry's `adopt`
   (the promotion's validation and swap, under the directory's lock: of a node's workers the first
   installs, the others find it installed). A restart then loads that model even with the store down.
2. runs the existing reload path (milter.gateway.reload: smoke scan, swap between batches, no message
   lost).

A model that fails either step because of the model itself (ModelError: its schema, digest,
thresholds or probabilities) is not retried for the same digest (a bad model would otherwise cost a
validation every poll): the worker keeps serving the old one, logs once, counts it in
`milter_registry_adoptions{outcome="failed"}` and reports the error at every check-in until the fleet
moves on (a rollback or a new promotion), or a SIGHUP loads it after all. Anything else (a file it could
not write, the store's labels unreadable for a moment during the reload) is tried again at the next
poll (`outcome="deferred"`): before, one such blip kept the fleet's model off that worker for good,
while the model was already installed on disk.

Every poll checks in (node, model served, its sha256, the error), which `milter model status` lists.
A store that cannot be read is logged once per outage and counted in `milter_errors{kind="registry"}`;
the model in memory keeps serving, and the next poll tries again.

Blocking work (the store, files, ONNX) runs in the worker's registry executor, never on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from milter.errors import MilterError, ModelError
from milter.gateway.background import stop
from milter.gateway.logfmt import kv
from milter.gateway.metrics import GatewayMetrics
from milter.gateway.process import ModelSlot
from milter.gateway.reload import ModelReloader, smoke_messages
from milter.registry import FleetModel, adopt
from milter.store.registry import CurrentModel, ModelFiles, NodeStatus

log = logging.getLogger("milter.gateway.fleet")

ERROR_LENGTH = 500  # of a reported error: enough to say why, short enough for a status table


class FleetStore(Protocol):
    def model_current(self) -> CurrentModel | None: ...

    def model_fetch(self, name: str) -> ModelFiles | None: ...

    def node_check_in(self, status: NodeStatus) -> None: ...


@dataclass(frozen=True)
class FleetSettings:
    node: str  # [server] node_name, or the host name
    directory: Path  # the local model directory (the folder of [model] path)
    poll_seconds: float


def node_name(configured: str) -> str:
    return configured or socket.gethostname()


def served_digest(slot: ModelSlot) -> str:
    """The ONNX sha256 of the model in memory ("" when its scanner does not say: a test double)."""
    meta: Any = getattr(slot.scanner.classifier, "metadata", None)
    onnx = getattr(meta, "raw", {}).get("onnx") if meta is not None else None
    digest = onnx.get("sha256") if isinstance(onnx, dict) else None
    return digest if isinstance(digest, str) else ""


def fleet_model(files: ModelFiles) -> FleetModel:
    """The store's row as milter.registry installs it (graph, metadata, explainer, tensor graph)."""
    return FleetModel(files.name, files.onnx_sha256, files.onnx, files.meta_json, files.lgb_text,
                      files.tensor_onnx)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class FleetFollower:
    """One per gateway process: polls the registry, adopts the fleet's model, checks in."""

    def __init__(
        self,
        settings: FleetSettings,
        store: FleetStore,
        slot: ModelSlot,
        reloader: ModelReloader,
        metrics: GatewayMetrics,
        executor: Executor,
    ) -> None:
        self._settings = settings
        self._store = store
        self._slot = slot
        self._reloader = reloader
        self._metrics = metrics
        self._executor = executor
        self._failed: tuple[str, str] | None = None  # (digest, why) of the fleet model that failed here
        self._deferred_why: tuple[str, str] | None = None  # (digest, why) of the last deferred try
        self._outage = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="fleet-follower")

    async def close(self) -> None:
        await stop(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # a bug here must never end the polling, let alone the gateway
                self._metrics.errors.labels("registry").inc()
                log.exception(kv("registry_poll_failed"))
            await asyncio.sleep(self._settings.poll_seconds)

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def poll(self) -> None:
        """One round: read the fleet's current model, adopt it if it is new here, check in."""
        try:
            fleet: CurrentModel | None = await self._call(self._store.model_current)
        except MilterError as exc:
            self._unavailable("read", exc)
            return
        if fleet is not None and self._wants(fleet):
            await self._adopt(fleet)
        await self._check_in(fleet)

    def _wants(self, fleet: CurrentModel) -> bool:
        digest = fleet.onnx_sha256
        return digest != served_digest(self._slot) and (self._failed is None or self._failed[0] != digest)

    async def _adopt(self, fleet: CurrentModel) -> None:
        try:
            files: ModelFiles | None = await self._call(self._store.model_fetch, fleet.name)
        except MilterError as exc:
            self._unavailable("fetch", exc)
            return
        if files is None or files.onnx_sha256 != fleet.onnx_sha256:
            return  # changed between the two reads: the next poll sees the newer one
        model = fleet_model(files)
        try:
            # the promotion validated it on every sample; here a few are enough (the GIL is shared)
            await self._call(adopt, self._settings.directory, model, smoke_messages())
        except ModelError as exc:
            self._refused(fleet, _reason(exc))
            return
        except OSError as exc:
            self._deferred(fleet, _reason(exc))
            return
        result = await self._reloader.reload()
        if not result.ok:
            why = result.reason or "reload failed"
            if result.model_fault:
                self._refused(fleet, why)
            else:
                self._deferred(fleet, why)
            return
        self._failed = self._deferred_why = None
        self._metrics.registry_adoptions.labels("ok").inc()
        log.info(kv("fleet_model_adopted", model=fleet.name, previous=result.old))

    def _refused(self, fleet: CurrentModel, why: str) -> None:
        self._failed = (fleet.onnx_sha256, why[:ERROR_LENGTH])
        self._metrics.registry_adoptions.labels("failed").inc()
        log.error(kv("fleet_model_refused", model=fleet.name, serving=self._slot.name, error=why[:200]))

    def _deferred(self, fleet: CurrentModel, why: str) -> None:
        """Not adopted this time for a reason that may pass: tried again at the next poll, and reported
        at every check-in meanwhile (a full disk or a read-only folder would otherwise pass unseen)."""
        self._deferred_why = (fleet.onnx_sha256, why[:ERROR_LENGTH])
        self._metrics.registry_adoptions.labels("deferred").inc()
        log.warning(kv("fleet_model_deferred", model=fleet.name, serving=self._slot.name, error=why[:200]))

    async def _check_in(self, fleet: CurrentModel | None) -> None:
        error = None
        if fleet is not None and self._failed is not None and self._failed[0] == fleet.onnx_sha256:
            error = f"cannot serve {fleet.name}: {self._failed[1]}"
        elif fleet is not None and (deferred := self._deferred_why) is not None and (
            deferred[0] == fleet.onnx_sha256 != served_digest(self._slot)
        ):
            error = f"not serving {fleet.name} yet (tried again at every poll): {deferred[1]}"
        status = NodeStatus(
            node=self._settings.node, model=self._slot.name, onnx_sha256=served_digest(self._slot),
            last_checkin=datetime.now(UTC), last_error=error, pid=os.getpid(), host=socket.gethostname(),
        )
        try:
            await self._call(self._store.node_check_in, status)
        except MilterError as exc:
            self._unavailable("check in", exc)
            return
        if self._outage:
            self._outage = False
            log.info(kv("registry_recovered"))

    def _unavailable(self, what: str, exc: MilterError) -> None:
        self._metrics.errors.labels("registry").inc()
        if not self._outage:
            self._outage = True
            log.error(kv("registry_unavailable", during=what, serving=self._slot.name, error=str(exc)[:200]))


def adopt_at_start(store: FleetStore, directory: Path) -> None:
    """Before a node serves: install the fleet's current model if the local one is another (blocking).

    Best effort: a store that cannot be read, or a model unfit here, is logged and the local model
    serves (the first poll tries again)."""
    from milter.registry import current_digest

    try:
        fleet = store.model_current()
        if fleet is None or fleet.onnx_sha256 == current_digest(directory):
            return
        files = store.model_fetch(fleet.name)
        if files is None:
            return
        model = fleet_model(files)
        adopt(directory, model, smoke_messages())
        log.info(kv("fleet_model_adopted_at_start", model=fleet.name))
    except (MilterError, OSError) as exc:
        log.error(kv("fleet_model_not_adopted_at_start", error=_reason(exc)[:200],
                     serving="the local model"))


__all__ = ["FleetFollower", "FleetSettings", "FleetStore", "adopt_at_start", "node_name", "served_digest"]
