"""Reduction processes: the engine runs in a child process (lorad.daemon._reduce_child) that serves
jobs back to back while there is work and exits after `idle_exit` seconds without one.

Why a child process at all: a CUDA context, and the blocks torch's caching allocator keeps, go back
to the driver only when the process that made them exits. The daemon itself never imports torch,
so once the child has exited the daemon holds no GPU memory and no CUDA context, and a crash or a
hang inside torch cannot take the daemon down with it. Why not one process per job: starting one
and importing torch costs more than reducing a small LoRA (1.7 s against tens of milliseconds).

A process is used again only after it reported a result or an error in the input; one that died,
was abandoned, or failed in a way that may pass (a CUDA error can leave its context unusable) is
reaped and the next job starts a fresh one. The child empties torch's caches after every job.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from lorad import errors
from lorad.daemon._reduce_child import THREAD_ENV, decode_report
from lorad.errors import LoradError, ReduceError, TransientError
from lorad.log import get_logger

log = get_logger("lorad.reduction")

CHILD_MODULE = "lorad.daemon._reduce_child"
POLL_SECONDS = 0.1  # how often a running job looks for an abandon request between messages
EXIT_GRACE = 10.0  # how long an idle process closed by us may take to exit before it is killed


class ChildFailed(TransientError):
    """The reduction process was killed, crashed, or failed in a way that may not recur."""


def child_env(threads: int) -> dict[str, str]:
    """The daemon's environment with the thread count fixed before the OpenMP runtime loads."""
    env = dict(os.environ)
    for key in THREAD_ENV:
        env[key] = str(threads)
    return env


