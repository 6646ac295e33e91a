"""messages.explanation: the model's per-feature reasons for a flagged verdict (milter.explain).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # nullable: verdicts stored before this revision, accepted mail and models without an explainer have none
    op.add_column("messages", sa.Column("explanation", sa.JSON(), nullable=True))


def downgrade() -> None:
    # Not batch_alter_table: on SQLite it copies the table and drops the old one, and with foreign keys
    # on, that drop cascades to the quarantine and deletes every held message. SQLite >= 3.35 (2021)
    # and PostgreSQL both drop a column in place.
    op.execute("ALTER TABLE messages DROP COLUMN explanation")
