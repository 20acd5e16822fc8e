"""Rank allocation: how many components each module keeps under one parameter budget.

`keep` is the fraction of the targeted modules' weights kept. A rank-r factorization of an m×n weight stores
r(m+n) numbers; a module where that would not be fewer than m·n stays dense (rank None).

Global allocation: a method's spectrum σ (for SVD-LLM the whitened singular values, σ(W L)) gives each module's exact
layer loss at every rank, E(r) = Σ_{i>r} σᵢ². Normalized by the module's output energy Σσᵢ² (so q_proj and
down_proj are comparable), we choose all ranks together:

    minimize Σ_ℓ w_ℓ · E_ℓ(r_ℓ) / E_ℓ(0)    subject to    Σ_ℓ cost_ℓ(r_ℓ) ≤ keep · Σ_ℓ m_ℓ n_ℓ

as one path through all budgets (AllocationPath): each module's choices on their lower convex hull, all modules'
moves sorted by loss removed per parameter — the choices of a shared price λ (each module independently minimizing
loss + λ·cost, ALDS style) at every λ — then a partial step that fills the budget left to within one rank. E is
convex in r (σ² descending), so every rank is on the convex hull except the jump to dense, which the hull handles.
Allocations are nested: a smaller keep never gets a larger rank (what `--elastic` stores relies on).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from .nn.lowbit import GROUP_SIZE, stored_bytes


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

    Nested (AllocationPath): the ranks at a smaller keep never exceed those at a larger one (dense counts as the
    largest rank), so every keep is a truncation of every larger keep (`--elastic`).

    >>> s = {"a": torch.tensor([4., 2., 1.]), "b": torch.tensor([4., 2., 1.])}
    >>> shapes = {"a": (8, 8), "b": (8, 8)}
    >>> global_ranks(shapes, s, keep=0.75), global_ranks(shapes, s, keep=0.75, max_ranks={"a": 0, "b": 3})
    ({'a': 3, 'b': 3}, {'a': None, 'b': 2})
    """
    path = AllocationPath(shapes, spectra, weights, min_rank, normalize, max_ranks)
    return path.ranks(keep * path.dense_params)


