"""lorad on a real PostgreSQL server (tests/_pg.py starts one): the migrations, the library's main
flow, and two workers sharing one job queue, as a fleet sharing one store would."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from lorad.daemon.queue import DONE, FAILED, PENDING, RUNNING, LeaseLost, Queue
from lorad.errors import StoreError
from lorad.library.db import migrate
from lorad.library.db.models import Base
from lorad.library.db.session import Database
from lorad.library.library import Library, VariantView
from tests._pg import pg_server, pg_url  # noqa: F401  (fixtures)
from tests._store_fixtures import make_lora, sha256_of, table
from tests.test_library import _events, _reduce, root  # noqa: F401 - root is a fixture
from tests.test_migrations import TABLES, _diff
from tests.test_queue import Clock, run_competing_workers, sha


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


# -- migrations ------------------------------------------------------------------------------------


def test_upgrade_from_empty_then_downgrade_to_base(pg_url):
    assert migrate.current(pg_url) is None
    assert migrate.upgrade(pg_url) is None  # backups are for SQLite files only
    assert migrate.current(pg_url) == migrate.head()
    assert _tables(pg_url) == TABLES
    migrate.downgrade(pg_url, "base")
    assert migrate.current(pg_url) is None
    assert _tables(pg_url) == set()
    migrate.upgrade(pg_url)  # and back up again from base
    assert _tables(pg_url) == TABLES
    assert migrate.upgrade(pg_url) is None  # at head: nothing done


def test_models_match_the_migrated_schema(pg_url):
    migrate.upgrade(pg_url)
    assert _diff(pg_url, Base.metadata) == []


def test_the_comparison_notices_a_model_the_migrations_lack(pg_url):
    # Guards the test above on this dialect: a schema drift must show up as a difference.
    migrate.upgrade(pg_url)
    drifted = sa.MetaData()
    for t in Base.metadata.sorted_tables:
        t.to_metadata(drifted)
    drifted.tables["blobs"].append_column(sa.Column("colour", sa.Text()))
    assert [(d[0], d[3].name) for d in _diff(pg_url, drifted)] == [("add_column", "colour")]


# -- the library -----------------------------------------------------------------------------------


@pytest.fixture
def lib(tmp_path, root, pg_url):
    library = Library(tmp_path / "state", [root], database_url=pg_url, link_mode="copy")
    yield library
    library.close()


def _assert_shows(lib: Library, path: Path, variant: VariantView) -> None:
    """The watched file holds the variant's bytes and the database's row names it active."""
    assert sha256_of(path) == variant.blob_sha256
    assert lib.store.is_intact(variant.blob_sha256)
    (row,) = table(lib, "loras")
    assert row["active_variant_id"] == variant.id


def test_ingest_reduce_activate_revert_switch(tmp_path, root, lib):
    assert lib.db.engine.dialect.name == "postgresql"  # not a silent fallback to SQLite
    path = make_lora(root / "style.safetensors", rank=8)
    original_bytes = path.read_bytes()

    view = lib.ingest(path, policy="default", actor="daemon")
    original = view.original
    assert original.blob_sha256 == sha256_of(path) and path.read_bytes() == original_bytes
    _assert_shows(lib, path, original)
    (blob,) = table(lib, "blobs")
    assert (blob["format"], blob["modules"], blob["bytes"]) == ("kohya", 3, len(original_bytes))

    r4, report4 = _reduce(lib, path, 4, tmp_path / "work")
    assert (r4.kind, r4.param, r4.source_variant_id) == ("reduced", 4, original.id)
    assert [(m["rank_in"], m["rank_out"]) for m in lib.module_metrics(r4.id)] == [(8, 4)] * 3
    _assert_shows(lib, path, original)  # recorded, not yet activated

    lib.activate(path, r4.id, actor="daemon")
    _assert_shows(lib, path, r4)
    assert path.stat().st_size == report4.output.bytes < len(original_bytes)

    lib.revert(path, actor="cli:uid=1000")
    _assert_shows(lib, path, original)
    assert path.read_bytes() == original_bytes

    r2, _ = _reduce(lib, path, 2, tmp_path / "work")
    lib.switch(path, r2.id, actor="cli:uid=1000")
    _assert_shows(lib, path, r2)
    lib.switch(path, r4.id, actor="cli:uid=1000")
    _assert_shows(lib, path, r4)

    assert _events(lib) == [
        ("ingested", "daemon", original.id),
        ("reduced", "daemon", r4.id),
        ("activated", "daemon", r4.id),
        ("reverted", "cli:uid=1000", original.id),
        ("reduced", "daemon", r2.id),
        ("switched", "cli:uid=1000", r2.id),
        ("switched", "cli:uid=1000", r4.id),
    ]
    _assert_event_rows(lib, path, r2, r4)
    assert [v["kind"] for v in table(lib, "variants")] == ["original", "reduced", "reduced"]


def _assert_event_rows(lib: Library, path: Path, r2: VariantView, r4: VariantView) -> None:
    """The raw rows: JSON details and timestamps come back from PostgreSQL as they went in."""
    rows = table(lib, "events")
    assert rows[-1]["detail"] == {"previous_variant": r2.id, "sha256": r4.blob_sha256,
                                  "path": str(path.resolve())}  # fmt: skip
    assert all(r["at"].tzinfo is not None for r in rows)  # stored as timestamptz, not naive
    assert [r["at"] for r in rows] == sorted(r["at"] for r in rows)
    assert lib.events()[-1].at.tzinfo is not None


def test_verify_and_gc(tmp_path, root, lib):
    path = make_lora(root / "style.safetensors")
    lib.ingest(path)
    r4, _ = _reduce(lib, path, 4, tmp_path / "work")
    r2, _ = _reduce(lib, path, 2, tmp_path / "work")
    lib.activate(path, r4.id)

    report = lib.verify()
    assert report.ok and report.blobs_checked == 3 and report.reconciled == ()
    assert all(b["verified_at"] is not None for b in table(lib, "blobs"))

    plan = lib.gc(dry_run=False, keep_variants=0, grace=timedelta(0))
    # Only r2 goes: the original and the active variant are never collected.
    assert plan.variants == (r2.id,) and [digest for digest, _ in plan.blobs] == [r2.blob_sha256]
    assert not lib.store.has(r2.blob_sha256)
    assert [v["id"] for v in table(lib, "variants")] == [lib.lora(path).original_variant_id, r4.id]
    # The database set the deleted variant's references to NULL (ondelete="SET NULL").
    assert [e["variant_id"] for e in table(lib, "events") if e["kind"] == "reduced"] == [r4.id, None]
    _assert_shows(lib, path, r4)


# -- the queue: two workers, one table ------------------------------------------------------------


@pytest.fixture
def migrated_url(pg_url) -> str:
    migrate.upgrade(pg_url)
    return pg_url


@pytest.fixture
def two_databases(migrated_url):
    """Two workers' own engines on one database, as two hosts of a fleet would have."""
    dbs = (Database(migrated_url), Database(migrated_url))
    yield dbs
    for db in dbs:
        db.close()


