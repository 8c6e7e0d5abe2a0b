"""One builder per trainer layout: small but structurally real LoRA files, as each tool writes them.

Every builder writes the key names, tensor shapes (tiny dims, real relationships: a fused qkv up
has 3x the rows of its block width, a conv LoCon down has its kernel, a conv3d has 5-D factors),
dtype, alpha convention and metadata of the tool that writes the layout, with planted spectra
(each module's update has singular values decay**i, the decay differing per module) so that a
`fro 0.9` rule picks mixed ranks.

Each layout says which diffusers pipeline class's `lora_state_dict` reads it (None where no
diffusers 0.42.1 pipeline converts it), and where its key names come from:
  diffusers 0.42.1  loaders/lora_conversion_utils.py (the converter named per layout) and
                    loaders/lora_pipeline.py (each mixin's `lora_state_dict` detection order)
  kohya sd-scripts  networks/lora.py, lora_flux.py (lora_unet_/lora_te*_ names, `.alpha` per module,
                    every tensor saved in the save dtype, alphas included)
  musubi-tuner      networks/lora_wan.py, lora.py (HunyuanVideo), lora_qwen_image.py (kohya style)
  ai-toolkit        toolkit/network_mixins.py (PEFT names, alpha dropped on save)
  formats.md        /work/shared/reference/formats.md section 1 (LyCORIS, DoRA, XLabs, PEFT)

A builder returns a `Built`: the path, and the module names (key prefixes exactly as the file
spells them) it wrote as plain LoRA pairs (`reduced`) and as modules every reducer must pass
through (`passed`: LoHa, LoKr, Tucker, DoRA), plus the keys of non-LoRA tensors (`extra_keys`).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Orthonormal columns from a Gaussian matrix by Cholesky QR (fast for 21504 x 4, exact enough:
    a Gaussian tall matrix is well conditioned; one refinement pass makes Q^T Q = I to 1e-15)."""
    q = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    for _ in range(2):
        chol = torch.linalg.cholesky(q.T @ q)
        q = torch.linalg.solve_triangular(chol, q.T, upper=False).T
    return q


def factors(out: int, flat_in: int, rank: int, decay: float, gen: torch.Generator):
    """(up (out, rank), down (rank, flat_in)) in float32 whose product has singular values decay**i,
    i < min(out, flat_in, rank), spread over all rank columns by a random orthogonal mixer (so
    neither factor is orthonormal and a reducer must really decompose them). After
    tests/lora_factory.factors and tests/_tiny_models.planted_factors, with a faster
    orthonormalisation for very tall modules."""
    p = min(out, flat_in, rank)
    qb, qa = _orthonormal(out, p, gen), _orthonormal(flat_in, p, gen)
    s = torch.tensor([decay**i for i in range(p)], dtype=torch.float64)
    rot = torch.linalg.qr(torch.randn(rank, rank, generator=gen, dtype=torch.float64))[0]
    mix = (rot * torch.linspace(0.5, 2.0, rank, dtype=torch.float64))[:p, :]  # p x rank, not orthogonal
    right_inverse = mix.T @ torch.linalg.inv(mix @ mix.T)  # mix @ right_inverse = I_p
    return ((qb * s) @ mix).float(), (right_inverse @ qa.T).float()


# Decays cycled over a file's modules: fro 0.9 then keeps about 2 (0.5) to 7 (0.88) directions.
DECAYS = (0.5, 0.8, 0.62, 0.88, 0.7, 0.55, 0.84, 0.66)


@dataclass(frozen=True)
class Built:
    path: Path  # a .safetensors file, or a PEFT adapter folder
    reduced: tuple[str, ...]  # plain LoRA modules, as the file spells their key prefix
    passed: tuple[str, ...] = ()  # LoRA-like modules a reducer must leave bit for bit (LoHa, LoKr, ...)
    extra_keys: tuple[str, ...] = ()  # non-LoRA tensors (full weights, .diff, .diff_b, norms)
    alpha_keys: bool = False  # the reduced modules carry `.alpha` keys
    diffusers_metadata: bool = False  # the file carries `lora_adapter_metadata`


@dataclass(frozen=True)
class Layout:
    name: str
    build: Callable[[Path], Built]  # folder -> Built (writes one file or folder inside it)
    pipeline: str | None  # diffusers pipeline whose lora_state_dict reads the layout, or None
    dtype: torch.dtype
    source: str  # where the key names come from

    def __str__(self) -> str:  # pytest ids
        return self.name


# ---------------------------------------------------------------------------------------------
# Writing helpers


def _spell(style: str, name: str) -> tuple[str, str]:
    """(down key, up key) for a module prefix in one of the spellings loaders accept."""
    return {
        "kohya": (f"{name}.lora_down.weight", f"{name}.lora_up.weight"),
        "peft": (f"{name}.lora_A.weight", f"{name}.lora_B.weight"),
        "adapter": (f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"),
        "bare": (f"{name}.lora_A", f"{name}.lora_B"),
        "legacy": (f"{name}.lora.down.weight", f"{name}.lora.up.weight"),
        "linear_layer": (f"{name}.lora_linear_layer.down.weight", f"{name}.lora_linear_layer.up.weight"),
        "updown": (f"{name}.down.weight", f"{name}.up.weight"),
        "updown_bare": (f"{name}.down", f"{name}.up"),
    }[style]


class _Writer:
    def __init__(self, dtype: torch.dtype, seed: int, alpha_dtype: torch.dtype | None = None):
        self.dtype = dtype
        self.alpha_dtype = alpha_dtype or dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.tensors: dict[str, torch.Tensor] = {}
        self.reduced: list[str] = []
        self.passed: list[str] = []
        self.extra: list[str] = []
        self.alphas = False
        self._i = 0

    def _decay(self) -> float:
        d = DECAYS[self._i % len(DECAYS)]
        self._i += 1
        return d

    def pair(self, name: str, style: str, out: int, inp: int, rank: int, kernel: tuple[int, ...] = (),
             alpha: float | None = None, bias: bool = False) -> None:
        """A plain LoRA module: up (out, r[, 1...]) @ down (r, in[, *kernel]) with a planted spectrum."""
        flat_in = inp * math.prod(kernel)
        up, down = factors(out, flat_in, rank, self._decay(), self.gen)
        down_key, up_key = _spell(style, name)
        self.tensors[down_key] = down.reshape(rank, inp, *kernel).to(self.dtype).contiguous()
        self.tensors[up_key] = up.reshape(out, rank, *(1,) * len(kernel)).to(self.dtype).contiguous()
        if alpha is not None:
            self.tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=self.alpha_dtype)
            self.alphas = True
        if bias:
            self.tensors[f"{name}.lora_B.bias"] = (0.01 * torch.randn(out, generator=self.gen)).to(self.dtype)
        self.reduced.append(name)

    def raw(self, key: str, shape: tuple[int, ...], module: str | None = None) -> None:
        """A tensor that is not a plain LoRA factor (LyCORIS parts, full weights, .diff)."""
        self.tensors[key] = (0.05 * torch.randn(*shape, generator=self.gen)).to(self.dtype)
        if module is None:
            self.extra.append(key)
        elif module not in self.passed:
            self.passed.append(module)

    def scalar(self, key: str, value: float) -> None:
        self.tensors[key] = torch.tensor(float(value), dtype=self.alpha_dtype)

    def save(self, path: Path, metadata: dict[str, str] | None = None, diffusers_metadata: bool = False) -> Built:
        save_file(self.tensors, str(path), metadata=metadata)
        return Built(path, tuple(self.reduced), tuple(self.passed), tuple(self.extra), self.alphas,
                     diffusers_metadata)


