"""Issue 7: one test per defect lorad 0.1 had with the LoRAs of a real 2026 folder.

Each test builds the file the defect was seen on (tests/_layouts.py), reduces it with the real
engine (or the `lorad reduce` CLI), and checks the result with independent readers
(tests/_readers.py) and, where one exists, the real loader (diffusers, PEFT).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorad.engine.engine import ReduceSettings, reduce_file
from tests import _layouts as L
from tests import _readers as R
from tests.test_layouts import TOL, diffusers_problems, strength_problems

os.environ["HF_HUB_OFFLINE"] = "1"

FRO = ReduceSettings(method="fro", param=0.9)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is as fast, and immune to OpenMP spin-waits on a busy shared machine
    (two threads there made some builds 30x slower). The previous setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def _truncation_at_input_strength(src: Path, out: Path, reading, dtype: torch.dtype) -> list[str]:
    """Each module of `out`, read by `reading`, is the best rank-k truncation of `src`'s INTENDED delta."""
    want, got = R.intended_deltas(src), reading(out)
    problems = [f"modules differ: {sorted(set(want) ^ set(got))[:4]}"] if set(want) != set(got) else []
    out_file = R.open_file(out)
    mods = R.plain_modules(out_file)
    for name in sorted(set(want) & set(got)):
        k = R.rank_of(out_file, mods[name])
        best, _ = R.svd_truncate(want[name], k)
        off = float((got[name] - best).norm() / want[name].norm())
        if off > TOL[dtype]:
            problems.append(f"{name}: {off:.3g} away from the rank-{k} truncation at the input's strength "
                            f"(read at {float(got[name].norm() / best.norm()):.4g}x)")
    return problems


def _fail(problems: list[str], what: str) -> None:
    assert not problems, what + ":\n" + "\n".join(problems[:10])


# ---------------------------------------------------------------------------------------------
# 1. fal's Kontext single file (base_model.model. keys, no adapter_config.json)


def test_1_fal_kontext_single_file_is_read_as_a_single_file(tmp_path: Path) -> None:
    """lorad 0.1 took it for a PEFT folder and folded a scale into up that no loader undoes (the file
    then loaded at about k/r of its strength). Every loader reads it at scale 1: so must the output."""
    built = L.fal_kontext(tmp_path)
    assert not (tmp_path / R.PEFT_CONFIG).exists()
    out = tmp_path / "fal.fro0.9.safetensors"
    report = reduce_file(built.path, out, FRO)
    assert out.is_file() and not (tmp_path / "fal.fro0.9").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([built.path.name, out.name]), "side files written"
    assert {m.rank_out for m in report.modules} != {m.rank_in for m in report.modules}, "nothing was reduced"
    assert set(R.scales(built.path)[built.reduced[0]].values()) == {1.0}  # the input: scale 1 everywhere
    _fail(_truncation_at_input_strength(built.path, out, R.tensor_only_deltas, torch.bfloat16),
          "ComfyUI reads the reduced fal file at another strength")
    _fail(strength_problems(out), "loaders disagree on the reduced fal file")
    _fail(diffusers_problems("FluxKontextPipeline", built.path, out, torch.bfloat16),
          "FluxKontextPipeline reads the reduced fal file wrongly")
    assert not any(k.endswith(".alpha") for k in R.open_file(out).tensors), "alpha keys added to a file without"


# ---------------------------------------------------------------------------------------------
# 2. PEFT folders: every module, reduced or passed through, at its right rank and scale


def _peft_layer_deltas(model) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {path: layer.get_delta_weight("default").detach().to(torch.float64)
            for path, layer in model.named_modules() if isinstance(layer, LoraLayer)}  # fmt: skip


