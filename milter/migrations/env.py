"""Alembic environment for the store; driven programmatically by milter.store.migrate.

The caller hands over an open SQLAlchemy connection in `config.attributes["connection"]`, so the
migrations run with the store's own engine settings (SQLite pragmas, PostgreSQL search_path).
For developers, `sqlalchemy.url` in the config also works (e.g. for `alembic revision --autogenerate`).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, text

from milter.store.models import Base

# Any constant works; it only has to be the same for every gateway process sharing the database.
_PG_MIGRATION_LOCK = 0x6D696C746572  # "milter"


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Two gateways starting at once must not both create the tables.
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        context.run_migrations()


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url configured")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


_main()
