"""Every format round-trips: read -> reduce at full rank -> the same dW (to 1e-5), in its own format."""

import json

import pytest
import torch
from safetensors import safe_open

from lorad.engine.engine import ReduceSettings, reduce_file
from lorad.engine.formats.lora import open_lora
from lorad.engine.formats.safetensors_file import file_data_sha256, read_header
from tests import lora_factory as lf

FULL = ReduceSettings("rank", 10_000)

BUILDERS = {
    "kohya-sd15": (lambda p: lf.kohya_file(p / "k.safetensors"), "kohya"),
    "kohya-sdxl": (lambda p: lf.kohya_file(p / "x.safetensors", lf.SDXL_KOHYA), "kohya"),
    "kohya-flux": (lambda p: lf.kohya_file(p / "f.safetensors", lf.FLUX_KOHYA), "kohya-flux"),
    "kohya-no-alpha": (lambda p: lf.kohya_file(p / "n.safetensors", alpha=None), "kohya"),
    "diffusers-meta": (lambda p: lf.diffusers_file(p / "d.safetensors"), "diffusers"),
    "diffusers-nometa": (lambda p: lf.diffusers_file(p / "d.safetensors", with_metadata=False), "diffusers"),
    "diffusers-alpha-keys": (lambda p: lf.diffusers_file(p / "d.safetensors", False, alpha_keys=True), "diffusers"),
    "diffusers-legacy": (lambda p: lf.diffusers_legacy_file(p / "l.safetensors"), "diffusers-legacy"),
    "aitoolkit-flux": (lambda p: lf.aitoolkit_flux_file(p / "a.safetensors"), "diffusers"),
    "xlabs-flux": (lambda p: lf.xlabs_file(p / "x.safetensors"), "xlabs"),
    "peft-dir": (lambda p: lf.peft_dir(p / "adapter"), "peft"),
    "peft-dir-rslora": (lambda p: lf.peft_dir(p / "adapter", rslora=True), "peft"),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_full_rank_round_trip_keeps_every_delta(tmp_path, name):
    build, fmt = BUILDERS[name]
    src = build(tmp_path)
    report = reduce_file(src, tmp_path / "out", FULL) if src.is_dir() else reduce_file(
        src, tmp_path / "out.safetensors", FULL)
    assert report.input.format == fmt
    before, after = lf.effective_deltas(src), lf.effective_deltas(report.output.path)
    assert set(before) == set(after) and before
    for module, dw in before.items():
        assert lf.rel_diff(dw, after[module]) < 1e-5, module
    # Keys keep their names and style: nothing renamed, nothing converted.
    assert open_lora(report.output.path).format == fmt
    for m in report.modules:
        assert m.rank_out == m.rank_in


def _keys(path):
    return set(read_header(path).tensors)


def test_keys_are_kept_and_kohya_alpha_is_one_constant(tmp_path):
    src = lf.kohya_file(tmp_path / "k.safetensors", lf.SD15_KOHYA)
    out = reduce_file(src, tmp_path / "o.safetensors", ReduceSettings("fro", 0.9)).output.path
    assert _keys(out) == _keys(src)
    with safe_open(out, "pt") as f:
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
        ranks = {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith(".lora_down.weight")}
    assert len(alphas) == 1, "per-module alphas are mis-read by diffusers"
    assert len(ranks) > 1, "the fixture should give per-module ranks"


def test_kohya_without_alpha_gets_constant_alpha_keys(tmp_path):
    src = lf.kohya_file(tmp_path / "k.safetensors", alpha=None)
    out = reduce_file(src, tmp_path / "o.safetensors", ReduceSettings("fro", 0.8)).output.path
    with safe_open(out, "pt") as f:
        alphas = [float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")]
    assert len(alphas) == len(lf.SD15_KOHYA) and len(set(alphas)) == 1


def test_metadata_is_recomputed_never_stale(tmp_path):
    src = lf.kohya_file(tmp_path / "k.safetensors")
    report = reduce_file(src, tmp_path / "o.safetensors", ReduceSettings("fro", 0.9))
    meta = read_header(report.output.path).metadata
    assert meta["sshs_model_hash"] == file_data_sha256(report.output.path)
    assert meta["sshs_legacy_hash"] != "stale000" and len(meta["sshs_legacy_hash"]) == 8
    assert meta["ss_network_dim"] == "Dynamic"
    assert float(meta["ss_network_alpha"]) > 0
    assert meta["ss_output_name"] == "test"  # user metadata kept
    assert meta["lorad.source_sha256"] == report.input.sha256
    assert meta["lorad.method"] == "fro" and meta["lorad.param"] == "0.9" and meta["lorad.version"]


def test_diffusers_metadata_is_minimal_and_matches_the_tensors(tmp_path):
    src = lf.diffusers_file(tmp_path / "d.safetensors")
    out = reduce_file(src, tmp_path / "o.safetensors", ReduceSettings("fro", 0.85)).output.path
    cfg = json.loads(read_header(out).metadata["lora_adapter_metadata"])
    fields = {k.partition(".")[2] for k in cfg}
    assert fields == {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern"}
    with safe_open(out, "pt") as f:
        for key in f.keys():
            if key.endswith(".lora_A.weight"):
                prefix, _, path = key[: -len(".lora_A.weight")].partition(".")
                want = cfg[f"{prefix}.rank_pattern"].get(path, cfg[f"{prefix}.r"])
                assert f.get_tensor(key).shape[0] == want, key


def test_peft_dir_writes_rank_pattern_and_keeps_side_files(tmp_path):
    src = lf.peft_dir(tmp_path / "adapter")
    report = reduce_file(src, None, ReduceSettings("rank", 3))
    out = tmp_path / "adapter.rank3"
    assert report.output.path == str(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert cfg["target_modules"] == ["q", "v"]
    assert (out / "README.md").read_text() == "model card\n"


def test_lycoris_modules_pass_through_bit_for_bit_with_reasons(tmp_path):
    src = lf.lycoris_mixed_file(tmp_path / "m.safetensors")
    report = reduce_file(src, tmp_path / "o.safetensors", ReduceSettings("rank", 4))
    kinds = {m.name: (m.kind, m.skipped) for m in report.modules}
    assert kinds["lora_unet_a_to_q"] == ("linear", None)
    for name, kind in [("lora_unet_b_to_k", "loha"), ("lora_unet_c_ff", "lokr"),
                       ("lora_unet_d_conv", "tucker"), ("lora_unet_e_to_v", "dora")]:
        assert kinds[name][0] == kind and kinds[name][1], name
    src_h, out_h = read_header(src), read_header(report.output.path)
    with safe_open(src, "pt") as a, safe_open(report.output.path, "pt") as b:
        for key in src_h.tensors:
            if not key.startswith("lora_unet_a_to_q"):
                assert out_h.tensors[key].dtype == src_h.tensors[key].dtype
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_fp16_input_gives_fp16_output_unless_dtype_says_otherwise(tmp_path):
    src = lf.kohya_file(tmp_path / "h.safetensors", dtype=torch.float16)
    out = reduce_file(src, tmp_path / "o.safetensors", ReduceSettings("rank", 4)).output.path
    assert {e.dtype for k, e in read_header(out).tensors.items() if "weight" in k} == {"F16"}
    out32 = reduce_file(src, tmp_path / "o32.safetensors", ReduceSettings("rank", 4, dtype="fp32")).output.path
    assert {e.dtype for k, e in read_header(out32).tensors.items() if "weight" in k} == {"F32"}


def test_convert_lycoris_rebuilds_loha_and_lokr_as_plain_lora(tmp_path):
    from safetensors.torch import load_file

    from lorad.engine.reduce.lycoris import loha_delta, lokr_delta

    src = lf.lycoris_mixed_file(tmp_path / "m.safetensors")
    t = load_file(str(src))
    loha = loha_delta(t["lora_unet_b_to_k.hada_w1_a"], t["lora_unet_b_to_k.hada_w1_b"],
                      t["lora_unet_b_to_k.hada_w2_a"], t["lora_unet_b_to_k.hada_w2_b"], 4.0)
    lokr = lokr_delta({"lokr_w1": t["lora_unet_c_ff.lokr_w1"], "lokr_w2": t["lora_unet_c_ff.lokr_w2"]}, None)
    report = reduce_file(src, tmp_path / "o.safetensors", ReduceSettings("fro", 0.999, convert_lycoris=True))
    kinds = {m.name: m for m in report.modules}
    assert kinds["lora_unet_b_to_k"].kind == "loha->lora" and kinds["lora_unet_b_to_k"].skipped is None
    assert kinds["lora_unet_c_ff"].kind == "lokr->lora"
    assert kinds["lora_unet_d_conv"].skipped and kinds["lora_unet_e_to_v"].skipped  # Tucker, DoRA stay
    keys = _keys(report.output.path)
    assert not any("hada_" in k or "lokr_" in k for k in keys)
    after = lf.effective_deltas(report.output.path)
    assert lf.rel_diff(loha.double(), after["lora_unet_b_to_k"]) == pytest.approx(
        kinds["lora_unet_b_to_k"].rel_error, abs=1e-4)
    assert lf.rel_diff(loha.double(), after["lora_unet_b_to_k"]) < 0.05
    assert lf.rel_diff(lokr.double(), after["lora_unet_c_ff"]) < 0.05
    with safe_open(report.output.path, "pt") as f:
        assert len({float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}) == 1


def test_dtype_override_applies_to_alpha_too(tmp_path):
    src = lf.kohya_file(tmp_path / "k.safetensors", dtype=torch.float32)
    out = reduce_file(src, tmp_path / "o.safetensors", ReduceSettings("fro", 0.9, dtype="fp16")).output.path
    assert {e.dtype for e in read_header(out).tensors.values()} == {"F16"}
