"""`lorad effect`: the LoRA's effect on a real (tiny) base model, original against another file.

The tiny SD1.5 pipeline (tests/_tiny_models.py) is saved with save_pretrained and loaded back by
lorad through diffusers, with real LoRA files (diffusers' own save_lora_weights, kohya keys); the
tiny Llama (tests/_serving_models.py) likewise, with PEFT adapter folders. The figure for a variant
with one module dropped is computed a second way here: the file's deltas merged into the weights by
hand (tm.file_deltas, the format rules, no loader) and the UNet called directly on the base run's
latents, timesteps and text embeddings, with the formula written out again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from lorad.cli.cli import main
from lorad.engine.effect import EffectResult, measure_effect
from lorad.engine.effect.measure import effect_retained, kl_mean
from lorad.engine.engine import ReduceSettings, reduce_file
from lorad.errors import LoradError
from tests import _serving_models as sm
from tests import _tiny_models as tm

# Two prompts, two calls at 32x32 pixels: the tests that need no particular sample set run cheaply.
SMALL = {"prompts": ["a red house", "a blue car"], "seeds": [5, 6], "calls": [0, 2], "height": 32, "width": 32}


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The saved tiny pipeline and one planted LoRA written as a diffusers file and a kohya file."""
    root = tmp_path_factory.mktemp("effect_sd")
    tm.tiny_pipeline().save_pretrained(root / "base")
    trained = tm.trained_pipeline()
    return SimpleNamespace(root=root, base=root / "base", diffusers=tm.write_diffusers_lora(trained, root),
                           kohya=tm.write_kohya_lora(trained, root / "kohya.safetensors"))  # fmt: skip


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("effect_llm")
    sm.tiny_llama().save_pretrained(root / "base")
    adapter = sm.write_llama_peft_dir(root / "adapter")
    return SimpleNamespace(root=root, base=root / "base", adapter=adapter)


def _copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Denoiser


def test_an_identical_copy_keeps_the_whole_effect(sd):
    other = _copy(sd.kohya, sd.root / "kohya_copy.safetensors")
    result = measure_effect(sd.kohya, other, sd.base)
    assert isinstance(result, EffectResult)
    assert result.effect_retained == 1.0 and result.effect_retained_min == 1.0
    assert result.per_sample == (1.0, 1.0, 1.0) and result.kind == "denoiser" and result.kl_mean is None
    # the default set, recorded as run: three prompts, calls 0-2 of 4 steps at the pipeline's size
    s = result.samples
    assert len(s["prompts"]) == 3 and s["calls"] == [0, 1, 2] and s["num_inference_steps"] == 4
    assert (s["height"], s["width"]) == (64, 64) and s["timesteps"] == [751.0, 501.0, 251.0]
    canonical = json.dumps(s, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert result.samples_id == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert result.base == str(sd.base) and len(result.base_sha256) == 64
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["effect_retained"] == 1.0 and doc["effect_retained_min"] == 1.0 and doc["samples"] == s
    # the recorded set given back is the same set
    again = measure_effect(sd.kohya, other, sd.base, samples=s)
    assert again.samples == s and again.samples_id == result.samples_id


def test_a_kohya_and_a_diffusers_file_of_one_lora_have_the_same_effect(sd):
    result = measure_effect(sd.kohya, sd.diffusers, sd.base, samples=SMALL)
    assert result.effect_retained == pytest.approx(1.0, abs=1e-6)
    assert result.samples["timesteps"] == [751.0, 251.0]


def _drop_module(src: Path, dst: Path, prefix: str = "unet.") -> tuple[Path, str]:
    """`src` without one denoiser module's keys (metadata kept): a variant that lost a module."""
    tensors, metadata = tm.read_file(src)
    name = sorted(k for k in tensors if k.startswith(prefix) and k.endswith(".lora_A.weight"))[3]
    module = name.removesuffix(".lora_A.weight")
    save_file({k: v for k, v in tensors.items() if not k.startswith(module + ".")}, str(dst), metadata=metadata)
    return dst, module


def test_a_dropped_module_lowers_the_figure_to_what_the_formula_gives(sd):
    variant, _dropped = _drop_module(sd.diffusers, sd.root / "dropped.safetensors")
    result = measure_effect(sd.diffusers, variant, sd.base)
    assert result.effect_retained < 1 - 1e-4
    by_hand = _by_hand(sd.base, sd.diffusers, variant, result.samples)
    assert result.per_sample == pytest.approx(by_hand, abs=1e-5)
    assert result.effect_retained == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)
    assert result.effect_retained_min == pytest.approx(min(by_hand), abs=1e-5)