def probe_device(requested: str) -> str:
    """cpu or cuda for `auto`, asked of a short-lived process, so the daemon never loads torch."""
    if requested != "auto":
        return requested
    out = subprocess.run([sys.executable, "-m", CHILD_MODULE, "--probe-device", requested],
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    answer = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else []
    if answer and answer[0] in ("cpu", "cuda"):
        return answer[0]
    log.error("probing the device failed; using the CPU", stderr=out.stderr[-2000:])
    return "cpu"


def _rebuilt_error(kind: str, type_name: str, message: str) -> Exception:
    """The child's error as the parent's exception, keeping its type name (the queue tells
    permanent errors from the rest by that name)."""
    cls = getattr(errors, type_name, None)
    if isinstance(cls, type) and issubclass(cls, LoradError):
        if kind == "transient" and not issubclass(cls, TransientError):
            return ChildFailed(f"{type_name}: {message}")
        return cls(message)
    if kind == "permanent":
        return ReduceError(f"{type_name}: {message}")
    return ChildFailed(f"{type_name}: {message}")


@dataclass(frozen=True)
class Reduced:
    """A job's outcome from the child: the engine's Report and, when the spec asked for the quality
    check, the effect measurement's figures (EffectResult JSON) or why there are none."""

    report: Any
    effect: dict[str, Any] | None = None
    effect_error: str | None = None


class ReductionProcess:
    """One child serving jobs: a spec per line on its stdin, JSON-line messages on a pipe of its own
    (so nothing the engine prints can be mistaken for one)."""

    def __init__(self, threads: int, nice: int, io_idle: bool, label: str) -> None:
        read_fd, write_fd = os.pipe()
        argv = [sys.executable, "-m", CHILD_MODULE, "--fd", str(write_fd), "--parent", str(os.getpid()),
                "--label", label, "--nice", str(nice), "--threads", str(threads),
                *(["--io-idle"] if io_idle else [])]  # fmt: skip
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, pass_fds=(write_fd,), env=child_env(threads))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the child holds the only write end: its exit is our EOF
        self.label = label
        self.jobs = 0
        self.idle_since = time.monotonic()
        self._fd = read_fd
        self._pending = b""
        self._poller = select.poll()  # not select(): a busy daemon's descriptors may number over 1024
        self._poller.register(read_fd, select.POLLIN)
        self._closed = False
        self.reusable = False  # after a job: whether the process may serve another

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def run(self, spec: dict[str, Any], progress: Callable[[int, int], None]) -> Reduced:
        """The Report, with the effect measurement when the spec asks for one; raises the child's
        error, ChildFailed when it died without one, or whatever `progress` raises (JobAbandoned).
        Afterwards `reusable` says whether the process may serve another job."""
        self.jobs += 1
        self.reusable = False
        stdin: IO[bytes] | None = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(spec).encode() + b"\n")
            stdin.flush()
        except BrokenPipeError:
            pass  # it died; the exit status says how
        outcome = self._follow(progress)
        if outcome is None:
            code = self.proc.wait()
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            raise ChildFailed(f"the reduction process (pid {self.proc.pid}) {how} before it reported a result")
        self.idle_since = time.monotonic()
        if outcome["event"] == "report":
            # A measurement that failed in a way that may leave torch unusable (a CUDA error):
            # the report stands, but the process is not given another job.
            self.reusable = bool(outcome.get("reusable", True))
            return Reduced(decode_report(outcome["report"]), outcome.get("effect"), outcome.get("effect_error"))
        self.reusable = outcome["kind"] == "permanent"  # the input's fault, not the process's
        raise _rebuilt_error(outcome["kind"], outcome["type"], outcome["message"])

    def _follow(self, progress: Callable[[int, int], None]) -> dict[str, Any] | None:
        """Messages up to this job's report or error (None: the child's output ended first)."""
        done = total = 0
        while True:
            if self._poller.poll(POLL_SECONDS * 1000):
                chunk = os.read(self._fd, 1 << 16)
                if not chunk:
                    progress(done, total)  # an abandon asked for as the child died still stands
                    return None
                *lines, self._pending = (self._pending + chunk).split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    event = message.pop("event")
                    if event == "progress":
                        done, total = message["done"], message["total"]
                    elif event == "started":
                        log.info("reduction process started", label=self.label, **message)
                    elif event in ("report", "error"):
                        progress(done, total)
                        return {"event": event, **message}
            progress(done, total)  # also between messages: lets the worker abandon the job

    def close(self) -> None:
        """Let an idle child exit (its stdin's EOF), killing it after EXIT_GRACE; reap it."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(EXIT_GRACE)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        os.close(self._fd)

    def kill(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass
        os.close(self._fd)


class ProcessPool:
    """Reduction processes between jobs: taken for a job, given back after it, closed once idle for
    `idle_exit` seconds (0: right after each job) by a thread of the pool's own, which also reaps
    them, so none is left a zombie."""

    def __init__(self, threads: int, nice: int, io_idle: bool, idle_exit: float) -> None:
        self.threads, self.nice, self.io_idle, self.idle_exit = threads, nice, io_idle, idle_exit
        self.started = 0  # processes started, for status and tests
        self._idle: list[ReductionProcess] = []
        self._changed = threading.Condition()
        self._closing = False
        self._reaping = False  # a reaper thread runs (set and cleared under the lock)

    def take(self) -> ReductionProcess:
        with self._changed:
            while self._idle:
                process = self._idle.pop()
                if process.alive():
                    return process
                process.kill()  # died while idle (the OOM killer, a stray kill): reap it
            self.started += 1
            label = f"r{self.started}"
        return ReductionProcess(self.threads, self.nice, self.io_idle, label)

    def give_back(self, process: ReductionProcess, reusable: bool) -> None:
        with self._changed:
            if reusable and self.idle_exit > 0 and not self._closing and process.alive():
                self._idle.append(process)
                if not self._reaping:
                    self._reaping = True
                    threading.Thread(target=self._reap, name="lorad-reaper", daemon=True).start()
                self._changed.notify_all()
                return
        if reusable:
            process.close()
        else:
            process.kill()

    def idle_pids(self) -> list[int]:
        with self._changed:
            return [p.pid for p in self._idle]

    def close(self) -> None:
        with self._changed:
            self._closing = True
            idle, self._idle = self._idle, []
            self._changed.notify_all()
        for process in idle:
            process.close()

    def _reap(self) -> None:
        while True:
            with self._changed:
                if self._closing or not self._idle:
                    self._reaping = False
                    return
                now = time.monotonic()
                expired = [p for p in self._idle if now - p.idle_since >= self.idle_exit]
                self._idle = [p for p in self._idle if p not in expired]
                if not expired:
                    first = min(p.idle_since for p in self._idle)
                    self._changed.wait(first + self.idle_exit - now)
                    continue
            for process in expired:
                log.info("reduction process idle; exiting", label=process.label, jobs=process.jobs,
                         idle_exit=self.idle_exit)  # fmt: skip
                process.close()
