"""The library: watched LoRAs, their stored variants, and the operations on them.

It joins the blob store (bytes) and the database (records). Every operation is crash-safe in the
same way: bytes reach the store (complete or absent) before any record names them, and a watched
file is replaced by an atomic rename before the database says so. So a crash leaves the old state
or the new one; where disk and database then disagree, the file on disk is the truth and `verify`
brings the records to it: a watched file holding a known variant's bytes makes that variant active,
and one holding unknown bytes is a new original (stored, never overwritten).

Only one Library per state directory should mutate at a time (the daemon); within it, operations
are serialised by a lock. No operation opens a watched path that is not a regular file (a FIFO
would block it, and every other caller behind the lock): such a path, or one lorad cannot read, is
refused with its reason and recorded as a refusal (`refusals()`), as the watcher's refusals are.
A PEFT adapter folder is one LoRA whose variants are folder trees (lorad.library.folders); verify and gc
live in lorad.library.upkeep.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import structlog
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from lorad._atomic import is_temp_name
from lorad._fileio import check_regular
from lorad.engine.formats.safetensors_file import read_header
from lorad.engine.report import Report
from lorad.errors import LoradError, StoreError
from lorad.library import effects, folder_swap, folders, listing, store_identity, trees, upkeep
from lorad.library.core import PUT_LOCK_SPACE, Core, header_ranks
from lorad.library.db import repo
from lorad.library.db.models import Blob, Lora, Variant
from lorad.library.db.session import (
    BUSY_TIMEOUT_MS,
    Database,
    DatabaseLost,
    DatabaseUnavailable,
    default_url,
    sqlite_path,
    unreachable,
)
from lorad.library.hashes import HashHit, claim_names, parse_query
from lorad.library.reconcile import Unchanged, unchanged
from lorad.library.reconcile import reconcile as reconcile_records
from lorad.library.records import (
    EffectView,
    EventView,
    FindResult,
    GcPlan,
    HashMatch,
    LoraView,
    RefusalView,
    VariantView,
    VerifyReport,
    effect_view,
    event_view,
    lora_view,
    lora_views,
    refusal_view,
    variant_view,
)
from lorad.library.refusals import Refusal
from lorad.library.states import FileState, unchanged_token
from lorad.library.store import FILES_HASHED, BlobInfo, CorruptBlob, FileStamp, LinkMode, Store, TargetChanged, _crashpoint
from lorad.pathtext import shown
from lorad.state_dir import Modes, secure_dir, secure_sqlite

log = structlog.get_logger()

LoraRef = int | str | os.PathLike[str]
SwitchKind = Literal["activated", "reverted", "switched"]


# -- plain results ---------------------------------------------------------------------------------


def cli_actor() -> str:
    return f"cli:uid={os.getuid()}"


# -- the library -----------------------------------------------------------------------------------


class Library:
    def __init__(
        self,
        state_dir: Path,
        watched_roots: Sequence[Path],
        database_url: str | None = None,
        link_mode: LinkMode = "reflink-or-copy",
        migrate_on_open: bool = True,
        operator_gid: int | None = None,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        mirrors: Mapping[Path, Path] | None = None,
        store_dir: Path | None = None,
        check_store_identity: bool = False,
        node: str | None = None,
    ) -> None:
        """operator_gid: the operator group, which may read the state (lorad.state_dir).
        busy_timeout_ms: how long a write waits for another holder of SQLite's write lock before
        the operation fails with DatabaseUnavailable (a TransientError).
        mirrors: watched root -> mirror_to, for the roots in mirror mode (lorad.library.mirror).
        store_dir: the blob store's root (default <state_dir>/store); a fleet's is on a shared filesystem.
        check_store_identity: check the store's id against the database's before anything is
        written into the store (created at the first start; lorad.library.store_identity), as the
        daemon does; `node` is recorded as its creator.
        A database that cannot be opened or migrated is one DatabaseUnreachable (the URL without
        its password, and the cause)."""
        self.modes = Modes(operator_gid)
        self.state_dir = Path(state_dir).resolve()
        secure_dir(self.state_dir, self.modes)
        self.roots = tuple(Path(r).resolve() for r in watched_roots)
        self.mirrors = {Path(root).resolve(): Path(os.path.abspath(to)) for root, to in (mirrors or {}).items()}
        self.database_url = database_url or default_url(self.state_dir)
        db_file = sqlite_path(self.database_url)
        if db_file is not None:
            secure_sqlite(db_file, self.modes)
        store_root = Path(os.path.abspath(store_dir)) if store_dir is not None else self.state_dir / "store"
        db: Database | None = None
        self.store_id: str | None = None
        try:
            if migrate_on_open:
                from lorad.library.db import migrate  # Alembic is only needed here: keep it out of a bare import

                migrate.upgrade(self.database_url)
            db = Database(self.database_url, busy_timeout_ms)
            if check_store_identity:
                self.store_id = store_identity.claim(db, store_root, node).store_id
        except (SQLAlchemyError, ImportError, DatabaseLost) as e:
            if db is not None:
                db.close()
            raise unreachable(self.database_url, e.__cause__ if isinstance(e, DatabaseLost) and e.__cause__ else e) from e
        except BaseException:
            if db is not None:
                db.close()
            raise
        assert db is not None
        swap_area = self.state_dir / "swap"
        swap_area.mkdir(mode=0o700, exist_ok=True)
        self.core = Core(
            db=db,
            store=Store(store_root, link_mode, self.modes.blob, operator_gid),
            swap_area=swap_area,
            mirrors=self.mirrors,
        )
        self.db, self.store, self.swap_area, self.lock = self.core.db, self.core.store, swap_area, self.core.lock
        self._serialising: set[int] = set()  # the LoRAs whose put lock this process holds (under self.lock)
        self.node = node or socket.gethostname()  # this machine's name in a fleet (gc's lock says it)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------

    def loras(self, ids: Sequence[int] | None = None) -> list[LoraView]:
        """The LoRAs `ids` in that order (None: every one, by id), in a few queries whatever their
        number."""
        return self._views(lambda s: ids)

    def lora(self, ref: LoraRef) -> LoraView:
        return self._views(lambda s: [self._find_lora(s, ref).id])[0]

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

    def list_page(self, refused: Sequence[listing.Refused] = (), **query: Any) -> listing.Page:
        """One page of `lorad list` (lorad.library.listing.page), read from the records alone (but
        the headers of active blobs stored before lorad recorded ranks, read once, as views do)."""
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
        """How many LoRAs, the bytes of their originals and of what their paths hold now."""
        with self.db.read() as s:
            return listing.totals(s)

    def holds_folder(self, path: str | os.PathLike[str]) -> bool:
        """Whether `path` is a folder LoRA whose folder still has the stamp it had when lorad last
        knew its contents (a folder it has stored and read, unchanged since)."""
        with self.db.read() as s:
            row = repo.lora_by_path(s, os.path.realpath(path))
            stamp = row.file_stamp if row is not None and row.kind == "folder" else None
        return stamp is not None and trees.stamp_of(Path(path)) == stamp

    def original_sha256(self, lora_id: int) -> str | None:
        """The blob of a LoRA's current original (None: no original, or no such LoRA)."""
        with self.db.read() as s:
            row = s.get(Lora, lora_id)
            original = s.get(Variant, row.original_variant_id) if row and row.original_variant_id else None
            return original.blob_sha256 if original is not None else None

    def tree_entries(self, sha256: str) -> list[tuple[str, str, int]] | None:
        """(name, blob sha256, mode) of a folder tree's files; None when the blob is no tree."""
        with self.db.read() as s:
            blob = s.get(Blob, sha256)
            return repo.tree_entries(s, sha256) if blob is not None and blob.kind == "tree" else None

    def _header_ranks(self, s: Session, sha256: str) -> tuple[int, ...] | None:
        """The LoRA module ranks a stored file (or a tree's weights) has, from its header."""
        blob = s.get(Blob, sha256)
        if blob is not None and blob.kind == "tree":
            sha256 = folders.weights_of(s, sha256) or ""
        try:
            return header_ranks(read_header(self.store.path_of(sha256)))
        except (LoradError, OSError):
            return None

    def events(self, lora: LoraRef | None = None, limit: int | None = None) -> list[EventView]:
        with self.db.read() as s:
            lora_id = self._find_lora(s, lora).id if lora is not None else None
            return [event_view(e) for e in repo.events(s, lora_id=lora_id, limit=limit)]

    def find(self, hash_text: str) -> list[LoraView]:
        """The LoRAs a hash names (see find_hash), each once."""
        return list({m.lora.id: m.lora for m in self.find_hash(hash_text).matches}.values())

    def find_hash(self, hash_text: str) -> FindResult:
        """Which LoRAs and variants a hash names (lorad.library.hashes): a full hash or a prefix of at least
        8 hex digits of any variant's sha256, AutoV2, addnet/AutoV3, sshs_model_hash or BLAKE3, or
        a hash a sidecar beside the LoRA claimed. Every match of an ambiguous prefix is returned.
        Raises HashQueryError for text that names no hash."""
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

    def _claimed_variant(self, s: Session, lora_id: int, hit: HashHit) -> tuple[HashHit, int | None]:
        """The LoRA's variant whose bytes a claimed hash names, if lorad holds one."""
        for v in repo.variants_of(s, lora_id):
            blob = s.get(Blob, v.blob_sha256)
            if blob is not None and claim_names(hit.kind, hit.value, blob.sha256, blob.data_sha256, blob.blake3):
                return replace(hit, blob_sha256=blob.sha256), v.id
        return hit, None

    def refresh_claims(self, lora: LoraRef) -> int:
        """Record the hashes sidecars beside a LoRA's file claim; how many were new (see
        Core.refresh_claims)."""
        with self.db.read() as s:
            lora_id = self._find_lora(s, lora).id
        return self.core.refresh_claims(lora_id)

    def _refresh_claims_quietly(self, lora_id: int) -> None:
        """Claims are a convenience: failing to record them never fails the ingest they follow
        (the next ingest of the path or `verify` records them)."""
        try:
            self.refresh_claims(lora_id)
        except (LoradError, SQLAlchemyError, OSError) as e:
            log.warning("could not record sidecar hashes", lora=lora_id, error=shown(str(e)))

    def refusals(self) -> list[RefusalView]:
        """Watched paths lorad will not take as they are, with why; paths gone since are left out
        (the next reconcile scan forgets them)."""
        with self.db.read() as s:
            rows = [refusal_view(s, r) for r in repo.all_refusals(s)]
        return [r for r in rows if os.path.lexists(r.path)]

    def refusal_counts(self) -> dict[str, int]:
        """Refused paths by cause, counted by the database (paths gone since are counted until the
        next reconcile scan forgets them; `refusals` leaves them out)."""
        with self.db.read() as s:
            return repo.refusal_counts(s)

    def refusal(self, path: str | os.PathLike[str]) -> RefusalView | None:
        """The refusal recorded for `path` as named (absolute, not resolved: a symlink's own name)."""
        with self.db.read() as s:
            row = repo.refusal_at(s, os.path.abspath(path))
            return refusal_view(s, row) if row is not None else None

    def module_metrics(self, variant_id: int) -> list[dict[str, Any]]:
        with self.db.read() as s:
            return [
                {c: getattr(m, c) for c in ("name", "kind", "rank_in", "rank_out", "fro_retained",
                                            "rel_error", "params_in", "params_out", "skipped")}
                for m in repo.module_metrics_of(s, variant_id)
            ]  # fmt: skip

    # -- effect measurements (lorad.library.effects) ----------------------------------------------

    def effect_sources(self, ref: LoraRef, variant: int | None = None) -> effects.Sources:
        """The stored files `lorad effect` compares for a LoRA: `variant` (default: the active one,
        else, when the original is active, the newest reduction) and the variant it was made from.
        Refuses (StoreError) an original, a LoRA with no reduction, and files missing from the store."""
        with self.db.read() as s:
            row = self._find_lora(s, ref)
            all_variants = list(repo.variants_of(s, row.id))
            if variant is not None:
                chosen = self._variant_of(s, row, variant)
            else:
                reduced = [v for v in all_variants if v.kind == "reduced"]
                active = next((v for v in reduced if v.id == row.active_variant_id), None)
                if active is None and not reduced:
                    raise StoreError(f"{row.path}: has no reduced variant to measure (lorad has not reduced it yet)")
                chosen = active or max(reduced, key=lambda v: v.id)
            if chosen.kind != "reduced":
                raise StoreError(f"{row.path}: variant {chosen.id} is the original; measure a reduced variant")
            reference = self._reference_of(s, row, chosen)
            name = os.path.basename(row.path.rstrip("/"))
            stored = [self._stored(s, v, row.kind == "folder", name) for v in (chosen, reference)]
            return effects.Sources(row.id, Path(row.path), stored[0], stored[1])

    @staticmethod
    def _reference_of(s: Session, row: Lora, variant: Variant) -> Variant:
        """The variant a reduction is compared with: the one it was made from, else the original."""
        for candidate in (variant.source_variant_id, row.original_variant_id):
            found = s.get(Variant, candidate) if candidate is not None else None
            if found is not None and found.lora_id == row.id and found.id != variant.id:
                return found
        raise StoreError(f"{row.path}: variant {variant.id} has no original recorded to compare it with")

    def _stored(self, s: Session, v: Variant, folder: bool, name: str) -> effects.Stored:
        if folder:
            entries = repo.tree_entries(s, v.blob_sha256)
            files = tuple((entry, self.store.path_of(sha), mode) for entry, sha, mode in entries)
        else:
            files = ((name, self.store.path_of(v.blob_sha256), 0o444),)
        missing = [str(p) for _, p, _ in files if not p.is_file()]
        if not files or missing:
            raise StoreError(f"variant {v.id}'s stored bytes are missing from the store ({', '.join(missing) or 'no files'}); "
                             "`lorad verify` says more")  # fmt: skip
        return effects.Stored(v.id, v.kind, v.method, v.param, v.blob_sha256, folder, name, files)

    def record_effect(self, variant_id: int, figures: effects.Figures, reference_id: int | None = None,
                      actor: str = "library") -> EffectView:  # fmt: skip
        """Record a measurement of a reduced variant against `reference_id` (None: the variant it
        was made from); refuses an original, an unknown variant and a reference other than the one
        `effect_sources` names (the LoRA changed while it was measured)."""
        with self.db.read() as s:
            found = s.get(Variant, variant_id)
            if found is None:
                raise StoreError(f"no variant {variant_id}")
            lora_id = found.lora_id
        with self.lock, self._failure_recorded("record_effect", actor, lora_id):
            with self.db.write() as s:
                variant = s.get(Variant, variant_id)
                if variant is None:
                    raise StoreError(f"no variant {variant_id}")
                row = s.get(Lora, lora_id)
                assert row is not None
                if variant.kind != "reduced":
                    raise StoreError(f"{row.path}: variant {variant_id} is the original; its effect is its own")
                reference = self._reference_of(s, row, variant)
                if reference_id is not None and reference_id != reference.id:
                    raise StoreError(f"{row.path}: variant {variant_id} is compared with variant {reference.id}, "
                                     f"not {reference_id}; measure it again")  # fmt: skip
                effect = repo.record_effect(s, variant.id, reference.id, figures, actor)
                repo.record_event(s, "measured", actor, row.id, variant.id, effect_kind=figures.kind,
                                  effect_retained=figures.effect_retained, effect_retained_min=figures.effect_retained_min,
                                  base=figures.base, base_sha256=figures.base_sha256, samples_id=figures.samples_id,
                                  reference_variant=reference.id)  # fmt: skip
                return effect_view(effect)

    def effects(self, ref: LoraRef) -> list[EffectView]:
        """Every effect measurement of a LoRA's variants, the latest first, with its sample set."""
        with self.db.read() as s:
            row = self._find_lora(s, ref)
            return [effect_view(e) for e in repo.effects_of(s, [v.id for v in repo.variants_of(s, row.id)])]

    # -- ingest ------------------------------------------------------------------------------------

    def ingest(
        self, path: str | os.PathLike[str], policy: str | None = None, actor: str = "library"
    ) -> LoraView:
        """Store a watched file (or adapter folder) as an original (idempotent: a known file
        changes nothing)."""
        with self.lock, self._failure_recorded("ingest", actor, path):
            target, root = self._watched(path)
            is_folder = target.is_dir() and not target.name.endswith(".safetensors")
            try:
                if not is_folder:
                    check_regular(target)  # a FIFO, device or directory: refused by its mode, unopened
            except FileNotFoundError:
                raise StoreError(f"{target}: no such file") from None
            with self.db.read() as s:
                lora = repo.lora_by_path(s, str(target))
                lora_id = lora.id if lora else None
            if lora_id is not None:
                state = self.reconcile(lora_id, actor, trust_stamp=True)  # forgets a refusal of `target`
                if state.refusal is None and os.path.abspath(path) != str(target):
                    self.clear_refusal(path)  # and of the symlink it was found under
                self._refresh_claims_quietly(lora_id)  # a manager may have written a sidecar since
                return self.lora(lora_id)
            if is_folder:
                lora_id = folders.ingest(self.core, target, root, os.path.abspath(path), policy, actor)
                if root in self.mirrors:
                    self.reconcile(lora_id, actor, trust_stamp=True)  # the original, mirrored
                return self.lora(lora_id)
            stamp = FileStamp.of_path(target)
            info, record = self.store_file(target)
            _crashpoint("ingest:after-store")
            with self.db.write() as s:
                lora = repo.lora_by_path(s, str(target)) or repo.add_lora(s, str(target), str(root), policy)
                self.core.record_blobs(s, [record], restore=lambda: self.store_file(target, expect_sha256=info.sha256))
                variant = repo.original_with_blob(s, lora, info.sha256)
                repo.set_original(s, lora, variant)
                repo.set_active(s, lora, variant)
                lora.file_stamp = unchanged_token(target, stamp)
                repo.record_event(s, "ingested", actor, lora.id, variant.id, sha256=info.sha256,
                                  bytes=info.bytes, path=str(target))  # fmt: skip
                repo.clear_refusal(s, os.path.abspath(path))
                repo.clear_refusal(s, str(target))
                lora_id = lora.id
            _crashpoint("ingest:after-commit")
            log.info("ingested", path=shown(target), sha256=info.sha256)
            if root in self.mirrors:
                self.reconcile(lora_id, actor, trust_stamp=True)  # the original, mirrored
            self._refresh_claims_quietly(lora_id)
            return self.lora(lora_id)

    def store_file(self, path: Path, expect_sha256: str | None = None) -> tuple[BlobInfo, repo.BlobRecord]:
        """Copy a complete safetensors file into the store; describe the bytes actually stored."""
        return self.core.store_file(path, expect_sha256)

    def add_variant(
        self, lora: LoraRef, report: Report, actor: str = "library", source: str | None = None
    ) -> VariantView:
        """Store a reduction's output file (a folder LoRA's: its output folder) as a variant of
        `lora` with its metrics (not activated). `source`: the blob (a folder's tree) it was made
        from, where the report's input, a copy of it, does not name it."""
        with self.lock, self._failure_recorded("add_variant", actor, lora):
            if report.output is None:
                raise StoreError("the report describes no output file (a plan?); nothing to add")
            out = Path(report.output.path)
            with self.db.read() as s:
                row = self._find_lora(s, lora)
                lora_id, kind = row.id, row.kind
            if kind == "folder":
                return folders.add_variant(self.core, lora_id, report, source, actor)
            with self.db.read() as s:
                source_row = repo.variant_with_blob(s, lora_id, report.input.sha256)
                if source_row is None:
                    raise StoreError(
                        f"the reduction's input ({report.input.sha256[:12]}) is not a stored variant "
                        "of this LoRA; not added"
                    )
            info, record = self.store_file(out, expect_sha256=report.output.sha256)
            _crashpoint("add_variant:after-store")
            with self.db.write() as s:
                # The blob is still there (gc on another node may have taken it since: stored again), and stays.
                self.core.record_blobs(s, [record], restore=lambda: self.store_file(out, expect_sha256=info.sha256))
                variant = repo.record_reduction(s, lora_id, info.sha256, info.bytes, source_row.id, report, actor)
                view = variant_view(variant, info.bytes)
            _crashpoint("add_variant:after-commit")
            return view

    # -- putting a variant at the watched path --------------------------------------------------

    def activate(self, lora: LoraRef, variant: int, actor: str = "library") -> LoraView:
        """Put `variant` at the watched path (the policy's choice after a reduction)."""
        return self._put(lora, lambda _: variant, "activated", actor)

    def switch(self, lora: LoraRef, variant: int, actor: str = "library") -> LoraView:
        """Put a chosen variant at the watched path (a user's choice)."""
        return self._put(lora, lambda _: variant, "switched", actor)

    def revert(self, lora: LoraRef, actor: str = "library") -> LoraView:
        """Put the original back at the watched path."""
        return self._put(lora, lambda row: row.original_variant_id, "reverted", actor)

    def _put(
        self, ref: LoraRef, choose: Callable[[Lora], int | None], kind: SwitchKind, actor: str
    ) -> LoraView:
        op = {"activated": "activate", "reverted": "revert", "switched": "switch"}[kind]
        with self.lock, self._failure_recorded(op, actor, ref):
            with self.db.read() as s:
                lora_id = self._find_lora(s, ref).id
            with self._serialised(lora_id):
                return self._put_now(lora_id, choose, kind, actor)

    def _put_now(self, lora_id: int, choose: Callable[[Lora], int | None], kind: SwitchKind, actor: str) -> LoraView:
        with self.db.read() as s:
            row = self._find_lora(s, lora_id)
            path, is_folder = Path(row.path), row.kind == "folder"
            mirror_path = self.mirror_of(row)
            wanted = self._variant_of(s, row, choose(row))
        self._watched(path)  # a folder dropped from the config is no longer lorad's to write
        target = mirror_path or path  # in mirror mode the watched file is never written
        stamp, current = self._settled_state(lora_id, target, actor, is_folder, mirrored=mirror_path is not None)
        if current != wanted.id:
            _crashpoint("put:before-materialize")
            self._materialize(wanted, target, stamp, actor)
        written = self._stamp_token(target, is_folder)  # what lorad itself just put there
        with self.db.write() as s:
            # The LoRA's row locked (PostgreSQL; SQLite's BEGIN IMMEDIATE serialises already):
            # no other writer changes it between this read and the commit.
            row = s.get(Lora, lora_id, with_for_update=True)
            variant = s.get(Variant, wanted.id)
            assert row is not None and variant is not None
            repo.set_active(s, row, variant)
            if mirror_path is not None:
                row.mirror_stamp = written
            else:
                row.file_stamp = written
            repo.record_event(s, kind, actor, lora_id, wanted.id, previous_variant=current,
                              sha256=wanted.blob_sha256, path=str(target))  # fmt: skip
        _crashpoint("put:after-commit")
        log.info(kind, path=shown(target), variant=wanted.id)
        return self.lora(lora_id)

    @contextmanager
    def _serialised(self, lora_id: int) -> Iterator[None]:
        """One put (activate, revert, switch) of a LoRA at a time across the fleet, from reading
        what its file holds to recording what was written. In one process `self.lock` does it; on
        PostgreSQL, nodes also take a transaction-scoped advisory lock keyed by the LoRA's id, held
        on a connection of its own for the whole put. (Not a row lock on `loras`: the put's own
        transactions update that row, and would wait on it.) PostgreSQL releases it when the
        transaction ends or the node's connection dies. SQLite serves one node: the local lock is
        all there is to take."""
        if self.db.is_sqlite or lora_id in self._serialising:
            yield
            return
        # A lock wait past lock_timeout: DatabaseUnavailable; a lost connection: DatabaseLost.
        with self.db.guard(), self.db.engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT pg_advisory_xact_lock(CAST(:space AS integer), CAST(:id AS integer))"), {"space": PUT_LOCK_SPACE, "id": lora_id})
            self._serialising.add(lora_id)
            try:
                yield
            finally:
                self._serialising.discard(lora_id)

    def mirror_of(self, row: Lora) -> Path | None:
        """Where a LoRA's active variant is written when its folder is in mirror mode, else None."""
        return self.core.mirror_of(row)

    @staticmethod
    def _stamp_token(path: Path, is_folder: bool) -> str | None:
        if is_folder:
            return trees.stamp_of(path)
        stamp = FileStamp.of_path(path)
        return stamp.token if stamp else None

    def _settled_state(
        self, lora_id: int, path: Path, actor: str, is_folder: bool, mirrored: bool = False
    ) -> tuple[FileStamp | str, int]:
        """The watched file's stamp (a folder's: lorad.library.trees.stamp_of; a mirrored LoRA's: its
        mirror file's) and the variant it holds, after reconciling the records to it.

        Refuses when the file is gone or incomplete, or when it held bytes lorad never stored
        (kept as a new original first: lorad never overwrites what it has not stored).
        """
        stamp: FileStamp | str | None
        if mirrored:
            stamp = None  # taken below: reconciling writes a missing mirror (only lorad writes there)
        elif is_folder:
            folder_swap.recover(path, self.swap_area)  # else an interrupted swap reads as "gone"
            stamp = trees.stamp_of(path)
        else:
            try:
                stamp = FileStamp.of(os.stat(path))
            except FileNotFoundError:
                stamp = None
        state = self.reconcile(lora_id, actor)
        if mirrored and state.kind != "gone":
            stamp = trees.stamp_of(path) if is_folder else FileStamp.of_path(path)
        if stamp is None or state.kind == "gone":
            raise StoreError(f"{path}: the file is gone; lorad does not recreate removed LoRAs")
        if state.refusal is not None:
            raise StoreError(f"{path}: {state.refusal.reason}; left as it is")
        if state.kind == "unsettled":
            raise StoreError(
                f"{path}: is not a complete safetensors file (still being written?); left as it is"
            )
        if state.kind == "new-original":
            raise StoreError(
                f"{path}: changed outside lorad; kept it as a new original (variant "
                f"{state.variant_id}) and left it in place"
            )
        assert state.variant_id is not None
        return stamp, state.variant_id

    def _materialize(self, wanted: Variant, path: Path, stamp: FileStamp | str, actor: str) -> None:
        try:
            if isinstance(stamp, str):
                folders.put(self.core, wanted.lora_id, wanted.blob_sha256, path, stamp, actor)
            else:
                self.store.materialize(wanted.blob_sha256, path, expect=stamp)
        except CorruptBlob as e:
            self.quarantine(e.sha256, actor, wanted.lora_id, wanted.id)
            raise StoreError(
                f"{path}: variant {wanted.id}'s stored bytes are corrupt (moved to the store's bad/); "
                "the file was left as it was"
            ) from e
        except TargetChanged:
            self.reconcile(wanted.lora_id, actor)
            raise

    def gone(self, path: str | os.PathLike[str], actor: str = "library") -> None:
        """A watched path was deleted or moved away. In mirror mode its mirror goes now, as the
        next reconcile would remove it (lorad.library.mirror): until then the user's tools, pointed at
        the mirror, would still offer the LoRA. Elsewhere nothing is done: the records stay until gc."""
        where = os.path.abspath(path)
        with self.lock:
            with self.db.read() as s:
                row = repo.lora_by_path(s, where)
                if row is None or self.mirror_of(row) is None:
                    return
                lora_id = row.id
            if not os.path.lexists(where):
                self.reconcile(lora_id, actor)

    # -- reconciling disk and records -----------------------------------------------------------

    def reconcile(self, lora_id: int, actor: str, trust_stamp: bool = False) -> FileState:
        """Bring the records to what the watched file holds, and say what that is (see
        lorad.library.reconcile.reconcile)."""
        return reconcile_records(self.core, lora_id, actor, trust_stamp)

    def unchanged_files(self) -> list[Unchanged]:
        """The LoRA files as lorad last knew them, by their recorded stamps (see
        lorad.library.reconcile.unchanged): a restart passes them by unhashed."""
        return unchanged(self.core)

    @property
    def files_hashed(self) -> int:
        """Files read through to hash them in this process (lorad.library.store.FILES_HASHED)."""
        return FILES_HASHED.value

    def quarantine(
        self, sha256: str, actor: str, lora_id: int | None = None, variant_id: int | None = None
    ) -> None:
        self.core.quarantine(sha256, actor, lora_id, variant_id)

    # -- refusals --------------------------------------------------------------------------------

    def record_refusal(self, path: str | os.PathLike[str], refusal: Refusal) -> None:
        """Record why a watched path is not taken (see Core.record_refusal)."""
        self.core.record_refusal(path, refusal)

    def clear_refusal(self, path: str | os.PathLike[str]) -> None:
        self.core.clear_refusal(path)

    def prune_refusals(self, present: Iterable[str | os.PathLike[str]],
                       roots: Iterable[str | os.PathLike[str]] | None = None) -> None:  # fmt: skip
        """Forget the refusals of paths a full scan no longer found (or no longer watches); given
        the `roots` it scanned, only of the paths in those folders."""
        keep = {os.path.abspath(p) for p in present}
        within = None if roots is None else tuple(os.path.abspath(r).rstrip("/") + "/" for r in roots)
        with self.db.read() as s:
            stale = [r.path for r in repo.all_refusals(s)
                     if r.path not in keep and (within is None or r.path.startswith(within))]  # fmt: skip
        if stale:
            with self.db.write() as s:
                repo.prune_refusals(s, keep, None if within is None else [w.rstrip("/") for w in within])

    # -- verify and gc (lorad.library.upkeep) ------------------------------------------------------------

    def verify(self, actor: str = "verify", stale_after: timedelta = timedelta(minutes=15)) -> VerifyReport:
        """Re-hash every blob and every watched file; see lorad.library.upkeep.verify."""
        return upkeep.verify(self.core, actor, stale_after)

    def gc(
        self,
        dry_run: bool = True,
        keep_variants: int = 2,
        grace: timedelta = timedelta(hours=1),
        actor: str = "gc",
        keep_by_policy: Mapping[str, int] | None = None,
    ) -> GcPlan:
        """Plan (and unless `dry_run`, carry out) a collection; see lorad.library.upkeep.gc."""
        return upkeep.gc(self.core, dry_run, keep_variants, grace, actor, keep_by_policy, self.node)

    # -- helpers -----------------------------------------------------------------------------------

    def _watched(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """The resolved path and the watched root it lies in; refuses anything else."""
        resolved = Path(path).expanduser().resolve()
        root = next((r for r in self.roots if resolved.is_relative_to(r) and resolved != r), None)
        if root is None:
            roots = ", ".join(str(r) for r in self.roots) or "none configured"
            raise StoreError(f"{path}: not inside a watched folder ({roots})")
        if is_temp_name(resolved):
            raise StoreError(f"{path}: is one of lorad's own temp files")
        return resolved, root

    def _find_lora(self, s: Session, ref: LoraRef) -> Lora:
        if isinstance(ref, int):
            row = s.get(Lora, ref)
            if row is None:
                raise StoreError(f"no LoRA with id {ref}")
            return row
        path, _ = self._watched(self.unmirrored(ref))
        row = repo.lora_by_path(s, str(path))
        if row is None:
            raise StoreError(f"{path}: lorad has not ingested this file")
        return row

    def unmirrored(self, ref: str | os.PathLike[str]) -> str | os.PathLike[str]:
        """A path in a mirror names the watched file it mirrors (users type either)."""
        given = Path(os.path.abspath(ref))
        for root, to in self.mirrors.items():
            if to == given or to in given.parents:
                return root / given.relative_to(to)
        return ref

    def _variant_of(self, s: Session, lora: Lora, variant_id: int | None) -> Variant:
        variant = s.get(Variant, variant_id) if variant_id is not None else None
        if variant is None or variant.lora_id != lora.id:
            raise StoreError(f"{lora.path}: has no variant {variant_id}")
        return variant

    @contextmanager
    def _failure_recorded(self, op: str, actor: str, subject: object) -> Iterator[None]:
        """Record a refused or failed operation in the audit trail, then let the error through."""
        try:
            yield
        except DatabaseUnavailable:
            raise  # recording it would wait on the same lock, and fail the same way
        except LoradError as e:
            self._record_failure(op, actor, subject, e)
            raise

    def _record_failure(self, op: str, actor: str, subject: object, error: Exception) -> None:
        try:
            with self.db.write() as s:
                lora_id = None
                if isinstance(subject, (int, str, os.PathLike)):
                    with contextlib.suppress(LoradError):
                        lora_id = self._find_lora(s, subject).id
                repo.record_event(s, "failed", actor, lora_id, op=op, subject=str(subject), error=str(error))
        except Exception as e:  # the audit trail must not hide the error being reported
            log.warning("could not record a failure", op=op, error=shown(str(e)))

