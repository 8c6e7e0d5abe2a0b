"""Workers on the real engine, library, store and SQLite queue, with tiny real LoRA files."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorad.config import Config, Policy, parse_config
from lorad.library import Library
from lorad.queue import DONE, FAILED, PENDING, Queue
from lorad.worker import Decision, Gate, Runner, Worker, decide
from tests._daemon_fixtures import make_lora, wait_for

POLICIES = """\
policies:
  default: {method: rank, param: 2, min_saving: 0.2, min_fro_retained: 0.9}
  stingy: {method: rank, param: 2, min_saving: 0.95, min_fro_retained: 0.9}
  manual: {method: rank, param: 2, min_saving: 0.2, min_fro_retained: 0.9, activate: manual}
"""


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Rig:
    """A library, a queue and a runner in tmp_path, as the daemon wires them."""

    def __init__(self, tmp: Path, lease: float = 30.0) -> None:
        self.folder = tmp / "loras"
        self.folder.mkdir()
        self.config: Config = parse_config(POLICIES + f"state_dir: {tmp / 'state'}\nlease_seconds: {lease}\n")
        self.library = Library(tmp / "state", [self.folder])
        self.queue = Queue(self.library.db, lease_seconds=lease, max_attempts=3)
        self.written: list[Path] = []
        self.runner = Runner(self.library, self.config, tmp / "state" / "work", "cpu", on_written=self.written.append)
        self.gate = Gate()
        self.workers: list[Worker] = []

    def add(self, name: str, policy: str = "default", **lora: int) -> tuple[Path, int]:
        path = make_lora(self.folder / name, **lora)
        view = self.library.ingest(path, policy=policy)
        p = self.config.policies[policy]
        job, _ = self.queue.enqueue(view.original.blob_sha256, view.id, p.name, p.hash)
        self.gate.poke()
        return path, job.id

    def worker(self, runner=None, lease: float | None = None) -> Worker:  # type: ignore[no-untyped-def]
        w = Worker(f"w{len(self.workers)}", self.queue, runner or self.runner, self.gate,
                   lease or self.queue.lease.total_seconds(), idle_seconds=0.1)  # fmt: skip
        self.workers.append(w)
        w.start()
        return w

    def wait_state(self, job_id: int, state: str, timeout: float = 60) -> None:
        wait_for(lambda: self.queue.get(job_id).state == state, timeout, what=f"job {job_id} to be {state}")

    def decisions(self, lora_path: Path) -> list[dict]:
        return [e.detail for e in self.library.events(lora_path) if e.kind == "decided"]

    def close(self) -> None:
        for w in self.workers:
            w.stop(5)
        self.library.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


# ---------------------------------------------------------------------------------------------
# The policy's decision


def policy(**kw: object) -> Policy:
    return Policy(name="p", method="rank", param=2, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pol", "bytes_out", "fro", "activate", "why"),
    [
        (policy(min_saving=0.2, min_fro_retained=0.9), 500, 0.95, True, "saves 50.0%"),
        (policy(min_saving=0.6, min_fro_retained=0.9), 500, 0.95, False, "less than min_saving 60.0%"),
        (policy(min_saving=0.2, min_fro_retained=0.99), 500, 0.95, False, "less than min_fro_retained 0.99"),
        (policy(min_saving=0.2, min_fro_retained=0.9), 500, None, False, "less than min_fro_retained"),
        (policy(min_saving=0.2, min_fro_retained=0.9, activate="manual"), 500, 0.95, False, "activates manually"),
        (policy(min_saving=0.0, min_fro_retained=0.0), 1200, 1.0, False, "saves -20.0%"),
    ],
)
def test_decide(pol: Policy, bytes_out: int, fro: float | None, activate: bool, why: str) -> None:
    d = decide(pol, 1000, bytes_out, fro)
    assert isinstance(d, Decision) and d.activate is activate and why in d.reason
    assert d.saving == pytest.approx(1 - bytes_out / 1000)


# ---------------------------------------------------------------------------------------------
# Jobs on the real engine


def test_a_job_reduces_stores_and_activates(rig: Rig) -> None:
    path, job_id = rig.add("a.safetensors")
    original_sha = sha_of(path)
    rig.worker()
    rig.wait_state(job_id, DONE)
    lora = rig.library.lora(path)
    assert lora.active.kind == "reduced" and lora.active.method == "rank" and lora.active.param == 2
    assert lora.original.blob_sha256 == original_sha
    assert sha_of(path) == lora.active.blob_sha256  # the watched file is the variant now
    assert rig.queue.get(job_id).variant_id == lora.active.id
    assert rig.written == [path]
    [decision] = rig.decisions(path)
    assert decision["activate"] is True and decision["policy"] == "default"
    assert list((rig.library.state_dir / "work").iterdir()) == []


@pytest.mark.parametrize(("name", "why"), [("stingy", "min_saving"), ("manual", "activates manually")])
def test_a_variant_that_fails_the_policy_is_stored_not_activated(rig: Rig, name: str, why: str) -> None:
    path, job_id = rig.add("b.safetensors", policy=name)
    before = sha_of(path)
    rig.worker()
    rig.wait_state(job_id, DONE)
    lora = rig.library.lora(path)
    assert [v.kind for v in lora.variants] == ["original", "reduced"]
    assert lora.active.kind == "original" and sha_of(path) == before
    [decision] = rig.decisions(path)
    assert decision["activate"] is False and why in decision["reason"]


def test_a_failing_job_is_recorded_and_the_worker_carries_on(rig: Rig) -> None:
    not_a_lora = rig.folder / "weights.safetensors"
    save_file({"model.weight": torch.randn(4, 4)}, str(not_a_lora))
    view = rig.library.ingest(not_a_lora)
    p = rig.config.policies["default"]
    bad = rig.queue.enqueue(view.original.blob_sha256, view.id, p.name, p.hash)[0].id
    good_path, good = rig.add("good.safetensors", seed=4)
    worker = rig.worker()
    rig.wait_state(bad, FAILED)
    rig.wait_state(good, DONE)
    failed = rig.queue.get(bad)
    assert failed.attempts == 1 and failed.error.split(":")[0] in ("ReduceError", "FormatError")
    assert rig.library.lora(good_path).active.kind == "reduced"
    assert worker.alive()


def slowed(runner: Runner, pause: float):  # type: ignore[no-untyped-def]
    """The real runner, its progress ticks slowed down, so a job lasts long enough to interrupt."""

    def run(job, progress):  # type: ignore[no-untyped-def]
        def slow(done: int, total: int) -> None:
            time.sleep(pause)
            progress(done, total)

        return runner(job, slow)

    return run


def test_stop_abandons_a_long_job_and_gives_it_back(rig: Rig) -> None:
    path, job_id = rig.add("long.safetensors", modules=40)
    worker = rig.worker(slowed(rig.runner, 0.2))
    wait_for(lambda: worker.running is not None and worker.running.done >= 1, 30, what="the job to start")
    worker.stop(grace=0.3)
    assert not worker.alive()
    job = rig.queue.get(job_id)
    assert (job.state, job.attempts, job.worker) == (PENDING, 0, None)
    lora = rig.library.lora(path)
    assert [v.kind for v in lora.variants] == ["original"]  # nothing half-made was recorded
    assert list((rig.library.state_dir / "work").iterdir()) == []


def test_heartbeat_keeps_a_long_job_leased_and_reports_progress(tmp_path: Path) -> None:
    rig = Rig(tmp_path, lease=1.0)
    try:
        _, job_id = rig.add("long.safetensors", modules=12)
        worker = rig.worker(slowed(rig.runner, 0.25))
        seen_progress = []
        deadline = time.monotonic() + 60
        while rig.queue.get(job_id).state != DONE and time.monotonic() < deadline:
            assert rig.queue.requeue_expired() == []  # the lease never runs out while it works
            seen_progress.append(rig.queue.get(job_id).progress)
            time.sleep(0.1)
        job = rig.queue.get(job_id)
        assert job.state == DONE and job.attempts == 1
        assert any(p is not None and 0 < p < 1 for p in seen_progress)
        assert worker.healthy()
    finally:
        rig.close()


def test_a_paused_gate_starts_nothing_until_resumed(rig: Rig) -> None:
    rig.gate.set_paused(True)
    _, job_id = rig.add("p.safetensors")
    rig.worker()
    time.sleep(0.5)
    assert rig.queue.get(job_id).state == PENDING
    rig.gate.set_paused(False)
    rig.wait_state(job_id, DONE)


# ---------------------------------------------------------------------------------------------
# Timers: the window closes the gate; interval timers fire on a real APScheduler


def test_schedule_plans_only_the_timers_asked_for() -> None:
    from datetime import time as clock

    from lorad.config import Schedule, Window
    from lorad.scheduler import planned_jobs

    assert [j[0] for j in planned_jobs(Schedule(reconcile_every=60, gc_every=None, retry_every=30))] == ["reconcile", "retry"]
    night = Schedule(reconcile_every=None, gc_every=None, retry_every=None, window=Window(clock(1, 0), clock(6, 0)))
    assert [j[0] for j in planned_jobs(night)] == ["window-open", "window-close"]


def test_a_window_that_excludes_now_holds_jobs_back(rig: Rig) -> None:
    from datetime import datetime, timedelta

    from lorad import scheduler
    from lorad.config import Schedule, Window

    later = datetime.now() + timedelta(hours=3)
    window = Window((later).time().replace(second=0, microsecond=0), (later + timedelta(hours=1)).time().replace(second=0, microsecond=0))
    fired: list[str] = []
    actions = scheduler.Actions(reconcile=lambda: fired.append("reconcile"), gc=lambda: None, retry=lambda: None,
                                set_window=rig.gate.set_window)  # fmt: skip
    timers = scheduler.start(Schedule(reconcile_every=0.2, gc_every=None, retry_every=None, window=window), actions)
    try:
        assert rig.gate.in_window is False
        _, job_id = rig.add("w.safetensors")
        rig.worker()
        wait_for(lambda: len(fired) >= 2, 10, what="the reconcile timer to fire twice")
        assert rig.queue.get(job_id).state == PENDING  # outside the window: nothing started
        timers.get_job("window-open").func()  # the opening timer's own action, run now
        assert rig.gate.in_window is True
        rig.wait_state(job_id, DONE)
    finally:
        timers.shutdown(wait=False)
