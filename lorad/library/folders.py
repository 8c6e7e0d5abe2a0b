"""Folder LoRAs (PEFT adapter folders) in the library: taking them in, their reductions, what the
folder on disk holds, and putting a variant in place.

A folder LoRA's variants are trees (lorad.library.trees): each file of the folder is a blob, and the tree's
manifest is a blob too (`blobs.kind = 'tree'`, its files in `tree_entries`). The same rules hold as
for files: every file reaches the store before any record names it, the folder at the watched path
is replaced whole (lorad.library.folder_swap) before the records say so, and a folder holding a tree lorad
never stored is a new original, stored first and never overwritten. The old folder a swap retires
is checked before it is removed: if it changed after lorad last looked, it is stored and recorded
as an original too.

The Library calls these with its lock held.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from lorad._atomic import fsync_dir, remove_tree
from lorad.engine.report import Report
from lorad.errors import FormatError, NotRegularFileError, StoreError
from lorad.library import adapter_folder, folder_swap, trees
from lorad.library.core import Core
from lorad.library.db import repo
from lorad.library.db.models import Lora, Variant
from lorad.library.records import VariantView, variant_view
from lorad.library.states import FileState, hashed, held
from lorad.library.store import _crashpoint, hash_file
from lorad.pathtext import shown

log = structlog.get_logger()

WEIGHTS = adapter_folder.WEIGHTS


@dataclass(frozen=True)
class StoredTree:
    sha256: str
    entries: tuple[trees.Entry, ...]
    records: tuple[repo.BlobRecord, ...]  # the entries' blobs, then the tree's own
    bytes: int  # the files' bytes together


def store_tree(core: Core, folder: Path, modes: Mapping[str, int] | None = None) -> StoredTree:
    """Copy every file of a flat folder into the store, then its manifest; refuses (StoreError,
    nothing recorded) when the folder changes meanwhile. `modes`: the mode to record per name
    (a reduction's output takes its original's), else each file's own."""
    before = trees.stamp_of(folder)
    entries, records = [], []
    for item in trees.entries_of(folder):
        if item.name == WEIGHTS:
            info, record = core.store_file(item.path)
        else:
            info = core.store.ingest(item.path)
            record = repo.BlobRecord(info.sha256, info.bytes, info.sha256, None, None, None, None, info.blake3)
        mode = modes.get(item.name, modes.get(WEIGHTS, item.mode)) if modes is not None else item.mode
        entries.append(trees.Entry(item.name, info.sha256, mode))
        records.append(record)
    if before is None or trees.stamp_of(folder) != before:
        raise StoreError(f"{folder}: changed while being stored; try again once it is settled")
    manifest = core.store.ingest_bytes(trees.encode(entries))
    weights = next((r for e, r in zip(entries, records) if e.name == WEIGHTS), None)
    total = sum(r.bytes for r in records)
    tree = repo.BlobRecord(manifest.sha256, total, manifest.sha256, "peft", weights.modules if weights else None,
                           None, None, manifest.blake3, kind="tree", ranks=weights.ranks if weights else None)  # fmt: skip
    return StoredTree(manifest.sha256, tuple(entries), (*records, tree), total)


def record_tree(core: Core, s, stored: StoredTree, restore: Callable[[], object]) -> None:  # type: ignore[no-untyped-def]
    """Record a stored tree's blobs and entries; a blob gc took since its storing is stored again by
    `restore()` (or BlobCollected, transient, if the folder no longer holds those bytes)."""
    core.record_blobs(s, stored.records, restore=restore)
    repo.add_tree_entries(s, stored.sha256, ((e.name, e.sha256, e.mode) for e in stored.entries))


# -- taking a folder in ------------------------------------------------------------------------------


def ingest(core: Core, target: Path, root: Path, given: str, policy: str | None, actor: str) -> int:
    """Store a complete adapter folder as a new folder LoRA's original; its id."""
    try:
        adapter_folder.check(target)
    except FileNotFoundError:
        raise StoreError(f"{target}: no such folder") from None
    stamp = trees.stamp_of(target)
    stored = store_tree(core, target)
    _crashpoint("ingest:after-store")
    with core.db.write() as s:
        lora = repo.lora_by_path(s, str(target)) or repo.add_lora(s, str(target), str(root), policy, kind="folder")
        record_tree(core, s, stored, lambda: store_tree(core, target))
        variant = repo.original_with_blob(s, lora, stored.sha256)
        repo.set_original(s, lora, variant)
        repo.set_active(s, lora, variant)
        lora.file_stamp = stamp if trees.stamp_of(target) == stamp else None
        repo.record_event(s, "ingested", actor, lora.id, variant.id, sha256=stored.sha256, bytes=stored.bytes,
                          path=str(target), files=[e.name for e in stored.entries])  # fmt: skip
        repo.clear_refusal(s, given)
        repo.clear_refusal(s, str(target))
        lora_id = lora.id
    _crashpoint("ingest:after-commit")
    log.info("ingested", path=shown(target), sha256=stored.sha256, kind="folder")
    return lora_id


