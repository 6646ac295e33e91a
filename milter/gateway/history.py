"""The gateway's correspondence history (issue 17): read and learned in memory, kept in the store.

One `HistoryKeeper` per gateway process. Every lookup and every update is a few dictionary operations
on the event loop (`milter.history`, about 60 us a message on the Enron replay); the store is never
on a message's path:

* **Start**: the rows seen within `max_age_days` are read in a thread. Until they are in, and whenever
  they cannot be read, the history is *unknown*: `lookup` answers None, the history rules stay silent
  (mail flows exactly as without them), `milter_history_ready` is 0, `milter_history_unknown` counts
  the messages judged without it, and the failure is logged once per outage. Loading is retried every
  `refresh_seconds`.
* **Learning**: a delivered message that `teaches` (milter.policy: ham, bulk, or tagged only for being
  new; milter.policy.history says which tags) is observed twice: into the history the lookups read,
  and into a *journal* of what this process learned since its last write. Every `flush_seconds` the
  journal is written as additive upserts in one transaction (`Store.history_apply`: counts added,
  first / last seen widened), apart from the verdict rows, so a history write that fails never costs
  a verdict row and the reverse. A failed write keeps the journal for the next one (up to
  `max_entries` rows; past that it is dropped, logged).
* **Several processes and nodes** share the store: each writes deltas, never totals, so nothing one
  writes is overwritten by another, and every `refresh_seconds` each reads the rows changed since its
  last read (`last_seen` from a minute before it, for clock skew) and adopts them, adding back what
  its own journal holds and has not yet written. A correspondent known to one node is known to all
  within that interval.
* **Ageing**: in memory on every observation (milter.history); in the store, rows unseen for
  `max_age_days` are deleted hourly by whichever process gets there (an idempotent DELETE).

Own executor (one thread): a slow history write must not queue behind, or in front of, the quarantine
commits the 250 waits for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from milter.config import HistoryConfig
from milter.gateway.logfmt import kv
from milter.gateway.metrics import GatewayMetrics
from milter.history import (
    CorrespondenceHistory,
    HistoryLimits,
    HistoryLookup,
    HistoryRow,
    facts_from_summary,
    limits_of,
    stored_caps,
)
from milter.types import Envelope

if TYPE_CHECKING:
    from milter.features.summary import MessageSummary
    from milter.scan import ScanResult

log = logging.getLogger("milter.gateway")

REFRESH_SKEW = 60.0  # seconds read again before the last refresh: other nodes' clocks may lag ours
PURGE_EVERY = 3600.0  # seconds between deletions of aged rows from the store
_DAY = 86_400.0


class HistoryStore(Protocol):
    """What the keeper needs of `milter.store.Store`."""

    def history_apply(self, rows: Sequence[HistoryRow]) -> int: ...

    def history_rows(self, since: float | None = None) -> list[HistoryRow]: ...

    def history_purge(self, before: float) -> int: ...

    def history_trim(self, caps: Mapping[str, int]) -> int: ...


def load_history(rows: Iterable[HistoryRow], limits: HistoryLimits, now: float) -> CorrespondenceHistory:
    """A history from store rows (oldest first, as `history_rows` gives them), aged to `now`."""
    history = CorrespondenceHistory(limits)
    for row in rows:
        history.put(row)
    history.expire(now)
    return history


class HistoryKeeper:
    def __init__(
        self,
        config: HistoryConfig,
        store: HistoryStore,
        executor: Executor,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._store = store
        self._executor = executor
        self._metrics = metrics
        self._clock = clock
        self._limits = limits_of(config)
        self._history: CorrespondenceHistory | None = None  # None: unknown
        self._journal = self._new_journal()
        self._refreshed = 0.0  # clock of the last successful read
        self._purged = 0.0
        self._outage = False  # an outage is logged once, and its end once
        self._task: asyncio.Task[None] | None = None

    def _new_journal(self) -> CorrespondenceHistory:
        # Never aged, never capped below what a flush interval can hold: it holds deltas, not a history.
        # Except members per identity: every observation of a name scans its members (milter.history), so
        # while the store is down a common name's thousands of addresses would make each message slower
        # on the loop. The history keeps `max_per_identity` of them, so more deltas there serve nobody.
        n = self._limits.max_pairs
        return CorrespondenceHistory(HistoryLimits(max_age_days=36_500.0, max_pairs=n, max_correspondents=n,
                                                   max_identities=n,
                                                   max_per_identity=self._limits.max_per_identity))

    @property
    def ready(self) -> bool:
        return self._history is not None

    # --- on a message's path (event loop, no I/O) ------------------------------------------------------

    def lookup(
        self, summary: MessageSummary, envelope: Envelope, protected_names: Sequence[str]
    ) -> HistoryLookup | None:
        """What the history knows about this message's sender; None while unknown (counted)."""
        history = self._history
        if history is None:
            self._metrics.history_unknown.inc()
            return None
        try:
            facts = facts_from_summary(summary, envelope.rcpt_tos, envelope.mail_from)
            return HistoryLookup(facts, history.lookup(facts, protected_names))
        except Exception as exc:  # a bug here must cost the history's opinion, never the message
            self._metrics.errors.labels("history").inc()
            log.exception(kv("history_lookup_failed", error=type(exc).__name__))
            return None

    def learn(self, result: ScanResult, envelope: Envelope) -> None:
        """Observe a delivered message that teaches (`ScanResult.teaches`)."""
        if not result.teaches:
            return
        try:
            facts = facts_from_summary(result.summary, envelope.rcpt_tos, envelope.mail_from)
            when = datetime.fromtimestamp(self._clock(), UTC)
            if self._history is not None:
                self._history.observe(facts, when, result.outbound)
            self._journal.observe(facts, when, result.outbound)
        except Exception as exc:
            self._metrics.errors.labels("history").inc()
            log.exception(kv("history_learn_failed", error=type(exc).__name__))

    # --- background ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._metrics.history_ready.set(0)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="history-keeper")

    async def close(self) -> None:
        """Stop, writing what was learned since the last write (at shutdown)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        tried = float("-inf")  # when loading was last tried: retried every refresh_seconds
        while True:
            now = self._clock()
            if self._history is None:
                if now - tried >= self._config.refresh_seconds:
                    tried = now
                    await self.load()
            elif now - self._refreshed >= self._config.refresh_seconds:
                await self.refresh()
            if now - self._purged >= PURGE_EVERY and self._history is not None:
                await self._purge(now)
            await asyncio.sleep(self._config.flush_seconds)
            await self.flush()

    async def load(self) -> bool:
        """Read the whole (unaged) history from the store; False, unknown, when it cannot be read."""
        now = self._clock()
        since = now - self._limits.max_age_days * _DAY
        loop = asyncio.get_running_loop()
        try:
            history = await loop.run_in_executor(self._executor, self._read_all, since, now)
        except Exception as exc:
            self._unavailable("load", exc)
            return False
        history.merge(self._journal)  # learned while loading and not yet written
        self._history = history
        self._refreshed = now
        self._metrics.history_ready.set(1)
        self._metrics.history_entries.set(len(history))
        log.info(kv("history_loaded", entries=len(history), recovered=self._outage))
        self._outage = False
        return True

    def _read_all(self, since: float, now: float) -> CorrespondenceHistory:
        return load_history(self._store.history_rows(since), self._limits, now)

    async def refresh(self) -> bool:
        """Adopt what other processes and nodes wrote since the last read (ours included)."""
        history = self._history
        if history is None:
            return await self.load()
        await self.flush()
        now = self._clock()
        loop = asyncio.get_running_loop()
        try:
            rows = await loop.run_in_executor(
                self._executor, self._store.history_rows, self._refreshed - REFRESH_SKEW
            )
        except Exception as exc:
            self._unavailable("refresh", exc)  # the history in memory stays: known, if a little stale
            return False
        changed = set()
        for row in rows:
            history.put(row)  # the store's totals include everything we wrote
            changed.add((row.kind, row.key, row.member))
        for row in self._journal.rows():  # learned since the flush above: not in the store yet
            if (row.kind, row.key, row.member) in changed:
                history.put(row, add=True)
        history.expire(now)
        self._refreshed = now
        self._metrics.history_entries.set(len(history))
        self._recovered()
        return True

    async def flush(self) -> int:
        """Write the journal (one transaction); how many rows. A failure keeps it for the next try."""
        journal = self._journal
        rows = list(journal.rows())
        if not rows:
            return 0
        self._journal = self._new_journal()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._store.history_apply, rows)
        except Exception as exc:
            self._unavailable("write", exc)
            kept = len(rows) + len(self._journal)
            if kept <= self._limits.max_pairs:
                journal.merge(self._journal)
                self._journal = journal
            else:
                self._metrics.errors.labels("history_dropped").inc(len(rows))
                log.error(kv("history_journal_dropped", rows=len(rows), limit=self._limits.max_pairs))
            return 0
        self._recovered()
        return len(rows)

    async def _purge(self, now: float) -> None:
        self._purged = now
        before = now - self._limits.max_age_days * _DAY
        try:
            gone = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._store.history_purge, before
            )
        except Exception as exc:
            self._unavailable("purge", exc)
            return
        if gone:
            log.info(kv("history_purged", rows=gone))
        try:
            trimmed = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._store.history_trim, stored_caps(self._limits)
            )
        except Exception as exc:
            self._unavailable("trim", exc)
            return
        if trimmed:
            log.info(kv("history_trimmed", rows=trimmed))

    def _unavailable(self, what: str, exc: Exception) -> None:
        self._metrics.errors.labels("history").inc()
        if not self._outage:
            log.error(kv("history_unavailable", during=what, error=type(exc).__name__, detail=str(exc)[:200],
                         history="unknown" if self._history is None else "kept in memory"))
        self._outage = True

    def _recovered(self) -> None:
        if self._outage:
            log.info(kv("history_available"))
        self._outage = False
