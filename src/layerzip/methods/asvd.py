"""ASVD (activation-aware SVD, Yuan et al. 2023): scale input columns by s = (mean |x|)^α before the SVD.

W ≈ (W S) truncated, then S⁻¹ is folded into B: A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ S⁻¹, with S = diag(s).
Channels with large activations get approximated better; α = 0.5 as in the paper. A dead input channel (s = 0)
carries no signal: it gets the smallest live scale so S stays invertible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..nn import singular_values, truncated_factors
from ..stats import positive_floor
from .base import CompressConfig, option, register_method


def column_scale(W: torch.Tensor, stats, alpha: float) -> torch.Tensor:
    """s = (mean |x|)^α per input feature, dead features floored."""
    return positive_floor(stats.abs_mean.to(W).clamp_min(0) ** alpha)


@torch.no_grad()
def asvd_factors(W: torch.Tensor, stats, rank: int, alpha: float = 0.5):
    s = column_scale(W, stats, alpha)
    A, B = truncated_factors(W * s, rank)
    return A, B / s


@register_method("asvd")
@dataclass
class ASVD(CompressConfig):
    """Activation-aware SVD: input channels scaled by (mean |x|)^alpha."""
    alpha: float = option(0.5, "asvd: exponent of the activation scaling (mean |x|)^alpha")
    uses_stats: ClassVar[bool] = True
    prefix_ok: ClassVar[bool] = True
    refine_ok: ClassVar[bool] = True

    def factors(self, W, stats, rank):
        return asvd_factors(W, stats, rank, self.alpha)

    def spectrum(self, W, stats):
        return singular_values(W * column_scale(W, stats, self.alpha))
