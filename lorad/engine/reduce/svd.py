"""The exact SVD of dW = scale * up @ down from its thin factors, batched over same-shape modules.

up = Qb Rb and down^T = Qa Ra (QR), so dW = scale * Qb (Rb Ra^T) Qa^T. The small core
M = scale * Rb Ra^T (at most r x r) has SVD u S v^T, hence dW = (Qb u) S (Qa v)^T exactly. This
costs about 4 r^2 (in + out) flops and O((in + out) r) memory; the dense out x in matrix is
never formed.

Q is never formed either: geqrf keeps it as Householder reflectors and ormqr applies them to the
k kept columns only (forming Q with orgqr costs many times the factorisation itself on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class NonFiniteError(ValueError):
    """The factors hold NaN or Inf (it always reaches the small core)."""


@dataclass(frozen=True)
class _Householder:
    """A batch of QR factorisations x = Q R kept as geqrf's reflectors."""

    reflectors: torch.Tensor  # (G, n, r), R in the upper triangle
    tau: torch.Tensor  # (G, min(n, r))

    @property
    def R(self) -> torch.Tensor:
        p = min(self.reflectors.shape[-2:])
        return self.reflectors[..., :p, :].triu()

    def apply_q(self, g: int, coeffs: torch.Tensor) -> torch.Tensor:
        """Q_g @ coeffs for coeffs (p, k): pad to n rows, then apply the reflectors."""
        n, p = self.reflectors.shape[-2], coeffs.shape[0]
        padded = coeffs.new_zeros(n, coeffs.shape[1])
        padded[:p] = coeffs
        return torch.ormqr(self.reflectors[g], self.tau[g], padded)


def _householder(x: torch.Tensor) -> _Householder:
    reflectors, tau = torch.geqrf(x)
    return _Householder(reflectors, tau)


@dataclass(frozen=True)
class FactoredSVD:
    """A batch of G decompositions: dW_g = (Qb_g u_g) diag(S_g) (Qa_g v_g)^T, S descending."""

    S: torch.Tensor  # (G, p), p = min(out, in, r)
    u: torch.Tensor  # (G, pb, p)
    v: torch.Tensor  # (G, pa, p)
    left: _Householder
    right: _Householder

    def truncate(self, g: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top-k triple of member g: (U_k (out, k), S_k (k,), V_k (in, k))."""
        return self.left.apply_q(g, self.u[g, :, :k]), self.S[g, :k], self.right.apply_q(g, self.v[g, :, :k])


def _core(rb: torch.Tensor, ra: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    core = (rb @ ra.transpose(-1, -2)) * scale.to(rb.dtype).reshape(-1, 1, 1)
    if not bool(torch.isfinite(core).all()):  # x * x is Inf for x = Inf; NaN spreads
        raise NonFiniteError("non-finite values in the factors")
    return core


def factored_svd(up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor) -> FactoredSVD:
    """SVD of scale[g] * up[g] @ down[g] for a batch: up (G, out, r), down (G, r, in), scale (G,)."""
    left, right = _householder(up), _householder(down.transpose(-1, -2))
    u, s, vh = torch.linalg.svd(_core(left.R, right.R, scale), full_matrices=False)
    return FactoredSVD(S=s, u=u, v=vh.transpose(-1, -2), left=left, right=right)


def singular_values(up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Only the spectrum (G, p): the R factors suffice."""
    rb, ra = _householder(up).R, _householder(down.transpose(-1, -2)).R
    return torch.linalg.svdvals(_core(rb, ra, scale))
