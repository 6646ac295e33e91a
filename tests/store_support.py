"""Helpers for the store tests: scan results to record, and a store URL per backend.

PostgreSQL isolation: each test gets a fresh schema (`t_<random>`) in database `test`, selected
through `options=-csearch_path=...` in the URL, so the tables and Alembic's version table live
there; the schema is dropped afterwards. A server that cannot be reached skips the test outside CI
and fails it under CI=true.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from milter.features.summary import MessageSummary
from milter.types import Action, Scores, Verdict

PG_PORT = int(os.environ.get("MILTER_TEST_PG_PORT", "5432"))  # override to test the CI=true path
PG_ADMIN = f"host=127.0.0.1 port={PG_PORT} user=postgres dbname=test connect_timeout=5"
PG_URL = f"postgresql+psycopg://postgres@127.0.0.1:{PG_PORT}/test"
BACKENDS = [pytest.param("sqlite", id="sqlite"),
            pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres)]

try:  # milter.scan needs the classifier / policy modules, which may not exist yet
    from milter.scan import ScanResult as _ScanResult
except ImportError:  # pragma: no cover - only while the tree is being built

    @dataclass(frozen=True)
    class _ScanResult:  # type: ignore[no-redef]
        verdict: Verdict
        action: Action
        scores: Scores
        reasons: tuple[str, ...]
        model: str
        summary: MessageSummary
        vector: npt.NDArray[np.float32]
        subject_prefix: str | None = None
        explanation: Any = None
        teaches: bool = False
        outbound: bool = False


def summary(message_id: str | None = "<m1@example.com>", subject: str | None = "Hello",
            from_addr: str | None = "alice@example.com", from_display: str | None = "Alice",
            reply_to_addr: str | None = None) -> MessageSummary:
    return MessageSummary(
        message_id=message_id, subject=subject, from_addr=from_addr, from_display=from_display,
        from_domain=from_addr.rpartition("@")[2] if from_addr else None, reply_to_addr=reply_to_addr,
        to_addrs=("bob@example.org",), date=None, defects=(),
    )


def make_result(verdict: Verdict = Verdict.SPAM, action: Action = Action.QUARANTINE,
                scores: tuple[float, float, float] = (0.05, 0.9, 0.05), dim: int = 8,
                teaches: bool = False, outbound: bool = False, **summary_kw: Any) -> Any:
    vector = (np.arange(dim, dtype=np.float32) / 4 + 0.125).astype(np.float32)
    return _ScanResult(
        verdict=verdict, action=action, scores=Scores(*scores), reasons=("spam score 0.90",),
        model="lgbm-test-1", summary=summary(**summary_kw), vector=vector,
        teaches=teaches, outbound=outbound,
    )


def _fail_or_skip(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL required under CI=true: {reason}")
    pytest.skip(reason)


def pg_schema_url() -> Iterator[str]:
    """Generator for a fixture: URL bound to a throw-away schema, dropped afterwards."""
    import psycopg

    schema = f"t_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        _fail_or_skip(f"PostgreSQL at 127.0.0.1:{PG_PORT} unreachable: {exc}")
        raise  # unreachable: skip/fail raise
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield f"{PG_URL}?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def backend_url(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'var' / 'store.db'}"
    else:
        yield from pg_schema_url()
