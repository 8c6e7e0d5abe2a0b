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

`Library` is the one entry point; its methods hand over to parts that share its Core and its
`Refs` (lorad.library._refs: how callers name a LoRA): `_reads` (views, lists, hash lookups),
`_refusal_records`, `_effect_records`, `_puts` (activate, switch, revert) and `_intake` (ingest,
add_variant, sidecar claims).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path
from typing import Any

from lorad.engine.report import Report
from lorad.library import effects, listing, upkeep
from lorad.library._effect_records import EffectRecords
from lorad.library._intake import Intake
from lorad.library._open import open_database
from lorad.library._puts import Puts
from lorad.library._reads import Reads
from lorad.library._refs import LoraRef, Refs
from lorad.library._refusal_records import RefusalRecords
from lorad.library.core import Core
from lorad.library.db import repo
from lorad.library.db.models import Lora
from lorad.library.db.session import BUSY_TIMEOUT_MS, default_url, sqlite_path
from lorad.library.reconcile import Unchanged, unchanged
from lorad.library.reconcile import reconcile as reconcile_records
from lorad.library.records import EffectView, EventView, FindResult, GcPlan, LoraView, RefusalView, VariantView, VerifyReport
from lorad.library.refusals import Refusal
from lorad.library.states import FileState
from lorad.library.store import FILES_HASHED, BlobInfo, LinkMode, Store
from lorad.state_dir import Modes, secure_dir, secure_sqlite


