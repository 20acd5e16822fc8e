"""Rank during training: Cuttlefish switches to low rank once stable ranks settle; Maestro shrinks ranks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerzip.nn as lnn
from layerzip.training import Cuttlefish, Maestro, OrderedLowRankLinear, stable_rank


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core box spin-wait badly with 2 threads (20 s vs 1.5 s); restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n=512, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    teacher = torch.randn(d, 4, generator=g) @ torch.randn(4, 10, generator=g)   # a rank-4 target
    return x, (x @ teacher).argmax(1)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _train(model, cb, opt, steps, x, y):
    losses = []
    for step in range(steps):
        idx = torch.arange(step * 64, step * 64 + 64) % len(x)
        cb.on_step_begin()
        loss = F.cross_entropy(model(x[idx]), y[idx]) + cb.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        cb.on_step_end(step)
        losses.append(loss.item())
    return losses


def test_stable_rank_bounds():
    assert abs(stable_rank(torch.ones(5, 7)) - 1) < 1e-9
    assert abs(stable_rank(torch.eye(6)) - 6) < 1e-9


def test_cuttlefish_switches_to_low_rank_and_training_continues():
    x, y = _data()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    cb = Cuttlefish(model, opt, check_every=10, tol=0.2, exclude=[r"^4$"])
    losses = _train(model, cb, opt, 80, x, y)
    assert cb.switch_step is not None and len(cb.history) >= 2
    assert isinstance(model[2], lnn.LowRankLinear) and 1 <= cb.ranks["2"] < 32   # saves parameters
    assert isinstance(model[4], nn.Linear)                                      # excluded head untouched
    # the optimizer now trains the factors: they move after the switch
    A0 = model[2].A.detach().clone()
    _train(model, cb, opt, 5, x, y)
    assert not torch.equal(A0, model[2].A) and all(torch.isfinite(torch.tensor(losses)))
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_maestro_ordered_dropout_and_progressive_shrinking():
    x, y = _data()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    cb = Maestro(model, opt, lasso=3e-3, shrink_every=20, tol=0.1, exclude=[r"^4$"])
    assert isinstance(model[0], OrderedLowRankLinear) and cb.ranks == {"0": 32, "2": 64}
    ref_x = x[:8]
    model.eval()
    assert model(ref_x).shape == (8, 10)                                       # full-rank SVD: same function
    model.train()
    cb.on_step_begin()
    assert sum(model.get_submodule(n).active is not None for n in cb.names) == 1   # one layer truncated
    losses = _train(model, cb, opt, 100, x, y)
    assert cb.ranks["0"] < 32 and cb.ranks["2"] < 64                          # ranks shrank
    assert cb.history[-1]["2"] == cb.ranks["2"] and len(cb.history) == 6
    assert losses[-1] < losses[0]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
