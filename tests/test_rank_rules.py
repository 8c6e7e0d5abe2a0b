"""Rank rules for serving hosts: each gives the ranks its definition asks for, on real files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from lorad.engine.engine import ReduceSettings, plan_file, reduce_file
from lorad.engine.reduce.rank_rules import VLLM_RANKS, RankRule, rule_for, servers_met
from lorad.errors import ReduceError
from tests import lora_factory as lf

# Mixed shapes and ranks, with planted spectra that make `fro 0.9` ask for mixed ranks.
SPECS = [
    ("lora_unet_a_attn1_to_q", 96, 64, 32, ()),
    ("lora_unet_a_attn1_to_k", 96, 64, 32, ()),
    ("lora_unet_b_ff_net_0_proj", 128, 64, 24, ()),
    ("lora_unet_c_proj_in", 64, 64, 6, ()),  # fewer directions than any multiple of 16
    ("lora_te_q_proj", 48, 48, 12, ()),
]


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lf.kohya_file(tmp_path_factory.mktemp("rules") / "mixed.safetensors", SPECS, seed=11)


def _wanted(lora: Path, **kw: object) -> dict[str, int]:
    """What the method alone asks for, module by module (capped by max_rank like the rule's input)."""
    return {m.name: m.rank_out for m in plan_file(lora, ReduceSettings("fro", 0.97, **kw)).modules}


def _ranks_in_file(path: Path) -> dict[str, int]:
    with safe_open(str(path), "pt") as f:
        return {k.removesuffix(".lora_down.weight"): f.get_slice(k).get_shape()[0]
                for k in f.keys() if k.endswith(".lora_down.weight")}


def test_rank_multiple_rounds_up_and_keeps_what_a_small_module_has(lora: Path, tmp_path: Path) -> None:
    wanted = _wanted(lora)
    rank_in = {name: r for name, _o, _i, r, _k in SPECS}
    report = reduce_file(lora, tmp_path / "m8.safetensors", ReduceSettings("fro", 0.97, rank_multiple=8))
    written = _ranks_in_file(tmp_path / "m8.safetensors")
    for m in report.modules:
        expected = min(math.ceil(wanted[m.name] / 8) * 8, rank_in[m.name])
        assert m.rank_out == written[m.name] == expected, m.name
        assert m.fro_retained >= 0.97 - 1e-9
    assert written["lora_unet_c_proj_in"] == 6  # below the multiple: kept whole, no padding


def test_uniform_is_the_smallest_rank_that_meets_the_rule_everywhere(lora: Path, tmp_path: Path) -> None:
    wanted = _wanted(lora)
    out = tmp_path / "u.safetensors"
    report = reduce_file(lora, out, ReduceSettings("fro", 0.97, uniform=True))
    assert set(_ranks_in_file(out).values()) == {max(wanted.values())}
    assert all(m.fro_retained >= 0.97 - 1e-9 for m in report.modules)
    assert max(wanted.values()) > 8 > 6, "the planted spectra must make the cap and the padding matter"
    capped = reduce_file(lora, tmp_path / "uc.safetensors", ReduceSettings("fro", 0.97, uniform=True, max_rank=8))
    assert {m.rank_out for m in capped.modules} == {8}
    # the 6-direction module is padded with zero directions: its update is unchanged
    before, after = lf.effective_deltas(lora), lf.effective_deltas(tmp_path / "uc.safetensors")
    assert lf.rel_diff(before["lora_unet_c_proj_in"], after["lora_unet_c_proj_in"]) < 1e-6


def test_serve_vllm_one_accepted_rank(lora: Path, tmp_path: Path) -> None:
    wanted = _wanted(lora)
    out = tmp_path / "v.safetensors"
    reduce_file(lora, out, ReduceSettings("fro", 0.97, serve="vllm"))
    expected = min(r for r in VLLM_RANKS if r >= max(wanted.values()))
    assert set(_ranks_in_file(out).values()) == {expected}
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["lorad.serve"] == "vllm" and "uniform" in meta["lorad.rank_rule"]
    # never above max_rank: then the largest accepted value under it
    capped = reduce_file(lora, tmp_path / "vc.safetensors", ReduceSettings("fro", 0.97, serve="vllm", max_rank=12))
    assert {m.rank_out for m in capped.modules} == {8}


def test_serve_lorax_eight_or_multiples_of_sixteen_padded(lora: Path, tmp_path: Path) -> None:
    wanted = _wanted(lora)
    out = tmp_path / "l.safetensors"
    reduce_file(lora, out, ReduceSettings("fro", 0.97, serve="lorax"))
    for name, rank in _ranks_in_file(out).items():
        k = wanted[name]
        assert rank == (8 if k <= 8 else math.ceil(k / 16) * 16), name
    assert servers_met(_ranks_in_file(out).values()) and "lorax" in servers_met(_ranks_in_file(out).values())


def test_serve_diffusers_hotswap_needs_the_target_rank(lora: Path, tmp_path: Path) -> None:
    with pytest.raises(ReduceError, match="target_rank"):
        reduce_file(lora, tmp_path / "h.safetensors", ReduceSettings("fro", 0.97, serve="diffusers-hotswap"))
    report = reduce_file(lora, tmp_path / "h.safetensors",
                         ReduceSettings("fro", 0.97, serve="diffusers-hotswap", max_rank=16))
    ranks = {m.rank_out for m in report.modules}
    assert len(ranks) == 1 and ranks.pop() <= 16


def test_budget_with_rank_multiple_allocates_in_steps_and_meets_its_target(lora: Path, tmp_path: Path) -> None:
    size = lora.stat().st_size
    target_mb = size * 0.6 / (1 << 20)
    out = tmp_path / "b.safetensors"
    report = reduce_file(lora, out, ReduceSettings("budget", budget_mb=target_mb, rank_multiple=8))
    assert out.stat().st_size <= target_mb * (1 << 20)
    rank_in = {name: r for name, _o, _i, r, _k in SPECS}
    for m in report.modules:
        assert m.rank_out % 8 == 0 or m.rank_out == rank_in[m.name], (m.name, m.rank_out)
    plain = reduce_file(lora, tmp_path / "p.safetensors", ReduceSettings("budget", budget_mb=target_mb))
    assert any(m.rank_out % 8 for m in plain.modules), "without the rule the budget picks other ranks"


def test_rules_unit() -> None:
    lorax = rule_for("lorax")
    assert [lorax.per_module(k, 64, None) for k in (1, 8, 9, 16, 17, 40)] == [8, 8, 16, 16, 32, 48]
    assert lorax.per_module(40, 64, 32) == 32  # capped: the largest allowed value under max_rank
    assert RankRule(multiple=16).per_module(20, 24, None) == 24  # would need padding: keeps all it has
    vllm = rule_for("vllm")
    assert vllm.one_rank([3, 9], None) == 16 and vllm.one_rank([3, 9], 12) == 8
    assert servers_met([16, 16]) == ["vllm", "lorax", "diffusers-hotswap"]
    assert servers_met([16, 32]) == ["lorax"] and servers_met([12, 12]) == ["diffusers-hotswap"]
    with pytest.raises(ReduceError, match="unknown server"):
        rule_for("triton")


def test_cli_flags(lora: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.safetensors"
    done = subprocess.run([sys.executable, "-m", "lorad", "reduce", str(lora), "-o", str(out), "--method", "fro",
                           "--param", "0.97", "--serve", "vllm", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert len({m["rank_out"] for m in doc["modules"]}) == 1 and doc["modules"][0]["rank_out"] in VLLM_RANKS
    bad = subprocess.run([sys.executable, "-m", "lorad", "reduce", str(lora), "--serve", "diffusers-hotswap"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "target_rank" in bad.stderr and bad.stderr.count("\n") == 1
