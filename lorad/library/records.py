"""What the library returns: frozen, plain views of its records (no session, no ORM objects).

The daemon's control methods and the CLI turn these into JSON and tables.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Text, func, select, type_coerce
from sqlalchemy.orm import Session

from lorad.engine.reduce.rank_rules import servers_met
from lorad.library.db import repo
from lorad.library.db.models import Blob, Event, Lora, ModuleMetric, Refusal, Variant, VariantEffect
from lorad.library.hashes import HashHit

# The module ranks of a stored blob (a file's, or a tree's weights), read from its header.
HeaderRanks = Callable[[Session, str], "tuple[int, ...] | None"]


@dataclass(frozen=True)
class EffectView:
    """A variant's measured effect on a base model (lorad.library.effects): effect_retained is the
    mean over the samples of 1 - ||effect_variant - effect_reference|| / ||effect_reference||,
    effect_retained_min the worst sample's."""

    variant_id: int
    reference_variant_id: int | None  # the variant it was compared with (the one it was made from)
    kind: str  # "denoiser" | "logits"
    effect_retained: float
    effect_retained_min: float
    kl_mean: float | None
    samples_id: str
    base: str
    base_sha256: str
    seconds: float | None
    measured_at: datetime
    per_sample: tuple[float, ...] = ()
    samples: dict[str, Any] | None = None  # the sample set (left out of list views)


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
    fro_retained_file: float | None = None  # the whole file's, each module weighted by its energy
    fro_retained_mean: float | None = None  # the mean over modules
    fro_retained_min: float | None = None  # the weakest module's
    params_in: int | None = None
    params_out: int | None = None
    serve: str | None = None  # the server whose rank rules it was made for (policy `serve`)
    rank_rule: str | None = None  # the rank rule it was made under, described
    ranks: tuple[int, ...] | None = None  # its LoRA modules' ranks (None: not known)
    effect: EffectView | None = None  # its latest effect measurement (None: never measured)

    @property
    def servers(self) -> tuple[str, ...] | None:
        """The serving hosts whose rank rules it meets as it is (lorad.engine.reduce.rank_rules)."""
        return None if self.ranks is None else servers_for(self.ranks)


@functools.lru_cache(maxsize=1024)
def servers_for(ranks: tuple[int, ...]) -> tuple[str, ...]:
    """Memoised: a library of thousands has a handful of rank patterns, and `list` asks of each."""
    return tuple(servers_met(ranks))


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
        for v in self.variants:
            if v.id == variant_id:
                return v
        return None

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
    # What is wrong with the store's identity (lorad.library.store_identity): store_dir no longer
    # holds the database's store (an unmounted share). Then nothing else was checked or touched.
    store_identity: str | None = None

    @property
    def ok(self) -> bool:
        """True when every record has its bytes (after repairs) in the store the records describe."""
        lost = set(self.corrupt) | set(self.missing)
        return not (lost - set(self.repaired)) and self.store_identity is None


@dataclass(frozen=True)
class GcPlan:
    variants: tuple[int, ...]  # reduced variants to forget
    blobs: tuple[tuple[str, int], ...]  # (sha256, bytes) to delete from the store
    stray: tuple[tuple[str, int], ...]  # unrecorded store files past the grace period
    executed: bool = False
    skipped: str | None = None  # why nothing was done: another node of the fleet holds gc

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
        fro_retained_file=v.fro_retained_file,
        fro_retained_mean=v.fro_retained_mean,
        fro_retained_min=v.fro_retained_min,
        params_in=v.params_in,
        params_out=v.params_out,
        serve=v.serve,
        rank_rule=v.rank_rule,
        ranks=ranks,
    )


def lora_view(s: Session, lora: Lora, header_ranks: HeaderRanks | None = None) -> LoraView:
    return lora_views(s, [lora.id], header_ranks)[0]


# SQLite allows 32766 bound values per statement (999 before 3.32): ids are asked for in chunks.
CHUNK = 900


