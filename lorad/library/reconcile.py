"""Disk and records: what a watched file holds, and the records brought to it.

The file on disk is the truth (a folder LoRA's folder: lorad.library.folders.state). A file holding a known variant's bytes makes that variant active; one
holding bytes lorad never stored is a new original (stored first, never overwritten); one still
being written is left for later; one that is no regular file (a FIFO...) or cannot be read is a
refusal, recorded with its reason and never waited on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from lorad.engine.formats.safetensors_file import is_complete
from lorad.library import folders, mirror
from lorad.library.core import Core
from lorad.library.db.models import Lora, Refusal, Variant
from lorad.library.states import FileState, adopt_new_original, hashed, held, unchanged_token
from lorad.library.store import FileStamp


def file_state(core: Core, lora_id: int, actor: str, trust_stamp: bool = False) -> FileState:
    """What the watched file of `lora_id` holds, once the records are brought to it. A path
    that is no regular file, or that lorad cannot read, is refused by hash_file (O_NONBLOCK +
    fstat: never waited on) and its refusal recorded.

    trust_stamp: a file whose (device, inode, size, mtime) is the one recorded when lorad last
    knew its contents is taken as unchanged, unhashed: rescans of large libraries stay cheap.
    Everything else (activate, switch, revert, verify) hashes.
    """
    with core.db.read() as s:
        row = s.get(Lora, lora_id)
        assert row is not None
        mirror_path = core.mirror_of(row)
        if mirror_path is not None:
            return mirror.state(core, lora_id, mirror_path, actor, trust_stamp)
        if row.kind == "folder":
            return folders.state(core, lora_id, actor, trust_stamp)
        path, active_id, known_stamp = Path(row.path), row.active_variant_id, row.file_stamp
        active = s.get(Variant, active_id) if active_id is not None else None
        active_sha = active.blob_sha256 if active else None
    stamp = FileStamp.of_path(path)
    if trust_stamp and stamp is not None and stamp.token == known_stamp and active_sha:
        return FileState("in-sync", active_id, active_id, active_sha)
    sha = hashed(core, path, active_id)
    if isinstance(sha, FileState):
        return sha
    token = unchanged_token(path, stamp)
    state = held(core, lora_id, sha, active_id, active_sha, known_stamp, token, actor)
    if state is not None:
        return state
    if not is_complete(path):
        return FileState("unsettled", None, active_id, sha)  # being written: nothing to adopt yet
    new_id = adopt_new_original(core, lora_id, path, active_id, actor)
    return FileState("new-original", new_id, active_id, sha)


def reconcile(core: Core, lora_id: int, actor: str, trust_stamp: bool = False) -> FileState:
    """Bring the records to what the watched file holds, and say what that is; a refusal of
    its path is recorded, or forgotten once the file can be read again."""
    state = file_state(core, lora_id, actor, trust_stamp)
    if state.refusal is None and state.kind != "gone":
        with core.db.read() as s:
            row = s.get(Lora, lora_id)
            path = row.path if row is not None else None
        if path is not None:
            core.clear_refusal(path)
    return state


@dataclass(frozen=True)
class Unchanged:
    """A LoRA file as lorad last knew it (lorad.library.reconcile.unchanged)."""

    lora_id: int
    path: Path
    stat: os.stat_result
    original_sha256: str | None


def unchanged(core: Core) -> list[Unchanged]:
    """The LoRA files whose (device, inode, size, mtime) is the one recorded when lorad last knew
    their contents (in mirror mode, their mirror file's too), found by one query and a stat of
    each: what `reconcile(trust_stamp=True)` would find in sync without hashing, so a restart can
    pass them by unread. Adapter folders, refused paths and files never stamped are left out
    (they are looked at as usual)."""
    original = select(Variant.blob_sha256).where(Variant.id == Lora.original_variant_id).scalar_subquery()
    refused = select(Refusal.id).where(Refusal.path == Lora.path).exists()
    query = (select(Lora.id, Lora.path, Lora.folder, Lora.file_stamp, Lora.mirror_stamp, original)
             .where(Lora.kind == "file", Lora.file_stamp.is_not(None), Lora.active_variant_id.is_not(None), ~refused))  # fmt: skip
    with core.db.read() as s:
        rows = s.execute(query).all()
    found = []
    for lora_id, path, folder, file_stamp, mirror_stamp, original_sha in rows:
        st = _stat(path)
        if st is None or FileStamp.of(st).token != file_stamp:
            continue
        mirror_to = core.mirrors.get(Path(folder))
        if mirror_to is not None:
            mirrored = _stat(mirror_to / Path(path).relative_to(folder))
            if mirrored is None or FileStamp.of(mirrored).token != mirror_stamp:
                continue
        found.append(Unchanged(lora_id, Path(path), st, original_sha))
    return found


def _stat(path: str | Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None
