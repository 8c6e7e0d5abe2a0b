"""The library end to end on real files, the real engine and a real SQLite file: the main flow,
verify, gc, and the bad cases (hand edits, corrupt blobs, full disks, paths outside the roots)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from lorad._atomic import temp_name
from lorad.engine.formats.safetensors_file import is_complete, read_header
from lorad.errors import FormatError, StoreError
from lorad.library.library import Library
from tests._store_fixtures import (
    assert_consistent,
    civitai_hashes,
    event_kinds,
    make_lora,
    reduce_with_engine,
    run_child,
    sha256_of,
    table,
)


@pytest.fixture
def root(tmp_path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    return folder


@pytest.fixture
def lib(tmp_path, root):
    library = Library(tmp_path / "state", [root], link_mode="copy")
    yield library
    library.close()


def _reduce(lib: Library, lora, rank: int, work: Path):
    """What the worker does: reduce the stored original with the engine, record the output."""
    original = lib.lora(lora).original
    work.mkdir(exist_ok=True)
    report = reduce_with_engine(lib.store.path_of(original.blob_sha256), work / f"r{rank}.safetensors", rank)
    return lib.add_variant(lora, report, actor="daemon"), report


def _events(lib: Library) -> list[tuple[str, str, int | None]]:
    return [(e.kind, e.actor, e.variant_id) for e in lib.events()]


# -- the main flow ---------------------------------------------------------------------------------


def test_ingest_reduce_activate_revert_switch(tmp_path, root, lib):
    path = make_lora(root / "style.safetensors", rank=8)
    sidecars = {root / f"style{suffix}": data for suffix, data in (
        (".civitai.info", b'{"id": 1}'), (".preview.png", b"\x89PNG..."), (".json", b"{}"))}  # fmt: skip
    for sidecar, data in sidecars.items():
        sidecar.write_bytes(data)
    sidecar_stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sidecars}
    original_bytes = path.read_bytes()
    original_sha = sha256_of(path)
    hashes = civitai_hashes(path)

    view = lib.ingest(path, policy="default", actor="daemon")
    assert view.path == path.resolve() and view.folder == root.resolve() and view.policy == "default"
    assert view.active == view.original and view.original.blob_sha256 == original_sha
    assert lib.store.path_of(original_sha).read_bytes() == original_bytes
    (blob,) = table(lib, "blobs")
    assert (blob["format"], blob["modules"], blob["bytes"]) == ("kohya", 3, len(original_bytes))
    assert (blob["autov2"], blob["autov3"], blob["data_sha256"]) == (
        hashes["autov2"], hashes["autov3"], hashes["addnet"])  # fmt: skip
    assert path.read_bytes() == original_bytes  # ingest never touches the watched file

    r4, report4 = _reduce(lib, path, 4, tmp_path / "work")
    assert (r4.kind, r4.method, r4.param, r4.source_variant_id) == ("reduced", "rank", 4, view.original.id)
    assert r4.blob_sha256 == report4.output.sha256 == sha256_of(lib.store.path_of(r4.blob_sha256))
    assert r4.fro_retained_mean == pytest.approx(report4.fro_retained_mean)
    metrics = lib.module_metrics(r4.id)
    assert [(m["rank_in"], m["rank_out"]) for m in metrics] == [(8, 4)] * 3
    assert [m["fro_retained"] for m in metrics] == pytest.approx([m.fro_retained for m in report4.modules])
    assert path.read_bytes() == original_bytes  # recorded, not yet activated

    view = lib.activate(path, r4.id, actor="daemon")
    assert view.active_variant_id == r4.id and view.original_variant_id == view.original.id
    assert sha256_of(path) == r4.blob_sha256 and is_complete(path)
    assert path.stat().st_size < len(original_bytes)
    assert {k: read_header(path).tensors[k].shape for k in read_header(path).tensors
            if k.endswith("lora_down.weight")} == {  # fmt: skip
        f"lora_unet_down_blocks_0_attentions_{i}_proj_in.lora_down.weight": (4, 48) for i in range(3)
    }

    view = lib.revert(path, actor="cli:uid=1000")
    assert path.read_bytes() == original_bytes and view.active == view.original

    r2, _ = _reduce(lib, path, 2, tmp_path / "work")
    view = lib.switch(path, r2.id, actor="cli:uid=1000")
    assert sha256_of(path) == r2.blob_sha256 and view.active_variant_id == r2.id
    view = lib.switch(path, r4.id, actor="cli:uid=1000")
    assert sha256_of(path) == r4.blob_sha256 and view.active_variant_id == r4.id

    assert _events(lib) == [
        ("ingested", "daemon", view.original_variant_id),
        ("reduced", "daemon", r4.id),
        ("activated", "daemon", r4.id),
        ("reverted", "cli:uid=1000", view.original_variant_id),
        ("reduced", "daemon", r2.id),
        ("switched", "cli:uid=1000", r2.id),
        ("switched", "cli:uid=1000", r4.id),
    ]
    switched = lib.events()[-1]
    assert switched.detail["previous_variant"] == r2.id and switched.detail["sha256"] == r4.blob_sha256
    assert [row["active_variant_id"] for row in table(lib, "loras")] == [r4.id]
    assert lib.store.is_intact(original_sha)
    assert [lora.id for lora in lib.find(hashes["autov3"])] == [view.id]  # the original's identity
    assert not temp_name(path).exists()
    for sidecar, data in sidecars.items():  # paired by name, never touched
        assert sidecar.read_bytes() == data
        assert (sidecar.stat().st_ino, sidecar.stat().st_mtime_ns) == sidecar_stats[sidecar]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["style.safetensors", "style.civitai.info", "style.preview.png", "style.json"])  # fmt: skip
    assert_consistent(lib)


def test_ingest_is_idempotent_and_refuses_what_is_not_a_complete_lora(root, lib):
    path = make_lora(root / "a.safetensors")
    first = lib.ingest(path)
    assert lib.ingest(path) == first
    assert event_kinds(lib) == ["ingested"]
    partial = root / "partial.safetensors"
    partial.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated"):
        lib.ingest(partial)
    with pytest.raises(StoreError, match="one of lorad's own temp files"):
        lib.ingest(temp_name(path))
    assert [row["path"] for row in table(lib, "loras")] == [str(path.resolve())]


def test_add_variant_refuses_a_report_that_does_not_match_its_file(tmp_path, root, lib):
    path = make_lora(root / "a.safetensors")
    lib.ingest(path)
    original = lib.lora(path).original
    report = reduce_with_engine(lib.store.path_of(original.blob_sha256), tmp_path / "out.safetensors", 4)
    (tmp_path / "out.safetensors").write_bytes(make_lora(tmp_path / "x.safetensors", seed=5).read_bytes())
    with pytest.raises(StoreError, match="expected .*; not stored"):
        lib.add_variant(path, report)
    assert [v.kind for v in lib.lora(path).variants] == ["original"]
    assert len(list(lib.store.blobs())) == 1


def test_add_variant_refuses_a_reduction_of_another_lora(tmp_path, root, lib):
    a, b = make_lora(root / "a.safetensors", seed=1), make_lora(root / "b.safetensors", seed=2)
    lib.ingest(a)
    lib.ingest(b)
    report = reduce_with_engine(a, tmp_path / "out.safetensors", 4)
    with pytest.raises(StoreError, match="not a stored variant of this LoRA"):
        lib.add_variant(b, report)
    with pytest.raises(StoreError, match="has no variant"):
        lib.switch(b, lib.lora(a).original_variant_id)
    assert sha256_of(b) == lib.lora(b).original.blob_sha256


# -- bad cases -------------------------------------------------------------------------------------


def test_a_hand_edited_watched_file_becomes_a_new_original_and_is_never_overwritten(tmp_path, root, lib):
    path = make_lora(root / "style.safetensors")
    first = lib.ingest(path).original
    r4, _ = _reduce(lib, path, 4, tmp_path / "work")
    lib.activate(path, r4.id)
    edited = make_lora(tmp_path / "edited.safetensors", seed=42).read_bytes()
    path.write_bytes(edited)  # the user saved a new version over lorad's reduced file

    with pytest.raises(StoreError, match="changed outside lorad; kept it as a new original") as err:
        lib.switch(path, first.id)
    assert "\n" not in str(err.value)
    assert path.read_bytes() == edited
    view = lib.lora(path)
    assert view.active == view.original and view.original.blob_sha256 == sha256_of(path)
    assert [v.kind for v in view.variants] == ["original", "reduced", "original"]
    assert lib.store.is_intact(first.blob_sha256) and lib.store.is_intact(r4.blob_sha256)
    assert event_kinds(lib)[-2:] == ["ingested", "failed"]
    assert lib.events()[-2].detail["reason"] == "changed outside lorad"

    lib.switch(path, first.id)  # the first original is still a variant to switch to
    assert sha256_of(path) == first.blob_sha256
    lib.revert(path)  # revert means the newest original: the user's edit
    assert path.read_bytes() == edited
    assert_consistent(lib)


def test_rescans_trust_an_unchanged_stamp_and_verify_always_rehashes(tmp_path, root, lib):
    path = make_lora(root / "style.safetensors")
    first = lib.ingest(path).original
    r4, _ = _reduce(lib, path, 4, tmp_path / "work")
    lib.activate(path, r4.id)
    # A same-size edit with the old mtime put back: the stamp cannot see it, by design.
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    lib.ingest(path)  # a rescan: trusts the stamp, no hashing
    assert lib.lora(path).active.id == r4.id
    report = lib.verify()  # verify hashes everything and takes the edit in as a new original
    assert [r.new_original for r in report.reconciled] == [True]
    assert lib.lora(path).original.blob_sha256 == sha256_of(path) != first.blob_sha256
    # An ordinary edit moves the mtime: a rescan notices it without verify.
    make_lora(tmp_path / "v2.safetensors", seed=7)
    os.replace(tmp_path / "v2.safetensors", path)
    lib.ingest(path)
    assert lib.lora(path).original.blob_sha256 == sha256_of(path)
    assert_consistent(lib)


def test_a_watched_file_being_rewritten_is_left_alone(tmp_path, root, lib):
    path = make_lora(root / "style.safetensors")
    lib.ingest(path)
    r4, _ = _reduce(lib, path, 4, tmp_path / "work")
    half = path.read_bytes()[:-64]
    path.write_bytes(half)  # a download in progress over the same name
    with pytest.raises(StoreError, match="not a complete safetensors file"):
        lib.activate(path, r4.id)
    assert path.read_bytes() == half


def test_a_corrupt_blob_is_refused_quarantined_and_the_file_kept(tmp_path, root, lib):
    path = make_lora(root / "style.safetensors")
    lib.ingest(path)
    r4, _ = _reduce(lib, path, 4, tmp_path / "work")
    blob = lib.store.path_of(r4.blob_sha256)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    before = path.read_bytes()

    with pytest.raises(StoreError, match=f"variant {r4.id}'s stored bytes are corrupt"):
        lib.activate(path, r4.id)
    assert path.read_bytes() == before and not temp_name(path).exists()
    assert not lib.store.has(r4.blob_sha256) and len(list(lib.store.bad.iterdir())) == 1
    assert event_kinds(lib)[-2:] == ["quarantined", "failed"]
    report = lib.verify()
    assert report.missing == (r4.blob_sha256,) and not report.ok


def test_verify_repairs_a_corrupt_original_from_the_watched_file(root, lib):
    path = make_lora(root / "style.safetensors")
    sha = lib.ingest(path).original.blob_sha256
    blob = lib.store.path_of(sha)
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\xff")

    report = lib.verify()
    assert report.corrupt == (sha,) and report.repaired == (sha,) and report.ok
    assert lib.store.is_intact(sha)
    assert event_kinds(lib)[-2:] == ["quarantined", "verified"]
    assert lib.events()[-1].detail["repaired"] == [sha]
    assert_consistent(lib)


def test_verify_reports_missing_files_strays_and_takes_in_changed_files(tmp_path, root, lib):
    kept = make_lora(root / "kept.safetensors", seed=1)
    gone = make_lora(root / "gone.safetensors", seed=2)
    changed = make_lora(root / "changed.safetensors", seed=3)
    for p in (kept, gone, changed):
        lib.ingest(p)
    gone.unlink()
    changed.write_bytes(make_lora(tmp_path / "new.safetensors", seed=4).read_bytes())
    stray = lib.store.ingest(make_lora(tmp_path / "stray.safetensors", seed=5)).sha256

    report = lib.verify()
    assert report.missing_files == (gone.resolve(),)
    assert report.stray == (stray,)
    ((lora_id, new_original),) = [(r.lora_id, r.new_original) for r in report.reconciled]
    assert lora_id == lib.lora(changed).id and new_original
    assert lib.lora(changed).original.blob_sha256 == sha256_of(changed)
    assert not gone.exists()  # lorad does not recreate what the user removed


@pytest.mark.parametrize("op", ["switch", "revert"])
def test_paths_outside_the_watched_folders_are_refused(tmp_path, root, lib, op):
    path = make_lora(root / "style.safetensors")
    lib.ingest(path)
    outside = make_lora(tmp_path / "elsewhere" / "x.safetensors")
    link = root / "link.safetensors"
    link.symlink_to(outside)  # inside by name, outside in fact
    before = outside.read_bytes()
    for bad in (outside, link, root / ".." / "elsewhere" / "x.safetensors", root):
        args = (bad, 1) if op == "switch" else (bad,)
        with pytest.raises(StoreError, match="not inside a watched folder") as err:
            getattr(lib, op)(*args)
        assert "\n" not in str(err.value)
    unknown = root / "unknown.safetensors"
    with pytest.raises(StoreError, match="lorad has not ingested this file"):
        getattr(lib, op)(*((unknown, 1) if op == "switch" else (unknown,)))
    assert outside.read_bytes() == before and link.is_symlink()
    assert event_kinds(lib) == ["ingested"] + ["failed"] * 5
    assert lib.events()[-1].detail["op"] == op


def test_a_folder_dropped_from_the_config_is_no_longer_written(tmp_path, root, lib):
    path = make_lora(root / "style.safetensors")
    lora_id = lib.ingest(path).id
    r4, _ = _reduce(lib, path, 4, tmp_path / "work")
    (tmp_path / "other").mkdir()
    with Library(tmp_path / "state", [tmp_path / "other"]) as narrowed:
        with pytest.raises(StoreError, match="not inside a watched folder"):
            narrowed.activate(lora_id, r4.id)
    assert sha256_of(path) == lib.lora(path).original.blob_sha256


# -- full disks ------------------------------------------------------------------------------------


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


@pytest.fixture(params=["rlimit-fsize", "tmpfs-enospc"])
def full_disk(request, tmp_path):
    """Where a write runs out of room: a 1 MiB tmpfs (ENOSPC) where this process may mount one,
    else (and always for the first variant) a child process under RLIMIT_FSIZE (EFBIG)."""
    mnt = tmp_path / "small"
    mounted = request.param == "tmpfs-enospc" and _mount_tmpfs(mnt, "1m")
    if mounted:
        st = os.statvfs(mnt)
        assert st.f_blocks * st.f_frsize <= 1 << 20  # really the small filesystem
    else:
        mnt.mkdir(exist_ok=True)
    yield mnt, mounted
    if mounted:
        subprocess.run(["umount", str(mnt)], check=True)


def _checkpoint(lib: Library) -> None:
    # Empty the WAL so the child's few writes to it stay far below its file-size limit.
    with lib.db.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def _fill(folder: Path, leave: int) -> None:
    st = os.statvfs(folder)
    (folder / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def test_disk_full_while_reverting_changes_nothing(tmp_path, full_disk):
    mnt, mounted = full_disk
    root = mnt / "loras"
    root.mkdir()
    path = make_lora(root / "big.safetensors", modules=2, dim=1024, rank=32)  # 512 KiB
    with Library(tmp_path / "state", [root], link_mode="copy") as lib:
        lib.ingest(path)
        r2, _ = _reduce(lib, path, 2, tmp_path / "work")
        lib.activate(path, r2.id)  # the watched file is now small
        if mounted:
            _fill(mnt, leave=200_000)
        _checkpoint(lib)
    done = run_child(["revert", str(tmp_path / "state"), str(root), str(path)],
                     fsize_limit=None if mounted else 300_000)  # fmt: skip
    expected = "No space left on device" if mounted else "File too large"
    assert done.returncode == 3, done.stderr
    assert f"cannot write {path.resolve()}: {expected}; the file was left as it was" in done.stdout
    assert json.loads(done.stdout)["type"] == "NoRoom"  # a TransientError: room may be made
    with Library(tmp_path / "state", [root]) as lib:
        assert sha256_of(path) == r2.blob_sha256 and not temp_name(path).exists()
        assert lib.lora(path).active_variant_id == r2.id
        assert lib.store.is_intact(lib.lora(path).original.blob_sha256)
        assert event_kinds(lib)[-1] == "failed"
        if mounted:
            (mnt / "filler").unlink()
        lib.revert(path)  # with room again, the same request succeeds
        assert sha256_of(path) == lib.lora(path).original.blob_sha256
        assert_consistent(lib)


def test_disk_full_while_storing_an_original_stores_nothing(tmp_path, full_disk):
    mnt, mounted = full_disk
    root = tmp_path / "loras"
    path = make_lora(root / "big.safetensors", modules=2, dim=1024, rank=32)
    before = path.read_bytes()
    state = mnt / "state"
    url = f"sqlite:///{tmp_path / 'lorad.db'}"  # the database elsewhere: only the store is full
    with Library(state, [root], database_url=url) as lib:
        if mounted:
            _fill(mnt, leave=300_000)
        _checkpoint(lib)
    done = run_child(["ingest", str(state), str(root), str(path), f"--db={url}"],
                     fsize_limit=None if mounted else 300_000)  # fmt: skip
    expected = "No space left on device" if mounted else "File too large"
    assert done.returncode == 3, done.stderr
    assert f"cannot store {path.resolve()}: {expected}; nothing was stored" in done.stdout
    assert json.loads(done.stdout)["type"] == "NoRoom"
    with Library(state, [root], database_url=url) as lib:
        assert path.read_bytes() == before
        assert list(lib.store.blobs()) == [] and lib.store.temp_files() == []
        assert table(lib, "loras") == [] and event_kinds(lib) == ["failed"]
        if mounted:
            (mnt / "filler").unlink()
        lib.ingest(path)
        assert_consistent(lib)


# -- gc --------------------------------------------------------------------------------------------


def test_gc_plans_first_and_never_collects_originals_or_the_active_variant(tmp_path, root, lib):
    path = make_lora(root / "style.safetensors")
    original = lib.ingest(path, policy="default").original
    variants = [_reduce(lib, path, rank, tmp_path / "work")[0] for rank in (6, 5, 4, 3, 2)]
    lib.activate(path, variants[0].id)  # the oldest reduction is the active one
    stray = lib.store.ingest(make_lora(tmp_path / "stray.safetensors", seed=9)).sha256

    assert lib.gc(keep_variants=1).variants == ()  # all within the default one-hour grace
    plan = lib.gc(dry_run=True, keep_variants=1, grace=timedelta(0))
    assert set(plan.variants) == {v.id for v in variants[1:4]}  # newest (rank 2) and active kept
    assert {sha for sha, _ in plan.blobs} == {v.blob_sha256 for v in variants[1:4]}
    assert [sha for sha, _ in plan.stray] == [stray]
    assert plan.bytes_freed == sum(n for _, n in plan.blobs) + lib.store.path_of(stray).stat().st_size
    assert len(list(lib.store.blobs())) == 7  # a dry run removes nothing

    done = lib.gc(dry_run=False, keep_variants=1, grace=timedelta(0))
    assert done.executed and done.variants == plan.variants
    remaining = {v.id for v in lib.lora(path).variants}
    assert remaining == {original.id, variants[0].id, variants[4].id}
    assert set(lib.store.blobs()) == {original.blob_sha256, variants[0].blob_sha256, variants[4].blob_sha256}
    assert table(lib, "module_metrics") and {m["variant_id"] for m in table(lib, "module_metrics")} == {
        variants[0].id, variants[4].id}  # fmt: skip
    assert event_kinds(lib)[-1] == "collected"

    # a policy's own keep count wins over the default
    plan = lib.gc(keep_variants=0, keep_by_policy={"default": 1}, grace=timedelta(0))
    assert plan.variants == () and plan.blobs == ()
    lib.gc(dry_run=False, keep_variants=0, grace=timedelta(0))  # even keeping none:
    assert {v.id for v in lib.lora(path).variants} == {original.id, variants[0].id}
    assert sha256_of(path) == variants[0].blob_sha256
    assert_consistent(lib)


def test_gc_keeps_blobs_a_pending_job_will_read(tmp_path, lib):
    from lorad.library.db import repo
    from lorad.library.db.models import Job

    info = lib.store.ingest(make_lora(tmp_path / "queued.safetensors", seed=3))
    with lib.db.write() as s:
        repo.ensure_blob(s, repo.BlobRecord(info.sha256, info.bytes, "0" * 64, "kohya", 3, None, None))
        s.add(Job(blob_sha256=info.sha256, policy="p", policy_hash="h", state="pending"))
    assert lib.gc(dry_run=False, grace=timedelta(0)).blobs == ()
    assert lib.store.is_intact(info.sha256)
    with lib.db.write() as s:
        s.query(Job).update({"state": "done"})
    assert lib.gc(dry_run=False, grace=timedelta(0)).blobs == ((info.sha256, info.bytes),)
    assert not lib.store.has(info.sha256)


# -- what is not a regular file, or cannot be read, at a LoRA's path ------------------------------


def _within(seconds: float, call, *args):  # type: ignore[no-untyped-def]
    """Run `call` in a thread; fail (instead of hanging the suite) if it blocks past `seconds`."""
    import threading

    out: list = []

    def run() -> None:
        try:
            out.append(("ok", call(*args)))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(("err", e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(call, '__name__', call)} blocked for {seconds}s")
    kind, value = out[0]
    if kind == "err":
        raise value
    return value


def test_a_fifo_at_a_loras_path_is_refused_with_its_reason_never_waited_on(tmp_path, root, lib):
    path = make_lora(root / "style.safetensors")
    lib.ingest(path)
    r4, _ = _reduce(lib, path, 4, tmp_path / "work")
    lib.activate(path, r4.id)
    path.unlink()
    os.mkfifo(path)
    try:
        report = _within(30, lib.verify)
        assert report.refused == ((path.resolve(), "a FIFO (named pipe), not a regular file; lorad never opens those"),)
        assert report.unsettled == () and report.ok
        for op, args in (("revert", (path,)), ("switch", (path, r4.id)), ("activate", (path, r4.id))):
            with pytest.raises(StoreError, match="a FIFO \\(named pipe\\), not a regular file.*left as it is"):
                _within(30, getattr(lib, op), *args)
        with pytest.raises(FormatError, match="a FIFO"):
            _within(30, lib.ingest, path)
        [refused] = lib.refusals()
        assert (refused.path, refused.cause, refused.lora_id) == (path.resolve(), "not-regular", lib.lora(path).id)
        assert lib.lora(path).refused == refused
        assert lib.lora(path).active_variant_id == r4.id  # the records still say what lorad last put there
    finally:
        path.unlink()
    lib.store.materialize(r4.blob_sha256, path)  # the file is back as lorad left it
    lib.ingest(path)
    assert lib.refusals() == [] and lib.lora(path).refused is None


def test_store_ingest_of_a_fifo_refuses_at_once(tmp_path):
    from lorad.errors import NotRegularFileError
    from lorad.library.store import Store

    store = Store(tmp_path / "state")
    fifo = tmp_path / "swapped.safetensors"  # looked at as a file, swapped for a FIFO since
    os.mkfifo(fifo)
    try:
        with pytest.raises(NotRegularFileError, match="a FIFO"):
            _within(30, store.ingest, fifo)
    finally:  # let a reader stuck in open() go, had the test failed that way
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert store.temp_files() == [] and list(store.blobs()) == []


def test_verify_names_an_unreadable_watched_file_instead_of_failing(tmp_path, root, lib):
    """A daemon without CAP_DAC_OVERRIDE meets a mode-000 file at a LoRA's path."""
    from tests._store_fixtures import WITHOUT_DAC

    path = make_lora(root / "style.safetensors")
    lib.ingest(path)
    _checkpoint(lib)
    os.chmod(path, 0)
    done = run_child(["verify", str(tmp_path / "state"), str(root), str(path)], prefix=WITHOUT_DAC)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["refused"] == [[str(path.resolve()),
                                  "permission denied: lorad's user cannot read it (fix its mode or owner, then `lorad rescan`)"]]  # fmt: skip
    [refused] = lib.refusals()
    assert refused.cause == "unreadable"
    os.chmod(path, 0o644)
    lib.verify()
    assert lib.refusals() == []


