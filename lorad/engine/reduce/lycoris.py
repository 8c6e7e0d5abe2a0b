"""The dense update of LyCORIS LoHa and LoKr modules, for rebuilding them as plain LoRA.

Their dW is a Hadamard or Kronecker product, not up @ down, so no thin factors exist: the dense
out x in matrix is formed here and decomposed with an ordinary SVD (these modules are few).
Scales follow ComfyUI/LyCORIS: LoHa alpha / w1b rows; LoKr alpha / rank only when a factor is
itself decomposed, else 1.
"""

from __future__ import annotations

import torch


def loha_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
               alpha: float | None) -> torch.Tensor:
    scale = 1.0 if not alpha else alpha / w1b.shape[0]
    return scale * (w1a @ w1b) * (w2a @ w2b)


def lokr_delta(factors: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """factors: lokr_w1 or lokr_w1_a/_b, and lokr_w2 or lokr_w2_a/_b (2-D)."""
    w1 = factors["lokr_w1"] if "lokr_w1" in factors else factors["lokr_w1_a"] @ factors["lokr_w1_b"]
    w2 = factors["lokr_w2"] if "lokr_w2" in factors else factors["lokr_w2_a"] @ factors["lokr_w2_b"]
    rank = next((factors[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in factors), None)
    scale = alpha / rank if alpha and rank else 1.0
    return scale * torch.kron(w1, w2)
