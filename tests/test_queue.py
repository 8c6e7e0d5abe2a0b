"""The durable queue on a real, migrated SQLite database."""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest

from lorad.daemon.queue import DONE, FAILED, PENDING, RUNNING, LeaseLost, Queue, backoff, error_text, is_permanent
from lorad.errors import FormatError
from lorad.library.db import migrate
from lorad.library.db.session import Database


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'lorad.db'}"
    migrate.upgrade(url)
    return url


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(url: str, clock: Clock):  # type: ignore[no-untyped-def]
    db = Database(url)
    yield Queue(db, lease_seconds=30, max_attempts=3, clock=clock)
    db.close()


def sha(n: int) -> str:
    return f"{n:064x}"


def test_one_job_per_original_and_policy(queue: Queue) -> None:
    first, created = queue.enqueue(sha(1), None, "default", "h1")
    again, created_again = queue.enqueue(sha(1), None, "default", "h1")
    other, created_other = queue.enqueue(sha(1), None, "small", "h2")
    assert created and not created_again and created_other
    assert again.id == first.id != other.id
    assert (first.state, first.attempts, first.max_attempts) == (PENDING, 0, 3)
    assert queue.counts() == {PENDING: 2, RUNNING: 0, DONE: 0, FAILED: 0}


def test_claim_leases_the_oldest_due_job(queue: Queue, clock: Clock) -> None:
    a, _ = queue.enqueue(sha(1), None, "p", "h")
    b, _ = queue.enqueue(sha(2), None, "p", "h")
    job = queue.claim("w1")
    assert job is not None and job.id == a.id
    assert (job.state, job.worker, job.attempts) == (RUNNING, "w1", 1)
    assert job.lease_until == clock.now + timedelta(seconds=30)
    assert queue.claim("w2").id == b.id
    assert queue.claim("w3") is None


def test_heartbeat_renews_the_lease_and_records_progress(queue: Queue, clock: Clock) -> None:
    queue.enqueue(sha(1), None, "p", "h")
    job = queue.claim("w1")
    clock.advance(20)
    queue.heartbeat(job.id, "w1", progress=0.5)
    renewed = queue.get(job.id)
    assert renewed.lease_until == clock.now + timedelta(seconds=30)
    assert renewed.progress == 0.5 and renewed.heartbeat_at == clock.now
    with pytest.raises(LeaseLost):
        queue.heartbeat(job.id, "someone-else")


def test_expired_leases_are_requeued_and_the_old_holder_loses_the_job(queue: Queue, clock: Clock) -> None:
    queue.enqueue(sha(1), None, "p", "h")
    job = queue.claim("dead-worker")
    clock.advance(29)
    assert queue.requeue_expired() == []
    clock.advance(2)
    assert queue.requeue_expired() == [job.id]
    requeued = queue.get(job.id)
    assert requeued.state == PENDING and requeued.worker is None and "lease expired" in requeued.error
    with pytest.raises(LeaseLost):
        queue.complete(job.id, "dead-worker", None)
    again = queue.claim("new-worker")
    assert again.id == job.id and again.attempts == 2
    assert queue.complete(job.id, "new-worker", None).state == DONE


def test_failures_back_off_then_fail_for_good(queue: Queue, clock: Clock) -> None:
    job, _ = queue.enqueue(sha(1), None, "p", "h")
    for attempt in (1, 2):
        claimed = queue.claim("w")
        assert claimed.attempts == attempt
        failed = queue.fail(job.id, "w", "OSError: disk full")
        assert failed.state == PENDING
        assert failed.not_before == clock.now + timedelta(seconds=backoff(attempt))
        assert queue.claim("w") is None  # not due yet
        clock.advance(backoff(attempt))
    queue.claim("w")
    final = queue.fail(job.id, "w", "OSError: disk full")
    assert (final.state, final.attempts, final.error) == (FAILED, 3, "OSError: disk full")
    assert queue.claim("w") is None


def test_permanent_errors_fail_at_once_and_are_not_retried_by_the_timer(queue: Queue) -> None:
    bad, _ = queue.enqueue(sha(1), None, "p", "h")
    flaky, _ = queue.enqueue(sha(2), None, "p", "h")
    queue.claim("w")
    queue.claim("w")
    error = error_text(FormatError("x.safetensors: truncated"))
    assert is_permanent(error) and not is_permanent("OSError: disk full") and not is_permanent(None)
    assert queue.fail(bad.id, "w", error, permanent=True).state == FAILED
    queue.fail(flaky.id, "w", "OSError: disk full", permanent=True)
    assert queue.retry_failed() == [flaky.id]
    revived = queue.get(flaky.id)
    assert (revived.state, revived.attempts) == (PENDING, 0)
    assert queue.get(bad.id).state == FAILED
    # An explicit request revives even a permanent failure (the user may have fixed the file).
    job, created = queue.enqueue(sha(1), None, "p", "h", retry_failed=True)
    assert not created and job.id == bad.id and job.state == PENDING and job.error is None


