"""Shared pytest setup: kept small and generic; helpers for one area live beside its tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from postfix import listen_port
from store_support import BACKENDS, backend_url

# Tests with these marks need a real service; a skip of one of them means "not tested", which CI
# must not mistake for "passed".
SERVICE_MARKS = ("postgres", "postfix")


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI=true, a skipped postgres/postfix test fails: a missing service or package is a broken
    CI machine, not a reason to go green."""
    report = yield
    if (
        in_ci()
        and report.skipped
        and not hasattr(report, "wasxfail")
        and any(item.get_closest_marker(m) is not None for m in SERVICE_MARKS)
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which requires this service: {reason}"
    return report


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A factory of loopback TCP ports that nothing listens on right now (`listen_port`)."""
    return listen_port


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL per backend: SQLite in the test's folder, and a throw-away PostgreSQL schema (which
    must be reachable under CI=true: store_support)."""
    yield from backend_url(request.param, tmp_path)