def test_two_workers_claim_every_job_exactly_once(two_databases):
    """Both workers take part (run_competing_workers holds each one's first job until the other has
    claimed too), every job is completed once, and no thread died or hung unnoticed."""
    a, b = (Queue(db) for db in two_databases)
    ids = [a.enqueue(sha(n), None, "p", "h")[0].id for n in range(40)]
    completed = run_competing_workers({"worker-a": lambda: nullcontext(a), "worker-b": lambda: nullcontext(b)})
    assert sorted(completed) == ids
    assert set(completed.values()) == {"worker-a", "worker-b"}  # both really claimed jobs
    assert a.counts() == {PENDING: 0, RUNNING: 0, DONE: 40, FAILED: 0}
    # Claimed once each (nobody claimed, lost and re-claimed a job), and released by its completer.
    assert {(j.id, j.state, j.attempts, j.worker) for j in b.jobs()} == {(i, DONE, 1, None) for i in ids}


def test_a_claim_skips_the_job_another_worker_is_claiming(two_databases):
    """Deterministic overlap: worker B claims while A's claim transaction holds job 1's row lock.
    B must take job 2 at once: not wait for A (FOR UPDATE alone) nor also take job 1 (no lock)."""
    db_a, db_b = two_databases
    a, b = Queue(db_a), Queue(db_b)
    first = a.enqueue(sha(1), None, "p", "h")[0]
    second = a.enqueue(sha(2), None, "p", "h")[0]
    claimed_by_b = []

    def _b_claims_now() -> None:  # runs when A has selected (and locked) its job
        claimed_by_b.append(b.claim("worker-b"))

    with _after_first_select_from_jobs(db_a, _b_claims_now):
        job_a = a.claim("worker-a")
    assert len(claimed_by_b) == 1, "A's claim never selected from jobs"
    assert job_a.id == first.id and claimed_by_b[0].id == second.id
    assert {(j.id, j.state, j.worker) for j in a.jobs()} == {
        (first.id, RUNNING, "worker-a"), (second.id, RUNNING, "worker-b")}  # fmt: skip


