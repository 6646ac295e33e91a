"""history: the correspondence history (milter.history), and on messages what it learns from.

The table is shared by every gateway process and node: each adds what it learned to the counts
(Store.history_apply). The new messages columns let `milter history rebuild` replay stored verdicts;
verdicts stored before this revision have NULL there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_MESSAGE_COLUMNS = (
    ("from_display", sa.Text()),
    ("reply_to", sa.Text()),
    ("outbound", sa.Boolean()),
    ("teaches", sa.Boolean()),
)


def upgrade() -> None:
    op.create_table(
        "history",
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(500), nullable=False),
        sa.Column("member", sa.String(500), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("inbound", sa.Integer(), nullable=False),
        sa.Column("outbound", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "key", "member", name="pk_history"),
    )
    op.create_index("ix_history_last_seen", "history", ["last_seen"])
    for name, type_ in _MESSAGE_COLUMNS:
        # nullable: verdicts stored before this revision do not know these facts
        op.add_column("messages", sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    # Not batch_alter_table: on SQLite it copies the table and drops the old one, and with foreign keys
    # on, that drop cascades to the quarantine and deletes every held message (see 0002).
    for name, _ in reversed(_MESSAGE_COLUMNS):
        op.execute(f"ALTER TABLE messages DROP COLUMN {name}")
    op.drop_index("ix_history_last_seen", table_name="history")
    op.drop_table("history")