def lora_views(s: Session, ids: Sequence[int] | None = None, header_ranks: HeaderRanks | None = None) -> list[LoraView]:
    """The views of the LoRAs `ids` (None: all), in that order (all: by id), in a few queries
    whatever their number: a library of thousands is listed without one query per LoRA.

    A variant's module ranks: as recorded for its blob (from its header when stored); for a blob
    stored before lorad recorded them, a reduction's from its metrics (rank_out), an original's from
    the metrics of a reduction made from it (their rank_in), else `header_ranks` is asked (the
    library reads the header once, and records what it read).
    """
    db = s.connection()  # plain Core rows: the ORM's result machinery doubles the cost of thousands
    query = (select(*_LORA_COLUMNS, *(_column(name) for name in _FIELDS))
             .outerjoin(Refusal, Refusal.path == Lora.path).outerjoin(Variant, Variant.lora_id == Lora.id)
             .outerjoin(Blob, Blob.sha256 == Variant.blob_sha256).order_by(Lora.id, Variant.id))  # fmt: skip
    queries = [query] if ids is None else [query.where(Lora.id.in_(chunk)) for chunk in _chunks(ids)]
    loras: dict[int, tuple[Any, list[list[Any]]]] = {}  # id: (its own columns, its variants' rows)
    for q in queries:
        for row in db.execute(q):
            lora_id = row[0]
            if lora_id not in loras:
                loras[lora_id] = (row[:_LORA_WIDTH], [])
            if row[_LORA_WIDTH] is not None:  # (a LoRA with no variant yet: none)
                loras[lora_id][1].append(list(row[_LORA_WIDTH:]))
    metrics = _metric_ranks(db, [v[_ID] for _, rows in loras.values() for v in rows if _needs_metrics(v, rows)])
    effects = latest_effects(db, None if ids is None else [v[_ID] for _, rows in loras.values() for v in rows])
    folders: dict[str, Path] = {}  # a few watched roots, shared by thousands of LoRAs
    read: dict[str, tuple[int, ...] | None] = {}
    views = []
    for lora_id in loras if ids is None else (i for i in ids if i in loras):
        (_, path, folder, policy, active_id, original_id, kind, mirror, *refusal), rows = loras[lora_id]
        variant_views = []
        for v in rows:
            ranks = _ranks(v, rows, metrics)
            if ranks is None and v[_KIND] == "original" and header_ranks is not None:
                sha = v[_BLOB]
                if sha not in read:
                    read[sha] = header_ranks(s, sha)
                ranks = read[sha]
            v[_RANKS] = ranks
            variant_views.append(VariantView(*v, effect=effects.get(v[_ID])))
        if folder not in folders:
            folders[folder] = Path(folder)
        refused_since = refusal[2]
        views.append(LoraView(
            id=lora_id, path=Path(path), folder=folders[folder], policy=policy, active_variant_id=active_id,
            original_variant_id=original_id, variants=tuple(variant_views),
            refused=RefusalView(Path(path), *refusal, lora_id) if refused_since is not None else None,
            kind=kind, mirror=Path(mirror) if mirror else None,
        ))  # fmt: skip
    return views


_LORA_COLUMNS = (Lora.id, Lora.path, Lora.folder, Lora.policy, Lora.active_variant_id, Lora.original_variant_id,
                 Lora.kind, Lora.mirror_path, Refusal.cause, Refusal.reason, Refusal.first_seen, Refusal.last_seen)  # fmt: skip
_LORA_WIDTH = len(_LORA_COLUMNS)
# A variant view's fields are Variant's columns of the same names, but for its blob's bytes and
# ranks (its own as recorded for the blob, until _ranks says better); `details` (spectra, notes:
# the report's) stays in the database. Selected in the view's field order, so a row makes a view.
_FIELDS = tuple(f.name for f in fields(VariantView) if f.name != "effect")  # (effects: latest_effects)
_ID, _KIND, _BLOB, _SOURCE, _RANKS = (_FIELDS.index(n) for n in ("id", "kind", "blob_sha256", "source_variant_id", "ranks"))


def _column(name: str) -> Any:
    if name == "bytes":
        return func.coalesce(Blob.bytes, 0)
    if name == "ranks":  # as stored: a library has few distinct ones, each parsed once (blob_ranks)
        return type_coerce(Blob.ranks, Text)
    return getattr(Variant, name)


@functools.lru_cache(maxsize=1024)
def _parsed_ranks(text: str) -> tuple[int, ...]:
    return tuple(json.loads(text))


