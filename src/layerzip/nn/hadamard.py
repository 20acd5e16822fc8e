"""LowRankHadamardLinear: W = (X₁Y₁ᵀ) ⊙ (X₂Y₂ᵀ) (FedPara, Hyeon-Woo et al. 2022; PEFT's LoHa), Xᵢ out×R, Yᵢ in×R.

The Hadamard product of two rank-R matrices has rank ≤ R²: W = (X₁ ⊛ X₂)(Y₁ ⊛ Y₂)ᵀ with ⊛ the row-wise Khatri–Rao
product (row u of X₁ ⊛ X₂ is X₁[u] ⊗ X₂[u]). The forward uses exactly that: two skinny GEMMs of width R², never the
dense W. Parameters 2R·(in + out); FLOPs per row 2R²·(in + out) (+ R²·(in + out) per call to form the factors).
Projection has no closed form (the problem is non-convex): `project_` starts from the rank-R truncated SVD (with
X₂Y₂ᵀ = 𝟙, the all-ones matrix, plus 1e-3 noise) and runs `proj_steps` rounds of alternating least squares on
(X₁, Y₁, X₂, Y₂) in float64. Each update is an exact row-wise least-squares solve, so ‖W − Ŵ‖_F never increases and
the result is never worse than the rank-R SVD; it may stop in a local minimum (it does not always recover a
random FedPara matrix exactly).
Init: Xᵢ ~ N(0, 1), Yᵢ ~ N(0, 1/(R·√in)), so Var(Wᵤᵥ) = 1/in and outputs keep unit RMS.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import register_layer
from ._common import StructuredLinear


def khatri_rao_rows(X1: torch.Tensor, X2: torch.Tensor) -> torch.Tensor:
    """(N×R, N×R) -> N×R²: row u is X1[u] ⊗ X2[u]."""
    return (X1[:, :, None] * X2[:, None, :]).reshape(X1.shape[0], -1)


@register_layer("hadamard")
class LowRankHadamardLinear(StructuredLinear):
    """
    >>> import torch
    >>> h = LowRankHadamardLinear(32, 16, rank=3)
    >>> bool(torch.allclose(h(torch.eye(32)).t() - h.bias[:, None], h.dense_weight(), atol=1e-5))
    True
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 4, bias: bool = True,
                 device=None, dtype=None, proj_steps: int = 30):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank, self.proj_steps = in_features, out_features, rank, proj_steps
        self.X1, self.X2 = (nn.Parameter(torch.empty(out_features, rank, **kw)) for _ in range(2))
        self.Y1, self.Y2 = (nn.Parameter(torch.empty(in_features, rank, **kw)) for _ in range(2))
        self._init_bias(bias, kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Wᵤᵥ = Σ_{a,b} X1ᵤₐY1ᵥₐX2ᵤᵦY2ᵥᵦ: R² terms of variance σx⁴σy⁴ -> want R²σx⁴σy⁴ = 1/in.
        nn.init.normal_(self.X1)
        nn.init.normal_(self.X2)
        nn.init.normal_(self.Y1, std=1 / (math.sqrt(self.rank) * self.in_features ** 0.25))
        nn.init.normal_(self.Y2, std=1 / (math.sqrt(self.rank) * self.in_features ** 0.25))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @staticmethod
    def num_params(in_features: int, out_features: int, rank: int = 4) -> int:
        return 2 * rank * (in_features + out_features)

    @classmethod
    def candidates(cls, in_features: int, out_features: int, budget: float):
        """R up to √min(in, out): beyond it R² exceeds the rank a plain matrix can have."""
        for r in range(1, math.isqrt(min(in_features, out_features)) + 1):
            yield {"rank": r}

    def flops(self) -> int:
        return 2 * self.rank ** 2 * (self.in_features + self.out_features)

    def _shape_args(self) -> dict:
        return {"rank": self.rank}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U, V = khatri_rao_rows(self.X1, self.X2), khatri_rao_rows(self.Y1, self.Y2)
        return F.linear(F.linear(x, V.t()), U, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return (self.X1 @ self.Y1.t()) * (self.X2 @ self.Y2.t())

    @torch.no_grad()
    def project_(self, W: torch.Tensor) -> None:
        R = self.rank
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        k = min(R, S.numel())
        g = torch.Generator(device="cpu").manual_seed(0)
        noise = lambda *shape: 1e-3 * torch.randn(*shape, generator=g, dtype=W.dtype).to(W.device)  # noqa: E731
        X1, Y1, X2, Y2 = noise(W.shape[0], R), noise(W.shape[1], R), noise(W.shape[0], R), noise(W.shape[1], R)
        X1[:, :k], Y1[:, :k] = U[:, :k] * S[:k].sqrt(), Vh[:k].t() * S[:k].sqrt()
        X2[:, 0], Y2[:, 0] = 1.0, 1.0                                         # X₂Y₂ᵀ ≈ 𝟙: start at the SVD
        for _ in range(self.proj_steps):                                      # ALS: each update is exact LSQ
            X1, Y1 = _als_pair(W, X1, Y1, X2 @ Y2.t())
            X2, Y2 = _als_pair(W, X2, Y2, X1 @ Y1.t())
        self.X1.copy_(X1)
        self.Y1.copy_(Y1)
        self.X2.copy_(X2)
        self.Y2.copy_(Y2)


def _lsq_rows(W: torch.Tensor, Y: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Rows X[u] = argmin ‖W[u] − (Y X[u]) ⊙ H[u]‖²: Gram Σᵥ H²ᵤᵥ YᵥYᵥᵀ, right side Σᵥ Wᵤᵥ Hᵤᵥ Yᵥ."""
    R = Y.shape[1]
    G = ((H * H) @ (Y[:, :, None] * Y[:, None, :]).reshape(-1, R * R)).reshape(-1, R, R)
    rhs = (W * H) @ Y
    ridge = 1e-10 * G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)[:, None, None]
    return torch.linalg.solve(G + ridge * torch.eye(R, dtype=W.dtype, device=W.device), rhs[..., None])[..., 0]


def _als_pair(W, X, Y, H):
    """One alternating pass on (X, Y) in W ≈ (X Yᵀ) ⊙ H with H fixed."""
    X = _lsq_rows(W, Y, H)
    return X, _lsq_rows(W.t(), X, H.t())
