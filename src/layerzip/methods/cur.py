"""CURing-style CUR decomposition (Park et al. 2025): W ≈ C U R with real columns and rows of W.

    S = W · diag(√E[x²])                   activation-weighted score (E[x²] = diag(XᵀX) / tokens)
    S ≈ U_r Σ_r V_rᵀ                       top-r singular vectors of the score
    I = DEIM(U_r) (rows), J = DEIM(V_r) (columns);   C = W[:, J],  R = W[I, :],  U = C⁺ W R⁺

Stored as a LowRankLinear A = C U (out×r), B = R (r×in): r(out+in) numbers, the same budget as SVD. At full rank
CUR = C C⁺ W R⁺ R = W exactly (DEIM picks independent rows/columns).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import allocate
from ..errors import LayerzipError
from ..nn import singular_values
from ..stats import positive_floor
from .base import CompressConfig, option, register_method


def deim(V: torch.Tensor) -> torch.Tensor:
    """Discrete empirical interpolation: r row indices of V (n×r) such that V[idx] is well conditioned.
    Index j = argmax |v_j − V_{:j} (V_{idx,:j})⁻¹ v_j[idx]| (the residual of interpolating column j)."""
    n, r = V.shape
    idx = [int(V[:, 0].abs().argmax())]
    for j in range(1, r):
        P = torch.tensor(idx, device=V.device)
        c = torch.linalg.solve(V[P, :j], V[P, j])
        res = V[:, j] - V[:, :j] @ c
        res[P] = 0                                       # already chosen rows interpolate exactly
        idx.append(int(res.abs().argmax()))
    return torch.tensor(idx, device=V.device)


def activation_scale(W: torch.Tensor, stats) -> torch.Tensor:
    """√E[x²] per input feature (ones without statistics); dead features get the smallest live scale."""
    if stats is None:
        return torch.ones(W.shape[1], dtype=W.dtype, device=W.device)
    return positive_floor((stats.gram.diagonal().to(W) / max(stats.tokens, 1)).clamp_min(0).sqrt())


@torch.no_grad()
def cur_factors(W: torch.Tensor, stats, rank: int):
    """(W out×in float64, stats with .gram/.tokens or None, rank) -> (A = C U, B = R)."""
    U_s, _, Vh_s = torch.linalg.svd(W * activation_scale(W, stats), full_matrices=False)
    I = deim(U_s[:, :rank])
    J = deim(Vh_s[:rank].T)
    C, R = W[:, J], W[I, :]
    U = torch.linalg.pinv(C) @ W @ torch.linalg.pinv(R)   # r×r
    return C @ U, R


def score_singular_values(W: torch.Tensor, stats) -> torch.Tensor:
    """Singular values of the score matrix (rank from retained energy; spectrum for global allocation)."""
    return singular_values(W * activation_scale(W, stats))


@register_method("cur")
@dataclass
class CUR(CompressConfig):
    """CURing: real rows and columns of W picked by DEIM on an activation-weighted score; U = C⁺ W R⁺.
    `energy` (optional): rank per module = fewest components keeping that fraction of the score's energy
    (then `keep` is not used)."""
    energy: float | None = option(None, "cur: rank per module from this fraction of the score's energy "
                                        "(instead of --keep)")
    uses_stats: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.energy is not None and not 0 < self.energy <= 1:
            raise LayerzipError(f"CUR energy must be in (0, 1], got {self.energy}")

    def factors(self, W, stats, rank):
        return cur_factors(W, stats, rank)

    def spectrum(self, W, stats):
        return score_singular_values(W, stats)

    @property
    def needs_spectra(self):
        return self.energy is not None or super().needs_spectra

    def ranks(self, shapes, keep, spectrum_of=None):
        if self.energy is None:
            return super().ranks(shapes, keep, spectrum_of)
        out = {}
        for n, (m, k) in shapes.items():
            e = spectrum_of(n).square().cumsum(0)
            r = int((e < self.energy * e[-1]).sum()) + 1
            out[n] = r if r <= allocate.max_useful_rank(m, k) else None
        return out
