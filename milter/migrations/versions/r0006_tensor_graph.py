"""models.tensor_onnx: the fleet's models carry their tensor graph too (docs/gpu.md).

The tensor graph (the same trees as standard tensor operators, for the CUDA provider) ships beside the
TreeEnsemble graph since issue 15; a node adopting a fleet model installs it with the other files, so a
GPU node can score on its GPU. NULL: a model published before this revision, or one without a tensor
graph; such a model is scored on the CPU.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("models", sa.Column("tensor_onnx", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    # In place, not batch_alter_table (see 0002): SQLite >= 3.35 and PostgreSQL drop a column directly.
    op.execute("ALTER TABLE models DROP COLUMN tensor_onnx")
