"""Tiny, seeded, offline Stable Diffusion parts and LoRA files that match them, for the client tests.

Everything is built from configs in code (no hub access). The LoRA factors are planted so each
module's update B.A has a known, decaying spectrum whose decay rate differs per module; a dynamic
rank rule (fro 0.9) therefore picks different ranks for different modules.

The file readers here (`file_deltas`) follow the loaders' documented rules (reference/formats.md
section 1) and share no code with lorad, so they are an independent account of what a file means.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # set before diffusers/transformers import: never reach the hub

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_RANK, UNET_ALPHA = 16, 8.0  # scale 0.5
TE_RANK, TE_ALPHA = 8, 12.0  # scale 1.5: a different scale per component, so a mix-up shows
SEED = 1234


# ---------------------------------------------------------------------------------------------
# The tiny pipeline


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def offline_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer over single bytes (no merges); every word ends in a `</w>` token."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    )  # fmt: skip


def tiny_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=vocab_size, projection_dim=32, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )  # fmt: skip
    return CLIPTextModel(config)


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )  # fmt: skip


def tiny_pipeline(seed: int = SEED) -> StableDiffusionPipeline:
    """The same weights for the same seed, so every fresh pipeline shares one base."""
    torch.manual_seed(seed)
    tokenizer = offline_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer,
        unet=tiny_unet(), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fresh_unet(seed: int = SEED) -> UNet2DConditionModel:
    return tiny_pipeline(seed).unet


# ---------------------------------------------------------------------------------------------
# Planted spectra


def planted_factors(out_f: int, in_f: int, rank: int, decay: float, gen: torch.Generator):
    """Factors (up, down) whose product is Qb.diag(s).Qa^T, s_i = 0.2*exp(-decay*i) + 1e-4 (a floor).

    A random well-conditioned r x r mixer G sits between them (up = Qb.diag(s).G,
    down = G^-1.Qa^T) so neither factor is orthonormal: a reducer must really decompose them.
    """
    qb, _ = torch.linalg.qr(torch.randn(out_f, rank, generator=gen, dtype=torch.float64))
    qa, _ = torch.linalg.qr(torch.randn(in_f, rank, generator=gen, dtype=torch.float64))
    s = 0.2 * torch.exp(-decay * torch.arange(rank, dtype=torch.float64)) + 1e-4
    rot, _ = torch.linalg.qr(torch.randn(rank, rank, generator=gen, dtype=torch.float64))
    mixer = rot * torch.linspace(0.5, 2.0, rank, dtype=torch.float64)
    up = (qb * s) @ mixer
    down = torch.linalg.solve(mixer, qa.T)
    return up.float(), down.float()


def _decays(count: int) -> list[float]:
    """Geometric, slow to fast, across modules: fro-0.9 ranks then spread from about 12 down to 1."""
    return [0.02 * 75 ** (i / max(count - 1, 1)) for i in range(count)]


def plant_lora_weights(model: torch.nn.Module, adapter: str = "default", seed: int = SEED) -> None:
    """Overwrite every LoRA layer's A/B of `model` with planted factors (seeded, per-module decay)."""
    layers = _lora_layers(model)
    gen = torch.Generator().manual_seed(seed)
    decays = _decays(len(layers))
    order = torch.randperm(len(layers), generator=gen).tolist()  # decay not tied to depth
    for (_, layer), which in zip(layers, order):
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        scale = layer.scaling[adapter]
        up, down = planted_factors(b.shape[0], a.shape[1], a.shape[0], decays[which], gen)
        with torch.no_grad():
            b.copy_(up / scale)  # so scale.B.A carries the planted spectrum exactly
            a.copy_(down)


# ---------------------------------------------------------------------------------------------
# The LoRA files (diffusers, kohya, PEFT; variants without metadata or alphas)


def unet_lora_config(rank: int = UNET_RANK, alpha: float = UNET_ALPHA) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS)


