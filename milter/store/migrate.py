"""Run the shipped Alembic migrations programmatically (no alembic.ini, independent of the cwd)."""

from __future__ import annotations

import threading
from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection


def migrations_dir() -> Path:
    return Path(str(files("milter") / "migrations"))


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


# Alembic publishes the running environment through module-level proxies (`alembic.context`,
# `alembic.op`), so two migrations in one process at once would use each other's context. This lock
# serialises them within the process; env.py's advisory lock (PostgreSQL) or BEGIN IMMEDIATE (SQLite)
# serialises them across processes.
_ALEMBIC_LOCK = threading.Lock()


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Bring the schema to `revision`; env.py runs it in one transaction on `connection`."""
    cfg = alembic_config(connection)
    if revision == "head" and current_revision(connection) == head_revision():
        return  # the usual case at start-up: nothing to do, and no need to wait for the lock
    with _ALEMBIC_LOCK:
        command.upgrade(cfg, revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def known_revisions() -> frozenset[str]:
    """Every schema revision this code's migrations know."""
    return frozenset(s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions())


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()