def blob_ranks(stored: Any) -> tuple[int, ...] | None:
    """Blob.ranks as read past its JSON type: text from SQLite, a list where the driver decodes
    JSON itself (psycopg)."""
    if stored is None:
        return None
    return _parsed_ranks(stored) if isinstance(stored, str) else tuple(stored)


def _metric_ranks(db: Connection, variant_ids: Sequence[int]) -> dict[int, tuple[list[int], list[int]]]:
    """Per reduced variant: its modules' (rank_in, rank_out), each list in module order."""
    found: dict[int, tuple[list[int], list[int]]] = {}
    for chunk in _chunks(variant_ids):
        query = (select(ModuleMetric.variant_id, ModuleMetric.rank_in, ModuleMetric.rank_out)
                 .where(ModuleMetric.variant_id.in_(chunk)).order_by(ModuleMetric.id))  # fmt: skip
        for variant_id, rank_in, rank_out in db.execute(query):
            ins, outs = found.setdefault(variant_id, ([], []))
            ins.append(rank_in)
            outs.append(rank_out)
    return found


def _needs_metrics(v: list[Any], rows: list[list[Any]]) -> bool:
    """A reduction whose ranks are asked of its metrics: its own blob's are not recorded, or those
    of the original it was made from are not (its rank_in tells them)."""
    if v[_KIND] != "reduced":
        return False
    return v[_RANKS] is None or any(o[_ID] == v[_SOURCE] and o[_RANKS] is None for o in rows)


def _ranks(v: list[Any], rows: list[list[Any]], metrics: dict[int, tuple[list[int], list[int]]]) -> tuple[int, ...] | None:
    if v[_RANKS] is not None:  # recorded for its blob when stored (from its header): no metric needed
        return blob_ranks(v[_RANKS])
    if v[_KIND] == "reduced":
        return tuple(r for r in metrics[v[_ID]][1] if r > 0) if v[_ID] in metrics else None
    for child in rows:
        if child[_SOURCE] == v[_ID] and child[_KIND] == "reduced" and child[_ID] in metrics:
            return tuple(r for r in metrics[child[_ID]][0] if r > 0)
    return blob_ranks(v[_RANKS])


_EFFECT_COLUMNS = (VariantEffect.variant_id, VariantEffect.reference_variant_id, VariantEffect.kind,
                   VariantEffect.effect_retained, VariantEffect.effect_retained_min, VariantEffect.kl_mean,
                   VariantEffect.samples_id, VariantEffect.base, VariantEffect.base_sha256, VariantEffect.seconds,
                   VariantEffect.measured_at)  # fmt: skip


def latest_effects(db: Connection | Session, variant_ids: Sequence[int] | None = None) -> dict[int, EffectView]:
    """The latest effect measurement of each of `variant_ids` (None: of every variant) that has
    one, without its sample set."""
    query = select(*_EFFECT_COLUMNS).order_by(VariantEffect.measured_at, VariantEffect.id)
    queries = [query] if variant_ids is None else [query.where(VariantEffect.variant_id.in_(c)) for c in _chunks(variant_ids)]
    found: dict[int, EffectView] = {}
    for q in queries:
        for row in db.execute(q):
            found[row[0]] = EffectView(*row)  # in measurement order: the latest stays
    return found


def effect_view(e: VariantEffect, with_samples: bool = True) -> EffectView:
    samples = json.loads(e.samples) if with_samples and e.samples else None
    return EffectView(e.variant_id, e.reference_variant_id, e.kind, e.effect_retained, e.effect_retained_min,
                      e.kl_mean, e.samples_id, e.base, e.base_sha256, e.seconds, e.measured_at,
                      tuple(e.per_sample or ()), samples)  # fmt: skip


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]


def refusal_view(s: Session, r: Refusal, lora_id: int | None = None) -> RefusalView:
    if lora_id is None:
        lora = repo.lora_by_path(s, r.path)
        lora_id = lora.id if lora is not None else None
    return RefusalView(Path(r.path), r.cause, r.reason, r.first_seen, r.last_seen, lora_id)


def event_view(e: Event) -> EventView:
    return EventView(e.id, e.at, e.kind, e.actor, e.lora_id, e.variant_id, dict(e.detail or {}))
