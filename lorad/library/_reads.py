"""The Library's reads: LoRA views, the list's pages and totals, hash lookups, events and module
metrics. They write only to remember the ranks of blobs stored before lorad recorded them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from lorad.engine.formats.safetensors_file import read_header
from lorad.errors import LoradError
from lorad.library import folders, listing, trees
from lorad.library._refs import LoraRef, Refs
from lorad.library.core import header_ranks
from lorad.library.db import repo
from lorad.library.db.models import Blob, Lora, Variant
from lorad.library.db.session import Database, DatabaseUnavailable
from lorad.library.hashes import HashHit, claim_names, parse_query
from lorad.library.records import EventView, FindResult, HashMatch, LoraView, event_view, lora_view, lora_views
from lorad.library.store import Store


class Reads:
    def __init__(self, db: Database, store: Store, refs: Refs) -> None:
        self.db, self.store, self.refs = db, store, refs

    def loras(self, ids: Sequence[int] | None = None) -> list[LoraView]:
        return self._views(lambda s: ids)

    def lora(self, ref: LoraRef) -> LoraView:
        return self._views(lambda s: [self.refs.find_lora(s, ref).id])[0]

    def _views(self, ids_of: Callable[[Session], Sequence[int] | None]) -> list[LoraView]:
        learned: dict[str, tuple[int, ...]] = {}

        def header_ranks(s: Session, sha256: str) -> tuple[int, ...] | None:
            ranks = self._header_ranks(s, sha256)
            if ranks is not None:
                learned[sha256] = ranks
            return ranks

        with self.db.read() as s:
            views = lora_views(s, ids_of(s), header_ranks)
        if learned:  # blobs stored before lorad recorded ranks: their headers are read once
            with contextlib.suppress(DatabaseUnavailable):  # (else read again next time)
                with self.db.write() as s:
                    repo.set_blob_ranks(s, learned)
        return views

    def _header_ranks(self, s: Session, sha256: str) -> tuple[int, ...] | None:
        """The LoRA module ranks a stored file (or a tree's weights) has, from its header."""
        blob = s.get(Blob, sha256)
        if blob is not None and blob.kind == "tree":
            sha256 = folders.weights_of(s, sha256) or ""
        try:
            return header_ranks(read_header(self.store.path_of(sha256)))
        except (LoradError, OSError):
            return None

    def list_page(self, refused: Sequence[listing.Refused] = (), **query: Any) -> listing.Page:
        with self.db.read() as s:
            page = listing.page(s, refused, **query)
        unknown = [e.id for e in page.entries if e.brief and e.brief.active_id is not None and e.brief.active_ranks is None]
        if not unknown:
            return page
        views = {v.id: v for v in self.loras(unknown)}
        entries = []
        for e in page.entries:
            active = views[e.id].active if e.id in views else None
            if e.brief and active is not None and e.brief.active_ranks is None:
                e = replace(e, brief=replace(e.brief, active_ranks=active.ranks))
            entries.append(e)
        return replace(page, entries=tuple(entries))

    def totals(self) -> listing.Totals:
        with self.db.read() as s:
            return listing.totals(s)

    def holds_folder(self, path: str | os.PathLike[str]) -> bool:
        with self.db.read() as s:
            row = repo.lora_by_path(s, os.path.realpath(path))
            stamp = row.file_stamp if row is not None and row.kind == "folder" else None
        return stamp is not None and trees.stamp_of(Path(path)) == stamp

    def original_sha256(self, lora_id: int) -> str | None:
        with self.db.read() as s:
            row = s.get(Lora, lora_id)
            original = s.get(Variant, row.original_variant_id) if row and row.original_variant_id else None
            return original.blob_sha256 if original is not None else None

    def tree_entries(self, sha256: str) -> list[tuple[str, str, int]] | None:
        with self.db.read() as s:
            blob = s.get(Blob, sha256)
            return repo.tree_entries(s, sha256) if blob is not None and blob.kind == "tree" else None

    def events(self, lora: LoraRef | None = None, limit: int | None = None) -> list[EventView]:
        with self.db.read() as s:
            lora_id = self.refs.find_lora(s, lora).id if lora is not None else None
            return [event_view(e) for e in repo.events(s, lora_id=lora_id, limit=limit)]

    def find_hash(self, hash_text: str) -> FindResult:
        query = parse_query(hash_text)
        with self.db.read() as s:
            groups: dict[tuple[int, int | None], list[HashHit]] = {}
            for hit in repo.find_hashes(s, query):
                if hit.claimed:
                    lora_id = hit.lora_id
                    assert lora_id is not None
                    hit, variant_id = self._claimed_variant(s, lora_id, hit)
                    groups.setdefault((lora_id, variant_id), []).append(hit)
                    continue
                assert hit.blob_sha256 is not None
                for v in repo.variants_with_blob(s, hit.blob_sha256):
                    groups.setdefault((v.lora_id, v.id), []).append(hit)
            views: dict[int, LoraView] = {}
            matches = []
            order = sorted(groups, key=lambda k: (k[0], k[1] is None, k[1] or 0))  # claims after the bytes
            for lora_id, variant_id in order:
                if lora_id not in views:
                    row = s.get(Lora, lora_id)
                    assert row is not None
                    views[lora_id] = lora_view(s, row)
                matches.append(HashMatch(views[lora_id], variant_id, tuple(groups[lora_id, variant_id])))
            return FindResult(query.prefix, tuple(matches), repo.blobs_without_blake3(s))

    @staticmethod
    def _claimed_variant(s: Session, lora_id: int, hit: HashHit) -> tuple[HashHit, int | None]:
        """The LoRA's variant whose bytes a claimed hash names, if lorad holds one."""
        for v in repo.variants_of(s, lora_id):
            blob = s.get(Blob, v.blob_sha256)
            if blob is not None and claim_names(hit.kind, hit.value, blob.sha256, blob.data_sha256, blob.blake3):
                return replace(hit, blob_sha256=blob.sha256), v.id
        return hit, None

    def module_metrics(self, variant_id: int) -> list[dict[str, Any]]:
        with self.db.read() as s:
            return [
                {c: getattr(m, c) for c in ("name", "kind", "rank_in", "rank_out", "fro_retained",
                                            "rel_error", "params_in", "params_out", "skipped")}
                for m in repo.module_metrics_of(s, variant_id)
            ]  # fmt: skip
