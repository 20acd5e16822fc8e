"""CURing-style CUR decomposition (Park et al. 2025): W ≈ C U R with real columns and rows of W.

    S = W · diag(√E[x²])                   activation-weighted score (E[x²] = diag(XᵀX) / tokens)
    S ≈ U_r Σ_r V_rᵀ                       top-r singular vectors of the score
    I = DEIM(U_r) (rows), J = DEIM(V_r) (columns);   C = W[:, J],  R = W[I, :],  U = C⁺ W R⁺

Stored as a LowRankLinear A = C U (out×r), B = R (r×in): r(out+in) numbers, the same budget as SVD. At full rank
CUR = C C⁺ W R⁺ R = W exactly (DEIM picks independent rows/columns).
"""
from __future__ import annotations

import torch


def deim(V: torch.Tensor) -> torch.Tensor:
    """Discrete empirical interpolation: r row indices of V (n×r) such that V[idx] is well conditioned.
    Index j = argmax |v_j − V_{:j} (V_{idx,:j})⁻¹ v_j[idx]| (the residual of interpolating column j)."""
    n, r = V.shape
    idx = [int(V[:, 0].abs().argmax())]
    for j in range(1, r):
        P = torch.tensor(idx)
        c = torch.linalg.solve(V[P, :j], V[P, j])
        res = V[:, j] - V[:, :j] @ c
        res[P] = 0                                       # already chosen rows interpolate exactly
        idx.append(int(res.abs().argmax()))
    return torch.tensor(idx)


def activation_scale(W: torch.Tensor, stats) -> torch.Tensor:
    """√E[x²] per input feature (ones without statistics); dead features get the smallest live scale."""
    if stats is None:
        return torch.ones(W.shape[1], dtype=W.dtype)
    d = (stats.gram.diagonal().to(W) / max(stats.tokens, 1)).clamp_min(0).sqrt()
    live = d[d > 0]
    return torch.where(d > 0, d, live.min() if live.numel() else torch.ones((), dtype=W.dtype))


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
    return torch.linalg.svdvals(W * activation_scale(W, stats))