def _kohya_meta(module: str, base: str, dim: int, alpha: float, **extra: str) -> dict[str, str]:
    meta = {"ss_network_module": module, "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
            "ss_base_model_version": base, "ss_output_name": "my_lora", "ss_training_comment": "None",
            "sshs_model_hash": "0" * 64, "sshs_legacy_hash": "deadbeef",
            "modelspec.sai_model_spec": "1.0.0", "modelspec.title": "my_lora"}  # fmt: skip
    meta.update(extra)
    return meta


def _diffusers_config(targets: list[str], r: int, alpha: float, rank_pattern: dict | None = None,
                      alpha_pattern: dict | None = None, **extra: object) -> dict[str, object]:
    """A LoraConfig.to_dict() as PEFT 0.2x writes it (the fields diffusers saves as metadata)."""
    cfg: dict[str, object] = {
        "r": r, "lora_alpha": alpha, "target_modules": sorted(targets), "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {}, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "peft_type": "LORA", "task_type": None,
        "peft_version": "0.17.0", "fan_in_fan_out": False, "lora_bias": False, "modules_to_save": None,
    }  # fmt: skip
    cfg.update(extra)
    return cfg


def _pack(configs: dict[str, dict[str, object]]) -> str:
    """diffusers' save_lora_weights: each component's config flattened with its prefix."""
    flat = {f"{comp}.{k}": v for comp, cfg in configs.items() for k, v in cfg.items()}
    return json.dumps(flat, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# kohya sd-scripts


def kohya_sd15(folder: Path) -> Built:
    """sd-scripts networks.lora on SD1.5 (diffusers-path UNet names), LoCon conv_dim 8 / conv_alpha 4:
    linear, 1x1 conv (proj_in) and 3x3 conv (resnets) modules; fp16, alphas in fp16."""
    w = _Writer(torch.float16, 11)
    u = "lora_unet_down_blocks_0_attentions_0"
    w.pair(f"{u}_transformer_blocks_0_attn1_to_q", "kohya", 64, 64, 16, alpha=8)
    w.pair(f"{u}_transformer_blocks_0_attn2_to_k", "kohya", 64, 48, 16, alpha=8)
    w.pair(f"{u}_transformer_blocks_0_ff_net_0_proj", "kohya", 512, 64, 16, alpha=8)
    w.pair(f"{u}_proj_in", "kohya", 64, 64, 16, kernel=(1, 1), alpha=8)
    w.pair("lora_unet_down_blocks_0_resnets_0_conv1", "kohya", 32, 32, 8, kernel=(3, 3), alpha=4)
    w.pair("lora_unet_mid_block_resnets_0_conv2", "kohya", 48, 48, 8, kernel=(3, 3), alpha=4)
    w.pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "kohya", 48, 48, 8, alpha=8)
    w.pair("lora_te_text_model_encoder_layers_0_mlp_fc1", "kohya", 192, 48, 8, alpha=8)
    meta = _kohya_meta("networks.lora", "sd_v1", 16, 8, ss_network_args='{"conv_dim": "8", "conv_alpha": "4"}')
    return w.save(folder / "kohya_sd15_locon.safetensors", meta)


def kohya_sd15_alpha0(folder: Path) -> Built:
    """sd-scripts reads alpha 0 as alpha = rank (scale 1); ComfyUI reads it as scale 0."""
    w = _Writer(torch.float16, 12)
    w.pair("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v", "kohya", 64, 64, 8, alpha=0)
    w.pair("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0", "kohya", 64, 64, 8, alpha=0)
    return w.save(folder / "kohya_alpha0.safetensors", _kohya_meta("networks.lora", "sd_v1", 8, 0))


def kohya_sdxl(folder: Path) -> Built:
    """sd-scripts on SDXL: SGM UNet names (input_blocks/middle_block/output_blocks), lora_te1_/lora_te2_."""
    w = _Writer(torch.float16, 13)
    w.pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "kohya", 64, 64, 16, alpha=1)
    w.pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "kohya", 64, 80, 16, alpha=1)
    w.pair("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0", "kohya", 64, 64, 16, alpha=1)
    w.pair("lora_unet_output_blocks_2_1_transformer_blocks_1_ff_net_2", "kohya", 64, 256, 16, alpha=1)
    w.pair("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", "kohya", 48, 48, 8, alpha=1)
    w.pair("lora_te2_text_model_encoder_layers_0_mlp_fc1", "kohya", 160, 40, 8, alpha=1)
    return w.save(folder / "kohya_sdxl.safetensors", _kohya_meta("networks.lora", "sdxl_base_v1-0", 16, 1))


def kohya_sdxl_noalpha(folder: Path) -> Built:
    """kohya-style names with NO alpha keys (extraction tools that rely on sd-scripts' rule that a
    missing alpha means alpha = rank): every loader reads scale 1."""
    w = _Writer(torch.float16, 10)
    w.pair("lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_k", "kohya", 64, 64, 16)
    w.pair("lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_v", "kohya", 64, 80, 16)
    w.pair("lora_te1_text_model_encoder_layers_2_mlp_fc2", "kohya", 48, 192, 8)
    return w.save(folder / "kohya_sdxl_noalpha.safetensors", {"ss_network_module": "networks.lora"})


def comfy_extract(folder: Path) -> Built:
    """ComfyUI's "Extract and Save Lora" node: `diffusion_model.<ldm path>.lora_up.weight` /
    `.lora_down.weight` (and `text_encoders.` for CLIP), no alpha, fp16."""
    w = _Writer(torch.float16, 9)
    w.pair("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q", "kohya", 64, 64, 16)
    w.pair("diffusion_model.middle_block.1.proj_in", "kohya", 64, 64, 16)
    w.pair("diffusion_model.output_blocks.3.0.in_layers.2", "kohya", 32, 32, 8, kernel=(3, 3))
    w.pair("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", "kohya", 48, 48, 8)
    return w.save(folder / "comfy_extract.safetensors", None)


FLUX_H = 32  # Flux block width (3072 in the real model); qkv 3H, mlp 4H, modulation 6H / 3H