def te_lora_config() -> LoraConfig:
    return LoraConfig(r=TE_RANK, lora_alpha=TE_ALPHA, init_lora_weights=False, target_modules=TE_TARGETS)


def trained_pipeline() -> StableDiffusionPipeline:
    """A tiny pipeline with planted LoRA adapters on its UNet and text encoder."""
    pipe = tiny_pipeline()
    pipe.unet.add_adapter(unet_lora_config())
    pipe.text_encoder.add_adapter(te_lora_config())
    plant_lora_weights(pipe.unet, seed=SEED + 1)
    plant_lora_weights(pipe.text_encoder, seed=SEED + 2)
    return pipe


def write_diffusers_lora(pipe: StableDiffusionPipeline, folder: Path, with_metadata: bool = True) -> Path:
    """The genuine diffusers way: save_lora_weights, by default with each component's full LoraConfig
    as metadata. Without it the file loads at scale 1 (lora_alpha is lost; formats.md rule 5)."""
    name = "tiny_diffusers.safetensors" if with_metadata else "tiny_diffusers_nometa.safetensors"
    configs = {c: getattr(pipe, c).peft_config["default"].to_dict() if with_metadata else None
               for c in ("unet", "text_encoder")}  # fmt: skip
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=configs["unet"],
        text_encoder_lora_adapter_metadata=configs["text_encoder"],
        weight_name=name,
    )
    return folder / name


def kohya_name(component: str, module_path: str) -> str:
    """sd-scripts' names: SD1 UNet in diffusers paths, TE in the transformers-4 `text_model.` form."""
    if component == "unet":
        return "lora_unet_" + module_path.replace(".", "_")
    return "lora_te_text_model_" + module_path.replace(".", "_")


def write_kohya_lora(pipe: StableDiffusionPipeline, path: Path, with_alpha: bool = True) -> Path:
    """A kohya file for the same modules: lora_down/lora_up/alpha, alpha != rank so scale matters.
    Without alpha keys every loader takes alpha = rank (scale 1), as ComfyUI's extractor writes."""
    tensors: dict[str, torch.Tensor] = {}
    for component in ("unet", "text_encoder"):
        for module_path, layer in _lora_layers(getattr(pipe, component)):
            name = kohya_name(component, module_path)
            tensors[f"{name}.lora_down.weight"] = layer.lora_A["default"].weight.detach().clone()
            tensors[f"{name}.lora_up.weight"] = layer.lora_B["default"].weight.detach().clone()
            if with_alpha:
                tensors[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha["default"]))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(UNET_RANK),
                "ss_network_alpha": str(UNET_ALPHA), "ss_base_model_version": "sd_v1"}  # fmt: skip
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_peft_dir(folder: Path) -> Path:
    """A native PEFT adapter directory for the tiny UNet (PeftModel.save_pretrained)."""
    model = get_peft_model(fresh_unet(), unet_lora_config())
    plant_lora_weights(model, seed=SEED + 3)
    model.save_pretrained(folder)
    return folder


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


# ---------------------------------------------------------------------------------------------
# What a file means, by the format rules (independent of lorad and of the loaders' code)


@dataclass(frozen=True)
class FileModule:
    target: str  # "<component>.<module path in the tiny model>", e.g. "unet.down_blocks.1...to_q"
    rank: int  # rows of down / lora_A
    delta: torch.Tensor  # float64 scale.B.A


def file_deltas(path: Path) -> dict[str, FileModule]:
    """{module name as the file spells it: FileModule} for a kohya or diffusers file, or a PEFT dir."""
    if path.is_dir():
        return _peft_dir_deltas(path)
    tensors, metadata = read_file(path)
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in tensors):
        return _kohya_deltas(tensors)
    return _diffusers_deltas(tensors, metadata)


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


