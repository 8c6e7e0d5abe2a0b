"""The session layer and the records, on a real migrated SQLite file."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, StatementError

from lorad.engine.report import FileInfo, ModuleReport, Report
from lorad.errors import TransientError
from lorad.library.db import migrate, repo
from lorad.library.db.models import Event, Job, Lora, ModuleMetric, Variant
from lorad.library.db.session import Database, DatabaseUnavailable, default_url


@pytest.fixture
def url(tmp_path):
    url = default_url(tmp_path)
    migrate.upgrade(url)
    return url


@pytest.fixture
def db(url):
    database = Database(url)
    yield database
    database.close()


def _blob(sha: str = "a" * 64) -> repo.BlobRecord:
    return repo.BlobRecord(sha, 100, "d" * 64, "kohya", 3, "e" * 64, "12345678")


def _lora_with_original(s, path: str = "/w/a.safetensors") -> tuple[Lora, Variant]:
    lora = repo.add_lora(s, path, "/w", "default")
    repo.ensure_blob(s, _blob())
    variant = repo.add_original(s, lora, "a" * 64)
    repo.set_original(s, lora, variant)
    repo.set_active(s, lora, variant)
    return lora, variant


def test_each_connection_gets_the_sqlite_pragmas(db):
    with db.read() as s:
        got = {p: s.execute(text(f"PRAGMA {p}")).scalar() for p in
               ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")}  # fmt: skip
    assert got == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 10_000, "synchronous": 1}


def test_write_takes_the_write_lock_at_begin_and_reads_still_work(url, db):
    other = Database(url, busy_timeout_ms=100)
    try:
        with db.write() as s:
            s.execute(text("SELECT 1"))  # nothing written yet: only BEGIN IMMEDIATE holds the lock
            # A lock held past busy_timeout is a transient refusal, not a crash of the caller.
            with pytest.raises(DatabaseUnavailable, match="database is locked") as caught:
                with other.write() as s2:
                    s2.execute(text("SELECT 1"))
            assert isinstance(caught.value, TransientError)
            with other.read() as s3:  # WAL: readers are not blocked by the writer
                assert s3.execute(text("SELECT count(*) FROM loras")).scalar() == 0
    finally:
        other.close()


def test_a_second_writer_waits_for_the_first(url, db):
    other = Database(url, busy_timeout_ms=5_000)
    started, done = threading.Event(), []

    def second_writer() -> None:
        started.set()
        with other.write() as s:
            repo.record_event(s, "verified", "second")
        done.append(True)

    try:
        with db.write() as s:
            repo.record_event(s, "verified", "first")
            thread = threading.Thread(target=second_writer)
            thread.start()
            started.wait()
            thread.join(0.3)
            assert not done  # blocked on busy_timeout, not failed
        thread.join(5)
        assert done
        with db.read() as s:
            assert [e.actor for e in repo.events(s)] == ["first", "second"]
    finally:
        other.close()


def test_write_rolls_back_on_error(db):
    with pytest.raises(RuntimeError):
        with db.write() as s:
            repo.record_event(s, "verified", "test")
            raise RuntimeError("boom")
    with db.read() as s:
        assert repo.events(s) == []


def test_times_are_aware_utc_and_naive_times_are_refused(db):
    at = datetime(2026, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    with db.write() as s:
        s.add(Job(blob_sha256="a" * 64, policy="p", policy_hash="h", state="pending", not_before=at))
    with db.read() as s:
        job = s.scalars(select(Job)).one()
        assert job.not_before == at and job.not_before.tzinfo == UTC
        assert job.created_at.tzinfo == UTC
        # comparisons go through the column type, so aware parameters compare correctly
        assert s.scalars(select(Job).where(Job.not_before < at + timedelta(seconds=1))).all() == [job]
        assert s.scalars(select(Job).where(Job.not_before > at)).all() == []
    with pytest.raises(StatementError, match="naive"):
        with db.write() as s:
            s.add(Job(blob_sha256="b" * 64, policy="p", policy_hash="h", state="pending",
                      not_before=datetime(2026, 1, 1)))  # fmt: skip


def test_jobs_table_defaults_and_uniqueness(db):
    with db.write() as s:
        s.execute(text("INSERT INTO jobs (blob_sha256, policy, policy_hash, state, created_at, updated_at)"
                       " VALUES ('x', 'p', 'h', 'pending', '2026-01-01', '2026-01-01')"))  # fmt: skip
    with db.read() as s:
        job = s.scalars(select(Job)).one()
        assert (job.kind, job.attempts, job.max_attempts) == ("reduce", 0, 3)
    with pytest.raises(IntegrityError, match="UNIQUE"):
        with db.write() as s:
            s.add(Job(kind="reduce", blob_sha256="x", policy="other", policy_hash="h", state="pending"))
    with pytest.raises(IntegrityError, match="CHECK"):
        with db.write() as s:
            s.add(Job(blob_sha256="y", policy="p", policy_hash="h", state="sleeping"))


def test_foreign_keys_are_enforced(db):
    with pytest.raises(IntegrityError, match="FOREIGN KEY"):
        with db.write() as s:
            s.add(Variant(lora_id=999, blob_sha256="a" * 64, kind="original"))


def test_find_blobs_by_every_identity_users_have(db):
    with db.write() as s:
        _lora_with_original(s)
    with db.read() as s:
        for text_ in ("a" * 64, "a" * 10, "d" * 12, "e" * 64, "AAAAAAAAAA"):
            assert [b.sha256 for b in repo.find_blobs(s, text_)] == ["a" * 64], text_
        assert repo.find_blobs(s, "f" * 12) == []
        assert repo.find_blobs(s, "a%") == []  # not a hex digest: no LIKE pattern reaches SQL


def _report() -> Report:
    modules = (
        ModuleReport("m1", "linear", 8, 4, 0.9, 0.81, 0.43, 800, 400, 1600, 800),
        ModuleReport("m2", "loha", 8, 8, 1.0, 1.0, 0.0, 100, 100, 200, 200, skipped="LoHa"),
    )
    return Report(FileInfo("/in", "a" * 64, 100), FileInfo("/out", "b" * 64, 60), "rank", 4.0,
                  0.5, "cpu", modules)  # fmt: skip


def test_reduced_variant_records_summary_and_module_metrics(db):
    with db.write() as s:
        lora, original = _lora_with_original(s)
        repo.ensure_blob(s, repo.BlobRecord("b" * 64, 60, "c" * 64, "kohya", 3, None, None))
        reduced = repo.add_reduced(s, lora, "b" * 64, original, _report())
    with db.read() as s:
        v = s.get(Variant, reduced.id)
        assert (v.kind, v.method, v.param, v.source_variant_id) == ("reduced", "rank", 4.0, original.id)
        assert (v.fro_retained_mean, v.params_in, v.params_out, v.bytes_in, v.bytes_out) == (
            0.9, 900, 500, 100, 60)  # fmt: skip
        rows = repo.module_metrics_of(s, v.id)
        assert [(m.name, m.rank_in, m.rank_out, m.skipped) for m in rows] == [
            ("m1", 8, 4, None), ("m2", 8, 8, "LoHa")]  # fmt: skip


def test_deleting_a_variant_cascades_metrics_and_keeps_the_audit_trail(db):
    with db.write() as s:
        lora, original = _lora_with_original(s)
        repo.ensure_blob(s, repo.BlobRecord("b" * 64, 60, "c" * 64, "kohya", 3, None, None))
        reduced = repo.add_reduced(s, lora, "b" * 64, original, _report())
        repo.record_event(s, "reduced", "test", lora.id, reduced.id, method="rank")
    with db.write() as s:
        repo.delete_variants(s, [reduced.id])
    with db.read() as s:
        assert s.scalars(select(ModuleMetric)).all() == []
        event = s.scalars(select(Event)).one()
        assert (event.kind, event.variant_id, event.detail) == ("reduced", None, {"method": "rank"})


def test_events_limit_returns_the_newest_in_order(db):
    with db.write() as s:
        for i in range(5):
            repo.record_event(s, "verified", f"actor{i}")
    with db.read() as s:
        assert [e.actor for e in repo.events(s, limit=2)] == ["actor3", "actor4"]
