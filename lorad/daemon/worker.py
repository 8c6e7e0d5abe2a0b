"""Workers: claim a job, reduce the stored original in a reduction process, record the variant,
let the policy decide whether it becomes the file at the watched path.

The engine runs in a child process (lorad.daemon.reduction) that serves jobs back to back and
exits after `idle_exit` seconds without one, so the daemon, which never imports torch, holds no
GPU memory while idle. The child lowers its own priority (niceness, idle I/O class) and bounds
torch's threads before it starts.

A failing job is recorded on its row and never stops its worker. Errors that may pass (a full disk,
a killed or crashed child) are retried with backoff and never fail a job for good; errors in the
input are permanent. While a job runs, a heartbeat renews its lease and the child's progress is
recorded; on shutdown a job either finishes within the grace period or is abandoned (its child
killed) and given back to the queue, so no half-made variant is ever recorded. Before a job
starts, a busy GPU (someone generating) makes the worker wait.

A database that cannot be reached (lorad.library.db.session.DatabaseLost) fails nothing: a worker
claims nothing and tries again with backoff (woken at once when the database answers again); a
running job goes on, and if its outcome cannot be recorded it is neither activated nor marked
done: it is given back when the database lets it, else its lease lapses and the job is redone.
Drain (Gate.draining) is pause's stronger sibling: the running jobs finish, no job is claimed.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorad._atomic import remove_tree, temp_name
from lorad.daemon._reduce_child import MODULE_DELAY_ENV
from lorad.daemon.config import Config, Policy
from lorad.daemon.decision import Decision, decide
from lorad.daemon.gpu import GpuProbe
from lorad.daemon.queue import JobView, LeaseLost, Queue, error_text
from lorad.daemon.reduction import ProcessPool
from lorad.errors import (
    FormatError,
    LoradError,
    ReduceError,
    StoreError,
    TransientError,
)
from lorad.library import effects
from lorad.library.db import repo
from lorad.library.db.session import DatabaseLost, DatabaseUnavailable
from lorad.log import get_logger

log = get_logger("lorad.worker")

__all__ = ["MODULE_DELAY_ENV", "Gate", "Runner", "Worker"]


class PolicyMissing(LoradError):
    """The job names a policy (or a LoRA) that no longer exists: it cannot run as recorded."""


class JobAbandoned(Exception):
    """Raised from the progress callback when the daemon stops before the job could finish."""


PERMANENT = (FormatError, ReduceError, PolicyMissing)
OOM_NOTE = "out of memory:"
CLAIM_BACKOFF_CAP = 10.0  # seconds between claims while the database does not answer, at most


def quality_spec(policy: Policy, device: str) -> dict[str, Any] | None:
    """What the reduction process needs to measure the new variant under the policy's quality_check
    (None: no gate). `auto` is the job's own device, so gpu_busy, checked before the job, covers it."""
    gate = policy.quality_check
    if gate is None:
        return None
    return {"base": str(gate.base), "config": None if gate.config is None else str(gate.config),
            "device": device if gate.device == "auto" else gate.device}  # fmt: skip


def settings_for(policy: Policy, device: str) -> dict[str, Any]:
    """The engine's ReduceSettings as plain data for the reduction process."""
    return {"method": policy.method, "param": policy.param, "max_rank": policy.max_rank,
            "budget_mb": policy.budget_mb, "device": device, "kohya_compat": policy.kohya_compat,
            "rank_multiple": policy.rank_multiple, "uniform": policy.uniform, "serve": policy.serve}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Running one job


_JOB_FOLDER = re.compile(r"\.?job-\d+-[0-9a-f]{12}-(in|out)(\.lorad-tmp)?")


