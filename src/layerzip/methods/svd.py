"""Plain truncated SVD: W ≈ U_r Σ_r V_rᵀ, stored as A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ (balanced factors)."""
from __future__ import annotations

import torch

from ..nn import split_balanced


@torch.no_grad()
def svd_factors(W: torch.Tensor, stats, rank: int):
    """(W out×in float64, stats unused, rank) -> (A, B) with ‖W − AB‖_F minimal (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return split_balanced(U, S, Vh, rank)
