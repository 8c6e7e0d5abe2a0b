"""The policy's quality_check: after a reduction the daemon measures the new variant's effect on the
user's base model (in the reduction process, on the job's device) and activates only a variant that
keeps at least min_effect_retained of the original's effect.

End to end: the real daemon in a subprocess, the real socket and SQLite, the tiny SD1.5 pipeline
(tests/_tiny_models.py) saved with save_pretrained, and the tiny Llama (tests/_serving_models.py)
for PEFT adapter folders. One LoRA under two policies that differ only in their threshold: refused
under one, activated under the other, both with their figures recorded and the reason shown; a LoRA
that fits nothing in the base, and an adapter folder for a diffusers base, leave the original
active with the reason. The config's checks, and the decision's wording, in-process.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lorad.daemon.config import ConfigError, Policy, QualityCheck, parse_config
from lorad.daemon.decision import decide
from tests._daemon_fixtures import REPO, cli_here, cli_json, lorad_env, make_lora, show_if_known, wait_for, write_config
from tests._effect_rig import running_daemon

GATED = """\
  strict:
    method: rank
    param: 2
    min_saving: 0.1
    quality_check: {{base: {sd}, min_effect_retained: 0.99}}
  lenient:
    method: rank
    param: 2
    max_rank: 8
    min_saving: 0.1
    quality_check: {{base: {sd}, min_effect_retained: 0.2, device: cpu}}
  llm:
    method: rank
    param: 2
    max_rank: 4
    min_saving: 0.1
    quality_check: {{base: {llama}, min_effect_retained: -5}}
"""
WATCH = "".join(f"  - path: {{tmp}}/{name}\n    policy: {policy}\n"
                for name, policy in (("strict", "strict"), ("lenient", "lenient"), ("llm", "llm")))  # fmt: skip


def sha256(path: Path) -> str:
    if path.is_dir():
        return sha256(path / "adapter_model.safetensors")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    from tests import _serving_models as sm
    from tests import _tiny_models as tm

    tmp = tmp_path_factory.mktemp("quality_gate")
    tm.tiny_pipeline().save_pretrained(tmp / "sd15")
    sm.tiny_llama().save_pretrained(tmp / "llama")
    lora = tm.write_kohya_lora(tm.trained_pipeline(), tmp / "tiny.safetensors")
    for name in ("strict", "lenient", "llm"):
        (tmp / name).mkdir()
    with running_daemon(tmp, watch_extra=WATCH.format(tmp=tmp),
                        extra_policies=GATED.format(sd=tmp / "sd15", llama=tmp / "llama")) as daemon:  # fmt: skip
        yield SimpleNamespace(tmp=tmp, daemon=daemon, config=daemon.config, lora=lora, sm=sm)


def decided(config: Path, path: Path) -> dict[str, Any] | None:
    """`show --json` of `path` once the policy has decided on a variant of it."""
    shown = show_if_known(config, str(path))
    if shown is None or not any(e["kind"] == "decided" for e in shown["events"]):
        return None
    # Asked again: `show` reads the variants before the events, so the look that found the decision
    # may have read them just before the figures were recorded.
    return cli_json(config, "show", str(path))


def drop(src: Path, dst: Path) -> Path:
    """A copy moved whole into a watched folder (a rename, as a finished download lands)."""
    staging = dst.parent.parent / f".staging-{dst.name}"
    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, staging)
    os.rename(staging, dst)
    return dst


def decision_of(shown: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the decided event's detail, the reduced variant it is about)."""
    [event] = [e for e in shown["events"] if e["kind"] == "decided"]
    variant = next(v for v in shown["variants"] if v["id"] == event["variant"])
    assert variant["kind"] == "reduced"
    return event["detail"], variant


def active_kind(shown: dict[str, Any]) -> str:
    return next(v["kind"] for v in shown["variants"] if v["active"])


