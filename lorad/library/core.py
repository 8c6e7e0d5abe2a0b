"""What every library operation shares: the store, the database, the lock and the swap area, and
the few record writes the library's helpers (folders, mirror, reconcile, upkeep) make themselves.

`Library` owns one `Core` and passes it to those helpers, so they depend on this small object and
not on the `Library` that calls them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from sqlalchemy import text
from sqlalchemy.orm import Session

from lorad.engine.formats.detect import detect_format
from lorad.engine.formats.keys import group_keys, parse_key
from lorad.engine.formats.safetensors_file import Header, file_data_sha256, read_header
from lorad.errors import LoradError, StoreError, TransientError
from lorad.library.db import repo
from lorad.library.db.models import Lora
from lorad.library.db.session import Database
from lorad.library.refusals import Refusal
from lorad.library.sidecars import read_claims
from lorad.library.store import BlobInfo, FileStamp, Store

log = structlog.get_logger()

PUT_LOCK_SPACE = 0x6C6F7261  # "lora": the first key of the advisory lock a put takes (PostgreSQL)

# The first key of the per-blob advisory locks (PostgreSQL): a writer recording a blob holds its
# lock shared for the transaction that names it; gc holds it exclusively while it deletes the blob's
# row and file (lorad.library.upkeep). The second key is the sha256's first 32 bits.
BLOB_LOCK_SPACE = 0x626C6F62  # "blob"


def blob_lock_key(sha256: str) -> int:
    """The second key of a blob's advisory lock: a signed 32-bit integer from its sha256 (two blobs
    sharing one only wait on each other, harmlessly)."""
    return int(sha256[:8], 16) - (1 << 31)


class BlobCollected(StoreError, TransientError):
    """A blob stored for this operation was collected by gc (on another node) before the operation
    named it: store it again and retry."""


def header_ranks(header: Header) -> tuple[int, ...]:
    """The ranks of a file's LoRA modules (those with both factors), from its header."""
    groups, _ = group_keys(header.tensors)
    shapes = [header.tensors[g.roles["down"]].shape for g in groups.values() if {"up", "down"} <= set(g.roles)]
    return tuple(shape[0] for shape in shapes if shape)


def blob_record(
    sha256: str, size: int, data_sha256: str | None, header: Header, blake3: str | None = None
) -> repo.BlobRecord:
    modules = {k.module for k in map(parse_key, header.tensors) if k and k.role not in ("alpha", "scale")}
    try:
        ranks: tuple[int, ...] | None = header_ranks(header)
    except LoradError:
        ranks = None  # keys lorad cannot group: stored all the same, its ranks unknown
    return repo.BlobRecord(
        sha256=sha256,
        bytes=size,
        data_sha256=data_sha256 or "",
        format=detect_format(header.tensors, header.metadata),
        modules=len(modules),
        sshs_model_hash=header.metadata.get("sshs_model_hash"),
        sshs_legacy_hash=header.metadata.get("sshs_legacy_hash"),
        blake3=blake3,
        ranks=ranks,
    )


