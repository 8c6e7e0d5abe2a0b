"""The composition root: config -> library (migrated) -> control socket -> watcher, workers,
timers -> READY=1; then a supervisor loop (watchdog, status, expired leases) until SIGTERM.

A database lost mid-run stops nothing here: each part waits and tries again (workers, the fleet's
heartbeat, the watcher's taking-in, the supervisor and the timers), the log says so once and once
again when it answers (lorad.library.db.session.Health), and `lorad status` answers with what the
node knows. `drain` (lorad drain) finishes the running jobs, claims none and gives the folders up.

Start-up order matters: migrations run and the socket listens before systemd hears READY=1; the
socket is claimed before anything else starts, so a second daemon on the same socket or state
directory refuses at once and touches nothing.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from lorad.daemon import notify
from lorad.daemon import scheduler as timers
from lorad.daemon.config import Config, Policy, WatchDir
from lorad.daemon.control import methods
from lorad.daemon.control.protocol import Code, ControlError
from lorad.daemon.control.server import Authorizer, ControlServer, claim_socket_path, group_id
from lorad.daemon.fleet import Fleet
from lorad.daemon.metrics import Metrics
from lorad.daemon.queue import JobView, Queue
from lorad.daemon.reduction import probe_device
from lorad.daemon.watch import Signature, Watcher, signature
from lorad.daemon.gpu import gpu_probe
from lorad.daemon.worker import Gate, Runner, Worker
from lorad.errors import LoradError
from lorad.library.db.session import DatabaseUnavailable
from lorad.log import get_logger
from lorad.pathtext import shown
from lorad.state_dir import Modes, secure_dir

log = get_logger("lorad.daemon")

STOP_GRACE = 30.0  # seconds a running job may take to finish after SIGTERM before it is abandoned
SUPERVISE_EVERY = 0.5
STATUS_EVERY = 5.0
GC_GRACE_SECONDS = 3600.0


class KnownFiles:
    """Signatures of watched files as lorad last left them, so its own writes cause no work."""

    def __init__(self) -> None:
        self._sigs: dict[Path, Signature] = {}
        self._lock = threading.Lock()

    def remember(self, path: Path, sig: Signature | None = None) -> None:
        sig = sig or signature(path)
        with self._lock:
            if sig is None:
                self._sigs.pop(path, None)
            else:
                self._sigs[path] = sig

    def is_known(self, path: Path, sig: Signature) -> bool:
        with self._lock:
            return self._sigs.get(path) == sig


def resolve_device(requested: str) -> str:
    # Asked of a short-lived process: the daemon itself never loads torch (nor a CUDA context).
    return probe_device(requested)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = replace(config, watch=tuple(_resolved(w) for w in config.watch))
        self.started = time.monotonic()
        self.stop_event = threading.Event()
        self.known = KnownFiles()
        self.gate = Gate()
        self.device = "unknown"
        self.workers: list[Worker] = []
        self.runner: Runner | None = None
        self.library: Any = None
        self.queue: Queue
        self.watcher: Watcher
        self.fleet: Fleet | None = None  # this node's folder leases and heartbeat (lorad.daemon.fleet)
        self.server: ControlServer | None = None
        self.metrics: Metrics | None = None  # the Prometheus endpoint (metrics_listen)
        self._scheduler: Any = None
        self._lock_file: int | None = None
        self._last_ping = 0.0
        self._last_status = ("", 0.0)
        self._last_requeue = 0.0
        self._counts: dict[str, int] | None = None  # the queue's counts as last read (status_line)

    # the life cycle ----------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        try:
            self.start()
            notify.ready(self.status_line())
            log.info("ready", socket=str(self.config.socket), device=self.device, workers=len(self.workers))
            self.supervise()
            return 0
        finally:
            self.shutdown()

    def start(self) -> None:
        cfg = self.config
        secure_dir(cfg.state_dir, Modes(group_id(cfg.operator_group)))  # private before anything lands in it
        self._lock_state_dir()
        claim_socket_path(cfg.socket)  # refuse early when another daemon listens there
        if cfg.metrics_listen is not None:  # refuses at once when prometheus_client is missing
            self.metrics = Metrics(self, cfg.metrics_listen)
        notify.status("migrating the database")
        from lorad.library.library import Library  # heavy imports (torch) after the cheap checks

        mirrors = {w.path: w.mirror_to for w in cfg.watch if w.mirror_to is not None}
        self.library = Library(cfg.state_dir, [w.path for w in cfg.watch], cfg.database,
                               operator_gid=group_id(cfg.operator_group), mirrors=mirrors,
                               busy_timeout_ms=round(cfg.database_busy_timeout * 1000),
                               store_dir=cfg.store_root, check_store_identity=True, node=cfg.node)  # fmt: skip
        self.queue = Queue(self.library.db, cfg.lease_seconds, cfg.max_attempts)
        requeued = self.queue.requeue_expired()
        if requeued:
            log.info("requeued jobs whose lease expired", jobs=requeued)
        self.device = resolve_device(cfg.device)
        self.watcher = Watcher(cfg.watch, cfg.settle_seconds, cfg.poll_seconds, self.on_settled,
                               ignore=self.known.is_known, stored=self.library.holds_folder, for_path=cfg.watch_for,
                               on_refused=self.library.record_refusal, on_scanned=self.library.prune_refusals,
                               on_gone=lambda path: self.library.gone(path, actor="watcher"), gated=True)  # fmt: skip
        # Each watched folder is watched by the node holding its lease (on SQLite, this one).
        self.fleet = Fleet(self.library.db, cfg.node, [w.path for w in cfg.watch], cfg.lease_seconds, self.device,
                           running_jobs=lambda: sum(w.running is not None for w in self.workers), on_lead=self.watcher.lead,
                           on_lose=self.watcher.unlead)  # fmt: skip
        self.workers = self._make_workers()
        # The database answers again: workers claim at once, files that could not be taken in now.
        self.library.db.health.on_back(self.gate.poke)
        self.library.db.health.on_back(self.watcher.retry_now)
        self.server = ControlServer(cfg.socket, methods.build(self), Authorizer(os.getuid(), group_id(cfg.operator_group)),
                                    group=group_id(cfg.operator_group))  # fmt: skip
        self.server.start()
        if self.metrics is not None:
            self.metrics.start()  # a port in use stops the start here, before any work is taken
        self._pass_by_unchanged()
        self.fleet.beat()  # the folders this node holds are scanned at the watcher's start
        self.watcher.start()
        self.fleet.start()
        # Outside the reduction window no job may start, not even before the timers run.
        self.gate.set_window(timers.in_window(cfg.schedule, datetime.now()))
        for w in self.workers:
            w.start()
        self._scheduler = timers.start(cfg.schedule, timers.Actions(
            reconcile=lambda: self.watcher.request_reconcile("schedule"),
            gc=lambda: self.collect(dry_run=False, actor="gc:schedule"),
            retry=self.retry,
            set_window=self.gate.set_window,
        ))  # fmt: skip

    def _make_workers(self) -> list[Worker]:
        work_dir = self.config.state_dir / "work"
        _clear_dir(work_dir)  # partial outputs of a killed run; nothing refers to them
        runner = self.runner = Runner(self.library, self.config, work_dir, self.device, on_written=self.known.remember)
        count = 1 if self.device.startswith("cuda") else self.config.workers
        if count != self.config.workers:
            log.info("one worker owns the GPU", configured=self.config.workers)
        host = self.config.node
        gpu = gpu_probe(self.config, self.device)
        finished = self.metrics.job_finished if self.metrics is not None else None
        return [Worker(f"{host}:{os.getpid()}:w{i}", self.queue, runner, self.gate, self.config.lease_seconds, gpu=gpu,
                       on_finished=finished) for i in range(count)]  # fmt: skip

    def supervise(self) -> None:
        while not self.stop_event.wait(SUPERVISE_EVERY):
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the supervisor must outlive any one check
                log.exception("supervisor tick failed")

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_requeue >= max(1.0, self.config.lease_seconds / 2):
            self._last_requeue = now
            try:
                if self.queue.requeue_expired():
                    self.gate.poke()
            except DatabaseUnavailable:
                pass  # said once by the database's health; tried again next time
        interval = notify.watchdog_interval()
        if interval and now - self._last_ping >= interval and self.healthy():
            notify.watchdog()
            self._last_ping = now
        line = self.status_line()
        if line != self._last_status[0] or now - self._last_status[1] >= 60:
            if line != self._last_status[0]:
                notify.status(line)
            self._last_status = (line, now)

    def healthy(self) -> bool:
        """Gates WATCHDOG=1: false lets systemd restart us. A control socket that stopped answering
        counts, since nothing else would notice (the control check, a round trip, comes last)."""
        workers_ok = all(w.healthy() for w in self.workers) and self.watcher.alive()
        return workers_ok and self.server is not None and self.server.healthy()

    def shutdown(self) -> None:
        notify.stopping("stopping: finishing or giving back the running job")
        log.info("stopping")
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self.fleet is not None:
            self.fleet.stop()
        if getattr(self, "watcher", None) is not None:
            self.watcher.stop()
        if self.fleet is not None:
            self.fleet.release()  # after the watching stopped: another node takes the folders at once
        for w in self.workers:
            if w.alive():  # a start that failed part-way (metrics_listen's port in use) made some unstarted
                w.stop(STOP_GRACE)
        if self.runner is not None:
            self.runner.close()
        if self.server is not None:
            self.server.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self.library is not None:
            self.library.close()
        if self._lock_file is not None:
            os.close(self._lock_file)
        log.info("stopped")

    def _install_signals(self) -> None:
        def stop(signum: int, _frame: object) -> None:
            log.info("signal received", signal=signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda *_: self.watcher.request_reconcile("SIGHUP") if getattr(self, "watcher", None) else None)

    def _lock_state_dir(self) -> None:
        fd = os.open(self.config.state_dir / "lorad.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LoradError(f"another lorad daemon is using {self.config.state_dir}") from None
        self._lock_file = fd

    # work coming in ----------------------------------------------------------------------

    def on_settled(self, path: Path, watch: WatchDir, sig: Signature) -> None:
        """A watched file settled: store it as an original (if new) and queue its reduction."""
        log.info("file settled", path=shown(path), size=sig.size)
        policy = self.config.policies[watch.policy]
        view = self.library.ingest(path, policy=watch.policy, actor="watcher")
        self.enqueue_original(view, policy)
        # Known (passed by at scans) only once its job is sure: an enqueue that failed (the
        # database lost) is tried again, and a rescan after a lost lease takes the file again.
        self.known.remember(path, sig)

    def _pass_by_unchanged(self) -> None:
        """The LoRA files whose recorded (device, inode, size, mtime) still holds are known as
        lorad left them: the scan at start passes them by unread, and their jobs are made sure of
        in one transaction (a policy changed while lorad was down, or a kill between ingest and
        enqueue). Taking each in again cost a restart of 10,000 files minutes."""
        unchanged = self.library.unchanged_files()
        wanted = []
        for f in unchanged:
            self.known.remember(f.path, Signature(f.stat.st_size, f.stat.st_mtime_ns, f.stat.st_ino))
            watch = self.config.watch_for(f.path)
            if watch is not None and f.original_sha256 is not None:
                policy = self.config.policies[watch.policy]
                wanted.append((f.original_sha256, f.lora_id, policy.name, policy.hash))
        queued = self.queue.enqueue_missing(wanted)
        log.info("files unchanged since lorad last saw them", files=len(unchanged), jobs_queued=queued)

    def ingest(self, path: Path, policy: str, actor: str, sig: Signature | None = None) -> Any:
        sig = sig or signature(path)
        view = self.library.ingest(path, policy=policy, actor=actor)
        self.known.remember(path, sig)
        return view

    def enqueue_original(self, view: Any, policy: Policy, explicit: bool = False) -> tuple[JobView, bool]:
        original = view.original
        if original is None:
            raise ControlError(Code.CONFLICT, f"{view.path} has no stored original yet")
        job, created = self.queue.enqueue(original.blob_sha256, view.id, policy.name, policy.hash, retry_failed=explicit)
        if created or job.state == "pending":
            self.gate.poke()
        if created:
            log.info("job queued", job=job.id, path=shown(view.path), policy=policy.name)
        return job, created

    def drain(self) -> dict[str, Any]:
        """Finish the running jobs, claim no more, give up this node's folders (another node takes
        them at its next renewal) and say `draining` in the fleet; the socket still answers.
        `resume` ends it."""
        already = self.gate.draining
        self.gate.set_draining(True)
        given_up = self.fleet.set_draining(True) if self.fleet is not None else []
        if not already:
            log.info("draining: finishing the running jobs, claiming none, folders given up",
                     running=len(self.running_jobs()), folders=[str(f) for f in given_up])  # fmt: skip
        return {"draining": True, "folders_given_up": [str(f) for f in given_up], "running": self.running_jobs()}

    def resume(self) -> dict[str, Any]:
        """End a pause and a drain: jobs start again, and the folders come back at the next
        renewal (those another node took meanwhile stay with it while its lease lives)."""
        drained = self.gate.draining
        self.gate.set_paused(False)
        self.gate.set_draining(False)
        if drained:
            if self.fleet is not None:
                self.fleet.set_draining(False)
            log.info("drain ended")
        return {"paused": False, "draining": False}

    def retry(self) -> list[int]:
        """Expired leases and failed jobs whose error may pass (a full disk...): pending again."""
        revived = self.queue.requeue_expired() + self.queue.retry_failed()
        if revived:
            log.info("jobs retried", jobs=revived)
            self.gate.poke()
        return revived

    def leading(self) -> dict[Path, bool]:
        """The watched folders and whether this node watches each now (it holds the folder's
        lease: lorad.daemon.fleet; the metrics' leader gauge)."""
        if getattr(self, "watcher", None) is None:
            return {w.path: False for w in self.config.watch}
        return self.watcher.leading()

    def waiting(self) -> str | None:
        """Why due jobs are not starting (e.g. a busy GPU), or None."""
        return next((w.waiting for w in self.workers if w.waiting), None)

    # operations the control methods use --------------------------------------------------

    def watched(self, text: str | os.PathLike[str]) -> Path:
        """An absolute, resolved path inside a watched folder (a path in a mirror: the watched file
        it mirrors), else an `outside_watch` error."""
        path = Path(self.library.unmirrored(Path(os.path.abspath(os.path.expanduser(text))).resolve()))
        if self.config.watch_for(path) is None:
            roots = ", ".join(str(w.path) for w in self.config.watch) or "none"
            raise ControlError(Code.OUTSIDE_WATCH, f"{text} is not inside a watched folder ({roots})")
        return path

    def put(self, operation: Callable[[], Any]) -> Any:
        """Run a revert/switch and remember the file it wrote, so the watcher leaves it be."""
        view = operation()
        self.known.remember(view.path)
        return view

    def collect(self, dry_run: bool, actor: str) -> Any:
        """gc keeping each LoRA's newest reduced variants as its policy says (the most generous
        count for a LoRA whose policy left the config)."""
        by_policy = {name: p.keep_variants for name, p in self.config.policies.items()}
        return self.library.gc(dry_run=dry_run, keep_variants=max(by_policy.values(), default=2),
                               grace=timedelta(seconds=GC_GRACE_SECONDS), actor=actor, keep_by_policy=by_policy)  # fmt: skip

    def running_jobs(self) -> list[dict[str, Any]]:
        found = []
        for w in self.workers:
            running = w.running
            if running is None:
                continue
            found.append({
                "job": running.job.id,
                "lora_id": running.job.lora_id,
                "path": self._path_of(running.job.lora_id),
                "policy": running.job.policy,
                "progress": round(running.fraction, 4),
                "modules_done": running.done,
                "modules_total": running.total,
                "seconds": round(time.monotonic() - running.started, 1),
                "worker": w.name,
            })  # fmt: skip
        return found

    def _path_of(self, lora_id: int | None) -> str | None:
        if lora_id is None:
            return None
        try:
            return str(self.library.lora(lora_id).path)
        except LoradError:
            return None

    def status_line(self) -> str:
        if getattr(self, "queue", None) is None:
            return "starting"
        try:
            counts = self._counts = self.queue.counts()
        except DatabaseUnavailable:
            counts = self._counts or {"pending": 0, "done": 0, "failed": 0}
        parts = [f"queue={counts['pending']}", f"done={counts['done']}", f"failed={counts['failed']}"]
        for job in self.running_jobs():
            parts.append(f"running={Path(job['path'] or '?').name} {job['progress']:.0%}")
        if not self.library.db.health.reachable:
            parts.append("database unreachable")
        if self.gate.draining:
            parts.append("draining")
        elif self.gate.paused:
            parts.append("paused")
        elif not self.gate.in_window:
            parts.append("outside window")
        elif reason := self.waiting():
            parts.append(f"waiting: {reason}")
        return " ".join(parts)


def _resolved(watch: WatchDir) -> WatchDir:
    try:
        watch.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.error("cannot create watched folder", path=str(watch.path), error=str(e))
    return replace(watch, path=watch.path.resolve())


def _clear_dir(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.iterdir():
        if leftover.is_file():
            leftover.unlink(missing_ok=True)


def run(config: Config) -> int:
    return Daemon(config).run()

