"""ASVD (activation-aware SVD, Yuan et al. 2023): scale input columns by s = (mean |x|)^α before the SVD.

W ≈ (W S) truncated, then S⁻¹ is folded into B: A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ S⁻¹, with S = diag(s).
Channels with large activations get approximated better; α = 0.5 as in the paper.
"""
from __future__ import annotations

import torch

from .svd import split_balanced


@torch.no_grad()
def asvd_factors(W: torch.Tensor, stats, rank: int, alpha: float = 0.5):
    s = stats.abs_mean.to(W).clamp_min(0) ** alpha
    # a dead input channel (s = 0) carries no signal: give it the smallest live scale so S stays invertible
    live = s[s > 0]
    floor = live.min() if live.numel() else torch.ones((), dtype=W.dtype)
    s = torch.where(s > 0, s, floor)
    U, S, Vh = torch.linalg.svd(W * s, full_matrices=False)
    A, B = split_balanced(U, S, Vh, rank)
    return A, B / s