def _peft_problems(built: L.Built, out: Path, report) -> list[str]:
    """Load `out` with PeftModel.from_pretrained into a fresh tiny Llama; each LoRA layer (the
    embedding's included) must add the reduced file's intended delta, which is the best truncation of
    the original's (or, for a module passed through, the original's itself)."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(L.tiny_llama(seed=1), str(out))
    except Exception as e:  # noqa: BLE001 - a size mismatch is the defect's first symptom
        return [f"PeftModel.from_pretrained raised {type(e).__name__}: {str(e)[:300]}"]
    loaded = _peft_layer_deltas(model)
    meant = R.intended_deltas(out)
    if not set(loaded) == set(meant) == set(built.reduced) | set(built.passed):
        return [f"PEFT built other LoRA layers than the file has: {sorted(set(loaded) ^ set(meant))[:4]}"]
    original = R.intended_deltas(built.path)
    claims = {m.name: m for m in report.modules}
    problems = []
    for name, got in loaded.items():
        if R.rel(got, meant[name]) > 1e-6:
            problems.append(f"{name}: PEFT loads {R.rel(got, meant[name]):.3g} off the file's own reading "
                            f"({float(got.norm() / meant[name].norm()):.4g}x)")
        if claims[name].skipped is not None:  # passed through: exactly as before
            ok = R.rel(got, original[name]) < 1e-6
        else:
            ok = R.rel(got, R.svd_truncate(original[name], claims[name].rank_out)[0]) < 1e-5
        if not ok:
            problems.append(f"{name}: loads {float(got.norm() / original[name].norm()):.4g}x the original's "
                            f"norm; not {'the original' if claims[name].skipped else 'its best truncation'}")
    embed = "base_model.model.model.embed_tokens"
    if embed not in loaded or loaded[embed].shape != (64, 32):
        problems.append("the embedding LoRA is not loaded as one")
    lm_head = model.base_model.model.lm_head
    saved = R.open_file(built.path).tensors["base_model.model.lm_head.weight"]
    kept = getattr(lm_head, "modules_to_save", {"default": lm_head})["default"].weight
    if not torch.equal(kept.detach(), saved):
        problems.append("modules_to_save (lm_head) not kept")
    return problems


@pytest.mark.parametrize("builder", [L.peft_llm, L.peft_llm_rslora], ids=["patterns", "rslora"])
def test_2_peft_folder_loads_in_peft_at_the_intended_strength(tmp_path: Path, builder) -> None:
    """lorad 0.1 rebuilt adapter_config.json from the reduced modules only: modules it passed through
    (embedding LoRAs, DoRA, ...) lost their rank_pattern/alpha_pattern entries, and
    PeftModel.from_pretrained failed (size mismatch) or loaded them at another scale."""
    built = builder(tmp_path)
    out = tmp_path / f"{built.path.name}.fro0.9"
    report = reduce_file(built.path, out, FRO)
    config = json.loads((out / R.PEFT_CONFIG).read_text())
    source = json.loads((built.path / R.PEFT_CONFIG).read_text())
    assert config["modules_to_save"] == ["lm_head"] and config["target_modules"] == source["target_modules"]
    _fail(_peft_problems(built, out, report), "PeftModel.from_pretrained loads the reduced folder wrongly")


def test_2_the_check_catches_wrong_pattern_entries(tmp_path: Path) -> None:
    """Negative control: lorad's output with the embedding's config entries wrong (a stale rank, as
    when a module's tensors and its config entry disagree; an alpha that is not the one its up was
    folded for): a size mismatch, then a scale off, each named."""
    built = L.peft_llm(tmp_path)
    out = tmp_path / "peft.fro0.9"
    report = reduce_file(built.path, out, FRO)
    assert _peft_problems(built, out, report) == []
    config_path = out / R.PEFT_CONFIG
    good = json.loads(config_path.read_text())
    embed = next(m for m in report.modules if m.name.endswith("embed_tokens"))
    stale_rank = dict(good, rank_pattern={"embed_tokens": embed.rank_out + 1, **good["rank_pattern"]})
    config_path.write_text(json.dumps(stale_rank))
    found = _peft_problems(built, out, report)
    assert len(found) == 1 and "size mismatch" in found[0], found
    other_alpha = dict(good, alpha_pattern={"embed_tokens": 2 * good["lora_alpha"], **good["alpha_pattern"]})
    config_path.write_text(json.dumps(other_alpha))
    found = _peft_problems(built, out, report)
    assert found and all("embed_tokens" in p for p in found), found


# ---------------------------------------------------------------------------------------------
# 3. DiffSynth-Studio `X.lora_A.default.weight` and Mochi bare `X.lora_A` / `X.lora_B`


@pytest.mark.parametrize("builder", [L.diffsynth_qwen, L.mochi], ids=["diffsynth", "mochi"])
def test_3_adapter_named_and_bare_keys_are_loras(tmp_path: Path, builder) -> None:
    """lorad 0.1 refused both with "no LoRA modules found"."""
    built = builder(tmp_path)
    out = tmp_path / "out.safetensors"
    report = reduce_file(built.path, out, FRO)
    assert {m.name for m in report.modules} == set(built.reduced), \
        f"module names not as the file spells them: {[m.name for m in report.modules][:3]}"
    assert all(m.skipped is None for m in report.modules)
    assert len({m.rank_out for m in report.modules}) > 1
    assert list(R.open_file(out).tensors) == list(R.open_file(built.path).tensors)  # same spelling
    _fail(_truncation_at_input_strength(built.path, out, R.tensor_only_deltas, torch.bfloat16),
          "the reduced file is not the truncation at the input's strength")
    _fail(strength_problems(out), "loaders disagree on the output")


# ---------------------------------------------------------------------------------------------
# 4. safetensors files whose header length looks like a pickle's magic


_CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_4_header_lengths_640_896_1152_1408_are_safetensors_and_pickles_are_not(tmp_path: Path) -> None:
    """A header of 0x280/0x380/0x480/0x580 bytes makes a file start 80 02..80 05, the pickle protocol
    magic: lorad 0.1 refused such valid files as pickles. `lorad reduce FILE -o OUT --json` for the
    640-byte one, one `lorad reduce A B C -o DIR --json` for the others; a real pickle is still
    refused (exit 2, one line naming pickle). Three processes side by side: each CLI start costs
    seconds."""
    built = {}
    for n in (640, 896, 1152, 1408):
        built[n] = L.kohya_with_header_length(tmp_path / f"h{n}.safetensors", n)
        head = built[n].path.read_bytes()[:9]
        assert head[:2] == bytes([0x80, n >> 8]) and head[8:9] == b"{", head
    evil = tmp_path / "evil.safetensors"
    with open(evil, "wb") as f:
        pickle.dump({"lora_unet_x.lora_down.weight": [[1.0]]}, f, protocol=2)
    assert evil.read_bytes()[:2] == b"\x80\x02"
    single, outdir, evil_out = tmp_path / "h640.out.safetensors", tmp_path / "out", tmp_path / "evil.out.safetensors"
    commands = {
        "single": [str(built[640].path), "-o", str(single)],
        "batch": [str(built[n].path) for n in (896, 1152, 1408)] + ["-o", str(outdir)],
        "pickle": [str(evil), "-o", str(evil_out)],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "lorad", "reduce", *args, "--json"], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_CLI_ENV)
             for name, args in commands.items()}  # fmt: skip
    done = {name: (*proc.communicate(timeout=180), proc.returncode) for name, proc in procs.items()}
    for name in ("single", "batch"):
        stdout, stderr, code = done[name]
        assert code == 0, f"{name}: exit {code}: {stderr.strip()[-500:]}"
    assert json.loads(done["single"][0])["output"]["path"] == str(single)
    outputs = {640: single, **{n: outdir / f"h{n}.safetensors" for n in (896, 1152, 1408)}}
    for n, out in outputs.items():
        assert out.is_file(), f"header {n}: no output at {out}"
        _fail(_truncation_at_input_strength(built[n].path, out, R.tensor_only_deltas, torch.float16), f"header {n}")
    _, stderr, code = done["pickle"]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, stderr)
    assert len(lines) == 1 and "pickle" in lines[0].lower(), lines
    assert not evil_out.exists()


# ---------------------------------------------------------------------------------------------
# 5. diffusers-style outputs read by ComfyUI (tensors only) at rank_out / r of their strength


@pytest.mark.parametrize("builder", [L.diffusers_sdxl, L.diffusers_sd3, L.aitoolkit_flux],
                         ids=["sdxl-metadata", "sd3-metadata", "aitoolkit-no-metadata"])  # fmt: skip
def test_5_diffusers_outputs_read_the_same_without_metadata(tmp_path: Path, builder) -> None:
    """lorad 0.1 folded rank/r into lora_B and relied on metadata to undo it: tensor-only loaders read
    the output at rank_out/r. The tensor-only reading must equal the metadata reading and the
    intended truncation."""
    built = builder(tmp_path)
    out = tmp_path / "out.safetensors"
    reduce_file(built.path, out, FRO)
    src = R.open_file(built.path)
    dtype = src.tensors[R.plain_modules(src)[built.reduced[0]].keys["up"]].dtype
    for reading in (R.tensor_only_deltas, R.metadata_deltas, R.intended_deltas):
        _fail(_truncation_at_input_strength(built.path, out, reading, dtype), f"{reading.__name__} of the output")


# ---------------------------------------------------------------------------------------------
# 6. legacy diffusers files (X.lora.down.weight + lora_adapter_metadata, lora_alpha != r)


def _pipeline_deltas(pipe) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for comp in ("unet", "text_encoder"):
        for path, layer in getattr(pipe, comp).named_modules():
            if isinstance(layer, LoraLayer):
                for adapter in layer.active_adapters:
                    out[f"{comp}.{path.removeprefix('text_model.')}"] = \
                        layer.get_delta_weight(adapter).detach().to(torch.float64)
    return out


def test_6_legacy_diffusers_file_keeps_its_metadata_strength(tmp_path: Path) -> None:
    """lorad 0.1 ignored the metadata's lora_alpha of legacy-keyed files. The reduced file must load in
    diffusers at the ORIGINAL's strength, truncated: through lora_state_dict and load_lora_weights."""
    from tests import _tiny_models as tm

    built = L.diffusers_legacy_sd15(tmp_path)
    out = tmp_path / "legacy.fro0.9.safetensors"
    reduce_file(built.path, out, FRO)
    _fail(diffusers_problems("StableDiffusionPipeline", built.path, out, torch.float32),
          "StableDiffusionPipeline.lora_state_dict reads the reduced legacy file wrongly")
    meant_in = R.intended_deltas(built.path)
    ranks = {n: R.rank_of(R.open_file(out), m) for n, m in R.plain_modules(R.open_file(out)).items()}
    problems = []
    for path, label in ((built.path, "original"), (out, "reduced")):
        pipe = tm.tiny_pipeline()
        try:
            pipe.load_lora_weights(str(path))
        except Exception as e:  # noqa: BLE001 - name the file and the loader's own message
            metadata = R.open_file(path).diffusers_configs
            problems.append(f"{label}: load_lora_weights raised {type(e).__name__}: {str(e)[:300]} "
                            f"(its lora_adapter_metadata: {json.dumps(metadata)[:400]})")
            continue
        loaded = _pipeline_deltas(pipe)
        for name, want in meant_in.items():
            key = f"{R.component(name)}.{R.config_path(name).removeprefix('text_model.')}"
            if key not in loaded:
                problems.append(f"{label}: {name} not loaded (loaded: {sorted(loaded)[:3]})")
                continue
            target = want if label == "original" else R.svd_truncate(want, ranks[name])[0]
            got = loaded[key].reshape(target.shape)
            if R.rel(got, target) > 1e-5:
                problems.append(f"{label}: {name} loads at {float(got.norm() / target.norm()):.4g}x "
                                f"({R.rel(got, target):.3g} off)")
    _fail(problems, "load_lora_weights on the tiny SD pipeline")
