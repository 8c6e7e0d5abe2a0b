"""loras.file_stamp: the watched file's stamp when lorad last knew its contents.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("loras") as batch:
        batch.add_column(sa.Column("file_stamp", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("loras") as batch:
        batch.drop_column("file_stamp")
