"""A TTL cache with request coalescing in front of any TxtResolver (or Resolver, for A/AAAA/MX too).

Mail arrives in bursts from the same senders: the same DKIM key and DMARC record names are asked for
over and over, often by several messages at once. The cache answers repeats without a packet and
merges concurrent lookups of one name into a single query. Temporary failures are cached only
briefly: a retry a moment later may well succeed, but asking again for every message of a burst
while an authoritative server is down would cost each of them the whole deadline, so they are kept
for `temperror_ttl` (30 s by default). "None" answers are cached for `negative_ttl`
(dnspython does not hand us the SOA minimum on NXDOMAIN, so one configured value is used), and found
answers for their TTL, capped at `max_ttl`. The size is bounded; when full, the oldest entry goes, and
an answer over MAX_CACHED_CHARS is not kept at all.
Every `SWEEP_EVERY` stores (more for a bigger cache) the expired entries are dropped too,
so that a cache filled by a burst of new sender domains gives its memory back once their answers
expire, instead of keeping them until the same names are asked again (docs/soak.md: the workers'
slow RSS rise was this cache filling).

Entries and in-flight lookups are keyed by (name, type), so a name's TXT and A answers are kept, expire
and are coalesced apart. `txt(name)` is `query(name, "TXT")` and asks the inner resolver's `txt`, so
any TxtResolver still works as the inner one; other types need an inner `Resolver` (one without
`query` answers them temperror).

All state lives in the instance; the cache belongs to one event loop (the gateway's).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

from milter.auth.dns import TxtAnswer, TxtResolver, TypedLookups, normalise_name

_Key = tuple[str, str]  # (normalised name, record type)

#: Stores between sweeps of expired entries (at least; a bigger cache sweeps every max_entries / 10
#: stores). A sweep is one pass over the entries on the event loop, 1.4 ms for 10,000 and 17 ms for
#: 100,000 (config.MAX_DNS_CACHE_ENTRIES); so about ten entry checks per store.
SWEEP_EVERY = 1000
#: Characters of records an answer may hold and be cached: the cache is bounded in entries, and the
#: sender chooses the names (about 40 lookups a message), so big answers would bound nothing: 2,000
#: entries of 59 KiB each held 116 MiB. No record the checks need comes near it (an SPF record, a
#: 4096-bit DKIM key: under 1 KiB); a bigger answer is still used for its message, just not kept.
MAX_CACHED_CHARS = 4096


class CachingResolver(TypedLookups):
    def __init__(
        self,
        inner: TxtResolver,
        max_entries: int = 10_000,
        negative_ttl: float = 300.0,
        max_ttl: float = 3600.0,
        temperror_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._max_entries = max_entries
        self._negative_ttl = negative_ttl
        self._max_ttl = max_ttl
        self._temperror_ttl = temperror_ttl
        self._clock = clock
        self._entries: OrderedDict[_Key, tuple[float, TxtAnswer]] = OrderedDict()
        self._inflight: dict[_Key, asyncio.Task[TxtAnswer]] = {}
        self._stores = 0
        self._sweep_every = max(SWEEP_EVERY, max_entries // 10)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def max_entries(self) -> int:
        return self._max_entries

    async def _query(self, name: str, kind: str) -> TxtAnswer:
        key = (normalise_name(name), kind)
        cached = self._cached(key)
        if cached is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._lookup(key))
            self._inflight[key] = task
            task.add_done_callback(partial(self._settle, key))
        # shield: one waiter giving up (its message's deadline passed) must not cancel the query the
        # other waiters share; the answer still lands in the cache when it arrives.
        return await asyncio.shield(task)

    async def _lookup(self, key: _Key) -> TxtAnswer:
        name, kind = key
        try:
            if kind == "TXT":
                answer: Any = await self._inner.txt(name)
            else:
                query = getattr(self._inner, "query", None)
                if query is None:
                    return TxtAnswer.temperror(f"resolver cannot look up {kind} records")
                answer = await query(name, kind)
        except Exception as e:  # a resolver breaking its contract still yields an answer
            return TxtAnswer.temperror(f"resolver error: {type(e).__name__}")
        return answer if isinstance(answer, TxtAnswer) else TxtAnswer.temperror("resolver error")

    def _settle(self, key: _Key, task: asyncio.Task[TxtAnswer]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and task.exception() is None:
            self._store(key, task.result())

    def _cached(self, key: _Key) -> TxtAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, answer = entry
        if expires > self._clock():
            return answer
        del self._entries[key]
        return None

    def _ttl(self, answer: TxtAnswer) -> float:
        if answer.status == "found":
            return min(answer.ttl, self._max_ttl)
        if answer.status == "none":
            return min(answer.ttl, self._negative_ttl) if answer.ttl > 0 else self._negative_ttl
        return self._temperror_ttl

    def _store(self, key: _Key, answer: TxtAnswer) -> None:
        ttl = self._ttl(answer)
        if ttl <= 0 or self._max_entries <= 0 or sum(map(len, answer.records)) > MAX_CACHED_CHARS:
            return
        self._entries.pop(key, None)
        self._stores += 1
        if self._stores % self._sweep_every == 0:
            self._sweep()
        while len(self._entries) >= self._max_entries:
            self._entries.popitem(last=False)
        self._entries[key] = (self._clock() + ttl, answer)

    def _sweep(self) -> None:
        now = self._clock()
        for stale in [k for k, (expires, _) in self._entries.items() if expires <= now]:
            del self._entries[stale]
