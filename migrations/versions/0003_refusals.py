"""refusals: watched paths lorad will not take as they are, with the cause and reason.

Paths in `loras` and `refusals` are stored by `lorad.pathtext.to_column`: a path whose bytes are
valid UTF-8 is stored unchanged (so every row written before this revision already has its final
form and no data moves); any other is stored escaped under a `bytes:` prefix, which no absolute
path starts with.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "refusals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("cause", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("file_stamp", sa.Text(), nullable=True),
        sa.Column("first_seen", UTC_TIME, nullable=False),
        sa.Column("last_seen", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refusals")),
        sa.UniqueConstraint("path", name=op.f("uq_refusals_path")),
    )


def downgrade() -> None:
    op.drop_table("refusals")
