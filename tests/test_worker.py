"""Workers on the real engine, library, store and SQLite queue, with tiny real LoRA files. Each job
runs in a real reduction process (lorad.daemon._reduce_child), which these tests find and read in /proc."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorad.daemon.config import Config, GpuBusy, Policy, parse_config
from lorad.daemon.queue import DONE, FAILED, PENDING, RUNNING, Queue
from lorad.daemon.decision import Decision, decide
from lorad.daemon.gpu import GPU_STATE_ENV, GpuProbe, busy_reason
from lorad.daemon.worker import MODULE_DELAY_ENV, Gate, Runner, Worker
from lorad.library.library import Library
from tests._daemon_fixtures import make_lora, wait_for
from tests._proc import environ_of, io_class_of, reduction_children, stat_nice

POLICIES = """\
policies:
  default: {method: rank, param: 2, min_saving: 0.2, min_fro_retained: 0.9}
  stingy: {method: rank, param: 2, min_saving: 0.95, min_fro_retained: 0.9}
  manual: {method: rank, param: 2, min_saving: 0.2, min_fro_retained: 0.9, activate: manual}
  capped: {method: fro, param: 0.9, max_rank: 32}
  capped_floor: {method: fro, param: 0.9, max_rank: 32, min_fro_retained: 0.9}