class AllocationPath:
    """Global allocation as one path through every budget, so that allocations are nested.

    Each module's allowed choices (ranks min_rank..r_max, capped by `max_ranks`, then dense) are points (cost,
    loss); the lower convex hull of those points, from the cheapest, is the module's sequence of moves, each with a
    rate (loss removed per parameter added) that decreases along the hull. All modules' moves sorted by rate, best
    first, form the path; the allocation at a budget is the longest prefix of the path that fits — exactly the
    choice of the Lagrangian with the price at that point (each module minimizing loss + λ·cost) — plus a partial
    step: the next move, when it does not fit whole, is taken as far as it fits through the ranks it jumps over
    (a jump to dense passes through the ranks between; a rank step is one rank). A larger budget takes a longer
    prefix, and within one move a larger partial step, so no module's rank ever decreases as the budget grows:
    the allocations are nested. The budget left unspent is under one rank of one module (m+n parameters).

    With `max_ranks` (--objective latency, never --elastic) a capped module's move to dense may have no rank between
    to take partly; the budget such a move leaves is then filled greedily (best loss drop per parameter among the
    next choices that fit), which spends it but may not nest.

    >>> path = AllocationPath({"a": (8, 8)}, {"a": torch.tensor([4., 2., 1.])})
    >>> [path.ranks(b)["a"] for b in (16, 40, 48, 63, 64)]
    [1, 2, 3, 3, None]
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], spectra: dict[str, torch.Tensor],
                 weights: dict[str, float] | None = None, min_rank: int = 1, normalize: bool = True,
                 max_ranks: dict[str, int] | None = None):
        self.names = list(shapes)
        self.shapes = dict(shapes)
        self.dense_params = sum(m * n for m, n in shapes.values())
        self.costs, self.allowed, self.start, self.opts = {}, {}, {}, {}
        self.capped = max_ranks is not None
        moves = []                                   # (-rate, module index, position on its hull, name, from, to)
        for mi, k in enumerate(self.names):
            c, l = _options(spectra[k], *shapes[k], (weights or {}).get(k, 1.0), normalize)
            ok = torch.ones(c.numel(), dtype=torch.bool)
            ok[: max(min_rank, 1) - 1] = False       # ranks below min_rank (and above max_ranks[k]) are not allowed
            if max_ranks is not None and k in max_ranks:
                ok[max(max_ranks[k], 0): -1] = False
            idx = ok.nonzero().flatten().tolist()     # dense (the last option) is always allowed
            cs, ls = c.tolist(), l.tolist()
            self.costs[k], self.allowed[k], self.start[k] = cs, idx, idx[0]
            self.opts[k] = (c, torch.where(ok, l, torch.full_like(l, math.inf)))
            hull = [idx[h] for h in _lower_hull([(cs[i], ls[i]) for i in idx])]
            rate_cap = math.inf
            for pos, (a, b) in enumerate(zip(hull, hull[1:])):
                rate_cap = min(rate_cap, (ls[a] - ls[b]) / (cs[b] - cs[a]))   # non-increasing along a hull (floats)
                moves.append((-rate_cap, mi, pos, k, a, b))
        moves.sort(key=lambda t: t[:3])
        self.moves = [(k, i, j) for _, _, _, k, i, j in moves]
        self.base = sum(self.costs[k][self.start[k]] for k in self.names)
        cum, total = [], self.base
        for k, i, j in self.moves:
            total += self.costs[k][j] - self.costs[k][i]
            cum.append(total)
        self.cum = cum                               # cost of the allocation after each move

    def choice(self, budget: float) -> dict[str, int]:
        """{name: option index} (index r-1: rank r; the last index: dense) at `budget` parameters."""
        p = bisect.bisect_right(self.cum, budget + 1e-9)       # moves 0..p-1 fit whole
        choice = dict(self.start)
        for k, _, j in self.moves[:p]:
            choice[k] = j
        used = self.cum[p - 1] if p else self.base
        if p < len(self.moves):                                # the next move, as far as it fits
            k, i, j = self.moves[p]
            c = self.costs[k]
            for t in self.allowed[k]:
                if i < t < j and c[t] - c[i] <= budget - used + 1e-9:
                    choice[k] = t
            used = sum(self.costs[n][choice[n]] for n in self.names)
            if self.capped:     # a capped module's jump to dense has no ranks between to fill with: greedy fill
                _greedy_fill(self.opts, choice, budget - used)
        return choice

    def ranks(self, budget: float) -> dict[str, int | None]:
        """{name: rank, None where dense} at `budget` parameters (below the cheapest allocation: that one)."""
        out: dict[str, int | None] = {}
        for k, i in self.choice(budget).items():
            out[k] = None if i == len(self.costs[k]) - 1 else i + 1
        return out


def _lower_hull(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the lower convex hull of points with increasing x, from the first to the last (collinear and
    upper points left out): the moves a Lagrangian ever chooses."""
    hull: list[int] = []
    for i, (x, y) in enumerate(points):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = points[hull[-2]], points[hull[-1]]
            if (y2 - y1) * (x - x1) >= (y - y1) * (x2 - x1):     # hull[-1] on or above the chord: drop it
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _next_allowed(losses: torch.Tensor, i: int) -> int | None:
    """The next option after i with a finite loss (disallowed ranks are skipped, dense is always allowed)."""
    later = torch.isfinite(losses[i + 1:]).nonzero()
    return i + 1 + int(later[0]) if len(later) else None


def _greedy_fill(opts, choice: dict[str, int], left: float) -> None:
    """Spend the budget left one step at a time, best loss drop per parameter first."""
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


