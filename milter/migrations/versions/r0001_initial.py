"""Initial schema: messages (verdicts) and quarantine (raw bytes).

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from milter.store.models import UTCDateTime

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("queue_id", sa.String(64)),
        sa.Column("mail_from", sa.Text()),
        sa.Column("rcpt_tos", sa.JSON(), nullable=False),
        sa.Column("client_addr", sa.String(64)),
        sa.Column("client_name", sa.Text()),
        sa.Column("helo", sa.Text()),
        sa.Column("message_id", sa.String(500)),
        sa.Column("from_addr", sa.Text()),
        sa.Column("subject", sa.Text()),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("score_ham", sa.Float(), nullable=False),
        sa.Column("score_spam", sa.Float(), nullable=False),
        sa.Column("score_bec", sa.Float(), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("feature_vector", sa.LargeBinary()),
        sa.Column("schema_digest", sa.String(128), nullable=False),
        sa.Column("label", sa.String(16)),
        sa.Column("label_source", sa.String(64)),
        sa.Column("labelled_at", UTCDateTime()),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
    )
    op.create_index("ix_messages_received_at", "messages", ["received_at"])
    op.create_index("ix_messages_message_id", "messages", ["message_id"])
    op.create_index("ix_messages_action", "messages", ["action"])
    op.create_table(
        "quarantine",
        sa.Column("message_pk", sa.Integer(), nullable=False),
        sa.Column("raw", sa.LargeBinary()),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("released_at", UTCDateTime()),
        sa.Column("deleted_at", UTCDateTime()),
        sa.ForeignKeyConstraint(
            ["message_pk"], ["messages.id"],
            name="fk_quarantine_message_pk_messages", ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("message_pk", name="pk_quarantine"),
    )


def downgrade() -> None:
    op.drop_table("quarantine")
    op.drop_index("ix_messages_action", table_name="messages")
    op.drop_index("ix_messages_message_id", table_name="messages")
    op.drop_index("ix_messages_received_at", table_name="messages")
    op.drop_table("messages")
