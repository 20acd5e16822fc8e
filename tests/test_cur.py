"""CUR (CURing): exact at full rank, real rows/columns of W, improves with rank, works through compress_."""
import pytest
import torch

from layerzip.stats import ModuleStats
from layerzip import CUR, compress_
from layerzip.methods.cur import cur_factors, deim

from conftest import tiny_model


def stats_for(n, seed=0, T=300):
    g = torch.Generator().manual_seed(seed)
    st = ModuleStats(n)
    st.add(torch.randn(T, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64))
    return st


@pytest.mark.parametrize("shape", [(20, 30), (30, 20), (16, 16)])
def test_full_rank_reconstructs_exactly(shape):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    for st in (None, stats_for(shape[1])):
        A, B = cur_factors(W, st, min(shape))
        assert torch.allclose(A @ B, W, atol=1e-9)


def test_rows_are_real_rows_and_error_falls_with_rank():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 50, generator=g, dtype=torch.float64)
    W += 0.05 * torch.randn(40, 50, generator=g, dtype=torch.float64)
    errs = []
    for r in (2, 6, 12):
        A, B = cur_factors(W, stats_for(50), r)
        assert all(any(torch.equal(b, w) for w in W) for b in B)    # B = R holds actual rows of W
        errs.append(torch.linalg.norm(W - A @ B).item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.2 * torch.linalg.norm(W).item()


def test_deim_picks_distinct_well_conditioned_rows():
    Q, _ = torch.linalg.qr(torch.randn(50, 8, dtype=torch.float64))
    idx = deim(Q)
    assert len(set(idx.tolist())) == 8
    assert torch.linalg.matrix_rank(Q[idx]) == 8


def test_cur_compress_tiny_model_budget_and_energy():
    batches = [{"input_ids": torch.randint(0, 1000, (2, 24)), "attention_mask": torch.ones(2, 24, dtype=torch.long)}]
    model = tiny_model("opt")
    rep = compress_(model, CUR(keep=0.5), calib=batches, progress=False)
    assert rep["keep_achieved"] <= 0.5 and torch.isfinite(model(**batches[0]).logits).all()
    rep = compress_(tiny_model("opt"), CUR(keep=0.5, energy=0.5), calib=batches, progress=False)
    assert 0 < rep["keep_achieved"] < 1
