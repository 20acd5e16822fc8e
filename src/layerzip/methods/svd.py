"""Plain truncated SVD: W ≈ U_r Σ_r V_rᵀ, stored as A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ (balanced factors)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..nn import split_balanced, truncated_factors
from .base import CompressConfig, register_method


@torch.no_grad()
def svd_factors(W: torch.Tensor, stats, rank: int):
    """(W out×in float64, stats unused, rank) -> (A, B) with ‖W − AB‖_F minimal (Eckart–Young)."""
    return truncated_factors(W, rank)


@register_method("svd")
@dataclass
class SVD(CompressConfig):
    """Truncated SVD of W (no calibration)."""
    prefix_ok: ClassVar[bool] = True
    refine_ok: ClassVar[bool] = True

    def factors(self, W, stats, rank):
        return svd_factors(W, stats, rank)


__all__ = ["SVD", "split_balanced", "svd_factors"]
