"""MonarchLinear (Dao et al. 2022): W = P₂ L P R, block-diagonal · permutation · block-diagonal.

With b blocks: R has b blocks mapping n2 = ⌈in/b⌉ inputs to b outputs, P transposes the (b × b) grid, L has b blocks
mapping b inputs to m2 = ⌈out/b⌉ outputs. Equivalently, W cut into a b×b grid of (m2×n2) blocks has every block of
rank 1 — it is BTT with r = 1 and n1 = m1 = b, so the forward and the exact projection (blockwise rank-1 SVD, the
projection of HazyResearch/fly's `blockdiag_butterfly_project`) are BTTLinear's.
Parameters b²·(n2 + m2) ≈ b·(in + out); b = √d gives the classic 2·d^1.5. Any b ≥ 1 works for any
rectangular shape: non-divisible sizes are zero-padded.
"""
from __future__ import annotations

import math

from .base import register_layer
from .btt import BTTLinear


@register_layer("monarch")
class MonarchLinear(BTTLinear):
    """
    >>> import torch
    >>> m = MonarchLinear(100, 60, nblocks=4)          # rectangular, padded: 4 blocks of 25 -> 4 blocks of 15
    >>> m(torch.randn(3, 100)).shape
    torch.Size([3, 60])
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int | None = None, bias: bool = True,
                 device=None, dtype=None):
        b = self._nblocks(in_features, out_features, nblocks)
        if not 1 <= b <= min(in_features, out_features):
            raise ValueError(f"nblocks must be in [1, {min(in_features, out_features)}], got {b}")
        self.nblocks = b
        super().__init__(in_features, out_features, rank=1, in_shape=(b, math.ceil(in_features / b)),
                         out_shape=(b, math.ceil(out_features / b)), bias=bias, device=device, dtype=dtype)

    @staticmethod
    def _nblocks(in_features: int, out_features: int, nblocks: int | None) -> int:
        """`nblocks`, else ≈ √min(in, out)."""
        return nblocks or max(1, round(math.sqrt(min(in_features, out_features))))

    @staticmethod
    def num_params(in_features: int, out_features: int, nblocks: int | None = None) -> int:
        b = MonarchLinear._nblocks(in_features, out_features, nblocks)
        return b * b * (math.ceil(in_features / b) + math.ceil(out_features / b))

    @classmethod
    def candidates(cls, in_features: int, out_features: int, budget: float):
        for b in range(1, min(in_features, out_features) + 1):
            yield {"nblocks": b}

    def _shape_args(self) -> dict:
        return {"nblocks": self.nblocks}
