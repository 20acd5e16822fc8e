"""TTLinear: tensor-train matrix (Novikov et al. 2015, "Tensorizing Neural Networks").

in = n₁⋯n_d and out = m₁⋯m_d (zero-padded when needed); W[(i₁…i_d), (j₁…j_d)] = G₁[i₁,j₁] G₂[i₂,j₂] ⋯ G_d[i_d,j_d]
with cores G_k of shape (r_{k−1}, m_k, n_k, r_k), r₀ = r_d = 1. Parameters Σ_k r_{k−1} m_k n_k r_k. Internal ranks are
capped at what the unfoldings allow (r_k ≤ min(Π_{≤k} m·n, Π_{>k} m·n)), so a large rank is simply dense.
The forward contracts x with the cores right to left (never forms W). Projection: TT-SVD (Oseledets 2011) —
quasi-optimal (error ≤ √(d−1)·best) and lossless when W has TT ranks ≤ r.
Init: G_k ~ N(0, 1/(n_k·r_k)), one factor per contraction, so each stage keeps unit RMS.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import register_layer
from ._common import StructuredLinear, balanced_factors, pad_last, pad_matrix


def tt_ranks(in_shape, out_shape, rank: int) -> tuple[int, ...]:
    """(1, r₁, …, r_{d−1}, 1) with r_k = min(rank, Π_{≤k} m·n, Π_{>k} m·n)."""
    sizes = [m * n for m, n in zip(out_shape, in_shape)]
    ranks = [1]
    for k in range(1, len(sizes)):
        ranks.append(min(rank, math.prod(sizes[:k]), math.prod(sizes[k:])))
    return tuple(ranks + [1])


@register_layer("tt")
class TTLinear(StructuredLinear):
    """
    >>> import torch
    >>> t = TTLinear(64, 64, rank=4, in_shape=(4, 4, 4), out_shape=(4, 4, 4))
    >>> t.num_parameters() - 64 == TTLinear.num_params(64, 64, rank=4, in_shape=(4, 4, 4), out_shape=(4, 4, 4))
    True
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 8, in_shape=None, out_shape=None,
                 ncores: int = 3, bias: bool = True, device=None, dtype=None):
        super().__init__()
        in_shape, out_shape = self._grid(in_features, out_features, in_shape, out_shape, ncores)
        if (len(in_shape) != len(out_shape) or math.prod(in_shape) < in_features
                or math.prod(out_shape) < out_features or rank < 1):
            raise ValueError(f"bad TT shape: in {in_features} -> {in_shape}, out {out_features} -> {out_shape}")
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.in_shape, self.out_shape = in_shape, out_shape
        self.ranks = tt_ranks(in_shape, out_shape, rank)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], m, n, self.ranks[k + 1], **kw))
            for k, (m, n) in enumerate(zip(out_shape, in_shape)))
        self._init_bias(bias, kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for G in self.cores:
            nn.init.normal_(G, std=1 / math.sqrt(G.shape[2] * G.shape[3]))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @staticmethod
    def _grid(in_features: int, out_features: int, in_shape, out_shape, ncores: int) -> tuple[tuple, tuple]:
        """(n₁…n_d), (m₁…m_d): the given ones, else balanced factors (d = ncores, or len(in_shape))."""
        in_shape = tuple(in_shape or balanced_factors(in_features, ncores))
        return in_shape, tuple(out_shape or balanced_factors(out_features, len(in_shape)))

    @staticmethod
    def num_params(in_features: int, out_features: int, rank: int = 8, in_shape=None, out_shape=None,
                   ncores: int = 3) -> int:
        in_shape, out_shape = TTLinear._grid(in_features, out_features, in_shape, out_shape, ncores)
        r = tt_ranks(in_shape, out_shape, rank)
        return sum(r[k] * m * n * r[k + 1] for k, (m, n) in enumerate(zip(out_shape, in_shape)))

    @classmethod
    def candidates(cls, in_features: int, out_features: int, budget: float):
        """Three balanced cores, rank 1…256."""
        si, so = balanced_factors(in_features, 3), balanced_factors(out_features, 3)
        for r in range(1, 257):
            yield {"rank": r, "in_shape": si, "out_shape": so}

    def flops(self) -> int:
        # right-to-left: core k costs 2·(Π_{<k} n)·(n_k r_k)·(r_{k−1} m_k)·(Π_{>k} m)
        total, d = 0, len(self.cores)
        for k in range(d):
            n_left, m_right = math.prod(self.in_shape[:k]), math.prod(self.out_shape[k + 1:])
            r0, m, n, r1 = self.cores[k].shape
            total += 2 * n_left * n * r1 * r0 * m * m_right
        return total

    def _shape_args(self) -> dict:
        return {"rank": self.rank, "in_shape": self.in_shape, "out_shape": self.out_shape}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, d = x.shape[:-1], len(self.cores)
        t = pad_last(x, math.prod(self.in_shape)).reshape(-1, math.prod(self.in_shape), 1, 1)  # (B, N<k·n_k, r_k, M>k)
        for k in reversed(range(d)):
            r0, m, n, r1 = self.cores[k].shape
            B, M = t.shape[0], t.shape[-1]
            t = t.reshape(B, -1, n * r1, M).transpose(-1, -2)                  # (B, N<k, M>k, n_k·r_k)
            t = t @ self.cores[k].permute(2, 3, 0, 1).reshape(n * r1, r0 * m)  # (B, N<k, M>k, r_{k−1}·m_k)
            t = t.reshape(B, -1, M, r0, m).permute(0, 1, 3, 4, 2).reshape(B, -1, r0, m * M)
        return self._out(t.reshape(*lead, -1))

    def dense_weight(self) -> torch.Tensor:
        T = self.cores[0][0]                                                   # (m₁, n₁, r₁)
        for G in self.cores[1:]:
            M, N = T.shape[:2]
            T = torch.einsum("MNr,rmns->MmNns", T, G).reshape(M * G.shape[1], N * G.shape[2], G.shape[3])
        return T[..., 0][: self.out_features, : self.in_features]

    @torch.no_grad()
    def project_(self, W: torch.Tensor) -> None:
        ms, ns, d = self.out_shape, self.in_shape, len(self.cores)
        T = pad_matrix(W, math.prod(ms), math.prod(ns)).reshape(*ms, *ns)
        T = T.permute(*[i for k in range(d) for i in (k, d + k)])              # (m₁, n₁, m₂, n₂, …)
        C = T.reshape(1, -1)
        for k in range(d - 1):
            r0, r1 = self.ranks[k], self.ranks[k + 1]
            U, S, Vh = torch.linalg.svd(C.reshape(r0 * ms[k] * ns[k], -1), full_matrices=False)
            k_ = min(r1, S.numel())
            G = torch.zeros(r0 * ms[k] * ns[k], r1, dtype=W.dtype, device=W.device)
            G[:, :k_] = U[:, :k_]
            self.cores[k].copy_(G.reshape(r0, ms[k], ns[k], r1))
            C = torch.zeros(r1, Vh.shape[1], dtype=W.dtype, device=W.device)
            C[:k_] = S[:k_, None] * Vh[:k_]
        self.cores[d - 1].copy_(C.reshape(self.ranks[d - 1], ms[d - 1], ns[d - 1], 1))
