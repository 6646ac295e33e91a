"""quarantine.release_claim / release_claimed_at: a release claims the message before delivering it.

Several nodes share one store, and two admins may release the same message at once: only the process
holding the claim delivers (milter/store/release.py). Held messages keep their bytes and state; they
start unclaimed.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from milter.store.models import UTCDateTime

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

_COLUMNS = (
    ("release_claim", sa.String(255)),
    ("release_claimed_at", UTCDateTime()),
)


def upgrade() -> None:
    for name, type_ in _COLUMNS:
        # nullable: no release is in progress on any row yet
        op.add_column("quarantine", sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    # Not batch_alter_table: on SQLite it copies the table and drops the old one, a needless rewrite of
    # every held message's bytes (see 0002 for what it does to the messages table). A claim in
    # progress is lost with the columns: release that message again after upgrading.
    for name, _ in reversed(_COLUMNS):
        op.execute(f"ALTER TABLE quarantine DROP COLUMN {name}")
