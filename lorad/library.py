"""The library: watched LoRAs, their stored variants, and the operations on them.

It joins the blob store (bytes) and the database (records). Every operation is crash-safe in the
same way: bytes reach the store (complete or absent) before any record names them, and a watched
file is replaced by an atomic rename before the database says so. So a crash leaves the old state
or the new one; where disk and database then disagree, the file on disk is the truth and `verify`
brings the records to it: a watched file holding a known variant's bytes makes that variant active,
and one holding unknown bytes is a new original (stored, never overwritten).

Only one Library per state directory should mutate at a time (the daemon); within it, operations
are serialised by a lock.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import structlog
from sqlalchemy.orm import Session

from lorad._atomic import is_temp_name, temp_name
from lorad.db import repo
from lorad.db.models import Blob, Lora, Variant, utcnow
from lorad.db.session import Database, default_url
from lorad.errors import LoradError, StoreError
from lorad.formats.detect import detect_format
from lorad.formats.keys import parse_key
from lorad.formats.safetensors_file import Header, file_data_sha256, is_complete, read_header
from lorad.records import (
    EventView,
    GcPlan,
    LoraView,
    Reconciled,
    VariantView,
    VerifyReport,
    event_view,
    lora_view,
    variant_view,
)
from lorad.report import Report
from lorad.store import (
    BlobInfo,
    CorruptBlob,
    FileStamp,
    LinkMode,
    Store,
    TargetChanged,
    _crashpoint,
    hash_file,
)

log = structlog.get_logger()

LoraRef = int | str | os.PathLike[str]
SwitchKind = Literal["activated", "reverted", "switched"]
FileStateKind = Literal["in-sync", "reconciled", "new-original", "gone", "unsettled"]


# -- plain results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileState:
    """What a watched file holds, once the records have been brought to it."""

    kind: FileStateKind
    variant_id: int | None  # the variant the file holds (None when gone or unsettled)
    previous: int | None  # the active variant the records named before
    sha256: str | None = None


@dataclass(frozen=True)
class _KeepRule:
    default: int
    by_policy: dict[str, int]

    def count(self, policy: str | None) -> int:
        return self.by_policy.get(policy, self.default) if policy is not None else self.default


@dataclass
class _VerifyTally:
    corrupt: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    reconciled: list[Reconciled] = field(default_factory=list)
    missing_files: list[Path] = field(default_factory=list)
    unsettled: list[Path] = field(default_factory=list)
    temp_removed: list[Path] = field(default_factory=list)


def _blob_record(sha256: str, size: int, data_sha256: str | None, header: Header) -> repo.BlobRecord:
    modules = {k.module for k in map(parse_key, header.tensors) if k and k.role not in ("alpha", "scale")}
    return repo.BlobRecord(
        sha256=sha256,
        bytes=size,
        data_sha256=data_sha256 or "",
        format=detect_format(header.tensors, header.metadata),
        modules=len(modules),
        sshs_model_hash=header.metadata.get("sshs_model_hash"),
        sshs_legacy_hash=header.metadata.get("sshs_legacy_hash"),
    )


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
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.roots = tuple(Path(r).resolve() for r in watched_roots)
        self.database_url = database_url or default_url(self.state_dir)
        if migrate_on_open:
            from lorad.db import migrate  # Alembic is only needed here: keep it out of a bare import

            migrate.upgrade(self.database_url)
        self.store = Store(self.state_dir / "store", link_mode)
        self.db = Database(self.database_url)
        self._lock = threading.RLock()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------

    def loras(self) -> list[LoraView]:
        with self.db.read() as s:
            return [lora_view(s, lora) for lora in repo.all_loras(s)]

    def lora(self, ref: LoraRef) -> LoraView:
        with self.db.read() as s:
            return lora_view(s, self._find_lora(s, ref))

    def events(self, lora: LoraRef | None = None, limit: int | None = None) -> list[EventView]:
        with self.db.read() as s:
            lora_id = self._find_lora(s, lora).id if lora is not None else None
            return [event_view(e) for e in repo.events(s, lora_id=lora_id, limit=limit)]

    def find(self, hash_text: str) -> list[LoraView]:
        """LoRAs with a variant whose blob a hash names (sha256 or prefix, AutoV2/V3, sshs)."""
        with self.db.read() as s:
            found: dict[int, LoraView] = {}
            for blob in repo.find_blobs(s, hash_text):
                for v in repo.variants_with_blob(s, blob.sha256):
                    lora = s.get(Lora, v.lora_id)
                    if lora is not None and lora.id not in found:
                        found[lora.id] = lora_view(s, lora)
            return list(found.values())

    def module_metrics(self, variant_id: int) -> list[dict[str, Any]]:
        with self.db.read() as s:
            return [
                {c: getattr(m, c) for c in ("name", "kind", "rank_in", "rank_out", "fro_retained",
                                            "rel_error", "params_in", "params_out", "skipped")}
                for m in repo.module_metrics_of(s, variant_id)
            ]  # fmt: skip

    # -- ingest ------------------------------------------------------------------------------------

    def ingest(
        self, path: str | os.PathLike[str], policy: str | None = None, actor: str = "library"
    ) -> LoraView:
        """Store a watched file as an original (idempotent: a known file changes nothing)."""
        with self._lock, self._failure_recorded("ingest", actor, path):
            target, root = self._watched(path)
            if not target.is_file():
                raise StoreError(f"{target}: not a regular file")
            with self.db.read() as s:
                lora = repo.lora_by_path(s, str(target))
                lora_id = lora.id if lora else None
            if lora_id is not None:
                self._reconcile(lora_id, actor, trust_stamp=True)
                return self.lora(lora_id)
            stamp = FileStamp.of_path(target)
            info, record = self._store_file(target)
            _crashpoint("ingest:after-store")
            with self.db.write() as s:
                lora = repo.lora_by_path(s, str(target)) or repo.add_lora(s, str(target), str(root), policy)
                repo.ensure_blob(s, record)
                variant = repo.original_with_blob(s, lora, info.sha256)
                repo.set_original(s, lora, variant)
                repo.set_active(s, lora, variant)
                lora.file_stamp = _unchanged_token(target, stamp)
                repo.record_event(s, "ingested", actor, lora.id, variant.id, sha256=info.sha256,
                                  bytes=info.bytes, path=str(target))  # fmt: skip
                lora_id = lora.id
            _crashpoint("ingest:after-commit")
            log.info("ingested", path=str(target), sha256=info.sha256)
            return self.lora(lora_id)

    def _store_file(self, path: Path, expect_sha256: str | None = None) -> tuple[BlobInfo, repo.BlobRecord]:
        """Copy a complete safetensors file into the store; describe the bytes actually stored."""
        before = read_header(path)
        info = self.store.ingest(path, data_offset=before.data_offset, expect_sha256=expect_sha256)
        # Parse what was stored, not what was looked at: the file may have changed in between.
        header = read_header(self.store.path_of(info.sha256))
        data_sha256 = info.data_sha256
        if header.data_offset != before.data_offset:
            data_sha256 = file_data_sha256(self.store.path_of(info.sha256), header)
        return info, _blob_record(info.sha256, info.bytes, data_sha256, header)

    def add_variant(self, lora: LoraRef, report: Report, actor: str = "library") -> VariantView:
        """Store a reduction's output file as a variant of `lora` with its metrics (not activated)."""
        with self._lock, self._failure_recorded("add_variant", actor, lora):
            if report.output is None:
                raise StoreError("the report describes no output file (a plan?); nothing to add")
            out = Path(report.output.path)
            with self.db.read() as s:
                lora_id = self._find_lora(s, lora).id
                source = repo.variant_with_blob(s, lora_id, report.input.sha256)
                if source is None:
                    raise StoreError(
                        f"the reduction's input ({report.input.sha256[:12]}) is not a stored variant "
                        "of this LoRA; not added"
                    )
            info, record = self._store_file(out, expect_sha256=report.output.sha256)
            _crashpoint("add_variant:after-store")
            with self.db.write() as s:
                row = s.get(Lora, lora_id)
                assert row is not None
                variant = repo.variant_with_blob(s, lora_id, info.sha256)
                if variant is None:
                    repo.ensure_blob(s, record)
                    variant = repo.add_reduced(s, row, info.sha256, source, report)
                    repo.record_event(s, "reduced", actor, lora_id, variant.id, method=report.method,
                                      param=report.param, sha256=info.sha256, bytes=info.bytes,
                                      source_variant=source.id,
                                      fro_retained_mean=report.fro_retained_mean)  # fmt: skip
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
        with self._lock, self._failure_recorded(op, actor, ref):
            with self.db.read() as s:
                row = self._find_lora(s, ref)
                lora_id, path = row.id, Path(row.path)
                wanted = self._variant_of(s, row, choose(row))
            self._watched(path)  # a folder dropped from the config is no longer lorad's to write
            stamp, current = self._settled_state(lora_id, path, actor)
            if current != wanted.id:
                _crashpoint("put:before-materialize")
                self._materialize(wanted, path, stamp, actor)
            written = FileStamp.of_path(path)  # what lorad itself just put there
            with self.db.write() as s:
                row = s.get(Lora, lora_id)
                variant = s.get(Variant, wanted.id)
                assert row is not None and variant is not None
                repo.set_active(s, row, variant)
                row.file_stamp = written.token if written else None
                repo.record_event(s, kind, actor, lora_id, wanted.id, previous_variant=current,
                                  sha256=wanted.blob_sha256, path=str(path))  # fmt: skip
            _crashpoint("put:after-commit")
            log.info(kind, path=str(path), variant=wanted.id)
            return self.lora(lora_id)

    def _settled_state(self, lora_id: int, path: Path, actor: str) -> tuple[FileStamp, int]:
        """The watched file's stamp and the variant it holds, after reconciling the records to it.

        Refuses when the file is gone or incomplete, or when it held bytes lorad never stored
        (kept as a new original first: lorad never overwrites what it has not stored).
        """
        try:
            stamp = FileStamp.of(os.stat(path))
        except FileNotFoundError:
            stamp = None
        state = self._reconcile(lora_id, actor)
        if stamp is None or state.kind == "gone":
            raise StoreError(f"{path}: the file is gone; lorad does not recreate removed LoRAs")
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

    def _materialize(self, wanted: Variant, path: Path, stamp: FileStamp, actor: str) -> None:
        try:
            self.store.materialize(wanted.blob_sha256, path, expect=stamp)
        except CorruptBlob as e:
            self._quarantine(e.sha256, actor, wanted.lora_id, wanted.id)
            raise StoreError(
                f"{path}: variant {wanted.id}'s stored bytes are corrupt (moved to the store's bad/); "
                "the file was left as it was"
            ) from e
        except TargetChanged:
            self._reconcile(wanted.lora_id, actor)
            raise

    # -- reconciling disk and records -----------------------------------------------------------

    def _reconcile(self, lora_id: int, actor: str, trust_stamp: bool = False) -> _FileState:
        """Bring the records to what the watched file holds, and say what that is.

        trust_stamp: a file whose (device, inode, size, mtime) is the one recorded when lorad last
        knew its contents is taken as unchanged, unhashed: rescans of large libraries stay cheap.
        Everything else (activate, switch, revert, verify) hashes.
        """
        with self.db.read() as s:
            row = s.get(Lora, lora_id)
            assert row is not None
            path, active_id, known_stamp = Path(row.path), row.active_variant_id, row.file_stamp
            active = s.get(Variant, active_id) if active_id is not None else None
            active_sha = active.blob_sha256 if active else None
        stamp = FileStamp.of_path(path)
        if trust_stamp and stamp is not None and stamp.token == known_stamp and active_sha:
            return _FileState("in-sync", active_id, active_id, active_sha)
        try:
            sha = hash_file(path)
        except (FileNotFoundError, IsADirectoryError):
            return _FileState("gone", None, active_id)
        token = _unchanged_token(path, stamp)
        if sha == active_sha:
            self._record_stamp(lora_id, known_stamp, token)
            return _FileState("in-sync", active_id, active_id, sha)
        with self.db.read() as s:
            known = repo.variant_with_blob(s, lora_id, sha)
            known_id = known.id if known else None
        if known_id is not None:
            self._record_reconciled(lora_id, active_id, known_id, actor, token)
            return _FileState("reconciled", known_id, active_id, sha)
        if not is_complete(path):
            return _FileState("unsettled", None, active_id, sha)  # being written: nothing to adopt yet
        new_id = self._adopt_new_original(lora_id, path, active_id, actor)
        return _FileState("new-original", new_id, active_id, sha)

    def _record_stamp(self, lora_id: int, old: str | None, new: str | None) -> None:
        if new is not None and new != old:
            with self.db.write() as s:
                row = s.get(Lora, lora_id)
                assert row is not None
                row.file_stamp = new

    def _record_reconciled(self, lora_id: int, old: int | None, new: int, actor: str, token: str | None) -> None:
        with self.db.write() as s:
            row = s.get(Lora, lora_id)
            assert row is not None
            repo.set_active(s, row, s.get(Variant, new))  # type: ignore[arg-type]
            row.file_stamp = token
            repo.record_event(s, "verified", actor, lora_id, new, reconciled=True,
                              previous_variant=old, reason="the watched file holds this variant")  # fmt: skip

    def _adopt_new_original(self, lora_id: int, path: Path, old: int | None, actor: str) -> int:
        stamp = FileStamp.of_path(path)
        info, record = self._store_file(path)
        with self.db.write() as s:
            row = s.get(Lora, lora_id)
            assert row is not None
            repo.ensure_blob(s, record)
            variant = repo.original_with_blob(s, row, info.sha256)
            repo.set_original(s, row, variant)
            repo.set_active(s, row, variant)
            row.file_stamp = _unchanged_token(path, stamp)
            repo.record_event(s, "ingested", actor, lora_id, variant.id, sha256=info.sha256,
                              bytes=info.bytes, path=str(path), previous_variant=old,
                              reason="changed outside lorad")  # fmt: skip
            log.warning("changed outside lorad", path=str(path), sha256=info.sha256)
            return variant.id

    def _quarantine(
        self, sha256: str, actor: str, lora_id: int | None = None, variant_id: int | None = None
    ) -> None:
        try:
            dest = self.store.quarantine(sha256)
        except FileNotFoundError:
            return
        with self.db.write() as s:
            repo.record_event(s, "quarantined", actor, lora_id, variant_id, sha256=sha256, moved_to=str(dest))

    # -- verify ------------------------------------------------------------------------------------

    def verify(self, actor: str = "verify", stale_after: timedelta = timedelta(minutes=15)) -> VerifyReport:
        """Re-hash every blob and every watched file; quarantine corrupt blobs, repair them from a
        watched file with the same bytes, bring the records to what each watched file holds, and
        remove lorad's own temp files older than `stale_after`."""
        with self._lock:
            tally = _VerifyTally()
            checked = self._verify_blobs(tally, actor)
            with self.db.read() as s:
                lora_ids = [row.id for row in repo.all_loras(s)]
            for lora_id in lora_ids:
                self._verify_lora(lora_id, tally, actor, stale_after)
            tally.temp_removed.extend(self._remove_stale(self.store.temp_files(), stale_after))
            with self.db.read() as s:
                recorded = {b.sha256 for b in repo.all_blobs(s)}
            stray = tuple(sha for sha in self.store.blobs() if sha not in recorded)
            report = VerifyReport(
                blobs_checked=checked,
                corrupt=tuple(tally.corrupt),
                missing=tuple(tally.missing),
                repaired=tuple(tally.repaired),
                stray=stray,
                reconciled=tuple(tally.reconciled),
                missing_files=tuple(tally.missing_files),
                unsettled=tuple(tally.unsettled),
                temp_removed=tuple(tally.temp_removed),
            )
            with self.db.write() as s:
                repo.record_event(s, "verified", actor, **_verify_summary(report))
            return report

    def _verify_blobs(self, tally: _VerifyTally, actor: str) -> int:
        with self.db.read() as s:
            shas = [b.sha256 for b in repo.all_blobs(s)]
        good = []
        for sha in shas:
            if self.store.is_intact(sha):
                good.append(sha)
            elif self.store.has(sha):
                self._quarantine(sha, actor)
                tally.corrupt.append(sha)
            else:
                tally.missing.append(sha)
        with self.db.write() as s:
            now = utcnow()
            for sha in good:
                blob = s.get(Blob, sha)
                if blob is not None:
                    blob.verified_at = now
        return len(shas)

    def _verify_lora(self, lora_id: int, tally: _VerifyTally, actor: str, stale_after: timedelta) -> None:
        with self.db.read() as s:
            row = s.get(Lora, lora_id)
            assert row is not None
            path = Path(row.path)
        tally.temp_removed.extend(self._remove_stale([temp_name(path)], stale_after))
        try:
            state = self._reconcile(lora_id, actor)
        except LoradError as e:
            log.warning("verify could not reconcile", path=str(path), error=str(e))
            tally.unsettled.append(path)
            return
        if state.kind == "gone":
            tally.missing_files.append(path)
        elif state.kind == "unsettled":
            tally.unsettled.append(path)
        elif state.kind in ("reconciled", "new-original"):
            assert state.variant_id is not None
            tally.reconciled.append(
                Reconciled(lora_id, path, state.previous, state.variant_id, state.kind == "new-original")
            )
        lost = (set(tally.corrupt) | set(tally.missing)) - set(tally.repaired)
        if state.sha256 in lost:
            self._repair_from(path, state.sha256, tally)

    def _repair_from(self, path: Path, sha256: str, tally: _VerifyTally) -> None:
        """A watched file with a lost blob's bytes gives the store its copy back."""
        try:
            self.store.ingest(path, expect_sha256=sha256)
        except StoreError as e:
            log.warning("repair failed", path=str(path), error=str(e))
            return
        tally.repaired.append(sha256)

    def _remove_stale(self, paths: Sequence[Path], stale_after: timedelta) -> list[Path]:
        removed = []
        cutoff = utcnow().timestamp() - stale_after.total_seconds()
        for p in paths:
            try:
                if p.stat().st_mtime <= cutoff:
                    p.unlink()
                    removed.append(p)
            except FileNotFoundError:
                continue
        return removed

    # -- gc ----------------------------------------------------------------------------------------

    def gc(
        self,
        dry_run: bool = True,
        keep_variants: int = 2,
        grace: timedelta = timedelta(hours=1),
        actor: str = "gc",
        keep_by_policy: Mapping[str, int] | None = None,
    ) -> GcPlan:
        """Plan (and unless `dry_run`, carry out) removing reduced variants beyond the newest
        `keep_variants` per LoRA (`keep_by_policy[lora.policy]` where given) and store blobs
        nothing refers to, all older than `grace`. Originals, active variants and their blobs are
        never collected."""
        keep = _KeepRule(keep_variants, dict(keep_by_policy or {}))
        if min((keep_variants, *keep.by_policy.values())) < 0:
            raise StoreError("keep_variants must be >= 0")
        with self._lock:
            cutoff = utcnow() - grace
            with self.db.read() as s:
                plan = self._gc_plan(s, keep, cutoff)
            if dry_run or not (plan.variants or plan.blobs or plan.stray):
                return plan
            with self.db.write() as s:
                plan = self._gc_plan(s, keep, cutoff)  # again, under the write lock
                repo.delete_variants(s, plan.variants)
                repo.delete_blob_rows(s, [sha for sha, _ in plan.blobs])
                repo.record_event(s, "collected", actor, **_gc_summary(plan))
            _crashpoint("gc:after-commit")
            # Records first, files after: a crash here leaves unrecorded files, the next gc's strays.
            for sha, _ in (*plan.blobs, *plan.stray):
                self.store.remove(sha)
            return GcPlan(plan.variants, plan.blobs, plan.stray, executed=True)

    def _gc_plan(self, s: Session, keep: _KeepRule, cutoff: datetime) -> GcPlan:
        doomed: list[int] = []
        for row in repo.all_loras(s):
            protected = {row.active_variant_id, row.original_variant_id}
            reduced = [v for v in repo.variants_of(s, row.id) if v.kind == "reduced"]
            reduced.sort(key=lambda v: (v.created_at, v.id), reverse=True)
            doomed += [
                v.id
                for v in reduced[keep.count(row.policy) :]
                if v.id not in protected and v.created_at < cutoff
            ]
        still_used = repo.blobs_of_variants(s, excluding=doomed) | repo.live_job_blobs(s)
        recorded = repo.all_blobs(s)
        blobs = tuple(
            (b.sha256, b.bytes) for b in recorded if b.sha256 not in still_used and b.created_at < cutoff
        )
        known = {b.sha256 for b in recorded}
        stray = tuple(
            (sha, size)
            for sha in self.store.blobs()
            if sha not in known | still_used and (size := self._old_size(sha, cutoff)) is not None
        )
        return GcPlan(tuple(doomed), blobs, stray)

    def _old_size(self, sha256: str, cutoff: datetime) -> int | None:
        try:
            st = self.store.path_of(sha256).stat()
        except FileNotFoundError:
            return None
        return st.st_size if st.st_mtime < cutoff.timestamp() else None

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
        path, _ = self._watched(ref)
        row = repo.lora_by_path(s, str(path))
        if row is None:
            raise StoreError(f"{path}: lorad has not ingested this file")
        return row

    def _variant_of(self, s: Session, lora: Lora, variant_id: int | None) -> Variant:
        variant = s.get(Variant, variant_id) if variant_id is not None else None
        if variant is None or variant.lora_id != lora.id:
            raise StoreError(f"{lora.path}: has no variant {variant_id}")
        return variant

    def _read_complete(self, path: Path) -> Header:
        if not path.is_file():
            raise StoreError(f"{path}: not a regular file")
        return read_header(path)

    @contextmanager
    def _failure_recorded(self, op: str, actor: str, subject: object) -> Iterator[None]:
        """Record a refused or failed operation in the audit trail, then let the error through."""
        try:
            yield
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
            log.warning("could not record a failure", op=op, error=str(e))


def _unchanged_token(path: Path, before: FileStamp | None) -> str | None:
    """The stamp taken before hashing, if the file still has it (else it moved while hashed)."""
    return before.token if before is not None and FileStamp.of_path(path) == before else None


def _gc_summary(plan: GcPlan) -> dict[str, Any]:
    return {
        "variants": list(plan.variants),
        "blobs": [sha for sha, _ in plan.blobs],
        "stray": [sha for sha, _ in plan.stray],
        "bytes_freed": plan.bytes_freed,
    }


def _verify_summary(report: VerifyReport) -> dict[str, Any]:
    return {
        "blobs_checked": report.blobs_checked,
        "corrupt": list(report.corrupt),
        "missing": list(report.missing),
        "repaired": list(report.repaired),
        "stray": list(report.stray),
        "reconciled": [
            {"lora": r.lora_id, "from": r.from_variant, "to": r.to_variant, "new_original": r.new_original}
            for r in report.reconciled
        ],
        "missing_files": [str(p) for p in report.missing_files],
        "unsettled": [str(p) for p in report.unsettled],
        "temp_removed": [str(p) for p in report.temp_removed],
    }