def _merged(pipe, lora: Path):
    """(unet, text_encoder) copies with every delta of `lora` added to its Linear's weight."""
    parts = {"unet": copy.deepcopy(pipe.unet), "text_encoder": copy.deepcopy(pipe.text_encoder)}
    with torch.no_grad():
        for module in tm.file_deltas(lora).values():
            component, _, path = module.target.partition(".")
            weight = parts[component].get_submodule(path).weight
            weight.copy_((weight.double() + module.delta).float())
    return parts["unet"], parts["text_encoder"]


@torch.no_grad()
def _by_hand(base_dir: Path, original: Path, other: Path, s: dict) -> list[float]:
    """Per prompt: 1 - ||e_other - e_orig|| / ||e_orig||, e = UNet(merged) - UNet(base) at the base
    run's latents (its callback), the schedule's timesteps, and each model's own text embeddings."""
    pipe = DiffusionPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    n, gens = len(s["prompts"]), [torch.Generator().manual_seed(seed) for seed in s["seeds"]]
    side = s["height"] // pipe.vae_scale_factor
    latents = [pipe.prepare_latents(n, 4, s["height"], s["width"], torch.float32, "cpu", gens)]

    def keep(_pipe, _step, _t, kw):
        latents.append(kw["latents"].clone())
        return kw

    pipe(prompt=s["prompts"], latents=latents[0].clone(), num_inference_steps=s["num_inference_steps"],
         output_type="latent", callback_on_step_end=keep)  # fmt: skip
    assert latents[0].shape == (n, 4, side, side)
    pipe.scheduler.set_timesteps(s["num_inference_steps"])
    outputs = {}
    for name, lora in (("base", None), ("original", original), ("other", other)):
        unet, text_encoder = (pipe.unet, pipe.text_encoder) if lora is None else _merged(pipe, lora)
        pipe_x = copy.copy(pipe)
        pipe_x.text_encoder = text_encoder
        positive, negative = pipe_x.encode_prompt(s["prompts"], "cpu", 1, True)
        context = torch.cat([negative, positive])  # the pipeline's classifier-free guidance batch
        per_call = [unet(torch.cat([latents[c]] * 2), pipe.scheduler.timesteps[c], encoder_hidden_states=context).sample
                    for c in s["calls"]]  # fmt: skip
        outputs[name] = [torch.cat([y.view(2, n, -1)[:, i].flatten() for y in per_call]).double() for i in range(n)]
    figures = []
    for i in range(n):
        e_orig = outputs["original"][i] - outputs["base"][i]
        e_other = outputs["other"][i] - outputs["base"][i]
        figures.append(float(1 - (e_other - e_orig).norm() / e_orig.norm()))
    return figures


def test_a_file_at_twice_the_strength_is_caught(sd):
    """alpha doubled in every kohya module: e_other is about 2 e_orig, so the figure is about 0."""
    tensors, metadata = tm.read_file(sd.kohya)
    doubled = {k: v * 2 if k.endswith(".alpha") else v for k, v in tensors.items()}
    save_file(doubled, str(sd.root / "twice.safetensors"), metadata=metadata)
    result = measure_effect(sd.kohya, sd.root / "twice.safetensors", sd.base, samples=SMALL)
    assert abs(result.effect_retained) < 0.1 and result.effect_retained_min < 0.1


def test_a_lorad_reduced_variant_keeps_most_of_the_effect_and_more_at_a_higher_fro(sd):
    figures = {}
    for fro in (0.9, 0.99):
        out = reduce_file(sd.kohya, sd.root / f"kohya.fro{fro}.safetensors", ReduceSettings(method="fro", param=fro))
        figures[fro] = measure_effect(sd.kohya, out.output.path, sd.base, samples=SMALL).effect_retained
    # fro 0.9 leaves a relative error of about sqrt(1 - 0.9^2) = 0.44 in each module's update
    assert 0.3 < figures[0.9] < figures[0.99] < 1
    assert figures[0.99] > 0.8


