"""What a watched LoRA holds (`FileState`), and the record updates every kind of LoRA shares when
the records are brought to it: a known variant made active, a stamp recorded, a new original adopted,
a refusal recorded. lorad.library.reconcile, .folders and .mirror build their states from these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from lorad.errors import NotRegularFileError
from lorad.library.core import Core
from lorad.library.db import repo
from lorad.library.db.models import Lora, Variant
from lorad.library.refusals import Refusal, refusal_of
from lorad.library.store import FileStamp, hash_file
from lorad.pathtext import shown

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


def held(core: Core, lora_id: int, sha: str, active_id: int | None, active_sha: str | None,
         known_stamp: str | None, token: str | None, actor: str) -> FileState | None:  # fmt: skip
    """The state when the path holds `sha`, a stored variant of the LoRA: the active one ("in-sync",
    its stamp recorded) or another, which becomes active ("reconciled"). None when lorad never
    stored these bytes for it."""
    if sha == active_sha:
        record_stamp(core, lora_id, known_stamp, token)
        return FileState("in-sync", active_id, active_id, sha)
    with core.db.read() as s:
        known = repo.variant_with_blob(s, lora_id, sha)
        known_id = known.id if known else None
    if known_id is None:
        return None
    record_reconciled(core, lora_id, active_id, known_id, actor, token)
    return FileState("reconciled", known_id, active_id, sha)


def hashed(core: Core, path: Path, active_id: int | None, digest: Callable[[Path], str] = hash_file,
           refused: tuple[type[Exception], ...] = (NotRegularFileError, OSError)) -> str | FileState:  # fmt: skip
    """The sha256 of what is at `path` (`digest`), or the state that says why there is none: gone,
    or refused (no regular file, unreadable...), the refusal recorded."""
    try:
        return digest(path)
    except FileNotFoundError:
        return FileState("gone", None, active_id)
    except refused as e:
        refusal = refusal_of(e, path)
        core.record_refusal(path, refusal)
        return FileState("refused", None, active_id, refusal=refusal)


def record_stamp(core: Core, lora_id: int, old: str | None, new: str | None) -> None:
    if new is not None and new != old:
        with core.db.write() as s:
            row = s.get(Lora, lora_id)
            assert row is not None
            row.file_stamp = new


def record_reconciled(core: Core, lora_id: int, old: int | None, new: int, actor: str, token: str | None) -> None:
    with core.db.write() as s:
        row = s.get(Lora, lora_id)
        assert row is not None
        repo.set_active(s, row, s.get(Variant, new))  # type: ignore[arg-type]
        row.file_stamp = token
        repo.record_event(s, "verified", actor, lora_id, new, reconciled=True,
                          previous_variant=old, reason="the watched file holds this variant")  # fmt: skip


def adopt_new_original(core: Core, lora_id: int, path: Path, old: int | None, actor: str) -> int:
    stamp = FileStamp.of_path(path)
    info, record = core.store_file(path)
    with core.db.write() as s:
        row = s.get(Lora, lora_id)
        assert row is not None
        core.record_blobs(s, [record], restore=lambda: core.store_file(path, expect_sha256=info.sha256))
        variant = repo.original_with_blob(s, row, info.sha256)
        repo.set_original(s, row, variant)
        repo.set_active(s, row, variant)
        row.file_stamp = unchanged_token(path, stamp)
        repo.record_event(s, "ingested", actor, lora_id, variant.id, sha256=info.sha256,
                          bytes=info.bytes, path=str(path), previous_variant=old,
                          reason="changed outside lorad")  # fmt: skip
        log.warning("changed outside lorad", path=shown(path), sha256=info.sha256)
        return variant.id
