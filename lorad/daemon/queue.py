"""The durable reduction queue, on the `jobs` table: enqueue, claim, lease, heartbeat, retry.

Life cycle (states are data, see TRANSITIONS):
  pending --claim--> running --complete--> done
                        |--fail (attempts left)--> pending, not_before = now + backoff
                        |--fail (none left, or permanent)--> failed
                        |--release (shutdown)--> pending, the attempt not counted
                        '--lease expired (daemon killed)--> pending
  failed --retry (transient only) / explicit enqueue--> pending

A job is unique per (kind, blob sha256, policy hash): the same original under the same policy is
reduced once, however often it is seen. Claims run under BEGIN IMMEDIATE (SQLite) or
SELECT ... FOR UPDATE SKIP LOCKED (PostgreSQL), so two workers never hold one job. Outputs are
content-addressed, so re-running a job whose lease expired is harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError

from lorad import errors
from lorad.library.db.models import Job, utcnow
from lorad.library.db.session import Database

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
STATES = (PENDING, RUNNING, DONE, FAILED)
TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({RUNNING}),
    RUNNING: frozenset({DONE, PENDING, FAILED}),
    DONE: frozenset(),
    FAILED: frozenset({PENDING}),
}
# Errors that come out the same however often the job runs: not retried by the timer. lorad's own
# error classes are judged by their place in lorad.errors (a FormatError subclass is permanent, a
# TransientError never is, even one that is also a ReduceError, like a full disk's
# OutputWriteError); these names cover the rest.
PERMANENT_ERRORS = ("FormatError", "ReduceError", "PolicyMissing")
_KNOWN_ERRORS = {c.__name__: c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)}
BACKOFF_BASE = 5.0
BACKOFF_CAP = 600.0


def backoff(attempts: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Seconds before attempt `attempts + 1`: 5, 10, 20, ... capped."""
    return min(cap, base * 2 ** max(0, attempts - 1))


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def is_permanent(error: str | None) -> bool:
    """Whether a job's recorded error (`error_text`) will recur however often the job runs."""
    if not error:
        return False
    name = error.split(":", 1)[0]
    known = _KNOWN_ERRORS.get(name)
    if known is not None:
        return issubclass(known, (errors.FormatError, errors.ReduceError)) and not issubclass(known, errors.TransientError)
    return name in PERMANENT_ERRORS


@dataclass(frozen=True)
class JobView:
    id: int
    kind: str
    blob_sha256: str
    lora_id: int | None
    policy: str
    policy_hash: str
    state: str
    attempts: int
    max_attempts: int
    not_before: datetime | None
    lease_until: datetime | None
    heartbeat_at: datetime | None
    worker: str | None
    progress: float | None
    error: str | None
    variant_id: int | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, job: Job) -> JobView:
        return cls(**{f: getattr(job, f) for f in cls.__dataclass_fields__})

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {f: getattr(self, f) for f in self.__dataclass_fields__}
        for key, value in doc.items():
            if isinstance(value, datetime):
                doc[key] = value.isoformat()
        return doc


class LeaseLost(Exception):
    """The job is no longer this worker's (its lease expired and it was requeued)."""


