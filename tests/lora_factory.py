"""Real LoRA files for tests, in every format lorad reads, and an independent oracle for dW.

`effective_deltas(path)` recomputes each module's update from a file by the LOADERS' rules
(reference/formats.md §1), written here separately from lorad's reader so a bug in one is caught
by the other.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def factors(out: int, inp: int, rank: int, decay: float, gen: torch.Generator, kernel: tuple[int, ...] = ()):
    """(up, down) whose product has singular values decay**i (distinct, well separated)."""
    flat_in = inp * math.prod(kernel) if kernel else inp
    p = min(out, flat_in, rank)
    qb, _ = torch.linalg.qr(torch.randn(out, p, generator=gen, dtype=torch.float64))
    qa, _ = torch.linalg.qr(torch.randn(flat_in, p, generator=gen, dtype=torch.float64))
    s = torch.tensor([decay**i for i in range(p)], dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(rank, rank, generator=gen, dtype=torch.float64))[0][:p, :]
    up = (qb * s) @ mix  # (out, rank): the same product, spread over all rank columns
    down = mix.T @ qa.T  # (rank, flat_in)
    if kernel:
        return up.reshape(out, rank, 1, 1).float(), down.reshape(rank, inp, *kernel).float()
    return up.float(), down.float()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Module specs: (name, out, in, rank, kernel)
SD15_KOHYA = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 64, 64, 16, ()),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 64, 48, 16, ()),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 64, 64, 16, (1, 1)),
    ("lora_unet_down_blocks_0_resnets_0_conv1", 32, 16, 8, (3, 3)),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32, 8, ()),
]
SDXL_KOHYA = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 64, 64, 16, ()),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj", 128, 64, 16, ()),
    ("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", 48, 48, 8, ()),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", 96, 48, 8, ()),
]
FLUX_KOHYA = [
    ("lora_unet_double_blocks_0_img_attn_qkv", 192, 64, 16, ()),
    ("lora_unet_double_blocks_0_txt_mlp_0", 128, 64, 16, ()),
    ("lora_unet_single_blocks_0_linear1", 160, 64, 16, ()),
]


def kohya_file(path: Path, specs=SD15_KOHYA, alpha: float | None = 4.0, dtype=torch.float32, seed: int = 0,
               metadata: dict[str, str] | None = None) -> Path:
    g, tensors = _gen(seed), {}
    for i, (name, out, inp, r, kernel) in enumerate(specs):
        up, down = factors(out, inp, r, 0.6 + 0.07 * i, g, kernel)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha * (1 + i % 2), dtype=dtype)  # per-module alphas
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "16", "ss_network_alpha": str(alpha),
            "ss_output_name": "test", "sshs_model_hash": "stale", "sshs_legacy_hash": "stale000"}
    save_file(tensors, str(path), metadata=metadata if metadata is not None else meta)
    return path


DIFFUSERS_MODULES = [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 64, 64, 8),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", 64, 64, 8),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 64, 48, 4),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 32, 32, 8),
]


def diffusers_file(path: Path, with_metadata: bool = True, seed: int = 1, alpha_keys: bool = False) -> Path:
    g, tensors = _gen(seed), {}
    for i, (name, out, inp, r) in enumerate(DIFFUSERS_MODULES):
        up, down = factors(out, inp, r, 0.55 + 0.1 * i, g)
        tensors[f"{name}.lora_A.weight"] = down
        tensors[f"{name}.lora_B.weight"] = up
        if alpha_keys:
            tensors[f"{name}.alpha"] = torch.tensor(float(r) / 2)
    meta = {"format": "pt"}
    if with_metadata:
        cfg = {}
        for prefix in ("unet", "text_encoder"):
            names = [n.partition(".")[2] for n, *_ in DIFFUSERS_MODULES if n.startswith(prefix + ".")]
            cfg.update({f"{prefix}.r": 8, f"{prefix}.lora_alpha": 4, f"{prefix}.target_modules": names,
                        f"{prefix}.rank_pattern": {n: 4 for n in names if n.endswith("attn2.to_k")},
                        f"{prefix}.alpha_pattern": {n: 6 for n in names if n.endswith("attn2.to_k")},
                        f"{prefix}.use_dora": False, f"{prefix}.peft_version": "0.99.0"})
        meta["lora_adapter_metadata"] = json.dumps(cfg)
    save_file(tensors, str(path), metadata=meta)
    return path


def diffusers_legacy_file(path: Path, seed: int = 2) -> Path:
    g, tensors = _gen(seed), {}
    names = [("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora", 64, 64, 8),
             ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer", 32, 32, 8),
             ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora", 64, 64, 8)]
    for i, (prefix, out, inp, r) in enumerate(names):
        up, down = factors(out, inp, r, 0.5 + 0.1 * i, g)
        tensors[f"{prefix}.down.weight"] = down
        tensors[f"{prefix}.up.weight"] = up
    save_file(tensors, str(path))
    return path


def aitoolkit_flux_file(path: Path, seed: int = 3) -> Path:
    g, tensors = _gen(seed), {}
    for i, name in enumerate(["transformer.single_transformer_blocks.0.attn.to_q",
                              "transformer.transformer_blocks.0.ff.net.0.proj"]):
        up, down = factors(96, 64, 16, 0.6 + 0.1 * i, g)
        tensors[f"{name}.lora_A.weight"] = down
        tensors[f"{name}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


def xlabs_file(path: Path, seed: int = 4) -> Path:
    g, tensors = _gen(seed), {}
    for i, name in enumerate(["double_blocks.0.processor.qkv_lora1", "double_blocks.0.processor.proj_lora2"]):
        up, down = factors(96 if "qkv" in name else 64, 64, 16, 0.6 + 0.1 * i, g)
        tensors[f"{name}.down.weight"] = down
        tensors[f"{name}.up.weight"] = up
    save_file(tensors, str(path))
    return path


def peft_dir(path: Path, seed: int = 5, rslora: bool = False) -> Path:
    g, tensors = _gen(seed), {}
    modules = [("layers.0.q", 48, 32, 8), ("layers.0.v", 48, 32, 8), ("layers.1.q", 48, 32, 4)]
    for i, (name, out, inp, r) in enumerate(modules):
        up, down = factors(out, inp, r, 0.6 + 0.1 * i, g)
        tensors[f"base_model.model.{name}.lora_A.weight"] = down
        tensors[f"base_model.model.{name}.lora_B.weight"] = up
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q", "v"],
              "rank_pattern": {"layers.1.q": 4}, "alpha_pattern": {"layers.1.q": 2}, "use_rslora": rslora,
              "task_type": None, "base_model_name_or_path": None}
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "README.md").write_text("model card\n")
    return path


def lycoris_mixed_file(path: Path, seed: int = 6) -> Path:
    """kohya LoRA modules beside LoHa, LoKr, Tucker and DoRA modules and a plain weight."""
    g = _gen(seed)
    up, down = factors(64, 64, 16, 0.6, g)
    t = {"lora_unet_a_to_q.lora_up.weight": up, "lora_unet_a_to_q.lora_down.weight": down,
         "lora_unet_a_to_q.alpha": torch.tensor(8.0)}
    for k in ("hada_w1_a", "hada_w2_a"):
        t[f"lora_unet_b_to_k.{k}"] = torch.randn(64, 4, generator=g)
    for k in ("hada_w1_b", "hada_w2_b"):
        t[f"lora_unet_b_to_k.{k}"] = torch.randn(4, 64, generator=g)
    t["lora_unet_b_to_k.alpha"] = torch.tensor(4.0)
    t["lora_unet_c_ff.lokr_w1"] = torch.randn(8, 8, generator=g)
    t["lora_unet_c_ff.lokr_w2"] = torch.randn(8, 8, generator=g)
    t["lora_unet_d_conv.lora_up.weight"] = torch.randn(32, 4, 1, 1, generator=g)
    t["lora_unet_d_conv.lora_down.weight"] = torch.randn(4, 16, 1, 1, generator=g)
    t["lora_unet_d_conv.lora_mid.weight"] = torch.randn(4, 4, 3, 3, generator=g)
    t["lora_unet_e_to_v.lora_up.weight"] = torch.randn(64, 4, generator=g)
    t["lora_unet_e_to_v.lora_down.weight"] = torch.randn(4, 64, generator=g)
    t["lora_unet_e_to_v.dora_scale"] = torch.randn(64, 1, generator=g)
    t["lora_unet_f_norm.w_norm"] = torch.randn(64, generator=g)
    save_file(t, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path


# ---------------------------------------------------------------------------------------------
# The oracle


def _weights_and_config(path: Path):
    if path.is_dir():
        return path / "adapter_model.safetensors", json.loads((path / "adapter_config.json").read_text())
    return path, None


def _match(patterns: dict, module: str):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _peft_scale(cfg: dict, module: str, rank: int) -> float:
    alpha = _match(cfg.get("alpha_pattern"), module)
    alpha = cfg.get("lora_alpha", 8) if alpha is None else alpha
    r = _match(cfg.get("rank_pattern"), module) or cfg.get("r")
    assert r == rank, f"config rank {r} != tensor rank {rank} for {module} (PEFT would refuse to load)"
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


_PAIRS = [(".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"),
          (".up.weight", ".down.weight")]


def effective_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Module -> scale * up @ down (float64, out x in_flat) as loaders compute it."""
    weights, config = _weights_and_config(Path(path))
    sd = {k: v.to(torch.float64) for k, v in load_file(str(weights)).items()}
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    diffusers_cfg = {}
    if "lora_adapter_metadata" in meta:
        for k, v in json.loads(meta["lora_adapter_metadata"]).items():
            prefix, _, field = k.partition(".")
            diffusers_cfg.setdefault(prefix, {})[field] = v
    out = {}
    for key in sd:
        for up_sfx, down_sfx in _PAIRS:
            if not key.endswith(up_sfx):
                continue
            module = key[: -len(up_sfx)]
            up, down = sd[key], sd[module + down_sfx]
            rank = down.shape[0]
            if config is not None:
                scale = _peft_scale(config, module.removeprefix("base_model.model."), rank)
            elif diffusers_cfg and module.partition(".")[0] in diffusers_cfg:
                prefix, _, rest = module.partition(".")
                scale = _peft_scale(diffusers_cfg[prefix], rest, rank)
            elif module + ".alpha" in sd:
                alpha = float(sd[module + ".alpha"])
                scale = 1.0 if alpha == 0 else alpha / rank
            else:
                scale = 1.0
            out[module] = scale * up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)
            break
    return out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())
