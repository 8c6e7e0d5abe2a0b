"""Tensor key -> (module, role), for every spelling of a LoRA key that loaders accept, and the
grouping of a file's keys into modules.

Grouping does not depend on knowing the model: a module is any down/up pair under one prefix, with
its optional alpha, bias, DoRA magnitude and LyCORIS parts. The module name is the prefix exactly as
the file spells it, so writing puts new tensors back under the same keys.

Spellings (reference/formats.md §1, ComfyUI's comfy/weight_adapter/lora.py, PEFT, diffusers):
  X.lora_up.weight / X.lora_down.weight [/ X.lora_mid.weight]      kohya, LyCORIS
  X.lora_B.weight / X.lora_A.weight                                  PEFT, diffusers, ai-toolkit
  X.lora_B.<adapter>.weight, X.lora_B.<adapter>, X.lora_B            DiffSynth (.default), Mochi (bare)
  X.lora_embedding_B / X.lora_embedding_A                            PEFT embedding LoRA
  X.lora.up.weight, X.lora_linear_layer.up.weight, X_lora.up.weight  diffusers legacy
  X.up.weight / X.down.weight, X.up / X.down                         XLabs, ControlLoRA ("weak": a
                                                                     module only when both are there)
  X.alpha, X.scale, X.lora_B.bias, X.dora_scale, X.lora_magnitude_vector, X.hada_*, X.lokr_*
Everything else (.diff, .diff_b, w_norm, full weights) is passed through untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lorad.errors import FormatError

# Factor tokens that may be followed by an adapter name and/or ".weight", or stand bare.
_FACTOR_TOKENS = {
    "lora_up": "up", "lora_down": "down", "lora_mid": "mid",
    "lora_B": "up", "lora_A": "down",
    "lora_embedding_B": "up", "lora_embedding_A": "down",
}  # fmt: skip
_EMBEDDING_TOKENS = ("lora_embedding_A", "lora_embedding_B")
# Legacy diffusers: the role is the last word, the module is what comes before these infixes.
_LEGACY_INFIXES = (".lora_linear_layer", ".lora", "_lora")
_SCALARS = {"alpha": "alpha", "scale": "scale", "dora_scale": "dora"}
_LYCORIS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
            "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")  # fmt: skip


@dataclass(frozen=True)
class KeyRole:
    module: str
    role: str  # up | down | mid | alpha | scale | dora | up_bias | hada_* | lokr_*
    weak: bool = False  # a bare "up"/"down" word: a module only if its partner is there too
    embedding: bool = False


def _is_adapter_name(word: str) -> bool:
    return bool(word) and word not in ("weight", "bias") and (word[0].isalpha() or word[0] == "_")


def parse_key(key: str) -> KeyRole | None:
    """The module and role of a LoRA tensor key, or None for a non-LoRA tensor (passed through)."""
    parts = key.split(".")
    if len(parts) < 2:
        return None
    last = parts[-1]
    if last in _SCALARS:
        return KeyRole(".".join(parts[:-1]), _SCALARS[last])
    if last in _LYCORIS:
        return KeyRole(".".join(parts[:-1]), last)
    found = _factor(parts)
    if found is not None:
        return found
    if last == "bias" and len(parts) >= 3:
        # X.lora_B.bias or X.lora_B.<adapter>.bias: PEFT's lora_bias, scaled with its module
        for i in (-2, -3):
            if len(parts) > -i and parts[i] == "lora_B" and (i == -2 or _is_adapter_name(parts[-2])):
                return KeyRole(".".join(parts[:i]), "up_bias")
    if "lora_magnitude_vector" in parts[-3:]:
        i = parts.index("lora_magnitude_vector", len(parts) - 3)
        if i > 0 and all(_is_adapter_name(p) or p == "weight" for p in parts[i + 1:]):
            return KeyRole(".".join(parts[:i]), "dora")
    return _updown(key, parts)


def _factor(parts: list[str]) -> KeyRole | None:
    # X.tok, X.tok.weight, X.tok.<adapter>, X.tok.<adapter>.weight
    n = len(parts)
    candidates = [(n - 1, ()), (n - 2, (parts[-1],)), (n - 3, (parts[-2], parts[-1]))]
    for i, tail in candidates:
        if i < 1 or parts[i] not in _FACTOR_TOKENS:
            continue
        if tail == () or tail == ("weight",) or (len(tail) == 1 and _is_adapter_name(tail[0])) or (
            len(tail) == 2 and _is_adapter_name(tail[0]) and tail[1] == "weight"
        ):
            token = parts[i]
            return KeyRole(".".join(parts[:i]), _FACTOR_TOKENS[token], embedding=token in _EMBEDDING_TOKENS)
    return None


def _updown(key: str, parts: list[str]) -> KeyRole | None:
    # ... .up.weight / .down.weight / .up / .down
    if parts[-1] == "weight" and len(parts) >= 3 and parts[-2] in ("up", "down"):
        role, stem = parts[-2], key[: -len(f".{parts[-2]}.weight")]
    elif parts[-1] in ("up", "down"):
        role, stem = parts[-1], key[: -len(f".{parts[-1]}")]
    else:
        return None
    for infix in _LEGACY_INFIXES:
        if stem.endswith(infix) and len(stem) > len(infix):
            return KeyRole(stem[: -len(infix)], role)
    return KeyRole(stem, role, weak="lora" not in stem.lower())


@dataclass
class Group:
    """The keys of one module, by role."""

    roles: dict[str, str] = field(default_factory=dict)
    weak: bool = True  # every factor key was a bare up/down word
    embedding: bool = False


def group_keys(keys: Iterable[str]) -> tuple[dict[str, Group], list[str]]:
    """Module name -> Group for LoRA keys, in file order; the other keys are passed through.

    A "weak" up/down pair (no "lora" anywhere in its name) is a module only when both halves are
    there; a lone alpha or scale with no factors beside it is not a module either.
    """
    groups: dict[str, Group] = {}
    passthrough: list[str] = []
    for key in keys:
        kr = parse_key(key)
        if kr is None or not kr.module:
            passthrough.append(key)
            continue
        group = groups.setdefault(kr.module, Group())
        if kr.role in group.roles:
            raise FormatError(f"module {kr.module!r} has two {kr.role} tensors: "
                              f"{group.roles[kr.role]!r} and {key!r}")
        group.roles[kr.role] = key
        if kr.role in ("up", "down"):
            group.weak = group.weak and kr.weak
            group.embedding = group.embedding or kr.embedding
        elif kr.role != "alpha" and kr.role != "scale":
            group.weak = False
    modules: dict[str, Group] = {}
    for name, group in groups.items():
        factors = set(group.roles) - {"alpha", "scale"}
        if not factors or (group.weak and not {"up", "down"} <= factors):
            passthrough.extend(group.roles.values())
        else:
            modules[name] = group
    return modules, passthrough
