"""Closed-form correction after truncation (SVD-LLM's "parameter update" without training).

With the compressed model's own inputs X' (tokens×n) and the original inputs X, the original outputs are Y = W Xᵀ.
Keep B, refit the left factor by least squares:

    A* = argmin_A ‖A B X'ᵀ − W Xᵀ‖²_F = W C Bᵀ (B G' Bᵀ)⁻¹,     G' = X'ᵀX',  C = XᵀX'

so each module absorbs the error its compressed inputs already carry. Only Grams are needed (stats.PairedStats).
Without a separate compressed stream (X' = X) it is the activation-aware refit of A for a fixed B: a no-op for
SVD-LLM (already optimal), an improvement for svd / asvd / cur.
"""
from __future__ import annotations

import torch

from ..nn import split_balanced
from ..stats import grams


def calibration_loss(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, stats) -> float:
    """‖A B X'ᵀ − W Xᵀ‖²_F = tr(AB G' BᵀAᵀ) − 2 tr(AB Cᵀ Wᵀ) + tr(W G Wᵀ), from the Grams alone."""
    G, C, G_ref = (t.to(W) for t in grams(stats))
    AB = A @ B
    return ((AB @ G) * AB).sum().item() - 2 * ((AB @ C.T) * W).sum().item() + ((W @ G_ref) * W).sum().item()


@torch.no_grad()
def refit_left(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, stats) -> torch.Tensor:
    """A* = W C Bᵀ (B G' Bᵀ)⁻¹ (float64). Returns the old A if the solve does not lower the loss (ill-conditioned)."""
    G, C, _ = (t.to(W) for t in grams(stats))
    M = B @ G @ B.T                                   # r×r, symmetric PSD
    rhs = W @ C @ B.T                                 # m×r
    M = (M + M.T) / 2
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    scale = M.diagonal().abs().mean().clamp_min(1e-300)
    A_new = None
    for jitter in (0.0, 1e-12, 1e-10, 1e-8):
        L, info = torch.linalg.cholesky_ex(M + jitter * scale * eye)
        if info.item() == 0:
            A_new = torch.cholesky_solve(rhs.T, L).T
            break
    if A_new is None or not torch.isfinite(A_new).all():
        return A
    return A_new if calibration_loss(A_new, B, W, stats) <= calibration_loss(A, B, W, stats) else A


@torch.no_grad()
def target_aware_factors(W: torch.Tensor, stats, rank: int, rows: torch.Tensor | None = None):
    """The best rank-r map from the compressed inputs to the original outputs, A and B fitted together:

        min_{rank r} ‖W' X'ᵀ − W Xᵀ‖²:   G' = L Lᵀ,  W C L⁻ᵀ = U Σ Vᵀ,  W' = U_r Σ_r V_rᵀ L⁻¹

    (X' = Q Lᵀ, so W' X'ᵀ = W' L Qᵀ and the target's projection onto span(Q) is W C L⁻ᵀ Qᵀ.) With X' = X it is
    exactly SVD-LLM; refit_left cannot improve it further. `rows`: output weights D as in svdllm_factors (the
    loss ‖D(W' X'ᵀ − W Xᵀ)‖², solved by the SVD of D W C L⁻ᵀ)."""
    wt = stats.whitening                                  # of G' = stats.gram, cached and shared
    _, C, _ = grams(stats)
    WC = W @ C.to(W)
    if rows is not None:
        WC = rows.to(W)[:, None] * WC
    if wt.triangular:                                     # (W C) L⁻ᵀ
        M = torch.linalg.solve_triangular(wt.L.T, WC, upper=True, left=False)
    else:
        Q, sqrt_lam = wt.eig                              # L = Q Λ^½  ->  L⁻ᵀ = Q Λ^-½
        M = (WC @ Q) / sqrt_lam
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    A, Bw = split_balanced(U, S, Vh, rank)
    return (A if rows is None else A / rows.to(W)[:, None]), wt.right_solve(Bw)
