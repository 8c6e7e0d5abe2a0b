"""mirror mode: where a mirrored LoRA's active variant was written, and that file's stamp.

A watched folder in `mode: mirror` never has its files touched; each LoRA's active variant is
written at the same relative path under the folder's `mirror_to`. Both columns are nullable:
LoRAs of replace-mode folders have neither.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("loras") as batch:
        batch.add_column(sa.Column("mirror_path", sa.Text(), nullable=True))
        batch.add_column(sa.Column("mirror_stamp", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("loras") as batch:
        batch.drop_column("mirror_stamp")
        batch.drop_column("mirror_path")