def option_choice(options: dict[str, tuple[torch.Tensor, torch.Tensor]], budget: float) -> dict[str, int]:
    """{name: index of its chosen option} minimizing Σ loss with Σ cost ≤ budget, for modules whose options are any
    (cost, loss) points (e.g. rank × bits under a bytes budget, `bytes_allocation`): the Lagrangian path of
    AllocationPath — each module's lower convex hull from its cheapest option, all hull moves by loss removed per
    unit of cost, the longest prefix that fits — then the budget left spent greedily on any option that lowers a
    module's loss and fits. Below the cheapest allocation: that one.

    >>> opts = {"a": (torch.tensor([1., 2., 4.]), torch.tensor([3., 1., 0.])),
    ...         "b": (torch.tensor([1., 3.]), torch.tensor([2., 0.]))}
    >>> option_choice(opts, 2), option_choice(opts, 5), option_choice(opts, 7)
    ({'a': 0, 'b': 0}, {'a': 1, 'b': 1}, {'a': 2, 'b': 1})
    """
    moves, choice, used = [], {}, 0.0
    for k, (c, l) in options.items():
        order = sorted(range(c.numel()), key=lambda i: (c[i].item(), l[i].item()))
        pts = [(c[i].item(), l[i].item()) for i in order]
        hull = [order[h] for h in _lower_hull(pts)]
        choice[k] = hull[0]
        used += c[hull[0]].item()
        rate = math.inf
        for pos, (a, b) in enumerate(zip(hull, hull[1:])):
            rate = min(rate, (l[a] - l[b]).item() / max((c[b] - c[a]).item(), 1e-300))
            if rate > 0:
                moves.append((-rate, pos, k, a, b))
    for _, _, k, a, b in sorted(moves, key=lambda t: t[:2]):
        step = (options[k][0][b] - options[k][0][a]).item()
        if choice[k] != a or used + step > budget + 1e-9:
            break
        choice[k], used = b, used + step
    while True:                                     # the rest: the best loss drop per unit of cost that fits
        best, best_rate = None, 0.0
        for k, (c, l) in options.items():
            i = choice[k]
            ok = (c - c[i] <= budget - used + 1e-9) & (l < l[i])
            if ok.any():
                rate = torch.where(ok, (l[i] - l) / (c - c[i]).clamp_min(1e-300), -math.inf)
                j = int(rate.argmax())
                if rate[j] > best_rate:
                    best, best_rate = (k, j), rate[j].item()
        if best is None:
            return choice
        k, j = best
        used += (options[k][0][j] - options[k][0][choice[k]]).item()
        choice[k] = j


@dataclass(frozen=True)
class BytesBudget:
    """--budget-bytes: `total` bytes for every tensor written; each compressed module's rank and storage (`bits`:
    16 = the model's dtype, 8, 4, with a float32 scale per `group_size` values) chosen together. `elem_bytes`: of
    a floating value as it will be saved (None: the model's own dtype; 2 for a float32 model saved in bfloat16)."""
    total: float
    bits: tuple[int, ...] = (16, 8, 4)
    group_size: int = GROUP_SIZE
    elem_bytes: int | None = None


def bytes_options(sigma: torch.Tensor, m: int, n: int, errors: dict[int, float], elem_bytes: int,
                  group_size: int = GROUP_SIZE, weight: float = 1.0, normalize: bool = True):
    """(costs in bytes, losses, [(rank or None for dense, bits)]) of one m×n module's choices under a bytes budget
    (--budget-bytes): every rank 1..r_max and dense, each at every bits in `errors`. `errors[bits]`: the relative
    squared error of rounding the module's weight to `bits` (lowbit.rounding_error; 0 at 16). The loss of rank r
    at b bits is the truncation loss E(r) plus the rounding of what is kept, (Σσ² − E(r))·errors[b]; dense at b
    bits loses Σσ²·errors[b]. Normalized by Σσ² as in `_options`. (Measured on Gemma-3-270M's SVD-LLM factors at
    keep 0.5: the whitened error of rounding both factors is 0.6–1.6× the weight's `errors[b]`, for 8 and 4 bits.)"""
    r_max = min(max_useful_rank(m, n), sigma.numel())
    s2 = sigma.double().square()
    total = s2.sum()
    norm = total.clamp_min(1e-300) if normalize else 1.0
    tail = ((total - s2.cumsum(0))[:r_max].clamp_min(0) / norm * weight).tolist()
    kept_all = float(total / norm * weight)
    costs, losses, what = [], [], []
    for b, err in errors.items():
        for r in range(1, r_max + 1):
            costs.append(stored_bytes(m, r, b, group_size, elem_bytes) + stored_bytes(r, n, b, group_size, elem_bytes))
            losses.append(tail[r - 1] + err * (kept_all - tail[r - 1]))
            what.append((r, b))
        costs.append(stored_bytes(m, n, b, group_size, elem_bytes))
        losses.append(err * kept_all)
        what.append((None, b))
    return torch.tensor(costs, dtype=torch.float64), torch.tensor(losses, dtype=torch.float64), what


