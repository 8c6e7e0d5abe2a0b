"""The formula, on tensors only (no I/O, no models): what the runners and the tests share.

Everything is computed in float64: the figures compare small differences of large outputs, and an
identical copy must come out as exactly 1.
"""

from __future__ import annotations

import torch

from lorad.errors import LoradError


def effect_retained(e_orig: torch.Tensor, e_other: torch.Tensor) -> float:
    """1 - ||e_other - e_orig|| / ||e_orig|| (Frobenius over every element).

    1 when the other file does exactly what the original does; 0 when it misses by as much as the
    original's whole effect (also for twice the effect, or none at all); below 0 when worse still.
    """
    if e_orig.shape != e_other.shape:
        raise ValueError(f"effects of different shapes: {tuple(e_orig.shape)} and {tuple(e_other.shape)}")
    e_orig, e_other = e_orig.double(), e_other.double()
    norm = torch.linalg.vector_norm(e_orig)
    if not torch.isfinite(norm) or not torch.isfinite(torch.linalg.vector_norm(e_other)):
        raise LoradError("the model's output is not finite (NaN or inf) with one of the LoRAs loaded")
    if norm == 0:
        raise LoradError("the original LoRA changes nothing on this base model at these samples "
                         "(its output equals the base's), so there is no effect to compare")
    return float(1.0 - torch.linalg.vector_norm(e_other - e_orig) / norm)


def kl_mean(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """Mean over tokens of KL(p || q), p and q the softmax of the last dimension (vocabulary)."""
    log_p = torch.log_softmax(logits_p.double(), dim=-1)
    log_q = torch.log_softmax(logits_q.double(), dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    # clamp: rounding can leave a hair below 0 where p == q, and KL is never negative
    return float(per_token.clamp_min(0).mean())


def summary(per_sample: list[float]) -> tuple[float, float]:
    """(mean, worst) over the samples."""
    return sum(per_sample) / len(per_sample), min(per_sample)
