"""The library's maintenance passes: verify (re-hash, repair, reconcile) and gc (plan, collect).

Both run under the library's lock and use its building blocks (reconcile, quarantine, the store
and the records); the Library's `verify` and `gc` methods call them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Connection, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from lorad._atomic import remove_tree, temp_name
from lorad.errors import FormatError, LoradError, StoreError
from lorad.library import folders, store_identity, trees
from lorad.library.core import BLOB_LOCK_SPACE, PUT_LOCK_SPACE, Core, blob_lock_key
from lorad.library.db import repo
from lorad.library.db.session import DatabaseUnavailable
from lorad.library.db.models import Blob, Lora, utcnow
from lorad.library.reconcile import reconcile
from lorad.library.records import GcPlan, Reconciled, VerifyReport
from lorad.library.store import _crashpoint
from lorad.pathtext import shown

log = structlog.get_logger()


# -- verify ----------------------------------------------------------------------------------------


@dataclass
class _VerifyTally:
    corrupt: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    reconciled: list[Reconciled] = field(default_factory=list)
    missing_files: list[Path] = field(default_factory=list)
    unsettled: list[Path] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)
    temp_removed: list[Path] = field(default_factory=list)


def verify(core: Core, actor: str = "verify", stale_after: timedelta = timedelta(minutes=15)) -> VerifyReport:
    """Re-hash every blob and every watched file; quarantine corrupt blobs, repair them from a
    watched file with the same bytes, bring the records to what each watched file holds, and
    remove lorad's own temp files older than `stale_after`. A watched path that is no regular
    file (a FIFO...) or cannot be read is reported with its reason, never opened or waited on."""
    with core.lock:
        identity = store_identity.problem(core.db, core.store.root)
        if identity is not None:
            # Not the store the records describe (an unmounted share): every blob would look
            # missing and repairs would write into the wrong folder. Say so and touch nothing.
            log.error("store identity mismatch", problem=identity)
            report = VerifyReport(blobs_checked=0, store_identity=identity)
            with core.db.write() as s:
                repo.record_event(s, "verified", actor, **_verify_summary(report))
            return report
        tally = _VerifyTally()
        checked = _verify_blobs(core, tally, actor)
        with core.db.read() as s:
            lora_ids = [row.id for row in repo.all_loras(s)]
        for lora_id in lora_ids:
            _verify_lora(core, lora_id, tally, actor, stale_after)
        tally.temp_removed.extend(_remove_stale(core.store.temp_files(), stale_after))
        tally.temp_removed.extend(_clean_swap_area(core, stale_after))
        with core.db.read() as s:
            recorded = {b.sha256 for b in repo.all_blobs(s)}
        stray = tuple(sha for sha in core.store.blobs() if sha not in recorded)
        report = VerifyReport(
            blobs_checked=checked,
            corrupt=tuple(tally.corrupt),
            missing=tuple(tally.missing),
            repaired=tuple(tally.repaired),
            stray=stray,
            reconciled=tuple(tally.reconciled),
            missing_files=tuple(tally.missing_files),
            unsettled=tuple(tally.unsettled),
            refused=tuple(tally.refused),
            temp_removed=tuple(tally.temp_removed),
        )
        with core.db.write() as s:
            repo.record_event(s, "verified", actor, **_verify_summary(report))
        return report


def _verify_blobs(core: Core, tally: _VerifyTally, actor: str) -> int:
    with core.db.read() as s:
        blobs = [(b.sha256, b.blake3) for b in repo.all_blobs(s)]
    shas = [sha for sha, _ in blobs]
    good = []
    blake3s: dict[str, str] = {}
    for sha, blake3 in blobs:
        if blake3 is None:
            # Stored before lorad computed BLAKE3: this re-hash reads the bytes anyway, so it
            # gets the BLAKE3 in the same pass (then `lorad find` finds the blob by it).
            digest = core.store.digest(sha)
            intact = digest is not None and digest.sha256 == sha
            if digest is not None and intact and digest.blake3:
                blake3s[sha] = digest.blake3
        else:
            intact = core.store.is_intact(sha)
        if intact:
            good.append(sha)
        elif core.store.has(sha):
            core.quarantine(sha, actor)
            tally.corrupt.append(sha)
        else:
            tally.missing.append(sha)
    with core.db.write() as s:
        now = utcnow()
        for sha in good:
            blob = s.get(Blob, sha)
            if blob is not None:
                blob.verified_at = now
                if blob.blake3 is None and sha in blake3s:
                    blob.blake3 = blake3s[sha]
    return len(shas)


def _verify_lora(core: Core, lora_id: int, tally: _VerifyTally, actor: str, stale_after: timedelta) -> None:
    with core.db.read() as s:
        row = s.get(Lora, lora_id)
        assert row is not None
        path, is_folder = Path(row.path), row.kind == "folder"
        mirror_path = core.mirror_of(row)
    if not is_folder:
        tally.temp_removed.extend(_remove_stale([temp_name(mirror_path or path)], stale_after))
    try:
        state = reconcile(core, lora_id, actor)  # a folder's: puts back one an interrupted swap moved aside
        if is_folder:
            cutoff = utcnow().timestamp() - stale_after.total_seconds()
            tally.temp_removed.extend(folders.clean_leftovers(core, lora_id, mirror_path or path, cutoff))
    except LoradError as e:
        log.warning("verify could not reconcile", path=shown(path), error=shown(str(e)))
        tally.unsettled.append(path)
        return
    try:
        core.refresh_claims(lora_id)  # sidecars a manager wrote after the LoRA was ingested
    except LoradError as e:
        log.warning("verify could not record sidecar hashes", path=shown(path), error=shown(str(e)))
    if state.kind == "gone":
        tally.missing_files.append(path)
    elif state.kind == "unsettled":
        tally.unsettled.append(path)
    elif state.kind == "refused":
        assert state.refusal is not None
        tally.refused.append((path, state.refusal.reason))
    elif state.kind in ("reconciled", "new-original"):
        assert state.variant_id is not None
        tally.reconciled.append(
            Reconciled(lora_id, path, state.previous, state.variant_id, state.kind == "new-original")
        )
    lost = (set(tally.corrupt) | set(tally.missing)) - set(tally.repaired)
    if is_folder and state.kind not in ("gone", "refused"):
        tally.repaired.extend(folders.repair_from(core, path, lost))
    elif state.sha256 in lost:
        _repair_from(core, path, state.sha256, tally)


def _repair_from(core: Core, path: Path, sha256: str, tally: _VerifyTally) -> None:
    """A watched file with a lost blob's bytes gives the store its copy back."""
    try:
        core.store.ingest(path, expect_sha256=sha256)
    except LoradError as e:
        log.warning("repair failed", path=shown(path), error=shown(str(e)))
        return
    tally.repaired.append(sha256)


