"""Mirror mode through the real daemon and CLI: the watched file's bytes never change (not on
reduction, revert, switch, nor a SIGKILL mid-activation); the mirror holds the active variant
and a copy of the sidecars; revert and switch change the mirror only; a deleted file's mirror
goes; bad configs are refused at start."""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorad.daemon.config import ConfigError, load_config
from lorad.library.store import CRASH_ENV
from tests._daemon_fixtures import Daemon, cli, cli_json, make_lora, wait_for, write_config
from tests._folder_fixtures import make_adapter, tree_of


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
    adapter = make_adapter(tmp / "kept" / "chat")  # not mirrored yet: refused, untouched
    adapter_files = tree_of(adapter)
    daemon.start()

    lora = wait_for(lambda: (x := lora_at(config, watched)) and active(x)["kind"] == "reduced" and x,
                    120, 0.2, "the mirrored LoRA reduced")  # fmt: skip
    reduced = active(lora)
    assert lora["mirror"] == str(mirror)
    assert sha_of(watched) == original_sha and sidecar.read_bytes() == sidecar_bytes
    assert sha_of(mirror) == reduced["sha256"] != original_sha
    assert mirror.with_name("ink.metadata.json").read_bytes() == sidecar_bytes  # copied beside it
    assert "mirrored to" in cli(config, "show", str(watched)).stdout
    refused = wait_for(lambda: next((x["refused"] for x in cli_json(config, "list") if x["path"] == str(adapter)), None),
                       60, 0.2, "the adapter folder refused")  # fmt: skip
    assert "not mirrored yet" in refused["reason"] and tree_of(adapter) == adapter_files
    assert not (tmp / "mirror" / "chat").exists()

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
