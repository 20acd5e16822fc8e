"""Rank allocation: how many components each module keeps under one parameter budget.

`keep` is the fraction of the targeted modules' weights kept. A rank-r factorization of an m×n weight stores
r(m+n) numbers; a module where that would not be fewer than m·n stays dense (rank None).
"""
from __future__ import annotations

import math


def max_useful_rank(m: int, n: int) -> int:
    """Largest r with r(m+n) < mn: beyond it, low rank stores more than the dense matrix."""
    return (m * n - 1) // (m + n)


def uniform_ranks(shapes: dict[str, tuple[int, int]], keep: float) -> dict[str, int | None]:
    """rank = floor(keep · mn / (m+n)) for every module; None (stay dense) where that saves nothing."""
    ranks = {}
    for name, (m, n) in shapes.items():
        r = math.floor(keep * m * n / (m + n))
        ranks[name] = r if 1 <= r <= max_useful_rank(m, n) else None
    return ranks


def factorized_params(shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> int:
    return sum(m * n if ranks[k] is None else ranks[k] * (m + n) for k, (m, n) in shapes.items())