def test_the_gate_refuses_below_the_threshold_and_activates_above_with_figures_and_reasons(rig) -> None:
    config = rig.config
    strict = drop(rig.lora, rig.tmp / "strict" / "tiny.safetensors")
    shown = wait_for(lambda: decided(config, strict), 120, 0.2, "the strict policy's decision")
    detail, variant = decision_of(shown)
    effect = detail["effect_retained"]
    assert effect is not None and effect < 0.99  # rank 16 -> 2 loses much of the effect
    passing = math.floor(effect * 10**4) / 10**4
    assert detail["activate"] is False and detail["refused_by"] == "quality_check.min_effect_retained"
    assert detail["would_pass"] == passing
    assert (f"effect_retained {passing:.4f} is below quality_check.min_effect_retained 0.99 (set by "
            f"policies.strict.quality_check.min_effect_retained); a min_effect_retained of {passing:.4f} "
            "or lower would have passed") in detail["reason"]  # fmt: skip
    assert active_kind(shown) == "original" and sha256(strict) == sha256(rig.lora)  # the file untouched
    # The figures are recorded with the variant, as `lorad effect` records them.
    [measured] = shown["effects"]
    assert measured["variant"] == variant["id"] and measured["effect_retained"] == effect
    assert measured["kind"] == "denoiser" and measured["base"] == str(rig.tmp / "sd15")
    assert len(measured["base_sha256"]) == 64 and len(measured["samples"]["prompts"]) == 3
    assert variant["effect_retained"] == effect and variant["effect_retained_min"] <= effect
    assert any(e["kind"] == "measured" and e["actor"] == "policy:strict" for e in shown["events"])
    text = cli_here(config, "show", str(strict))[1]
    assert f"variant {variant['id']}: not activated: effect_retained {passing:.4f} is below" in text
    assert f"effect retained {effect:.4f}" in text

    # Another policy hash (max_rank, which changes nothing here): the same content is reduced again.
    lenient = drop(rig.lora, rig.tmp / "lenient" / "tiny.safetensors")
    shown = wait_for(lambda: decided(config, lenient), 120, 0.2, "the lenient policy's decision")
    detail, variant = decision_of(shown)
    # The same bytes measured again (on the base the reduction process kept loaded): the same figure.
    assert detail["effect_retained"] == effect and detail["activate"] is True and detail["refused_by"] is None
    assert f"effect_retained {passing:.4f} (quality_check.min_effect_retained 0.2)" in detail["reason"]
    assert active_kind(shown) == "reduced" and sha256(lenient) == variant["sha256"]
    assert [m["effect_retained"] for m in shown["effects"]] == [effect]
    listed = next(x for x in cli_json(config, "list") if x["path"] == str(lenient))
    assert next(v for v in listed["variants"] if v["active"])["effect_retained"] == effect
    # The threshold the refusal named really passes.
    relaxed = Policy(name="strict", method="rank", param=2.0, min_saving=0.1,
                     quality_check=QualityCheck(rig.tmp / "sd15", passing))  # fmt: skip
    assert decide(relaxed, 100, 10, None, effect).activate


def test_a_lora_that_fits_nothing_in_the_base_leaves_the_original_with_the_reason(rig) -> None:
    config = rig.config
    misfit = make_lora(rig.tmp / "build" / "misfit.safetensors", seed=4)  # modules the tiny UNet lacks
    path = drop(misfit, rig.tmp / "strict" / "misfit.safetensors")
    folder = drop(rig.sm.write_llama_peft_dir(rig.tmp / "build" / "adapter"), rig.tmp / "strict" / "adapter")
    for where, why in ((path, "does not fit this base model"),
                       (folder, "a PEFT adapter folder, but the base is a diffusers pipeline")):  # fmt: skip
        shown = wait_for(lambda: decided(config, where), 120, 0.2, f"the decision on {where.name}")
        detail, variant = decision_of(shown)
        assert detail["activate"] is False and detail["refused_by"] == "quality_check" and detail["would_pass"] is None
        assert "the quality check could not measure the LoRA's effect on" in detail["reason"]
        assert "(set by policies.strict.quality_check)" in detail["reason"] and why in detail["reason"], detail
        assert active_kind(shown) == "original" and shown["effects"] == [] and variant["effect_retained"] is None
    assert sha256(path) == sha256(misfit)


def test_an_adapter_folder_is_measured_on_a_causal_lm_base(rig) -> None:
    config = rig.config
    # The adapter the strict policy refused above: this policy's hash differs (max_rank), so it is reduced again.
    written = rig.sm.write_llama_peft_dir(rig.tmp / "build" / "llm-adapter")
    path = drop(written, rig.tmp / "llm" / "adapter")
    shown = wait_for(lambda: decided(config, path), 120, 0.2, "the llm policy's decision")
    detail, variant = decision_of(shown)
    [measured] = shown["effects"]
    assert measured["kind"] == "logits" and measured["kl_mean"] is not None and measured["base"] == str(rig.tmp / "llama")
    assert detail["activate"] is True and detail["effect_retained"] == measured["effect_retained"]
    assert active_kind(shown) == "reduced"