def test_two_workers_enqueueing_the_same_job_get_one_job(two_databases):
    """Deterministic race: B creates the job between A's look-up and A's insert (SQLite's BEGIN
    IMMEDIATE rules this out; PostgreSQL's READ COMMITTED does not). A gets B's job, no error."""
    db_a, db_b = two_databases
    a, b = Queue(db_a), Queue(db_b)
    made_by_b = []

    def _b_enqueues_now() -> None:
        made_by_b.append(b.enqueue(sha(1), None, "p", "h"))

    with _after_first_select_from_jobs(db_a, _b_enqueues_now):
        job, created = a.enqueue(sha(1), None, "p", "h")
    assert len(made_by_b) == 1, "A's enqueue never selected from jobs"
    assert made_by_b[0][1] is True and created is False and job.id == made_by_b[0][0].id
    assert [j.id for j in a.jobs()] == [job.id]


@contextmanager
def _after_first_select_from_jobs(db: Database, action: Callable[[], None]) -> Iterator[None]:
    """Run `action` once, inside `db`'s transaction, right after its first SELECT from jobs: a
    chosen moment for another worker to act, without sleeps or luck."""
    done = []

    def _hook(_conn, _cursor, statement: str, *_) -> None:  # type: ignore[no-untyped-def]
        if not done and statement.lstrip().startswith("SELECT") and "FROM jobs" in statement:
            done.append(True)
            action()

    event.listen(db.engine, "after_cursor_execute", _hook)
    try:
        yield
    finally:
        event.remove(db.engine, "after_cursor_execute", _hook)


def test_an_expired_lease_is_requeued_for_another_worker(two_databases):
    clock = Clock()
    a, b = (Queue(db, lease_seconds=30, clock=clock) for db in two_databases)
    job = a.enqueue(sha(1), None, "p", "h")[0]
    held = a.claim("worker-a")
    assert held.lease_until == clock.now + timedelta(seconds=30)
    assert held.lease_until.tzinfo == UTC  # aware UTC through timestamptz
    clock.advance(29)
    assert b.requeue_expired() == []  # still leased
    clock.advance(2)
    assert b.requeue_expired() == [job.id]  # worker-a is presumed dead
    requeued = b.get(job.id)
    assert (requeued.state, requeued.worker) == (PENDING, None) and "lease expired" in requeued.error
    with pytest.raises(LeaseLost):
        a.heartbeat(job.id, "worker-a")
    again = b.claim("worker-b")
    assert (again.id, again.attempts, again.worker) == (job.id, 2, "worker-b")
    with pytest.raises(LeaseLost):
        a.complete(job.id, "worker-a", None)  # the dead worker's late result is refused
    assert b.complete(job.id, "worker-b", None).state == DONE


def test_effect_measurements_are_kept_and_the_latest_shown(tmp_path, root, lib):
    from lorad.library import effects
    from tests.test_effect_records import effect_doc

    path = make_lora(root / "style.safetensors", rank=8)
    original = lib.ingest(path, policy="default", actor="daemon").original
    r4, _ = _reduce(lib, path, 4, tmp_path / "work")
    sources = lib.effect_sources(path)  # the only reduction, though not active
    assert (sources.variant.variant_id, sources.reference.variant_id) == (r4.id, original.id)
    [(name, stored, _)] = sources.variant.files
    assert (name, stored) == ("style.safetensors", lib.store.path_of(r4.blob_sha256))

    first = lib.record_effect(r4.id, effects.parse(effect_doc([0.5, 0.75])), original.id, actor="cli:uid=0")
    assert (first.effect_retained, first.per_sample, first.reference_variant_id) == (0.625, (0.5, 0.75), original.id)
    lib.record_effect(r4.id, effects.parse(effect_doc([-0.5, 0.5], base="/m2", base_sha256="cd" * 32)), actor="x")
    lib.record_effect(r4.id, effects.parse(effect_doc([0.25, 0.75])), actor="x")  # replaces the first
    shown = lib.lora(path).variant(r4.id)
    assert shown.effect is not None and (shown.effect.effect_retained, shown.effect.base) == (0.5, "/models/sd15")
    assert [(e.base, e.effect_retained) for e in lib.effects(path)] == [("/models/sd15", 0.5), ("/m2", 0.0)]
    assert lib.effects(path)[0].samples == effect_doc([0.5])["samples"]
    rows = table(lib, "variant_effects")
    assert len(rows) == 2 and all(r["measured_at"].tzinfo is not None for r in rows)
    assert sorted(r["per_sample"] for r in rows) == [[-0.5, 0.5], [0.25, 0.75]]  # JSON, as it went in
    with pytest.raises(StoreError, match="is the original"):
        lib.record_effect(original.id, effects.parse(effect_doc([0.5])), actor="x")
