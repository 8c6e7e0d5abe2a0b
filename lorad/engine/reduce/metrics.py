"""Quality of a reduced module, measured against its exact spectrum and its written factors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Quality:
    fro_retained: float  # ||dW_k|| / ||dW||
    rel_error: float  # ||dW - dW'|| / ||dW||, dW' being what the written factors make
    norm: float | None = None  # ||dW||


def truncation(S: torch.Tensor, k: int) -> tuple[float, float, float]:
    """(fro_retained, tail norm, total norm) of keeping the top k of spectrum S."""
    sq = S.to(torch.float64) ** 2
    total = float(sq.sum())
    kept = float(sq[:k].sum())
    if total == 0.0:
        return 1.0, 0.0, 0.0
    return math.sqrt(min(kept / total, 1.0)), math.sqrt(max(total - kept, 0.0)), math.sqrt(total)


def svd_quality(
    S: torch.Tensor, k: int, Uk: torch.Tensor, Vk: torch.Tensor, up_eff: torch.Tensor, down: torch.Tensor
) -> Quality:
    """Quality of writing up_eff @ down for the top-k triple (Uk, S[:k], Vk).

    up_eff is the written up factor times the scale loaders apply, down the written down factor,
    both read back after the cast to the output dtype. With E_B = up_eff - Uk S_k and
    E_A = down - Vk^T, dW - dW' = tail - (Uk S_k E_A + E_B Vk^T + E_B E_A); the first two rounding
    terms are orthogonal to the tail (they live in span(Uk) / rowspan(Vk^T)), so the tail norm is
    exact and the rounding adds at most ||S_k E_A|| + ||E_B|| + ||E_B|| ||E_A|| (an upper bound,
    never an underestimate).
    """
    fro, tail, total = truncation(S, k)
    if total == 0.0:
        return Quality(fro, 0.0, 0.0)
    Sk = S[:k].to(up_eff.dtype)
    e_b = up_eff - Uk * Sk
    e_a = down - Vk.T
    nb, na = float(e_b.norm()), float(e_a.norm())
    rounding = float((Sk[:, None] * e_a).norm()) + nb + nb * na
    return Quality(fro, math.sqrt(tail * tail + rounding * rounding) / total, total)


def exact_rel_error(up: torch.Tensor, down: torch.Tensor, up2: torch.Tensor, down2: torch.Tensor) -> float:
    """||up @ down - up2 @ down2||_F / ||up @ down||_F through Gram matrices, in float64.

    [up, -up2] @ [down; down2] is the difference; its squared norm is the sum of the elementwise
    product of the two (r + k)-square Gram matrices. Never forms the out x in matrix.
    """
    b = torch.cat([up, -up2], dim=1).to(torch.float64)
    a = torch.cat([down, down2], dim=0).to(torch.float64)
    r = up.shape[1]
    gb, ga = b.T @ b, a @ a.T
    diff = float((gb * ga).sum())
    total = float((gb[:r, :r] * ga[:r, :r]).sum())
    if total <= 0.0:
        return 0.0
    return math.sqrt(max(diff, 0.0) / total)


def product_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """||up @ down||_F from the two r x r Gram matrices, in float64."""
    b, a = up.to(torch.float64), down.to(torch.float64)
    return math.sqrt(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0))