# -- file names that are not UTF-8 -----------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_recorded_and_addressed_by_its_exact_bytes(tmp_path, root, lib):
    from sqlalchemy import text

    raw = os.fsencode(root.resolve()) + b"/caf\xe9 \\x41.safetensors"  # latin-1, and a literal \x41
    path = Path(os.fsdecode(raw))
    make_lora(path)
    original = sha256_of(path)
    view = lib.ingest(path)
    assert os.fsencode(view.path) == raw
    r4, _ = _reduce(lib, path, 4, tmp_path / "work")
    lib.activate(path, r4.id)
    assert sha256_of(path) == r4.blob_sha256
    lib.revert(Path(os.fsdecode(raw)))
    assert sha256_of(path) == original
    lib.switch(path, r4.id)
    with lib.db.engine.connect() as conn:  # stored as valid UTF-8 text, by the documented scheme
        [stored] = conn.execute(text("SELECT path FROM loras")).scalars()
    assert stored == "bytes:" + str(root.resolve()) + r"/caf\xe9 \\x41.safetensors"
    with Library(tmp_path / "state", [root]) as again:  # and read back as the same bytes
        [lora] = again.loras()
        assert os.fsencode(lora.path) == raw and lora.active_variant_id == r4.id
    assert_consistent(lib)
    assert [os.fsencode(p) for p in root.iterdir()] == [raw]  # no second file under another name