class Runner:
    """Does one job: reduction process -> library.add_variant -> decision -> library.activate.

    An adapter folder's job names its original tree: the child copies the tree's files out of the
    store into a folder in the work area and reduces that into an output folder there, which the
    library stores as a new tree."""

    def __init__(self, library, config: Config, work_dir: Path, device: str,  # type: ignore[no-untyped-def]
                 on_written: Callable[[Path], None] = lambda _p: None) -> None:  # fmt: skip
        self.library = library
        self.config = config
        self.work_dir = work_dir
        self.device = device
        self._on_written = on_written
        self.processes = ProcessPool(config.cpu_threads, config.nice, config.io_idle, config.idle_exit)
        work_dir.mkdir(parents=True, exist_ok=True)
        # Folders a killed run was working in (an adapter folder's job-N-<sha>-in/-out); nothing
        # refers to them. Only those names: anything else here is not lorad's to remove.
        for leftover in work_dir.iterdir():
            if _JOB_FOLDER.fullmatch(leftover.name) and leftover.is_dir() and not leftover.is_symlink():
                remove_tree(leftover)

    def spec(self, policy: Policy, src: Path, dst: Path, tree: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"src": str(src), "dst": str(dst), "settings": settings_for(policy, self.device), "tree": tree,
                "effect": quality_spec(policy, self.device)}  # fmt: skip

    def close(self) -> None:
        """Let the idle reduction processes exit (a running job's is the worker's to stop)."""
        self.processes.close()

    def __call__(self, job: JobView, progress: Callable[[int, int], None]) -> int:
        policy = self.config.policies.get(job.policy)
        if policy is None:
            raise PolicyMissing(f"policy {job.policy!r} is no longer in the config")
        if job.lora_id is None:
            raise PolicyMissing("the LoRA this job was for is no longer recorded")
        entries = self.library.tree_entries(job.blob_sha256)
        name = f"job-{job.id}-{job.blob_sha256[:12]}"
        tree = None
        if entries is None:
            src, dst = self.library.store.path_of(job.blob_sha256), self.work_dir / f"{name}.safetensors"
        else:
            src, dst = self.work_dir / f"{name}-in", self.work_dir / f"{name}-out"
            store = self.library.store
            tree = {"entries": [[name, sha, mode, str(store.path_of(sha))] for name, sha, mode in entries]}
            for leftover in (src, dst, temp_name(dst)):
                remove_tree(leftover)  # an earlier attempt's, killed
        process = self.processes.take()
        try:
            try:
                reduced = process.run(self.spec(policy, src, dst, tree), progress)
            finally:
                self.processes.give_back(process, process.reusable)
            report = reduced.report
            variant = self.library.add_variant(job.lora_id, report, actor="worker", source=job.blob_sha256)
        finally:
            for made in (dst, temp_name(dst), *([src] if tree is not None else [])):
                remove_tree(made)  # what the child made (or was writing when killed)
        effect, effect_error = self._record_effect(policy, variant.id, reduced)
        decision = decide(policy, report.input.bytes, report.output.bytes, report.fro_retained_file,
                          effect, effect_error)  # fmt: skip
        decision = self._apply(job, policy, variant.id, decision)
        self._record(job, policy, variant.id, decision, report)
        log.info("job done", job=job.id, variant=variant.id, policy=policy.name, device=report.device,
                 **decision.to_json())  # fmt: skip
        return variant.id

    def _record_effect(self, policy: Policy, variant_id: int, reduced: Any) -> tuple[float | None, str | None]:
        """The quality check's figures recorded with the variant (as `lorad effect` records them,
        against the variant it was made from): (effect_retained, None), or (None, why not). A figure
        that cannot be recorded is no figure: the decision then refuses the variant."""
        if policy.quality_check is None:
            return None, None
        if reduced.effect is None:
            return None, reduced.effect_error or "the reduction process sent no measurement"
        try:
            figures = effects.parse(reduced.effect)
            self.library.record_effect(variant_id, figures, actor=f"policy:{policy.name}")
        except DatabaseUnavailable:
            raise  # no decision without the database: the job is given back, or redone
        except (LoradError, OSError) as e:
            log.warning("the quality check's figures were not recorded", variant=variant_id, error=str(e))
            return None, f"its figures could not be recorded: {e}"
        return figures.effect_retained, None

    def _apply(self, job: JobView, policy: Policy, variant_id: int, decision: Decision) -> Decision:
        if not decision.activate:
            return decision
        if self.library.original_sha256(job.lora_id) != job.blob_sha256:
            return Decision(False, "the file's original changed since this job was queued; not activated",
                            decision.saving, decision.fro_retained, effect_retained=decision.effect_retained)  # fmt: skip
        try:
            lora = self.library.activate(job.lora_id, variant_id, actor=f"policy:{policy.name}")
        except DatabaseUnavailable:
            raise  # not a refusal of the variant: the job is given back, or redone
        except StoreError as e:
            return Decision(False, f"not activated: {e}", decision.saving, decision.fro_retained,
                            effect_retained=decision.effect_retained)  # fmt: skip
        self._on_written(lora.path)
        return decision

    def _record(self, job: JobView, policy: Policy, variant_id: int, decision: Decision, report: Any) -> None:
        oom = [n for n in report.notes if n.startswith(OOM_NOTE)]
        with self.library.db.write() as s:
            if oom:
                # Not a failure: the engine halved its batches or finished on the CPU. Recorded so
                # a user can see why a job took longer or ran where they did not expect.
                repo.record_event(s, "out_of_memory", "worker", job.lora_id, variant_id, job=job.id,
                                  device=report.device, notes=oom)  # fmt: skip
            repo.record_event(s, "decided", f"policy:{policy.name}", job.lora_id, variant_id,
                              job=job.id, policy=policy.name, device=report.device, **decision.to_json())  # fmt: skip
        if oom:
            log.warning("out of memory during a reduction; it went on in smaller batches or on the CPU",
                        job=job.id, device=report.device, notes=oom)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The gate: pause/resume and the time window