# ------------------------------------------------------------------------------------------------------ VBMF ranks
def _evb_tau(alpha: float) -> float:
    """τ̲(α): the positive root of ln(1 + τ) + α ln(1 + τ/α) = τ (≈ 2.5129 at α = 1), by bisection."""
    def f(t):
        return math.log1p(t) + alpha * math.log1p(t / alpha) - t
    lo, hi = 1e-9, 1.0
    while f(hi) > 0:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def vbmf_rank(sigma: torch.Tensor, rows: int, cols: int, residual: float = 0.0) -> int:
    """The rank empirical variational Bayesian matrix factorization keeps (EVBMF: Nakajima et al. 2013, "Global
    analytic solution of fully-observed VBMF"; Kim et al. 2016 choose Tucker-2 ranks with it): a rows × cols
    matrix is signal plus i.i.d. Gaussian noise of unknown variance σ², estimated by minimizing the EVB free energy
    over σ²; component h is kept iff γ_h² > M σ² x̲, x̲ = (1 + τ̲)(1 + α/τ̲), with L ≤ M the matrix's sides and
    α = L/M. `sigma`: its singular values (all L of them, or the leading ones with `residual` the squared Frobenius
    norm of the rest). No parameter; invariant to the matrix's scale.

    >>> g = torch.Generator().manual_seed(0)
    >>> Y = torch.randn(40, 5, generator=g) @ torch.randn(5, 60, generator=g) * 4 + torch.randn(40, 60, generator=g)
    >>> vbmf_rank(torch.linalg.svdvals(Y), 40, 60), vbmf_rank(torch.linalg.svdvals(torch.randn(40, 60)), 40, 60)
    (5, 0)
    """
    L, M = min(rows, cols), max(rows, cols)
    s2 = sigma.double().flatten().sort(descending=True).values[:L].square()
    H = s2.numel()
    if H == 0 or not s2[0] > 0:
        return 0
    alpha = L / M
    tau = _evb_tau(alpha)
    x_low = (1 + tau) * (1 + alpha / tau)

    def free_energy(log_v: float) -> float:
        v = math.exp(log_v)
        x = s2 / (M * v)
        big = x > x_low
        z, small = x[big], x[~big].clamp_min(1e-300)
        t = 0.5 * (z - (1 + alpha) + ((z - (1 + alpha)).square() - 4 * alpha).clamp_min(0).sqrt())
        return float((small - small.log()).sum() + (z - z.log()).sum()
                     + (torch.log1p(t) + alpha * torch.log1p(t / alpha) - t).sum()
                     + residual / (M * v) + (L - H) * log_v)

    upper = (float(s2.sum()) + residual) / (L * M)
    h = min(math.ceil(L / (1 + alpha)) - 1, H) - 1           # the paper's bound on the noise variance from below
    lower = max(float(s2[h + 1]) / (M * x_low), float(s2[h + 1:].mean()) / M) if 0 <= h + 1 < H else upper * 1e-12
    a, b = math.log(max(min(lower, upper), upper * 1e-12)), math.log(upper)
    phi = (math.sqrt(5) - 1) / 2                              # golden-section search on log σ²
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = free_energy(c), free_energy(d)
    for _ in range(120):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = free_energy(c)
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = free_energy(d)
    v = math.exp((a + b) / 2)
    return int((s2 > M * v * x_low).sum())
