"""gc in a fleet: two Library objects ("nodes") on one real PostgreSQL database (tests/_pg.py) and one
store. One records variants while the other collects with a zero grace period, in a race loop: no
referenced blob is ever deleted, unreferenced ones are; two collections at once: one runs, the other
says another node holds gc; ages are counted by the database's clock (rows) and the store's (files)."""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from lorad.library.db import repo
from lorad.library.db.models import Variant
from lorad.library.library import Library
from tests._pg import pg_server, pg_url  # noqa: F401  (fixtures)
from tests._store_fixtures import make_lora, reduce_with_engine, table

RACE_SECONDS = 6.0


@pytest.fixture
def nodes(tmp_path, pg_url):
    """Two libraries, as two nodes: their own state dirs, one watched folder, one store_dir."""
    root = tmp_path / "loras"
    root.mkdir()
    opened = [
        Library(tmp_path / f"state-{name}", [root], database_url=pg_url, link_mode="copy",
                store_dir=tmp_path / "store", node=f"node-{name}")  # fmt: skip
        for name in ("a", "b")
    ]
    yield root, *opened
    for lib in opened:
        lib.close()


def _referenced(lib: Library) -> set[str]:
    with lib.db.read() as s:
        return repo.blobs_of_variants(s)


def _forget_variant(lib: Library, variant_id: int) -> None:
    """What makes a blob unreferenced (as gc's own forgetting of an old variant does)."""
    with lib.db.write() as s:
        repo.delete_variants(s, [variant_id])


def test_a_blob_recorded_while_another_node_collects_is_never_lost(tmp_path, nodes):
    root, writer, collector = nodes
    work = tmp_path / "work"
    work.mkdir()
    # Reduced files whose bytes are recorded, forgotten and recorded again, over and over: each
    # time, between the writer storing the bytes and naming them, they are an unreferenced blob
    # (a stray file, or a row nothing names) that gc with no grace period may take.
    reports = []
    for i in range(3):
        path = make_lora(root / f"style{i}.safetensors", seed=i, modules=2, dim=32, rank=8)
        writer.ingest(path)
        original = writer.lora(path).original
        for rank in (2, 4):
            out = work / f"style{i}-r{rank}.safetensors"
            reports.append((path, reduce_with_engine(writer.store.path_of(original.blob_sha256), out, rank)))

    stop = threading.Event()
    errors: list[BaseException] = []
    collected: list[str] = []
    runs = [0, 0]

    def collect() -> None:
        try:
            while not stop.is_set():
                plan = collector.gc(dry_run=False, keep_variants=100, grace=timedelta(0))
                assert plan.skipped is None
                collected.extend(sha for sha, _ in (*plan.blobs, *plan.stray))
                runs[1] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    deadline = time.monotonic() + RACE_SECONDS
    try:
        while time.monotonic() < deadline and not errors:
            for path, report in reports:
                view = writer.add_variant(path, report, actor="worker")
                # Named by a committed variant: in the store, whole, whatever the other node does.
                assert writer.store.is_intact(view.blob_sha256), "a referenced blob was deleted"
                assert collector.store.is_intact(view.blob_sha256)
                _forget_variant(writer, view.id)
                runs[0] += 1
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    assert runs[0] > 10 and runs[1] > 10, runs
    reduced = {report.output.sha256 for _, report in reports}
    assert reduced & set(collected), "the race never made gc collect a blob being re-recorded"

    # Now one reduced variant per file stays, referenced; the rest of the store is unreferenced.
    kept = [writer.add_variant(path, report, actor="worker") for path, report in reports[::2]]
    stray = writer.store.ingest_bytes(b"not recorded by anyone")
    done = collector.gc(dry_run=False, keep_variants=100, grace=timedelta(0))
    assert stray.sha256 in {sha for sha, _ in done.stray}
    assert set(writer.store.blobs()) == _referenced(writer)
    assert {v.blob_sha256 for v in kept} <= set(writer.store.blobs())
    for lib in (writer, collector):
        report = lib.verify()
        assert report.ok and report.stray == () and report.missing == (), report


