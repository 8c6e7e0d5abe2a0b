"""store identity: the id of the store the records describe, also written in the store's root
(`lorad-store-id`), so a node whose store_dir is not the fleet's store (an unmounted share, a wrong
path) refuses to start instead of filling an empty folder the others cannot see.

One row at most (id = 1). An existing database gets no row here: the daemon's first start after the
upgrade adopts the store it finds (lorad.library.store_identity).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "store_identity",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("store_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("created_by", sa.Text(), nullable=True),
        sa.Column("adopted", sa.Boolean(), nullable=False),
        sa.Column("confirmed_at", UTC_TIME, nullable=True),
        sa.CheckConstraint("id = 1", name=op.f("ck_store_identity_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_store_identity")),
    )


def downgrade() -> None:
    op.drop_table("store_identity")
