"""layerzip.nn structures: forward = dense weight, round trips, parameter formulas, exact projections, shape
candidates, the registry, structurize."""
import json

import pytest
import torch
from torch import nn

import layerzip.nn as lnn
from layerzip.errors import LayerzipError
from layerzip.nn import layer_from_spec, register_layer
from layerzip.registry import LAYERS
from layerzip.training import structurize

D = torch.float64
# (class, shape args, formula(in, out) for the weight parameters) on divisible shapes 48 -> 64 (no padding)
CASES = [
    (lnn.BTTLinear, dict(rank=2, in_shape=(6, 8), out_shape=(8, 8)), lambda i, o: 2 * (48 * 8 + 64 * 6)),
    (lnn.MonarchLinear, dict(nblocks=4), lambda i, o: 4 * 4 * (12 + 16)),
    (lnn.KroneckerLinear, dict(n=4, terms=3), lambda i, o: 3 * (16 + 16 * 12)),
    (lnn.LowRankHadamardLinear, dict(rank=3), lambda i, o: 2 * 3 * (48 + 64)),
    (lnn.BlastLinear, dict(nblocks=4, rank=3), lambda i, o: 3 * (64 + 48 + 16)),
    (lnn.TTLinear, dict(rank=3, in_shape=(3, 4, 4), out_shape=(4, 4, 4)), lambda i, o: 4 * 3 * 3 + 3 * 16 * 3 + 3 * 16),
]
IDS = [c[0].__name__ for c in CASES]


@pytest.mark.parametrize("cls,kw,formula", CASES, ids=IDS)
def test_forward_matches_dense_weight_and_param_formula(cls, kw, formula):
    torch.manual_seed(0)
    layer = cls(48, 64, dtype=D, **kw)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(5, 3, 48, dtype=D)
    assert torch.allclose(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-12)
    n_weights = sum(p.numel() for p in layer.parameters()) - 64
    assert n_weights == formula(48, 64)
    assert n_weights == cls.num_params(48, 64, **kw)
    dense = layer.to_dense()
    assert torch.allclose(dense(x), layer(x), atol=1e-12)


@pytest.mark.parametrize("cls,kw,formula", CASES, ids=IDS)
def test_from_dense_of_to_dense_round_trip(cls, kw, formula):
    torch.manual_seed(1)
    layer = cls(48, 64, dtype=D, **kw)
    W = layer.dense_weight().detach()
    back = cls.from_dense(W, layer.bias.detach(), **kw)
    err = ((back.dense_weight() - W).norm() / W.norm()).item()
    if cls is lnn.LowRankHadamardLinear:   # non-convex, local optimizer: must beat the rank-R SVD it starts from
        S = torch.linalg.svdvals(W)
        assert err < 0.8 * (S[3:].norm() / S.norm()).item()
    else:                                  # exact (SVD-based) or ALS converged (BLAST)
        assert err < 1e-5, err
    assert torch.equal(back.bias, layer.bias)


@pytest.mark.parametrize("cls,kw,formula", CASES, ids=IDS)
def test_gradients_flow_and_unit_scale_init(cls, kw, formula):
    torch.manual_seed(2)
    layer = cls(48, 64, **kw)
    x = torch.randn(256, 48)
    y = layer(x)
    assert 0.4 < y.std().item() < 2.5         # unit-RMS init (a real Linear would give ~0.58)
    y.pow(2).mean().backward()
    for name, p in layer.named_parameters():
        if name != "bias":
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls,kw,formula", CASES, ids=IDS)
def test_spec_round_trip_and_registry(cls, kw, formula):
    layer = cls(48, 64, dtype=D, **kw)
    spec = json.loads(json.dumps(layer.spec()))
    empty = layer_from_spec(spec, dtype=D)
    assert type(empty) is cls and empty.spec() == layer.spec()
    empty.load_state_dict(layer.state_dict())
    assert torch.equal(empty.dense_weight(), layer.dense_weight())


def test_padded_shapes_work():
    """Non-divisible sizes are zero-padded; forward still equals the (cut) dense weight."""
    for layer in [lnn.MonarchLinear(30, 22, nblocks=4), lnn.BTTLinear(13, 10, rank=2),
                  lnn.KroneckerLinear(30, 22, n=4), lnn.BlastLinear(30, 22, nblocks=4, rank=2),
                  lnn.TTLinear(30, 22, rank=3)]:
        x = torch.randn(4, layer.in_features)
        assert layer(x).shape == (4, layer.out_features)
        assert torch.allclose(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-5)