def test_two_collections_at_once_one_runs_the_other_skips(tmp_path, nodes):
    root, a, b = nodes
    path = make_lora(root / "style.safetensors", modules=2, dim=32)
    a.ingest(path)
    orphan = a.store.ingest_bytes(b"an unrecorded file")
    inside, release = threading.Event(), threading.Event()
    real_clock = a.store.clock

    def held_clock() -> float:  # a's gc holds the fleet's gc lock when it asks the store's time
        inside.set()
        assert release.wait(30)
        return real_clock()

    a.store.clock = held_clock  # type: ignore[method-assign]
    result = []
    thread = threading.Thread(target=lambda: result.append(a.gc(dry_run=False, grace=timedelta(0))))
    thread.start()
    try:
        assert inside.wait(30)
        skipped = b.gc(dry_run=False, grace=timedelta(0))
        assert skipped.skipped == "another node holds gc (node-a)"
        assert not skipped.executed and skipped.bytes_freed == 0
        assert b.store.has(orphan.sha256)
        assert b.gc(dry_run=True, grace=timedelta(0)).stray == ((orphan.sha256, orphan.bytes),)  # plans freely
    finally:
        release.set()
        thread.join(timeout=60)
    (ran,) = result
    assert ran.executed and ran.skipped is None and ran.stray == ((orphan.sha256, orphan.bytes),)
    assert not b.store.has(orphan.sha256)
    # The lock went with a's collection: b's runs now.
    again = b.gc(dry_run=False, grace=timedelta(0))
    assert again.skipped is None and again.executed is False  # nothing left to collect
    collected = [e for e in table(a, "events") if e["kind"] == "collected"]
    assert [e["detail"]["node"] for e in collected] == ["node-a"]
    assert a.verify().ok and b.verify().ok


def test_ages_are_counted_by_the_database_clock_and_the_store_clock(tmp_path, nodes):
    root, a, b = nodes
    path = make_lora(root / "style.safetensors", modules=2, dim=32)
    a.ingest(path)
    original = a.lora(path).original
    report = reduce_with_engine(a.store.path_of(original.blob_sha256), tmp_path / "r2.safetensors", 2)
    view = a.add_variant(path, report)
    with a.db.engine.connect() as conn:
        created, now = conn.execute(text("SELECT created_at, statement_timestamp() FROM blobs WHERE sha256 = :s"),
                                    {"s": view.blob_sha256}).one()  # fmt: skip
    assert timedelta(0) <= now - created < timedelta(minutes=1)  # the server's clock set it
    _forget_variant(a, view.id)
    young = a.store.ingest_bytes(b"a young unrecorded file")
    old = a.store.ingest_bytes(b"an old unrecorded file")
    two_hours_ago = a.store.clock() - 7200
    os.utime(a.store.path_of(old.sha256), (two_hours_ago, two_hours_ago))

    plan = b.gc(dry_run=False, grace=timedelta(hours=1))
    assert plan.blobs == () and plan.stray == ((old.sha256, old.bytes),)  # the row is young by the database's clock
    assert a.store.has(view.blob_sha256) and a.store.has(young.sha256)

    with a.db.write() as s:  # the row two hours old, by the database's clock
        s.execute(text("UPDATE blobs SET created_at = statement_timestamp() - interval '2 hours' WHERE sha256 = :s"),
                  {"s": view.blob_sha256})  # fmt: skip
    plan = b.gc(dry_run=False, grace=timedelta(hours=1))
    assert [sha for sha, _ in plan.blobs] == [view.blob_sha256] and plan.stray == ()
    assert not a.store.has(view.blob_sha256) and a.store.has(young.sha256)
    with a.db.read() as s:
        assert s.query(Variant).filter_by(blob_sha256=view.blob_sha256).count() == 0


def test_a_writer_stores_again_what_gc_took_between_its_store_and_its_record(tmp_path, nodes):
    """The window itself, made to happen: the reduced file is stored (not yet recorded), another
    node's gc with no grace period takes it as a stray, then the writer records it: the writer
    notices (it holds the blob's lock, then looks) and stores it again."""
    root, writer, collector = nodes
    path = make_lora(root / "style.safetensors", modules=2, dim=32)
    writer.ingest(path)
    original = writer.lora(path).original
    report = reduce_with_engine(writer.store.path_of(original.blob_sha256), tmp_path / "r2.safetensors", 2)
    real_store_file = writer.core.store_file
    taken = []

    def store_then_collect(p: Path, expect_sha256: str | None = None):  # type: ignore[no-untyped-def]
        stored = real_store_file(p, expect_sha256)
        if not taken:
            taken.append(collector.gc(dry_run=False, grace=timedelta(0)))
        return stored

    writer.core.store_file = store_then_collect  # type: ignore[method-assign]
    view = writer.add_variant(path, report)
    (plan,) = taken
    assert plan.stray == ((view.blob_sha256, view.bytes),)  # it was taken in the window...
    assert writer.store.is_intact(view.blob_sha256)  # ...and is back, recorded
    assert writer.verify().ok and collector.verify().ok