def test_a_lora_that_fits_nothing_is_an_error_not_a_figure(sd):
    foreign = {"lora_unet_no_such_block_to_q.lora_down.weight": torch.randn(4, 32),
               "lora_unet_no_such_block_to_q.lora_up.weight": torch.randn(32, 4)}  # fmt: skip
    save_file(foreign, str(sd.root / "foreign.safetensors"))
    with pytest.raises(LoradError, match="does not fit this base model"):
        measure_effect(sd.kohya, sd.root / "foreign.safetensors", sd.base, samples=SMALL)
    # keys diffusers takes for another model's (a Llama's PEFT keys): loaded nowhere, still an error
    llama_keys = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
                  "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4)}  # fmt: skip
    save_file(llama_keys, str(sd.root / "llama_keys.safetensors"))
    with pytest.raises(LoradError, match="does not fit this base model"):
        measure_effect(sd.root / "llama_keys.safetensors", sd.kohya, sd.base, samples=SMALL)


def test_a_lora_without_effect_is_an_error():
    with pytest.raises(LoradError, match="changes nothing"):
        effect_retained(torch.zeros(3), torch.ones(3))


# ---------------------------------------------------------------------------------------------
# A tiny Flux pipeline: a transformer denoiser, CLIP and T5 text encoders, packed latents, flow
# matching. The same runner measures it, nothing Flux-specific in lorad.


def _t5_tokenizer():
    """A T5 tokenizer built offline: a Unigram model over single letters (what T5's loader rebuilds)."""
    from tokenizers import Tokenizer, models
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz"]
    backend = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=2))
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=16)  # fmt: skip


def _tiny_flux():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(tm.SEED)
    clip_tokenizer, t5_tokenizer = tm.offline_tokenizer(), _t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4, decoder_start_token_id=0))
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
                        text_encoder=tm.tiny_text_encoder(len(clip_tokenizer)), tokenizer=clip_tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer)  # fmt: skip


def test_a_flux_pipeline_is_measured_by_the_same_runner(tmp_path):
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = _tiny_flux()
    pipe.save_pretrained(tmp_path / "base")
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # fmt: skip
    # B scaled down: a LoRA of a trained model's size (a small change), where the effect is near linear
    layers = {k: v * 0.05 if ".lora_B." in k else v for k, v in get_peft_model_state_dict(transformer).items()}
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers, weight_name="lora.safetensors")
    lora = tmp_path / "lora.safetensors"
    dropped, _ = _drop_module(lora, tmp_path / "dropped.safetensors", prefix="transformer.")
    twice = tmp_path / "twice.safetensors"
    tensors, metadata = tm.read_file(lora)  # no adapter metadata: read at scale 1, so B doubled is 2x
    save_file({k: v * 2 if ".lora_B." in k else v for k, v in tensors.items()}, str(twice), metadata=metadata)
    small = {"height": 32, "width": 32}
    same = measure_effect(lora, _copy(lora, tmp_path / "copy.safetensors"), tmp_path / "base", samples=small)
    assert same.effect_retained == 1.0 and same.samples["timesteps"] == [1.0, 0.75, 0.5]
    assert 0 < measure_effect(lora, dropped, tmp_path / "base", samples=small).effect_retained < 1 - 1e-4
    assert abs(measure_effect(lora, twice, tmp_path / "base", samples=small).effect_retained) < 0.1


# ---------------------------------------------------------------------------------------------
# A tiny SDXL pipeline: a UNet with SDXL's added conditioning (text_time: the pooled text embedding
# of text encoder 2 and the size/crop time ids), two text encoders whose hidden states are joined
# (CLIPTextModel and CLIPTextModelWithProjection), the Euler scheduler. Its LoRA is written in
# sd-scripts' SDXL names: lora_unet_ on the sgm UNet's block numbering (input_blocks/middle_block/
# output_blocks), lora_te1_ and lora_te2_ on the two encoders' transformers-4 `text_model.` paths.

