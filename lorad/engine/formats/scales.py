"""How loaders scale up @ down, per module: the rules that decide what a LoRA file means.

Two families of loaders read the same file (reference/formats.md §2):
  tensors   ComfyUI, A1111/Forge, kohya: an `.alpha` key gives alpha / rank, else scale 1; they
            never read safetensors metadata.
  metadata  diffusers and PEFT: a PEFT folder's adapter_config.json, or a single file's
            `lora_adapter_metadata` (one LoraConfig per component), else the alpha keys.
A file's INTENDED scale is its own format's: the config or metadata where the file carries one
(that is what its trainer's loader reads), else the alpha keys (alpha 0 meaning alpha = rank, as
kohya reads it), else 1. Where the two families disagree on an input, lorad follows the intended
reading and says so; what lorad writes is read alike by both.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from lorad.errors import FormatError

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
PEFT_PREFIX = "base_model.model."
# The components diffusers prefixes module names with (and keys its metadata by).
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")


@dataclass(frozen=True)
class Readings:
    """One module's scale as each loader family reads it (None: that family cannot read the file)."""

    tensors: float | None
    metadata: float | None

    def disagree(self, rel: float = 1e-6) -> bool:
        if self.tensors is None or self.metadata is None:
            return False
        return abs(self.tensors - self.metadata) > rel * max(abs(self.tensors), abs(self.metadata), 1e-30)


def component(module: str) -> str:
    """The diffusers component a module name starts with ("unet", "transformer", ...), or ""."""
    head, dot, _ = module.partition(".")
    return head if dot and head in COMPONENTS else ""


def config_path(module: str, peft_dir: bool) -> str:
    """The module path PEFT matches rank_pattern / alpha_pattern keys against."""
    if peft_dir or module.startswith(PEFT_PREFIX):
        return module.removeprefix(PEFT_PREFIX)
    comp = component(module)
    path = module[len(comp) + 1 :] if comp else module
    # diffusers' legacy attention-processor names map onto the modules PEFT sees
    path = path.replace(".processor.", ".")
    if path.endswith(".to_out"):
        path += ".0"
    return path


def pattern_value(patterns: dict[str, Any] | None, path: str) -> Any:
    """PEFT >= 0.15: the first key (in dict order) with re.match(rf"(.*\\.)?({key})$", path)."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error:
            continue
    return None


def peft_scale(config: dict[str, Any], path: str, rank: int) -> float:
    """lora_alpha / r (or / sqrt(r) with rsLoRA), each from its pattern when one matches."""
    alpha = pattern_value(config.get("alpha_pattern"), path)
    if alpha is None:
        alpha = config.get("lora_alpha", 8)  # PEFT's default
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def peft_rank(config: dict[str, Any], path: str) -> int | None:
    """The rank PEFT will build this module with (it refuses tensors of any other rank)."""
    r = pattern_value(config.get("rank_pattern"), path)
    if r is None:
        r = config.get("r", 8)
    return int(r) if isinstance(r, (int, float)) else None


def diffusers_configs(source: str, raw: str) -> dict[str, dict[str, Any]]:
    """`lora_adapter_metadata` holds one LoraConfig per component, flattened as "unet.r", ..."""
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FormatError(f"{source}: lora_adapter_metadata is not JSON: {e}") from e
    if not isinstance(flat, dict):
        raise FormatError(f"{source}: lora_adapter_metadata is not a JSON object")
    configs: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, value in flat.items():
        prefix, _, name = str(key).partition(".")
        if name:
            configs[prefix][name] = value
    return dict(configs)


class ScaleRules:
    """Each module's scale by both loader families, and which one the file intends."""

    def __init__(self, source: str, metadata: dict[str, str], peft_config: dict[str, Any] | None):
        self.peft_config = peft_config
        self.configs: dict[str, dict[str, Any]] = {}
        if peft_config is None and DIFFUSERS_METADATA_KEY in metadata:
            self.configs = diffusers_configs(source, metadata[DIFFUSERS_METADATA_KEY])

    def config_for(self, module: str) -> dict[str, Any] | None:
        if self.peft_config is not None:
            return self.peft_config
        return self.configs.get(component(module))

    def readings(self, module: str, rank: int, alpha: float | None) -> Readings:
        """alpha: the module's `.alpha` value, or None without one."""
        config = self.config_for(module)
        if config is not None:
            meta = peft_scale(config, config_path(module, self.peft_config is not None), rank)
        else:
            meta = None if self.peft_config is not None else kohya_scale(alpha, rank)
        if self.peft_config is not None:
            return Readings(None, meta)  # only PEFT loads an adapter folder
        # ComfyUI: alpha / rank, alpha 0 included (kohya reads 0 as "alpha = rank")
        tensors = 1.0 if alpha is None else alpha / rank
        return Readings(tensors, meta)

    def intended(self, readings: Readings) -> float:
        return readings.metadata if readings.metadata is not None else readings.tensors  # type: ignore[return-value]


def kohya_scale(alpha: float | None, rank: int) -> float:
    return 1.0 if alpha is None or alpha == 0 else alpha / rank