def test_a_long_lived_process_keeps_the_base_loaded_until_its_files_change(rig, tmp_path: Path) -> None:
    """What the reduction process does between jobs (lorad.engine.effect.kept), in this process:
    the second measurement on the same base loads nothing and gives the same figure; the pipeline
    goes to the CPU and back; a base file with a new mtime is loaded again; a failure drops it."""
    from lorad.engine.effect import kept, measure_effect
    from lorad.engine.engine import ReduceSettings, reduce_file
    from lorad.errors import LoradError

    base = Path(shutil.copytree(rig.tmp / "sd15", tmp_path / "sd15"))
    other = tmp_path / "rank2.safetensors"
    reduce_file(rig.lora, other, ReduceSettings(method="rank", param=2))
    small = {"prompts": ["a red house"], "seeds": [5], "calls": [0], "height": 32, "width": 32}
    kept.keep_loaded(True)
    try:
        first = measure_effect(rig.lora, other, base, samples=small, device="cpu")
        kept.park_loaded()
        again = measure_effect(rig.lora, other, base, samples=small, device="cpu")
        assert kept.KEPT.loads == 1 and again.per_sample == first.per_sample and first.effect_retained < 1
        os.utime(base / "model_index.json", ns=(1, 1))  # the base changed (as far as anyone can tell)
        changed = measure_effect(rig.lora, other, base, samples=small, device="cpu")
        assert kept.KEPT.loads == 2 and changed.per_sample == first.per_sample
        with pytest.raises(LoradError, match="does not fit this base model"):
            measure_effect(rig.lora, make_lora(tmp_path / "misfit.safetensors"), base, samples=small, device="cpu")
        assert kept.KEPT.pipe is None  # whatever the failure left is not used again
    finally:
        kept.keep_loaded(False)
    assert kept.KEPT.pipe is None