def _clean_swap_area(core: Core, stale_after: timedelta) -> list[Path]:
    """Folders an interrupted swap left in the swap area that no LoRA's leftovers account for:
    removed once stale when they hold a tree the store has (a built copy), else kept and said."""
    removed = []
    cutoff = utcnow().timestamp() - stale_after.total_seconds()
    for item in sorted(core.swap_area.iterdir()):
        try:
            if item.lstat().st_mtime > cutoff:
                continue
            sha, _ = trees.hash_folder(item) if item.is_dir() and not item.is_symlink() else ("", [])
        except (OSError, FormatError) as e:
            log.warning("left an unreadable folder in the swap area", path=shown(item), error=shown(str(e)))
            continue
        with core.db.read() as s:
            known = not sha or s.get(Blob, sha) is not None
        if not known:
            log.warning("left a folder lorad never stored in the swap area", path=shown(item), tree=sha)
            continue
        remove_tree(item)
        removed.append(item)
    return removed


def _remove_stale(paths: Sequence[Path], stale_after: timedelta) -> list[Path]:
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
        "missing_files": [shown(p) for p in report.missing_files],
        "unsettled": [shown(p) for p in report.unsettled],
        "refused": [{"path": shown(p), "reason": reason} for p, reason in report.refused],
        "temp_removed": [shown(p) for p in report.temp_removed],
        **({"store_identity": report.store_identity} if report.store_identity else {}),
    }


