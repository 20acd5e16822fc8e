"""FWSVD: Fisher row weights from real gradients; uniform weights give plain SVD; heavy rows are kept better."""
import torch

from layerzip import FWSVD, compress_
from layerzip.methods.fwsvd import fwsvd_factors
from layerzip.methods.svd import svd_factors
from layerzip.stats import FisherStats, collect_fisher
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


# ---- output Fisher (svd-llm --fisher): D W L whitened SVD, losses in one unit across modules -----------------
def test_output_fisher_matches_autograd():
    from layerzip.stats import collect_output_fisher
    model = tiny_model("llama")
    targets = select_targets(model)
    batch = _batches()[0]
    got = collect_output_fisher(model, targets, [batch], True, progress=False, micro_batch=8)
    outs = {}
    def keep(name):
        def hook(mod, args, out):
            out.retain_grad()
            outs[name] = out
        return hook
    hs = [m.register_forward_hook(keep(n)) for n, m in targets.items()]
    for p in model.parameters():
        p.requires_grad_(True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for h in hs:
        h.remove()
    for n in targets:
        ref = outs[n].grad.double().reshape(-1, outs[n].shape[-1]).square().sum(0)
        assert torch.allclose(got[n], ref, rtol=1e-4, atol=1e-12), n
    assert all((got[n] > 0).any() for n in targets)


# ---- an encoder's sensitivity loss: contrastive, two views per document --------------------------------------
def test_document_views_split_each_document_in_two():
    from layerzip.stats.fisher import document_views
    ids = torch.arange(20).reshape(2, 10)
    mask = torch.tensor([[1] * 10, [0, 0] + [1] * 6 + [0, 0]])    # the second one padded on both sides
    views = document_views({"input_ids": ids, "attention_mask": mask})
    assert len(views) == 2
    assert len(document_views({"input_ids": ids, "attention_mask": mask * torch.tensor([[1], [0]])})) == 1
    assert views[0]["input_ids"].shape == (2, 10) and views[1]["input_ids"].shape == (2, 8)   # cut after the last
    for v, m, row in zip(views, mask, ids):
        m, row = m[:v["input_ids"].shape[1]], row[:v["input_ids"].shape[1]]
        a, b = v["attention_mask"]
        assert (v["input_ids"] == row).all()
        first, last = m.nonzero().flatten()[[0, -1]]
        assert a[first] == b[first] == a[last] == b[last] == 1          # the special tokens in both
        inner = m.clone()
        inner[torch.stack([first, last])] = 0
        assert (a * b * inner == 0).all() and ((a | b) * inner == inner).all()   # the rest split, nothing shared
        assert abs(int((a * inner).sum()) - int((b * inner).sum())) <= 1
        assert (a * (1 - m) == 0).all() and (b * (1 - m) == 0).all()             # never the padding
        assert (a * inner).nonzero().max() < (b * inner).nonzero().min()        # the first half, then the second


def test_contrastive_loss_is_infonce_both_ways():
    from layerzip.stats.fisher import CONTRAST_TEMPERATURE, contrastive_loss
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(5, 2, 8, generator=g), dim=-1)
    views = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1)
    keys = bank.clone()
    keys[3] = views
    want = 0.0
    for a in (0, 1):
        logits = views[a] @ keys[:, 1 - a].T / CONTRAST_TEMPERATURE
        want += float(torch.logsumexp(logits, 0) - logits[3])
    assert abs(float(contrastive_loss(views, bank, 3)) - want) < 1e-5
    assert float(contrastive_loss(bank[3], bank, 3)) < float(contrastive_loss(bank[2], bank, 3))   # its own views


def test_encoder_fisher_does_not_depend_on_batching():
    """One sample per document, the negatives from the dense model: the same Fisher however documents are batched;
    and a sample's loss is finite and depends on every target."""
    from layerzip.stats import collect_output_fisher
    model = tiny_model("bert")
    targets = select_targets(model)
    batch = _batches()[0]
    whole = collect_output_fisher(model, targets, [batch], False, progress=False, encoder_loss="contrastive")
    split = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    parts = collect_output_fisher(model, targets, split, False, progress=False, encoder_loss="contrastive")
    other = collect_output_fisher(model, targets, [batch], False, progress=False)     # the embedding's Fisher
    for n in targets:
        assert torch.allclose(whole[n], parts[n], rtol=1e-6, atol=1e-14), n
        assert (whole[n] > 0).any(), n
    assert any(not torch.allclose(whole[n] / whole[n].sum(), other[n] / other[n].sum(), rtol=0.1) for n in targets)


def _layer(seed: int):
    """(generator, W 24×16, inputs X of unequal scales, their ModuleStats) in float64."""
    from layerzip.stats import ModuleStats
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(24, 16, generator=g, dtype=torch.float64)
    X = torch.randn(200, 16, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 16, dtype=torch.float64)
    st = ModuleStats(16)
    st.add(X)
    return g, W, X, st


