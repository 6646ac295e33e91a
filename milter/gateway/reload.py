"""Hot model reload: on SIGHUP a gateway loads the configured model again, checks it and swaps it in.

A reload, one at a time per gateway:

1. In a thread, never on the event loop: `Classifier.load(model.path)` (metadata, feature-schema digest,
   sha256 of the ONNX bytes), then a smoke scan of a few sample messages (every probability row finite
   and summing to 1), then the Policy rebuilt around the new model's thresholds and the labels the store
   holds now (learned senders, milter.policy.learned): a store that cannot be read fails the reload
   like a broken model, so the old model and policy stay.
2. Back on the loop: one reference swap in the `ModelSlot` (see `milter.gateway.process`).

Any failure in step 1 leaves the old model serving: `model reload failed, keeping OLD: reason`.

Which model scores a message in flight: the one current when its *batch starts*. Messages still being
prepared or queued in the batcher at the swap get the new model; a batch already running finishes
with the old one (it holds its own reference, so the old ONNX session lives until it returns). The
swap touches no session, queue or future, so no message is dropped, answered twice or refused.

A promotion in progress (the registry replaces current.onnx, then current.json) can be caught half
way: the sha256 check refuses that pair, the old model keeps serving and the next SIGHUP loads the
finished one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from milter.errors import ModelError
from milter.gateway.logfmt import kv
from milter.gateway.metrics import GatewayMetrics
from milter.gateway.process import ModelSlot, ScannerLike, StoreLike
from milter.registry import PROB_TOLERANCE, SAMPLES

if TYPE_CHECKING:
    from milter.config import PolicyConfig
    from milter.policy.table import LearnedSenders
    from milter.scan import Scanner

log = logging.getLogger("milter.gateway.reload")

SMOKE_LIMIT = 6  # enough to exercise the graph; few enough to keep a reload's CPU (GIL) use small
# Only when the checkout's fixtures are not installed beside the package.
_FALLBACK_SAMPLES = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: Lunch on Friday?\r\n\r\nNoon?\r\n",
    b"From: Deals <win@promo.example>\r\nSubject: WIN a FREE prize now!!!\r\nContent-Type: text/html\r\n"
    b"\r\n<a href='http://198.51.100.7/claim'>Click here to claim</a>\r\n",
)

Loader = Callable[[Path, "PolicyConfig"], ScannerLike]


def smoke_messages(limit: int = SMOKE_LIMIT) -> list[bytes]:
    """A spread of the sample fixtures (they are sorted by corpus, so every n-th mixes ham and spam)."""
    files = sorted(SAMPLES.glob("*.eml"))
    step = max(1, len(files) // limit)
    return [f.read_bytes() for f in files[::step][:limit]] or list(_FALLBACK_SAMPLES)


def check_probabilities(name: str, probs: npt.NDArray[np.float32]) -> None:
    """ModelError unless every row is a finite probability distribution (the registry's criterion)."""
    if probs.size == 0 or not np.all(np.isfinite(probs)):
        raise ModelError(f"model {name} gives non-finite probabilities on the smoke messages")
    worst = float(np.max(np.abs(probs.sum(axis=1) - 1.0)))
    if worst > PROB_TOLERANCE or float(probs.min()) < -PROB_TOLERANCE:
        raise ModelError(f"model {name} gives rows that are not probabilities (|sum - 1| up to {worst:.3g})")


def load_checked(
    path: Path, policy: PolicyConfig, store: StoreLike | None = None, explain: bool = True,
    provider: str = "auto",
) -> Scanner:
    """The model at `path`, smoke-tested, with its policy and, given a store, the labels it holds now
    (learned senders); `provider` is [model] provider. Blocking (files, ONNX, parsing, the store): use
    a thread."""
    from milter.classifier import Classifier
    from milter.policy import Policy
    from milter.scan import Scanner, load_explainer, prepare

    classifier = Classifier.load(path, provider=provider)
    vectors = np.stack([prepare(raw).vector for raw in smoke_messages()])
    check_probabilities(classifier.name, classifier.predict(vectors))
    # a model whose explainer is not its graph's trees is refused
    explainer = load_explainer(classifier) if explain else None
    labels = store.sender_labels() if store is not None else ()
    rebuilt = Policy(policy, classifier.metadata.thresholds, labels)
    if store is not None:
        log_learned(rebuilt.learned)
    return Scanner(classifier, rebuilt, explainer)


def log_learned(learned: LearnedSenders) -> None:
    """At start and on every reload: how many senders the admins' labels vouch for now."""
    log.info(kv("learned senders", vouched=learned.vouched_count, labelled_domains=len(learned.counts),
                min_ham_labels=learned.min_ham))


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    old: str
    current: str  # the model serving after the attempt (== old when it failed)
    providers: tuple[str, ...] = ()
    reason: str | None = None
    # the model itself is unfit (ModelError: schema, digest, probabilities); else what failed may pass
    # at the next try (the store's labels unreadable for a moment, a file busy)
    model_fault: bool = False


class ModelReloader:
    """Reloads one gateway's model on request; requests never overlap and never raise."""

    def __init__(
        self,
        slot: ModelSlot,
        model_path: Path,
        policy: PolicyConfig,
        metrics: GatewayMetrics,
        loader: Loader = load_checked,
    ) -> None:
        self._slot = slot
        self._path = model_path
        self._policy = policy
        self._metrics = metrics
        self._loader = loader
        self._lock = asyncio.Lock()
        self._queued = False  # a requested reload waits for the lock: later requests join it
        self._closed = False  # shutting down: a late SIGHUP must neither load a model nor end us
        self._tasks: set[asyncio.Task[ReloadResult]] = set()

    def request(self) -> None:
        """Schedule a reload (the SIGHUP handler; runs on the loop). Several signals while a reload
        waits to start make one reload: it reads the files as they are when it starts anyway."""
        if self._queued or self._closed:
            return
        self._queued = True
        task = asyncio.get_running_loop().create_task(self.reload(), name="model-reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> ReloadResult:
        async with self._lock:
            # Cleared only now: a signal that arrives while a reload runs may announce newer files.
            self._queued = False
            return await self._reload()

    async def _reload(self) -> ReloadResult:
        old = self._slot.name
        try:
            scanner = await asyncio.to_thread(self._loader, self._path, self._policy)
        except Exception as exc:  # whatever went wrong, the old model is still fit to serve
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._metrics.model_reloads.labels("failed").inc()
            log.error("model reload failed, keeping %s: %s", old, reason)
            return ReloadResult(ok=False, old=old, current=old, reason=reason,
                                model_fault=isinstance(exc, ModelError))
        self._slot.swap(scanner)
        new, providers = scanner.classifier.name, tuple(scanner.classifier.providers)
        graph = scanner.classifier.graph
        self._metrics.set_model(new, providers, graph)
        self._metrics.model_reloads.labels("ok").inc()
        log.info("model reloaded: %s -> %s, providers %s, the %s graph", old, new, list(providers), graph)
        return ReloadResult(ok=True, old=old, current=new, providers=providers)

    async def close(self) -> None:
        """Abandon requested reloads (at shutdown); a load already in its thread just finishes unused."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = ["Loader", "ModelReloader", "ReloadResult", "check_probabilities", "load_checked", "log_learned",
           "smoke_messages"]

