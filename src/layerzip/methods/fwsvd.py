"""FWSVD (Hsu et al. 2022): Fisher-weighted SVD.

Row importance Iᵢ = Σⱼ E[(∂L/∂Wᵢⱼ)²] (squared gradients summed per output row: `gradients = "weight"`, stats.collect_fisher), then

    W ≈ D⁻¹ · trunc_r(D W),    D = diag(√I)      stored as A = D⁻¹ U_r Σ_r^½,  B = Σ_r^½ V_rᵀ

so rows the loss is sensitive to are approximated better.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..nn import singular_values, truncated_factors
from ..stats import positive_floor
from .base import CompressConfig, register_method


def row_weights(fisher_rows: torch.Tensor) -> torch.Tensor:
    """√I, with rows of zero Fisher given the smallest positive weight (so D stays invertible)."""
    return positive_floor(fisher_rows.double().clamp_min(0).sqrt())


@torch.no_grad()
def fwsvd_factors(W: torch.Tensor, stats, rank: int):
    """(W out×in float64, stats with .fisher_rows, rank) -> (A, B)."""
    w = row_weights(stats.fisher_rows).to(W)
    A, B = truncated_factors(w[:, None] * W, rank)
    return A / w[:, None], B


@register_method("fwsvd")
@dataclass
class FWSVD(CompressConfig):
    """Fisher-weighted SVD: rows weighted by √(Σ squared gradients of the loss)."""
    uses_stats: ClassVar[bool] = True
    sequential_ok: ClassVar[bool] = False
    prefix_ok: ClassVar[bool] = True
    refine_ok: ClassVar[bool] = True

    def factors(self, W, stats, rank):
        return fwsvd_factors(W, stats, rank)

    def spectrum(self, W, stats):
        return singular_values(row_weights(stats.fisher_rows).to(W)[:, None] * W)

    @property
    def gradients(self):
        return "weight"