class Gate:
    """Whether workers may start jobs, and a wake-up for them when new work arrives."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.paused = False
        self.draining = False  # `lorad drain`: as paused, and this node gives up its folders
        self.in_window = True
        self._generation = 0

    def is_open(self) -> bool:
        return not self.paused and not self.draining and self.in_window

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.poke()

    def set_draining(self, draining: bool) -> None:
        self.draining = draining
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
                 gate: Gate, lease_seconds: float, idle_seconds: float = 1.0,
                 gpu: GpuProbe | None = None,
                 on_finished: Callable[[str, float], None] | None = None) -> None:  # fmt: skip
        self.name = name
        # Told (the job's state after it, seconds it ran) once a job's outcome is recorded (metrics).
        self.on_finished = on_finished
        self.queue = queue
        self.runner = runner
        self.gate = gate
        self.lease_seconds = lease_seconds
        self.idle_seconds = idle_seconds
        self.gpu = gpu
        self.running: Running | None = None
        self.waiting: str | None = None  # why a due job is not started (e.g. "GPU busy (...)")
        self.finished = 0  # jobs this worker completed, failed or gave back
        self._stopping = threading.Event()
        self._abandon = threading.Event()
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
        failures = 0  # claims in a row that the database refused
        while not self._stopping.is_set():
            seen = self.gate.generation()
            if not self.gate.is_open():
                self.waiting = None
                self.gate.wait(seen, self.idle_seconds)
                continue
            try:
                job = self.queue.claim(self.name)
            except Exception as e:  # noqa: BLE001 - a busy or broken database must not end the worker
                failures += 1
                if not isinstance(e, DatabaseLost):  # (an unreachable one is said once, by its health)
                    log.exception("claiming a job failed", worker=self.name)
                # Backoff; a poke (the database answers again, new work) ends the wait early.
                self.gate.wait(seen, min(CLAIM_BACKOFF_CAP, self.idle_seconds * 2 ** min(failures - 1, 6)))
                continue
            failures = 0
            if job is None:
                self.waiting = None
                self.gate.wait(seen, self.idle_seconds)
                continue
            if not self.gate.is_open():  # paused or drained while claiming: not started, not counted
                self._give_back(job, "the gate closed while it was claimed")
                continue
            if self._wait_for_gpu(job):
                continue
            self._run(job)

    def _give_back(self, job: JobView, why: str) -> None:
        try:
            self.queue.release(job.id, self.name)
        except Exception as e:  # noqa: BLE001 - its lease runs out and it is requeued anyway
            log.warning("could not give a job back; its lease runs out", job=job.id, why=why, error=str(e))

    def _wait_for_gpu(self, job: JobView) -> bool:
        """True (the job given back, the worker resting) while the GPU is busy."""
        busy = self.gpu.busy() if self.gpu is not None else None
        if busy is None:
            if self.waiting:
                log.info("the GPU is free again; starting", job=job.id)
            self.waiting = None
            return False
        try:
            self.queue.release(job.id, self.name)  # untouched: the attempt does not count
        except Exception:  # noqa: BLE001 - its lease runs out and it is requeued anyway
            log.exception("giving back a job while the GPU is busy failed", job=job.id)
        if self.waiting is None:  # once per busy spell: the figures in the reason change every look
            log.info("waiting: GPU busy", reason=busy, job=job.id)
        self.waiting = busy
        assert self.gpu is not None
        self._stopping.wait(self.gpu.limits.check_every)
        return True

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
            if self._abandon.is_set():
                raise JobAbandoned

        try:
            return "done", self.runner(job, progress)
        except JobAbandoned:
            return "abandoned", None
        except DatabaseLost as e:  # its outcome cannot be recorded: not activated, not done
            return "lost", e
        except TransientError as e:  # before PERMANENT: OutputWriteError is a ReduceError too
            return "transient", e
        except PERMANENT as e:
            return "permanent", e
        except Exception as e:  # noqa: BLE001 - recorded on the job; the worker carries on
            return "transient", e

    def _settle(self, job: JobView, outcome: tuple[str, object]) -> None:
        kind, value = outcome
        try:
            if kind == "done":
                self.queue.complete(job.id, self.name, value)  # type: ignore[arg-type]
                self._finished("done")
            elif kind == "abandoned":
                self.queue.release(job.id, self.name)
                log.info("job given back", job=job.id)
            elif kind == "lost":
                # The database answers again already: given back untouched, redone at once.
                self.queue.release(job.id, self.name)
                log.warning("job given back: the database could not be reached to record it", job=job.id,
                            error=str(value))  # fmt: skip
            else:
                assert isinstance(value, BaseException)
                after = self.queue.fail(job.id, self.name, error_text(value), permanent=kind == "permanent")
                self._finished(after.state)
                unexpected = kind == "transient" and not isinstance(value, TransientError)
                log.error("job failed", job=job.id, error=error_text(value), state=after.state, kind=kind,
                          attempts=after.attempts, not_before=str(after.not_before),
                          exc_info=value if unexpected else None)  # fmt: skip
        except LeaseLost as e:
            log.warning("job outcome not recorded: lease lost", job=job.id, outcome=kind, error=str(e))
        except DatabaseUnavailable as e:
            # Nothing of it recorded: its lease lapses and the job is redone (here or elsewhere).
            log.warning("job outcome not recorded: the database did not answer; the job is redone once "
                        "its lease lapses", job=job.id, outcome=kind, error=str(e))  # fmt: skip
        except Exception:  # noqa: BLE001
            log.exception("recording the job's outcome failed", job=job.id, outcome=kind)

    def _finished(self, state: str) -> None:
        running = self.running
        if self.on_finished is not None and running is not None:
            try:
                self.on_finished(state, time.monotonic() - running.started)
            except Exception:  # noqa: BLE001 - counting must never fail a job
                log.exception("on_finished hook failed", job=running.job.id)

    def _heartbeat(self, running: Running, stop: threading.Event) -> None:
        every = max(0.2, self.lease_seconds / 3)
        while not stop.wait(every):
            try:
                self.queue.heartbeat(running.job.id, self.name, running.fraction)
                running.last_beat = time.monotonic()
            except LeaseLost:
                log.warning("lease lost while running", job=running.job.id)
                return
            except DatabaseLost:
                # Said once by the database's health; the job goes on (its outcome may not be
                # recordable), and the worker is alive: the watchdog must not restart the node.
                running.last_beat = time.monotonic()
            except Exception:  # noqa: BLE001 - try again at the next beat
                log.exception("heartbeat failed", job=running.job.id)
