"""Whole-file size budget: which singular directions to keep across ALL modules.

Keeping direction j of module i costs bytes_per_rank_i (one column of up and one row of down) and
removes S_ij^2 from the file's total squared error. Every module keeps at least rank 1; beyond
that the directions are taken in order of S_ij^2 per byte until the target is met. Within a module
the values fall while the cost stays, so the order keeps each module's prefix, and the choice is
optimal for total squared error in the fractional relaxation (a greedy knapsack).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorad.errors import ReduceError

MIB = 1 << 20


@dataclass(frozen=True)
class BudgetItem:
    spectrum: torch.Tensor  # singular values of the scaled update, descending
    cap: int  # most directions this module may keep (rank_in, max_rank, len(spectrum))
    bytes_per_rank: int


def allocate(items: list[BudgetItem], fixed_bytes: int, target_bytes: int) -> list[int]:
    """Ranks per item so that fixed_bytes + sum(rank_i * bytes_per_rank_i) <= target_bytes."""
    ranks = [1] * len(items)
    used = fixed_bytes + sum(it.bytes_per_rank for it in items)
    if used > target_bytes:
        raise ReduceError(
            f"budget {target_bytes / MIB:.2f} MiB is below the smallest file these modules make "
            f"({used / MIB:.2f} MiB at rank 1 everywhere)"
        )
    values, owners = [], []
    for i, it in enumerate(items):
        extra = it.spectrum[1 : it.cap].to(torch.float64)
        values.append(extra * extra / it.bytes_per_rank)
        owners.append(torch.full((extra.numel(),), i, dtype=torch.int64))
    if not values:
        return ranks
    order = torch.argsort(torch.cat(values), descending=True, stable=True)
    owner_of = torch.cat(owners)[order].tolist()
    for i in owner_of:
        cost = items[i].bytes_per_rank
        if used + cost <= target_bytes:
            ranks[i] += 1
            used += cost
    return ranks


def total_squared_error(spectra: list[torch.Tensor], ranks: list[int]) -> float:
    """Sum over modules of the energy dropped by keeping ranks[i] values of spectra[i]."""
    return sum(float((s[k:].to(torch.float64) ** 2).sum()) for s, k in zip(spectra, ranks))
