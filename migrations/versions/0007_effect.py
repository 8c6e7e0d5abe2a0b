"""variant effects: the measured effect of a variant on a base model (`lorad effect`).

One row per (variant, base model, sample set): effect = output(base + LoRA) - output(base) on a
fixed set of samples, for the variant and for the variant it was made from (`reference`), and
`effect_retained = 1 - ||effect_variant - effect_reference|| / ||effect_reference||` (the mean over
the samples, and the worst). A variant may be measured against several base models; `list` and
`show` display the latest measurement. The rows go with their variant (ON DELETE CASCADE).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "variant_effects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("variant_id", sa.Integer(), nullable=False),
        sa.Column("reference_variant_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("effect_retained", sa.Float(), nullable=False),
        sa.Column("effect_retained_min", sa.Float(), nullable=False),
        sa.Column("per_sample", sa.JSON(), nullable=False),
        sa.Column("kl_mean", sa.Float(), nullable=True),
        sa.Column("samples", sa.Text(), nullable=False),
        sa.Column("samples_id", sa.String(length=16), nullable=False),
        sa.Column("base", sa.Text(), nullable=False),
        sa.Column("base_sha256", sa.String(length=64), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("measured_at", UTC_TIME, nullable=False),
        sa.CheckConstraint("kind IN ('denoiser', 'logits')", name=op.f("ck_variant_effects_kind")),
        sa.ForeignKeyConstraint(
            ["variant_id"],
            ["variants.id"],
            name=op.f("fk_variant_effects_variant_id_variants"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["reference_variant_id"],
            ["variants.id"],
            name=op.f("fk_variant_effects_reference_variant_id_variants"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_variant_effects")),
        sa.UniqueConstraint(
            "variant_id",
            "base_sha256",
            "samples_id",
            name=op.f("uq_variant_effects_variant_id_base_sha256_samples_id"),
        ),
    )
    op.create_index(op.f("ix_variant_effects_variant_id"), "variant_effects", ["variant_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_variant_effects_variant_id"), table_name="variant_effects")
    op.drop_table("variant_effects")
