"""Helpers for the daemon tests: tiny real LoRA files, slow writers, deadline polling, and a
real `lorad daemon` subprocess driven through the real `lorad` CLI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save, save_file

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]


def wait_for(condition: Callable[[], T], timeout: float = 60.0, every: float = 0.05, what: str = "") -> T:
    """Poll `condition` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or condition}")
        time.sleep(every)


def lora_tensors(modules: int = 3, dim: int = 32, rank: int = 8, seed: int = 0, true_rank: int = 2) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA whose update has `true_rank` strong directions plus small noise, so a
    reduction keeps most of its norm at a much lower rank."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(modules):
        name = f"lora_unet_down_blocks_0_attentions_0_proj_{i}"
        strong_up = torch.randn(dim, true_rank, generator=gen)
        strong_down = torch.randn(true_rank, dim, generator=gen)
        up = torch.cat([strong_up, 0.01 * torch.randn(dim, rank - true_rank, generator=gen)], dim=1)
        down = torch.cat([strong_down, 0.01 * torch.randn(rank - true_rank, dim, generator=gen)], dim=0)
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


def lora_bytes(seed: int = 0, **kwargs: Any) -> bytes:
    return save(lora_tensors(seed=seed, **kwargs), metadata={"ss_network_dim": "8"})


def make_lora(path: Path, seed: int = 0, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_tensors(seed=seed, **kwargs), str(path), metadata={"ss_network_dim": "8"})
    return path


def write_slowly(data: bytes, path: Path, chunks: int = 8, pause: float = 0.15) -> None:
    """Write `data` to `path` in chunks with pauses, as a slow copy or download does."""
    step = max(1, len(data) // chunks)
    with open(path, "wb") as f:
        for start in range(0, len(data), step):
            f.write(data[start : start + step])
            f.flush()
            os.fsync(f.fileno())
            time.sleep(pause)


# ---------------------------------------------------------------------------------------------
# The real daemon in a subprocess, driven through the real CLI


def lorad_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LORAD_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID", "WATCHDOG_USEC")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def write_config(tmp: Path, *, settle: float = 0.3, extra_policies: str = "", schedule: str = "", watch_extra: str = "", workers: int = 1, lease: float = 5.0) -> Path:
    """A test config: one watched folder, a policy that reduces rank 8 to 2 and activates it."""
    config = tmp / "lorad.yaml"
    config.write_text(
        f"""\
state_dir: {tmp / 'state'}
socket: {tmp / 'run' / 'lorad.sock'}
device: cpu
settle_seconds: {settle}
poll_seconds: 0.2
lease_seconds: {lease}
workers: {workers}
watch:
  - path: {tmp / 'loras'}
    policy: default
{watch_extra}
policies:
  default:
    method: rank
    param: 2
    min_saving: 0.2
    min_fro_retained: 0.9
    activate: auto
    keep_variants: 3
  tiny:
    method: rank
    param: 1
    min_saving: 0.2
    min_fro_retained: 0.99
    activate: auto
{extra_policies}
schedule:
  reconcile_every: 1h
  gc_every: off
  retry_every: 2s
{schedule}
"""
    )
    return config


@dataclass
class Daemon:
    """A `lorad daemon --config` subprocess; its stdout (JSON log lines) goes to a file."""

    config: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=lorad_env)
    prefix: list[str] = field(default_factory=list)  # e.g. setpriv dropping capabilities

    def start(self, wait_ready: bool = True) -> Daemon:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "lorad", "daemon", "--config", str(self.config), "--log-format", "json"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=str(REPO),
        )  # fmt: skip
        log.close()
        if wait_ready:
            wait_for(self.is_up, 60, 0.1, "the daemon to answer hello")
        return self

    def is_up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
        return cli_here(self.config, "status", "--json")[0] == 0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"daemon did not exit within {timeout}s of signal {sig}:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events


def cli(config: Path | None, *args: str, check: bool = True, socket: Path | None = None,
        timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `lorad` command in its own process, finding the socket through `--config`
    (or `--socket`)."""
    where = ["--socket", str(socket)] if socket else (["--config", str(config)] if config else [])
    argv = [args[0], *where, *args[1:]]
    cmd = [sys.executable, "-m", "lorad", *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env or lorad_env(), cwd=str(REPO), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def cli_here(config: Path, *args: str) -> tuple[int, str, str]:
    """Run the real `lorad` command's code in this process, with `--config`: (status, stdout,
    stderr). Wait loops ask many times a second; a new interpreter each time (0.5 s of CPU) took
    the cores that the job being waited on needs. `cli` runs the command as its own process."""
    from lorad.cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([args[0], "--config", str(config), *args[1:]])
    return code, out.getvalue(), err.getvalue()


def cli_json(config: Path, *args: str) -> Any:
    code, out, err = cli_here(config, *args, "--json")
    if code != 0:
        raise AssertionError(f"{' '.join(args)} failed ({code}):\n{out}\n{err}")
    return json.loads(out)


def show_if_known(config: Path, ref: str) -> Any:
    """`lorad show REF --json`, or None while the daemon has not ingested it yet."""
    code, out, err = cli_here(config, "show", ref, "--json")
    if code != 0 and json.loads(out or "{}").get("error", {}).get("code") == "not_found":
        return None
    if code != 0:
        raise AssertionError(f"show {ref} failed ({code}):\n{out}\n{err}")
    return json.loads(out)


def sigstopped(daemon: Daemon, timeout: float = 30) -> Daemon:
    """SIGSTOP the daemon and wait until the kernel shows every one of its threads stopped: a
    thread still running for a moment after the signal does what the test means it not to (reads
    its inotify queue, accepts a connection). The caller sends SIGCONT."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGSTOP)
    tasks = Path(f"/proc/{daemon.proc.pid}/task")

    def all_threads_stopped() -> bool:
        try:
            states = [(t / "stat").read_text().rpartition(")")[2].split()[0] for t in tasks.iterdir()]
        except FileNotFoundError:  # a thread ended as we looked
            return False
        return all(state in ("T", "t") for state in states)

    wait_for(all_threads_stopped, timeout, what="the daemon to stop")
    return daemon