cpu_threads: 1
nice: 7
io_idle: true
"""
FAKE_OOM_ENV = "LORAD_TEST_FAKE_OOM"  # the engine's hook (lorad.engine._job), read in the child only


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Rig:
    """A library, a queue and a runner in tmp_path, as the daemon wires them."""

    def __init__(self, tmp: Path, lease: float = 30.0, idle_exit: float = 30.0) -> None:
        self.folder = tmp / "loras"
        self.folder.mkdir()
        self.config: Config = parse_config(POLICIES + f"state_dir: {tmp / 'state'}\nlease_seconds: {lease}\n"
                                           f"idle_exit: {idle_exit}\n")  # fmt: skip
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

    def worker(self, runner=None, lease: float | None = None, gpu: GpuProbe | None = None) -> Worker:  # type: ignore[no-untyped-def]
        w = Worker(f"w{len(self.workers)}", self.queue, runner or self.runner, self.gate,
                   lease or self.queue.lease.total_seconds(), idle_seconds=0.1, gpu=gpu)  # fmt: skip
        self.workers.append(w)
        w.start()
        return w

    def wait_state(self, job_id: int, state: str, timeout: float = 300) -> None:
        # Generous: each job starts a process that imports torch at niceness 7, which a loaded
        # machine can starve for minutes. Only a failing test waits this long.
        wait_for(lambda: self.queue.get(job_id).state == state, timeout, what=f"job {job_id} to be {state}")

    def decisions(self, lora_path: Path) -> list[dict]:
        return [e.detail for e in self.library.events(lora_path) if e.kind == "decided"]

    def close(self) -> None:
        for w in self.workers:
            w.stop(5)
        self.runner.close()
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
        # No floor unless the policy sets one: the method's own choice stands.
        (policy(min_saving=0.2), 500, 0.41, True, "keeps 0.4100"),
        (policy(min_saving=0.2), 500, None, True, "saves 50.0%"),
    ],
)
def test_decide(pol: Policy, bytes_out: int, fro: float | None, activate: bool, why: str) -> None:
    d = decide(pol, 1000, bytes_out, fro)
    assert isinstance(d, Decision) and d.activate is activate and why in d.reason
    assert d.saving == pytest.approx(1 - bytes_out / 1000)


def test_the_default_policy_has_no_floor_of_its_own() -> None:
    assert Policy(name="p", method="fro", param=0.9, max_rank=32).min_fro_retained is None
    assert parse_config("policies:\n  p: {method: fro, param: 0.9, max_rank: 32}\n").policies["p"].min_fro_retained is None


@pytest.mark.parametrize(
    ("pol", "bytes_out", "fro", "setting", "would_pass", "text"),
    [
        (policy(min_saving=0.2, min_fro_retained=0.9), 500, 0.87349, "min_fro_retained", 0.8734,
         "set by policies.p.min_fro_retained); min_fro_retained 0.8734 or lower would have passed"),
        (policy(min_saving=0.6), 500, 0.95, "min_saving", 0.5,
         "set by policies.p.min_saving); min_saving 50.0% or lower would have passed"),
        (policy(min_saving=0.2), 1000, 1.0, "min_saving", None, "no min_saving passes a variant that is not smaller"),
    ],
)  # fmt: skip
def test_a_refusal_names_the_setting_and_the_value_that_would_have_passed(
    pol: Policy, bytes_out: int, fro: float, setting: str, would_pass: float | None, text: str
) -> None:
    d = decide(pol, 1000, bytes_out, fro)
    assert not d.activate and d.refused_by == setting and d.would_pass == would_pass and text in d.reason
    if would_pass is not None:  # the value named really passes
        relaxed = Policy(**{**pol.__dict__, setting: would_pass})
        assert decide(relaxed, 1000, bytes_out, fro).activate


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


def test_stop_abandons_a_long_job_kills_its_process_and_gives_it_back(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODULE_DELAY_ENV, "0.2")  # 40 modules: a job of 8 s at least
    path, job_id = rig.add("long.safetensors", modules=40)
    worker = rig.worker()
    wait_for(lambda: worker.running is not None and worker.running.done >= 1, 300, what="the job to start")
    [child] = reduction_children()
    worker.stop(grace=1.0)
    assert not worker.alive()
    assert not Path(f"/proc/{child}").exists()  # killed and reaped
    job = rig.queue.get(job_id)
    assert (job.state, job.attempts, job.worker) == (PENDING, 0, None)
    lora = rig.library.lora(path)
    assert [v.kind for v in lora.variants] == ["original"]  # nothing half-made was recorded
    assert list((rig.library.state_dir / "work").iterdir()) == []


def test_heartbeat_keeps_a_long_job_leased_and_reports_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 3 s lease renewed every second: a heartbeat's write may stall 2 s on a loaded machine and
    # the lease still holds. 24 modules at 0.25 s: a job of 6 s at least, twice the lease.
    monkeypatch.setenv(MODULE_DELAY_ENV, "0.25")
    rig = Rig(tmp_path, lease=3.0)
    try:
        _, job_id = rig.add("long.safetensors", modules=24)
        worker = rig.worker()
        seen_progress, beats = [], set()
        deadline = time.monotonic() + 300
        while (job := rig.queue.get(job_id)).state != DONE and time.monotonic() < deadline:
            assert rig.queue.requeue_expired() == []  # the lease never runs out while it works
            seen_progress.append(job.progress)
            if job.state == RUNNING:
                beats.add(job.heartbeat_at)
            time.sleep(0.1)
        job = rig.queue.get(job_id)
        assert job.state == DONE and job.attempts == 1
        assert any(p is not None and 0 < p < 1 for p in seen_progress)
        # The claim's stamp and three renewals a second apart at least: the job outlived its
        # first lease, so the check above would have seen it expire without them.
        assert len(beats) >= 4, beats
        assert worker.healthy()
    finally:
        rig.close()


# ---------------------------------------------------------------------------------------------
# The reduction process: polite, serving jobs back to back, gone after idle_exit


def test_one_polite_process_serves_jobs_back_to_back_and_exits_after_idle_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MODULE_DELAY_ENV, "0.05")
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    assert own_nice < 7, "run the tests at a niceness below 7 so the child's own can be seen"
    rig = Rig(tmp_path, idle_exit=3.0)
    try:
        worker = rig.worker()
        jobs = [rig.add(f"job{n}.safetensors", seed=n, modules=40) for n in range(3)]
        [child] = wait_for(reduction_children, 300, what="the reduction process")
        wait_for(lambda: worker.running is not None and worker.running.done >= 1, 300, what="progress")
        tasks = [int(t.name) for t in Path(f"/proc/{child}/task").iterdir()]
        assert {stat_nice(child, t) for t in tasks} == {7}  # every thread, torch's included
        assert environ_of(child)["OMP_NUM_THREADS"] == "1" and environ_of(child)["MKL_NUM_THREADS"] == "1"
        assert io_class_of(child) == "idle"
        assert os.getpriority(os.PRIO_PROCESS, 0) == own_nice and io_class_of(os.getpid()) != "idle"
        # A terminal's Ctrl-C or a service manager's SIGTERM to the whole group: the worker, not
        # the signal, decides whether a job finishes.
        os.kill(child, signal.SIGINT)
        os.kill(child, signal.SIGTERM)
        for path, job_id in jobs:
            rig.wait_state(job_id, DONE)
            assert rig.queue.get(job_id).attempts == 1
            assert rig.library.lora(path).active.kind == "reduced"
            assert reduction_children() == [child]  # the same process, still there between jobs
        assert rig.runner.processes.started == 1
        # Idle: it exits after idle_exit (3 s) and is reaped, not left a zombie.
        idle_from = time.monotonic()
        wait_for(lambda: not Path(f"/proc/{child}").exists(), 60, what="the idle process to exit and be reaped")
        assert time.monotonic() - idle_from > 1.0
        # A job after the exit starts a new one.
        path, job_id = rig.add("later.safetensors", seed=9, modules=40)
        [again] = wait_for(reduction_children, 300, what="a new reduction process")
        assert again != child
        rig.wait_state(job_id, DONE)
        assert rig.runner.processes.started == 2
    finally:
        rig.close()
    assert reduction_children() == []  # closing the runner lets its idle process go


def test_idle_exit_0_is_a_process_per_job(tmp_path: Path) -> None:
    rig = Rig(tmp_path, idle_exit=0)
    try:
        rig.worker()
        for n in range(2):
            _, job_id = rig.add(f"job{n}.safetensors", seed=n)
            rig.wait_state(job_id, DONE)
            wait_for(lambda: reduction_children() == [], 30, what="the process to exit after its job")
        assert rig.runner.processes.started == 2
    finally:
        rig.close()


def test_a_killed_reduction_process_fails_only_its_job_which_is_retried(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODULE_DELAY_ENV, "0.1")
    path, job_id = rig.add("victim.safetensors", modules=40)
    worker = rig.worker()
    wait_for(lambda: worker.running is not None and worker.running.done >= 1, 300, what="the job to run")
    other_path, other_id = rig.add("bystander.safetensors", seed=4, modules=4)
    [child] = reduction_children()
    os.kill(child, signal.SIGKILL)
    failed = wait_for(lambda: (j := rig.queue.get(job_id)).error and j, 60, what="the failure to be recorded")
    assert failed.state in (PENDING, "running") and failed.attempts >= 1
    assert failed.error.startswith("ChildFailed:") and "killed by SIGKILL" in failed.error
    monkeypatch.setenv(MODULE_DELAY_ENV, "0")
    rig.wait_state(job_id, DONE)  # after its backoff, a fresh process does it
    rig.wait_state(other_id, DONE)
    done, other = rig.queue.get(job_id), rig.queue.get(other_id)
    assert done.attempts == 2 and worker.alive()
    assert other.attempts == 1 and other.error is None  # the job queued behind it was not touched
    assert [v.kind for v in rig.library.lora(path).variants] == ["original", "reduced"]
    assert rig.library.lora(other_path).active.kind == "reduced"
    assert child not in reduction_children()


@pytest.mark.parametrize(("limit", "note"), [("0", "reduced on the CPU instead"), ("1", "retried in batches of")])
def test_out_of_memory_in_the_reduction_process_is_an_event_never_a_failure(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, limit: str, note: str
) -> None:
    # Set here, the fake reaches only the reduction process: the worker itself runs no engine.
    monkeypatch.setenv(FAKE_OOM_ENV, limit)
    path, job_id = rig.add("oom.safetensors", modules=3)
    rig.worker()
    rig.wait_state(job_id, DONE)
    job = rig.queue.get(job_id)
    assert job.attempts == 1 and job.error is None
    assert rig.library.lora(path).active.kind == "reduced"
    [oom] = [e for e in rig.library.events(path) if e.kind == "out_of_memory"]
    assert oom.variant_id == rig.library.lora(path).active.id and oom.detail["job"] == job_id
    assert oom.detail["notes"] and all(n.startswith("out of memory:") for n in oom.detail["notes"])
    assert any(note in n for n in oom.detail["notes"])
    [decision] = rig.decisions(path)
    assert decision["activate"] is True and decision["device"] == "cpu"


# ---------------------------------------------------------------------------------------------
# A busy GPU


@pytest.mark.parametrize(
    ("util", "free", "gpu_job", "busy"),
    [
        (95, 80000, True, "utilisation 95% > 30%"),
        (95, 80000, False, "utilisation 95% > 30%"),  # someone is generating: a CPU job waits too
        (5, 1000, True, "1000 MiB free < 2048 MiB"),
        (5, 1000, False, None),  # a CPU job needs no VRAM
        (30, 2048, True, None),
    ],
)
def test_busy_reason(util: float, free: float, gpu_job: bool, busy: str | None) -> None:
    reason = busy_reason(GpuBusy(), util, free, gpu_job)
    assert (reason is None) if busy is None else (busy in reason and reason.startswith("GPU busy"))


def test_without_nvml_the_gpu_is_never_busy_and_jobs_run(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """On this machine NVML is absent (no nvidia-ml-py, or no driver): limits any real reading
    would call busy change nothing."""
    monkeypatch.delenv(GPU_STATE_ENV, raising=False)
    probe = GpuProbe(GpuBusy(util_above=0, free_below_mb=1e12, check_every=0.1), gpu_jobs=True)
    assert probe.busy() is None and probe.available is False
    _, job_id = rig.add("n.safetensors")
    worker = rig.worker(gpu=probe)
    rig.wait_state(job_id, DONE)
    assert worker.waiting is None and rig.queue.get(job_id).attempts == 1


class CountingProbe(GpuProbe):
    """A GpuProbe that counts its looks: each is a due job claimed, judged and (while the GPU is
    busy) given back."""

    looks = 0

    def busy(self) -> str | None:
        reason = super().busy()
        self.looks += 1
        return reason


def test_a_busy_gpu_holds_jobs_back_until_it_is_free(rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "gpu-state"
    state.write_text("95 80000\n")
    monkeypatch.setenv(GPU_STATE_ENV, str(state))
    probe = CountingProbe(GpuBusy(check_every=0.1), gpu_jobs=True)
    worker = rig.worker(gpu=probe)
    _, job_id = rig.add("g.safetensors")
    wait_for(lambda: worker.waiting, 30, what="the worker to wait")
    assert worker.waiting == "GPU busy (utilisation 95% > 30%)"
    looked = probe.looks
    wait_for(lambda: probe.looks >= looked + 3, 30, what="three more looks at the busy GPU")
    assert worker.finished == 0 and worker.running is None and reduction_children() == []
    # Claimed for each look and given back untouched after it: pending between looks.
    wait_for(lambda: (j := rig.queue.get(job_id)).state == PENDING and j.attempts == 0, 30, what="the job given back")
    state.write_text("0 1000\n")  # idle, but too little VRAM left for a GPU job
    wait_for(lambda: worker.waiting and "MiB free" in worker.waiting, 30, what="the memory reason")
    state.write_text("0 80000\n")
    rig.wait_state(job_id, DONE)
    assert worker.waiting is None and rig.queue.get(job_id).attempts == 1


class CountingGate(Gate):
    """A Gate that counts the times a worker asked whether it may start a job."""

    looks = 0

    def is_open(self) -> bool:
        self.looks += 1
        return super().is_open()


def test_a_paused_gate_starts_nothing_until_resumed(rig: Rig) -> None:
    rig.gate = gate = CountingGate()
    gate.set_paused(True)
    _, job_id = rig.add("p.safetensors")
    worker = rig.worker()
    wait_for(lambda: gate.looks >= 3, 30, what="the worker to find the gate closed three times")
    job = rig.queue.get(job_id)
    assert (job.state, job.attempts) == (PENDING, 0) and worker.finished == 0 and worker.running is None
    rig.gate.set_paused(False)
    rig.wait_state(job_id, DONE)


# ---------------------------------------------------------------------------------------------
# Timers: the window closes the gate; interval timers fire on a real APScheduler


def test_schedule_plans_only_the_timers_asked_for() -> None:
    from datetime import time as clock

    from lorad.daemon.config import Schedule, Window
    from lorad.daemon.scheduler import planned_jobs

    assert [j[0] for j in planned_jobs(Schedule(reconcile_every=60, gc_every=None, retry_every=30))] == ["reconcile", "retry"]
    night = Schedule(reconcile_every=None, gc_every=None, retry_every=None, window=Window(clock(1, 0), clock(6, 0)))
    assert [j[0] for j in planned_jobs(night)] == ["window-open", "window-close"]


def test_a_window_that_excludes_now_holds_jobs_back(rig: Rig) -> None:
    from datetime import datetime, timedelta

    from lorad.daemon import scheduler
    from lorad.daemon.config import Schedule, Window

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


# ---------------------------------------------------------------------------------------------
# The quality floor: the whole file's energy-weighted ratio, and none unless the policy sets one


def spectrum_lora(path: Path, modules: list[tuple[float, int]], rank: int = 64, dim: int = 128) -> Path:
    """A kohya LoRA (alpha = rank, so scale 1) whose module i has `true_rank` equal singular values
    of size `size`: a flat spectrum of 64 keeps sqrt(32/64) = 0.707 of its norm at rank 32."""
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for i, (size, true_rank) in enumerate(modules):
        qb, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen))
        qa, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen))
        s = torch.zeros(rank)
        s[:true_rank] = size
        name = f"lora_unet_mid_block_attentions_0_proj_{i}"
        tensors[f"{name}.lora_up.weight"] = (qb * s).contiguous()
        tensors[f"{name}.lora_down.weight"] = qa.T.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank)})
    return path


def add_file(rig: Rig, path: Path, policy: str) -> int:
    view = rig.library.ingest(path, policy=policy)
    p = rig.config.policies[policy]
    job, _ = rig.queue.enqueue(view.original.blob_sha256, view.id, p.name, p.hash)
    rig.gate.poke()
    return job.id


def test_fro_with_a_rank_cap_and_no_floor_is_activated(rig: Rig) -> None:
    """fro 0.9 capped at rank 32 keeps 0.707 of flat rank-64 modules: the user's cap, not a fault."""
    path = spectrum_lora(rig.folder / "flat.safetensors", [(1.0, 64)] * 3)
    job_id = add_file(rig, path, "capped")
    rig.worker()
    rig.wait_state(job_id, DONE)
    [decision] = rig.decisions(path)
    assert decision["activate"] is True and decision["fro_retained_file"] == pytest.approx(0.5**0.5, abs=1e-3)
    assert rig.library.lora(path).active.kind == "reduced"


