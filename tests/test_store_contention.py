"""Several writer processes on one store (issue 16): the gateway's group commits, verdict batches and
history writes lose nothing, write nothing twice and never deadlock. A small run of
bench/store_contention.py (which measures the same at full size): 2 processes x 10 sessions x 50
messages, half of them quarantined, on SQLite and on the real PostgreSQL (`url`)."""

from __future__ import annotations

from collections import Counter

import pytest

from bench import store_contention

pytestmark = pytest.mark.timeout(120)


def test_two_writer_processes_lose_nothing(url: str) -> None:
    sample = store_contention.load_sample(40, workers=1)
    point = store_contention.run_point(url, processes=2, sessions=10, messages=50, sample=sample,
                                       held=0.5, history=True, timeout=90)
    assert point.crashed == []
    assert point.errors == Counter()
    assert point.deadlocks == 0
    assert (point.lost, point.dup, point.phantom, point.raw_missing) == (0, 0, 0, 0)
    assert point.held_stored == point.held_ok == point.held_sent == 50  # every commit acknowledged and there
    assert point.relayed_stored == point.relayed_sent == 50
    assert sum(point.commit_batches) == 50 and sum(point.verdict_batches) == 50
    assert point.history_stored == point.history_expected > 0  # additive upserts: no count lost or doubled
    assert point.clean
