"""serving and identity: PEFT adapter folders as LoRAs (folder blobs and their entries), the rank
rule a variant was made under, the whole-file retained ratio and report details, BLAKE3 of blobs,
and hashes that sidecars claim.

Every new column is nullable or has a server default, so existing rows need no data migration:
existing LoRAs are files, existing blobs are files.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("loras") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), server_default="file", nullable=False))
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("blake3", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("kind", sa.String(length=16), server_default="file", nullable=False))
        batch.create_index(batch.f("ix_blobs_blake3"), ["blake3"], unique=False)
    with op.batch_alter_table("variants") as batch:
        batch.add_column(sa.Column("fro_retained_file", sa.Float(), nullable=True))
        batch.add_column(sa.Column("serve", sa.Text(), nullable=True))
        batch.add_column(sa.Column("rank_rule", sa.Text(), nullable=True))
        batch.add_column(sa.Column("details", sa.JSON(), nullable=True))
    op.create_table(
        "tree_entries",
        sa.Column("tree_sha256", sa.String(length=64), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("mode", sa.Integer(), server_default="420", nullable=False),
        sa.ForeignKeyConstraint(["tree_sha256"], ["blobs.sha256"], name=op.f("fk_tree_entries_tree_sha256_blobs")),
        sa.ForeignKeyConstraint(["blob_sha256"], ["blobs.sha256"], name=op.f("fk_tree_entries_blob_sha256_blobs")),
        sa.PrimaryKeyConstraint("tree_sha256", "name", name=op.f("pk_tree_entries")),
    )
    op.create_index(op.f("ix_tree_entries_blob_sha256"), "tree_entries", ["blob_sha256"], unique=False)
    op.create_table(
        "claimed_hashes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("lora_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("recorded_at", UTC_TIME, nullable=False),
        sa.ForeignKeyConstraint(["lora_id"], ["loras.id"], name=op.f("fk_claimed_hashes_lora_id_loras"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_claimed_hashes")),
        sa.UniqueConstraint("lora_id", "kind", "value", "source", name=op.f("uq_claimed_hashes_lora_id_kind_value_source")),
    )
    op.create_index(op.f("ix_claimed_hashes_lora_id"), "claimed_hashes", ["lora_id"], unique=False)
    op.create_index(op.f("ix_claimed_hashes_value"), "claimed_hashes", ["value"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_claimed_hashes_value"), table_name="claimed_hashes")
    op.drop_index(op.f("ix_claimed_hashes_lora_id"), table_name="claimed_hashes")
    op.drop_table("claimed_hashes")
    op.drop_index(op.f("ix_tree_entries_blob_sha256"), table_name="tree_entries")
    op.drop_table("tree_entries")
    with op.batch_alter_table("variants") as batch:
        batch.drop_column("details")
        batch.drop_column("rank_rule")
        batch.drop_column("serve")
        batch.drop_column("fro_retained_file")
    with op.batch_alter_table("blobs") as batch:
        batch.drop_index(batch.f("ix_blobs_blake3"))
        batch.drop_column("kind")
        batch.drop_column("blake3")
    with op.batch_alter_table("loras") as batch:
        batch.drop_column("kind")
