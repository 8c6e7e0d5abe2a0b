"""Repository functions: the queries and writes the library needs, each over a caller's session.

They never commit: the caller's `Database.write()` block is the transaction, so a group of calls
lands together or not at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lorad.engine.report import Report
from lorad.library.db.models import (
    Blob,
    ClaimedHash,
    Event,
    Job,
    Lora,
    ModuleMetric,
    Refusal,
    TreeEntry,
    Variant,
    VariantEffect,
    utcnow,
)
from lorad.library.hashes import HashHit, Query, blob_kind


@dataclass(frozen=True)
class BlobRecord:
    """What the library learned about a file it stored (plain data for `ensure_blob`)."""

    sha256: str
    bytes: int
    data_sha256: str
    format: str | None
    modules: int | None
    sshs_model_hash: str | None
    sshs_legacy_hash: str | None
    blake3: str | None = None
    kind: str = "file"  # "tree": a folder's manifest, its entries in tree_entries
    ranks: tuple[int, ...] | None = None  # its LoRA modules' ranks (a tree's: its weights file's)


# -- loras -----------------------------------------------------------------------------------------


def lora_by_path(s: Session, path: str) -> Lora | None:
    return s.scalar(select(Lora).where(Lora.path == path))


def all_loras(s: Session) -> Sequence[Lora]:
    return s.scalars(select(Lora).order_by(Lora.id)).all()


def add_lora(s: Session, path: str, folder: str, policy: str | None, kind: str = "file") -> Lora:
    lora = Lora(path=path, folder=folder, policy=policy, kind=kind)
    s.add(lora)
    s.flush()
    return lora


def set_active(s: Session, lora: Lora, variant: Variant) -> None:
    lora.active_variant_id = variant.id
    lora.updated_at = utcnow()


def set_original(s: Session, lora: Lora, variant: Variant) -> None:
    lora.original_variant_id = variant.id
    lora.updated_at = utcnow()


# -- blobs -----------------------------------------------------------------------------------------


def ensure_blob(s: Session, record: BlobRecord) -> Blob:
    blob = s.get(Blob, record.sha256)
    if blob is None:
        blob = Blob(
            sha256=record.sha256,
            bytes=record.bytes,
            data_sha256=record.data_sha256,
            autov2=record.sha256[:10],
            autov3=record.data_sha256[:12],
            format=record.format,
            modules=record.modules,
            sshs_model_hash=record.sshs_model_hash,
            sshs_legacy_hash=record.sshs_legacy_hash,
            blake3=record.blake3,
            kind=record.kind,
            ranks=_ranks_column(record.ranks),
        )
        if s.get_bind().dialect.name == "sqlite":  # writers are serialised (BEGIN IMMEDIATE)
            s.add(blob)
            s.flush()
            return blob
        # The database's clock, as gc's grace period is counted (nodes' clocks may differ).
        blob.created_at = db_now(s)
        try:
            with s.begin_nested():  # another node may record the same bytes at the same instant
                s.add(blob)
            return blob
        except IntegrityError:
            found = s.get(Blob, record.sha256)  # it committed first: its row stands for both
            if found is None:
                raise
            blob = found
    # Recorded before lorad computed these; the same bytes came again.
    if blob.blake3 is None and record.blake3 is not None:
        blob.blake3 = record.blake3
    if blob.ranks is None and record.ranks is not None:
        blob.ranks = _ranks_column(record.ranks)
    return blob


def db_now(s: Session) -> datetime:
    """The database server's time now (PostgreSQL), or this machine's (SQLite serves one)."""
    if s.get_bind().dialect.name == "sqlite":
        return utcnow()
    now = s.scalar(select(func.statement_timestamp()))
    assert now is not None
    return now if now.tzinfo else now.replace(tzinfo=UTC)


def _ranks_column(ranks: tuple[int, ...] | None) -> list[int] | None:
    return None if ranks is None else list(ranks)


def set_blob_ranks(s: Session, ranks: dict[str, tuple[int, ...]]) -> None:
    """Record the ranks read from the headers of blobs stored before lorad recorded them."""
    for blob in s.scalars(select(Blob).where(Blob.sha256.in_(list(ranks)))):
        blob.ranks = list(ranks[blob.sha256])
    s.flush()


def all_blobs(s: Session) -> Sequence[Blob]:
    return s.scalars(select(Blob).order_by(Blob.sha256)).all()


def find_blobs(s: Session, text: str) -> Sequence[Blob]:
    """Blobs a user-supplied hash names: a sha256 (or its prefix, e.g. AutoV2), AutoV3, or the
    sshs_model_hash the file's metadata carried."""
    text = text.strip().lower()
    if not text or not all(c in "0123456789abcdef" for c in text):
        return []
    return s.scalars(
        select(Blob)
        .where(
            or_(
                Blob.sha256.startswith(text, autoescape=True),
                Blob.autov3 == text,
                Blob.data_sha256 == text,
                Blob.sshs_model_hash == text,
            )
        )
        .order_by(Blob.sha256)
    ).all()