# -- gc --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KeepRule:
    default: int
    by_policy: dict[str, int]

    def count(self, policy: str | None) -> int:
        return self.by_policy.get(policy, self.default) if policy is not None else self.default


GC_LOCK_SPACE = 0x67632020  # "gc  ": the first key of the advisory lock a collecting node holds (PostgreSQL)


@dataclass
class _Held:
    """What a collection may touch: the LoRAs whose reduced variants it may forget and the blobs it
    may delete (None: all, where nothing else can write meanwhile, as on SQLite)."""

    loras: set[int] | None = None
    blobs: set[str] | None = None


def gc(
    core: Core,
    dry_run: bool = True,
    keep_variants: int = 2,
    grace: timedelta = timedelta(hours=1),
    actor: str = "gc",
    keep_by_policy: Mapping[str, int] | None = None,
    node: str | None = None,
) -> GcPlan:
    """Plan (and unless `dry_run`, carry out) removing reduced variants beyond the newest
    `keep_variants` per LoRA (`keep_by_policy[lora.policy]` where given) and store blobs nothing
    refers to, all older than `grace`. Originals, active variants and their blobs are never
    collected.

    Ages: a recorded blob's by its row's created_at against the database's clock (both the
    server's, on PostgreSQL); an unrecorded file's by its mtime against the store's own clock (a
    file server's, on NFS). The grace period is a margin, not what keeps a blob that is being
    recorded: on PostgreSQL a collection runs on one node at a time (a session advisory lock;
    another node's gc returns at once, `skipped` saying who holds it), and it deletes a blob only
    holding that blob's advisory lock exclusively, which every writer recording a blob holds shared
    until its transaction ends (Core.record_blobs), and forgets a variant only holding its LoRA's put
    lock; under those locks it plans again, so it sees every reference committed before and none
    can be added until its files are gone. A writer that comes after finds its blob gone and
    stores it again. On SQLite one daemon owns the database and the library's lock serialises
    all of this in it."""
    keep = _KeepRule(keep_variants, dict(keep_by_policy or {}))
    if min((keep_variants, *keep.by_policy.values())) < 0:
        raise StoreError("keep_variants must be >= 0")
    with core.lock:
        if dry_run or core.db.is_sqlite:
            return _collect(core, keep, grace, dry_run, actor, None, node)
        with _FleetLocks(core, node) as locks:
            if locks.holder is not None:
                log.info("gc skipped: another node holds gc", holder=locks.holder)
                return GcPlan((), (), (), skipped=f"another node holds gc ({locks.holder})")
            return _collect(core, keep, grace, dry_run, actor, locks, node)


def _collect(
    core: Core, keep: _KeepRule, grace: timedelta, dry_run: bool, actor: str, locks: _FleetLocks | None, node: str | None
) -> GcPlan:
    with core.db.read() as s:
        db_cutoff = repo.db_now(s) - grace
    store_cutoff = core.store.clock() - grace.total_seconds()
    with core.db.read() as s:
        plan, loras = _gc_plan(core, s, keep, db_cutoff, store_cutoff, _Held())
    if dry_run or not (plan.variants or plan.blobs or plan.stray):
        return plan
    if locks is None:
        plan = _collect_round(core, keep, db_cutoff, store_cutoff, _Held(), actor, node)
        return replace(plan, executed=True)
    # In rounds of at most LOCKS_PER_ROUND locks: advisory locks live in PostgreSQL's shared lock
    # table (max_locks_per_transaction x max_connections entries for the whole server).
    lora_ids = sorted(loras)
    shas = sorted({sha for sha, _ in (*plan.blobs, *plan.stray)})
    done: list[GcPlan] = []
    while lora_ids or shas:
        some_loras, lora_ids = set(lora_ids[:LOCKS_PER_ROUND]), lora_ids[LOCKS_PER_ROUND:]
        room = LOCKS_PER_ROUND - len(some_loras)
        some_shas, shas = set(shas[:room]), shas[room:]
        held = locks.take(some_loras, some_shas)
        try:
            done.append(_collect_round(core, keep, db_cutoff, store_cutoff, held, actor, node))
        finally:
            locks.give_back(held)
    return GcPlan(tuple(v for p in done for v in p.variants), tuple(b for p in done for b in p.blobs),
                  tuple(b for p in done for b in p.stray), executed=True)  # fmt: skip


