"""models, model_log, nodes: the fleet's shared model registry (milter/store/registry.py).

Several gateway nodes share one store; a promotion writes the model's files here and a row in
model_log, and every node adopts the fleet's current model from here (milter.gateway.fleet) and checks
in to `nodes`. New tables only: nothing existing changes, so the downgrade just drops them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from milter.store.models import UTCDateTime

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("onnx_sha256", sa.String(64), nullable=False),
        sa.Column("onnx", sa.LargeBinary(), nullable=False),
        sa.Column("meta_json", sa.LargeBinary(), nullable=False),
        sa.Column("lgb_text", sa.LargeBinary(), nullable=True),  # models from before explanations
        sa.Column("promoted_at", UTCDateTime(), nullable=False),
        sa.Column("promoted_by", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_models"),
    )
    op.create_table(
        "model_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("by", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(["name"], ["models.name"], name="fk_model_log_name_models"),
        sa.PrimaryKeyConstraint("id", name="pk_model_log"),
    )
    op.create_index("ix_model_log_name", "model_log", ["name"])
    op.create_table(
        "nodes",
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("onnx_sha256", sa.String(64), nullable=False),
        sa.Column("last_checkin", UTCDateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("node", name="pk_nodes"),
    )


def downgrade() -> None:
    # Whole tables only (no batch_alter_table, see 0002): the models' bytes go with them.
    op.drop_table("nodes")
    op.drop_index("ix_model_log_name", table_name="model_log")
    op.drop_table("model_log")
    op.drop_table("models")