def find_hashes(s: Session, query: Query) -> list[HashHit]:
    """Every recorded hash that `query.prefix` begins: the stored blobs' own (sha256, addnet,
    sshs_model_hash, sshs_legacy_hash, BLAKE3) and the sidecars' claims, each with its kind."""
    prefix = query.prefix

    def begins(column: Any) -> Any:
        return func.lower(column).startswith(prefix, autoescape=True)

    hits: list[HashHit] = []
    columns = (("sha256", Blob.sha256), ("addnet", Blob.data_sha256), ("sshs_model_hash", Blob.sshs_model_hash),
               ("sshs_legacy_hash", Blob.sshs_legacy_hash), ("blake3", Blob.blake3))  # fmt: skip
    blobs = s.scalars(select(Blob).where(or_(*(begins(c) for _, c in columns))).order_by(Blob.sha256)).all()
    for blob in blobs:
        for column, _ in columns:
            value = getattr(blob, "data_sha256" if column == "addnet" else column)
            kind = blob_kind(column, prefix)
            if value and value.lower().startswith(prefix) and query.allows(kind):
                hits.append(HashHit(kind, value.lower(), blob.sha256))
    claims = s.scalars(select(ClaimedHash).where(begins(ClaimedHash.value)).order_by(ClaimedHash.id)).all()
    for c in claims:
        kind = blob_kind(c.kind, prefix)  # a claimed sha256 found by its first 10 digits is an AutoV2
        if query.allows(kind):
            hits.append(HashHit(kind, c.value, None, c.lora_id, c.source))
    return hits


def blobs_without_blake3(s: Session) -> int:
    return s.scalar(select(func.count()).select_from(Blob).where(Blob.blake3.is_(None))) or 0


# -- claimed hashes (lorad.library.sidecars) ----------------------------------------------------------------


def claims_of(s: Session, lora_id: int) -> set[tuple[str, str, str]]:
    """(kind, value, source) of every hash recorded as claimed for a LoRA."""
    rows = s.execute(select(ClaimedHash.kind, ClaimedHash.value, ClaimedHash.source).where(ClaimedHash.lora_id == lora_id))
    return {(k, v, src) for k, v, src in rows}


def add_claims(s: Session, lora_id: int, claims: Iterable[tuple[str, str, str]]) -> int:
    """Record (kind, value, source) claims not recorded yet; how many were new."""
    known = claims_of(s, lora_id)
    new = [c for c in dict.fromkeys(claims) if c not in known]
    s.add_all(ClaimedHash(lora_id=lora_id, kind=k, value=v, source=src) for k, v, src in new)
    s.flush()
    return len(new)


def live_job_blobs(s: Session) -> set[str]:
    """Blobs a pending or running job is about to read (a tree's entries too)."""
    return with_entries(s, set(s.scalars(select(Job.blob_sha256).where(Job.state.in_(("pending", "running"))))))


def blobs_of_variants(s: Session, excluding: Iterable[int] = ()) -> set[str]:
    """The blobs variants name, and the entries of those that are trees."""
    query = select(Variant.blob_sha256)
    excluded = list(excluding)
    if excluded:
        query = query.where(Variant.id.not_in(excluded))
    return with_entries(s, set(s.scalars(query)))


def variants_with_blob(s: Session, sha256: str) -> Sequence[Variant]:
    """Variants whose bytes are this blob, or whose folder holds it as one of its files."""
    trees = select(TreeEntry.tree_sha256).where(TreeEntry.blob_sha256 == sha256)
    query = select(Variant).where(or_(Variant.blob_sha256 == sha256, Variant.blob_sha256.in_(trees)))
    return s.scalars(query.order_by(Variant.id)).all()


# -- trees (folder blobs) --------------------------------------------------------------------------


def add_tree_entries(s: Session, tree_sha256: str, entries: Iterable[tuple[str, str, int]]) -> None:
    """Record a tree's (name, blob sha256, mode) entries, once (a known tree keeps its rows)."""
    if s.scalar(select(func.count()).select_from(TreeEntry).where(TreeEntry.tree_sha256 == tree_sha256)):
        return
    s.add_all(TreeEntry(tree_sha256=tree_sha256, name=name, blob_sha256=sha, mode=mode) for name, sha, mode in entries)
    s.flush()


