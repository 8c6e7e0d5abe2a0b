"""End to end: the real daemon in a subprocess on a temporary config, real LoRA files dropped into
its watched folder in the ways people and downloaders do it, driven only through the `lorad` CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorad.daemon.worker import MODULE_DELAY_ENV
from tests._daemon_fixtures import Daemon, cli, cli_json, lora_bytes, make_lora, wait_for, write_config, write_slowly


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Path, Daemon]]:
    config = write_config(tmp_path)
    daemon = Daemon(config, tmp_path / "daemon.log")
    yield tmp_path, daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop(signal.SIGKILL)


def by_path(loras: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {x["path"]: x for x in loras}


def active(lora: dict[str, Any]) -> dict[str, Any]:
    [variant] = [v for v in lora["variants"] if v["active"]]
    assert variant["id"] == lora["active_variant"]
    return variant


def reduced_everywhere(config: Path, paths: list[Path]) -> dict[str, dict[str, Any]] | None:
    """The list, once every path shows an activated reduced variant (else None)."""
    loras = by_path([x for x in cli_json(config, "list") if x["id"] is not None])  # not refused paths
    if all(str(p) in loras and active(loras[str(p)])["kind"] == "reduced" for p in paths):
        return loras
    return None


def test_drops_are_reduced_activated_and_survive_a_restart(rig: tuple[Path, Daemon]) -> None:
    tmp, daemon = rig
    config, loras = daemon.config, tmp / "loras"
    down_early = make_lora(loras / "sub" / "early.safetensors", seed=1)  # dropped before the daemon ran
    originals = {down_early: sha_of(down_early)}
    daemon.start()

    slow_data, part_data = lora_bytes(seed=2, dim=48), lora_bytes(seed=3)
    slow, final = loras / "slow.safetensors", loras / "dl.safetensors"
    copier = threading.Thread(target=write_slowly, args=(slow_data, slow, 8, 0.15))
    copier.start()
    part = loras / "dl.safetensors.part"
    write_slowly(part_data, part, 4, 0.1)
    os.rename(part, final)
    copier.join()
    originals[slow] = hashlib.sha256(slow_data).hexdigest()
    originals[final] = hashlib.sha256(part_data).hexdigest()

    listed = wait_for(lambda: reduced_everywhere(config, list(originals)), 90, 0.2, "three reduced LoRAs")
    assert sorted(listed) == sorted(str(p) for p in originals)  # nothing under the .part name
    for path, original_sha in originals.items():
        lora = listed[str(path)]
        variant = active(lora)
        original = next(v for v in lora["variants"] if v["kind"] == "original")
        assert original["sha256"] == original_sha
        assert variant["method"] == "rank" and variant["param"] == 2 and variant["fro_retained_file"] > 0.9
        assert sha_of(path) == variant["sha256"] != original_sha  # the file at the path is the variant
        assert variant["bytes"] == path.stat().st_size < original["bytes"]
    shown = cli_json(config, "show", str(slow))
    assert [(j["state"], j["attempts"]) for j in shown["jobs"]] == [("done", 1)]  # processed once
    assert [e["kind"] for e in shown["events"]].count("ingested") == 1  # its own write caused nothing
    assert any(e["kind"] == "decided" and e["detail"]["activate"] for e in shown["events"])

    status = cli_json(config, "status")
    assert status["queue_depth"] == 0 and status["running"] == [] and status["device"] == "cpu"
    assert status["loras"] == 3 and status["saved_bytes"] > 0
    human = cli(config, "status").stdout  # the installed entry point, too
    assert "queue: 0 waiting" in human and "saved" in human

    # revert puts the original's bytes back; switch puts a chosen variant's.
    reverted = cli_json(config, "revert", str(slow))
    assert active(reverted)["kind"] == "original" and sha_of(slow) == originals[slow]
    reduced_id = next(v["id"] for v in reverted["variants"] if v["kind"] == "reduced")
    switched = cli_json(config, "switch", str(final), str(next(
        v["id"] for v in listed[str(final)]["variants"] if v["kind"] == "original")))  # fmt: skip
    assert sha_of(final) == originals[final] and active(switched)["kind"] == "original"
    cli(config, "switch", str(slow), str(reduced_id))
    assert sha_of(slow) == next(v["sha256"] for v in reverted["variants"] if v["id"] == reduced_id)
    before_restart = by_path(cli_json(config, "list"))
    # lorad's own writes (activation, revert, switch) never came back to it as new files.
    settled = [e["path"] for e in daemon.log_events() if e.get("event") == "file settled"]
    assert sorted(settled) == sorted(str(p) for p in originals)

    # A clean stop, a file dropped while the daemon is down, and a restart.
    assert daemon.stop(signal.SIGTERM) == 0
    stopped = cli(config, "status", check=False)
    assert stopped.returncode == 2 and "daemon is not running" in stopped.stderr
    while_down = make_lora(loras / "while-down.safetensors", seed=9)
    originals[while_down] = sha_of(while_down)
    daemon.start()
    after = wait_for(lambda: reduced_everywhere(config, [while_down]), 90, 0.2, "the file dropped while down")
    for path in (down_early, slow, final):
        assert after[str(path)] == before_restart[str(path)]  # same ids, variants and choices
    assert sha_of(final) == originals[final]  # the user's switch to the original stuck
    assert [j["attempts"] for j in cli_json(config, "show", str(final))["jobs"]] == [1]  # not redone
    assert cli_json(config, "status")["queue"]["done"] == 4


def test_policy_refusals_and_bad_requests(rig: tuple[Path, Daemon]) -> None:
    tmp, daemon = rig
    config = daemon.config
    path = make_lora(tmp / "loras" / "a.safetensors", seed=5)
    daemon.start()
    wait_for(lambda: reduced_everywhere(config, [path]), 90, 0.2, "the first reduction")

    # "tiny" keeps rank 1, which keeps too little of the norm for its min_fro_retained 0.99.
    queued = cli_json(config, "enqueue", str(path), "--policy", "tiny")
    assert queued["created"] and queued["job"]["policy"] == "tiny"
    shown = wait_for(lambda: (s := cli_json(config, "show", str(path)))["jobs"][-1]["state"] == "done" and s,
                     90, 0.2, "the tiny job")  # fmt: skip
    tiny = next(v for v in shown["variants"] if v["param"] == 1)
    assert not tiny["active"] and active(shown)["param"] == 2  # stored, not activated
    decision = next(e for e in shown["events"] if e["kind"] == "decided" and e["variant"] == tiny["id"])
    assert decision["detail"]["activate"] is False and "min_fro_retained 0.99" in decision["detail"]["reason"]
    assert "not activated" in cli(config, "show", str(path)).stdout
    assert cli_json(config, "show", str(shown["id"]))["path"] == str(path)  # by id, too
    table = cli(config, "list").stdout.splitlines()
    assert table[0].split() == ["ID", "PATH", "ORIGINAL", "NOW", "ACTIVE", "SERVES", "VARIANTS"] and str(path) in table[2]
    again = cli_json(config, "enqueue", str(path), "--policy", "tiny")
    assert not again["created"] and again["job"]["id"] == queued["job"]["id"]

    outside = cli(config, "enqueue", "/etc/hostname", "--json", check=False)
    assert outside.returncode == 2 and json.loads(outside.stdout)["error"]["code"] == "outside_watch"
    assert "not inside a watched folder" in outside.stderr
    missing = cli(config, "switch", str(path), "999", "--json", check=False)
    assert missing.returncode == 2 and json.loads(missing.stdout)["error"]["code"] == "not_found"
    unknown = cli(config, "enqueue", str(path), "--policy", "nope", check=False)
    assert unknown.returncode == 2 and "no policy named 'nope'" in unknown.stderr
    assert sha_of(path) == active(cli_json(config, "show", str(path)))["sha256"]  # nothing lost

    paused = cli_json(config, "pause")
    assert paused["paused"] is True and cli_json(config, "status")["paused"] is True
    later = make_lora(tmp / "loras" / "later.safetensors", seed=6)
    wait_for(lambda: str(later) in by_path(cli_json(config, "list")), 60, 0.2, "the paused ingest")
    assert cli_json(config, "status")["queue"]["pending"] == 1
    cli(config, "resume")
    wait_for(lambda: reduced_everywhere(config, [later]), 90, 0.2, "the job after resume")
    assert cli_json(config, "verify")["ok"] is True
    assert cli_json(config, "gc")["executed"] is False
    assert cli_json(config, "rescan")["requested"] is True


def wait_for_log(daemon: Daemon, event: str, count: int = 1) -> None:
    wait_for(lambda: sum(e.get("event") == event for e in daemon.log_events()) >= count, 90, 0.02, event)


def test_sigterm_and_sigkill_mid_job(rig: tuple[Path, Daemon]) -> None:
    """Long jobs (hundreds of modules): SIGTERM lets one finish; SIGKILL loses none."""
    tmp, daemon = rig
    config, loras = daemon.config, tmp / "loras"
    # 200 modules x 20 ms: each job surely lasts seconds, whatever the machine's speed.
    daemon.env[MODULE_DELAY_ENV] = "0.02"
    daemon.start()

    first = make_lora(loras / "big-1.safetensors", seed=11, modules=200, dim=64, rank=16)
    wait_for_log(daemon, "job started")
    status = wait_for(lambda: (s := cli_json(config, "status"))["running"] and s["running"][0]["modules_done"] and s,
                      60, 0.05, "progress in `lorad status`")  # fmt: skip
    [running] = status["running"]
    assert running["path"] == str(first) and running["modules_total"] == 200
    assert 0 < running["progress"] < 1 and status["queue"]["running"] == 1
    assert "running: job" in cli(config, "status").stdout
    assert daemon.stop(signal.SIGTERM) == 0  # finished inside the grace period (or given back)
    daemon.start()
    shown = wait_for(lambda: (s := cli_json(config, "show", str(first)))["jobs"][0]["state"] == "done" and s,
                     120, 0.2, "the first big job")  # fmt: skip
    assert [(j["state"], j["attempts"]) for j in shown["jobs"]] == [("done", 1)]  # no attempt was spent twice
    assert sha_of(first) == active(shown)["sha256"] and active(shown)["kind"] == "reduced"

    second = make_lora(loras / "big-2.safetensors", seed=12, modules=200, dim=64, rank=16)
    original_sha = sha_of(second)
    wait_for_log(daemon, "job started", 2)  # this run's log holds the first start's lines too
    daemon.stop(signal.SIGKILL)
    assert sha_of(second) == original_sha  # nothing half-written at the path
    daemon.start()
    done = wait_for(lambda: reduced_everywhere(config, [second]), 120, 0.3, "the killed job, redone")
    lora = done[str(second)]
    shown = cli_json(config, "show", str(second))
    assert [(j["state"], j["attempts"]) for j in shown["jobs"]] == [("done", 2)]  # killed once, then done
    assert [v["kind"] for v in lora["variants"]] == ["original", "reduced"]  # no duplicate variant
    assert sha_of(second) == active(lora)["sha256"]
    assert cli_json(config, "verify")["ok"] is True


def test_files_are_ingested_while_a_long_reduction_runs(rig: tuple[Path, Daemon]) -> None:
    """Ingest (hashing and storing new files) does not wait for the running reduction, and the
    queued jobs are then served back to back by the same reduction process."""
    tmp, daemon = rig
    config, loras = daemon.config, tmp / "loras"
    daemon.env[MODULE_DELAY_ENV] = "0.05"  # 200 modules: a job of 10 s at least
    daemon.start()
    long = make_lora(loras / "long.safetensors", seed=21, modules=200, dim=64, rank=16)
    wait_for(lambda: cli_json(config, "status")["running"], 120, 0.1, "the long job to run")
    small = [make_lora(loras / f"small-{n}.safetensors", seed=30 + n) for n in range(5)]
    ingested = wait_for(lambda: len([x for x in cli_json(config, "list") if x["id"] is not None]) == 6
                        and cli_json(config, "status"), 120, 0.1, "the small files to be ingested")  # fmt: skip
    [running] = ingested["running"]
    assert running["path"] == str(long)  # still the long job: the five did not wait for it
    assert ingested["queue"]["pending"] == 5
    reduced_everywhere_now = wait_for(lambda: reduced_everywhere(config, [long, *small]), 300, 0.3, "all six reduced")
    assert len(reduced_everywhere_now) == 6
    started = [json.loads(x) for x in daemon.log_path.read_text().splitlines()
               if '"reduction process started"' in x]  # fmt: skip
    assert len(started) == 1  # one process served all six jobs


def test_embedded_default_config_bad_configs_and_a_second_daemon(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests._daemon_fixtures import REPO, lorad_env

    def lorad(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lorad", *args], capture_output=True, text=True,
                              env=lorad_env(), cwd=str(REPO), timeout=timeout)  # fmt: skip

    nothing = lorad("daemon")
    assert nothing.returncode == 2 and "give --config FILE or --watch DIR" in nothing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("watch:\n  - path: /tmp/x\npolicies:\n  default:\n    method: rank\n    parm: 4\n")
    refused = lorad("daemon", "--config", str(bad))
    assert refused.returncode == 2 and "line 6: unknown key 'policies.default.parm'" in refused.stderr

    # No config: the embedded default (policy "default", fro 0.95) on the folder given by --watch.
    folder, sock = tmp_path / "plain", tmp_path / "d.sock"
    path = make_lora(folder / "p.safetensors", seed=21)
    argv = ["daemon", "--watch", str(folder), "--state-dir", str(tmp_path / "st"), "--socket", str(sock), "--log-format", "json"]
    with open(tmp_path / "default.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lorad", *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=lorad_env(), cwd=str(REPO))  # fmt: skip
    try:
        def reduced() -> dict[str, Any] | None:
            result = cli(None, "list", "--json", socket=sock, check=False)
            loras = json.loads(result.stdout) if result.returncode == 0 else []
            return next((x for x in loras if x["path"] == str(path) and active(x)["kind"] == "reduced"), None)

        lora = wait_for(reduced, 90, 0.2, "the default policy's variant")
        assert active(lora)["method"] == "fro" and active(lora)["param"] == 0.95
        # A second daemon on the same state dir and socket refuses and leaves the first alone.
        second = lorad(*argv)
        assert second.returncode == 2 and ("already listening" in second.stderr or "another lorad daemon" in second.stderr)
        assert cli(None, "status", "--json", socket=sock).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
