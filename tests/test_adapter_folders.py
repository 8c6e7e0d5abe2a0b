"""PEFT adapter folders (adapter_config.json + adapter_model.safetensors) as one LoRA: the real
daemon takes a folder copied file by file only once it is complete, reduces it as one, swaps the
whole folder in, and reverts and switches it; PEFT loads every folder it leaves at the strength of
the original. A loose adapter_model.safetensors is never reduced on its own."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lorad.daemon.worker import MODULE_DELAY_ENV
from tests._daemon_fixtures import Daemon, cli, cli_json, make_lora, wait_for, write_config, write_slowly
from tests._folder_fixtures import adapter_files, config_of, make_adapter, peft_deltas, tree_of

FOLDER_POLICY = """\
  folders:
    method: rank
    param: 2
    min_saving: 0.2
    activate: auto
  vllm:
    method: rank
    param: 2
    serve: vllm
    min_saving: 0.2
    activate: auto
"""


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Path, Daemon]]:
    watch = (f"  - path: {tmp_path / 'adapters'}\n    policy: folders\n"
             f"  - path: {tmp_path / 'served'}\n    policy: vllm\n")  # fmt: skip
    config = write_config(tmp_path, extra_policies=FOLDER_POLICY, watch_extra=watch)
    (tmp_path / "adapters").mkdir()
    (tmp_path / "served").mkdir()
    daemon = Daemon(config, tmp_path / "daemon.log")
    yield tmp_path, daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop(signal.SIGKILL)


def by_path(config: Path) -> dict[str, dict[str, Any]]:
    """The LoRAs lorad has, by path (`lorad list` also names refused paths: not these)."""
    return {x["path"]: x for x in cli_json(config, "list") if x["id"] is not None}


def refusal(config: Path, path: Path) -> str | None:
    refused = [x["refused"]["reason"] for x in cli_json(config, "list") if x["id"] is None and x["path"] == str(path)]
    return refused[0] if refused else None


def refused_later(daemon: Daemon, folder: Path) -> Path:
    """Drop a pickle named *.safetensors into `folder` and wait until the daemon has refused it:
    whatever settled before it has been taken or refused (and logged) by then."""
    later = folder / "later.safetensors"
    later.write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    wait_for(lambda: any(e.get("event") == "refused" and e.get("path") == str(later) for e in daemon.log_events()),
             60, 0.2, "the refusal of the file dropped last")  # fmt: skip
    return later


def active(lora: dict[str, Any]) -> dict[str, Any]:
    [variant] = [v for v in lora["variants"] if v["active"]]
    return variant


def active_kind(config: Path, path: Path) -> str | None:
    lora = by_path(config).get(str(path))
    return active(lora)["kind"] if lora else None


def assert_same_strength(folder: Path, reference: dict[str, torch.Tensor]) -> None:
    got = peft_deltas(folder)
    for name, delta in reference.items():
        err = float((got[name] - delta).norm() / delta.norm()) if delta.norm() > 0 else float(got[name].norm())
        assert err < 1e-5, (name, err)


def test_a_folder_copied_file_by_file_is_reduced_swapped_in_reverted_and_switched(rig: tuple[Path, Daemon]) -> None:
    tmp, daemon = rig
    config = daemon.config
    daemon.start()
    folder = tmp / "adapters" / "chat-lora"
    files = adapter_files(seed=1)
    reference = make_adapter(tmp / "reference", seed=1)  # the same files, outside lorad's reach
    expected = peft_deltas(reference)

    # Weights first, slowly; the config once the weights alone have settled and been judged (refused
    # as incomplete: the judgement that would have taken either); then the card.
    folder.mkdir()
    write_slowly(files["adapter_model.safetensors"], folder / "adapter_model.safetensors", 6, 0.1)
    wait_for(lambda: "adapter_config.json" in (refusal(config, folder) or ""), 60, 0.2, "the weights alone refused")
    assert str(folder / "adapter_model.safetensors") not in by_path(config)  # never a LoRA of its own
    assert str(folder) not in by_path(config)  # no config yet: not complete, not taken
    write_slowly(files["adapter_config.json"], folder / "adapter_config.json", 3, 0.1)
    (folder / "README.md").write_bytes(files["README.md"])

    wait_for(lambda: active_kind(config, folder) == "reduced", 120, 0.2, "the folder reduced and active")
    loras = by_path(config)
    assert list(loras) == [str(folder)]  # one LoRA: the folder, none of its files
    lora = loras[str(folder)]
    assert lora["kind"] == "folder"
    original = next(v for v in lora["variants"] if v["kind"] == "original")
    reduced = active(lora)
    # The folder on disk is the reduced tree, whole: config and weights agree, the card is kept.
    assert config_of(folder)["r"] == 2 and config_of(folder)["lora_alpha"] == 4  # 16/8 kept: 4/2
    assert (folder / "README.md").read_bytes() == files["README.md"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert reduced["bytes"] < original["bytes"]
    assert_same_strength(folder, expected)
    assert [e["path"] for e in daemon.log_events() if e.get("event") == "file settled"] == [str(folder)]

    shown = cli_json(config, "show", str(folder))
    assert [(j["state"], j["attempts"]) for j in shown["jobs"]] == [("done", 1)]

    reverted = cli_json(config, "revert", str(folder))
    assert active(reverted)["kind"] == "original"
    assert tree_of(folder) == tree_of(reference)  # the original, byte for byte
    switched = cli_json(config, "switch", str(folder), str(reduced["id"]))
    assert active(switched)["id"] == reduced["id"] and config_of(folder)["r"] == 2
    assert_same_strength(folder, expected)

    verified = cli_json(config, "verify")
    assert verified["corrupt"] == [] and verified["missing"] == [] and verified["reconciled"] == []
    # lorad's own swaps never came back to it as new folders: files are judged in the order they
    # settle, so a swap taken for new would be logged before a file dropped after the swaps is refused.
    refused_later(daemon, tmp / "adapters")
    assert [e["path"] for e in daemon.log_events() if e.get("event") == "file settled"] == [str(folder)]
    assert daemon.stop() == 0


def test_weights_without_a_config_are_refused_as_incomplete_and_never_reduced(rig: tuple[Path, Daemon]) -> None:
    tmp, daemon = rig
    config = daemon.config
    loose = tmp / "adapters" / "half"
    loose.mkdir()
    (loose / "adapter_model.safetensors").write_bytes(adapter_files(seed=2)["adapter_model.safetensors"])
    kohya = make_lora(tmp / "loras" / "plain.safetensors")  # an ordinary file beside it still goes
    daemon.start()
    wait_for(lambda: active_kind(config, kohya) == "reduced", 120, 0.2, "the plain file reduced")
    # Judged (and refused) is the last that happens to the folder until it changes.
    wait_for(lambda: "adapter_config.json" in (refusal(config, loose) or ""), 60, 0.2, "the loose weights refused")
    assert list(by_path(config)) == [str(kohya)]
    assert (loose / "adapter_model.safetensors").read_bytes() == adapter_files(seed=2)["adapter_model.safetensors"]
    assert "adapter_config.json" in (refusal(config, loose) or "")

    # A config whose ranks contradict the weights (r=4 for rank-8 tensors) is refused too.
    bad = json.loads(adapter_files(seed=2)["adapter_config.json"])
    bad["r"] = 4
    (loose / "adapter_config.json").write_text(json.dumps(bad))
    wait_for(lambda: "disagree" in (refusal(config, loose) or ""), 60, 0.2, "the disagreement refused")
    assert str(loose) not in by_path(config)

    # The right config completes it.
    (loose / "adapter_config.json").write_bytes(adapter_files(seed=2)["adapter_config.json"])
    wait_for(lambda: active_kind(config, loose) == "reduced", 120, 0.2, "the completed folder reduced")
    assert config_of(loose)["r"] == 2
    assert cli(config, "status").returncode == 0


def test_a_folder_for_vllm_gets_one_served_rank_and_survives_a_sigkill_mid_job(rig: tuple[Path, Daemon]) -> None:
    """policy `serve: vllm`: every module at the smallest rank vLLM accepts that holds what the
    method asks (rank 2 -> 8, zero-padded); `lorad list` says which servers it meets. A SIGKILL
    mid-job leaves the folder as it was, and the restarted daemon redoes the job."""
    tmp, daemon = rig
    config = daemon.config
    daemon.env[MODULE_DELAY_ENV] = "1.0"  # 4 modules: a job of seconds, long enough to kill
    daemon.start()
    folder = make_adapter(tmp / "served" / "assistant", seed=3, rank=32)
    before = tree_of(folder)
    expected = peft_deltas(folder)
    wait_for(lambda: any(e.get("event") == "job started" for e in daemon.log_events()), 60, 0.1, "the job")
    daemon.stop(signal.SIGKILL)
    assert tree_of(folder) == before  # nothing half-swapped
    daemon.env.pop(MODULE_DELAY_ENV)
    daemon.start()
    wait_for(lambda: active_kind(config, folder) == "reduced", 120, 0.2, "the killed job, redone")
    lora = by_path(config)[str(folder)]
    variant = active(lora)
    assert [v["kind"] for v in lora["variants"]] == ["original", "reduced"]
    assert variant["serve"] == "vllm" and "vllm" in variant["servers"]
    assert variant["ranks"] == {"min": 8, "max": 8, "modules": 4, "uniform": True}
    assert config_of(folder)["r"] == 8 and not config_of(folder)["rank_pattern"]
    assert_same_strength(folder, expected)
    shown = cli(config, "show", str(folder)).stdout
    assert "adapter folder" in shown and "made for vllm" in shown
    listed = cli(config, "list").stdout
    assert f"{folder}/" in listed and "vllm" in listed
    assert [(j["state"], j["attempts"]) for j in cli_json(config, "show", str(folder))["jobs"]] == [("done", 2)]
    work = tmp / "state" / "work"
    assert [p for p in work.iterdir() if p.is_dir()] == []  # the killed job's folders, cleaned
    assert cli_json(config, "verify")["ok"] is True