LOCKS_PER_ROUND = 500


def _collect_round(
    core: Core, keep: _KeepRule, cutoff: datetime, store_cutoff: float, held: _Held, actor: str, node: str | None
) -> GcPlan:
    """Forget and delete what the plan made again under the locks `held` says (all, on SQLite)."""
    with core.db.write() as s:
        plan, _ = _gc_plan(core, s, keep, cutoff, store_cutoff, held)  # again, under the locks
        if not (plan.variants or plan.blobs or plan.stray):
            return plan
        repo.delete_variants(s, plan.variants)
        repo.delete_blob_rows(s, [sha for sha, _ in plan.blobs])
        repo.record_event(s, "collected", actor, **_gc_summary(plan), **({"node": node} if node else {}))
    _crashpoint("gc:after-commit")
    # Records first, files after (on PostgreSQL still under the blobs' locks): a crash here leaves
    # unrecorded files, the next gc's strays.
    for sha, _ in (*plan.blobs, *plan.stray):
        core.store.remove(sha)
    return plan


class _FleetLocks:
    """The advisory locks of one collection on PostgreSQL, on a connection of its own: the gc lock
    (tried; `holder` names the node holding it when that fails), then the put locks of the LoRAs and
    the locks of the blobs it means to touch (tried: a busy one is left for the next gc).
    Session-level, so they outlast the deleting transaction until the files are removed; all are
    released on exit, and by PostgreSQL if this node's connection dies."""

    def __init__(self, core: Core, node: str | None) -> None:
        self.core, self.node = core, node or "a node"
        self.holder: str | None = None
        self.conn: Connection | None = None

    def __enter__(self) -> _FleetLocks:
        try:
            conn = self.core.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self.conn = conn
            got = conn.scalar(text("SELECT pg_try_advisory_lock(CAST(:space AS integer), 0)"), {"space": GC_LOCK_SPACE})
            if got:
                conn.execute(text("SELECT set_config('application_name', :name, false)"),
                             {"name": f"lorad gc on {self.node}"[:63]})  # fmt: skip
            else:
                self.holder = self._holder(conn)
        except OperationalError as e:
            self.__exit__(None, None, None)
            raise DatabaseUnavailable(f"gc cannot take its lock ({e.orig or e}); try again later") from e
        return self

    @staticmethod
    def _holder(conn: Connection) -> str:
        name = conn.scalar(text(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = CAST(:space AS oid)"
            " AND l.objid = 0 AND l.objsubid = 2"), {"space": GC_LOCK_SPACE})  # fmt: skip
        prefix = "lorad gc on "
        return name[len(prefix):] if isinstance(name, str) and name.startswith(prefix) else "another node"

    def take(self, loras: set[int], blobs: set[str]) -> _Held:
        assert self.conn is not None
        query = text("SELECT k FROM unnest(CAST(:keys AS integer[])) AS k"
                     " WHERE pg_try_advisory_lock(CAST(:space AS integer), k)")  # fmt: skip
        held_loras = set(self.conn.scalars(query, {"keys": sorted(loras), "space": PUT_LOCK_SPACE}))
        keys = {sha: blob_lock_key(sha) for sha in blobs}
        held_keys = set(self.conn.scalars(query, {"keys": sorted(set(keys.values())), "space": BLOB_LOCK_SPACE}))
        held_blobs = {sha for sha, key in keys.items() if key in held_keys}
        if len(held_loras) < len(loras) or len(held_blobs) < len(blobs):
            log.info("gc leaves what is in use to the next gc",
                     loras=len(loras) - len(held_loras), blobs=len(blobs) - len(held_blobs))  # fmt: skip
        return _Held(held_loras, held_blobs)

    def give_back(self, held: _Held) -> None:
        """Release the put and blob locks `take` got (the gc lock stays)."""
        assert self.conn is not None
        query = text("SELECT pg_advisory_unlock(CAST(:space AS integer), k) FROM unnest(CAST(:keys AS integer[])) AS k")
        self.conn.execute(query, {"keys": sorted(held.loras or ()), "space": PUT_LOCK_SPACE})
        keys = sorted({blob_lock_key(sha) for sha in held.blobs or ()})
        self.conn.execute(query, {"keys": keys, "space": BLOB_LOCK_SPACE})

    def __exit__(self, *_: object) -> None:
        if self.conn is None:
            return
        conn, self.conn = self.conn, None
        try:
            conn.execute(text("SELECT pg_advisory_unlock_all()"))
            conn.execute(text("RESET application_name"))
        except SQLAlchemyError:
            conn.invalidate()  # a lost connection: PostgreSQL has released its locks
        finally:
            conn.close()


