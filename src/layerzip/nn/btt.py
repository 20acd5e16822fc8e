"""BTTLinear: block tensor-train ("Compute Better Spent", Qiu et al. 2024), rank r, two cores.

x (in = n1·n2) is viewed as (k ∈ n1, j ∈ n2); y (out = m1·m2) as (i ∈ m1, l ∈ m2):

    y[i,l] = Σ_{k,a} W2[i,k,a,l] Σ_j W1[k,j,i,a] x[k,j]     (= einsum('kj,kjia,ikal->il'))

so the (i,k) block of W (m2×n2) is Σ_a W2[i,k,a,:] ⊗ W1[k,:,i,a]: a rank-r matrix with its own parameters.
Hence the Frobenius projection of a dense W is exact: truncate every block's SVD to rank r (Eckart–Young per block).
Parameters r·(n1·n2·m1 + m1·n1·m2) ≈ 2r·d^1.5 for d = in = out; FLOPs 2× that per row. r = 1 is Monarch.
Init: every core N(0, 1/fan_in) with fan_in = n2 (core 1) and n1·r (core 2), so each stage keeps unit RMS.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import register_layer
from ._common import StructuredLinear, balanced_factors, pad_last, pad_matrix


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@register_layer("btt")
class BTTLinear(StructuredLinear):
    """
    >>> import torch
    >>> W = torch.randn(64, 48, dtype=torch.float64)
    >>> full = BTTLinear.from_dense(W, rank=8, in_shape=(6, 8), out_shape=(8, 8))   # rank ≥ block size: lossless
    >>> bool(torch.allclose(full.dense_weight(), W))
    True
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 1, in_shape=None, out_shape=None,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        (n1, n2), (m1, m2) = self._grid(in_features, out_features, in_shape, out_shape)
        if n1 * n2 < in_features or m1 * m2 < out_features or rank < 1:
            raise ValueError(f"bad BTT shape: in {in_features} -> {(n1, n2)}, out {out_features} -> {(m1, m2)}, "
                             f"rank {rank}")
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.in_shape, self.out_shape = (n1, n2), (m1, m2)
        self.W1 = nn.Parameter(torch.empty(n1, n2, m1, rank, **kw))
        self.W2 = nn.Parameter(torch.empty(m1, n1, rank, m2, **kw))
        self._init_bias(bias, kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        (n1, n2), r = self.in_shape, self.rank
        nn.init.normal_(self.W1, std=1 / math.sqrt(n2))
        nn.init.normal_(self.W2, std=1 / math.sqrt(n1 * r))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @staticmethod
    def _grid(in_features: int, out_features: int, in_shape, out_shape) -> tuple[tuple[int, int], tuple[int, int]]:
        """(n1, n2), (m1, m2): the given grids, else balanced factors of in and out."""
        return (tuple(in_shape or balanced_factors(in_features, 2)),
                tuple(out_shape or balanced_factors(out_features, 2)))

    @staticmethod
    def num_params(in_features: int, out_features: int, rank: int = 1, in_shape=None, out_shape=None) -> int:
        (n1, n2), (m1, m2) = BTTLinear._grid(in_features, out_features, in_shape, out_shape)
        return rank * (n1 * n2 * m1 + m1 * n1 * m2)

    @classmethod
    def candidates(cls, in_features: int, out_features: int, budget: float):
        """Exact grids, balanced first (ties keep the first); every rank up to the smaller block side. Smaller
        n1, m1 give fewer parameters (n1 = m1 = 1 is low rank)."""
        n, m = in_features, out_features
        grids = sorted(((a, n // a), (c, m // c)) for a in _divisors(n) for c in _divisors(m))
        grids.sort(key=lambda g: abs(math.log(g[0][0] / g[0][1])) + abs(math.log(g[1][0] / g[1][1])))
        for si, so in grids:
            for r in range(1, min(si[1], so[1]) + 1):
                yield {"rank": r, "in_shape": si, "out_shape": so}

    def flops(self) -> int:
        return 2 * self.num_params(self.in_features, self.out_features, **self._shape_args())

    def _shape_args(self) -> dict:
        return {"rank": self.rank, "in_shape": self.in_shape, "out_shape": self.out_shape}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (n1, n2), (m1, m2), r = self.in_shape, self.out_shape, self.rank
        lead = x.shape[:-1]
        x = pad_last(x, n1 * n2).reshape(-1, n1, n2).transpose(0, 1)            # (n1, B, n2)
        z = torch.bmm(x, self.W1.view(n1, n2, m1 * r))                         # block-diag 1: (n1, B, m1·r)
        B = z.shape[1]
        z = z.view(n1, B, m1, r).permute(2, 1, 0, 3).reshape(m1, B, n1 * r)    # the permutation
        y = torch.bmm(z, self.W2.view(m1, n1 * r, m2))                         # block-diag 2: (m1, B, m2)
        return self._out(y.transpose(0, 1).reshape(*lead, m1 * m2))

    def dense_weight(self) -> torch.Tensor:
        (n1, n2), (m1, m2) = self.in_shape, self.out_shape
        W = torch.einsum("kjia,ikal->ilkj", self.W1, self.W2).reshape(m1 * m2, n1 * n2)
        return W[: self.out_features, : self.in_features]

    @torch.no_grad()
    def project_(self, W: torch.Tensor) -> None:
        """Blockwise rank-r SVD: optimal in Frobenius norm (lossless when r ≥ min(m2, n2))."""
        (n1, n2), (m1, m2), r = self.in_shape, self.out_shape, self.rank
        blocks = pad_matrix(W, m1 * m2, n1 * n2).reshape(m1, m2, n1, n2).permute(0, 2, 1, 3)  # (i, k, m2, n2)
        U, S, Vh = torch.linalg.svd(blocks, full_matrices=False)
        k = min(r, S.shape[-1])
        s = S[..., :k].sqrt()                                                  # split Σ evenly between cores
        W1 = torch.zeros(n1, n2, m1, r, dtype=W.dtype, device=W.device)
        W2 = torch.zeros(m1, n1, r, m2, dtype=W.dtype, device=W.device)
        W1[..., :k] = (s[..., :, None] * Vh[..., :k, :]).permute(1, 3, 0, 2)  # (i,k,a,j) -> (k,j,i,a)
        W2[:, :, :k] = (U[..., :k] * s[..., None, :]).transpose(-1, -2)       # (i,k,l,a) -> (i,k,a,l)
        self.W1.copy_(W1)
        self.W2.copy_(W2)