SDXL_TIME_DIM, SDXL_COMPONENTS = 8, ("unet", "text_encoder", "text_encoder_2")
SDXL_SMALL = {**SMALL, "calls": [0, 1]}  # two denoiser calls per run: the SDXL tests stay cheap


def _tiny_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(tm.SEED)
    tokenizer = tm.offline_tokenizer()
    text_encoder = tm.tiny_text_encoder(len(tokenizer))  # hidden 32
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder.config)  # hidden 32, projection 32
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=32 + 32,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + 32)  # 6 time ids + the pooled projection
    return StableDiffusionXLPipeline(vae=tm.tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tm.offline_tokenizer(), unet=unet,
                                     scheduler=EulerDiscreteScheduler())  # fmt: skip


def _sgm_path(path: str, layers_per_block: int) -> str:
    """A diffusers UNet attention path in the sgm UNet's numbering, which sd-scripts trains SDXL on:
    input_blocks.0 is conv_in, each down level has layers_per_block entries and a downsampler, each
    up level layers_per_block + 1; the attention is entry 1 of its block."""
    per_level = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path):
        return f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path):
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", path):
        return f"middle_block.1.{m[1]}"
    raise AssertionError(f"no sgm name for {path}")


def _sdxl_kohya_name(component: str, path: str, layers_per_block: int) -> str:
    """sd-scripts' SDXL names, e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q,
    lora_te1_text_model_encoder_layers_0_self_attn_q_proj, lora_te2_text_model_encoder_layers_0_..."""
    if component == "unet":
        return "lora_unet_" + _sgm_path(path, layers_per_block).replace(".", "_")
    prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
    # transformers 5 drops `text_model.` from CLIPTextModel's paths (not CLIPTextModelWithProjection's)
    return prefix + "text_model_" + path.removeprefix("text_model.").replace(".", "_")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The saved tiny SDXL pipeline and one planted LoRA (UNet, both text encoders) written as a kohya
    file and as a diffusers file, with what each of its layers adds (`deltas`)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    root = tmp_path_factory.mktemp("effect_sdxl")
    pipe = _tiny_sdxl()
    pipe.save_pretrained(root / "base")
    pipe.unet.add_adapter(tm.unet_lora_config())  # alpha/rank 0.5 on the UNet, 1.5 on the encoders
    pipe.text_encoder.add_adapter(tm.te_lora_config())
    pipe.text_encoder_2.add_adapter(tm.te_lora_config())
    for i, component in enumerate(SDXL_COMPONENTS):
        tm.plant_lora_weights(getattr(pipe, component), seed=tm.SEED + 11 + i)
    tensors = {}
    for component in SDXL_COMPONENTS:
        for path, layer in getattr(pipe, component).named_modules():
            if isinstance(layer, LoraLayer):
                name = _sdxl_kohya_name(component, path, pipe.unet.config.layers_per_block)
                tensors[f"{name}.lora_down.weight"] = layer.lora_A["default"].weight.detach().clone()
                tensors[f"{name}.lora_up.weight"] = layer.lora_B["default"].weight.detach().clone()
                tensors[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha["default"]))
    kohya = root / "sdxl_kohya.safetensors"
    save_file(tensors, str(kohya), metadata={"ss_network_module": "networks.lora",
                                             "ss_base_model_version": "sdxl_base_v1-0"})  # fmt: skip
    StableDiffusionXLPipeline.save_lora_weights(
        root, weight_name="sdxl_diffusers.safetensors",
        **{f"{c}_lora_layers": get_peft_model_state_dict(getattr(pipe, c)) for c in SDXL_COMPONENTS},
        **{f"{c}_lora_adapter_metadata": getattr(pipe, c).peft_config["default"].to_dict() for c in SDXL_COMPONENTS})
    deltas = tm.loaded_deltas(**{c: getattr(pipe, c) for c in SDXL_COMPONENTS})
    return SimpleNamespace(root=root, base=root / "base", kohya=kohya, diffusers=root / "sdxl_diffusers.safetensors",
                           deltas=deltas)  # fmt: skip


def _kohya_without(src: Path, dst: Path, drop) -> Path:
    """`src` without the kohya modules whose name `drop(name)` is true (metadata kept)."""
    tensors, metadata = tm.read_file(src)
    save_file({k: v for k, v in tensors.items() if not drop(k.partition(".")[0])}, str(dst), metadata=metadata)
    return dst


