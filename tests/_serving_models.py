"""LoRA files for the serving tests: several different UNet LoRAs for one tiny SD pipeline, and a
tiny Llama with a PEFT adapter, all built from configs in code (no hub).

Each UNet LoRA is a genuine file: diffusers' own `save_lora_weights` (UNet only: diffusers cannot
hotswap text-encoder adapters) or sd-scripts' kohya key style. Every module's update has a planted,
decaying spectrum; a LoRA's `decays` range sets how many directions `fro 0.9` asks for, so
different LoRAs get different uniform ranks under `--serve diffusers-hotswap`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tests import _tiny_models as tm

# ---------------------------------------------------------------------------------------------
# UNet LoRAs


def plant(model: torch.nn.Module, decays: tuple[float, float], seed: int, gain: float = 1.0,
          adapter: str = "default") -> None:
    """Give every LoRA layer of `model` planted factors: module i's decay is drawn from the
    geometric range `decays` (slow to fast, in a seeded order), its top singular value is 0.2*gain."""
    layers = tm._lora_layers(model)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = decays
    rates = [lo * (hi / lo) ** (i / max(len(layers) - 1, 1)) for i in range(len(layers))]
    order = torch.randperm(len(layers), generator=gen).tolist()
    for (_, layer), which in zip(layers, order):
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        up, down = tm.planted_factors(b.shape[0], a.shape[1], a.shape[0], rates[which], gen)
        with torch.no_grad():
            b.copy_(up * gain / layer.scaling[adapter])  # so scale.B.A carries the planted spectrum
            a.copy_(down)


def trained_unet(decays: tuple[float, float], seed: int, rank: int = tm.UNET_RANK,
                 alpha: float = tm.UNET_ALPHA, gain: float = 1.0):  # -> UNet2DConditionModel
    unet = tm.fresh_unet()
    unet.add_adapter(tm.unet_lora_config(rank, alpha))
    plant(unet, decays, seed, gain)
    return unet


def write_unet_diffusers(unet, path: Path) -> Path:
    """`save_lora_weights` with the UNet's LoraConfig as metadata, as diffusers' trainers write it."""
    tm.StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(), weight_name=path.name,
    )  # fmt: skip
    return path


def write_unet_kohya(unet, path: Path) -> Path:
    """sd-scripts' names and tensors: lora_down / lora_up / alpha for each UNet module."""
    tensors: dict[str, torch.Tensor] = {}
    for module_path, layer in tm._lora_layers(unet):
        name = tm.kohya_name("unet", module_path)
        tensors[f"{name}.lora_down.weight"] = layer.lora_A["default"].weight.detach().clone().contiguous()
        tensors[f"{name}.lora_up.weight"] = layer.lora_B["default"].weight.detach().clone().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha["default"]))
    rank = next(iter(tensors.values())).shape[0]
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": str(float(tm.UNET_ALPHA)), "ss_base_model_version": "sd_v1"}  # fmt: skip
    save_file(tensors, str(path), metadata=metadata)
    return path


def unet_inputs(seed: int = 7) -> dict[str, torch.Tensor]:
    """A fixed UNet call: one 8x8 latent, one timestep, an 8-token prompt embedding."""
    gen = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(1, 4, 8, 8, generator=gen), "timestep": torch.tensor(10),
            "encoder_hidden_states": torch.randn(1, 8, 32, generator=gen)}  # fmt: skip


@torch.no_grad()
def unet_output(unet, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return unet(**inputs, return_dict=False)[0].detach().clone()


# ---------------------------------------------------------------------------------------------
# A tiny Llama and a PEFT adapter for it

LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]
LLAMA_SEED = 4321


def tiny_llama() -> LlamaForCausalLM:
    """The same weights every call: a 2-layer Llama with grouped-query attention, fp32."""
    torch.manual_seed(LLAMA_SEED)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


LLAMA_RANKS = {"q_proj": 16, "k_proj": 16, "v_proj": 16, "o_proj": 8, "gate_proj": 32, "up_proj": 32,
               "down_proj": 32}  # fmt: skip


def llama_lora_config() -> LoraConfig:
    """r 16 with a rank_pattern (o_proj 8, the MLP 32) and alpha 16: scales 1, 2 and 0.5. Under one
    vLLM rank of 16 the MLP modules are cut down and o_proj is padded up with zero directions."""
    patterns = {name: r for name, r in LLAMA_RANKS.items() if r != 16}
    return LoraConfig(r=16, lora_alpha=16, target_modules=LLAMA_ATTN + LLAMA_MLP, init_lora_weights=False,
                      rank_pattern=patterns, task_type="CAUSAL_LM")  # fmt: skip


def write_llama_peft_dir(folder: Path, decays: tuple[float, float] = (0.08, 1.5), seed: int = 99) -> Path:
    model = get_peft_model(tiny_llama(), llama_lora_config())
    plant(model, decays, seed)
    model.save_pretrained(folder)
    return folder


def peft_file_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """{module path in the base model: float64 scale.B.A} by PEFT's documented rules: r and
    lora_alpha from the config, overridden by the first matching rank_pattern / alpha_pattern key;
    scale alpha/r (alpha/sqrt(r) with use_rslora); the rank must equal the tensors' rank."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors, _ = tm.read_file(folder / "adapter_model.safetensors")
    out = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            module = name.removeprefix("base_model.model.")
            down, up = tensors[key].double(), tensors[f"{name}.lora_B.weight"].double()
            r = tm._pattern_value(config.get("rank_pattern") or {}, module, config["r"])
            alpha = tm._pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            assert r == down.shape[0], f"{module}: config says rank {r}, tensors have {down.shape[0]}"
            out[module] = (alpha / (r**0.5 if config.get("use_rslora") else r)) * up @ down
    return out


def merged_llama(deltas: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """The base model with each delta added to its Linear's weight (in float64, then cast back)."""
    model = tiny_llama()
    with torch.no_grad():
        for module, delta in deltas.items():
            weight = model.get_submodule(module).weight
            weight.copy_((weight.double() + delta).to(weight.dtype))
    return model


def load_llama_adapter(folder: Path) -> PeftModel:
    return PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()


def llama_inputs() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