def _blockwise_best(W, rows, cols, r):
    """Σ over (rows×cols) grid blocks of the squared tail singular values beyond rank r."""
    m, n = W.shape
    B = W.reshape(rows, m // rows, cols, n // cols).permute(0, 2, 1, 3)
    S = torch.linalg.svdvals(B)
    return S[..., r:].pow(2).sum().item()


def test_monarch_and_btt_projection_is_blockwise_optimal():
    torch.manual_seed(3)
    W = torch.randn(64, 48, dtype=D)
    mon = lnn.MonarchLinear.from_dense(W, nblocks=4)                      # 4×4 grid, rank-1 blocks
    assert abs((mon.dense_weight() - W).pow(2).sum().item() - _blockwise_best(W, 4, 4, 1)) < 1e-8
    btt = lnn.BTTLinear.from_dense(W, rank=3, in_shape=(6, 8), out_shape=(8, 8))  # 8×6 grid, rank-3 blocks
    assert abs((btt.dense_weight() - W).pow(2).sum().item() - _blockwise_best(W, 8, 6, 3)) < 1e-8
    # Eckart–Young per block: any other member of the structure is no better
    other = lnn.MonarchLinear(48, 64, nblocks=4, dtype=D)
    assert (other.dense_weight() - W).norm() > (mon.dense_weight() - W).norm()


def test_kronecker_projection_is_van_loan_optimal_and_tt_lossless():
    torch.manual_seed(4)
    W = torch.randn(64, 48, dtype=D)
    k = lnn.KroneckerLinear.from_dense(W, n=4, terms=5)
    R = W.reshape(4, 16, 4, 12).permute(0, 2, 1, 3).reshape(16, 16 * 12)
    S = torch.linalg.svdvals(R)
    assert abs((k.dense_weight() - W).pow(2).sum().item() - S[5:].pow(2).sum().item()) < 1e-8
    full = lnn.KroneckerLinear.from_dense(W, n=4, terms=16)               # t = n² terms: lossless
    assert torch.allclose(full.dense_weight(), W, atol=1e-10)
    tt = lnn.TTLinear.from_dense(W, rank=10 ** 4, in_shape=(3, 4, 4), out_shape=(4, 4, 4))
    assert torch.allclose(tt.dense_weight(), W, atol=1e-10)


def test_blast_and_hadamard_optimizers_beat_their_starts():
    torch.manual_seed(5)
    W = torch.randn(64, 48, dtype=D)
    b0 = lnn.BlastLinear.from_dense(W, nblocks=4, rank=4, als_steps=0)
    b1 = lnn.BlastLinear.from_dense(W, nblocks=4, rank=4, als_steps=10)
    assert (b1.dense_weight() - W).norm() < (b0.dense_weight() - W).norm()
    one = lnn.BlastLinear.from_dense(W, nblocks=1, rank=5)                # b = 1: the truncated SVD, no ALS
    S = torch.linalg.svdvals(W)
    assert abs((one.dense_weight() - W).pow(2).sum().item() - S[5:].pow(2).sum().item()) < 1e-8
    h = lnn.LowRankHadamardLinear.from_dense(W, rank=3)
    S = torch.linalg.svdvals(W)
    assert (h.dense_weight() - W).norm() < S[3:].norm()                  # beats its rank-R SVD start


def test_lowrank_num_params_and_full_rank_from_dense_is_exact():
    torch.manual_seed(10)
    W, b = torch.randn(64, 48, dtype=D), torch.randn(64, dtype=D)
    full = lnn.LowRankLinear.from_dense(W, b)
    assert full.rank == 48 and full.A.dtype == D
    assert torch.allclose(full.dense_weight(), W, atol=1e-12) and torch.equal(full.bias, b)
    low = lnn.LowRankLinear.from_dense(W.float(), rank=3)
    assert low.A.dtype == torch.float32 and low.bias is None
    assert low.num_parameters() == lnn.LowRankLinear.num_params(48, 64, rank=3) == 3 * (48 + 64)
    lin = nn.Linear(48, 64)
    assert torch.allclose(lnn.LowRankLinear.from_linear(lin).to_dense().weight, lin.weight, atol=1e-5)


ALL = [lnn.LowRankLinear] + [c[0] for c in CASES]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_candidates_construct_and_num_params_counts_them(cls):
    n, m = 24, 40
    shapes = list(cls.candidates(n, m, budget=0.5 * n * m))
    assert shapes
    for shape in shapes:
        layer = cls(n, m, bias=False, device="meta", **shape)
        assert sum(p.numel() for p in layer.parameters()) == cls.num_params(n, m, **shape), shape


def test_register_layer_refuses_a_second_class_under_a_taken_name():
    class Other(lnn.LowRankLinear):
        pass
    with pytest.raises(ValueError, match="registered twice"):
        register_layer("lowrank")(Other)
    assert LAYERS["lowrank"] is lnn.LowRankLinear and register_layer("lowrank")(lnn.LowRankLinear)
    with pytest.raises(LayerzipError, match="upgrade"):
        layer_from_spec({"type": "nope", "in": 4, "out": 4, "bias": False})


def test_choose_shape_respects_keep():
    torch.manual_seed(6)
    W = torch.randn(96, 128, dtype=D)
    for name in lnn.STRUCTURES:
        cls = LAYERS[name]
        for keep in (0.2, 0.5):
            shape = lnn.choose_shape(name, 128, 96, keep)
            assert shape == lnn.choose_shape(cls, 128, 96, keep)                 # by name or by class
            layer = cls.from_dense(W, torch.zeros(96, dtype=D), **shape)
            n = sum(p.numel() for p in layer.parameters()) - 96
            assert n <= keep * W.numel(), (name, keep, n)
            assert n >= 0.5 * keep * W.numel(), (name, keep, n)
            assert (layer.dense_weight() - W).norm() < W.norm()             # a projection, not noise
    with pytest.raises(LayerzipError):
        lnn.choose_shape("nope", 128, 96, 0.5)
    with pytest.raises(ValueError, match="no shape fits"):
        lnn.choose_shape("hadamard", 128, 96, 1e-4)


def test_structurize_validates():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError):
        structurize(model, "btt", rank=0)
    with pytest.raises(ValueError):
        structurize(model, lnn.MonarchLinear, keep=1.5)
    with pytest.raises(ValueError):
        structurize(model, "tt", keep=0.5, rank=2)
    with pytest.raises(ValueError):
        structurize(model, "tt", in_shape=(2, 0, 4))
    assert isinstance(model[0], nn.Linear)


