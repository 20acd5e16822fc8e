"""The math of each method: exact at full rank, optimal where theory says so, robust to bad Grams."""
import pytest
import torch

from layerzip.calibrate import ModuleStats
from layerzip.methods import asvd_factors, svd_factors, svdllm_factors, whiten
from layerzip.methods.svdllm import whitened_singular_values

METHODS = {"svd": svd_factors, "asvd": asvd_factors, "svd-llm": svdllm_factors}


def make_stats(X: torch.Tensor) -> ModuleStats:
    st = ModuleStats(X.shape[1])
    st.add(X)
    return st


def layer_loss(W, W2, st):
    """‖(W − W')Xᵀ‖²_F = tr(D G Dᵀ) with D = W − W'."""
    D = W - W2
    return torch.einsum("ij,jk,ik->", D, st.gram, D).item()


def correlated_inputs(tokens, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix + 0.1


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_full_rank_is_exact(name, shape):
    torch.manual_seed(0)
    W = torch.randn(*shape, dtype=torch.float64)
    st = make_stats(correlated_inputs(200, shape[1]))
    A, B = METHODS[name](W, st, min(shape))
    assert A.shape == (shape[0], min(shape)) and B.shape == (min(shape), shape[1])
    torch.testing.assert_close(A @ B, W, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rank", [1, 5, 17, 31])
def test_svdllm_loss_is_sum_of_discarded_whitened_singular_values(rank):
    torch.manual_seed(1)
    W = torch.randn(48, 32, dtype=torch.float64)
    st = make_stats(correlated_inputs(500, 32))
    A, B = svdllm_factors(W, st, rank)
    s = whitened_singular_values(W, st.whitening)
    expected = (s[rank:] ** 2).sum().item()
    assert abs(layer_loss(W, A @ B, st) - expected) / expected < 1e-6


def test_svdllm_beats_svd_and_asvd_on_real_activations():
    """Real MiniLM activations on real text: whitening gives the smallest layer loss in every module."""
    import layerzip as lz
    from layerzip.calibrate import collect_stats
    from layerzip.nn import dense_weight_and_bias
    from layerzip.models import linear_shape, select_targets

    loaded = lz.load_model("minilm")
    batches = lz.calibration_batches(loaded, "builtin", n_samples=32, seq_len=128)
    targets = dict(list(select_targets(loaded.model).items())[:6])     # block 0: q, k, v, o, up, down
    stats = collect_stats(loaded.model, targets, {n: linear_shape(m)[1] for n, m in targets.items()}, batches,
                          progress=False)
    for name, mod in targets.items():
        W = dense_weight_and_bias(mod)[0].detach().double()
        rank = min(W.shape) // 4
        losses = {k: layer_loss(W, (lambda f: f[0] @ f[1])(fn(W, stats[name], rank)), stats[name])
                  for k, fn in METHODS.items()}
        assert losses["svd-llm"] < losses["asvd"] and losses["svd-llm"] < losses["svd"], (name, losses)


def test_shared_inputs_share_statistics():
    """q, k and v read the same tensor: one Gram, one whitening."""
    import layerzip as lz
    from layerzip.calibrate import collect_stats
    from layerzip.models import linear_shape, select_targets

    loaded = lz.load_model("minilm")
    batches = lz.calibration_batches(loaded, "builtin", n_samples=4, seq_len=32)
    targets = select_targets(loaded.model)
    stats = collect_stats(loaded.model, targets, {n: linear_shape(m)[1] for n, m in targets.items()}, batches,
                          progress=False)
    q, k, v = (stats[f"encoder.layer.0.attention.self.{x}"] for x in ("query", "key", "value"))
    assert q is k is v
    assert stats["encoder.layer.0.attention.output.dense"] is not q
    assert len({id(s) for s in stats.values()}) == 4 * 6


@pytest.mark.parametrize("case", ["dead_features", "few_tokens", "indefinite", "zero"])
def test_whitening_never_crashes(case):
    """Singular / indefinite Grams (SVD-LLM issues #6, #7, #52) still give finite, good factors."""
    torch.manual_seed(2)
    n = 32
    W = torch.randn(16, n, dtype=torch.float64)
    if case == "dead_features":
        X = correlated_inputs(300, n)
        X[:, :5] = 0
        st = make_stats(X)
    elif case == "few_tokens":
        st = make_stats(correlated_inputs(8, n))
    elif case == "indefinite":
        st = make_stats(correlated_inputs(300, n))
        lam, Q = torch.linalg.eigh(st.gram)
        lam[:3] = -1e-3 * lam.max()
        st.gram = (Q * lam) @ Q.T
    else:
        st = make_stats(torch.zeros(10, n, dtype=torch.float64))
    wt = st.whitening
    A, B = svdllm_factors(W, st, 8)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    if case != "zero":
        # never worse on the data than plain truncation
        A0, B0 = svd_factors(W, None, 8)
        assert layer_loss(W, A @ B, st) <= layer_loss(W, A0 @ B0, st) * (1 + 1e-6) + 1e-9
    if case == "indefinite":
        assert wt.jitter > 0 or not wt.triangular


def test_whiten_eigen_fallback_matches_gram():
    """The eigen square root L = QΛ^½ satisfies L Lᵀ = G, and right_solve inverts it."""
    from layerzip.methods.svdllm import Whitening
    G = make_stats(correlated_inputs(200, 12)).gram
    lam, Q = torch.linalg.eigh(G)
    wt = Whitening(Q * lam.sqrt(), False, 0.0, (Q, lam.sqrt()))
    torch.testing.assert_close(wt.L @ wt.L.T, G)
    M = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(wt.right_solve(M) @ wt.L, M)
    assert whiten(G).triangular
