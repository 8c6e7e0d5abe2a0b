"""Mirror mode through the real daemon and CLI: the watched file's bytes never change (not on
reduction, revert, switch, nor a SIGKILL mid-activation); the mirror holds the active variant
and a copy of the sidecars; revert and switch change the mirror only; a deleted file's mirror
goes as soon as the deletion is seen; an adapter folder is mirrored whole; bad configs are refused
at start."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorad.daemon.config import ConfigError, load_config
from lorad.library import trees
from lorad.library.store import CRASH_ENV
from tests._daemon_fixtures import Daemon, cli, cli_json, make_lora, wait_for, write_config
from tests._folder_fixtures import config_of, make_adapter, peft_deltas, tree_of


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Path, Daemon]]:
    watch = f"  - path: {tmp_path / 'kept'}\n    mode: mirror\n    mirror_to: {tmp_path / 'mirror'}\n"
    config = write_config(tmp_path, watch_extra=watch)
    (tmp_path / "kept").mkdir()
    daemon = Daemon(config, tmp_path / "daemon.log")
    yield tmp_path, daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop(signal.SIGKILL)


def lora_at(config: Path, path: Path) -> dict[str, Any] | None:
    return next((x for x in cli_json(config, "list") if x["path"] == str(path) and x["id"] is not None), None)


def active(lora: dict[str, Any]) -> dict[str, Any]:
    [variant] = [v for v in lora["variants"] if v["active"]]
    return variant


def test_mirror_mode_never_touches_the_watched_file(rig: tuple[Path, Daemon]) -> None:
    tmp, daemon = rig
    config = daemon.config
    watched = make_lora(tmp / "kept" / "styles" / "ink.safetensors", seed=4)
    sidecar = watched.with_name("ink.metadata.json")
    sidecar.write_text(json.dumps({"sha256": sha_of(watched), "model_name": "ink"}))
    original_sha, sidecar_bytes = sha_of(watched), sidecar.read_bytes()
    mirror = tmp / "mirror" / "styles" / "ink.safetensors"
    daemon.start()

    lora = wait_for(lambda: (x := lora_at(config, watched)) and active(x)["kind"] == "reduced" and x,
                    120, 0.2, "the mirrored LoRA reduced")  # fmt: skip
    reduced = active(lora)
    assert lora["mirror"] == str(mirror)
    assert sha_of(watched) == original_sha and sidecar.read_bytes() == sidecar_bytes
    assert sha_of(mirror) == reduced["sha256"] != original_sha
    assert mirror.with_name("ink.metadata.json").read_bytes() == sidecar_bytes  # copied beside it
    assert "mirrored to" in cli(config, "show", str(watched)).stdout

    # revert and switch act on the mirror; either path names the LoRA.
    reverted = cli_json(config, "revert", str(mirror))
    assert active(reverted)["kind"] == "original"
    assert sha_of(mirror) == original_sha and sha_of(watched) == original_sha
    cli(config, "switch", str(watched), str(reduced["id"]))
    assert sha_of(mirror) == reduced["sha256"] and sha_of(watched) == original_sha

    # A SIGKILL in the middle of a revert, after the mirror's rename, before the records.
    assert daemon.stop() == 0
    daemon.env[CRASH_ENV] = "materialize:after-rename"
    daemon.start()
    killed = cli(config, "revert", str(watched), check=False)
    assert killed.returncode != 0
    assert daemon.proc is not None and daemon.proc.wait(30) == -signal.SIGKILL
    assert sha_of(watched) == original_sha and sha_of(mirror) == original_sha
    daemon.env.pop(CRASH_ENV)
    daemon.start()
    # The restart's scan (or verify) brings the records to the mirror: it holds the original.
    wait_for(lambda: active(lora_at(config, watched))["kind"] == "original", 60, 0.2, "the records reconciled")  # type: ignore[arg-type]
    events = cli_json(config, "show", str(watched))["events"]
    assert any(e["detail"].get("reason") == "the mirror file holds this variant" for e in events)
    assert cli_json(config, "verify")["ok"]
    assert sha_of(watched) == original_sha and sidecar.read_bytes() == sidecar_bytes

    # A file deleted from the watched folder: its mirror goes, its records stay until gc.
    watched.unlink()
    verified = cli_json(config, "verify")
    assert str(watched) in verified["missing_files"]
    assert not mirror.exists()
    assert lora_at(config, watched) is not None
    assert daemon.stop() == 0


def test_a_deleted_files_mirror_goes_when_the_deletion_is_seen(rig: tuple[Path, Daemon]) -> None:
    tmp, daemon = rig
    config = daemon.config
    watched = make_lora(tmp / "kept" / "old" / "ink.safetensors", seed=5)
    watched.with_name("ink.civitai.info").write_text("{}")
    mirror = tmp / "mirror" / "old" / "ink.safetensors"
    daemon.start()
    reduced = wait_for(lambda: (x := lora_at(config, watched)) and active(x)["kind"] == "reduced" and active(x),
                       120, 0.2, "the mirrored LoRA reduced")  # fmt: skip
    wait_for(lambda: mirror.exists() and sha_of(mirror) == reduced["sha256"], 30, 0.1, "the mirror written")
    assert mirror.with_name("ink.civitai.info").exists()
    scans = sum(e.get("event") == "reconcile scan done" for e in daemon.log_events())

    watched.unlink()
    deleted = time.monotonic()
    wait_for(lambda: not mirror.exists(), 10, 0.05, "the mirror removed")
    assert time.monotonic() - deleted < 5
    # reconcile_every is 1h: no scan ran meanwhile, so the deletion itself removed the mirror.
    assert sum(e.get("event") == "reconcile scan done" for e in daemon.log_events()) == scans
    assert mirror.with_name("ink.civitai.info").exists()  # sidecars there are the user's
    assert lora_at(config, watched) is not None  # its records stay until gc
    assert daemon.stop() == 0


def test_an_adapter_folder_is_mirrored_whole(rig: tuple[Path, Daemon]) -> None:
    """The watched folder keeps the original byte for byte; the folder at the same relative path
    under mirror_to holds the active variant, loads with PEFT at the original's strength, and is
    what revert and switch change; deleting the watched folder removes it."""
    tmp, daemon = rig
    config = daemon.config
    adapter = make_adapter(tmp / "kept" / "chat")
    files = tree_of(adapter)
    mirror = tmp / "mirror" / "chat"
    daemon.start()

    lora = wait_for(lambda: (x := lora_at(config, adapter)) and active(x)["kind"] == "reduced" and x,
                    120, 0.2, "the mirrored adapter folder reduced")  # fmt: skip
    reduced = active(lora)
    [original] = [v for v in lora["variants"] if v["kind"] == "original"]
    assert lora["kind"] == "folder" and lora["mirror"] == str(mirror)
    assert tree_of(adapter) == files
    assert trees.hash_folder(mirror)[0] == reduced["sha256"] != original["sha256"]
    assert config_of(mirror)["r"] == 2 and config_of(adapter)["r"] == 8
    want, got = peft_deltas(adapter), peft_deltas(mirror)
    assert max(float((got[n] - want[n]).abs().max()) for n in want) < 1e-4  # rank 2 is exact here

    reverted = cli_json(config, "revert", str(mirror))
    assert active(reverted)["kind"] == "original" and tree_of(mirror) == files
    cli(config, "switch", str(adapter), str(reduced["id"]))
    assert trees.hash_folder(mirror)[0] == reduced["sha256"] and tree_of(adapter) == files
    assert sorted(p.name for p in mirror.parent.iterdir()) == ["chat"]  # nothing of the swaps left
    assert cli_json(config, "verify")["ok"]

    shutil.rmtree(adapter)
    wait_for(lambda: not mirror.exists(), 10, 0.05, "the mirror folder removed")
    assert lora_at(config, adapter) is not None  # its records stay until gc
    assert daemon.stop() == 0


def test_mirror_configs_that_would_watch_lorads_own_writes_are_refused(tmp_path: Path) -> None:
    def config(watch: str) -> Path:
        path = tmp_path / "c.yaml"
        path.write_text(f"state_dir: {tmp_path / 'state'}\nwatch:\n{watch}policies:\n  default: {{method: rank, param: 2}}\n")
        return path

    inside = f"  - path: {tmp_path / 'a'}\n    mode: mirror\n    mirror_to: {tmp_path / 'a' / 'm'}\n"
    with pytest.raises(ConfigError, match="overlaps the watched folder"):
        load_config(config(inside))
    other = (f"  - path: {tmp_path / 'a'}\n    mode: mirror\n    mirror_to: {tmp_path / 'm'}\n"
             f"  - path: {tmp_path / 'm' / 'x'}\n")  # fmt: skip
    with pytest.raises(ConfigError, match="overlaps the watched folder"):
        load_config(config(other))
    with pytest.raises(ConfigError, match="needs `mirror_to"):
        load_config(config(f"  - path: {tmp_path / 'a'}\n    mode: mirror\n"))
    with pytest.raises(ConfigError, match="mirror_to is for mode: mirror"):
        load_config(config(f"  - path: {tmp_path / 'a'}\n    mirror_to: {tmp_path / 'm'}\n"))
    ok = load_config(config(f"  - path: {tmp_path / 'a'}\n    mode: mirror\n    mirror_to: {tmp_path / 'm'}\n"))
    assert ok.watch[0].mode == "mirror" and ok.watch[0].mirror_to == tmp_path / "m"