# -- refusals and a database someone else holds ----------------------------------------------------


def test_refusals_are_recorded_once_per_path_forgotten_when_taken_or_gone(root, lib):
    from lorad.library.refusals import Refusal

    cut = root / "cut.safetensors"
    cut.write_bytes(make_lora(root / "tmp.safetensors").read_bytes()[:-8])
    (root / "tmp.safetensors").unlink()
    pickle = root / "old.safetensors"
    pickle.write_bytes(b"\x80\x04\x95" + b"\0" * 32)
    lib.record_refusal(cut, Refusal("incomplete", "truncated"))
    lib.record_refusal(pickle, Refusal("pickle", "a pickle"))
    first = lib.refusal(pickle)
    lib.record_refusal(pickle, Refusal("pickle", "a pickle"))  # said again: nothing changes
    assert lib.refusal(pickle) == first
    assert [(r.path, r.cause, r.lora_id) for r in lib.refusals()] == [(cut, "incomplete", None), (pickle, "pickle", None)]
    make_lora(cut)  # completed
    lib.ingest(cut)
    assert [r.path for r in lib.refusals()] == [pickle]
    pickle.unlink()
    assert lib.refusals() == []  # a path gone is not shown...
    assert len(table(lib, "refusals")) == 1
    lib.prune_refusals([cut])  # ...and the next scan forgets it
    assert table(lib, "refusals") == []


def test_a_database_locked_by_another_process_is_a_transient_refusal(tmp_path, root):
    import sys
    import time

    from lorad.errors import TransientError
    from lorad.library.db.session import DatabaseUnavailable

    path = make_lora(root / "style.safetensors")
    with Library(tmp_path / "state", [root], busy_timeout_ms=2000) as lib:  # waits 2 s for a lock
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sqlite3, sys\n"
             "c = sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN IMMEDIATE')\n"
             "print('locked', flush=True); sys.stdin.readline()", str(tmp_path / "state" / "lorad.db")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout.readline() == "locked\n"
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match="database is locked") as caught:
                lib.ingest(path)
            # One wait for the lock, not a second one to record the failure in the same database.
            assert isinstance(caught.value, TransientError) and 1.9 < time.monotonic() - started < 3.9
        finally:
            holder.communicate("\n", timeout=10)
        assert table(lib, "loras") == [] and table(lib, "events") == []
        lib.ingest(path)  # once the lock is gone
        assert_consistent(lib)
