"""FWSVD: Fisher row weights from real gradients; uniform weights give plain SVD; heavy rows are kept better."""
import torch

from layerzip.compress import FWSVD, compress_
from layerzip.methods import fwsvd_factors, svd_factors
from layerzip.methods.fwsvd import FisherStats, collect_fisher
from layerzip.models import select_targets

from conftest import tiny_model


def W_(seed=0, m=30, n=20):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_uniform_fisher_is_plain_svd():
    W = W_()
    A, B = fwsvd_factors(W, FisherStats(torch.full((30,), 3.0)), 5)
    A0, B0 = svd_factors(W, None, 5)
    assert torch.allclose(A @ B, A0 @ B0, atol=1e-9)


def test_heavy_rows_are_reconstructed_better():
    W = W_(1)
    f = torch.ones(30)
    f[:5] = 1e4
    A, B = fwsvd_factors(W, FisherStats(f), 5)
    A0, B0 = svd_factors(W, None, 5)
    err = lambda M: (W - M)[:5].norm().item()
    assert err(A @ B) < 0.5 * err(A0 @ B0)


def test_full_rank_exact():
    W = W_(2)
    A, B = fwsvd_factors(W, FisherStats(torch.rand(30) + 0.1), 20)
    assert torch.allclose(A @ B, W, atol=1e-9)


def _batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (3, 16), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def test_collect_fisher_causal_and_encoder():
    for arch, causal in (("gpt2", True), ("bert", False)):
        model = tiny_model(arch)
        targets = select_targets(model)
        fisher = collect_fisher(model, targets, _batches(), causal, progress=False)
        for n, f in fisher.items():
            m = targets[n]
            out = m.weight.shape[1] if arch == "gpt2" else m.weight.shape[0]   # GPT-2 Conv1D stores (in, out)
            assert f.shape == (out,) and (f >= 0).all() and f.sum() > 0
        assert not any(p.requires_grad and p.grad is not None for p in model.parameters())


def test_fwsvd_compress_llama():
    model = tiny_model("llama")
    rep = compress_(model, FWSVD(keep=0.5, alloc="global"), calib=_batches(), progress=False)
    assert 0.49 <= rep["keep_achieved"] <= 0.5
    assert torch.isfinite(model(**_batches()[0]).logits).all()
