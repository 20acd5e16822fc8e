"""Closed-form correction: A = W C Bᵀ (B G' Bᵀ)⁻¹ never increases the calibration loss and is the least-squares fit."""
import copy

import pytest
import torch

from layerzip.stats import ModuleStats
from layerzip import SVD, SVDLLM, compress_
from layerzip.methods.correct import calibration_loss, refit_left
from layerzip.stats import PairedStats
from layerzip.methods.svd import svd_factors
from layerzip.methods.svdllm import svdllm_factors

from conftest import tiny_model


def paired(X, Xc):
    st = PairedStats(X.shape[1])
    st.add_pair(X, Xc)
    return st


def data(seed=0, m=24, n=32, T=400, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(T, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    Xc = X + noise * torch.randn(T, n, generator=g, dtype=torch.float64)   # the compressed model's inputs
    return W, X, Xc


def test_loss_from_grams_matches_direct():
    W, X, Xc = data()
    A, B = svd_factors(W, None, 5)
    direct = ((A @ B @ Xc.T - W @ X.T) ** 2).sum().item()
    assert calibration_loss(A, B, W, paired(X, Xc)) == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("rank", [1, 4, 12])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refit_never_increases_loss_and_is_least_squares(rank, seed):
    W, X, Xc = data(seed)
    st = paired(X, Xc)
    for A, B in (svd_factors(W, None, rank), svdllm_factors(W, st, rank)):
        before = calibration_loss(A, B, W, st)
        A2 = refit_left(W, A, B, st)
        after = calibration_loss(A2, B, W, st)
        assert after <= before * (1 + 1e-12)
        # least squares on the raw data: min_A ‖(Xc Bᵀ) Aᵀ − X Wᵀ‖
        ref = torch.linalg.lstsq(Xc @ B.T, X @ W.T).solution.T
        assert torch.allclose(A2, ref, rtol=1e-6, atol=1e-8)


def test_refit_is_noop_for_svdllm_on_its_own_inputs():
    W, X, _ = data()
    st = ModuleStats(X.shape[1])
    st.add(X)
    A, B = svdllm_factors(W, st, 6)
    assert torch.allclose(refit_left(W, A, B, st), A, rtol=1e-6, atol=1e-8)


def _mse(model, ref, batches):
    with torch.no_grad():
        return sum(((model(**b).logits - ref(**b).logits) ** 2).mean().item() for b in batches)


def test_correct_helps_plain_svd_on_a_model():
    torch.manual_seed(0)
    model = tiny_model("llama")
    batches = [{"input_ids": torch.randint(0, 1000, (4, 32)), "attention_mask": torch.ones(4, 32, dtype=torch.long)}]
    plain, fixed = copy.deepcopy(model), copy.deepcopy(model)
    compress_(plain, SVD(keep=0.5), calib=batches, progress=False)
    compress_(fixed, SVD(keep=0.5, correct=True), calib=batches, progress=False)    # --correct collects Grams
    assert _mse(fixed, model, batches) < _mse(plain, model, batches)


def test_svdllm_sequential_correct_runs_and_keeps_budget():
    model = tiny_model("gpt2")
    batches = [{"input_ids": torch.randint(0, 1000, (4, 32)), "attention_mask": torch.ones(4, 32, dtype=torch.long)}]
    rep = compress_(model, SVDLLM(keep=0.5, sequential=True, correct=True), calib=batches, progress=False)
    assert rep["keep_achieved"] <= 0.5 + 1e-9
    assert torch.isfinite(model(**batches[0]).logits).all()


@pytest.mark.parametrize("rank", [2, 8])
def test_target_aware_beats_refit_and_matches_svdllm_without_shift(rank):
    from layerzip.methods.correct import target_aware_factors
    W, X, Xc = data(3)
    st = paired(X, Xc)
    A, B = target_aware_factors(W, st, rank)
    A1, B1 = svdllm_factors(W, st, rank)
    assert calibration_loss(A, B, W, st) <= calibration_loss(refit_left(W, A1, B1, st), B1, W, st) * (1 + 1e-9)
    same = paired(X, X)
    A2, B2 = target_aware_factors(W, same, rank)
    A3, B3 = svdllm_factors(W, same, rank)
    assert torch.allclose(A2 @ B2, A3 @ B3, atol=1e-8)
