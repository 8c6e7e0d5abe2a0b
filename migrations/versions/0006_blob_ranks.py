"""blob ranks: the LoRA module ranks a stored file (or a folder tree's weights) has, read from its
header when it is stored, so listing a library reads no file.

Nullable: blobs stored before this revision have none; the library reads their header once when
it first needs them and records what it read.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("ranks", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("ranks")
