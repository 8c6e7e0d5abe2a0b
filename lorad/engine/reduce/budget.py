"""Whole-file size budget: which singular directions to keep across ALL modules.

Keeping direction j of module i costs bytes_per_rank_i (one column of up and one row of down) and
removes S_ij^2 from the file's total squared error. Every module keeps at least rank 1; beyond
that the directions are taken in order of S_ij^2 per byte until the target is met. Within a module
the values fall while the cost stays, so the order keeps each module's prefix, and the choice is
optimal for total squared error in the fractional relaxation (a greedy knapsack).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from lorad.errors import ReduceError

MIB = 1 << 20


@dataclass(frozen=True)
class BudgetItem:
    spectrum: torch.Tensor  # singular values of the scaled update, descending
    cap: int  # most directions this module may keep (rank_in, max_rank, len(spectrum))
    bytes_per_rank: int
    levels: tuple[int, ...] | None = None  # the ranks a rank rule allows, ascending (None: 1..cap)


def allocate(items: list[BudgetItem], fixed_bytes: int, target_bytes: int) -> list[int]:
    """Ranks per item so that fixed_bytes + sum(rank_i * bytes_per_rank_i) <= target_bytes.

    Each module moves up its allowed levels (1, 2, 3... or a rank rule's 16, 32, ...); the next
    step of every module competes by the squared error it removes per byte. Within a module that
    ratio never rises, so taking the best step first keeps each module's prefix."""
    steps = [it.levels or tuple(range(1, it.cap + 1)) for it in items]
    ranks = [lv[0] for lv in steps]
    used = fixed_bytes + sum(r * it.bytes_per_rank for r, it in zip(ranks, items))
    if used > target_bytes:
        raise ReduceError(
            f"budget {target_bytes / MIB:.2f} MiB is below the smallest file these modules make "
            f"({used / MIB:.2f} MiB at their smallest ranks)"
        )
    energy = [torch.cumsum(it.spectrum.to(torch.float64) ** 2, 0).tolist() for it in items]

    def kept(i: int, rank: int) -> float:
        n = min(rank, len(energy[i]))
        return energy[i][n - 1] if n > 0 else 0.0

    def step(i: int, level: int) -> tuple[float, int, int, int] | None:
        if level + 1 >= len(steps[i]):
            return None
        a, b = steps[i][level], steps[i][level + 1]
        cost = (b - a) * items[i].bytes_per_rank
        return (-(kept(i, b) - kept(i, a)) / cost, i, level + 1, cost)

    heap = [s for s in (step(i, 0) for i in range(len(items))) if s is not None]
    heapq.heapify(heap)
    while heap:
        _, i, level, cost = heapq.heappop(heap)
        if used + cost > target_bytes:
            continue  # this module's later steps cost at least as much: it stays where it is
        ranks[i] = steps[i][level]
        used += cost
        nxt = step(i, level)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return ranks


def allocate_uniform(items: list[BudgetItem], fixed_bytes: int, target_bytes: int, candidates: list[int]) -> int:
    """The one rank, among `candidates` (ascending), that fills the budget best without passing it."""
    per_rank = sum(it.bytes_per_rank for it in items)
    fitting = [r for r in candidates if fixed_bytes + r * per_rank <= target_bytes]
    if not fitting:
        smallest = fixed_bytes + candidates[0] * per_rank
        raise ReduceError(f"budget {target_bytes / MIB:.2f} MiB is below the smallest file one rank for "
                          f"every module makes ({smallest / MIB:.2f} MiB at rank {candidates[0]})")
    return fitting[-1]


def total_squared_error(spectra: list[torch.Tensor], ranks: list[int]) -> float:
    """Sum over modules of the energy dropped by keeping ranks[i] values of spectra[i]."""
    return sum(float((s[k:].to(torch.float64) ** 2).sum()) for s, k in zip(spectra, ranks))
