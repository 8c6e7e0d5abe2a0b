"""Random projection (the Hugging Face Flux LoRA-resizing blog's baseline), for comparison only.

down' = R down, up' = scale * up R^T with R (k x r) Gaussian of variance 1/k, so E[R^T R] = I and
dW' = scale * up R^T R down is right on average, not optimal: lorad reports its real error.
"""

from __future__ import annotations

import torch


def random_projection(
    up: torch.Tensor, down: torch.Tensor, scale: float, k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up' (out, k) with the scale applied, down' (k, in))."""
    r = down.shape[0]
    R = torch.randn(k, r, generator=generator, dtype=down.dtype) / k**0.5
    R = R.to(down.device)
    return scale * (up @ R.T), R @ down
