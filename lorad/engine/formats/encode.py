"""How reduced factors are stored so that every loader applies the intended scale.

Loaders disagree on per-module alphas (diffusers mis-reads them), so lorad writes ONE constant
alpha for all modules and folds what each module still needs into its up factor:
    written_up = U_k S_k / loader_scale(k),  loader_scale(k) = alpha / k  (alpha / sqrt(k) rsLoRA)
Files without alpha keys, and files whose metadata diffusers reads instead of their alpha keys, get
loader_scale = 1: the whole scale is in the factors, and any alpha key says alpha = rank, so that
loaders that read tensors only (ComfyUI, A1111/Forge) and loaders that read metadata agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorad.engine.formats import detect
from lorad.engine.formats.lora import FLOAT_DTYPES, LoraSource, most_common

_ALPHA_DTYPES = {**FLOAT_DTYPES, "I64": torch.int64, "I32": torch.int32}  # diffusers' converter writes int64
TORCH_TO_ST = {v: k for k, v in _ALPHA_DTYPES.items()}
DTYPE_NAMES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
               "float": torch.float32}  # fmt: skip


@dataclass(frozen=True)
class Encoding:
    style: str
    alpha: float | None  # the one alpha written; None where loaders apply scale 1
    rslora: bool = False
    alpha_dtype: torch.dtype = torch.float32

    def loader_scale(self, rank: int) -> float:
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)

    def written_alpha(self, rank: int) -> float:
        """The alpha a reduced module of this rank carries (where it carries one)."""
        return float(rank) if self.alpha is None else self.alpha


def choose_encoding(source: LoraSource, reference_rank: int, dtype_override: str | None = None) -> Encoding:
    """One alpha for the whole file: the input's usual scale at `reference_rank`.

    So a fixed-rank reduction of a uniform file writes what kohya writes (alpha = scale * k, no
    folding at all), and a dynamic one keeps the input's common alpha.
    """
    if source.style == detect.SCALE_ONE:
        return Encoding(source.style, None, alpha_dtype=DTYPE_NAMES[dtype_override] if dtype_override
                        else _alpha_dtype(source))  # fmt: skip
    rslora = bool((source.peft_config or {}).get("use_rslora"))
    usual_scale = most_common([m.scale for m in source.reducible], 1.0)
    alpha = usual_scale * (math.sqrt(reference_rank) if rslora else reference_rank)
    dtype = DTYPE_NAMES[dtype_override] if dtype_override else _alpha_dtype(source)  # kohya: alpha in the save dtype
    if not dtype.is_floating_point and not float(alpha).is_integer():
        dtype = torch.float32  # an integer alpha key cannot hold this alpha exactly
    alpha = float(torch.tensor(alpha, dtype=dtype))  # exactly what the file will hold
    if alpha == 0.0:  # ComfyUI reads alpha 0 as scale 0, kohya as scale 1: never write it
        alpha = float(torch.tensor(float(reference_rank), dtype=dtype))
    return Encoding(source.style, alpha, rslora, dtype)


def _alpha_dtype(source: LoraSource) -> torch.dtype:
    for m in source.reducible:
        key = m.keys.get("alpha")
        if key:
            return _ALPHA_DTYPES.get(source.header.tensors[key].dtype, torch.float32)
    return torch.float32


def output_dtype(source_dtype: str, override: str | None) -> torch.dtype:
    if override:
        return DTYPE_NAMES[override]
    return FLOAT_DTYPES[source_dtype]
