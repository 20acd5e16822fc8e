"""LowRankLinear: y = (x Bᵀ) Aᵀ + b, with A (out×r) and B (r×in).

Stores r·(in+out) weights instead of in·out. Two skinny GEMMs, so the forward costs what its FLOPs say.
Projection: truncated SVD W ≈ U_r Σ_r V_rᵀ (Frobenius-optimal, Eckart–Young), split evenly as A = U_r Σ_r^½,
B = Σ_r^½ V_rᵀ; exact at r = min(in, out).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import FactorizedLayer, register_layer


def split_balanced(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int):
    """A = U_r Σ_r^½ (out×r), B = Σ_r^½ V_rᵀ (r×in) from an SVD U diag(S) Vh."""
    s = S[:rank].clamp_min(0).sqrt()
    return U[:, :rank] * s, s[:, None] * Vh[:rank]


@register_layer("lowrank")
class LowRankLinear(FactorizedLayer):
    """A rank-r linear layer (r = min(in, out) when not given).

    >>> import torch
    >>> lin = torch.nn.Linear(64, 32)
    >>> lr = LowRankLinear.from_linear(lin)                 # full rank: exact
    >>> bool(torch.allclose(lr.to_dense().weight, lin.weight, atol=1e-5))
    True
    >>> LowRankLinear.num_params(64, 32, rank=4) == LowRankLinear.from_linear(lin, rank=4).num_parameters() - 32
    True
    """

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        rank = rank or min(in_features, out_features)
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.B = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Unit-scale activations like nn.Linear's default: B keeps the variance of x, A maps r -> out.
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @staticmethod
    def num_params(in_features: int, out_features: int, rank: int | None = None) -> int:
        return (rank or min(in_features, out_features)) * (in_features + out_features)

    @classmethod
    def candidates(cls, in_features: int, out_features: int, budget: float):
        for r in range(1, min(in_features, out_features) + 1):
            yield {"rank": r}

    def flops(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.A @ self.B

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype=None, device=None) -> "LowRankLinear":
        """Build from A (out×r), B (r×in); factors are cast to `dtype` (default: A's)."""
        assert A.shape[1] == B.shape[0], (A.shape, B.shape)
        dtype = dtype or A.dtype
        device = device or A.device
        layer = cls(B.shape[1], A.shape[0], A.shape[1], bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    @torch.no_grad()
    def from_dense(cls, W: torch.Tensor, bias: torch.Tensor | None = None, rank: int | None = None) -> "LowRankLinear":
        """Rank-r truncated SVD of W (out×in), computed in float64, factors cast to W's dtype."""
        rank = rank or min(W.shape)
        if not 0 < rank <= min(W.shape):
            raise ValueError(f"rank must be in [1, {min(W.shape)}], got {rank}")
        U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
        A, B = split_balanced(U, S, Vh, rank)
        return cls.from_factors(A, B, bias, dtype=W.dtype, device=W.device)

    # --- serialization: the shape facts needed to rebuild an empty layer before loading tensors
    def spec(self) -> dict:
        return {"type": "lowrank", "in": self.in_features, "out": self.out_features,
                "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "LowRankLinear":
        return cls(spec["in"], spec["out"], spec["rank"], spec["bias"], device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
