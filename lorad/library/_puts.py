"""Putting a chosen variant at a LoRA's watched path (activate, switch, revert): the records are
first brought to what the path holds, lorad writes only over bytes it has stored, and the write is
recorded after it lands. A mirrored LoRA's variant goes to its mirror; the watched file is never
written."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import structlog
from sqlalchemy import text

from lorad.errors import StoreError
from lorad.library import folder_swap, folders, trees
from lorad.library._audit import failure_recorded
from lorad.library._refs import LoraRef, Refs
from lorad.library.core import PUT_LOCK_SPACE, Core
from lorad.library.db import repo
from lorad.library.db.models import Lora, Variant
from lorad.library.reconcile import reconcile
from lorad.library.records import LoraView
from lorad.library.store import CorruptBlob, FileStamp, TargetChanged, _crashpoint
from lorad.pathtext import shown

log = structlog.get_logger()

SwitchKind = Literal["activated", "reverted", "switched"]


class Puts:
    def __init__(self, core: Core, refs: Refs, view: Callable[[int], LoraView]) -> None:
        """view: the LoRA's view, as a put returns it."""
        self.core, self.refs, self.view = core, refs, view
        self._serialising: set[int] = set()  # the LoRAs whose put lock this process holds (under core.lock)

    def put(self, ref: LoraRef, choose: Callable[[Lora], int | None], kind: SwitchKind, actor: str) -> LoraView:
        """Put the variant `choose` picks from the LoRA's row at its path; `kind` is the event."""
        op = {"activated": "activate", "reverted": "revert", "switched": "switch"}[kind]
        with self.core.lock, failure_recorded(self.core.db, self.refs, op, actor, ref):
            with self.core.db.read() as s:
                lora_id = self.refs.find_lora(s, ref).id
            with self.serialised(lora_id):
                return self._put_now(lora_id, choose, kind, actor)

    def _put_now(self, lora_id: int, choose: Callable[[Lora], int | None], kind: SwitchKind, actor: str) -> LoraView:
        with self.core.db.read() as s:
            row = self.refs.find_lora(s, lora_id)
            path, is_folder = Path(row.path), row.kind == "folder"
            mirror_path = self.core.mirror_of(row)
            wanted = self.refs.variant_of(s, row, choose(row))
        self.refs.watched(path)  # a folder dropped from the config is no longer lorad's to write
        target = mirror_path or path  # in mirror mode the watched file is never written
        stamp, current = self._settled_state(lora_id, target, actor, is_folder, mirrored=mirror_path is not None)
        if current != wanted.id:
            _crashpoint("put:before-materialize")
            self._materialize(wanted, target, stamp, actor)
        written = _stamp_token(target, is_folder)  # what lorad itself just put there
        with self.core.db.write() as s:
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
        return self.view(lora_id)

    @contextmanager
    def serialised(self, lora_id: int) -> Iterator[None]:
        """One put (activate, revert, switch) of a LoRA at a time across the fleet, from reading
        what its file holds to recording what was written. In one process `core.lock` does it; on
        PostgreSQL, nodes also take a transaction-scoped advisory lock keyed by the LoRA's id, held
        on a connection of its own for the whole put. (Not a row lock on `loras`: the put's own
        transactions update that row, and would wait on it.) PostgreSQL releases it when the
        transaction ends or the node's connection dies. SQLite serves one node: the local lock is
        all there is to take."""
        db = self.core.db
        if db.is_sqlite or lora_id in self._serialising:
            yield
            return
        # A lock wait past lock_timeout: DatabaseUnavailable; a lost connection: DatabaseLost.
        with db.guard(), db.engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT pg_advisory_xact_lock(CAST(:space AS integer), CAST(:id AS integer))"), {"space": PUT_LOCK_SPACE, "id": lora_id})
            self._serialising.add(lora_id)
            try:
                yield
            finally:
                self._serialising.discard(lora_id)

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
            folder_swap.recover(path, self.core.swap_area)  # else an interrupted swap reads as "gone"
            stamp = trees.stamp_of(path)
        else:
            try:
                stamp = FileStamp.of(os.stat(path))
            except FileNotFoundError:
                stamp = None
        state = reconcile(self.core, lora_id, actor)
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
                self.core.store.materialize(wanted.blob_sha256, path, expect=stamp)
        except CorruptBlob as e:
            self.core.quarantine(e.sha256, actor, wanted.lora_id, wanted.id)
            raise StoreError(
                f"{path}: variant {wanted.id}'s stored bytes are corrupt (moved to the store's bad/); "
                "the file was left as it was"
            ) from e
        except TargetChanged:
            reconcile(self.core, wanted.lora_id, actor)
            raise

    def gone(self, path: str | os.PathLike[str], actor: str) -> None:
        where = os.path.abspath(path)
        with self.core.lock:
            with self.core.db.read() as s:
                row = repo.lora_by_path(s, where)
                if row is None or self.core.mirror_of(row) is None:
                    return
                lora_id = row.id
            if not os.path.lexists(where):
                reconcile(self.core, lora_id, actor)


def _stamp_token(path: Path, is_folder: bool) -> str | None:
    if is_folder:
        return trees.stamp_of(path)
    stamp = FileStamp.of_path(path)
    return stamp.token if stamp else None
