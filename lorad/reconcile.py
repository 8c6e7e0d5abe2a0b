"""Disk and records: what a watched file holds, and the records brought to it.

The file on disk is the truth (a folder LoRA's folder: lorad.folders.state). A file holding a known variant's bytes makes that variant active; one
holding bytes lorad never stored is a new original (stored first, never overwritten); one still
being written is left for later; one that is no regular file (a FIFO...) or cannot be read is a
refusal, recorded with its reason and never waited on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import structlog

from lorad.db import repo
from lorad.db.models import Lora, Variant
from lorad.errors import NotRegularFileError
from lorad.formats.safetensors_file import is_complete
from lorad.pathtext import shown
from lorad.refusals import Refusal, refusal_of
from lorad.store import FileStamp, hash_file

if TYPE_CHECKING:
    from lorad.library import Library

log = structlog.get_logger()

FileStateKind = Literal["in-sync", "reconciled", "new-original", "gone", "unsettled", "refused"]


@dataclass(frozen=True)
class FileState:
    """What a watched file holds, once the records have been brought to it."""

    kind: FileStateKind
    variant_id: int | None  # the variant the file holds (None when gone, unsettled or refused)
    previous: int | None  # the active variant the records named before
    sha256: str | None = None
    refusal: Refusal | None = None  # why the file cannot be read (kind "refused")


def unchanged_token(path: Path, before: FileStamp | None) -> str | None:
    """The stamp taken before hashing, if the file still has it (else it moved while hashed)."""
    return before.token if before is not None and FileStamp.of_path(path) == before else None


def file_state(lib: Library, lora_id: int, actor: str, trust_stamp: bool = False) -> FileState:
    """What the watched file of `lora_id` holds, once the records are brought to it. A path
    that is no regular file, or that lorad cannot read, is refused by hash_file (O_NONBLOCK +
    fstat: never waited on) and its refusal recorded.

    trust_stamp: a file whose (device, inode, size, mtime) is the one recorded when lorad last
    knew its contents is taken as unchanged, unhashed: rescans of large libraries stay cheap.
    Everything else (activate, switch, revert, verify) hashes.
    """
    with lib.db.read() as s:
        row = s.get(Lora, lora_id)
        assert row is not None
        if row.kind == "folder":
            from lorad import folders

            return folders.state(lib, lora_id, actor, trust_stamp)
        mirror_path = lib.mirror_of(row)
        if mirror_path is not None:
            from lorad import mirror

            return mirror.state(lib, lora_id, mirror_path, actor, trust_stamp)
        path, active_id, known_stamp = Path(row.path), row.active_variant_id, row.file_stamp
        active = s.get(Variant, active_id) if active_id is not None else None
        active_sha = active.blob_sha256 if active else None
    stamp = FileStamp.of_path(path)
    if trust_stamp and stamp is not None and stamp.token == known_stamp and active_sha:
        return FileState("in-sync", active_id, active_id, active_sha)
    sha = hashed(lib, path, active_id)
    if isinstance(sha, FileState):
        return sha
    token = unchanged_token(path, stamp)
    state = held(lib, lora_id, sha, active_id, active_sha, known_stamp, token, actor)
    if state is not None:
        return state
    if not is_complete(path):
        return FileState("unsettled", None, active_id, sha)  # being written: nothing to adopt yet
    new_id = adopt_new_original(lib, lora_id, path, active_id, actor)
    return FileState("new-original", new_id, active_id, sha)


def held(lib: Library, lora_id: int, sha: str, active_id: int | None, active_sha: str | None,
         known_stamp: str | None, token: str | None, actor: str) -> FileState | None:  # fmt: skip
    """The state when the path holds `sha`, a stored variant of the LoRA: the active one ("in-sync",
    its stamp recorded) or another, which becomes active ("reconciled"). None when lorad never
    stored these bytes for it."""
    if sha == active_sha:
        record_stamp(lib, lora_id, known_stamp, token)
        return FileState("in-sync", active_id, active_id, sha)
    with lib.db.read() as s:
        known = repo.variant_with_blob(s, lora_id, sha)
        known_id = known.id if known else None
    if known_id is None:
        return None
    record_reconciled(lib, lora_id, active_id, known_id, actor, token)
    return FileState("reconciled", known_id, active_id, sha)


def hashed(lib: Library, path: Path, active_id: int | None, digest: Callable[[Path], str] = hash_file,
           refused: tuple[type[Exception], ...] = (NotRegularFileError, OSError)) -> str | FileState:  # fmt: skip
    """The sha256 of what is at `path` (`digest`), or the state that says why there is none: gone,
    or refused (no regular file, unreadable...), the refusal recorded."""
    try:
        return digest(path)
    except FileNotFoundError:
        return FileState("gone", None, active_id)
    except refused as e:
        refusal = refusal_of(e, path)
        lib.record_refusal(path, refusal)
        return FileState("refused", None, active_id, refusal=refusal)


def record_stamp(lib: Library, lora_id: int, old: str | None, new: str | None) -> None:
    if new is not None and new != old:
        with lib.db.write() as s:
            row = s.get(Lora, lora_id)
            assert row is not None
            row.file_stamp = new


def record_reconciled(lib: Library, lora_id: int, old: int | None, new: int, actor: str, token: str | None) -> None:
    with lib.db.write() as s:
        row = s.get(Lora, lora_id)
        assert row is not None
        repo.set_active(s, row, s.get(Variant, new))  # type: ignore[arg-type]
        row.file_stamp = token
        repo.record_event(s, "verified", actor, lora_id, new, reconciled=True,
                          previous_variant=old, reason="the watched file holds this variant")  # fmt: skip


def adopt_new_original(lib: Library, lora_id: int, path: Path, old: int | None, actor: str) -> int:
    stamp = FileStamp.of_path(path)
    info, record = lib.store_file(path)
    with lib.db.write() as s:
        row = s.get(Lora, lora_id)
        assert row is not None
        repo.ensure_blob(s, record)
        variant = repo.original_with_blob(s, row, info.sha256)
        repo.set_original(s, row, variant)
        repo.set_active(s, row, variant)
        row.file_stamp = unchanged_token(path, stamp)
        repo.record_event(s, "ingested", actor, lora_id, variant.id, sha256=info.sha256,
                          bytes=info.bytes, path=str(path), previous_variant=old,
                          reason="changed outside lorad")  # fmt: skip
        log.warning("changed outside lorad", path=shown(path), sha256=info.sha256)
        return variant.id