@dataclass
class Core:
    db: Database
    store: Store
    swap_area: Path  # where adapter folders are built before they are swapped in (folder_swap)
    mirrors: Mapping[Path, Path]  # watched root -> mirror_to, for the roots in mirror mode
    # Reentrant: verify and gc (upkeep) hold it around the library's own operations.
    lock: threading.RLock = field(default_factory=threading.RLock)

    def store_file(self, path: Path, expect_sha256: str | None = None) -> tuple[BlobInfo, repo.BlobRecord]:
        """Copy a complete safetensors file into the store; describe the bytes actually stored."""
        before = read_header(path)
        info = self.store.ingest(path, data_offset=before.data_offset, expect_sha256=expect_sha256)
        # Parse what was stored, not what was looked at: the file may have changed in between.
        header = read_header(self.store.path_of(info.sha256))
        data_sha256 = info.data_sha256
        if header.data_offset != before.data_offset:
            data_sha256 = file_data_sha256(self.store.path_of(info.sha256), header)
        return info, blob_record(info.sha256, info.bytes, data_sha256, header, info.blake3)

    def record_blobs(
        self, s: Session, records: Iterable[repo.BlobRecord], restore: Callable[[], object] | None = None
    ) -> None:
        """Record stored blobs in the transaction `s` that is about to name them (a variant, a tree).

        gc on another node may have removed a blob between its storing and now (it was unrecorded,
        or recorded and unreferenced, and past gc's grace). So, on PostgreSQL, hold each blob's
        advisory lock shared until `s` ends (gc deletes a row and its file only holding it
        exclusively), then make sure each file is still in the store; if one is not, `restore()`
        stores them again (under the locks, so gc cannot take them twice), else BlobCollected (a
        TransientError: the caller's retry stores them again). Once this returns, gc sees the
        reference `s` commits (it plans again under its locks) or waits for `s` to end. On SQLite the write lock that
        `s` holds does the same (gc writes under it)."""
        records = list(records)
        shas = sorted({r.sha256 for r in records})
        if not self.db.is_sqlite:
            for sha in shas:
                s.execute(text("SELECT pg_advisory_xact_lock_shared(CAST(:space AS integer), CAST(:key AS integer))"),
                          {"space": BLOB_LOCK_SPACE, "key": blob_lock_key(sha)})  # fmt: skip
        for record in records:
            repo.ensure_blob(s, record)
        gone = [sha for sha in shas if not self.store.present(sha)]
        if gone and restore is not None:
            log.info("a blob gc took before it was recorded is stored again", sha256=gone[0])
            restore()
            gone = [sha for sha in gone if not self.store.present(sha)]
        if gone:
            raise BlobCollected(f"blob {gone[0][:12]} was collected by gc before it was recorded; storing it again")

    def mirror_of(self, row: Lora) -> Path | None:
        """Where a LoRA's active variant is written when its folder is in mirror mode, else None."""
        mirror = self.mirrors.get(Path(row.folder))
        return mirror / Path(row.path).relative_to(row.folder) if mirror is not None else None

    def quarantine(
        self, sha256: str, actor: str, lora_id: int | None = None, variant_id: int | None = None
    ) -> None:
        try:
            dest = self.store.quarantine(sha256)
        except FileNotFoundError:
            return
        with self.db.write() as s:
            repo.record_event(s, "quarantined", actor, lora_id, variant_id, sha256=sha256, moved_to=str(dest))

    def refresh_claims(self, lora_id: int) -> int:
        """Record the hashes that sidecars beside a LoRA's file claim (lorad.library.sidecars) and
        that are not recorded yet; how many were new. Sidecars are only read; claims are kept when a
        sidecar changes or goes (an old hash still leads to the LoRA)."""
        with self.db.read() as s:
            row = s.get(Lora, lora_id)
            assert row is not None
            path = Path(row.path)
            known = repo.claims_of(s, lora_id)
            own = {h for v in repo.variants_of(s, lora_id) if v.kind == "original"
                   for h in (v.blob_sha256, v.blob_sha256[:10])}  # fmt: skip
        new = [c for c in ((c.kind, c.value, c.source) for c in read_claims(path, own)) if c not in known]
        if not new:
            return 0
        with self.db.write() as s:
            return repo.add_claims(s, lora_id, new)

    # -- refusals --------------------------------------------------------------------------------

    def record_refusal(self, path: str | os.PathLike[str], refusal: Refusal) -> None:
        """Record why a watched path is not taken (one row per path, replaced when the cause or
        reason changes). `path` as found in the folder: a symlink's own name, not its target."""
        where = os.path.abspath(path)
        with self.db.read() as s:
            row = repo.refusal_at(s, where)
            if row is not None and (row.cause, row.reason) == (refusal.cause, refusal.reason):
                return  # known already: no write (verify meets the same refusal at every pass)
        stamp = FileStamp.of_path(Path(where))
        with self.db.write() as s:
            repo.record_refusal(s, where, refusal.cause, refusal.reason, stamp.token if stamp else None)

    def clear_refusal(self, path: str | os.PathLike[str]) -> None:
        where = os.path.abspath(path)
        with self.db.read() as s:
            if repo.refusal_at(s, where) is None:
                return  # the usual case: no write for it
        with self.db.write() as s:
            repo.clear_refusal(s, where)