@functools.cache
def _kohya_targets() -> dict[str, str]:
    """{kohya module name: "<component>.<path>"} for every Linear of the tiny UNet and text encoder."""
    pipe = tiny_pipeline()
    out = {}
    for component in ("unet", "text_encoder"):
        for path, module in getattr(pipe, component).named_modules():
            if isinstance(module, torch.nn.Linear):
                out[kohya_name(component, path)] = f"{component}.{path}"
    return out


def _kohya_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, FileModule]:
    """sd-scripts rule: scale = alpha / down.shape[0]; a missing or zero alpha means alpha = rank."""
    out = {}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        down, up = tensors[key].double(), tensors[f"{name}.lora_up.weight"].double()
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else 0.0
        scale = (alpha or rank) / rank
        out[name] = FileModule(_kohya_targets()[name], rank, scale * up @ down)
    return out


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern key k with re.match(rf"(.*\\.)?({k})$", module)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _diffusers_deltas(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, FileModule]:
    """Scale from lora_adapter_metadata (r/lora_alpha + patterns) when present, else alpha keys, else 1."""
    config = json.loads(metadata["lora_adapter_metadata"]) if "lora_adapter_metadata" in metadata else None
    out = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")]
        component, _, module = name.partition(".")
        module = module.removeprefix("text_model.")  # transformers 5 dropped it; diffusers strips it
        down, up = tensors[key].double(), tensors[f"{name}.lora_B.weight"].double()
        rank = down.shape[0]
        scale = _diffusers_scale(config, tensors, component, module, name, rank)
        out[name] = FileModule(f"{component}.{module}", rank, scale * up @ down)
    return out


def _diffusers_scale(config, tensors, component: str, module: str, name: str, rank: int) -> float:
    if config is not None:
        r = _pattern_value(config.get(f"{component}.rank_pattern") or {}, module, config[f"{component}.r"])
        alpha = _pattern_value(config.get(f"{component}.alpha_pattern") or {}, module,
                               config[f"{component}.lora_alpha"])  # fmt: skip
        assert r == rank, f"{name}: metadata says rank {r}, tensors have {rank}"
        return alpha / r
    if f"{name}.alpha" in tensors:
        return float(tensors[f"{name}.alpha"]) / rank
    return 1.0


