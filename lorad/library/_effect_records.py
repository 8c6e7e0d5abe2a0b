"""Effect measurements of reduced variants (lorad.library.effects): the stored files a measurement
compares, and the recorded results. A reduction is always compared with the variant it was made
from (else the original), so a result recorded against any other reference is refused."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.orm import Session

from lorad.errors import StoreError
from lorad.library import effects
from lorad.library._audit import failure_recorded
from lorad.library._refs import LoraRef, Refs
from lorad.library.core import Core
from lorad.library.db import repo
from lorad.library.db.models import Lora, Variant
from lorad.library.records import EffectView, effect_view


class EffectRecords:
    def __init__(self, core: Core, refs: Refs) -> None:
        self.core, self.refs = core, refs

    def sources(self, ref: LoraRef, variant: int | None = None) -> effects.Sources:
        with self.core.db.read() as s:
            row = self.refs.find_lora(s, ref)
            all_variants = list(repo.variants_of(s, row.id))
            if variant is not None:
                chosen = self.refs.variant_of(s, row, variant)
            else:
                reduced = [v for v in all_variants if v.kind == "reduced"]
                active = next((v for v in reduced if v.id == row.active_variant_id), None)
                if active is None and not reduced:
                    raise StoreError(f"{row.path}: has no reduced variant to measure (lorad has not reduced it yet)")
                chosen = active or max(reduced, key=lambda v: v.id)
            if chosen.kind != "reduced":
                raise StoreError(f"{row.path}: variant {chosen.id} is the original; measure a reduced variant")
            reference = _reference_of(s, row, chosen)
            name = os.path.basename(row.path.rstrip("/"))
            stored = [self._stored(s, v, row.kind == "folder", name) for v in (chosen, reference)]
            return effects.Sources(row.id, Path(row.path), stored[0], stored[1])

    def _stored(self, s: Session, v: Variant, folder: bool, name: str) -> effects.Stored:
        if folder:
            entries = repo.tree_entries(s, v.blob_sha256)
            files = tuple((entry, self.core.store.path_of(sha), mode) for entry, sha, mode in entries)
        else:
            files = ((name, self.core.store.path_of(v.blob_sha256), 0o444),)
        missing = [str(p) for _, p, _ in files if not p.is_file()]
        if not files or missing:
            raise StoreError(f"variant {v.id}'s stored bytes are missing from the store ({', '.join(missing) or 'no files'}); "
                             "`lorad verify` says more")  # fmt: skip
        return effects.Stored(v.id, v.kind, v.method, v.param, v.blob_sha256, folder, name, files)

    def record(self, variant_id: int, figures: effects.Figures, reference_id: int | None, actor: str) -> EffectView:
        db = self.core.db
        with db.read() as s:
            found = s.get(Variant, variant_id)
            if found is None:
                raise StoreError(f"no variant {variant_id}")
            lora_id = found.lora_id
        with self.core.lock, failure_recorded(db, self.refs, "record_effect", actor, lora_id):
            with db.write() as s:
                variant = s.get(Variant, variant_id)
                if variant is None:
                    raise StoreError(f"no variant {variant_id}")
                row = s.get(Lora, lora_id)
                assert row is not None
                if variant.kind != "reduced":
                    raise StoreError(f"{row.path}: variant {variant_id} is the original; its effect is its own")
                reference = _reference_of(s, row, variant)
                if reference_id is not None and reference_id != reference.id:
                    raise StoreError(f"{row.path}: variant {variant_id} is compared with variant {reference.id}, "
                                     f"not {reference_id}; measure it again")  # fmt: skip
                effect = repo.record_effect(s, variant.id, reference.id, figures, actor)
                repo.record_event(s, "measured", actor, row.id, variant.id, effect_kind=figures.kind,
                                  effect_retained=figures.effect_retained, effect_retained_min=figures.effect_retained_min,
                                  base=figures.base, base_sha256=figures.base_sha256, samples_id=figures.samples_id,
                                  reference_variant=reference.id)  # fmt: skip
                return effect_view(effect)

    def of(self, ref: LoraRef) -> list[EffectView]:
        with self.core.db.read() as s:
            row = self.refs.find_lora(s, ref)
            return [effect_view(e) for e in repo.effects_of(s, [v.id for v in repo.variants_of(s, row.id)])]


def _reference_of(s: Session, row: Lora, variant: Variant) -> Variant:
    """The variant a reduction is compared with: the one it was made from, else the original."""
    for candidate in (variant.source_variant_id, row.original_variant_id):
        found = s.get(Variant, candidate) if candidate is not None else None
        if found is not None and found.lora_id == row.id and found.id != variant.id:
            return found
    raise StoreError(f"{row.path}: variant {variant.id} has no original recorded to compare it with")
