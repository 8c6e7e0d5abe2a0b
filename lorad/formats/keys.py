"""Tensor key -> (module name, role), for every LoRA key style lorad reads.

lorad keeps key names exactly as the input spells them, so a module is simply the key with its
role suffix removed, and writing puts new tensors back under the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass

# Longest, most specific suffixes first: ".lora.up.weight" must win over ".up.weight".
_SUFFIXES: tuple[tuple[str, str], ...] = (
    # plain LoRA factors
    (".lora_up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_mid.weight", "mid"),  # LyCORIS Tucker core
    (".lora_B.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),  # diffusers legacy text encoder
    (".lora_linear_layer.down.weight", "down"),
    (".lora.up.weight", "up"),  # diffusers legacy
    (".lora.down.weight", "down"),
    ("_lora.up.weight", "up"),  # diffusers attn-processor style: to_q_lora.up.weight
    ("_lora.down.weight", "down"),
    (".up.weight", "up"),  # XLabs (qkv_lora1.up.weight), ControlLoRA: only with "lora" in the name
    (".down.weight", "down"),
    (".alpha", "alpha"),
    (".scale", "scale"),  # A1111 explicit scale override; read by nobody else, so passed through
    # DoRA magnitudes
    (".dora_scale", "dora"),
    (".lora_magnitude_vector.weight", "dora"),
    (".lora_magnitude_vector", "dora"),
    # LoHa
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    # LoKr
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_t2", "lokr_t2"),
)

_GENERIC = (".up.weight", ".down.weight", ".scale")


@dataclass(frozen=True)
class KeyRole:
    module: str
    role: str


def parse_key(key: str) -> KeyRole | None:
    """The module and role of a LoRA tensor key, or None for a non-LoRA tensor (passed through)."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            if not module:
                return None
            if suffix in _GENERIC and "lora" not in module.lower():
                return None  # e.g. a full model's "up_blocks.0.up.weight": not ours to touch
            return KeyRole(module, role)
    return None