def test_weighted_whitened_svd_is_exact_and_optimal():
    from layerzip.methods.svdllm import svdllm_factors, whitened_singular_values
    g, W, X, st = _layer(3)
    d = torch.rand(24, generator=g, dtype=torch.float64) * 5 + 0.05
    loss = lambda A, B: (d[:, None] * ((W - A @ B) @ X.T)).square().sum().item()
    r = 6
    A, B = svdllm_factors(W, st, r, rows=d)
    s = whitened_singular_values(W, st.whitening, rows=d)
    assert abs(loss(A, B) - s[r:].square().sum().item()) <= 1e-8 * s.square().sum().item()
    A0, B0 = svdllm_factors(W, st, r)                        # unweighted SVD-LLM: worse in the weighted loss
    assert loss(A, B) < loss(A0, B0)
    A, B = svdllm_factors(W, st, 16, rows=d)                 # full rank: exact
    assert torch.allclose(A @ B, W, atol=1e-9)
    A, B = svdllm_factors(W, st, r, rows=torch.full((24,), 7.0, dtype=torch.float64))
    assert torch.allclose(A @ B, A0 @ B0, atol=1e-9)         # uniform weights: plain SVD-LLM


def test_svdllm_fisher_compress_global_and_sequential():
    from layerzip import SVDLLM
    for opts in (dict(alloc="global"), dict(alloc="global", sequential=True, correct=True)):
        model = tiny_model("llama")
        rep = compress_(model, SVDLLM(keep=0.6, fisher=True, **opts), calib=_batches(), progress=False)
        assert 0.59 <= rep["keep_achieved"] <= 0.6
        assert torch.isfinite(model(**_batches()[0]).logits).all()


# ---- two-sided (--kfac): the output gradients' covariance, shrunk toward its diagonal ------------------------
def test_output_covariance_matches_autograd_and_its_diagonal():
    from layerzip.stats import collect_output_fisher
    model = tiny_model("llama")
    targets = select_targets(model)
    batch = _batches()[0]
    diag = collect_output_fisher(model, targets, [batch], True, progress=False)
    full = collect_output_fisher(model, targets, [batch], True, progress=False, full=True)
    for n in targets:
        assert full[n].shape == (len(diag[n]),) * 2
        assert torch.allclose(torch.diagonal(full[n]), diag[n], rtol=1e-6, atol=1e-15), n
        assert torch.allclose(full[n], full[n].T)


def test_shrinkage_keeps_strong_correlations_and_drops_noise():
    from layerzip.stats.fisher import OutputCovariance
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 1, generator=g, dtype=torch.float64)
    correlated = OutputCovariance(6)
    correlated.add(z + 0.1 * torch.randn(4000, 6, generator=g, dtype=torch.float64))   # one shared factor
    S = correlated.shrunk()
    assert torch.allclose(S, correlated.S, rtol=0.05)          # the evidence is overwhelming: almost no shrinkage
    independent = OutputCovariance(6)
    independent.add(torch.randn(20, 6, generator=g, dtype=torch.float64))               # few tokens, no relation
    S = independent.shrunk()
    off = ~torch.eye(6, dtype=torch.bool)
    assert S[off].abs().sum() < 0.5 * independent.S[off].abs().sum()
    assert torch.equal(torch.diagonal(S), torch.diagonal(independent.S))


def test_kfac_whitened_svd_is_exact_and_optimal():
    from layerzip.stats import whiten
    from layerzip.methods.svdllm import svdllm_factors, whitened_singular_values
    g, W, X, st = _layer(4)
    Gy = torch.randn(300, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    F = Gy.T @ Gy
    R = whiten(F)
    loss = lambda A, B: torch.trace((W - A @ B) @ X.T @ X @ (W - A @ B).T @ F).item()
    r = 6
    A, B = svdllm_factors(W, st, r, rows=R)
    s = whitened_singular_values(W, st.whitening, rows=R)
    assert abs(loss(A, B) - s[r:].square().sum().item()) <= 1e-8 * s.square().sum().item()
    Ad, Bd = svdllm_factors(W, st, r, rows=torch.diagonal(F).sqrt())      # the diagonal Fisher only: worse here
    assert loss(A, B) < loss(Ad, Bd)
    for _ in range(5):                                                      # and below nearby rank-r products
        dA, dB = torch.randn(A.shape, generator=g, dtype=torch.float64), torch.randn(B.shape, generator=g, dtype=torch.float64)
        assert loss(A, B) < loss(A + 0.01 * dA, B + 0.01 * dB)
    A, B = svdllm_factors(W, st, 16, rows=R)                               # full rank: exact
    assert torch.allclose(A @ B, W, atol=1e-9)


def test_kfac_compress_and_refusal():
    import pytest
    from layerzip import SVDLLM, LayerzipError
    model = tiny_model("llama")
    rep = compress_(model, SVDLLM(keep=0.6, kfac=True), calib=_batches(), progress=False)
    assert 0.59 <= rep["keep_achieved"] <= 0.6
    assert torch.isfinite(model(**_batches()[0]).logits).all()
    with pytest.raises(LayerzipError, match="drop --no-fisher"):
        SVDLLM(keep=0.6, kfac=True, fisher=False)
    with pytest.raises(LayerzipError, match="drop one"):
        SVDLLM(keep=0.6, kfac=True, correct=True, sequential=True)


def test_kfac_refuses_covariances_that_do_not_fit(monkeypatch):
    import collections
    import psutil
    import pytest
    from layerzip import SVDLLM, LayerzipError
    model = tiny_model("llama")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: collections.namedtuple("vm", "available")(10_000))
    with pytest.raises(LayerzipError, match="drop --kfac"):
        compress_(model, SVDLLM(keep=0.6, kfac=True), calib=_batches(), progress=False)
