"""What the library returns: frozen, plain views of its records (no session, no ORM objects).

The daemon's control methods and the CLI turn these into JSON and tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from lorad.engine.reduce.rank_rules import servers_met
from lorad.library.db import repo
from lorad.library.db.models import Blob, Event, Lora, Refusal, Variant
from lorad.library.hashes import HashHit

# The module ranks of a stored blob (a file's, or a tree's weights), read from its header.
HeaderRanks = Callable[[Session, str], "tuple[int, ...] | None"]


@dataclass(frozen=True)
class VariantView:
    id: int
    lora_id: int
    kind: str  # "original" | "reduced"
    blob_sha256: str
    bytes: int
    created_at: datetime
    method: str | None = None
    param: float | None = None
    source_variant_id: int | None = None
    fro_retained_mean: float | None = None
    fro_retained_min: float | None = None
    params_in: int | None = None
    params_out: int | None = None
    serve: str | None = None  # the server whose rank rules it was made for (policy `serve`)
    rank_rule: str | None = None  # the rank rule it was made under, described
    ranks: tuple[int, ...] | None = None  # its LoRA modules' ranks (None: not known)

    @property
    def servers(self) -> tuple[str, ...] | None:
        """The serving hosts whose rank rules it meets as it is (lorad.engine.reduce.rank_rules)."""
        return None if self.ranks is None else tuple(servers_met(self.ranks))


@dataclass(frozen=True)
class RefusalView:
    """A watched path lorad will not take as it is (lorad.library.refusals), and since when."""

    path: Path
    cause: str
    reason: str
    first_seen: datetime
    last_seen: datetime
    lora_id: int | None = None  # the LoRA recorded at this path, when there is one


@dataclass(frozen=True)
class LoraView:
    id: int
    path: Path
    folder: Path
    policy: str | None
    active_variant_id: int | None
    original_variant_id: int | None
    variants: tuple[VariantView, ...]
    refused: RefusalView | None = None  # its file, as it is now, cannot be read (a FIFO...)
    kind: str = "file"  # "folder": a PEFT adapter folder, its variants folder trees
    mirror: Path | None = None  # mirror mode: where the active variant is (the path keeps the original)

    def variant(self, variant_id: int | None) -> VariantView | None:
        return next((v for v in self.variants if v.id == variant_id), None)

    @property
    def active(self) -> VariantView | None:
        return self.variant(self.active_variant_id)

    @property
    def original(self) -> VariantView | None:
        return self.variant(self.original_variant_id)


@dataclass(frozen=True)
class EventView:
    id: int
    at: datetime
    kind: str
    actor: str
    lora_id: int | None
    variant_id: int | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class HashMatch:
    """A LoRA one of whose variants (or whose sidecars) has the hash a `find` asked for."""

    lora: LoraView
    variant_id: int | None  # the variant with those bytes; None: a sidecar's claim no variant matches
    hits: tuple[HashHit, ...]  # which hashes matched, and of what kind

    @property
    def variant(self) -> VariantView | None:
        return self.lora.variant(self.variant_id)


@dataclass(frozen=True)
class FindResult:
    query: str  # the hex prefix searched for
    matches: tuple[HashMatch, ...]
    blake3_pending: int = 0  # stored blobs with no BLAKE3 yet (`lorad verify` computes them)


@dataclass(frozen=True)
class Reconciled:
    lora_id: int
    path: Path
    from_variant: int | None
    to_variant: int
    new_original: bool  # the file held bytes lorad had never stored


@dataclass(frozen=True)
class VerifyReport:
    blobs_checked: int
    corrupt: tuple[str, ...] = ()  # quarantined to bad/
    missing: tuple[str, ...] = ()  # recorded, but not in the store
    repaired: tuple[str, ...] = ()  # re-stored from a watched file with the same bytes
    stray: tuple[str, ...] = ()  # in the store, but not recorded (gc removes them)
    reconciled: tuple[Reconciled, ...] = ()
    missing_files: tuple[Path, ...] = ()  # watched paths that are gone (never recreated)
    unsettled: tuple[Path, ...] = ()  # watched files not (yet) complete safetensors
    refused: tuple[tuple[Path, str], ...] = ()  # (path, reason): no regular file, or unreadable
    temp_removed: tuple[Path, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every record has its bytes (after repairs)."""
        lost = set(self.corrupt) | set(self.missing)
        return not (lost - set(self.repaired))


@dataclass(frozen=True)
class GcPlan:
    variants: tuple[int, ...]  # reduced variants to forget
    blobs: tuple[tuple[str, int], ...]  # (sha256, bytes) to delete from the store
    stray: tuple[tuple[str, int], ...]  # unrecorded store files past the grace period
    executed: bool = False

    @property
    def bytes_freed(self) -> int:
        return sum(n for _, n in self.blobs) + sum(n for _, n in self.stray)


def variant_view(v: Variant, blob_bytes: int, ranks: tuple[int, ...] | None = None) -> VariantView:
    return VariantView(
        id=v.id,
        lora_id=v.lora_id,
        kind=v.kind,
        blob_sha256=v.blob_sha256,
        bytes=blob_bytes,
        created_at=v.created_at,
        method=v.method,
        param=v.param,
        source_variant_id=v.source_variant_id,
        fro_retained_mean=v.fro_retained_mean,
        fro_retained_min=v.fro_retained_min,
        params_in=v.params_in,
        params_out=v.params_out,
        serve=v.serve,
        rank_rule=v.rank_rule,
        ranks=ranks,
    )


def _ranks(s: Session, v: Variant, rows: list[Variant], header_ranks: HeaderRanks | None) -> tuple[int, ...] | None:
    """A variant's module ranks: a reduction's from its metrics; an original's from the metrics of
    a reduction made from it (their rank_in), else from its header."""
    if v.kind == "reduced":
        metrics = repo.module_metrics_of(s, v.id)
        return tuple(m.rank_out for m in metrics if m.rank_out > 0) if metrics else None
    for child in rows:
        if child.source_variant_id == v.id and child.kind == "reduced":
            metrics = repo.module_metrics_of(s, child.id)
            if metrics:
                return tuple(m.rank_in for m in metrics if m.rank_in > 0)
    return header_ranks(s, v.blob_sha256) if header_ranks is not None else None


def lora_view(s: Session, lora: Lora, header_ranks: HeaderRanks | None = None) -> LoraView:
    variants = []
    rows = list(repo.variants_of(s, lora.id))
    for v in rows:
        blob = s.get(Blob, v.blob_sha256)
        variants.append(variant_view(v, blob.bytes if blob else 0, _ranks(s, v, rows, header_ranks)))
    refusal = repo.refusal_at(s, lora.path)
    return LoraView(
        id=lora.id,
        path=Path(lora.path),
        folder=Path(lora.folder),
        policy=lora.policy,
        active_variant_id=lora.active_variant_id,
        original_variant_id=lora.original_variant_id,
        variants=tuple(variants),
        refused=refusal_view(s, refusal, lora.id) if refusal is not None else None,
        kind=lora.kind,
        mirror=Path(lora.mirror_path) if lora.mirror_path else None,
    )


def refusal_view(s: Session, r: Refusal, lora_id: int | None = None) -> RefusalView:
    if lora_id is None:
        lora = repo.lora_by_path(s, r.path)
        lora_id = lora.id if lora is not None else None
    return RefusalView(Path(r.path), r.cause, r.reason, r.first_seen, r.last_seen, lora_id)


def event_view(e: Event) -> EventView:
    return EventView(e.id, e.at, e.kind, e.actor, e.lora_id, e.variant_id, dict(e.detail or {}))
