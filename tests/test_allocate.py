"""Global rank allocation: meets the budget, never worse than dense, never worse than uniform in its objective."""
import pytest
import torch

from layerzip.allocate import factorized_params, global_ranks, max_useful_rank, uniform_ranks

SHAPES = {"q": (64, 64), "k": (32, 64), "up": (128, 64), "down": (64, 128), "tiny": (8, 8), "wide": (16, 200)}


def spectra(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (k, (m, n)) in enumerate(SHAPES.items()):
        decay = 0.02 + 0.1 * i * torch.rand((), generator=g).item()
        out[k] = torch.exp(-decay * torch.arange(min(m, n), dtype=torch.float64)) * (1 + i)
    return out


def objective(ranks, sp):
    tot = 0.0
    for k, r in ranks.items():
        s2 = sp[k].square()
        tot += 0.0 if r is None else (s2[r:].sum() / s2.sum()).item()
    return tot


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.6, 0.8, 0.95])
@pytest.mark.parametrize("seed", [0, 1])
def test_global_meets_budget_and_beats_uniform(keep, seed):
    sp = spectra(seed)
    dense = sum(m * n for m, n in SHAPES.values())
    ranks = global_ranks(SHAPES, sp, keep)
    used = factorized_params(SHAPES, ranks)
    assert used <= keep * dense
    assert used >= (keep - 0.01) * dense                      # within 1% of the budget
    for k, r in ranks.items():                                # never a rank where low rank stores more than dense
        assert r is None or 1 <= r <= max_useful_rank(*SHAPES[k])
    uni = uniform_ranks(SHAPES, keep)
    if factorized_params(SHAPES, uni) <= keep * dense:
        assert objective(ranks, sp) <= objective(uni, sp) + 1e-12


def test_flat_spectrum_module_gets_more_rank():
    shapes = {"a": (64, 64), "b": (64, 64)}
    sp = {"a": torch.ones(64, dtype=torch.float64), "b": torch.exp(-0.5 * torch.arange(64.0)).double()}
    r = global_ranks(shapes, sp, 0.4)
    assert r["a"] > r["b"]


def test_dense_when_budget_allows():
    shapes = {"a": (32, 32), "b": (32, 32)}
    sp = {"a": torch.ones(32, dtype=torch.float64), "b": torch.exp(-torch.arange(32.0)).double()}
    r = global_ranks(shapes, sp, 0.75)
    assert r["a"] is None                                     # a flat spectrum is best left dense
    assert factorized_params(shapes, r) <= 0.75 * 2 * 32 * 32


def test_weights_shift_rank():
    shapes = {"a": (64, 64), "b": (64, 64)}
    s = torch.exp(-0.05 * torch.arange(64.0)).double()
    base = global_ranks(shapes, {"a": s, "b": s}, 0.4)
    heavy = global_ranks(shapes, {"a": s, "b": s}, 0.4, weights={"a": 10.0})
    assert heavy["a"] > base["a"] and heavy["b"] < base["b"]


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e6])
def test_global_unnormalized_meets_budget_and_minimizes_absolute_loss(scale):
    sp = {k: v * scale for k, v in spectra(3).items()}
    dense = sum(m * n for m, n in SHAPES.values())
    ranks = global_ranks(SHAPES, sp, 0.5, normalize=False)
    assert (0.49 * dense) <= factorized_params(SHAPES, ranks) <= 0.5 * dense
    absolute = lambda rk: sum(0.0 if r is None else sp[k][r:].square().sum().item() for k, r in rk.items())
    uni = uniform_ranks(SHAPES, 0.5)
    assert absolute(ranks) <= absolute(uni) * (1 + 1e-9)