# -- a reduction's output folder -----------------------------------------------------------------------


def add_variant(core: Core, lora_id: int, report: Report, source_tree: str | None, actor: str) -> VariantView:
    """Store the engine's output folder as a reduced variant made from the tree `source_tree` (or
    the variant whose weights the report's input names)."""
    assert report.output is not None
    out = Path(report.output.path)
    with core.db.read() as s:
        source = _source_variant(s, lora_id, report.input.sha256, source_tree)
        original = {name: mode for name, _sha, mode in repo.tree_entries(s, source.blob_sha256)}
    stored = store_tree(core, out, modes=original)
    weights = next((e for e in stored.entries if e.name == WEIGHTS), None)
    if weights is None or weights.sha256 != report.output.sha256:
        raise StoreError(f"{out}: its {WEIGHTS} is not the one the reduction reported; not added")
    _crashpoint("add_variant:after-store")
    with core.db.write() as s:
        record_tree(core, s, stored, lambda: store_tree(core, out, modes=original))
        variant = repo.record_reduction(s, lora_id, stored.sha256, stored.bytes, source.id, report, actor)
        view = variant_view(variant, stored.bytes)
    _crashpoint("add_variant:after-commit")
    return view


def _source_variant(s, lora_id: int, weights_sha: str, source_tree: str | None) -> Variant:  # type: ignore[no-untyped-def]
    candidates = [source_tree] if source_tree else [v.blob_sha256 for v in repo.variants_of(s, lora_id)]
    for tree in candidates:
        variant = repo.variant_with_blob(s, lora_id, tree)
        if variant is not None and any(n == WEIGHTS and sha == weights_sha for n, sha, _ in repo.tree_entries(s, tree)):
            return variant
    raise StoreError(f"the reduction's input ({weights_sha[:12]}) is not the weights of a stored variant of this "
                     "folder; not added")  # fmt: skip


# -- what the folder holds ----------------------------------------------------------------------------


def state(core: Core, lora_id: int, actor: str, trust_stamp: bool = False) -> FileState:
    """lorad.library.reconcile.file_state for a folder LoRA: every file hashed (unless `trust_stamp` and
    the folder's stamp is the recorded one), the tree compared with the known variants."""
    with core.db.read() as s:
        row = s.get(Lora, lora_id)
        assert row is not None
        path, active_id, known_stamp = Path(row.path), row.active_variant_id, row.file_stamp
        active = s.get(Variant, active_id) if active_id is not None else None
        active_sha = active.blob_sha256 if active else None
    folder_swap.recover(path, core.swap_area)
    stamp = trees.stamp_of(path)
    if trust_stamp and stamp is not None and stamp == known_stamp and active_sha:
        return FileState("in-sync", active_id, active_id, active_sha)
    sha = hashed(core, path, active_id, digest=lambda p: trees.hash_folder(p)[0], refused=(FormatError, OSError))
    if isinstance(sha, FileState):
        return sha
    token = stamp if stamp is not None and trees.stamp_of(path) == stamp else None
    state = held(core, lora_id, sha, active_id, active_sha, known_stamp, token, actor)
    if state is not None:
        return state
    try:
        adapter_folder.check(path)
    except (FormatError, OSError):
        return FileState("unsettled", None, active_id, sha)  # being copied, or half edited: not adopted
    new_id = adopt_new_original(core, lora_id, path, active_id, actor)
    return FileState("new-original", new_id, active_id, sha)


def adopt_new_original(core: Core, lora_id: int, folder: Path, old: int | None, actor: str) -> int:
    """Store a folder holding a tree lorad never stored as the LoRA's original, made active."""
    return _adopt(core, lora_id, folder, old, actor, "changed outside lorad", active=True)


def _adopt(core: Core, lora_id: int, folder: Path, old: int | None, actor: str, reason: str, active: bool) -> int:
    stamp = trees.stamp_of(folder)
    stored = store_tree(core, folder)
    with core.db.write() as s:
        row = s.get(Lora, lora_id)
        assert row is not None
        record_tree(core, s, stored, lambda: store_tree(core, folder))
        variant = repo.original_with_blob(s, row, stored.sha256)
        if active:
            repo.set_original(s, row, variant)
            repo.set_active(s, row, variant)
            row.file_stamp = stamp if trees.stamp_of(folder) == stamp else None
        repo.record_event(s, "ingested", actor, lora_id, variant.id, sha256=stored.sha256, bytes=stored.bytes,
                          path=str(folder), previous_variant=old, reason=reason)  # fmt: skip
        log.warning(reason, path=shown(folder), sha256=stored.sha256)
        return variant.id