def test_structurize_mlp_include_exclude_and_fresh_init():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(8, 64)
    ref = model(x)
    structurize(model, "tt", rank=10 ** 4, exclude=[r"^4$"])          # lossless rank: same outputs
    assert isinstance(model[0], lnn.TTLinear) and isinstance(model[4], nn.Linear)
    assert torch.allclose(model(x), ref, atol=1e-4)
    fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    structurize(fresh, lnn.MonarchLinear, nblocks=8, include=[r"^0$"], from_dense=False)
    assert isinstance(fresh[0], lnn.MonarchLinear) and isinstance(fresh[2], nn.Linear)


@pytest.mark.parametrize("name", lnn.STRUCTURES)
def test_structurize_transformers_bert_stays_runnable(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(8)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 7))
    dense_params = sum(p.numel() for p in model.parameters())
    structurize(model, name, keep=0.3, include=[r"encoder\."])
    n_struct = sum(isinstance(m, lnn.StructuredLinear) or type(m).__name__ == "LowRankLinear"
                   for m in model.modules())
    assert n_struct == 2 * 6                                                # q, k, v, o, up, down per layer
    out = model(input_ids=ids).last_hidden_state
    assert out.shape == (2, 7, 32) and torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters()) < dense_params
    out.sum().backward()


def test_structurize_gpt2_conv1d():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(9)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (1, 6))
    ref = model(input_ids=ids).logits
    structurize(model, "kronecker", n=4, terms=16, include=[r"\.h\."])   # n² terms: lossless
    assert isinstance(model.transformer.h[0].attn.c_attn, lnn.KroneckerLinear)
    assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-4)
