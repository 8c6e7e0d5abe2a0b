"""Mirror mode: a watched folder whose files lorad never writes.

In a folder configured `mode: mirror` with `mirror_to: DIR`, each LoRA file stays exactly as the
user put it (library managers that track it by hash keep their link), and the active variant is
written at the same relative path under DIR, where the user's tools are pointed instead
(ComfyUI's extra_model_paths.yaml, A1111's --lora-dir). The records then mean:

  - the watched file holds the LoRA's original: bytes lorad has not stored become a new original
    (stored first, as in replace mode), and the mirror is brought to it;
  - the mirror file holds the active variant. A missing mirror file is written; one holding
    another stored variant of the LoRA (an activation killed between its rename and its commit)
    makes that variant active, as the disk is the truth; one holding bytes lorad did not write is
    refused and left alone.

Sidecars beside the watched file (.metadata.json, .civitai.info, .cm-info.json) are copied beside
the mirror file when it has none; one already there (a manager pointed at the mirror writes its
own) is never overwritten. When the watched file is deleted, the mirror file is removed if it
holds a variant lorad stored (its records and blobs stay until gc); sidecars there are left.

An adapter folder is mirrored the same way: the watched folder keeps the original, and the
active variant's folder is at the same relative path under mirror_to, replaced whole as in place
(lorad.library.folder_swap: a reader of the mirror sees one variant's folder or the other's).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import structlog

from lorad._atomic import replacing
from lorad.engine.formats.safetensors_file import is_complete
from lorad.errors import FormatError, NotRegularFileError
from lorad.library import adapter_folder, folder_swap, folders, trees
from lorad.library.core import Core
from lorad.library.db import repo
from lorad.library.db.models import Lora, Variant
from lorad.library.refusals import INVALID, Refusal, refusal_of
from lorad.library.sidecars import sidecar_paths
from lorad.library.states import FileState, adopt_new_original, hashed
from lorad.library.store import FileStamp, TargetChanged, _current_umask, hash_file
from lorad.pathtext import shown

log = structlog.get_logger()


def state(core: Core, lora_id: int, mirror: Path, actor: str, trust_stamp: bool = False) -> FileState:
    """Bring the records to the watched file (the original) and the mirror file (the active
    variant), writing the mirror where it is missing or must follow a new original. The state
    returned is the mirror's: the variant it holds (kinds as lorad.library.reconcile.FileState; a new
    original in the watched file is "new-original"). An adapter folder's the same, its mirror a
    folder swapped whole."""
    with core.db.read() as s:
        row = s.get(Lora, lora_id)
        assert row is not None
        path, active_id, shape = Path(row.path), row.active_variant_id, _FOLDER if row.kind == "folder" else _FILE
    watched = _watched_state(core, lora_id, path, actor, trust_stamp, shape)
    if watched.kind in ("gone", "refused", "unsettled"):
        if watched.kind == "gone":
            _remove_mirror(core, lora_id, mirror, shape)
        return FileState(watched.kind, None, active_id, refusal=watched.refusal)
    held = _mirror_state(core, lora_id, path, mirror, actor, trust_stamp, watched.kind == "new-original", shape)
    if shape is _FILE:
        _copy_sidecars(path, mirror)
    if watched.kind == "new-original" and held.kind != "refused":
        return FileState("new-original", held.variant_id, active_id, held.sha256)
    return held


class _Shape:
    """What differs between a mirrored file and a mirrored adapter folder."""

    refused: tuple[type[Exception], ...]  # what `digest` raises for a path lorad cannot take

    def stamp(self, path: Path) -> str | None:
        """A cheap token that moves whenever the contents may have (None: nothing there)."""
        raise NotImplementedError

    def digest(self, path: Path) -> str:
        """The sha256 of the contents (a folder's: its tree's)."""
        raise NotImplementedError

    def complete(self, path: Path) -> bool:
        raise NotImplementedError

    def adopt(self, core: Core, lora_id: int, path: Path, actor: str) -> int:
        """Store it as the LoRA's new original, made active; the variant's id."""
        raise NotImplementedError

    def put(self, core: Core, lora_id: int, sha256: str, mirror: Path, expect: str | None, actor: str) -> None:
        """Write a stored variant at the mirror, atomically; `expect`: the mirror's stamp when its
        contents were last checked (None: there is none)."""
        raise NotImplementedError

    def absent(self, path: Path) -> bool:
        """Nothing is there: lorad writes the mirror (a path holding what lorad cannot read is
        refused instead)."""
        raise NotImplementedError

    def recover(self, core: Core, mirror: Path) -> None:
        """Undo what an interrupted write of the mirror left half done."""

    def remove(self, core: Core, mirror: Path) -> None:
        raise NotImplementedError


class _File(_Shape):
    refused = (NotRegularFileError, OSError)

    def stamp(self, path: Path) -> str | None:
        stamp = FileStamp.of_path(path)
        return stamp.token if stamp else None

    def digest(self, path: Path) -> str:
        return hash_file(path)

    def absent(self, path: Path) -> bool:
        return FileStamp.of_path(path) is None  # a dangling symlink too: replaced by the file

    def complete(self, path: Path) -> bool:
        return is_complete(path)

    def adopt(self, core: Core, lora_id: int, path: Path, actor: str) -> int:
        return adopt_new_original(core, lora_id, path, None, actor)

    def put(self, core: Core, lora_id: int, sha256: str, mirror: Path, expect: str | None, actor: str) -> None:
        mirror.parent.mkdir(parents=True, exist_ok=True)
        current = FileStamp.of_path(mirror)
        if expect is not None and (current is None or current.token != expect):
            raise TargetChanged(f"{mirror}: changed while lorad was replacing it; left as it is")
        core.store.materialize(sha256, mirror, expect=current if expect is not None else None)

    def remove(self, core: Core, mirror: Path) -> None:
        mirror.unlink(missing_ok=True)


class _Folder(_Shape):
    refused = (FormatError, OSError)

    def stamp(self, path: Path) -> str | None:
        return trees.stamp_of(path)

    def digest(self, path: Path) -> str:
        return trees.hash_folder(path)[0]

    def absent(self, path: Path) -> bool:
        return not os.path.lexists(path)

    def complete(self, path: Path) -> bool:
        try:
            adapter_folder.check(path)
        except (FormatError, OSError):
            return False  # being copied, or half edited
        return True

    def adopt(self, core: Core, lora_id: int, path: Path, actor: str) -> int:
        return folders.adopt_new_original(core, lora_id, path, None, actor)

    def put(self, core: Core, lora_id: int, sha256: str, mirror: Path, expect: str | None, actor: str) -> None:
        if expect is None:  # a new folder's mode, as a new mirror file's: what the umask allows
            folders.put_new(core, sha256, mirror, 0o777 & ~_current_umask())
        else:
            folders.put(core, lora_id, sha256, mirror, expect, actor)

    def recover(self, core: Core, mirror: Path) -> None:
        folder_swap.recover(mirror, core.swap_area)

    def remove(self, core: Core, mirror: Path) -> None:
        folder_swap.remove(mirror, core.swap_area)


_FILE, _FOLDER = _File(), _Folder()


def _watched_state(core: Core, lora_id: int, path: Path, actor: str, trust_stamp: bool, shape: _Shape) -> FileState:
    with core.db.read() as s:
        row = s.get(Lora, lora_id)
        assert row is not None
        original_id, known_stamp = row.original_variant_id, row.file_stamp
        original = s.get(Variant, original_id) if original_id else None
        original_sha = original.blob_sha256 if original else None
    stamp = shape.stamp(path)
    if trust_stamp and stamp is not None and stamp == known_stamp and original_sha:
        return FileState("in-sync", original_id, None, original_sha)
    sha = hashed(core, path, None, digest=shape.digest, refused=shape.refused)
    if isinstance(sha, FileState):
        return sha
    token = stamp if shape.stamp(path) == stamp else None  # else it moved while hashed
    if sha == original_sha:
        _set(core, lora_id, file_stamp=token)
        return FileState("in-sync", original_id, None, sha)
    with core.db.read() as s:
        known = repo.variant_with_blob(s, lora_id, sha)
        known_id, known_kind = (known.id, known.kind) if known else (None, None)
    if known_kind == "original":  # an earlier original put back: it is the original again
        with core.db.write() as s:
            lora = s.get(Lora, lora_id)
            assert lora is not None
            repo.set_original(s, lora, s.get(Variant, known_id))  # type: ignore[arg-type]
            lora.file_stamp = token
        return FileState("in-sync", known_id, None, sha)
    if known_id is not None:
        refusal = Refusal(INVALID, f"holds variant {known_id}, a reduction lorad made, where the original belongs "
                                   "(in mirror mode the watched file is the original; put it back)")  # fmt: skip
        core.record_refusal(path, refusal)
        return FileState("refused", None, None, refusal=refusal)
    if not shape.complete(path):
        return FileState("unsettled", None, None, sha)
    new_id = shape.adopt(core, lora_id, path, actor)
    return FileState("new-original", new_id, None, sha)


def _mirror_state(core: Core, lora_id: int, path: Path, mirror: Path, actor: str, trust_stamp: bool,
                  follow: bool, shape: _Shape) -> FileState:  # fmt: skip
    """What the mirror holds, after writing the active variant there when it is missing or (with
    `follow`: a new original was just adopted) when it holds another stored variant."""
    with core.db.read() as s:
        row = s.get(Lora, lora_id)
        assert row is not None
        active = s.get(Variant, row.active_variant_id)
        assert active is not None
        active_id, active_sha, known_stamp = active.id, active.blob_sha256, row.mirror_stamp
    shape.recover(core, mirror)
    if shape.absent(mirror):
        write(core, lora_id, active_sha, mirror, None, shape, actor)
        return FileState("in-sync", active_id, active_id, active_sha)
    stamp = shape.stamp(mirror)
    if trust_stamp and stamp is not None and stamp == known_stamp:
        return FileState("in-sync", active_id, active_id, active_sha)
    try:
        sha = shape.digest(mirror)
    except shape.refused as e:
        refusal = refusal_of(e, mirror)
        core.record_refusal(path, Refusal(refusal.cause, f"its mirror {mirror}: {refusal.reason}"))
        return FileState("refused", None, active_id, refusal=refusal)
    token = stamp if shape.stamp(mirror) == stamp else None
    if sha == active_sha:
        _set(core, lora_id, mirror_stamp=token, mirror_path=mirror)
        return FileState("in-sync", active_id, active_id, sha)
    with core.db.read() as s:
        known = repo.variant_with_blob(s, lora_id, sha)
        known_id = known.id if known else None
    if known_id is None:
        refusal = Refusal(INVALID, f"its mirror {mirror} holds a file lorad did not write; left as it is "
                                   "(move it away, then `lorad verify`)")  # fmt: skip
        core.record_refusal(path, refusal)
        return FileState("refused", None, active_id, refusal=refusal)
    if follow:
        write(core, lora_id, active_sha, mirror, stamp, shape, actor)
        return FileState("in-sync", active_id, active_id, active_sha)
    with core.db.write() as s:
        lora = s.get(Lora, lora_id)
        assert lora is not None
        repo.set_active(s, lora, s.get(Variant, known_id))  # type: ignore[arg-type]
        lora.mirror_stamp, lora.mirror_path = token, str(mirror)
        repo.record_event(s, "verified", actor, lora_id, known_id, reconciled=True, previous_variant=active_id,
                          reason="the mirror file holds this variant", path=str(mirror))  # fmt: skip
    return FileState("reconciled", known_id, active_id, sha)


def write(core: Core, lora_id: int, sha256: str, mirror: Path, expect: str | None, shape: _Shape,
          actor: str) -> str | None:  # fmt: skip
    """Put a stored variant at the mirror path (atomically, its folders made as needed) and record
    the mirror's stamp; the stamp's token."""
    shape.put(core, lora_id, sha256, mirror, expect, actor)
    token = shape.stamp(mirror)
    _set(core, lora_id, mirror_stamp=token, mirror_path=mirror)
    log.info("mirrored", path=shown(mirror), sha256=sha256)
    return token


def _remove_mirror(core: Core, lora_id: int, mirror: Path, shape: _Shape) -> None:
    """The watched file is gone: remove its mirror if it holds a variant lorad stored."""
    shape.recover(core, mirror)
    try:
        sha = shape.digest(mirror)
    except shape.refused:
        return
    with core.db.read() as s:
        if repo.variant_with_blob(s, lora_id, sha) is None:
            return  # not lorad's: left alone
    shape.remove(core, mirror)
    _set(core, lora_id, mirror_stamp=None)
    log.info("removed the mirror of a deleted LoRA", path=shown(mirror))


def _copy_sidecars(path: Path, mirror: Path) -> None:
    for source, dest in zip(sidecar_paths(path), sidecar_paths(mirror)):
        if source.is_file() and not os.path.lexists(dest):
            try:
                with replacing(dest) as tmp:
                    shutil.copyfile(source, tmp)
            except OSError as e:
                log.warning("could not copy a sidecar to the mirror", path=shown(dest), error=shown(str(e)))


def _set(core: Core, lora_id: int, **columns: object) -> None:
    """Record columns of the LoRA's row, writing only when one changes."""
    wanted = {name: str(value) if isinstance(value, Path) else value for name, value in columns.items()}
    with core.db.read() as s:
        lora = s.get(Lora, lora_id)
        assert lora is not None
        if all(getattr(lora, name) == value for name, value in wanted.items()):
            return
    with core.db.write() as s:
        lora = s.get(Lora, lora_id)
        assert lora is not None
        for name, value in wanted.items():
            setattr(lora, name, value)
