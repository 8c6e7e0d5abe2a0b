"""The real daemon sharing a machine politely: no torch and no child process while idle, a busy GPU
waits, a full disk is retried (never a permanent failure), and `lorad show` names the setting that
refused a variant. Driven through the real `lorad` CLI; processes are read from /proc."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from lorad.daemon.gpu import GPU_STATE_ENV
from lorad.daemon.worker import MODULE_DELAY_ENV
from tests._daemon_fixtures import Daemon, cli, cli_json, lorad_env, make_lora, wait_for, write_config
from tests._proc import alive, children, reduction_children


def loads_torch(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch" in maps or "torch/_C" in maps


def active(lora: dict[str, Any]) -> dict[str, Any]:
    return next(v for v in lora["variants"] if v["active"])


def reduced(config: Path, path: Path) -> dict[str, Any] | None:
    lora = next((x for x in cli_json(config, "list") if x["path"] == str(path)), None)
    return lora if lora and active(lora)["kind"] == "reduced" else None


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)


def test_idle_daemon_holds_no_torch_and_no_child_and_show_names_the_refusing_setting(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    config = write_config(tmp_path)
    with open(config, "a") as f:
        f.write("idle_exit: 1s\n")  # the reduction process exits 1 s after its last job
    daemon = Daemon(config, tmp_path / "daemon.log", env=lorad_env(**{MODULE_DELAY_ENV: "0.05"}))
    daemons.append(daemon.start())
    pid = daemon.proc.pid
    assert children(pid) == [] and not loads_torch(pid)

    path = make_lora(tmp_path / "loras" / "a.safetensors", seed=3, modules=60)
    [child] = wait_for(lambda: reduction_children(pid), 300, what="the reduction process")
    running = wait_for(lambda: cli_json(config, "status")["running"], 300, what="the running job")
    assert running[0]["path"] == str(path)
    wait_for(lambda: reduced(config, path), 300, 0.2, "the reduction")
    wait_for(lambda: children(pid) == [], 30, what="the daemon to hold no child")
    assert not Path(f"/proc/{child}").exists()
    assert not loads_torch(pid)  # the daemon itself never loaded torch, so never a CUDA context

    # A variant the policy refuses: `lorad show` says which setting, and what would have passed.
    queued = cli_json(config, "enqueue", str(path), "--policy", "tiny")
    wait_for(lambda: cli_json(config, "show", str(path))["jobs"][-1]["state"] == "done", 300, 0.2, "the tiny job")
    text = cli(config, "show", str(path)).stdout
    line = next(x for x in text.splitlines() if "not activated" in x)
    assert "less than min_fro_retained 0.99 (set by policies.tiny.min_fro_retained)" in line
    assert "or lower would have passed" in line
    decision = next(e for e in cli_json(config, "show", str(path))["events"]
                    if e["kind"] == "decided" and e["detail"]["job"] == queued["job"]["id"])  # fmt: skip
    assert decision["detail"]["refused_by"] == "min_fro_retained" and decision["detail"]["would_pass"] < 0.99
    wait_for(lambda: children(pid) == [], 30, what="no child after the second job")
    status = cli_json(config, "status")
    assert status["waiting"] is None  # gpu_busy is on by default; without NVML it never waits

    # A daemon killed outright takes its reduction process with it: nothing goes on holding a GPU.
    make_lora(tmp_path / "loras" / "b.safetensors", seed=8, modules=200)
    [child] = wait_for(lambda: reduction_children(pid), 300, what="another reduction process")
    daemon.stop(signal.SIGKILL)
    wait_for(lambda: not alive(child), 30, what="the reduction process to die with its daemon")


def test_a_busy_gpu_makes_the_daemon_wait_and_status_says_so(tmp_path: Path, daemons: list[Daemon]) -> None:
    config = write_config(tmp_path)
    with open(config, "a") as f:
        f.write("gpu_busy: {util_above: 30, free_below_mb: 2048, check_every: 0.2s}\n")
    state = tmp_path / "gpu-state"
    state.write_text("95 80000\n")
    daemon = Daemon(config, tmp_path / "daemon.log", env=lorad_env(**{GPU_STATE_ENV: str(state)}))
    daemons.append(daemon.start())
    path = make_lora(tmp_path / "loras" / "g.safetensors", seed=4)
    status = wait_for(lambda: (s := cli_json(config, "status"))["waiting"] and s, 300, what="waiting in status")
    assert status["waiting"] == "GPU busy (utilisation 95% > 30%)"
    assert status["queue"]["pending"] == 1 and status["running"] == []
    assert "waiting: GPU busy (utilisation 95% > 30%)" in cli(config, "status").stdout.splitlines()
    assert reduction_children(daemon.proc.pid) == []
    state.write_text("3 80000\n")
    wait_for(lambda: reduced(config, path), 300, 0.2, "the reduction once the GPU is free")
    shown = cli_json(config, "show", str(path))
    assert [(j["state"], j["attempts"]) for j in shown["jobs"]] == [("done", 1)]  # waiting cost no attempt
    assert cli_json(config, "status")["waiting"] is None


def full_disk(work: Path) -> list[str]:
    """A prefix that runs the daemon in a mount namespace of its own where `work` (its state's
    work folder) is a tiny tmpfs filled to the last byte: every output written there hits a real
    ENOSPC. The ballast sits in a folder, which the daemon's start-up clean-up leaves alone."""
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed to give the daemon a full disk"
    ns = ["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]
    fill = ('mkdir -p "$0" && mount -t tmpfs -o size=64k lorad-full "$0" && mkdir "$0/ballast" && '
            '{ cat /dev/zero > "$0/ballast/fill" 2>/dev/null; true; } && exec "$@"')  # fmt: skip
    return [unshare, *ns, "sh", "-c", fill, str(work)]


def free_space(daemon: Daemon, work: Path) -> None:
    """Delete the ballast, through the daemon's own view of the file system."""
    assert daemon.proc is not None
    os.unlink(f"/proc/{daemon.proc.pid}/root{work}/ballast/fill")


def test_a_full_disk_is_retried_with_backoff_and_again_after_rescan(tmp_path: Path, daemons: list[Daemon]) -> None:
    config = write_config(tmp_path)
    text = config.read_text().replace("retry_every: 2s", "retry_every: off")  # only rescan revives
    config.write_text(text + "max_attempts: 2\n")
    work = tmp_path / "state" / "work"
    daemon = Daemon(config, tmp_path / "daemon.log", prefix=full_disk(work))
    daemons.append(daemon.start())
    path = make_lora(tmp_path / "loras" / "full.safetensors", seed=5)
    before = path.read_bytes()

    def job() -> dict[str, Any] | None:
        loras = cli_json(config, "list")
        if not any(x["path"] == str(path) for x in loras):
            return None
        jobs = cli_json(config, "show", str(path))["jobs"]
        return jobs[0] if jobs else None

    failed = wait_for(lambda: (j := job()) and j["state"] == "failed" and j, 300, 0.3, "two attempts on a full disk")
    assert failed["attempts"] == 2  # retried once after a backoff, not failed for good at the first
    assert failed["error"].startswith("OutputWriteError:") and "No space left on device" in failed["error"]
    events = daemon.log_events()
    starts = [datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")) for e in events if e.get("event") == "job started"]
    assert len(starts) == 2 and (starts[1] - starts[0]).total_seconds() >= 4.5  # backoff(1) = 5 s
    outcomes = [(e["state"], e["kind"]) for e in events if e.get("event") == "job failed"]
    assert outcomes == [("pending", "transient"), ("failed", "transient")]
    assert path.read_bytes() == before
    assert [v["kind"] for v in cli_json(config, "show", str(path))["variants"]] == ["original"]

    free_space(daemon, work)
    rescan = cli_json(config, "rescan")
    assert rescan["retried_jobs"] == [failed["id"]]
    lora = wait_for(lambda: reduced(config, path), 300, 0.2, "the reduction after rescan")
    assert path.read_bytes() != before and active(lora)["kind"] == "reduced"
    done = cli_json(config, "show", str(path))["jobs"]
    assert [(j["state"], j["attempts"], j["error"]) for j in done] == [("done", 1, None)]
    assert json.loads(cli(config, "status", "--json").stdout)["queue"]["failed"] == 0