def kohya_flux(folder: Path) -> Built:
    """sd-scripts networks.lora_flux: fused img/txt qkv (3H x H), mlp, modulation, single blocks, CLIP-L TE.
    single_blocks_N_linear1 is left out: diffusers' converter splits it at the real 3072 width."""
    h, w = FLUX_H, _Writer(torch.bfloat16, 14)
    d = "lora_unet_double_blocks_0"
    w.pair(f"{d}_img_attn_qkv", "kohya", 3 * h, h, 16, alpha=8)
    w.pair(f"{d}_img_attn_proj", "kohya", h, h, 16, alpha=8)
    w.pair(f"{d}_img_mlp_0", "kohya", 4 * h, h, 16, alpha=8)
    w.pair(f"{d}_img_mlp_2", "kohya", h, 4 * h, 16, alpha=8)
    w.pair(f"{d}_img_mod_lin", "kohya", 6 * h, h, 16, alpha=8)
    w.pair(f"{d}_txt_attn_qkv", "kohya", 3 * h, h, 16, alpha=8)
    w.pair(f"{d}_txt_mlp_0", "kohya", 4 * h, h, 16, alpha=8)
    w.pair("lora_unet_single_blocks_0_linear2", "kohya", h, 5 * h, 16, alpha=8)
    w.pair("lora_unet_single_blocks_0_modulation_lin", "kohya", 3 * h, h, 16, alpha=8)
    w.pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "kohya", 48, 48, 8, alpha=8)
    return w.save(folder / "kohya_flux.safetensors", _kohya_meta("networks.lora_flux", "flux1", 16, 8))


def kohya_chroma(folder: Path) -> Built:
    """sd-scripts networks.lora_flux trained on Chroma (no modulation layers, T5 only)."""
    h, w = FLUX_H, _Writer(torch.bfloat16, 15)
    w.pair("lora_unet_double_blocks_0_img_attn_qkv", "kohya", 3 * h, h, 8, alpha=4)
    w.pair("lora_unet_double_blocks_0_txt_attn_proj", "kohya", h, h, 8, alpha=4)
    w.pair("lora_unet_double_blocks_1_img_mlp_0", "kohya", 4 * h, h, 8, alpha=4)
    w.pair("lora_unet_single_blocks_0_linear2", "kohya", h, 5 * h, 8, alpha=4)
    return w.save(folder / "kohya_chroma.safetensors", _kohya_meta("networks.lora_flux", "chroma", 8, 4))


def kohya_zimage(folder: Path) -> Built:
    """sd-scripts / musubi Z-Image: lora_unet_layers_N_attention_to_q ... feed_forward_w1..w3."""
    w = _Writer(torch.bfloat16, 16)
    for name in ("attention_to_q", "attention_to_k", "attention_to_v", "attention_to_out_0"):
        w.pair(f"lora_unet_layers_0_{name}", "kohya", 48, 48, 8, alpha=8)
    w.pair("lora_unet_layers_0_feed_forward_w1", "kohya", 128, 48, 8, alpha=8)
    w.pair("lora_unet_layers_0_feed_forward_w2", "kohya", 48, 128, 8, alpha=8)
    w.pair("lora_unet_noise_refiner_0_attention_to_k", "kohya", 48, 48, 8, alpha=8)
    return w.save(folder / "kohya_zimage.safetensors", _kohya_meta("networks.lora_zimage", "z-image", 8, 8))


# ---------------------------------------------------------------------------------------------
# musubi-tuner


WAN_H, WAN_TEXT, WAN_FFN = 48, 40, 96  # 5120 / 4096 / 13824 in Wan 2.x 14B


def musubi_wan(folder: Path) -> Built:
    """musubi-tuner networks.lora_wan: lora_unet_blocks_N_{self,cross}_attn_{q,k,v,o}, ffn_0/ffn_2;
    diffusers' _convert_musubi_wan_lora_to_diffusers needs every one of them, each with an alpha."""
    w = _Writer(torch.bfloat16, 17)
    for i in range(2):
        for o in "qkvo":
            w.pair(f"lora_unet_blocks_{i}_self_attn_{o}", "kohya", WAN_H, WAN_H, 8, alpha=1)
        for o in "qkvo":
            inp = WAN_TEXT if o in "kv" else WAN_H
            w.pair(f"lora_unet_blocks_{i}_cross_attn_{o}", "kohya", WAN_H, inp, 8, alpha=1)
        w.pair(f"lora_unet_blocks_{i}_ffn_0", "kohya", WAN_FFN, WAN_H, 8, alpha=1)
        w.pair(f"lora_unet_blocks_{i}_ffn_2", "kohya", WAN_H, WAN_FFN, 8, alpha=1)
    return w.save(folder / "musubi_wan.safetensors", _kohya_meta("networks.lora_wan", "wan2.1_t2v_14B", 8, 1))


def musubi_hunyuan(folder: Path) -> Built:
    """musubi-tuner HunyuanVideo (networks.lora on MMDoubleStreamBlock / MMSingleStreamBlock).
    diffusers' HunyuanVideo converter only knows the lora_A/lora_B form: no pipeline."""
    h, w = FLUX_H, _Writer(torch.bfloat16, 18)
    d = "lora_unet_double_blocks_0"
    w.pair(f"{d}_img_attn_qkv", "kohya", 3 * h, h, 8, alpha=4)
    w.pair(f"{d}_img_attn_proj", "kohya", h, h, 8, alpha=4)
    w.pair(f"{d}_img_mlp_fc1", "kohya", 4 * h, h, 8, alpha=4)
    w.pair(f"{d}_txt_mod_linear", "kohya", 6 * h, h, 8, alpha=4)
    w.pair("lora_unet_single_blocks_0_linear1", "kohya", 3 * h + 4 * h, h, 8, alpha=4)
    w.pair("lora_unet_single_blocks_0_linear2", "kohya", h, 5 * h, 8, alpha=4)
    return w.save(folder / "musubi_hunyuan.safetensors", _kohya_meta("networks.lora", "hunyuan_video", 8, 4))


def musubi_qwen(folder: Path) -> Built:
    """musubi-tuner Qwen-Image: lora_unet_transformer_blocks_N_attn_to_q ... img_mlp_net_0_proj, txt_mod_1."""
    w = _Writer(torch.bfloat16, 19)
    b = "lora_unet_transformer_blocks_0"
    for name in ("attn_to_q", "attn_to_k", "attn_to_v", "attn_add_q_proj", "attn_to_out_0", "attn_to_add_out"):
        w.pair(f"{b}_{name}", "kohya", 48, 48, 8, alpha=8)
    w.pair(f"{b}_img_mlp_net_0_proj", "kohya", 192, 48, 8, alpha=8)
    w.pair(f"{b}_img_mlp_net_2", "kohya", 48, 192, 8, alpha=8)
    w.pair(f"{b}_txt_mod_1", "kohya", 288, 48, 8, alpha=8)
    return w.save(folder / "musubi_qwen.safetensors", _kohya_meta("networks.lora_qwen_image", "qwen_image", 8, 8))


