"""Workers: claim a job, reduce the stored original with the engine, record the variant, let the
policy decide whether it becomes the file at the watched path.

A failing job is recorded on its row (and retried with backoff when the error may pass); nothing
a job does stops its worker. While a job runs, a heartbeat renews its lease and records progress;
on shutdown a job either finishes within the grace period or is abandoned at the next progress
tick and given back to the queue, so no half-made variant is ever recorded.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorad.config import Config, Policy
from lorad.db import repo
from lorad.errors import FormatError, LoradError, ReduceError, StoreError
from lorad.log import get_logger
from lorad.queue import JobView, LeaseLost, Queue, error_text

log = get_logger("lorad.worker")


class PolicyMissing(LoradError):
    """The job names a policy (or a LoRA) that no longer exists: it cannot run as recorded."""


class JobAbandoned(Exception):
    """Raised from the progress callback when the daemon stops before the job could finish."""


PERMANENT = (FormatError, ReduceError, PolicyMissing)
# Test hook (like store.py's crash points): seconds to pause after each module, so end-to-end tests
# can act on a job that is surely still running. Unset in any real deployment.
MODULE_DELAY_ENV = "LORAD_TEST_MODULE_DELAY"


# ---------------------------------------------------------------------------------------------
# The policy's decision: pure


@dataclass(frozen=True)
class Decision:
    activate: bool
    reason: str
    saving: float  # fraction of the original's bytes saved
    fro_retained: float | None

    def to_json(self) -> dict[str, object]:
        return {"activate": self.activate, "reason": self.reason, "saving": round(self.saving, 6),
                "fro_retained": self.fro_retained}  # fmt: skip


def decide(policy: Policy, bytes_in: int, bytes_out: int, fro_retained: float | None) -> Decision:
    """Whether a variant should be activated under `policy`, and why (or why not)."""
    saving = 1.0 - bytes_out / bytes_in if bytes_in > 0 else 0.0
    fro_text = "n/a" if fro_retained is None else f"{fro_retained:.4f}"
    if saving < policy.min_saving:
        reason = f"saves {saving:.1%}, less than min_saving {policy.min_saving:.1%}"
        return Decision(False, reason, saving, fro_retained)
    if fro_retained is None or fro_retained < policy.min_fro_retained:
        reason = f"keeps {fro_text} of the Frobenius norm, less than min_fro_retained {policy.min_fro_retained}"
        return Decision(False, reason, saving, fro_retained)
    if policy.activate == "manual":
        return Decision(False, f"passes (saves {saving:.1%}, keeps {fro_text}) but policy {policy.name} activates manually", saving, fro_retained)
    return Decision(True, f"saves {saving:.1%}, keeps {fro_text} of the Frobenius norm", saving, fro_retained)


def settings_for(policy: Policy, device: str):  # type: ignore[no-untyped-def]
    from lorad.engine import ReduceSettings

    return ReduceSettings(method=policy.method, param=policy.param, max_rank=policy.max_rank,
                          budget_mb=policy.budget_mb, device=device, kohya_compat=policy.kohya_compat)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Running one job


class Runner:
    """Does one job: engine -> library.add_variant -> decision -> library.activate."""

    def __init__(self, library, config: Config, work_dir: Path, device: str,  # type: ignore[no-untyped-def]
                 on_written: Callable[[Path], None] = lambda _p: None) -> None:  # fmt: skip
        self.library = library
        self.config = config
        self.work_dir = work_dir
        self.device = device
        self._on_written = on_written
        work_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, job: JobView, progress: Callable[[int, int], None]) -> int:
        from lorad.engine import reduce_file

        policy = self.config.policies.get(job.policy)
        if policy is None:
            raise PolicyMissing(f"policy {job.policy!r} is no longer in the config")
        if job.lora_id is None:
            raise PolicyMissing("the LoRA this job was for is no longer recorded")
        src = self.library.store.path_of(job.blob_sha256)
        dst = self.work_dir / f"job-{job.id}-{job.blob_sha256[:12]}.safetensors"
        try:
            report = reduce_file(src, dst, settings_for(policy, self.device), progress=progress)
            variant = self.library.add_variant(job.lora_id, report, actor="worker")
        finally:
            dst.unlink(missing_ok=True)
        decision = decide(policy, report.input.bytes, report.output.bytes, report.fro_retained_mean)
        decision = self._apply(job, policy, variant.id, decision)
        self._record(job, policy, variant.id, decision)
        log.info("job done", job=job.id, variant=variant.id, policy=policy.name, **decision.to_json())
        return variant.id

    def _apply(self, job: JobView, policy: Policy, variant_id: int, decision: Decision) -> Decision:
        if not decision.activate:
            return decision
        lora = self.library.lora(job.lora_id)
        original = lora.original
        if original is None or original.blob_sha256 != job.blob_sha256:
            return Decision(False, "the file's original changed since this job was queued; not activated",
                            decision.saving, decision.fro_retained)  # fmt: skip
        try:
            self.library.activate(job.lora_id, variant_id, actor=f"policy:{policy.name}")
        except StoreError as e:
            return Decision(False, f"not activated: {e}", decision.saving, decision.fro_retained)
        self._on_written(lora.path)
        return decision

    def _record(self, job: JobView, policy: Policy, variant_id: int, decision: Decision) -> None:
        with self.library.db.write() as s:
            repo.record_event(s, "decided", f"policy:{policy.name}", job.lora_id, variant_id,
                              job=job.id, policy=policy.name, **decision.to_json())  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The gate: pause/resume and the time window


class Gate:
    """Whether workers may start jobs, and a wake-up for them when new work arrives."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.paused = False
        self.in_window = True
        self._generation = 0

    def is_open(self) -> bool:
        return not self.paused and self.in_window

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.poke()

    def set_window(self, inside: bool) -> None:
        self.in_window = inside
        self.poke()

    def poke(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def generation(self) -> int:
        return self._generation

    def wait(self, seen: int, timeout: float) -> None:
        """Sleep until poked after generation `seen`, or `timeout`."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation != seen, timeout)


# ---------------------------------------------------------------------------------------------
# The worker thread


@dataclass
class Running:
    job: JobView
    started: float  # monotonic
    done: int = 0
    total: int = 0
    last_beat: float = 0.0  # monotonic time of the last renewed lease

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


class Worker:
    def __init__(self, name: str, queue: Queue, runner: Callable[[JobView, Callable[[int, int], None]], int],
                 gate: Gate, lease_seconds: float, idle_seconds: float = 1.0) -> None:  # fmt: skip
        self.name = name
        self.queue = queue
        self.runner = runner
        self.gate = gate
        self.lease_seconds = lease_seconds
        self.idle_seconds = idle_seconds
        self.running: Running | None = None
        self.finished = 0  # jobs this worker completed, failed or gave back
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._module_delay = float(os.environ.get(MODULE_DELAY_ENV) or 0)
        self._thread = threading.Thread(target=self._loop, name=f"lorad-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def healthy(self) -> bool:
        """Alive, and if running a job, its lease renewed recently (the systemd watchdog's test)."""
        if not self.alive():
            return False
        running = self.running
        return running is None or time.monotonic() - running.last_beat < self.lease_seconds

    def stop(self, grace: float) -> None:
        """Start no new job; let the running one finish for `grace` seconds, then abandon it."""
        self._stopping.set()
        self.gate.poke()
        self._thread.join(grace)
        if self._thread.is_alive():
            log.warning("abandoning the running job", worker=self.name,
                        job=self.running.job.id if self.running else None)  # fmt: skip
            self._abandon.set()
            self._thread.join(grace)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            seen = self.gate.generation()
            if not self.gate.is_open():
                self.gate.wait(seen, self.idle_seconds)
                continue
            try:
                job = self.queue.claim(self.name)
            except Exception:  # noqa: BLE001 - a busy or broken database must not end the worker
                log.exception("claiming a job failed", worker=self.name)
                self._stopping.wait(self.idle_seconds)
                continue
            if job is None:
                self.gate.wait(seen, self.idle_seconds)
                continue
            self._run(job)

    def _run(self, job: JobView) -> None:
        running = Running(job, time.monotonic(), last_beat=time.monotonic())
        self.running = running
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(running, beat_stop), name=f"lorad-{self.name}-beat", daemon=True)
        beat.start()
        log.info("job started", job=job.id, worker=self.name, policy=job.policy, attempt=job.attempts)
        try:
            self._settle(job, self._attempt(job, running))
        finally:
            beat_stop.set()
            beat.join(5)
            self.running = None
            self.finished += 1

    def _attempt(self, job: JobView, running: Running) -> tuple[str, object]:
        def progress(done: int, total: int) -> None:
            running.done, running.total = done, total
            if self._module_delay:
                self._abandon.wait(self._module_delay)
            if self._abandon.is_set():
                raise JobAbandoned

        try:
            return "done", self.runner(job, progress)
        except JobAbandoned:
            return "abandoned", None
        except PERMANENT as e:
            return "permanent", e
        except Exception as e:  # noqa: BLE001 - recorded on the job; the worker carries on
            return "transient", e

    def _settle(self, job: JobView, outcome: tuple[str, object]) -> None:
        kind, value = outcome
        try:
            if kind == "done":
                self.queue.complete(job.id, self.name, value)  # type: ignore[arg-type]
            elif kind == "abandoned":
                self.queue.release(job.id, self.name)
                log.info("job given back", job=job.id)
            else:
                assert isinstance(value, BaseException)
                after = self.queue.fail(job.id, self.name, error_text(value), permanent=kind == "permanent")
                log.error("job failed", job=job.id, error=error_text(value), state=after.state,
                          attempts=after.attempts, exc_info=kind == "transient")  # fmt: skip
        except LeaseLost as e:
            log.warning("job outcome not recorded: lease lost", job=job.id, outcome=kind, error=str(e))
        except Exception:  # noqa: BLE001
            log.exception("recording the job's outcome failed", job=job.id, outcome=kind)

    def _heartbeat(self, running: Running, stop: threading.Event) -> None:
        every = max(0.2, self.lease_seconds / 3)
        while not stop.wait(every):
            try:
                self.queue.heartbeat(running.job.id, self.name, running.fraction)
                running.last_beat = time.monotonic()
            except LeaseLost:
                log.warning("lease lost while running", job=running.job.id)
                return
            except Exception:  # noqa: BLE001 - try again at the next beat
                log.exception("heartbeat failed", job=running.job.id)
