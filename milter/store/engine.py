"""Engine construction: SQLite pragmas (WAL, busy timeout), PostgreSQL timeouts, readable errors."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.pool import StaticPool

#: Execution option marking a connection that will write: SQLite then takes the write lock at BEGIN.
WRITE_OPTION = "milter_write"


def safe_url(url: str) -> str:
    """The URL for messages, password masked; never raises."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid URL>"


def describe(exc: BaseException) -> str:
    """One line about a database failure: the driver's own words, without SQL or parameters."""
    cause: BaseException = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
    return text or type(cause).__name__


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def is_memory_or_uri(url: URL) -> bool:
    """A SQLite URL that names no plain file path: in memory, or a `file:` URI."""
    return _is_memory(url) or bool(url.database and url.database.startswith("file:"))


def _prepare_sqlite_path(url: URL) -> None:
    """Create the folder of a SQLite file (OSError when that is impossible)."""
    db = url.database
    if db and not is_memory_or_uri(url):
        Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _set_wal(cur: Any, busy_timeout_ms: int) -> None:
    """Switch to WAL, retrying: on a fresh file several gateways starting at once race for the switch,
    and SQLite answers "database is locked" there without waiting on busy_timeout."""
    deadline = time.monotonic() + busy_timeout_ms / 1000.0
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def _install_sqlite_events(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # The driver's own implicit BEGIN cannot be told IMMEDIATE; we issue BEGIN in _on_begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            # busy_timeout first: switching to WAL needs a lock another process may hold.
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            _set_wal(cur, busy_timeout_ms)
            # FULL, not WAL's usual NORMAL: a quarantined message's 250 promises it survives a power
            # cut, and NORMAL can lose the last commits then (it syncs the WAL only at checkpoints).
            # Group commit keeps the cost to one fsync per batch.
            cur.execute("PRAGMA synchronous = FULL")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A deferred transaction that reads and then writes cannot wait for the lock (SQLITE_BUSY
        # at once, "database is locked"); writers therefore take it up front and queue on busy_timeout.
        mode = "IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(
    url_text: str, busy_timeout_ms: int = 10_000, connect_timeout_s: int = 10, create: bool = True
) -> Engine:
    """Engine for `url_text`; raises SQLAlchemyError (bad URL, unknown driver) or OSError.

    `create`: make the folder of a SQLite file (the gateway's first start); False for commands that
    must find an existing store, where a mistyped path must not leave folders behind."""
    url = make_url(url_text)
    kwargs: dict[str, Any] = {"hide_parameters": True}  # no message content in error texts or logs
    if url.get_backend_name() == "sqlite":
        if create:
            _prepare_sqlite_path(url)
        if _is_memory(url):
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        engine = create_engine(url, **kwargs)
        _install_sqlite_events(engine, busy_timeout_ms)
        return engine
    if url.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": connect_timeout_s}
    # A restarted database server must not fail the first record() after it comes back.
    return create_engine(url, pool_pre_ping=True, **kwargs)