def _gc_plan(
    core: Core, s: Session, keep: _KeepRule, cutoff: datetime, store_cutoff: float, held: _Held
) -> tuple[GcPlan, set[int]]:
    """The plan, and the LoRAs whose variants it forgets. `cutoff`: the database's time before
    which a recorded row is old enough; `store_cutoff`: the store's, for unrecorded files."""
    doomed: list[int] = []
    loras: set[int] = set()
    for row in repo.all_loras(s):
        if held.loras is not None and row.id not in held.loras:
            continue
        protected = {row.active_variant_id, row.original_variant_id}
        reduced = [v for v in repo.variants_of(s, row.id) if v.kind == "reduced"]
        reduced.sort(key=lambda v: (v.created_at, v.id), reverse=True)
        mine = [v.id for v in reduced[keep.count(row.policy) :] if v.id not in protected and v.created_at < cutoff]
        doomed += mine
        loras |= {row.id} if mine else set()
    still_used = repo.blobs_of_variants(s, excluding=doomed) | repo.live_job_blobs(s)  # a live tree's files too
    recorded = repo.all_blobs(s)
    # A tree that stays (inside its grace period, say) keeps its files, whatever names it.
    staying = {b.sha256 for b in recorded if b.kind == "tree" and (b.sha256 in still_used or b.created_at >= cutoff)}
    still_used |= repo.with_entries(s, staying)
    mayhave = held.blobs
    blobs = tuple((b.sha256, _stored_size(core, b)) for b in recorded if b.sha256 not in still_used
                  and b.created_at < cutoff and (mayhave is None or b.sha256 in mayhave))  # fmt: skip
    known = {b.sha256 for b in recorded}
    stray = tuple(
        (sha, size)
        for sha in core.store.blobs()
        if sha not in known | still_used and (mayhave is None or sha in mayhave)
        and (size := _old_size(core, sha, store_cutoff)) is not None
    )
    return GcPlan(tuple(doomed), blobs, stray), loras


def _stored_size(core: Core, blob: Blob) -> int:
    """What removing a blob frees: a tree's record counts its files (removed as blobs of their
    own), its manifest is all it holds."""
    if blob.kind != "tree":
        return blob.bytes
    try:
        return core.store.path_of(blob.sha256).stat().st_size
    except FileNotFoundError:
        return 0


def _old_size(core: Core, sha256: str, cutoff: float) -> int | None:
    """An unrecorded file's size if it was last written at or before `cutoff` (the store's clock)."""
    try:
        st = core.store.path_of(sha256).stat()
    except FileNotFoundError:
        return None
    return st.st_size if st.st_mtime <= cutoff else None


def _gc_summary(plan: GcPlan) -> dict[str, Any]:
    return {
        "variants": list(plan.variants),
        "blobs": [sha for sha, _ in plan.blobs],
        "stray": [sha for sha, _ in plan.stray],
        "bytes_freed": plan.bytes_freed,
    }