def test_sdxl_kohya_names_load_every_module_and_match_the_diffusers_file(sdxl):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sdxl.base)
    pipe.load_lora_weights(str(sdxl.kohya))
    loaded = tm.loaded_deltas(**{c: getattr(pipe, c) for c in SDXL_COMPONENTS})
    assert loaded.keys() == sdxl.deltas.keys()
    assert {k.partition(".")[0] for k in loaded} == set(SDXL_COMPONENTS)
    assert all(torch.allclose(loaded[k].delta, sdxl.deltas[k].delta, atol=1e-6) for k in loaded)
    result = measure_effect(sdxl.kohya, sdxl.diffusers, sdxl.base, samples=SDXL_SMALL)
    assert result.effect_retained == pytest.approx(1.0, abs=1e-6)


def test_sdxl_an_identical_copy_keeps_the_whole_effect(sdxl):
    other = _copy(sdxl.kohya, sdxl.root / "copy.safetensors")
    result = measure_effect(sdxl.kohya, other, sdxl.base, samples=SDXL_SMALL)
    assert result.effect_retained == 1.0 and result.effect_retained_min == 1.0
    assert result.per_sample == (1.0, 1.0) and result.kind == "denoiser"
    assert result.samples["timesteps"] == [999.0, 666.0]  # Euler's 4-step schedule, calls 0 and 1


def test_sdxl_a_dropped_unet_module_lowers_the_figure(sdxl):
    name = sorted(k.partition(".")[0] for k in tm.read_file(sdxl.kohya)[0] if k.startswith("lora_unet_"))[3]
    variant = _kohya_without(sdxl.kohya, sdxl.root / "dropped.safetensors", lambda n: n == name)
    result = measure_effect(sdxl.kohya, variant, sdxl.base, samples=SDXL_SMALL)
    assert 0 < result.effect_retained < 1 - 1e-4 and result.effect_retained_min <= result.effect_retained


def test_sdxl_a_file_at_twice_the_strength_is_caught(sdxl):
    tensors, metadata = tm.read_file(sdxl.kohya)
    twice = sdxl.root / "twice.safetensors"
    save_file({k: v * 2 if k.endswith(".alpha") else v for k, v in tensors.items()}, str(twice), metadata=metadata)
    result = measure_effect(sdxl.kohya, twice, sdxl.base, samples=SDXL_SMALL)
    assert abs(result.effect_retained) < 0.1 and result.effect_retained_min < 0.1


def test_sdxl_a_text_encoder_2_module_counts(sdxl):
    """The encoders run with the LoRA loaded: a file that lost one module of text encoder 2 (its first
    layer's v_proj, which feeds the UNet's context and the pooled embedding) is below 1."""
    name = "lora_te2_text_model_encoder_layers_0_self_attn_v_proj"
    assert f"{name}.lora_down.weight" in tm.read_file(sdxl.kohya)[0]
    variant = _kohya_without(sdxl.kohya, sdxl.root / "no_te2_v.safetensors", lambda n: n == name)
    assert 0 < measure_effect(sdxl.kohya, variant, sdxl.base, samples=SDXL_SMALL).effect_retained < 1 - 1e-4


# ---------------------------------------------------------------------------------------------
# Causal LM


def test_an_identical_adapter_folder_keeps_the_whole_effect_and_kl_is_zero(llm):
    result = measure_effect(llm.adapter, _copy(llm.adapter, llm.root / "copy"), llm.base)
    assert result.kind == "logits" and result.effect_retained == 1.0 and result.effect_retained_min == 1.0
    assert result.kl_mean == 0.0
    # no tokenizer in the folder: seeded ids within the vocabulary, recorded
    ids = result.samples["token_ids"]
    assert len(ids) == 3 and all(len(seq) == 16 and max(seq) < 128 for seq in ids)


