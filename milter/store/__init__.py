"""Verdict / quarantine store: SQLAlchemy 2.0 models, shipped Alembic migrations, the Store API."""

from milter.store.rows import (
    ClaimResult,
    ClaimState,
    HistorySource,
    HistoryStats,
    LabelledExample,
    MessageRow,
    PurgeCounts,
    StoreStats,
    training_arrays,
)
from milter.store.store import Store

__all__ = [
    "ClaimResult",
    "ClaimState",
    "HistorySource",
    "HistoryStats",
    "LabelledExample",
    "MessageRow",
    "PurgeCounts",
    "Store",
    "StoreStats",
    "training_arrays",
]
