"""Rank selection: how many singular values each method keeps, from one module's spectrum.

Definitions (S descending, k always in 1..min(len(S), rank_in), then capped by max_rank):
  rank        k = param
  fro         smallest k with ||S[:k]|| / ||S|| >= param   (kohya sv_fro without its +1)
  ratio       k = #{S_i >= S_0 / param}                      (kohya sv_ratio)
  cumulative  smallest k with sum(S[:k]) / sum(S) >= param  (kohya sv_cumulative without its +1)
With kohya_compat the choice is resize_lora.py's exactly: its index clamped to [1, min(out, in) - 1]
(it decomposes the dense matrix) plus one, so never below 2, except zero matrices (rank 1).
"""

from __future__ import annotations

import torch

from lorad.engine.reduce.methods import METHODS, validate
from lorad.errors import ReduceError

__all__ = ["METHODS", "select_rank", "validate"]

_KOHYA_MIN_SV = 1e-6  # resize_lora.py's MIN_SV: below it a module counts as a zero matrix


def select_rank(
    S: torch.Tensor,
    method: str,
    param: float,
    rank_in: int,
    max_rank: int | None = None,
    kohya_compat: bool = False,
    dense_len: int | None = None,
) -> int:
    """The rank to keep for one module. S: its singular values, descending (any length >= 1).

    dense_len is min(out, in), the length of the spectrum a dense SVD would see (kohya's clamp).
    """
    s = S.detach().to(torch.float64).cpu()
    top = float(s[0]) if s.numel() else 0.0
    if kohya_compat:
        k = 1 if top <= _KOHYA_MIN_SV else _kohya_rank(s, method, param, dense_len or s.numel())
    elif top == 0.0:
        k = 1  # a zero update: keep the smallest valid module
    else:
        k = _rank(s, method, param)
    cap = min(rank_in, s.numel(), max_rank or rank_in)
    return max(1, min(k, cap))


def _rank(s: torch.Tensor, method: str, param: float) -> int:
    if method in ("rank", "project"):
        return int(param)
    if method == "ratio":
        return int((s >= s[0] / param).sum())
    if method == "fro":
        return _first_reaching(torch.cumsum(s * s, 0) / (s * s).sum(), param * param)
    if method == "cumulative":
        return _first_reaching(torch.cumsum(s, 0) / s.sum(), param)
    raise ReduceError(f"method {method!r} does not choose ranks module by module")


def _first_reaching(fractions: torch.Tensor, target: float) -> int:
    """Smallest k with fractions[k-1] >= target (tolerating the last ulp of a sum that should be 1)."""
    reached = fractions >= target - 1e-12
    return int(torch.nonzero(reached)[0]) + 1 if reached.any() else fractions.numel()


def _kohya_rank(s: torch.Tensor, method: str, param: float, dense_len: int) -> int:
    # resize_lora.py: index = searchsorted(...) + 1 (or #{S > S0/p}), clamped to [1, len(S) - 1],
    # then new_rank = index + 1. Its S has min(out, in) entries, zeros past the LoRA's rank.
    if method in ("rank", "project"):
        return int(param)
    if method == "ratio":
        index = int((s > s[0] / param).sum())
    elif method == "fro":
        sq = s * s
        index = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), param * param)) + 1
    elif method == "cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), param)) + 1
    else:
        raise ReduceError(f"--kohya-compat has no meaning for method {method!r}")
    return max(1, min(index, dense_len - 1)) + 1