def test_a_reduced_adapter_folder_loses_some_effect_as_the_formula_says(llm):
    out = Path(reduce_file(llm.adapter, llm.root / "reduced", ReduceSettings(method="fro", param=0.9)).output.path)
    result = measure_effect(llm.adapter, out, llm.base)
    assert 0 < result.effect_retained < 1 and result.kl_mean > 0
    # the same figures from merged weights (PEFT's format rules, no loader) and the formula again
    ids = torch.tensor(result.samples["token_ids"])
    base = sm.tiny_llama()(ids).logits.detach()
    orig = sm.merged_llama(sm.peft_file_deltas(llm.adapter))(ids).logits.detach()
    other = sm.merged_llama(sm.peft_file_deltas(out))(ids).logits.detach()
    by_hand = [1 - float((other[i] - orig[i]).double().norm() / (orig[i] - base[i]).double().norm())
               for i in range(len(ids))]  # fmt: skip
    assert result.per_sample == pytest.approx(by_hand, abs=1e-4)
    assert result.kl_mean == pytest.approx(kl_mean(orig.flatten(0, 1), other.flatten(0, 1)), rel=1e-2)


def test_a_causal_lm_base_takes_adapter_folders_and_a_pipeline_takes_files(sd, llm):
    with pytest.raises(LoradError, match="base is a causal LM"):
        measure_effect(sd.kohya, sd.kohya, llm.base)
    with pytest.raises(LoradError, match="base is a diffusers pipeline"):
        measure_effect(llm.adapter, llm.adapter, sd.base)


# ---------------------------------------------------------------------------------------------
# The command


def test_the_command_prints_one_json_object(sd):
    cmd = [sys.executable, "-m", "lorad", "effect", str(sd.kohya), str(sd.diffusers), "--base", str(sd.base),
           "--json", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["effect_retained"] == pytest.approx(1.0, abs=1e-6)
    assert doc["effect_retained_min"] == pytest.approx(1.0, abs=1e-6)
    assert doc["kind"] == "denoiser" and doc["samples_id"] and len(doc["base_sha256"]) == 64


def test_the_command_prints_a_summary(sd, capsys):
    assert main(["effect", str(sd.kohya), str(sd.kohya), "--base", str(sd.base)]) == 0
    out = capsys.readouterr().out
    assert "effect retained  1.0000 mean, 1.0000 worst" in out and "3 prompts" in out


def _error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorad: error: "), err
    return err[0]


def test_the_command_says_in_one_line_what_is_wrong(sd, tmp_path, capsys):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_nowhere_to_k.lora_down.weight": torch.randn(2, 8),
               "lora_unet_nowhere_to_k.lora_up.weight": torch.randn(8, 2)}, str(foreign))  # fmt: skip
    assert "does not fit this base model" in _error_line(capsys, ["effect", str(sd.kohya), str(foreign),
                                                                   "--base", str(sd.base)])  # fmt: skip
    assert "base model not found" in _error_line(capsys, ["effect", str(sd.kohya), str(sd.kohya),
                                                          "--base", str(tmp_path / "nothing")])  # fmt: skip
    assert "not a base model" in _error_line(capsys, ["effect", str(sd.kohya), str(sd.kohya), "--base", str(tmp_path)])
    assert "needs --base" in _error_line(capsys, ["effect", str(sd.kohya), str(sd.kohya)])
    assert "two files" in _error_line(capsys, ["effect", str(sd.kohya), str(sd.kohya), str(sd.kohya),
                                               "--base", str(sd.base)])  # fmt: skip


def test_a_pickle_is_refused_never_loaded(sd, tmp_path, capsys):
    marker = tmp_path / "unpickled"

    class Bomb:  # unpickling this would create `marker`
        def __reduce__(self):
            return (Path.touch, (marker,))

    pickle = tmp_path / "lora.ckpt"
    torch.save({"state_dict": Bomb()}, pickle)
    assert "pickle" in _error_line(capsys, ["effect", str(pickle), str(sd.kohya), "--base", str(sd.base)])
    assert "pickle" in _error_line(capsys, ["effect", str(sd.kohya), str(sd.kohya), "--base", str(pickle),
                                            "--config", str(sd.base)])  # fmt: skip
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    torch.save({"w": Bomb()}, adapter / "adapter_model.bin")
    assert "pickle" in _error_line(capsys, ["effect", str(adapter), str(adapter), "--base", str(sd.base)])
    assert not marker.exists()


def test_importing_the_command_loads_no_model_library():
    code = ("import sys, lorad.cli.cli, lorad.engine.effect\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
