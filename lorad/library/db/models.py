"""The records: watched LoRAs, stored blobs, their variants and metrics, the job queue, the audit trail.

Times are timezone-aware UTC in Python. SQLite has no time zone type, so `UTCDateTime` stores naive
UTC and hands back aware values; compare times through the ORM columns (not raw SQL strings) so the
conversion applies to both sides.

The schema is owned by the Alembic migrations in the top-level `migrations/`; a test checks that
these models and the migrated schema agree.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false as sa_false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from lorad.pathtext import from_column, to_column

# Deterministic constraint names, so migrations can refer to them and autogenerate compares them.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

VARIANT_KINDS = ("original", "reduced")
EFFECT_KINDS = ("denoiser", "logits")  # a diffusion model's denoiser output; a causal LM's next-token logits
JOB_STATES = ("pending", "running", "done", "failed")
EVENT_KINDS = (
    "ingested",  # a new original was stored (first sight, or a file changed behind lorad's back)
    "reduced",  # a reduced variant was recorded
    "activated",  # a variant was put at the watched path by policy
    "reverted",  # the original was put back at the watched path
    "switched",  # a chosen variant was put at the watched path
    "verified",  # a verify pass (detail: what it found and reconciled)
    "quarantined",  # a corrupt blob was moved to bad/
    "collected",  # gc removed variants and blobs
    "failed",  # an operation was refused or failed (detail: error)
    "decided",  # (worker) a policy's verdict on a new variant
    "measured",  # a variant's effect on a base model was recorded (`lorad effect`)
)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python; naive UTC in databases without a time zone type."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("lorad stores aware UTC datetimes only; got a naive one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class PathText(TypeDecorator[str]):
    """A file path as `os.fsdecode` text in Python, stored as valid UTF-8 text (lorad.pathtext):
    a name that is not UTF-8 is recorded and comes back as the exact same bytes."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else to_column(os.fspath(value))

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else from_column(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Lora(Base):
    """One watched path. Its file shows `active_variant`; `original_variant` is what revert restores."""

    __tablename__ = "loras"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(PathText, unique=True)  # absolute, resolved
    folder: Mapped[str] = mapped_column(PathText)  # the watched root it lies in
    policy: Mapped[str | None] = mapped_column(Text)
    # Circular with variants.lora_id, so created after both tables exist (use_alter).
    original_variant_id: Mapped[int | None] = mapped_column(
        ForeignKey("variants.id", use_alter=True, name="fk_loras_original_variant_id_variants")
    )
    active_variant_id: Mapped[int | None] = mapped_column(
        ForeignKey("variants.id", use_alter=True, name="fk_loras_active_variant_id_variants")
    )
    # device:inode:size:mtime_ns of the file when lorad last knew it to hold the active variant: a
    # rescan that finds the same stamp trusts it instead of re-hashing (verify always re-hashes).
    file_stamp: Mapped[str | None] = mapped_column(Text)
    # "file": a .safetensors file; "folder": a PEFT adapter folder, whose variants are tree blobs
    kind: Mapped[str] = mapped_column(String(16), default="file", server_default="file")
    # Mirror mode (lorad.library.mirror): where the active variant was written instead of `path` (which
    # then always holds the original), and that file's stamp when lorad last knew its contents.
    mirror_path: Mapped[str | None] = mapped_column(PathText)
    mirror_stamp: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Blob(Base):
    """A file in the store, named by its sha256, with the identities users look LoRAs up by."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str | None] = mapped_column(Text)  # detected LoRA format id, e.g. "kohya"
    modules: Mapped[int | None] = mapped_column(Integer)
    data_sha256: Mapped[str] = mapped_column(String(64))  # sha256 after the header (addnet)
    autov2: Mapped[str] = mapped_column(String(10), index=True)  # Civitai AutoV2: sha256[:10]
    autov3: Mapped[str] = mapped_column(String(12), index=True)  # Civitai AutoV3: data_sha256[:12]
    sshs_model_hash: Mapped[str | None] = mapped_column(Text)  # as the file's metadata claims it
    sshs_legacy_hash: Mapped[str | None] = mapped_column(Text)
    blake3: Mapped[str | None] = mapped_column(String(64), index=True)  # InvokeAI's id for a model file
    # The LoRA modules' ranks, from the header (a tree's: its weights file's), so that listing reads
    # no file; None: stored before lorad recorded them, or not a LoRA file (a tree's config).
    ranks: Mapped[list[int] | None] = mapped_column(JSON)
    # "file": the bytes of one file; "tree": a folder, its entries listed in tree_entries
    kind: Mapped[str] = mapped_column(String(16), default="file", server_default="file")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class TreeEntry(Base):
    """One file of a folder blob (a PEFT adapter folder): its name in the folder and its own blob."""

    __tablename__ = "tree_entries"

    tree_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    mode: Mapped[int] = mapped_column(Integer, default=0o644, server_default="420")


class ClaimedHash(Base):
    """A hash that a sidecar beside a LoRA says its file has (.metadata.json, .civitai.info,
    .cm-info.json): searchable by `lorad find`, never trusted for anything else."""

    __tablename__ = "claimed_hashes"
    __table_args__ = (UniqueConstraint("lora_id", "kind", "value", "source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    lora_id: Mapped[int] = mapped_column(ForeignKey("loras.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # sha256 | autov1 | autov2 | autov3 | blake3 | crc32 | ...
    value: Mapped[str] = mapped_column(Text, index=True)  # lower-case hex, as the sidecar gives it
    source: Mapped[str] = mapped_column(Text)  # the sidecar's file name
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Variant(Base):
    """One version of a LoRA: an original (as found at its path) or a reduction of one."""

    __tablename__ = "variants"
    __table_args__ = (
        UniqueConstraint("lora_id", "blob_sha256"),
        CheckConstraint("kind IN ('original', 'reduced')", name="kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    lora_id: Mapped[int] = mapped_column(ForeignKey("loras.id"), index=True)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    source_variant_id: Mapped[int | None] = mapped_column(
        ForeignKey("variants.id", ondelete="SET NULL")
    )  # the variant a reduction was made from
    method: Mapped[str | None] = mapped_column(Text)
    param: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Summary of the reduction report (None for originals).
    fro_retained_mean: Mapped[float | None] = mapped_column(Float)
    fro_retained_min: Mapped[float | None] = mapped_column(Float)
    params_in: Mapped[int | None] = mapped_column(BigInteger)
    params_out: Mapped[int | None] = mapped_column(BigInteger)
    bytes_in: Mapped[int | None] = mapped_column(BigInteger)
    bytes_out: Mapped[int | None] = mapped_column(BigInteger)
    seconds: Mapped[float | None] = mapped_column(Float)
    device: Mapped[str | None] = mapped_column(Text)
    fro_retained_file: Mapped[float | None] = mapped_column(Float)  # energy-weighted over the file
    serve: Mapped[str | None] = mapped_column(Text)  # the server whose rank rules it was made for
    rank_rule: Mapped[str | None] = mapped_column(Text)  # the rank rule it was made under, described
    # What a report shows beyond the per-module rows: the engine's notes and the spectra of the
    # largest modules ({"notes": [...], "spectra": [{"name", "values", "cut"}]}).
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class VariantEffect(Base):
    """A variant's measured effect on a base model (`lorad effect`, lorad.library.effects): one row
    per (variant, base model, sample set); `list` and `show` display the latest (measured_at)."""

    __tablename__ = "variant_effects"
    __table_args__ = (
        UniqueConstraint("variant_id", "base_sha256", "samples_id"),
        CheckConstraint("kind IN ('denoiser', 'logits')", name="kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id", ondelete="CASCADE"), index=True)
    # The variant it was compared with: the one it was made from (its original, as a rule).
    reference_variant_id: Mapped[int | None] = mapped_column(ForeignKey("variants.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(16))  # EFFECT_KINDS
    # 1 - ||effect_variant - effect_reference|| / ||effect_reference||: the mean over the samples and
    # the worst sample's (1: the same effect; below 0: further off than no LoRA at all).
    effect_retained: Mapped[float] = mapped_column(Float)
    effect_retained_min: Mapped[float] = mapped_column(Float)
    per_sample: Mapped[list[float]] = mapped_column(JSON)
    kl_mean: Mapped[float | None] = mapped_column(Float)  # logits: mean KL(reference || variant)
    samples: Mapped[str] = mapped_column(Text)  # the sample set as JSON text (prompts, seeds, timesteps...)
    samples_id: Mapped[str] = mapped_column(String(16))  # its id (16 hex digits)
    base: Mapped[str] = mapped_column(PathText)  # the base model measured on, as the user named it
    base_sha256: Mapped[str] = mapped_column(String(64))
    seconds: Mapped[float | None] = mapped_column(Float)  # how long the measurement took
    actor: Mapped[str] = mapped_column(Text)
    measured_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModuleMetric(Base):
    """Per-module result of a reduction (skipped modules carry their reason)."""

    __tablename__ = "module_metrics"
    __table_args__ = (UniqueConstraint("variant_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(32))
    rank_in: Mapped[int] = mapped_column(Integer)
    rank_out: Mapped[int] = mapped_column(Integer)
    fro_retained: Mapped[float] = mapped_column(Float)
    rel_error: Mapped[float] = mapped_column(Float)
    params_in: Mapped[int] = mapped_column(BigInteger)
    params_out: Mapped[int] = mapped_column(BigInteger)
    skipped: Mapped[str | None] = mapped_column(Text)


class Job(Base):
    """The durable reduction queue (claimed, leased and retried by lorad.daemon.queue)."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("kind", "blob_sha256", "policy_hash"),
        CheckConstraint("state IN ('pending', 'running', 'done', 'failed')", name="state"),
        Index("ix_jobs_state_not_before", "state", "not_before"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(Text, default="reduce", server_default="reduce")
    blob_sha256: Mapped[str] = mapped_column(Text)  # the original blob to reduce
    lora_id: Mapped[int | None] = mapped_column(ForeignKey("loras.id", ondelete="SET NULL"))
    policy: Mapped[str] = mapped_column(Text)
    policy_hash: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, default=3, server_default="3")
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    variant_id: Mapped[int | None] = mapped_column(ForeignKey("variants.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Event(Base):
    """Append-only audit trail: what happened, to which LoRA/variant, and who asked."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    lora_id: Mapped[int | None] = mapped_column(
        ForeignKey("loras.id", ondelete="SET NULL"), index=True
    )
    variant_id: Mapped[int | None] = mapped_column(ForeignKey("variants.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(Text)  # "cli:uid=1000", "daemon", "verify", ...
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Refusal(Base):
    """A watched path lorad will not take as it is, and why (one row per path, the latest cause).

    Kept until the file is taken in, or is gone at a reconcile scan; `lorad list` shows it.
    """

    __tablename__ = "refusals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(PathText, unique=True)  # absolute, as found (not resolved)
    cause: Mapped[str] = mapped_column(String(32))  # lorad.library.refusals.CAUSES
    reason: Mapped[str] = mapped_column(Text)
    file_stamp: Mapped[str | None] = mapped_column(Text)  # FileStamp.token of what was refused
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class StoreIdentity(Base):
    """The store this database's records describe (lorad.library.store_identity): one row, whose
    `store_id` is also written in the store's root. `confirmed_at` is set once that file is known
    written; until then a node may (re)write it."""

    __tablename__ = "store_identity"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    store_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(Text)  # the node that created (or adopted) it
    adopted: Mapped[bool] = mapped_column(Boolean, default=False)  # given to a store that had blobs
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class FolderLease(Base):
    """Which node watches a watched folder (lorad.daemon.fleet): the row is taken when free or
    expired, and renewed, by one UPDATE whose WHERE only its holder or an expired lease passes."""

    __tablename__ = "folder_leases"

    folder: Mapped[str] = mapped_column(PathText, primary_key=True)  # the watched folder, resolved
    node: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    renewed_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Node(Base):
    """A daemon of the fleet, as its last heartbeat left it (lorad.daemon.fleet; `lorad status`)."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    device: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)
    running_jobs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    draining: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
