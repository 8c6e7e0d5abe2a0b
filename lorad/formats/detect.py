"""Which LoRA format a file is, from its keys and metadata, and what that means for scale and writing.

Format ids:
  kohya            sd-scripts / LyCORIS names (lora_unet_*, lora_te*_*, lycoris_*, lora_transformer_*)
  kohya-flux       the same for Flux (lora_unet_double_blocks_*, lora_unet_single_blocks_*)
  diffusers        unet./text_encoder./transformer. (+ lora_A/lora_B); ai-toolkit Flux files too
  diffusers-legacy lora.down/lora.up, lora_linear_layer, attn-processor *_lora.down
  xlabs            Flux XLabs (double_blocks.N.processor.qkv_lora1.down.weight); no alpha
  peft             a PEFT adapter directory or a state dict with base_model.model. keys
  lora             any other LoRA-shaped file (up/down pairs) lorad can still reduce
"""

from __future__ import annotations

from collections.abc import Iterable

# How a format tells loaders the scale of each module, and so how lorad must write it.
ALPHA_KEYS = "alpha-keys"  # one constant `.alpha` tensor per module; loaders use alpha / rank
DIFFUSERS_METADATA = "diffusers-metadata"  # minimal lora_adapter_metadata (+ alpha keys if present)
PEFT_CONFIG = "peft-config"  # adapter_config.json r/lora_alpha/rank_pattern
SCALE_ONE = "scale-one"  # loaders apply scale 1: fold everything into up, write no alpha

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_",
                   "lora_transformer_")  # fmt: skip
_DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")


def detect_format(keys: Iterable[str], metadata: dict[str, str], is_peft_dir: bool = False) -> str:
    keys = list(keys)
    if is_peft_dir or any(k.startswith("base_model.model.") for k in keys):
        return "peft"
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


def scale_style(fmt: str, has_alpha_keys: bool) -> str:
    """How the output must carry each module's scale so that every loader reads it the same way."""
    if fmt == "peft":
        return PEFT_CONFIG
    if fmt == "diffusers":
        return DIFFUSERS_METADATA
    if fmt in ("kohya", "kohya-flux") or has_alpha_keys:
        return ALPHA_KEYS
    return SCALE_ONE


def diffusers_prefix(module: str) -> str:
    """The component a diffusers module belongs to ("unet", "text_encoder", ...), or ""."""
    head, _, _ = module.partition(".")
    return head if module.startswith(_DIFFUSERS_PREFIXES) else ""
