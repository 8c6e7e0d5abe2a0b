"""Blocks: a best-effort grouping of module names (`block_of`), in natural order (`group_by_block`).

The LoRA page draws its module charts block by block; the names come from many trainers (kohya,
diffusers, PEFT, LyCORIS), so the grouping reads the name's first block index, whatever its word.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from lorad.report._page import natural

_TOKEN = re.compile(r"[^._]+")
_SINGLE = {"block", "layer", "stage", "level", "h"}
_PLURAL = ("blocks", "layers", "stages", "levels")
_KOHYA_ROOT = re.compile(r"(lora_(?:unet|te\d*|transformer|text_encoder\d*)|lycoris_[a-z]+\d*)(?=[._])")


def block_of(name: str) -> str:
    """The block a module belongs to: its name up to and including the first block index.

    `lora_unet_input_blocks_4_1_..._to_q` -> `lora_unet_input_blocks_4`;
    `unet.down_blocks.0.attentions.1...` -> `unet.down_blocks.0`;
    `transformer.single_transformer_blocks.12.attn.to_q` -> `transformer.single_transformer_blocks.12`;
    `lora_te1_text_model_encoder_layers_0_mlp_fc1` -> `lora_te1_text_model_encoder_layers_0`;
    `unet.mid_block.attentions.0...` -> `unet.mid_block` (a block with no index);
    a name with none (`lora_unet_conv_in`) -> its family's fallback group, `lora_unet (other)`.
    """
    tokens = list(_TOKEN.finditer(name))
    for i, m in enumerate(tokens):
        word = m.group(0).lower()
        if not (word in _SINGLE or word.endswith(_PLURAL)):
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if nxt is not None and nxt.group(0).isdigit():
            return name[: nxt.end()]
        if word == "block" and i > 0:  # mid_block / middle_block: one block without an index
            return name[: m.end()]
    root = _KOHYA_ROOT.match(name)
    if root:
        return f"{root.group(1)} (other)"
    if "." in name:
        return f"{name.split('.', 1)[0]} (other)"
    return "other"


def group_by_block(modules: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """(block, its modules) in natural order of block names (input < middle < output, 2 < 10)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for m in modules:
        groups.setdefault(block_of(str(m["name"])), []).append(m)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0].endswith("(other)"), natural(kv[0])))
    return [(b, sorted(ms, key=lambda m: natural(str(m["name"])))) for b, ms in ordered]