class Queue:
    def __init__(
        self,
        db: Database,
        lease_seconds: float = 60.0,
        max_attempts: int = 3,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self._now = clock

    # adding ------------------------------------------------------------------------------

    def enqueue(
        self, blob_sha256: str, lora_id: int | None, policy: str, policy_hash: str, kind: str = "reduce",
        retry_failed: bool = False,
    ) -> tuple[JobView, bool]:
        """The job for this original and policy, created when new; `retry_failed` revives a failed
        one (an explicit request). Returns (job, created)."""
        args = (blob_sha256, lora_id, policy, policy_hash, kind, retry_failed)
        try:
            return self._find_or_add(*args)
        except IntegrityError:
            # Another worker added this job between our look-up and our insert: possible under
            # PostgreSQL's READ COMMITTED (SQLite's BEGIN IMMEDIATE rules it out). It exists now.
            return self._find_or_add(*args)

    def enqueue_missing(self, wanted: Iterable[tuple[str, int | None, str, str]], kind: str = "reduce") -> int:
        """Add, in one transaction, the jobs among `wanted` (blob sha256, LoRA id, policy, policy
        hash) that do not exist yet; how many were added. Existing ones are left as they are, as
        `enqueue` leaves them (a failed job stays failed)."""
        wanted = list(wanted)
        if not wanted:
            return 0
        try:
            return self._add_missing(wanted, kind)
        except IntegrityError:  # another node added one of them meanwhile (PostgreSQL): look again
            return self._add_missing(wanted, kind)

    def _add_missing(self, wanted: list[tuple[str, int | None, str, str]], kind: str) -> int:
        with self.db.write() as s:
            have = set(s.execute(select(Job.blob_sha256, Job.policy_hash).where(Job.kind == kind)).tuples())
            new: dict[tuple[str, str], Job] = {}
            for sha, lora_id, policy, policy_hash in wanted:
                if (sha, policy_hash) not in have and (sha, policy_hash) not in new:
                    new[sha, policy_hash] = Job(kind=kind, blob_sha256=sha, lora_id=lora_id, policy=policy,
                                                policy_hash=policy_hash, state=PENDING, attempts=0,
                                                max_attempts=self.max_attempts)  # fmt: skip
            s.add_all(new.values())
        return len(new)

    def _find_or_add(
        self, blob_sha256: str, lora_id: int | None, policy: str, policy_hash: str, kind: str,
        retry_failed: bool,
    ) -> tuple[JobView, bool]:
        with self.db.write() as s:
            job = s.scalars(
                select(Job).where(Job.kind == kind, Job.blob_sha256 == blob_sha256, Job.policy_hash == policy_hash)
            ).first()
            if job is not None:
                if retry_failed and job.state == FAILED:
                    _move(job, PENDING)
                    job.attempts, job.not_before, job.error = 0, None, None
                if lora_id is not None and job.lora_id is None:
                    job.lora_id = lora_id
                s.flush()
                return JobView.of(job), False
            job = Job(kind=kind, blob_sha256=blob_sha256, lora_id=lora_id, policy=policy,
                      policy_hash=policy_hash, state=PENDING, attempts=0,
                      max_attempts=self.max_attempts)  # fmt: skip
            s.add(job)
            s.flush()
            return JobView.of(job), True

    # the worker's side -------------------------------------------------------------------

    def claim(self, worker: str) -> JobView | None:
        """Take the oldest pending job that is due, leasing it to `worker`."""
        now = self._now()
        with self.db.write() as s:
            job = s.scalars(
                select(Job)
                .where(Job.state == PENDING, or_(Job.not_before.is_(None), Job.not_before <= now))
                .order_by(Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if job is None:
                return None
            _move(job, RUNNING)
            job.attempts += 1
            job.worker, job.progress, job.heartbeat_at = worker, 0.0, now
            job.lease_until = now + self.lease
            s.flush()
            return JobView.of(job)

    def heartbeat(self, job_id: int, worker: str, progress: float | None = None) -> None:
        """Renew the lease (and record progress); LeaseLost when the job is no longer ours."""
        now = self._now()
        with self.db.write() as s:
            job = _owned(s, job_id, worker)
            job.heartbeat_at, job.lease_until = now, now + self.lease
            if progress is not None:
                job.progress = progress

    def complete(self, job_id: int, worker: str, variant_id: int | None) -> JobView:
        with self.db.write() as s:
            job = _owned(s, job_id, worker)
            _move(job, DONE)
            job.variant_id, job.progress, job.error = variant_id, 1.0, None
            job.lease_until = job.worker = None
            s.flush()
            return JobView.of(job)

    def fail(self, job_id: int, worker: str, error: str, permanent: bool = False) -> JobView:
        """Record a failure: back to pending after a backoff while attempts remain, else failed."""
        now = self._now()
        with self.db.write() as s:
            job = _owned(s, job_id, worker)
            job.error, job.lease_until, job.worker = error, None, None
            if permanent or job.attempts >= job.max_attempts:
                _move(job, FAILED)
            else:
                _move(job, PENDING)
                job.not_before = now + timedelta(seconds=backoff(job.attempts))
            s.flush()
            return JobView.of(job)

    def release(self, job_id: int, worker: str) -> JobView | None:
        """Give a job back untouched (shutdown): pending again, this attempt not counted."""
        with self.db.write() as s:
            try:
                job = _owned(s, job_id, worker)
            except LeaseLost:
                return None
            _move(job, PENDING)
            job.attempts = max(0, job.attempts - 1)
            job.lease_until = job.worker = None
            job.progress = None
            s.flush()
            return JobView.of(job)

    # maintenance -------------------------------------------------------------------------

    def requeue_expired(self) -> list[int]:
        """Running jobs whose lease ran out (their worker died): pending again."""
        now = self._now()
        with self.db.write() as s:
            # Row locks (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises) keep a job that
            # completes at this very moment from being flipped back to pending.
            expired = select(Job).where(Job.state == RUNNING, Job.lease_until < now).with_for_update()
            jobs = s.scalars(expired).all()
            for job in jobs:
                _move(job, PENDING)
                job.lease_until = job.worker = None
                job.error = f"lease expired at {now.isoformat()} (worker gone); requeued"
            return [j.id for j in jobs]

    def retry_failed(self) -> list[int]:
        """Failed jobs whose error may not recur: pending again with a fresh count of attempts."""
        with self.db.write() as s:
            jobs = [j for j in s.scalars(select(Job).where(Job.state == FAILED)).all() if not is_permanent(j.error)]
            for job in jobs:
                _move(job, PENDING)
                job.attempts, job.not_before = 0, None
            return [j.id for j in jobs]

    # reading -----------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self.db.read() as s:
            rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        found = {state: 0 for state in STATES}
        found.update({state: n for state, n in rows})
        return found

    def jobs(self, state: str | None = None, lora_id: int | None = None, limit: int | None = None) -> list[JobView]:
        query = select(Job).order_by(Job.id)
        if state is not None:
            query = query.where(Job.state == state)
        if lora_id is not None:
            query = query.where(Job.lora_id == lora_id)
        if limit is not None:
            query = query.limit(limit)
        with self.db.read() as s:
            return [JobView.of(j) for j in s.scalars(query).all()]

    def get(self, job_id: int) -> JobView | None:
        with self.db.read() as s:
            job = s.get(Job, job_id)
            return JobView.of(job) if job else None

    def next_due(self) -> datetime | None:
        """When the earliest backed-off pending job becomes due (None: nothing waits)."""
        with self.db.read() as s:
            return s.scalars(select(func.min(Job.not_before)).where(Job.state == PENDING)).first()


def _move(job: Job, to: str) -> None:
    if to not in TRANSITIONS[job.state]:
        raise ValueError(f"job {job.id}: {job.state} -> {to} is not a transition")
    job.state = to


def _owned(s, job_id: int, worker: str) -> Job:  # type: ignore[no-untyped-def]
    job = s.get(Job, job_id, with_for_update=True)  # held until the caller's write commits
    if job is None or job.state != RUNNING or job.worker != worker:
        raise LeaseLost(f"job {job_id} is no longer held by {worker}")
    return job
