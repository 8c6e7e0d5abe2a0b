"""The exact SVD of dW = scale * up @ down from its thin factors, batched over same-shape modules.

up = Qb Rb and down^T = Qa Ra (QR), so dW = scale * Qb (Rb Ra^T) Qa^T. The small core
M = scale * Rb Ra^T (at most r x r) has SVD u S v^T, hence dW = (Qb u) S (Qa v)^T exactly. This
costs about 4 r^2 (in + out) flops and O((in + out) r) memory; the dense out x in matrix is
never formed.

Q is never formed either: geqrf keeps it as Householder reflectors and ormqr applies them to the
k kept columns only (forming Q with orgqr costs many times the factorisation itself on CPU).

The core's own decomposition is an eigendecomposition of its smaller Gram matrix G = M M^T, in
float64 (about half the cost of torch.linalg.svd in float32 on these shapes). Squaring the
condition number costs nothing that matters here: float64 eigenvalues are accurate to
eps64 * s_max^2 absolutely, so S = sqrt(eig) is more accurate than float32's SVD for every singular
value above 1e-8 * s_max, and the core itself is only float32 (from float32 QR; a float64 core
keeps the SVD, whose round-off its Gram would square). The truncation U_k S_k V_k^T is built as
U_k U_k^T M (V_k = M^T U_k / S_k): the projection onto the top-k eigenvectors, optimal to float64
round-off whatever the gaps between singular values, with a tail whose norm is exactly
sqrt(sum of the other eigenvalues). What can lose accuracy is V_k where a kept S_i is tiny (the
division amplifies round-off by s_max^2 / S_i^2); V_k is checked to be orthonormal to well below
what float32's SVD delivers (about 1e-6), and a module whose V_k is not gets its vectors from the
SVD of its core, in float64.
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


# Largest |V_k^T V_k - I| entry accepted from the Gram route. torch.linalg.svd in float32 gives
# about 1e-6 on these cores, so vectors that pass are at least as exact as the SVD's were.
ORTHONORMAL_TOL = 1e-7


@dataclass(frozen=True)
class FactoredSVD:
    """A batch of G decompositions: dW_g = (Qb_g u_g) diag(S_g) (Qa_g v_g)^T, S descending."""

    S: torch.Tensor  # (G, p) float64, p = min(out, in, r)
    core: torch.Tensor  # (G, pb, pa): scale * Rb Ra^T
    vectors: torch.Tensor | None  # (G, min(pb, pa), p) float64: the smaller Gram's eigenvectors
    left: _Householder
    right: _Householder

    def truncate(self, g: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top-k triple of member g: (U_k (out, k), S_k (k,), V_k (in, k))."""
        u, v = self._core_vectors(g, k)
        dtype = self.core.dtype
        return (self.left.apply_q(g, u.to(dtype)), self.S[g, :k].to(dtype),
                self.right.apply_q(g, v.to(dtype)))  # fmt: skip

    def _core_vectors(self, g: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        core = self.core[g].to(torch.float64)
        if self.vectors is not None:
            tall = core.shape[0] > core.shape[1]  # the Gram was M^T M: its vectors are the right ones
            known = self.vectors[g, :, :k]
            other = (core if tall else core.T) @ known / self.S[g, :k]
            if _orthonormal(other):
                return (other, known) if tall else (known, other)
        u, _s, vh = torch.linalg.svd(core, full_matrices=False)
        return u[:, :k], vh[:k].T


def _orthonormal(x: torch.Tensor) -> bool:
    error = (x.T @ x - torch.eye(x.shape[1], dtype=x.dtype, device=x.device)).abs().max()
    return bool(error <= ORTHONORMAL_TOL)  # False for NaN/Inf, from dividing by a zero S


def _core(rb: torch.Tensor, ra: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    core = (rb @ ra.transpose(-1, -2)) * scale.to(rb.dtype).reshape(-1, 1, 1)
    if not bool(torch.isfinite(core).all()):  # x * x is Inf for x = Inf; NaN spreads
        raise NonFiniteError("non-finite values in the factors")
    return core


def _gram(core: torch.Tensor) -> torch.Tensor:
    """The smaller of M M^T and M^T M, in float64 (products of float32 values are exact there)."""
    c = core.to(torch.float64)
    return c @ c.transpose(-1, -2) if c.shape[-2] <= c.shape[-1] else c.transpose(-1, -2) @ c


def _descending_sqrt(eigenvalues: torch.Tensor, p: int) -> torch.Tensor:
    # eigh sorts ascending; round-off can leave a zero eigenvalue slightly negative
    return eigenvalues.flip(-1)[..., :p].clamp(min=0).sqrt()


def factored_svd(up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor) -> FactoredSVD:
    """SVD of scale[g] * up[g] @ down[g] for a batch: up (G, out, r), down (G, r, in), scale (G,)."""
    left, right = _householder(up), _householder(down.transpose(-1, -2))
    core = _core(left.R, right.R, scale)
    if core.dtype == torch.float64:  # its Gram would square float64's own round-off: the SVD it is
        return FactoredSVD(torch.linalg.svdvals(core), core, None, left, right)
    p = min(core.shape[-2:])
    eigenvalues, vectors = torch.linalg.eigh(_gram(core))
    return FactoredSVD(_descending_sqrt(eigenvalues, p), core, vectors.flip(-1)[..., :p], left, right)


def singular_values(up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Only the spectrum (G, p), float64, as factored_svd computes it: the R factors suffice."""
    rb, ra = _householder(up).R, _householder(down.transpose(-1, -2)).R
    core = _core(rb, ra, scale)
    if core.dtype == torch.float64:
        return torch.linalg.svdvals(core)
    return _descending_sqrt(torch.linalg.eigvalsh(_gram(core)), min(core.shape[-2:]))