def tree_entries(s: Session, tree_sha256: str) -> list[tuple[str, str, int]]:
    """(name, blob sha256, mode) of a tree's entries, by name."""
    rows = s.execute(select(TreeEntry.name, TreeEntry.blob_sha256, TreeEntry.mode)
                     .where(TreeEntry.tree_sha256 == tree_sha256).order_by(TreeEntry.name))  # fmt: skip
    return [(name, sha, mode) for name, sha, mode in rows]


def with_entries(s: Session, shas: set[str]) -> set[str]:
    """`shas` and every entry of those that are trees: what a live tree keeps alive."""
    if not shas:
        return shas
    entries = set(s.scalars(select(TreeEntry.blob_sha256).where(TreeEntry.tree_sha256.in_(list(shas)))))
    return shas | entries


# -- variants --------------------------------------------------------------------------------------


def variants_of(s: Session, lora_id: int) -> Sequence[Variant]:
    return s.scalars(select(Variant).where(Variant.lora_id == lora_id).order_by(Variant.id)).all()


def variant_with_blob(s: Session, lora_id: int, sha256: str) -> Variant | None:
    return s.scalar(
        select(Variant).where(Variant.lora_id == lora_id, Variant.blob_sha256 == sha256)
    )


def add_original(s: Session, lora: Lora, sha256: str) -> Variant:
    variant = Variant(lora_id=lora.id, blob_sha256=sha256, kind="original")
    s.add(variant)
    s.flush()
    return variant


def original_with_blob(s: Session, lora: Lora, sha256: str) -> Variant:
    """The lora's variant holding these bytes, recorded as a new original if it has none."""
    return variant_with_blob(s, lora.id, sha256) or add_original(s, lora, sha256)


def record_reduction(s: Session, lora_id: int, sha256: str, size: int, source_id: int, report: Report,
                     actor: str) -> Variant:  # fmt: skip
    """The reduced variant of `lora_id` whose bytes are the (recorded) blob `sha256`, made from
    variant `source_id` as `report` says; added with its "reduced" event unless it exists."""
    variant = variant_with_blob(s, lora_id, sha256)
    if variant is not None:
        return variant
    lora, source = s.get(Lora, lora_id), s.get(Variant, source_id)
    assert lora is not None and source is not None
    variant = add_reduced(s, lora, sha256, source, report)
    record_event(s, "reduced", actor, lora_id, variant.id, method=report.method, param=report.param, sha256=sha256,
                 bytes=size, source_variant=source_id, fro_retained_mean=report.fro_retained_mean)  # fmt: skip
    return variant


def add_reduced(s: Session, lora: Lora, sha256: str, source: Variant, report: Report) -> Variant:
    output_bytes = report.output.bytes if report.output else None
    variant = Variant(
        lora_id=lora.id,
        blob_sha256=sha256,
        kind="reduced",
        source_variant_id=source.id,
        method=report.method,
        param=report.param,
        fro_retained_mean=report.fro_retained_mean,
        fro_retained_min=report.fro_retained_min,
        params_in=report.params_in,
        params_out=report.params_out,
        bytes_in=report.input.bytes,
        bytes_out=output_bytes,
        seconds=report.seconds,
        device=report.device,
        fro_retained_file=report.fro_retained_file,
        serve=report.serve,
        rank_rule=report.rank_rule,
        # A report that crossed a process boundary (the worker's reduction child) carries its
        # spectra as plain dicts, not Spectrum objects.
        details={"notes": list(report.notes),
                 "spectra": [asdict(sp) if is_dataclass(sp) else dict(sp) for sp in report.spectra]},  # type: ignore[arg-type]
    )
    s.add(variant)
    s.flush()
    s.add_all(
        ModuleMetric(
            variant_id=variant.id,
            name=m.name,
            kind=m.kind,
            rank_in=m.rank_in,
            rank_out=m.rank_out,
            fro_retained=m.fro_retained,
            rel_error=m.rel_error,
            params_in=m.params_in,
            params_out=m.params_out,
            skipped=m.skipped,
        )
        for m in report.modules
    )
    s.flush()
    return variant


def module_metrics_of(s: Session, variant_id: int) -> Sequence[ModuleMetric]:
    return s.scalars(
        select(ModuleMetric).where(ModuleMetric.variant_id == variant_id).order_by(ModuleMetric.id)
    ).all()