def test_an_errors_class_decides_whether_it_is_permanent() -> None:
    from lorad.errors import NotRegularFileError, OutputWriteError, ReduceError
    from lorad.library.db.session import DatabaseUnavailable

    # A full disk while writing the output is a ReduceError too, yet it passes: retried.
    assert not is_permanent(error_text(OutputWriteError("out.safetensors: No space left on device")))
    assert not is_permanent(error_text(DatabaseUnavailable("database is locked")))
    # Subclasses of the permanent kinds are permanent though their names are not listed.
    assert is_permanent(error_text(NotRegularFileError("x.safetensors: a FIFO (named pipe)")))
    assert is_permanent(error_text(ReduceError("budget unreachable")))
    assert is_permanent("PolicyMissing: policy 'gone' is no longer in the config")


def test_release_gives_the_job_back_without_spending_an_attempt(queue: Queue) -> None:
    job, _ = queue.enqueue(sha(1), None, "p", "h")
    queue.claim("w")
    released = queue.release(job.id, "w")
    assert (released.state, released.attempts, released.worker) == (PENDING, 0, None)
    assert queue.release(job.id, "w") is None  # not ours any more


def test_done_jobs_stay_done(queue: Queue) -> None:
    job, _ = queue.enqueue(sha(1), None, "p", "h")
    queue.claim("w")
    queue.complete(job.id, "w", None)
    again, created = queue.enqueue(sha(1), None, "p", "h", retry_failed=True)
    assert not created and again.state == DONE
    assert queue.claim("w") is None


def test_jobs_survive_a_restart(url: str) -> None:
    db = Database(url)
    Queue(db).enqueue(sha(9), None, "p", "h")
    db.close()
    reopened = Database(url)
    try:
        job = Queue(reopened).claim("after-restart")
        assert job is not None and job.blob_sha256 == sha(9)
    finally:
        reopened.close()


WORKER_TIMEOUT_S = 30


def run_competing_workers(open_queues: dict[str, Callable[[], AbstractContextManager[Queue]]]) -> dict[int, str]:
    """One thread per named worker, each on its own queue (`open_queues[name]()`, entered in the
    thread), claiming and completing jobs until none is due. Returns {job id: the worker that
    completed it}; each completion is recorded once, so a job completed twice fails here.

    The workers compete for real, by construction rather than by luck: they start together (a
    barrier), and each holds its first claimed job until every worker has claimed one, so no worker
    can drain the queue before the others begin (hence at least one due job per worker is needed).
    While it holds a job, each worker checks that the database names it as the job's running worker.
    Any exception in a thread, a gate that never opens, or a thread still running after the timeout
    fails the test."""
    names = list(open_queues)
    start = threading.Barrier(len(names))
    gate = threading.Condition()
    first_claims: set[str] = set()
    completed: dict[int, str] = {}
    errors: list[str] = []

    def work(name: str) -> None:
        try:
            with open_queues[name]() as q:
                start.wait(WORKER_TIMEOUT_S)
                while (job := q.claim(name)) is not None:
                    held = q.get(job.id)
                    assert (held.state, held.worker) == (RUNNING, name), f"{name} claimed {job.id}: db says {held}"
                    with gate:
                        first_claims.add(name)
                        gate.notify_all()
                        if not gate.wait_for(lambda: len(first_claims) == len(names), WORKER_TIMEOUT_S):
                            raise AssertionError(f"{name} holds job {job.id}, but after {WORKER_TIMEOUT_S}s "
                                                 f"only {sorted(first_claims)} of {names} ever claimed a job")
                    done = q.complete(job.id, name, None)
                    assert done.state == DONE, done
                    with gate:
                        assert job.id not in completed, f"job {job.id} completed by {completed[job.id]} and {name}"
                        completed[job.id] = name
        except BaseException:  # reported by the test's own thread, which alone can fail the test
            errors.append(f"{name}: {traceback.format_exc()}")

    threads = [threading.Thread(target=work, args=(name,), name=name) for name in names]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 2 * WORKER_TIMEOUT_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert errors == [], "a worker thread raised:\n" + "\n".join(errors)
    assert not [t.name for t in threads if t.is_alive()], "worker threads still running after the timeout"
    return completed


@contextmanager
def _own_database(url: str) -> Iterator[Queue]:
    db = Database(url)
    try:
        yield Queue(db)
    finally:
        db.close()


def test_concurrent_workers_never_share_a_job(url: str) -> None:
    """Four workers, each with its own engine (as separate processes would be), 60 jobs: every job
    is claimed and completed once, by the worker the database names, and every worker takes part."""
    setup = Database(url)
    ids = [Queue(setup).enqueue(sha(n), None, "p", "h")[0].id for n in range(60)]
    setup.close()
    names = [f"w{i}" for i in range(4)]
    completed = run_competing_workers({name: partial(_own_database, url) for name in names})
    assert sorted(completed) == ids
    assert set(completed.values()) == set(names)  # all four really claimed jobs
    check = Database(url)
    try:
        q = Queue(check)
        assert q.counts() == {PENDING: 0, RUNNING: 0, DONE: 60, FAILED: 0}
        # Claimed once each (no job was lost and re-claimed), and released by its completer.
        assert {(j.id, j.state, j.attempts, j.worker) for j in q.jobs()} == {(i, DONE, 1, None) for i in ids}
    finally:
        check.close()


def test_backoff_grows_and_is_capped() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert backoff(50) == 600.0
