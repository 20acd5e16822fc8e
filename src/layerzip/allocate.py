"""Rank allocation: how many components each module keeps under one parameter budget.

`keep` is the fraction of the targeted modules' weights kept. A rank-r factorization of an m×n weight stores
r(m+n) numbers; a module where that would not be fewer than m·n stays dense (rank None).

Global allocation: a method's spectrum σ (for SVD-LLM the whitened singular values, σ(W L)) gives each module's exact
layer loss at every rank, E(r) = Σ_{i>r} σᵢ². Normalized by the module's output energy Σσᵢ² (so q_proj and
down_proj are comparable), we choose all ranks together:

    minimize Σ_ℓ w_ℓ · E_ℓ(r_ℓ) / E_ℓ(0)    subject to    Σ_ℓ cost_ℓ(r_ℓ) ≤ keep · Σ_ℓ m_ℓ n_ℓ

by bisection on a shared price λ (each module independently minimizes loss + λ·cost, ALDS style), then a greedy
fill of the budget left by the last price step. E is convex in r (σ² descending), so every rank is on the convex
hull except the jump to dense, which the per-module minimization handles.
"""
from __future__ import annotations

import math

import torch


def max_useful_rank(m: int, n: int) -> int:
    """Largest r with r(m+n) < mn: beyond it, low rank stores more than the dense matrix."""
    return (m * n - 1) // (m + n)


def uniform_ranks(shapes: dict[str, tuple[int, int]], keep: float) -> dict[str, int | None]:
    """rank = floor(keep · mn / (m+n)) for every module; None (stay dense) where that saves nothing.

    The budget the floors leave unspent (up to one rank per module: several % on small models) is handed out one
    rank at a time, largest fractional part first, so ranks stay within one of the formula and Σ cost ≤ budget."""
    if keep >= 1:      # nothing to remove: a floor-rank that saves a sliver is not worth its error
        return dict.fromkeys(shapes)
    ranks, frac = {}, {}
    for name, (m, n) in shapes.items():
        exact = keep * m * n / (m + n)
        r = math.floor(exact)
        ranks[name] = r if 1 <= r <= max_useful_rank(m, n) else None
        if ranks[name] is not None and r + 1 <= max_useful_rank(m, n):
            frac[name] = exact - r
    left = keep * sum(m * n for m, n in shapes.values()) - factorized_params(shapes, ranks)
    for name in sorted(frac, key=frac.get, reverse=True):
        m, n = shapes[name]
        if m + n <= left:
            ranks[name] += 1
            left -= m + n
    return ranks


def factorized_params(shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> int:
    return sum(m * n if ranks[k] is None else ranks[k] * (m + n) for k, (m, n) in shapes.items())


def _options(sigma: torch.Tensor, m: int, n: int, weight: float, normalize: bool = True):
    """(costs, losses) of every choice of one module: ranks 1..r_max, then dense (cost mn, loss 0)."""
    r_max = min(max_useful_rank(m, n), sigma.numel())
    s2 = sigma.double().square()
    total = s2.sum()
    norm = total.clamp_min(1e-300) if normalize else 1.0
    tail = (total - s2.cumsum(0)) / norm * weight                # tail[r-1] = (normalized) E(r)
    ranks = torch.arange(1, r_max + 1, dtype=torch.float64)
    costs = torch.cat([ranks * (m + n), torch.tensor([float(m * n)], dtype=torch.float64)])
    losses = torch.cat([tail[:r_max].clamp_min(0), torch.zeros(1, dtype=torch.float64)])
    return costs, losses


def global_ranks(shapes: dict[str, tuple[int, int]], spectra: dict[str, torch.Tensor], keep: float,
                 weights: dict[str, float] | None = None, min_rank: int = 1, normalize: bool = True,
                 max_ranks: dict[str, int] | None = None) -> dict[str, int | None]:
    """Ranks minimizing the summed normalized layer loss with Σ cost ≤ keep · Σ mn (see module doc).

    `spectra[name]`: the singular values whose squared tail is the module's loss at each rank (descending).
    `weights[name]`: an optional sensitivity multiplying the module's normalized loss (default 1).
    `normalize=False`: the spectra are already in one unit across modules (e.g. Fisher-weighted): no division.
    `max_ranks[name]`: the largest rank allowed (0: none, the module stays dense) — `--objective latency` passes
    the ranks above which a factorized module would not be faster than its dense one (speed.max_ranks), so the
    budget is spent only where factorizing buys speed.

    >>> s = {"a": torch.tensor([4., 2., 1.]), "b": torch.tensor([4., 2., 1.])}
    >>> shapes = {"a": (8, 8), "b": (8, 8)}
    >>> global_ranks(shapes, s, keep=0.75), global_ranks(shapes, s, keep=0.75, max_ranks={"a": 0, "b": 3})
    ({'a': 3, 'b': 3}, {'a': None, 'b': 2})
    """
    budget = keep * sum(m * n for m, n in shapes.values())
    names = list(shapes)
    opts = {k: _options(spectra[k], *shapes[k], (weights or {}).get(k, 1.0), normalize) for k in names}
    for k in names:   # options below min_rank (and above max_ranks[k]) are not allowed: give them infinite loss
        opts[k][1][: max(min_rank, 1) - 1] = math.inf
        if max_ranks is not None and k in max_ranks:
            opts[k][1][max(max_ranks[k], 0): -1] = math.inf

    def pick(lam: float) -> dict[str, int]:
        return {k: int(torch.argmin(l + lam * c)) for k, (c, l) in opts.items()}

    def cost(choice: dict[str, int]) -> float:
        return sum(opts[k][0][i].item() for k, i in choice.items())

    lo, hi = 0.0, 1.0                 # λ: price of one parameter in normalized loss; larger λ -> cheaper choice
    while cost(pick(hi)) > budget and hi < 1e30:
        hi *= 4
    for _ in range(100):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        if cost(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    choice = pick(hi)                 # feasible (unless even rank min_rank everywhere exceeds the budget)
    _greedy_fill(opts, choice, budget - cost(choice))
    out: dict[str, int | None] = {}
    for k, i in choice.items():
        n_opts = opts[k][0].numel()
        out[k] = None if i == n_opts - 1 else i + 1     # last option is dense
    return out


def _next_allowed(losses: torch.Tensor, i: int) -> int | None:
    """The next option after i with a finite loss (disallowed ranks are skipped, dense is always allowed)."""
    later = torch.isfinite(losses[i + 1:]).nonzero()
    return i + 1 + int(later[0]) if len(later) else None


def _greedy_fill(opts, choice: dict[str, int], left: float) -> None:
    """Spend the budget left after bisection one step at a time, best loss drop per parameter first."""
    while True:
        best, best_gain, best_j = None, 0.0, None
        for k, i in choice.items():
            c, l = opts[k]
            j = _next_allowed(l, i)
            if j is not None:
                dc = (c[j] - c[i]).item()
                if dc <= left:
                    gain = (l[i] - l[j]).item() / dc
                    if gain > best_gain:
                        best, best_gain, best_j = k, gain, j
        if best is None:
            return
        left -= (opts[best][0][best_j] - opts[best][0][choice[best]]).item()
        choice[best] = best_j
