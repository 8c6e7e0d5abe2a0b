"""Rank rules that hosts serving many LoRAs on one base model impose, applied after a method's choice.

  rank_multiple M  each module keeps a multiple of M directions, rounding UP (more directions, less
                   error); a module that has fewer directions than that keeps all it has, unless the
                   rule pads (then zero directions fill it up: the update is unchanged)
  uniform          one rank for every module of the file: the smallest that meets the method's rule
                   in every module, capped by max_rank; modules with fewer directions are padded
  serve NAME       the rules a server needs (reference/ecosystem.md §4):
    vllm               one rank, the smallest of vLLM's accepted values >= the largest the method asks
                       for, never above max_rank (then the largest accepted value under it)
    lorax              every rank 8 or a multiple of 16 (Punica kernels), padded up where needed
    diffusers-hotswap  one rank per file, <= max_rank (= the target_rank given to enable_lora_hotswap,
                       so max_rank is required); hotswap ignores rank_pattern and refuses a differing
                       alpha_pattern, so per-module ranks inside one file would not swap right

Pure functions over ints (no torch), so the config and the CLI check rules without loading math.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from lorad.errors import ReduceError

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORAX_RANKS_BELOW_16 = (8,)
SERVERS = ("vllm", "lorax", "diffusers-hotswap")


@dataclass(frozen=True)
class RankRule:
    multiple: int = 1
    uniform: bool = False
    allowed: tuple[int, ...] | None = None  # the one rank must be one of these (vLLM)
    small: tuple[int, ...] = ()  # ranks allowed below `multiple` (LoRAX: 8)
    pad: bool = False  # fill a module up to its rank with zero directions where it has fewer
    serve: str | None = None

    @property
    def is_plain(self) -> bool:
        return self == RankRule()

    def describe(self, max_rank: int | None = None) -> str:
        """One line for the variant's metadata (`lorad.rank_rule`) and records. With max_rank, a
        host reads the target_rank a file was made for from the file itself."""
        parts = []
        if self.uniform:
            parts.append("uniform" + (f" <= {max_rank}" if max_rank is not None else ""))
        if self.allowed:
            parts.append("rank in {" + ",".join(map(str, self.allowed)) + "}")
        if self.multiple > 1:
            small = "".join(f" or {s}" for s in self.small)
            parts.append(f"multiple of {self.multiple}{small}")
        if self.pad:
            parts.append("padded with zero directions")
        return ", ".join(parts) or "none"

    def per_module(self, k: int, available: int, max_rank: int | None) -> int:
        """A module's rank after the rule, from the method's choice k (1 <= k <= available).

        The result may exceed `available` only when the rule pads."""
        if self.multiple <= 1 and not self.small:
            return k
        target = self._round_up(k)
        cap = max_rank if max_rank is not None else math.inf
        while target > cap:  # the next smaller allowed value (never below k's own floor of 1)
            smaller = self._round_down(target - 1)
            if smaller < 1:
                break
            target = smaller
        if target > available and not self.pad:
            return available
        return target

    def one_rank(self, wanted: Iterable[int], max_rank: int | None) -> int:
        """The single rank of a uniform file: enough for every module's wanted rank, capped."""
        need = max(wanted, default=1)
        if max_rank is not None:
            need = min(need, max_rank)
        if self.allowed:
            fitting = [a for a in self.allowed if a >= need and (max_rank is None or a <= max_rank)]
            if fitting:
                return fitting[0]
            below = [a for a in self.allowed if max_rank is None or a <= max_rank]
            if not below:
                raise ReduceError(f"no rank {self.serve or ''} accepts is <= max_rank {max_rank}")
            return below[-1]
        return self.per_module(need, need, max_rank) if self.multiple > 1 else need

    def _round_up(self, k: int) -> int:
        for s in self.small:
            if k <= s:
                return s
        return -(-k // self.multiple) * self.multiple

    def _round_down(self, k: int) -> int:
        m = (k // self.multiple) * self.multiple
        if m >= max(self.multiple, 1) and m > max(self.small, default=0):
            return m
        fitting = [s for s in self.small if s <= k]
        return fitting[-1] if fitting else m

    def meets(self, ranks: Iterable[int]) -> bool:
        """Whether a file whose modules have these ranks satisfies the rule."""
        ranks = list(ranks)
        if not ranks:
            return True
        if (self.uniform or self.allowed) and len(set(ranks)) != 1:
            return False
        if self.allowed and ranks[0] not in self.allowed:
            return False
        if self.multiple > 1:
            return all(r % self.multiple == 0 or r in self.small for r in ranks)
        return True


def rule_for(serve: str | None = None, rank_multiple: int | None = None, uniform: bool = False,
             max_rank: int | None = None) -> RankRule:
    """The rule for a policy or command line; a server's preset, refined by explicit settings."""
    if rank_multiple is not None and rank_multiple < 1:
        raise ReduceError(f"rank_multiple must be >= 1, got {rank_multiple}")
    if serve is None:
        rule = RankRule(multiple=rank_multiple or 1, uniform=uniform, pad=uniform)
    elif serve == "vllm":
        rule = RankRule(uniform=True, allowed=VLLM_RANKS, pad=True, serve=serve)
    elif serve == "lorax":
        rule = RankRule(multiple=16, small=LORAX_RANKS_BELOW_16, uniform=uniform, pad=True, serve=serve)
    elif serve == "diffusers-hotswap":
        if max_rank is None:
            raise ReduceError("serve diffusers-hotswap needs max_rank: the target_rank you give "
                              "pipe.enable_lora_hotswap(target_rank=...)")
        rule = RankRule(multiple=rank_multiple or 1, uniform=True, pad=True, serve=serve)
    else:
        raise ReduceError(f"unknown server {serve!r}; choose one of {', '.join(SERVERS)}")
    if rule.multiple > 1 and max_rank is not None and max_rank < min((rule.multiple, *rule.small)):
        raise ReduceError(f"max_rank {max_rank} is below the smallest rank the rule allows "
                          f"({min((rule.multiple, *rule.small))})")
    return rule


_AS_SERVED = {
    "vllm": RankRule(uniform=True, allowed=VLLM_RANKS),
    "lorax": RankRule(multiple=16, small=LORAX_RANKS_BELOW_16),
    "diffusers-hotswap": RankRule(uniform=True),  # and rank <= the target_rank the pipeline was given
}


def servers_met(ranks: Iterable[int]) -> list[str]:
    """Which servers' rank rules a file with these module ranks meets as it is (for list/show)."""
    ranks = list(ranks)
    return [serve for serve, rule in _AS_SERVED.items() if rule.meets(ranks)]


def levels(rule: RankRule, available: int, max_rank: int | None) -> list[int]:
    """The ranks a budget may give one module under the rule, ascending (for allocation in steps)."""
    cap = available if max_rank is None else min(available, max_rank)
    if rule.multiple <= 1 and not rule.small:
        return list(range(1, cap + 1))
    top = rule.per_module(cap, available, max_rank)
    out = sorted({rule.per_module(k, available, max_rank) for k in range(1, cap + 1)} | {top})
    return [r for r in out if r >= 1]