# ---------------------------------------------------------------------------------------------
# ai-toolkit, OneTrainer, SimpleTuner, DiffSynth, diffusion-pipe, fal, XLabs, genmo


_AITK_META = {"format": "pt", "name": "my_lora", "version": "1.0",
              "software": json.dumps({"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit",
                                      "version": "0.5.0"})}  # fmt: skip


def aitoolkit_flux(folder: Path) -> Built:
    """ai-toolkit Flux.1: diffusers names under `transformer.`, PEFT lora_A/lora_B, alpha dropped."""
    h, w = FLUX_H, _Writer(torch.bfloat16, 21)
    t = "transformer.transformer_blocks.0"
    for name in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.to_add_out"):
        w.pair(f"{t}.{name}", "peft", h, h, 16)
    w.pair(f"{t}.ff.net.0.proj", "peft", 4 * h, h, 16)
    w.pair(f"{t}.ff_context.net.2", "peft", h, 4 * h, 16)
    w.pair(f"{t}.norm1.linear", "peft", 6 * h, h, 16)
    s = "transformer.single_transformer_blocks.0"
    w.pair(f"{s}.attn.to_q", "peft", h, h, 16)
    w.pair(f"{s}.proj_mlp", "peft", 4 * h, h, 16)
    w.pair(f"{s}.proj_out", "peft", h, 5 * h, 16)
    return w.save(folder / "aitoolkit_flux.safetensors", dict(_AITK_META))


def thelastben_flux(folder: Path) -> Built:
    """Flux files like TheLastBen/Jon_Snow_Flux_LoRA: `transformer.` + lora_A/lora_B WITH `.alpha` keys
    (diffusers' Flux loader returns them as network_alphas), fp16; one module carries PEFT's
    lora_bias (`X.lora_B.bias`), which must keep scale * bias when the scale is folded."""
    h, w = FLUX_H, _Writer(torch.float16, 20, alpha_dtype=torch.float32)
    t = "transformer.transformer_blocks.0"
    w.pair(f"{t}.attn.to_q", "peft", h, h, 16, alpha=4, bias=True)
    w.pair(f"{t}.attn.to_k", "peft", h, h, 16, alpha=4)
    w.pair(f"{t}.ff.net.0.proj", "peft", 4 * h, h, 16, alpha=4)
    w.pair("transformer.single_transformer_blocks.0.proj_out", "peft", h, 5 * h, 16, alpha=4)
    return w.save(folder / "thelastben_flux.safetensors", {"format": "pt"})


def aitoolkit_flux2(folder: Path) -> Built:
    """ai-toolkit Flux.2: BFL names under `diffusion_model.` (diffusers'
    _convert_non_diffusers_flux2_lora_to_diffusers): fused qkv, SwiGLU mlp (img_mlp.0 is 2 x 3H),
    single-block fused linear1 (qkv + 2 x 3H mlp)."""
    h, w = FLUX_H, _Writer(torch.bfloat16, 22)
    d = "diffusion_model.double_blocks.0"
    w.pair(f"{d}.img_attn.qkv", "peft", 3 * h, h, 16)
    w.pair(f"{d}.img_attn.proj", "peft", h, h, 16)
    w.pair(f"{d}.img_mlp.0", "peft", 6 * h, h, 16)
    w.pair(f"{d}.img_mlp.2", "peft", h, 3 * h, 16)
    w.pair(f"{d}.txt_attn.qkv", "peft", 3 * h, h, 16)
    w.pair("diffusion_model.single_blocks.0.linear1", "peft", 3 * h + 6 * h, h, 16)
    w.pair("diffusion_model.single_blocks.0.linear2", "peft", h, h + 3 * h, 16)
    return w.save(folder / "aitoolkit_flux2.safetensors", dict(_AITK_META))


def aitoolkit_qwen(folder: Path) -> Built:
    """ai-toolkit Qwen-Image: `diffusion_model.transformer_blocks.N...` + lora_A/lora_B (diffusers PR #12261)."""
    w = _Writer(torch.bfloat16, 23)
    b = "diffusion_model.transformer_blocks.0"
    for name in ("attn.to_q", "attn.to_k", "attn.add_k_proj", "attn.to_out.0"):
        w.pair(f"{b}.{name}", "peft", 48, 48, 16)
    w.pair(f"{b}.img_mlp.net.0.proj", "peft", 192, 48, 16)
    w.pair(f"{b}.txt_mlp.net.2", "peft", 48, 192, 16)
    return w.save(folder / "aitoolkit_qwen.safetensors", dict(_AITK_META))


def onetrainer_flux(folder: Path) -> Built:
    """OneTrainer Flux: lora_transformer_<diffusers path with underscores> + alpha, CLIP-L as lora_te1_
    (diffusers' "mixture" branch of _convert_kohya_flux_lora_to_diffusers, which needs every alpha)."""
    h, w = FLUX_H, _Writer(torch.bfloat16, 24)
    b = "lora_transformer_transformer_blocks_0"
    for name in ("attn_to_q", "attn_to_k", "attn_to_v", "attn_to_out_0", "attn_add_q_proj", "attn_to_add_out"):
        w.pair(f"{b}_{name}", "kohya", h, h, 16, alpha=1)
    w.pair("lora_transformer_single_transformer_blocks_0_attn_to_q", "kohya", h, h, 16, alpha=1)
    w.pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "kohya", 48, 48, 8, alpha=1)
    return w.save(folder / "onetrainer_flux.safetensors", {"ot_branch": "master", "ot_revision": "abc123"})


def onetrainer_sdxl(folder: Path) -> Built:
    """OneTrainer SDXL: kohya-style prefixes over DIFFUSERS module paths (it trains diffusers models), fp32."""
    w = _Writer(torch.float32, 25)
    b = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0"
    w.pair(f"{b}_attn1_to_q", "kohya", 64, 64, 16, alpha=1)
    w.pair(f"{b}_attn2_to_v", "kohya", 64, 80, 16, alpha=1)
    w.pair("lora_unet_up_blocks_0_attentions_1_transformer_blocks_2_ff_net_0_proj", "kohya", 512, 64, 16, alpha=1)
    w.pair("lora_te1_text_model_encoder_layers_0_self_attn_out_proj", "kohya", 48, 48, 8, alpha=1)
    w.pair("lora_te2_text_model_encoder_layers_1_self_attn_v_proj", "kohya", 40, 40, 8, alpha=1)
    return w.save(folder / "onetrainer_sdxl.safetensors", {"ot_branch": "master"})


