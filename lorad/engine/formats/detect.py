"""Which LoRA format a file is, from its keys, and how its output must carry each module's scale.

Format ids (informational: grouping and scale rules do not depend on them):
  kohya            sd-scripts / LyCORIS / musubi / OneTrainer names (lora_unet_*, lora_te*_*, ...)
  kohya-flux       the same for Flux (lora_unet_double_blocks_*, lora_unet_single_blocks_*)
  diffusers        unet./text_encoder./transformer. + lora_A/lora_B (ai-toolkit, diffusers scripts)
  diffusers-legacy lora.down/lora.up, lora_linear_layer, attn-processor *_lora.down
  xlabs            Flux XLabs (double_blocks.N.processor.qkv_lora1.down.weight); no alpha
  peft             a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
  peft-keys        a single file with PEFT's base_model.model. keys (fal's trainers): NOT a PEFT
                   folder, so loaders read it by its tensors alone
  lora             any other LoRA-shaped file (DiffSynth, Mochi, diffusion_model.*, ControlLoRA...)
"""

from __future__ import annotations

from collections.abc import Iterable

from lorad.engine.formats.scales import COMPONENTS

# How the output carries each module's scale so that every loader reads it the same way.
ALPHA_KEYS = "alpha-keys"  # one constant `.alpha` on every reduced module; loaders use alpha / rank
PEFT_CONFIG = "peft-config"  # adapter_config.json: r / lora_alpha / rank_pattern / alpha_pattern
SCALE_ONE = "scale-one"  # the whole scale folded into up; every loader applies 1

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_",
                   "lora_transformer_")  # fmt: skip
_DIFFUSERS_PREFIXES = tuple(f"{c}." for c in COMPONENTS)


def detect_format(keys: Iterable[str], metadata: dict[str, str] | None = None, is_peft_dir: bool = False) -> str:
    keys = list(keys)
    if is_peft_dir:
        return "peft"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft-keys"
    if any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        flux = any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys)
        return "kohya-flux" if flux else "kohya"
    if any(".processor." in k and ("_lora1." in k or "_lora2." in k) for k in keys):
        return "xlabs"
    if any(".lora.down." in k or ".lora_linear_layer." in k or "_lora.down." in k for k in keys):
        return "diffusers-legacy"
    if any(k.startswith(_DIFFUSERS_PREFIXES) and (".lora_A." in k or ".lora_B." in k) for k in keys):
        return "diffusers"
    return "lora"