def test_the_floor_weighs_each_module_by_its_energy(rig: Rig) -> None:
    """One strong module kept whole and three weak flat ones kept at 0.707: the mean (0.78) is under
    0.9, the file keeps 0.976 of its norm, and a floor of 0.9 reads the file."""
    path = spectrum_lora(rig.folder / "mixed.safetensors", [(30.0, 2), (1.0, 64), (1.0, 64), (1.0, 64)])
    job_id = add_file(rig, path, "capped_floor")
    rig.worker()
    rig.wait_state(job_id, DONE)
    [decision] = rig.decisions(path)
    active = rig.library.lora(path).active
    assert active.kind == "reduced" and active.fro_retained_mean < 0.9
    expected = ((2 * 900 + 3 * 32) / (2 * 900 + 3 * 64)) ** 0.5
    assert decision["activate"] is True and decision["fro_retained_file"] == pytest.approx(expected, abs=1e-3)


def test_a_floor_the_variant_misses_is_named_with_the_value_that_passes(rig: Rig) -> None:
    path = spectrum_lora(rig.folder / "weak.safetensors", [(1.0, 64)] * 2)
    job_id = add_file(rig, path, "capped_floor")
    rig.worker()
    rig.wait_state(job_id, DONE)
    [decision] = rig.decisions(path)
    assert decision["activate"] is False and decision["refused_by"] == "min_fro_retained"
    assert decision["would_pass"] == pytest.approx(0.7071, abs=1e-4) and decision["would_pass"] <= decision["fro_retained_file"]
    assert "(set by policies.capped_floor.min_fro_retained)" in decision["reason"]
    assert f"min_fro_retained {decision['would_pass']:.4f} or lower would have passed" in decision["reason"]
    assert rig.library.lora(path).active.kind == "original"
