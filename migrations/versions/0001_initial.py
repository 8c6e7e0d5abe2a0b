"""Initial schema: loras, blobs, variants, module_metrics, jobs, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# A migration is a frozen copy of the schema: plain SQLAlchemy types, never the live models.
UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("format", sa.Text(), nullable=True),
        sa.Column("modules", sa.Integer(), nullable=True),
        sa.Column("data_sha256", sa.String(length=64), nullable=False),
        sa.Column("autov2", sa.String(length=10), nullable=False),
        sa.Column("autov3", sa.String(length=12), nullable=False),
        sa.Column("sshs_model_hash", sa.Text(), nullable=True),
        sa.Column("sshs_legacy_hash", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("verified_at", UTC_TIME, nullable=True),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blobs")),
    )
    op.create_index(op.f("ix_blobs_autov2"), "blobs", ["autov2"])
    op.create_index(op.f("ix_blobs_autov3"), "blobs", ["autov3"])

    # loras <-> variants refer to each other: loras' two foreign keys are added once both exist.
    op.create_table(
        "loras",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("folder", sa.Text(), nullable=False),
        sa.Column("policy", sa.Text(), nullable=True),
        sa.Column("original_variant_id", sa.Integer(), nullable=True),
        sa.Column("active_variant_id", sa.Integer(), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_loras")),
        sa.UniqueConstraint("path", name=op.f("uq_loras_path")),
    )
    op.create_table(
        "variants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("lora_id", sa.Integer(), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("source_variant_id", sa.Integer(), nullable=True),
        sa.Column("method", sa.Text(), nullable=True),
        sa.Column("param", sa.Float(), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("fro_retained_mean", sa.Float(), nullable=True),
        sa.Column("fro_retained_min", sa.Float(), nullable=True),
        sa.Column("params_in", sa.BigInteger(), nullable=True),
        sa.Column("params_out", sa.BigInteger(), nullable=True),
        sa.Column("bytes_in", sa.BigInteger(), nullable=True),
        sa.Column("bytes_out", sa.BigInteger(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("device", sa.Text(), nullable=True),
        sa.CheckConstraint("kind IN ('original', 'reduced')", name=op.f("ck_variants_kind")),
        sa.ForeignKeyConstraint(
            ["blob_sha256"], ["blobs.sha256"], name=op.f("fk_variants_blob_sha256_blobs")
        ),
        sa.ForeignKeyConstraint(["lora_id"], ["loras.id"], name=op.f("fk_variants_lora_id_loras")),
        sa.ForeignKeyConstraint(
            ["source_variant_id"],
            ["variants.id"],
            name=op.f("fk_variants_source_variant_id_variants"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_variants")),
        sa.UniqueConstraint(
            "lora_id", "blob_sha256", name=op.f("uq_variants_lora_id_blob_sha256")
        ),
    )
    op.create_index(op.f("ix_variants_blob_sha256"), "variants", ["blob_sha256"])
    op.create_index(op.f("ix_variants_lora_id"), "variants", ["lora_id"])
    with op.batch_alter_table("loras") as batch:
        batch.create_foreign_key(
            "fk_loras_original_variant_id_variants", "variants", ["original_variant_id"], ["id"]
        )
        batch.create_foreign_key(
            "fk_loras_active_variant_id_variants", "variants", ["active_variant_id"], ["id"]
        )

    op.create_table(
        "module_metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("variant_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("rank_in", sa.Integer(), nullable=False),
        sa.Column("rank_out", sa.Integer(), nullable=False),
        sa.Column("fro_retained", sa.Float(), nullable=False),
        sa.Column("rel_error", sa.Float(), nullable=False),
        sa.Column("params_in", sa.BigInteger(), nullable=False),
        sa.Column("params_out", sa.BigInteger(), nullable=False),
        sa.Column("skipped", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["variant_id"],
            ["variants.id"],
            name=op.f("fk_module_metrics_variant_id_variants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_module_metrics")),
        sa.UniqueConstraint("variant_id", "name", name=op.f("uq_module_metrics_variant_id_name")),
    )

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Text(), server_default="reduce", nullable=False),
        sa.Column("blob_sha256", sa.Text(), nullable=False),
        sa.Column("lora_id", sa.Integer(), nullable=True),
        sa.Column("policy", sa.Text(), nullable=False),
        sa.Column("policy_hash", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default="3", nullable=False),
        sa.Column("not_before", UTC_TIME, nullable=True),
        sa.Column("lease_until", UTC_TIME, nullable=True),
        sa.Column("heartbeat_at", UTC_TIME, nullable=True),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.Column("progress", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("variant_id", sa.Integer(), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.CheckConstraint(
            "state IN ('pending', 'running', 'done', 'failed')", name=op.f("ck_jobs_state")
        ),
        sa.ForeignKeyConstraint(
            ["lora_id"], ["loras.id"], name=op.f("fk_jobs_lora_id_loras"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["variant_id"],
            ["variants.id"],
            name=op.f("fk_jobs_variant_id_variants"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint(
            "kind", "blob_sha256", "policy_hash", name=op.f("uq_jobs_kind_blob_sha256_policy_hash")
        ),
    )
    op.create_index("ix_jobs_state_not_before", "jobs", ["state", "not_before"])

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", UTC_TIME, nullable=False),
        sa.Column("lora_id", sa.Integer(), nullable=True),
        sa.Column("variant_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["lora_id"], ["loras.id"], name=op.f("fk_events_lora_id_loras"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["variant_id"],
            ["variants.id"],
            name=op.f("fk_events_variant_id_variants"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_at"), "events", ["at"])
    op.create_index(op.f("ix_events_lora_id"), "events", ["lora_id"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("jobs")
    op.drop_table("module_metrics")
    with op.batch_alter_table("loras") as batch:
        batch.drop_constraint("fk_loras_active_variant_id_variants", type_="foreignkey")
        batch.drop_constraint("fk_loras_original_variant_id_variants", type_="foreignkey")
    op.drop_table("variants")
    op.drop_table("loras")
    op.drop_table("blobs")