def record_effect(s: Session, variant_id: int, reference_id: int | None, figures: Any, actor: str) -> VariantEffect:
    """Record a measurement (lorad.library.effects.Figures) of a variant; one on the same base
    model and sample set as an earlier one replaces it."""
    row = s.scalar(select(VariantEffect).where(
        VariantEffect.variant_id == variant_id, VariantEffect.base_sha256 == figures.base_sha256,
        VariantEffect.samples_id == figures.samples_id))  # fmt: skip
    if row is None:
        row = VariantEffect(variant_id=variant_id, base_sha256=figures.base_sha256, samples_id=figures.samples_id)
        s.add(row)
    row.reference_variant_id = reference_id
    row.kind = figures.kind
    row.effect_retained = figures.effect_retained
    row.effect_retained_min = figures.effect_retained_min
    row.per_sample = list(figures.per_sample)
    row.kl_mean = figures.kl_mean
    row.samples = figures.samples
    row.base = figures.base
    row.seconds = figures.seconds
    row.actor = actor
    row.measured_at = utcnow()
    s.flush()
    return row


def effects_of(s: Session, variant_ids: Iterable[int]) -> Sequence[VariantEffect]:
    """Every measurement of these variants, the latest first."""
    ids = list(variant_ids)
    if not ids:
        return []
    query = select(VariantEffect).where(VariantEffect.variant_id.in_(ids))
    return s.scalars(query.order_by(VariantEffect.measured_at.desc(), VariantEffect.id.desc())).all()


def delete_variants(s: Session, variant_ids: Iterable[int]) -> None:
    # module_metrics and variant_effects cascade; events, jobs and source links are set to NULL by the database.
    for variant in s.scalars(select(Variant).where(Variant.id.in_(list(variant_ids)))).all():
        s.delete(variant)
    s.flush()


def delete_blob_rows(s: Session, sha256s: Iterable[str]) -> None:
    doomed = list(sha256s)
    # A tree's entry rows go with it (they name the tree); entries' own blobs are separate rows.
    for entry in s.scalars(select(TreeEntry).where(TreeEntry.tree_sha256.in_(doomed))).all():
        s.delete(entry)
    s.flush()
    for blob in s.scalars(select(Blob).where(Blob.sha256.in_(doomed))).all():
        s.delete(blob)
    s.flush()


# -- refusals --------------------------------------------------------------------------------------


def refusal_at(s: Session, path: str) -> Refusal | None:
    return s.scalar(select(Refusal).where(Refusal.path == path))


def all_refusals(s: Session) -> Sequence[Refusal]:
    return s.scalars(select(Refusal).order_by(Refusal.path)).all()


def refusal_counts(s: Session) -> dict[str, int]:
    """How many paths are refused, by cause (one GROUP BY: the metrics scrape's figure)."""
    return {cause: n for cause, n in s.execute(select(Refusal.cause, func.count()).group_by(Refusal.cause)).all()}


def record_refusal(s: Session, path: str, cause: str, reason: str, stamp: str | None) -> Refusal:
    """One row per path: a new cause or reason replaces the old one (first_seen is kept when the
    cause stays the same)."""
    now = utcnow()
    row = refusal_at(s, path)
    if row is None:
        row = Refusal(path=path, cause=cause, reason=reason, file_stamp=stamp, first_seen=now, last_seen=now)
        s.add(row)
    else:
        if row.cause != cause:
            row.first_seen = now
        row.cause, row.reason, row.file_stamp, row.last_seen = cause, reason, stamp, now
    s.flush()
    return row


def clear_refusal(s: Session, path: str) -> bool:
    row = refusal_at(s, path)
    if row is None:
        return False
    s.delete(row)
    s.flush()
    return True


def prune_refusals(s: Session, keep: Iterable[str], roots: Iterable[str] | None = None) -> list[str]:
    """Forget the refusals of every path not in `keep` (the paths a full scan still found), of
    every folder or, given `roots`, of the paths in those folders only (a fleet node scans the
    folders it watches)."""
    kept = set(keep)
    within = None if roots is None else tuple(r.rstrip("/") + "/" for r in roots)
    gone = [r for r in s.scalars(select(Refusal)).all()
            if r.path not in kept and (within is None or r.path.startswith(within))]  # fmt: skip
    for row in gone:
        s.delete(row)
    s.flush()
    return [r.path for r in gone]


# -- events ----------------------------------------------------------------------------------------


def record_event(
    s: Session,
    kind: str,
    actor: str,
    lora_id: int | None = None,
    variant_id: int | None = None,
    **detail: Any,
) -> Event:
    event = Event(kind=kind, actor=actor, lora_id=lora_id, variant_id=variant_id, detail=detail)
    s.add(event)
    s.flush()
    return event


def events(
    s: Session, lora_id: int | None = None, since: datetime | None = None, limit: int | None = None
) -> Sequence[Event]:
    query = select(Event).order_by(Event.id)
    if lora_id is not None:
        query = query.where(Event.lora_id == lora_id)
    if since is not None:
        query = query.where(Event.at >= since)
    if limit is not None:
        query = query.order_by(None).order_by(Event.id.desc()).limit(limit)
        return list(reversed(s.scalars(query).all()))
    return s.scalars(query).all()