# ---------------------------------------------------------------------------------------------
# The config's checks


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pipeline-shaped folder (model_index.json; nothing loads it here), a single file, and junk."""
    from safetensors.torch import save_file
    import torch

    root = tmp_path_factory.mktemp("gate_config")
    (root / "pipe").mkdir()
    (root / "pipe" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    save_file({"w": torch.zeros(2)}, str(root / "model.safetensors"))
    (root / "notamodel").mkdir()
    (root / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")  # a pickle's first bytes
    return root


def gate_config(root: Path, gate: str) -> str:
    return f"policies:\n  p:\n    method: fro\n    param: 0.9\n    quality_check: {gate}\n"


def test_a_valid_gate_is_parsed_with_paths_resolved(bases: Path) -> None:
    config = parse_config(gate_config(bases, "{base: pipe, min_effect_retained: 0.98}"), "x.yaml", bases)
    assert config.policies["p"].quality_check == QualityCheck(bases / "pipe", 0.98, None, "auto")
    text = gate_config(bases, f"{{base: model.safetensors, config: pipe, min_effect_retained: -0.5, device: cpu}}")
    gate = parse_config(text, "x.yaml", bases).policies["p"].quality_check
    assert gate == QualityCheck(bases / "model.safetensors", -0.5, bases / "pipe", "cpu")
    assert parse_config(gate_config(bases, "off"), "x.yaml", bases).policies["p"].quality_check is None
    # The gate decides activation, not the bytes: a policy's identity stays as it was.
    plain = parse_config(gate_config(bases, "off"), "x.yaml", bases).policies["p"]
    assert plain.hash == parse_config(gate_config(bases, "{base: pipe, min_effect_retained: 1}"), "x.yaml", bases).policies["p"].hash


@pytest.mark.parametrize("gate, why", [
    ("{min_effect_retained: 0.98}", "quality_check: a quality_check needs `base`"),
    ("{base: pipe}", "needs `min_effect_retained`"),
    ("{base: missing, min_effect_retained: 0.98}", "quality_check.base: {root}/missing: base model not found"),
    ("{base: notamodel, min_effect_retained: 0.98}", "not a base model lorad can load"),
    ("{base: model.safetensors, min_effect_retained: 0.98}", "a single-file checkpoint needs `config` FOLDER"),
    ("{base: model.safetensors, config: notamodel, min_effect_retained: 0.98}",
     "quality_check.config: {root}/notamodel: not a diffusers config folder"),
    ("{base: pipe, config: pipe, min_effect_retained: 0.98}", "`config` is for a single-file checkpoint"),
    ("{base: model.ckpt, min_effect_retained: 0.98}", "model.ckpt"),
    ("{base: pipe, min_effect_retained: 1.01}", "min_effect_retained: must be a finite number at most 1"),
    ("{base: pipe, min_effect_retained: .inf}", "at most 1"),
    ("{base: pipe, min_effect_retained: -.inf}", "at most 1"),
    ("{base: pipe, min_effect_retained: .nan}", "expected a number at most 1"),
    ("{base: pipe, min_effect_retained: high}", "expected a number at most 1, got 'high'"),
    ("{base: pipe, min_effect_retained: 0.9, device: gpu}", "quality_check.device: expected one of auto, cpu, cuda"),
    ("{base: pipe, min_effect_retained: 0.9, samples: 3}", "unknown key 'policies.p.quality_check.samples'"),
    ("0.98", "quality_check: expected a mapping"),
])  # fmt: skip
def test_a_gate_that_cannot_work_is_one_clear_error_at_load(bases: Path, gate: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(gate_config(bases, gate), "x.yaml", bases)
    assert why.format(root=bases) in str(err.value) and str(err.value).startswith("x.yaml: line ")


def test_without_the_effect_extra_the_config_says_what_to_install(bases: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        parse_config(gate_config(bases, "{base: pipe, min_effect_retained: 0.98}"), "x.yaml", bases)
    assert "needs diffusers, not installed: pip install 'lorad[effect]'" in str(err.value)


def test_the_daemon_refuses_to_start_with_a_gate_that_cannot_work(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra_policies=f"  gated:\n    method: rank\n    param: 2\n"
                                                   f"    quality_check: {{base: {tmp_path / 'nowhere'}, min_effect_retained: 0.98}}\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "lorad", "daemon", "--config", str(config)], capture_output=True,
                          text=True, timeout=60, cwd=str(REPO), env=lorad_env())  # fmt: skip
    assert done.returncode != 0
    assert f"policies.gated.quality_check.base: {tmp_path / 'nowhere'}: base model not found" in done.stderr + done.stdout
    assert not (tmp_path / "run" / "lorad.sock").exists()


# ---------------------------------------------------------------------------------------------
# The decision's wording


def gated(minimum: float, activate: str = "auto") -> Policy:
    return Policy(name="p", method="rank", param=2, min_saving=0.1, activate=activate,
                  quality_check=QualityCheck(Path("/models/sd15"), minimum))  # fmt: skip


def test_the_decision_names_the_figure_the_setting_and_what_would_pass() -> None:
    d = decide(gated(0.98), 1000, 500, 0.97, 0.95349)
    assert not d.activate and (d.refused_by, d.would_pass, d.effect_retained) == ("quality_check.min_effect_retained", 0.9534, 0.95349)
    assert d.reason == ("effect_retained 0.9534 is below quality_check.min_effect_retained 0.98 (set by "
                        "policies.p.quality_check.min_effect_retained); a min_effect_retained of 0.9534 or lower "
                        "would have passed")  # fmt: skip
    assert decide(gated(d.would_pass), 1000, 500, 0.97, 0.95349).activate
    assert d.to_json()["effect_retained"] == 0.95349
    ok = decide(gated(0.98), 1000, 500, 0.97, 0.99)
    assert ok.activate and ok.reason.endswith("effect_retained 0.9900 (quality_check.min_effect_retained 0.98)")
    manual = decide(gated(0.98, "manual"), 1000, 500, 0.97, 0.99)
    assert not manual.activate and manual.refused_by == "activate" and "effect_retained 0.9900" in manual.reason
    negative = decide(gated(0.5), 1000, 500, None, -0.25)
    assert not negative.activate and negative.would_pass == -0.25
    # min_saving is told first: a variant that saves too little needs no effect figure to be refused.
    assert decide(gated(0.98), 1000, 990, 0.97, None).refused_by == "min_saving"
    # No figure under a gate: never activated unchecked.
    missing = decide(gated(0.98), 1000, 500, 0.97, None, "/models/sd15: base model not found")
    assert not missing.activate and (missing.refused_by, missing.would_pass) == ("quality_check", None)
    assert missing.reason.endswith("(set by policies.p.quality_check): /models/sd15: base model not found")
    assert "effect_retained" not in decide(Policy(name="p", method="rank", param=2), 1000, 500, 0.97).to_json()