# -- putting a variant in place ------------------------------------------------------------------------


def put(core: Core, lora_id: int, tree_sha256: str, path: Path, stamp: str, actor: str) -> None:
    """Make the folder at `path` hold a stored tree of the LoRA, swapped in whole; `stamp`: the
    folder's stamp when its contents were last checked (else TargetChanged, nothing replaced)."""
    mode, owner = folder_swap.dir_mode_owner(path)
    retired = folder_swap.swap(path, core.swap_area, stamp, _builder(core, tree_sha256, owner), mode, owner)
    retire(core, lora_id, retired, stamp, actor)
    _crashpoint("folder:after-retire")


def put_new(core: Core, tree_sha256: str, path: Path, mode: int) -> None:
    """Write a stored tree as a new folder at `path`, where there is none (a mirror's)."""
    folder_swap.create(path, core.swap_area, _builder(core, tree_sha256, None), mode)


def _builder(core: Core, tree_sha256: str, owner: tuple[int, int] | None) -> Callable[[Path], None]:
    """What fills a new folder with a stored tree's files."""
    with core.db.read() as s:
        entries = [trees.Entry(name, sha, mode) for name, sha, mode in repo.tree_entries(s, tree_sha256)]
    if not entries:
        raise StoreError(f"{tree_sha256[:12]} is no folder tree; it cannot be put in a folder")

    def build(folder: Path) -> None:
        for e in entries:
            core.store.write_out(e.sha256, folder / e.name, e.mode, owner)

    return build


def retire(core: Core, lora_id: int, old: Path, expect: str | None, actor: str) -> None:
    """Remove a folder a swap displaced. One that changed after lorad last looked at it (a write
    that raced the swap) holds a tree lorad may never have stored: that tree is kept first, as an
    original of the LoRA (not put back: the swap stands)."""
    if trees.stamp_of(old) != expect or expect is None:
        keep_unknown(core, lora_id, old, actor)
    remove_tree(old)
    fsync_dir(old.parent)


def keep_unknown(core: Core, lora_id: int, folder: Path, actor: str) -> None:
    """Store and record the tree of a displaced folder unless it is a known variant already."""
    try:
        sha, _ = trees.hash_folder(folder)
    except FileNotFoundError:
        return
    except (FormatError, OSError) as e:
        raise StoreError(f"{folder}: a displaced folder lorad cannot read ({e}); left in place") from e
    with core.db.read() as s:
        if repo.variant_with_blob(s, lora_id, sha) is not None:
            return
    _adopt(core, lora_id, folder, None, actor, "changed while lorad was replacing it; kept as an original", active=False)


def clean_leftovers(core: Core, lora_id: int, path: Path, older_than: float) -> list[Path]:
    """Remove what interrupted swaps of `path` left, once older than the cutoff (a timestamp),
    keeping any tree among them that lorad never stored."""
    if not os.path.lexists(path):
        return []
    removed = []
    for leftover in folder_swap.leftovers(path, core.swap_area):
        try:
            if leftover.lstat().st_mtime > older_than:
                continue
        except FileNotFoundError:
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            try:
                keep_unknown(core, lora_id, leftover, "verify")
            except (StoreError, NotRegularFileError) as e:
                log.warning("left a folder an interrupted swap left behind", path=shown(leftover), error=shown(str(e)))
                continue
        remove_tree(leftover)
        removed.append(leftover)
    return removed


def repair_from(core: Core, path: Path, lost: set[str]) -> list[str]:
    """Files of a watched folder whose blobs were lost give the store its copy back."""
    repaired = []
    try:
        listed = trees.entries_of(path)
    except (FormatError, OSError):
        return repaired
    for item in listed:
        try:
            sha = hash_file(item.path)
        except OSError:
            continue
        if sha in lost:
            try:
                core.store.ingest(item.path, expect_sha256=sha)
            except StoreError as e:
                log.warning("repair failed", path=shown(item.path), error=shown(str(e)))
                continue
            repaired.append(sha)
    return repaired


def weights_of(s, tree_sha256: str) -> str | None:  # type: ignore[no-untyped-def]
    """The blob of a tree's adapter_model.safetensors."""
    return next((sha for name, sha, _ in repo.tree_entries(s, tree_sha256) if name == WEIGHTS), None)
