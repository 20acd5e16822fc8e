"""Where a low-rank layer is faster than its dense one: per-shape speedups measured on this machine, cached.

`--objective latency` (global allocation) lets a module take only the ranks at which its LowRankLinear — two skinny
GEMMs, x Bᵀ then (x Bᵀ) Aᵀ — runs at least `MIN_SPEEDUP` × faster than the dense x Wᵀ; above that rank it stays
dense (`allocate.global_ranks(..., max_ranks=)`). The FLOP ratio alone says rank r is faster whenever
r(m+n) < mn, but two GEMMs do not reach the FLOP bound (bench/results/latency_*.json: a 1536×384 layer at 0.8 of
its weights ran at 0.92× dense with 2048 tokens), so the rank is found by measurement:

    speedup(r) = median over pairs of  t(x Wᵀ) / t((x Bᵀ) Aᵀ)       x: TOKENS rows, `threads` torch threads

on a grid of ranks (weight fractions r(m+n)/mn = 0.1 … 1), at batch-1 and batch-16 token counts (the smaller
speedup counts), linearly interpolated. Results are cached per machine (CPU model, cores, torch version, threads)
in `$LAYERZIP_CACHE` or `~/.cache/layerzip/speed.json`, so each shape is timed once.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

MIN_SPEEDUP = 1.05                 # faster by at least 5%: below that, timing noise decides
TOKENS = (128, 2048)              # batch 1 and batch 16 of 128 tokens (what `eval --latency` times)
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
REPEATS = 5


def cache_file() -> Path:
    root = os.environ.get("LAYERZIP_CACHE") or Path.home() / ".cache" / "layerzip"
    return Path(root) / "speed.json"


def machine_key(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}|{os.cpu_count()} cores|torch {torch.__version__}|{threads} threads"


def _rank(m: int, n: int, fraction: float) -> int:
    return max(1, min(round(fraction * m * n / (m + n)), (m * n - 1) // (m + n)))


@torch.no_grad()
def measure_shape(m: int, n: int, threads: int = 1, tokens=TOKENS, fractions=FRACTIONS, repeats: int = REPEATS
                  ) -> list[tuple[int, float]]:
    """[(rank, speedup over dense)] of an m×n (out×in) layer on the rank grid; the smaller over `tokens`."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    try:
        W = torch.randn(m, n, generator=g)
        out = []
        for f in fractions:
            r = _rank(m, n, f)
            A, B = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
            worst = float("inf")
            for t in tokens:
                x = torch.randn(t, n, generator=g)
                F.linear(F.linear(x, B), A), F.linear(x, W)                  # warm-up
                ratios = []
                for _ in range(repeats):                                    # alternated: the load drifts
                    t0 = time.perf_counter()
                    F.linear(x, W)
                    t1 = time.perf_counter()
                    F.linear(F.linear(x, B), A)
                    t2 = time.perf_counter()
                    ratios.append((t1 - t0) / max(t2 - t1, 1e-9))
                worst = min(worst, sorted(ratios)[len(ratios) // 2])
            out.append((r, worst))
        return out
    finally:
        torch.set_num_threads(old)


def speedups(shapes, threads: int = 1, progress: bool = False) -> dict[tuple[int, int], list]:
    """{(m, n): [(rank, speedup)]} for every distinct shape, from the cache or measured (then cached)."""
    path, key = cache_file(), machine_key(threads)
    try:
        cache = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    mine = cache.setdefault(key, {})
    todo = sorted({(int(m), int(n)) for m, n in shapes} - {tuple(map(int, k.split("x"))) for k in mine})
    if todo:
        from tqdm.auto import tqdm
        for m, n in tqdm(todo, desc="timing layer shapes", unit="shape", disable=not progress):
            mine[f"{m}x{n}"] = measure_shape(m, n, threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)                                     # atomic: a concurrent reader sees one version
    return {(m, n): [tuple(p) for p in mine[f"{m}x{n}"]] for m, n in {(int(a), int(b)) for a, b in shapes}}


def fastest_useful_rank(curve: list[tuple[int, float]], min_speedup: float = MIN_SPEEDUP) -> int:
    """The largest rank whose (interpolated) speedup is ≥ `min_speedup`, scanning up from the smallest rank and
    stopping at the first grid point below it; 0 when even the smallest is not faster.

    >>> fastest_useful_rank([(10, 3.0), (20, 1.5), (30, 0.9)])       # 1.05 crossed between 20 and 30
    27
    >>> fastest_useful_rank([(10, 0.9), (20, 2.0)])
    0
    """
    best = 0
    prev = None
    for r, s in sorted(curve):
        if s < min_speedup:
            if prev is not None:                                    # linear between the last good point and this
                r0, s0 = prev
                best = int(r0 + (s0 - min_speedup) / (s0 - s) * (r - r0))
            return best
        prev, best = (r, s), r
    return best


def max_ranks(shapes: dict[str, tuple[int, int]], threads: int = 1, progress: bool = False) -> dict[str, int]:
    """{module: the largest rank at which it is measurably faster than dense} (0: never; it stays dense)."""
    curves = speedups(shapes.values(), threads, progress)
    return {name: fastest_useful_rank(curves[tuple(s)]) for name, s in shapes.items()}