def cli_actor() -> str:
    return f"cli:uid={os.getuid()}"


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
        A database that cannot be opened or migrated is one DatabaseUnreachable (lorad.library._open)."""
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
        db, self.store_id = open_database(
            self.database_url, busy_timeout_ms, migrate_on_open, store_root, check_store_identity, node
        )
        swap_area = self.state_dir / "swap"
        swap_area.mkdir(mode=0o700, exist_ok=True)
        self.core = Core(
            db=db,
            store=Store(store_root, link_mode, self.modes.blob, operator_gid),
            swap_area=swap_area,
            mirrors=self.mirrors,
        )
        self.db, self.store, self.swap_area, self.lock = self.core.db, self.core.store, swap_area, self.core.lock
        self.node = node or socket.gethostname()  # this machine's name in a fleet (gc's lock says it)
        self._refs = refs = Refs(self.roots, self.mirrors)
        self._reads = Reads(self.db, self.store, refs)
        self._refusals = RefusalRecords(self.db)
        self._effects = EffectRecords(self.core, refs)
        self._puts = Puts(self.core, refs, self._reads.lora)
        self._intake = Intake(self.core, refs, self._reads.lora)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- reading (lorad.library._reads) --------------------------------------------------------

    def loras(self, ids: Sequence[int] | None = None) -> list[LoraView]:
        """The LoRAs `ids` in that order (None: every one, by id), in a few queries whatever their
        number."""
        return self._reads.loras(ids)

    def lora(self, ref: LoraRef) -> LoraView:
        return self._reads.lora(ref)

    def list_page(self, refused: Sequence[listing.Refused] = (), **query: Any) -> listing.Page:
        """One page of `lorad list` (lorad.library.listing.page), read from the records alone (but
        the headers of active blobs stored before lorad recorded ranks, read once, as views do)."""
        return self._reads.list_page(refused, **query)

    def totals(self) -> listing.Totals:
        """How many LoRAs, the bytes of their originals and of what their paths hold now."""
        return self._reads.totals()

    def holds_folder(self, path: str | os.PathLike[str]) -> bool:
        """Whether `path` is a folder LoRA whose folder still has the stamp it had when lorad last
        knew its contents (a folder it has stored and read, unchanged since)."""
        return self._reads.holds_folder(path)

    def original_sha256(self, lora_id: int) -> str | None:
        """The blob of a LoRA's current original (None: no original, or no such LoRA)."""
        return self._reads.original_sha256(lora_id)

    def tree_entries(self, sha256: str) -> list[tuple[str, str, int]] | None:
        """(name, blob sha256, mode) of a folder tree's files; None when the blob is no tree."""
        return self._reads.tree_entries(sha256)

    def events(self, lora: LoraRef | None = None, limit: int | None = None) -> list[EventView]:
        return self._reads.events(lora, limit)

    def find(self, hash_text: str) -> list[LoraView]:
        """The LoRAs a hash names (see find_hash), each once."""
        return list({m.lora.id: m.lora for m in self.find_hash(hash_text).matches}.values())

    def find_hash(self, hash_text: str) -> FindResult:
        """Which LoRAs and variants a hash names (lorad.library.hashes): a full hash or a prefix of at least
        8 hex digits of any variant's sha256, AutoV2, addnet/AutoV3, sshs_model_hash or BLAKE3, or
        a hash a sidecar beside the LoRA claimed. Every match of an ambiguous prefix is returned.
        Raises HashQueryError for text that names no hash."""
        return self._reads.find_hash(hash_text)

    def module_metrics(self, variant_id: int) -> list[dict[str, Any]]:
        return self._reads.module_metrics(variant_id)

    def refresh_claims(self, lora: LoraRef) -> int:
        """Record the hashes sidecars beside a LoRA's file claim; how many were new (see
        Core.refresh_claims)."""
        return self._intake.refresh_claims(lora)

    # -- refusals (lorad.library._refusal_records; recorded by Core) ---------------------------

    def refusals(self) -> list[RefusalView]:
        """Watched paths lorad will not take as they are, with why; paths gone since are left out
        (the next reconcile scan forgets them)."""
        return self._refusals.refusals()

    def refusal_counts(self) -> dict[str, int]:
        """Refused paths by cause, counted by the database (paths gone since are counted until the
        next reconcile scan forgets them; `refusals` leaves them out)."""
        return self._refusals.refusal_counts()

    def refusal(self, path: str | os.PathLike[str]) -> RefusalView | None:
        """The refusal recorded for `path` as named (absolute, not resolved: a symlink's own name)."""
        return self._refusals.refusal(path)

    def record_refusal(self, path: str | os.PathLike[str], refusal: Refusal) -> None:
        """Record why a watched path is not taken (see Core.record_refusal)."""
        self.core.record_refusal(path, refusal)

    def clear_refusal(self, path: str | os.PathLike[str]) -> None:
        self.core.clear_refusal(path)

    def prune_refusals(self, present: Iterable[str | os.PathLike[str]],
                       roots: Iterable[str | os.PathLike[str]] | None = None) -> None:  # fmt: skip
        """Forget the refusals of paths a full scan no longer found (or no longer watches); given
        the `roots` it scanned, only of the paths in those folders."""
        self._refusals.prune(present, roots)

    # -- effect measurements (lorad.library._effect_records) -----------------------------------

    def effect_sources(self, ref: LoraRef, variant: int | None = None) -> effects.Sources:
        """The stored files `lorad effect` compares for a LoRA: `variant` (default: the active one,
        else, when the original is active, the newest reduction) and the variant it was made from.
        Refuses (StoreError) an original, a LoRA with no reduction, and files missing from the store."""
        return self._effects.sources(ref, variant)

    def record_effect(self, variant_id: int, figures: effects.Figures, reference_id: int | None = None,
                      actor: str = "library") -> EffectView:  # fmt: skip
        """Record a measurement of a reduced variant against `reference_id` (None: the variant it
        was made from); refuses an original, an unknown variant and a reference other than the one
        `effect_sources` names (the LoRA changed while it was measured)."""
        return self._effects.record(variant_id, figures, reference_id, actor)

    def effects(self, ref: LoraRef) -> list[EffectView]:
        """Every effect measurement of a LoRA's variants, the latest first, with its sample set."""
        return self._effects.of(ref)

    # -- ingest (lorad.library._intake) --------------------------------------------------------

    def ingest(self, path: str | os.PathLike[str], policy: str | None = None, actor: str = "library") -> LoraView:
        """Store a watched file (or adapter folder) as an original (idempotent: a known file
        changes nothing)."""
        return self._intake.ingest(path, policy, actor)

    def store_file(self, path: Path, expect_sha256: str | None = None) -> tuple[BlobInfo, repo.BlobRecord]:
        """Copy a complete safetensors file into the store; describe the bytes actually stored."""
        return self.core.store_file(path, expect_sha256)

    def add_variant(self, lora: LoraRef, report: Report, actor: str = "library", source: str | None = None) -> VariantView:
        """Store a reduction's output file (a folder LoRA's: its output folder) as a variant of
        `lora` with its metrics (not activated). `source`: the blob (a folder's tree) it was made
        from, where the report's input, a copy of it, does not name it."""
        return self._intake.add_variant(lora, report, actor, source)

    # -- putting a variant at the watched path (lorad.library._puts) ---------------------------

    def activate(self, lora: LoraRef, variant: int, actor: str = "library") -> LoraView:
        """Put `variant` at the watched path (the policy's choice after a reduction)."""
        return self._puts.put(lora, lambda _: variant, "activated", actor)

    def switch(self, lora: LoraRef, variant: int, actor: str = "library") -> LoraView:
        """Put a chosen variant at the watched path (a user's choice)."""
        return self._puts.put(lora, lambda _: variant, "switched", actor)

    def revert(self, lora: LoraRef, actor: str = "library") -> LoraView:
        """Put the original back at the watched path."""
        return self._puts.put(lora, lambda row: row.original_variant_id, "reverted", actor)

    def _serialised(self, lora_id: int) -> AbstractContextManager[None]:
        """The put lock of a LoRA (lorad.library._puts); tests hold it to stand for a put in progress."""
        return self._puts.serialised(lora_id)

    def mirror_of(self, row: Lora) -> Path | None:
        """Where a LoRA's active variant is written when its folder is in mirror mode, else None."""
        return self.core.mirror_of(row)

    def unmirrored(self, ref: str | os.PathLike[str]) -> str | os.PathLike[str]:
        """A path in a mirror names the watched file it mirrors (users type either)."""
        return self._refs.unmirrored(ref)

    def gone(self, path: str | os.PathLike[str], actor: str = "library") -> None:
        """A watched path was deleted or moved away. In mirror mode its mirror goes now, as the
        next reconcile would remove it (lorad.library.mirror): until then the user's tools, pointed at
        the mirror, would still offer the LoRA. Elsewhere nothing is done: the records stay until gc."""
        self._puts.gone(path, actor)

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

    def quarantine(self, sha256: str, actor: str, lora_id: int | None = None, variant_id: int | None = None) -> None:
        self.core.quarantine(sha256, actor, lora_id, variant_id)

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