def _peft_dir_deltas(folder: Path) -> dict[str, FileModule]:
    """PEFT rule: scale = lora_alpha / r (or / sqrt(r) with rsLoRA), r and alpha from the patterns."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors, _ = read_file(folder / "adapter_model.safetensors")
    out = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")]
        module = name.removeprefix("base_model.model.")
        down, up = tensors[key].double(), tensors[f"{name}.lora_B.weight"].double()
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        assert r == down.shape[0], f"{module}: config says rank {r}, tensors have {down.shape[0]}"
        scale = alpha / (r**0.5 if config.get("use_rslora") else r)
        out[name] = FileModule(f"unet.{module}", r, scale * up @ down)
    return out


# ---------------------------------------------------------------------------------------------
# What a loader made of it


@dataclass(frozen=True)
class LoadedModule:
    rank: int  # rows of the instantiated lora_A
    delta: torch.Tensor  # float64 delta the layer adds to its base weight


def loaded_deltas(**components: torch.nn.Module) -> dict[str, LoadedModule]:
    """{"<component>.<module path>": LoadedModule} for every LoRA layer with an active adapter."""
    out = {}
    for component, model in components.items():
        for path, layer in _lora_layers(model):
            path = path.removeprefix("base_model.model.")
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    rank = layer.lora_A[adapter].weight.shape[0]
                    delta = layer.get_delta_weight(adapter).detach().double()
                    out[f"{component}.{path}"] = LoadedModule(rank, delta)
    return out


def load_with_diffusers(path: Path) -> dict[str, LoadedModule]:
    """`pipe.load_lora_weights(file)` into a fresh tiny pipeline; what each layer now adds."""
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(path))
    return loaded_deltas(unet=pipe.unet, text_encoder=pipe.text_encoder)


def load_with_peft(folder: Path) -> dict[str, LoadedModule]:
    """`PeftModel.from_pretrained(fresh UNet, folder)`; what each layer now adds."""
    model = PeftModel.from_pretrained(fresh_unet(), str(folder))
    return loaded_deltas(unet=model)


def mismatches(meant: dict[str, FileModule], loaded: dict[str, LoadedModule], tol: float = 1e-5) -> list[str]:
    """Each way the loader's result differs from the file's meaning; [] when they agree."""
    by_target = {m.target: m for m in meant.values()}
    problems = [f"not loaded: {t}" for t in sorted(by_target.keys() - loaded.keys())]
    problems += [f"loaded but not in file: {t}" for t in sorted(loaded.keys() - by_target.keys())]
    for target in sorted(by_target.keys() & loaded.keys()):
        want, got = by_target[target], loaded[target]
        rel = float((got.delta - want.delta).abs().max() / want.delta.abs().max())
        if got.rank != want.rank:
            problems.append(f"{target}: rank {got.rank} loaded, {want.rank} in file")
        if not rel <= tol:
            problems.append(f"{target}: loaded delta off by {rel:.2e} (relative to max |delta|)")
    return problems


# ---------------------------------------------------------------------------------------------
# Reference math and hand-made reduced files (the negative controls)


def fro_rank(delta: torch.Tensor, ratio: float) -> int:
    """Smallest k whose best rank-k approximation keeps ||dW_k||/||dW|| >= ratio (exact SVD)."""
    energy = torch.linalg.svdvals(delta) ** 2
    kept = torch.sqrt(energy.cumsum(0) / energy.sum())
    return int((kept < ratio).sum()) + 1


def best_rank_k_retained(delta: torch.Tensor, k: int) -> float:
    """||dW_k||_F / ||dW||_F for the best rank-k approximation."""
    s = torch.linalg.svdvals(delta)
    return float(s[:k].norm() / s.norm())


def rel_error(original: torch.Tensor, reduced: torch.Tensor) -> float:
    return float((original - reduced).norm() / original.norm())


def _truncate(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k S_k, V_k^T) of a dense delta: the kohya resize_lora.py split."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :k] * s[:k], vh[:k]


def write_kohya_dynamic(src: Path, dst: Path, ratio: float, per_module_alpha: bool) -> Path:
    """Reduce a kohya file by hand to mixed fro ranks, in one of two encodings of the same deltas.

    per_module_alpha=True is what kohya's resize_lora.py --dynamic_method writes (alpha_i = scale*k_i,
    S in up), which diffusers mis-reads; False folds each scale into up under one alpha (1.0).
    """
    tensors, metadata = read_file(src)
    out: dict[str, torch.Tensor] = {}
    for name, module in _kohya_deltas(tensors).items():
        k = fro_rank(module.delta, ratio)
        up, down = _truncate(module.delta, k)
        scale = float(tensors[f"{name}.alpha"]) / module.rank
        alpha = scale * k if per_module_alpha else 1.0
        out[f"{name}.lora_up.weight"] = (up * k / alpha).float().contiguous()
        out[f"{name}.lora_down.weight"] = down.float().contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(out, str(dst), metadata=metadata)
    return dst


def write_diffusers_stale_metadata(src: Path, dst: Path, ratio: float) -> Path:
    """Reduce a diffusers file by hand to mixed ranks (scale folded) but keep its old metadata."""
    tensors, metadata = read_file(src)
    config = json.loads(metadata["lora_adapter_metadata"])
    out: dict[str, torch.Tensor] = {}
    for name, module in _diffusers_deltas(tensors, metadata).items():
        component = name.partition(".")[0]
        scale = config[f"{component}.lora_alpha"] / config[f"{component}.r"]
        up, down = _truncate(module.delta / scale, fro_rank(module.delta, ratio))
        out[f"{name}.lora_B.weight"] = up.float().contiguous()
        out[f"{name}.lora_A.weight"] = down.float().contiguous()
    save_file(out, str(dst), metadata=metadata)
    return dst
