"""SVD-LLM (Wang et al. 2024): truncation-aware whitening.

With the input Gram G = XᵀX = L Lᵀ (Cholesky), take the SVD W L = U Σ Vᵀ and keep r components:

    W' = U_r Σ_r V_rᵀ L⁻¹,    stored as  A = U_r Σ_r^½,  B = Σ_r^½ V_rᵀ L⁻¹  (a triangular solve, no inverse)

Then the layer loss ‖(W − W')Xᵀ‖²_F = Σ_{i>r} σ_i², the smallest any rank-r matrix can reach.

A Gram that is singular or numerically indefinite (dead features, fewer tokens than features, float error) gets the
smallest diagonal jitter that makes Cholesky succeed; if none up to 1e-2·mean(diag) does, an eigendecomposition
G = QΛQᵀ gives the square root L = QΛ^½ instead. `whiten` says which happened, never raises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .svd import split_balanced


@dataclass
class Whitening:
    L: torch.Tensor            # n×n with G(+jitter) = L Lᵀ
    triangular: bool           # lower-triangular Cholesky factor, else the eigen square root Q Λ^½
    jitter: float = 0.0        # added to the diagonal of G (absolute)
    eig: tuple | None = None   # (Q, sqrt Λ) when not triangular

    def right_solve(self, M: torch.Tensor) -> torch.Tensor:
        """M L⁻¹ without forming the inverse."""
        if self.triangular:
            return torch.linalg.solve_triangular(self.L, M, upper=False, left=False)
        Q, sqrt_lam = self.eig
        return (M / sqrt_lam) @ Q.T      # (Q Λ^½)⁻¹ = Λ^-½ Qᵀ


@torch.no_grad()
def whiten(G: torch.Tensor) -> Whitening:
    """A square-root factor of the Gram, robust to singular / indefinite G (see module doc)."""
    G = (G + G.T) / 2
    n = G.shape[0]
    scale = G.diagonal().abs().mean().item()
    if not scale > 0:                   # no signal at all: whitening degenerates to plain SVD
        return Whitening(torch.eye(n, dtype=G.dtype), True, 1.0)
    eye = torch.eye(n, dtype=G.dtype)
    for jitter in [0.0] + [scale * 10.0 ** k for k in range(-12, -1)]:
        L, info = torch.linalg.cholesky_ex(G + jitter * eye if jitter else G)
        if info.item() == 0 and torch.isfinite(L).all():
            return Whitening(L, True, jitter)
    lam, Q = torch.linalg.eigh(G)
    lam = lam.clamp_min(lam.max() * n * torch.finfo(G.dtype).eps)
    return Whitening(Q * lam.sqrt(), False, 0.0, (Q, lam.sqrt()))


@torch.no_grad()
def svdllm_factors(W: torch.Tensor, stats, rank: int, whitening: Whitening | None = None,
                   rows: torch.Tensor | None = None):
    """(W out×in float64, stats with .gram, rank) -> (A, B). Pass `whitening` to reuse it across modules.

    `rows` (positive, length out): weight the loss of output i by rows[i]² — min ‖D(W − W')Xᵀ‖, D = diag(rows) —
    solved exactly the same way: SVD of D W L, then A = D⁻¹ U_r Σ_r^½."""
    wt = whitening or whiten(stats.gram.to(W))
    DW = W if rows is None else rows.to(W)[:, None] * W
    U, S, Vh = torch.linalg.svd(DW @ wt.L, full_matrices=False)
    A, M = split_balanced(U, S, Vh, rank)
    return (A if rows is None else A / rows.to(W)[:, None]), wt.right_solve(M)


def whitened_singular_values(W: torch.Tensor, whitening: Whitening, rows: torch.Tensor | None = None) -> torch.Tensor:
    """σ(D W L): σ_{r+1..}² summed is the exact (row-weighted) layer loss of rank r (for allocation and analysis)."""
    return torch.linalg.svdvals((W if rows is None else rows.to(W)[:, None] * W) @ whitening.L)