def simpletuner_lycoris(folder: Path) -> Built:
    """SimpleTuner's LyCORIS wrapper on Flux: lycoris_<path> LoCon modules beside a LoKr module."""
    h, w = FLUX_H, _Writer(torch.bfloat16, 26)
    w.pair("lycoris_transformer_blocks_0_attn_to_q", "kohya", h, h, 16, alpha=16)
    w.pair("lycoris_transformer_blocks_0_attn_to_k", "kohya", h, h, 16, alpha=16)
    w.pair("lycoris_single_transformer_blocks_0_proj_out", "kohya", h, 5 * h, 16, alpha=16)
    m = "lycoris_transformer_blocks_0_ff_net_0_proj"
    w.raw(f"{m}.lokr_w1", (4, 4), module=m)
    w.raw(f"{m}.lokr_w2_a", (4 * h // 4, 4), module=m)
    w.raw(f"{m}.lokr_w2_b", (4, h // 4), module=m)
    w.scalar(f"{m}.alpha", 4)
    lyco = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 16, "linear_alpha": 16, "factor": 4}
    return w.save(folder / "simpletuner_lycoris.safetensors", {"lycoris_config": json.dumps(lyco)})


def diffsynth_qwen(folder: Path) -> Built:
    """DiffSynth-Studio Qwen-Image: `X.lora_A.default.weight` (PEFT adapter name kept), no prefix, no alpha."""
    w = _Writer(torch.bfloat16, 27)
    for name in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_v_proj", "attn.to_out.0"):
        w.pair(f"transformer_blocks.0.{name}", "adapter", 48, 48, 16)
    w.pair("transformer_blocks.1.img_mlp.net.0.proj", "adapter", 192, 48, 16)
    return w.save(folder / "diffsynth_qwen.safetensors", None)


def diffpipe_hunyuan(folder: Path) -> Built:
    """diffusion-pipe HunyuanVideo (original module names under `diffusion_model.`, lora_A/lora_B, no
    alpha), read by diffusers' _convert_hunyuan_video_lora_to_diffusers; with a conv3d patch-embedding
    LoRA (img_in.proj, kernel (1, 2, 2): down (r, C, 1, 2, 2), up (H, r, 1, 1, 1)).
    single_blocks linear1 keeps the real 3 x 3072 rows for q/k/v, where the converter splits it."""
    h, w = FLUX_H, _Writer(torch.bfloat16, 28)
    d = "diffusion_model.double_blocks.0"
    w.pair(f"{d}.img_attn_qkv", "peft", 3 * h, h, 8)
    w.pair(f"{d}.img_attn_proj", "peft", h, h, 8)
    w.pair(f"{d}.img_mlp.fc1", "peft", 4 * h, h, 8)
    w.pair(f"{d}.txt_attn_qkv", "peft", 3 * h, h, 8)
    w.pair(f"{d}.txt_mod.linear", "peft", 6 * h, h, 8)
    w.pair("diffusion_model.single_blocks.0.linear1", "peft", 3 * 3072 + 64, 16, 4)
    w.pair("diffusion_model.single_blocks.0.linear2", "peft", h, 5 * h, 8)
    w.pair("diffusion_model.img_in.proj", "peft", h, 16, 8, kernel=(1, 2, 2))
    return w.save(folder / "diffpipe_hunyuan.safetensors", None)


def lumina2(folder: Path) -> Built:
    """Lumina 2 in the `diffusion_model.` + lora_A/lora_B layout diffusers' _convert_non_diffusers_lumina2
    reads: per block attention.qkv (split 2304/768/768 by the converter), attention.out,
    feed_forward.w1..w3, adaLN_modulation.1 (all required)."""
    w = _Writer(torch.bfloat16, 29)
    b = "diffusion_model.layers.0"
    w.pair(f"{b}.attention.qkv", "peft", 2304 + 768 + 768, 24, 8)
    w.pair(f"{b}.attention.out", "peft", 24, 24, 8)
    w.pair(f"{b}.feed_forward.w1", "peft", 64, 24, 8)
    w.pair(f"{b}.feed_forward.w2", "peft", 24, 64, 8)
    w.pair(f"{b}.feed_forward.w3", "peft", 64, 24, 8)
    w.pair(f"{b}.adaLN_modulation.1", "peft", 96, 24, 8)
    return w.save(folder / "lumina2.safetensors", None)


def hidream(folder: Path) -> Built:
    """HiDream-I1 (ai-toolkit / diffusion-pipe): every key under `diffusion_model.`, lora_A/lora_B."""
    w = _Writer(torch.bfloat16, 30)
    d = "diffusion_model.double_stream_blocks.0.block"
    for name in ("attn1.to_q", "attn1.to_k", "attn1.to_out"):
        w.pair(f"{d}.{name}", "peft", 40, 40, 8)
    w.pair(f"{d}.ff_i.shared_experts.w1", "peft", 96, 40, 8)
    w.pair("diffusion_model.single_stream_blocks.0.block.attn1.to_v", "peft", 40, 40, 8)
    return w.save(folder / "hidream.safetensors", None)


def ltx_video(folder: Path) -> Built:
    """LTX-Video (LTX-Video-Trainer / ComfyUI): `diffusion_model.transformer_blocks.N.attn1.to_q` ..."""
    w = _Writer(torch.bfloat16, 31)
    b = "diffusion_model.transformer_blocks.0"
    w.pair(f"{b}.attn1.to_q", "peft", 64, 64, 16)
    w.pair(f"{b}.attn1.to_out.0", "peft", 64, 64, 16)
    w.pair(f"{b}.attn2.to_k", "peft", 64, 40, 16)
    w.pair(f"{b}.ff.net.0.proj", "peft", 256, 64, 16)
    w.pair(f"{b}.ff.net.2", "peft", 64, 256, 16)
    return w.save(folder / "ltx_video.safetensors", None)


def fal_kontext(folder: Path) -> Built:
    """fal's Flux Kontext trainer: ONE file with PEFT's `base_model.model.` keys and no adapter_config.json.
    diffusers' _convert_fal_kontext_lora_to_diffusers needs all 19 double and 38 single blocks and the
    final layer, and splits linear1 at the real widths (3 x 3072 + 12288 rows)."""
    w, h, r = _Writer(torch.bfloat16, 32), 16, 4
    p = "base_model.model."
    for i in range(19):
        d = f"{p}double_blocks.{i}"
        for side in ("img", "txt"):
            w.pair(f"{d}.{side}_mod.lin", "peft", 6 * h, h, r)
            w.pair(f"{d}.{side}_attn.qkv", "peft", 3 * h, h, r)
            w.pair(f"{d}.{side}_attn.proj", "peft", h, h, r)
            w.pair(f"{d}.{side}_mlp.0", "peft", 4 * h, h, r)
            w.pair(f"{d}.{side}_mlp.2", "peft", h, 4 * h, r)
    for i in range(38):
        s = f"{p}single_blocks.{i}"
        w.pair(f"{s}.modulation.lin", "peft", 3 * h, h, r)
        w.pair(f"{s}.linear1", "peft", 3 * 3072 + 12288, 8, r)
        w.pair(f"{s}.linear2", "peft", h, 5 * h, r)
    w.pair(f"{p}final_layer.linear", "peft", 16, h, r)
    return w.save(folder / "fal_kontext.safetensors", None)


def xlabs_flux(folder: Path) -> Built:
    """XLabs Flux: double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight, no alpha (scale 1)."""
    h, w = FLUX_H, _Writer(torch.float32, 33)
    for i in range(2):
        p = f"double_blocks.{i}.processor"
        w.pair(f"{p}.qkv_lora1", "updown", 3 * h, h, 16)
        w.pair(f"{p}.proj_lora1", "updown", h, h, 16)
        w.pair(f"{p}.qkv_lora2", "updown", 3 * h, h, 16)
        w.pair(f"{p}.proj_lora2", "updown", h, h, 16)
    return w.save(folder / "xlabs_flux.safetensors", None)


def mochi(folder: Path) -> Built:
    """genmo's Mochi LoRA trainer: bare `X.lora_A` / `X.lora_B` parameters (no `.weight`), no alpha."""
    w = _Writer(torch.bfloat16, 34)
    for i in range(2):
        w.pair(f"blocks.{i}.attn.qkv_x", "bare", 3 * 48, 48, 16)
        w.pair(f"blocks.{i}.attn.proj_x", "bare", 48, 48, 16)
    return w.save(folder / "mochi.safetensors", None)


def control_lora(folder: Path) -> Built:
    """Stability's SDXL Control-LoRA: bare `X.down` / `X.up` factors beside full (non-LoRA) weights."""
    w = _Writer(torch.float16, 35)
    w.pair("input_blocks.4.1.proj_in", "updown_bare", 64, 64, 16)
    w.pair("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "updown_bare", 64, 64, 16)
    w.pair("middle_block.0.in_layers.2", "updown_bare", 64, 64, 8, kernel=(3, 3))
    w.raw("input_hint_block.0.weight", (16, 3, 3, 3))
    w.raw("input_hint_block.0.bias", (16,))
    w.raw("input_blocks.0.0.bias", (64,))
    return w.save(folder / "control_lora.safetensors", {"lora_version": "1.0"})


def wan_comfy_conv3d(folder: Path) -> Built:
    """A ComfyUI-style Wan control LoRA (kijai): `diffusion_model.` + lora_down/lora_up/alpha, a conv3d
    patch_embedding LoRA (down (r, C, 1, 2, 2), up (H, r, 1, 1, 1)), `.diff_b` bias patches and a
    norm `.diff`. diffusers' Wan converter refuses the patch_embedding keys: no pipeline."""
    w = _Writer(torch.bfloat16, 36)
    w.pair("diffusion_model.patch_embedding", "kohya", WAN_H, 20, 16, kernel=(1, 2, 2), alpha=16)
    for o in "qkvo":
        w.pair(f"diffusion_model.blocks.0.self_attn.{o}", "kohya", WAN_H, WAN_H, 16, alpha=16)
    w.raw("diffusion_model.blocks.0.self_attn.q.diff_b", (WAN_H,))
    w.raw("diffusion_model.blocks.0.norm3.diff", (WAN_H,))
    w.raw("diffusion_model.blocks.0.norm3.diff_b", (WAN_H,))
    return w.save(folder / "wan_comfy_conv3d.safetensors", None)


def wan_lightx2v(folder: Path) -> Built:
    """Wan in the original-module layout (`diffusion_model.blocks.N.self_attn.q.lora_down.weight` + alpha,
    `.diff_b` as lightx2v's distill LoRAs carry), read by diffusers' _convert_non_diffusers_wan_lora_to_diffusers."""
    w = _Writer(torch.bfloat16, 37)
    b = "diffusion_model.blocks.0"
    for o in "qkvo":
        w.pair(f"{b}.self_attn.{o}", "kohya", WAN_H, WAN_H, 16, alpha=8)
    for o in "qkvo":
        w.pair(f"{b}.cross_attn.{o}", "kohya", WAN_H, WAN_TEXT if o in "kv" else WAN_H, 16, alpha=8)
    w.pair(f"{b}.ffn.0", "kohya", WAN_FFN, WAN_H, 16, alpha=8)
    w.pair(f"{b}.ffn.2", "kohya", WAN_H, WAN_FFN, 16, alpha=8)
    w.raw(f"{b}.self_attn.q.diff_b", (WAN_H,))
    w.raw(f"{b}.ffn.2.diff_b", (WAN_H,))
    return w.save(folder / "wan_lightx2v.safetensors", None)


def lycoris_sdxl_mixed(folder: Path) -> Built:
    """LyCORIS (lycoris.kohya) on SDXL: plain LoRA modules beside LoHa, LoKr, Tucker (lora_mid) and DoRA
    (dora_scale) modules, `.diff` / `.diff_b` patches and w_norm/b_norm norms, all to pass through."""
    w = _Writer(torch.float16, 38)
    b = "lora_unet_input_blocks_4_1_transformer_blocks_0"
    w.pair(f"{b}_attn1_to_q", "kohya", 64, 64, 16, alpha=8)
    w.pair(f"{b}_attn1_to_k", "kohya", 64, 64, 16, alpha=8)
    w.pair("lora_unet_input_blocks_4_0_in_layers_2", "kohya", 32, 32, 8, kernel=(3, 3), alpha=4)
    m = f"{b}_attn1_to_v"  # LoHa
    for part, shape in (("hada_w1_a", (64, 4)), ("hada_w1_b", (4, 64)), ("hada_w2_a", (64, 4)),
                        ("hada_w2_b", (4, 64))):  # fmt: skip
        w.raw(f"{m}.{part}", shape, module=m)
    w.scalar(f"{m}.alpha", 4)
    m = f"{b}_ff_net_2"  # LoKr, both factors full (alpha unused)
    w.raw(f"{m}.lokr_w1", (8, 8), module=m)
    w.raw(f"{m}.lokr_w2", (8, 32), module=m)
    m = "lora_unet_input_blocks_5_0_in_layers_2"  # Tucker conv
    w.raw(f"{m}.lora_up.weight", (32, 4, 1, 1), module=m)
    w.raw(f"{m}.lora_mid.weight", (4, 4, 3, 3), module=m)
    w.raw(f"{m}.lora_down.weight", (4, 32, 1, 1), module=m)
    w.scalar(f"{m}.alpha", 4)
    m = f"{b}_attn2_to_out_0"  # DoRA, LyCORIS >= 2024-12: per-output magnitude (out, 1)
    w.raw(f"{m}.lora_up.weight", (64, 8), module=m)
    w.raw(f"{m}.lora_down.weight", (8, 64), module=m)
    w.scalar(f"{m}.alpha", 8)
    w.raw(f"{m}.dora_scale", (64, 1), module=m)
    w.raw(f"{b}_norm1.w_norm", (64,))
    w.raw(f"{b}_norm1.b_norm", (64,))
    w.raw("lora_unet_out_0.diff", (64,))
    w.raw("lora_unet_out_0.diff_b", (64,))
    meta = _kohya_meta("lycoris.kohya", "sdxl_base_v1-0", 16, 8,
                       ss_network_args=json.dumps({"algo": "locon", "conv_dim": "8", "conv_alpha": "4"}))
    return w.save(folder / "lycoris_sdxl_mixed.safetensors", meta)


# ---------------------------------------------------------------------------------------------
# diffusers training scripts


SDXL_UNET = "down_blocks.1.attentions.0.transformer_blocks.0"


def diffusers_sdxl(folder: Path) -> Built:
    """train_dreambooth_lora_sdxl.py / save_lora_weights: `unet.` / `text_encoder.` / `text_encoder_2.` +
    lora_A/lora_B, fp32, with `lora_adapter_metadata` whose lora_alpha != r (plus rank/alpha patterns)."""
    w = _Writer(torch.float32, 41)
    unet = [f"{SDXL_UNET}.attn1.to_q", f"{SDXL_UNET}.attn1.to_out.0", f"{SDXL_UNET}.attn2.to_k",
            "up_blocks.0.attentions.0.transformer_blocks.1.attn1.to_v"]  # fmt: skip
    for path in unet:
        w.pair(f"unet.{path}", "peft", 64, 80 if "attn2.to_k" in path else 64, 4 if "attn2" in path else 8)
    te = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.self_attn.v_proj"]
    for path in te:
        w.pair(f"text_encoder.{path}", "peft", 48, 48, 8)
    w.pair(f"text_encoder_2.{te[0]}", "peft", 40, 40, 8)
    configs = {
        "unet": _diffusers_config(["to_q", "to_k", "to_v", "to_out.0"], 8, 4,
                                  {f"{SDXL_UNET}.attn2.to_k": 4}, {f"{SDXL_UNET}.attn2.to_k": 6}),
        "text_encoder": _diffusers_config(["q_proj", "v_proj"], 8, 12),
        "text_encoder_2": _diffusers_config(["q_proj", "v_proj"], 8, 16),
    }
    meta = {"format": "pt", "lora_adapter_metadata": _pack(configs)}
    return w.save(folder / "diffusers_sdxl.safetensors", meta, diffusers_metadata=True)


def diffusers_sd3(folder: Path) -> Built:
    """train_dreambooth_lora_sd3.py: `transformer.transformer_blocks.N.attn.*` + lora_A/lora_B, fp16,
    metadata lora_alpha 4 != r 8."""
    w = _Writer(torch.float16, 42)
    b = "transformer_blocks.0"
    paths = [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.attn.to_out.0", f"{b}.attn.add_q_proj",
             "transformer_blocks.1.attn.to_add_out"]  # fmt: skip
    for path in paths:
        w.pair(f"transformer.{path}", "peft", 48, 48, 8)
    configs = {"transformer": _diffusers_config(["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out"],
                                                8, 4)}  # fmt: skip
    meta = {"format": "pt", "lora_adapter_metadata": _pack(configs)}
    return w.save(folder / "diffusers_sd3.safetensors", meta, diffusers_metadata=True)


# The tiny SD1.5 pipeline of tests/_tiny_models.py: these names and widths exist in it, so the
# legacy file below also loads there (defect 6).
TINY_SD_UNET = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (64, 32),
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": (64, 64),
    "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v": (64, 64),
}
TINY_SD_TE = {
    "text_model.encoder.layers.0.self_attn.q_proj": (32, 32),
    "text_model.encoder.layers.1.self_attn.v_proj": (32, 32),
}


def diffusers_legacy_sd15(folder: Path) -> Built:
    """What convert_state_dict_to_diffusers(get_peft_model_state_dict(...)) still emits: UNet
    `X.lora.down.weight` / `X.lora.up.weight`, text encoder `X.lora_linear_layer.down.weight`, fp32,
    WITH lora_adapter_metadata whose lora_alpha != r (and a rank/alpha pattern)."""
    w = _Writer(torch.float32, 43)
    odd = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    for path, (out, inp) in TINY_SD_UNET.items():
        w.pair(f"unet.{path}", "legacy", out, inp, 4 if path == odd else 8)
    for path, (out, inp) in TINY_SD_TE.items():
        w.pair(f"text_encoder.{path}", "linear_layer", out, inp, 8)
    configs = {
        "unet": _diffusers_config(["to_q", "to_k", "to_v", "to_out.0"], 8, 16, {odd: 4}, {odd: 2}),
        "text_encoder": _diffusers_config(["q_proj", "v_proj"], 8, 4),
    }
    meta = {"format": "pt", "lora_adapter_metadata": _pack(configs)}
    return w.save(folder / "diffusers_legacy_sd15.safetensors", meta, diffusers_metadata=True)


# ---------------------------------------------------------------------------------------------
# PEFT adapter folders (written by PEFT itself)


def tiny_llama(seed: int = 0):
    """A tiny LlamaForCausalLM from a config (offline): vocab 64, width 32, 2 layers, GQA 4/2 heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config)


PEFT_TARGETS = ["q_proj", "v_proj", "o_proj", "embed_tokens"]


def _peft_folder(folder: Path, name: str, seed: int, **config: object) -> Built:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    lcfg = LoraConfig(init_lora_weights=False, **config)  # type: ignore[arg-type]
    model = get_peft_model(tiny_llama(), lcfg)
    gen = torch.Generator().manual_seed(seed)
    reduced, passed, i = [], [], 0
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        scale = layer.scaling["default"]
        if "default" in layer.lora_embedding_A:
            a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        else:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        up, down = factors(b.shape[0], a.shape[1], a.shape[0], DECAYS[i % len(DECAYS)], gen)
        i += 1
        with torch.no_grad():
            b.copy_(up / scale)  # scale * B @ A carries the planted spectrum
            a.copy_(down)
        (passed if getattr(layer, "use_dora", {}).get("default") else reduced).append(path)
    out = folder / name
    model.save_pretrained(out)
    return Built(out, tuple(reduced), tuple(passed))


def peft_llm(folder: Path) -> Built:
    """PeftModel.save_pretrained of a tiny Llama: q/v/o LoRAs, an embedding LoRA (lora_embedding_A/B,
    no `.weight`), modules_to_save (lm_head), rank_pattern and alpha_pattern."""
    return _peft_folder(folder, "peft_llm", 51, r=8, lora_alpha=16, target_modules=PEFT_TARGETS,
                        rank_pattern={"model.layers.1.self_attn.v_proj": 4, "o_proj": 6},
                        alpha_pattern={"v_proj": 8, "embed_tokens": 4}, modules_to_save=["lm_head"])  # fmt: skip


def peft_llm_rslora(folder: Path) -> Built:
    """The same with rsLoRA (scale lora_alpha / sqrt(r)) and a pattern keyed by a short suffix."""
    return _peft_folder(folder, "peft_llm_rslora", 52, r=8, lora_alpha=8, use_rslora=True,
                        target_modules=PEFT_TARGETS, rank_pattern={"q_proj": 4},
                        alpha_pattern={"layers.0.self_attn.q_proj": 2}, modules_to_save=["lm_head"])  # fmt: skip


def peft_llm_dora(folder: Path) -> Built:
    """A DoRA adapter (use_dora: every layer has lora_magnitude_vector): nothing may be SVD-reduced."""
    return _peft_folder(folder, "peft_llm_dora", 53, r=8, lora_alpha=16, use_dora=True,
                        target_modules=["q_proj", "v_proj"])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# A plain kohya file whose safetensors header length starts with the pickle magic bytes


def kohya_with_header_length(path: Path, header_len: int) -> Built:
    """A valid kohya file whose 8-byte header length is exactly `header_len` (640, 896, 1152 or 1408:
    the file then starts 80 02..80 05, a pickle's protocol magic). The metadata is padded to fit."""
    w = _Writer(torch.float16, 60 + header_len)
    w.pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "kohya", 32, 32, 8, alpha=4)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4", "pad": ""}
    for _ in range(64):
        save_file(w.tensors, str(path), metadata=meta)
        n = struct.unpack("<Q", path.read_bytes()[:8])[0]
        if n == header_len:
            return Built(path, tuple(w.reduced), alpha_keys=True)
        if n > header_len and not meta["pad"]:
            break
        # safetensors pads the JSON with spaces to a multiple of 8: aim at the unpadded length
        meta["pad"] = "x" * max(0, len(meta["pad"]) + header_len - n - 7)
    raise AssertionError(f"could not pad {path} to a {header_len}-byte header")


# ---------------------------------------------------------------------------------------------
# The registry


LAYOUTS: tuple[Layout, ...] = (
    Layout("kohya_sd15", kohya_sd15, "StableDiffusionPipeline", torch.float16, "sd-scripts networks.lora + LoCon"),
    Layout("kohya_sd15_alpha0", kohya_sd15_alpha0, None, torch.float16, "sd-scripts: alpha 0 = rank"),
    Layout("kohya_sdxl", kohya_sdxl, "StableDiffusionXLPipeline", torch.float16, "sd-scripts SDXL (SGM names)"),
    Layout("kohya_sdxl_noalpha", kohya_sdxl_noalpha, "StableDiffusionXLPipeline", torch.float16,
           "kohya names, no alpha keys"),
    Layout("comfy_extract", comfy_extract, None, torch.float16, "ComfyUI Extract and Save Lora"),
    Layout("kohya_flux", kohya_flux, "FluxPipeline", torch.bfloat16, "sd-scripts networks.lora_flux"),
    Layout("kohya_chroma", kohya_chroma, "ChromaPipeline", torch.bfloat16, "sd-scripts lora_flux on Chroma"),
    Layout("kohya_zimage", kohya_zimage, "ZImagePipeline", torch.bfloat16, "sd-scripts/musubi Z-Image"),
    Layout("musubi_wan", musubi_wan, "WanPipeline", torch.bfloat16, "musubi-tuner networks.lora_wan"),
    Layout("musubi_hunyuan", musubi_hunyuan, None, torch.bfloat16, "musubi-tuner HunyuanVideo"),
    Layout("musubi_qwen", musubi_qwen, "QwenImagePipeline", torch.bfloat16, "musubi-tuner Qwen-Image"),
    Layout("aitoolkit_flux", aitoolkit_flux, "FluxPipeline", torch.bfloat16, "ai-toolkit Flux.1"),
    Layout("thelastben_flux", thelastben_flux, "FluxPipeline", torch.float16,
           "transformer. + alpha keys + lora_B.bias"),
    Layout("aitoolkit_flux2", aitoolkit_flux2, "Flux2Pipeline", torch.bfloat16, "ai-toolkit Flux.2"),
    Layout("aitoolkit_qwen", aitoolkit_qwen, "QwenImagePipeline", torch.bfloat16, "ai-toolkit Qwen-Image"),
    Layout("onetrainer_flux", onetrainer_flux, "FluxPipeline", torch.bfloat16, "OneTrainer Flux"),
    Layout("onetrainer_sdxl", onetrainer_sdxl, "StableDiffusionXLPipeline", torch.float32, "OneTrainer SDXL"),
    Layout("simpletuner_lycoris", simpletuner_lycoris, None, torch.bfloat16, "SimpleTuner LyCORIS (lycoris_)"),
    Layout("diffsynth_qwen", diffsynth_qwen, "QwenImagePipeline", torch.bfloat16, "DiffSynth-Studio"),
    Layout("diffpipe_hunyuan", diffpipe_hunyuan, "HunyuanVideoPipeline", torch.bfloat16, "diffusion-pipe"),
    Layout("lumina2", lumina2, "Lumina2Pipeline", torch.bfloat16, "Lumina 2 diffusion_model."),
    Layout("hidream", hidream, "HiDreamImagePipeline", torch.bfloat16, "HiDream diffusion_model."),
    Layout("ltx_video", ltx_video, "LTXPipeline", torch.bfloat16, "LTX-Video diffusion_model."),
    Layout("fal_kontext", fal_kontext, "FluxKontextPipeline", torch.bfloat16, "fal Flux Kontext trainer"),
    Layout("xlabs_flux", xlabs_flux, "FluxPipeline", torch.float32, "XLabs Flux"),
    Layout("mochi", mochi, "MochiPipeline", torch.bfloat16, "genmo Mochi trainer (bare lora_A/lora_B)"),
    Layout("control_lora", control_lora, None, torch.float16, "Stability Control-LoRA (bare down/up)"),
    Layout("wan_comfy_conv3d", wan_comfy_conv3d, None, torch.bfloat16, "ComfyUI/kijai Wan + conv3d"),
    Layout("wan_lightx2v", wan_lightx2v, "WanPipeline", torch.bfloat16, "lightx2v Wan (diffusion_model.)"),
    Layout("lycoris_sdxl_mixed", lycoris_sdxl_mixed, None, torch.float16, "LyCORIS lycoris.kohya"),
    Layout("diffusers_sdxl", diffusers_sdxl, "StableDiffusionXLPipeline", torch.float32, "diffusers SDXL script"),
    Layout("diffusers_sd3", diffusers_sd3, "StableDiffusion3Pipeline", torch.float16, "diffusers SD3 script"),
    Layout("diffusers_legacy_sd15", diffusers_legacy_sd15, "StableDiffusionPipeline", torch.float32,
           "convert_state_dict_to_diffusers + metadata"),
    Layout("peft_llm", peft_llm, None, torch.float32, "PEFT save_pretrained"),
    Layout("peft_llm_rslora", peft_llm_rslora, None, torch.float32, "PEFT save_pretrained, rsLoRA"),
)
SINGLE_FILE_LAYOUTS = tuple(layout for layout in LAYOUTS if not layout.name.startswith("peft"))
