"""The exact SVD of dW = scale * up @ down from its thin factors, batched over same-shape modules.

up = Qb Rb and down^T = Qa Ra (reduced QR), so dW = scale * Qb (Rb Ra^T) Qa^T. The small core
M = scale * Rb Ra^T (at most r x r) has SVD u S v^T, hence dW = (Qb u) S (Qa v)^T exactly. This
costs about 4 r^2 (in + out) flops and O((in + out) r) memory; the dense out x in matrix is
never formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FactoredSVD:
    """A batch of G decompositions: dW_g = U_g diag(S_g) V_g^T, singular values descending."""

    U: torch.Tensor  # (G, out, p), p = min(out, in, r)
    S: torch.Tensor  # (G, p)
    V: torch.Tensor  # (G, in, p)

    def truncate(self, g: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top-k triple of member g: (U_k (out, k), S_k (k,), V_k (in, k))."""
        return self.U[g, :, :k], self.S[g, :k], self.V[g, :, :k]


def factored_svd(up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor) -> FactoredSVD:
    """SVD of scale[g] * up[g] @ down[g] for a batch: up (G, out, r), down (G, r, in), scale (G,)."""
    qb, rb = torch.linalg.qr(up)  # (G, out, pb), (G, pb, r)
    qa, ra = torch.linalg.qr(down.transpose(-1, -2))  # (G, in, pa), (G, pa, r)
    core = (rb @ ra.transpose(-1, -2)) * scale.reshape(-1, 1, 1)  # (G, pb, pa)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return FactoredSVD(U=qb @ u, S=s, V=qa @ vh.transpose(-1, -2))


def singular_values(up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Only the spectrum (G, p): the R factors suffice, no Q is kept."""
    rb = torch.linalg.qr(up, mode="r")[1]
    ra = torch.linalg.qr(down.transpose(-1, -2), mode="r")[1]
    core = (rb @ ra.transpose(-1, -2)) * scale.reshape(-1, 1, 1)
    return torch.linalg.svdvals(core)
