"""Factorized convolutions (nn/conv.py) and the conv methods (methods/conv.py): exact at full rank for every
geometry, parameter and FLOP formulas against what runs, optimality where theory gives it, memory-safe CP-ALS,
compress_ on a plain CNN and on a tiny transformers ResNet, save / load round trips (lz.load and native)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import layerzip as lz
from layerzip.errors import LayerzipError
from layerzip.methods.conv import conv_svd_factors, refit_left, spatial_factors, tucker2_factors
from layerzip.nn import CPConv, LowRankConv, SpatialSVDConv, Tucker2Conv, layer_from_spec
from layerzip.nn.conv import cp_als, dense_conv_flops

from conftest import run_cli

D = torch.float64
LAYERS = [LowRankConv, Tucker2Conv, CPConv, SpatialSVDConv]
GEOMETRIES = [  # (in, out, kernel, stride, padding, dilation, bias)
    (4, 6, 3, 1, 1, 1, True),
    (6, 4, (3, 5), 2, (1, 2), 1, False),
    (5, 7, 3, (2, 1), 2, 2, True),
    (3, 8, 1, 1, 0, 1, True),
]


@pytest.fixture(autouse=True)
def few_als_steps(monkeypatch):
    """CP-ALS to convergence is for the benchmarks; a few steps show the same code paths here."""
    monkeypatch.setattr(CPConv, "ALS_ITERS", 8)


def _conv(i, o, k, s, p, d, b):
    torch.manual_seed(0)
    return nn.Conv2d(i, o, k, stride=s, padding=p, dilation=d, bias=b, dtype=D)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:3])))
def test_full_rank_is_exact_and_round_trips(cls, geom, tmp_path):
    conv = _conv(*geom)
    layer = cls.from_conv(conv)                                     # no rank: the exact decomposition
    x = torch.randn(2, geom[0], 11, 13, dtype=D)
    assert torch.allclose(layer(x), conv(x), atol=1e-10)
    assert torch.allclose(layer.dense_weight(), conv.weight, atol=1e-10)
    dense = layer.to_dense()
    assert type(dense) is nn.Conv2d and torch.allclose(dense(x), conv(x), atol=1e-10)
    # spec -> empty layer -> safetensors tensors: the same layer
    save_file(layer.state_dict(), str(tmp_path / "w.safetensors"))
    again = layer_from_spec(layer.spec(), dtype=D)
    again.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    assert torch.equal(again(x), layer(x))


@pytest.mark.parametrize("cls,shape", [(LowRankConv, {"rank": 5}), (Tucker2Conv, {"rank_in": 3, "rank_out": 4}),
                                       (CPConv, {"rank": 7}), (SpatialSVDConv, {"rank": 6})],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_params_and_flops_formulas_match_what_runs(cls, shape):
    conv = _conv(6, 8, 3, 2, 1, 1, True)
    layer = cls.from_conv(conv, **shape)
    assert sum(p.numel() for p in layer.parameters()) - 8 == cls.num_params(6, 8, (3, 3), **shape)
    x = torch.randn(1, 6, 12, 10, dtype=D)
    with FlopCounterMode(display=False) as fc:
        layer(x)
    assert layer.flops((12, 10)) == fc.get_total_flops()             # every step at the resolution it runs at
    with FlopCounterMode(display=False) as fc:
        conv(x)
    assert dense_conv_flops(conv, (12, 10)) == fc.get_total_flops()


def test_lowrank_and_spatial_are_eckart_young():
    conv = _conv(6, 8, 3, 1, 1, 1, False)
    W = conv.weight.detach()
    s = torch.linalg.svdvals(W.flatten(1))
    err = (LowRankConv.from_conv(conv, rank=3).dense_weight() - W).norm()
    assert torch.isclose(err, s[3:].norm())
    s = torch.linalg.svdvals(SpatialSVDConv.unfold(W))
    err = (SpatialSVDConv.from_conv(conv, rank=4).dense_weight() - W).norm()
    assert torch.isclose(err, s[4:].norm())


def _patches(i, k, n=400, seed=0):
    """Correlated input patches (in·k² columns) and their Gram."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, i * k * k, generator=g, dtype=D) @ torch.randn(i * k * k, i * k * k, generator=g, dtype=D)
    return X, X.T @ X


def test_whitened_conv_svd_is_optimal_and_tucker_spatial_refits_are_least_squares():
    torch.manual_seed(1)
    W = torch.randn(8, 4, 3, 3, dtype=D)
    X, G = _patches(4, 3)
    loss = lambda Wp: ((W - Wp).flatten(1) @ X.T).norm() ** 2   # noqa: E731  the layer loss
    A, B = conv_svd_factors(W, G, 5)
    L = torch.linalg.cholesky(G)
    sw = torch.linalg.svdvals(W.flatten(1) @ L)
    assert torch.isclose(loss((A @ B).reshape(W.shape)), sw[5:].square().sum(), rtol=1e-6)
    A0, B0 = conv_svd_factors(W, None, 5)
    assert loss((A @ B).reshape(W.shape)) < loss((A0 @ B0).reshape(W.shape))
    # Tucker-2: the reduced kernel is the exact least-squares fit given `first` (zero gradient in the core at full
    # output rank); spatial: the horizontal filters are least squares given the vertical ones
    first, core, last = tucker2_factors(W, G, 2, 8)
    Wm = W.flatten(1)
    E = torch.kron(first.contiguous(), torch.eye(9, dtype=D))
    K = (last @ core.flatten(1))
    assert torch.allclose((Wm - K @ E) @ G @ E.T, torch.zeros(8, 18, dtype=D), atol=1e-6 * G.norm())
    Vv, H = spatial_factors(W, G, 4)
    E = torch.kron(Vv.T.contiguous(), torch.eye(3, dtype=D))
    Hm = H.reshape(4, 8, 3).permute(1, 0, 2).reshape(8, 12)
    assert torch.allclose((Wm - Hm @ E) @ G @ E.T, torch.zeros(8, 12, dtype=D), atol=1e-6 * G.norm())
    assert torch.allclose(refit_left(Wm, torch.eye(36, dtype=D), G), Wm, atol=1e-6)


def test_cp_als_recovers_a_low_rank_kernel_within_kernel_memory(monkeypatch):
    g = torch.Generator().manual_seed(0)
    true = [torch.randn(n, 8, generator=g, dtype=D) for n in (16, 6, 3, 3)]
    T = torch.einsum("ar,br,cr,dr->abcd", *true)
    biggest = []
    einsum = torch.einsum

    def spy(*a, **k):
        out = einsum(*a, **k)
        biggest.append(out.numel())
        return out
    monkeypatch.setattr(torch, "einsum", spy)
    f = cp_als(T, 8)                                                  # R = 8 > in = 6: chunked products
    monkeypatch.undo()
    assert max(biggest) <= T.numel()
    assert (torch.einsum("ar,br,cr,dr->abcd", *f) - T).norm() / T.norm() < 1e-3


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.Conv2d(32, 24, 1), nn.ReLU(),
                         nn.Conv2d(24, 8, 3, padding=1)).eval()


@pytest.mark.parametrize("cfg", [lz.ConvSVD(keep=0.5), lz.Tucker2(keep=0.5), lz.CP(keep=0.5),
                                 lz.SpatialSVD(keep=0.5), lz.Tucker2(keep=0.5, alloc="global"),
                                 lz.ConvSVD(keep=0.5, alloc="global", objective="flops"),
                                 lz.SpatialSVD(energy=0.95)], ids=lambda c: f"{c.name}-{c.alloc}-{c.objective}")
def test_compress_plain_cnn(cfg):
    net = _cnn()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    ref = net(calib[0])
    rep = lz.compress_(net, cfg, calib=calib, progress=False)
    assert isinstance(net[4], nn.Conv2d)                              # grouped: left alone
    assert rep["convolutions"] == 4 and rep["factorized"] == len(rep["modules"]) >= 1
    if cfg.energy is None:
        kept = rep["keep_achieved"] if cfg.objective == "params" else rep["flops_kept"]
        assert 0.3 < kept <= cfg.keep + 1e-9
    assert ((net(calib[0]) - ref).norm() / ref.norm()) < 0.9
    lz.merge_(net)
    assert all(type(m) is nn.Conv2d for m in net if not isinstance(m, nn.ReLU))


def test_whitening_lowers_the_output_error():
    calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    ref = _cnn()(calib[0])
    errs = {}
    for whiten in (False, True):
        net = _cnn()
        lz.compress_(net, lz.ConvSVD(keep=0.4, whiten=whiten, include=r"^[02]$"), calib=calib, progress=False)
        errs[whiten] = ((net(calib[0]) - ref).norm() / ref.norm()).item()
    assert errs[True] < errs[False]


def _planted(o, i, k, r_in, r_out, noise=0.05, seed=0):
    """A kernel of Tucker ranks (r_in, r_out) plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, k, k, generator=g, dtype=D)
    U_out, _ = torch.linalg.qr(torch.randn(o, r_out, generator=g, dtype=D))
    U_in, _ = torch.linalg.qr(torch.randn(i, r_in, generator=g, dtype=D))
    W = torch.einsum("abhw,oa,ib->oihw", core, U_out, U_in)
    return W + noise * W.std() * torch.randn(W.shape, generator=g, dtype=D)


def test_vbmf_finds_the_planted_ranks():
    from layerzip.allocate import vbmf_rank
    from layerzip.methods.conv import vbmf_shape
    W = _planted(48, 32, 3, r_in=6, r_out=10)
    assert vbmf_shape(Tucker2Conv, W) == {"rank_in": 6, "rank_out": 10}
    assert vbmf_shape(LowRankConv, W) == {"rank": 10}
    noise = torch.randn(40, 90, dtype=D)
    assert vbmf_rank(torch.linalg.svdvals(noise), 40, 90) == 0
    net = nn.Sequential(nn.Conv2d(32, 48, 3, padding=1, dtype=D))
    with torch.no_grad():
        net[0].weight.copy_(W)
    x = torch.randn(2, 32, 8, 8, dtype=D)
    ref = net(x)
    rep = lz.compress_(net, lz.Tucker2(vbmf=True), calib=[x], progress=False)
    assert rep["ranks"]["0"] == {"rank_in": 6, "rank_out": 10}
    assert ((net(x) - ref).norm() / ref.norm()) < 0.1           # the noise (5%) is what is dropped


def test_bad_conv_options_are_one_line_errors():
    for kw, what in [({"objective": "latency"}, "--objective"), ({"energy": 2.0}, "--energy"),
                     ({"alloc": "global"}, "uniform only"), ({"vbmf": True}, "--vbmf")]:
        with pytest.raises(LayerzipError, match=what):
            lz.CP(**kw)
    with pytest.raises(LayerzipError, match="--vbmf"):
        lz.Tucker2(vbmf=True, alloc="global")
    with pytest.raises(LayerzipError, match="calibration images"):
        lz.compress_(_cnn(), lz.Tucker2(objective="flops"), progress=False)
    with pytest.raises(LayerzipError, match="no convolution"):
        lz.compress_(nn.Sequential(nn.Linear(4, 4)), lz.Tucker2(), progress=False)
    with pytest.raises(ValueError, match="rank_in"):
        Tucker2Conv(4, 4, 3, rank_in=5)


def test_tiny_transformers_resnet_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                                    num_labels=5)
    torch.manual_seed(0)
    base = transformers.ResNetForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = base(pixel_values=x).logits
    for k, cfg_ in enumerate([lz.Tucker2(keep=0.6), lz.CP(keep=0.6), lz.SpatialSVD(keep=0.6), lz.ConvSVD(keep=0.6)]):
        model = copy.deepcopy(base)
        rep = lz.compress_(model, cfg_, calib=[{"pixel_values": x}], progress=False)
        assert rep["factorized"] >= 4 and rep["keep_achieved"] <= 0.6
        out = model(pixel_values=x).logits
        assert (out - ref).norm() / ref.norm() < 0.5
        lz.save(model, tmp_path / str(k))
        assert torch.allclose(lz.load(tmp_path / str(k))(pixel_values=x).logits, out, atol=1e-5)
        native = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / str(k)).eval()
        assert type(native.resnet.embedder.embedder.convolution) is type(model.resnet.embedder.embedder.convolution)
        assert torch.allclose(native(pixel_values=x).logits, out, atol=1e-5)


def test_cli_on_a_transformers_resnet_with_calibration_images(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from PIL import Image
    import json
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    torch.manual_seed(0)
    transformers.ResNetModel(cfg).save_pretrained(tmp_path / "resnet")
    (tmp_path / "imgs").mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        px = (torch.rand(40 + 10 * k, 50, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(tmp_path / "imgs" / f"{k}.png")
    code, out, err = run_cli(capsys, "compress", str(tmp_path / "resnet"), "--out", str(tmp_path / "o"), "--method",
                          "spatial-svd", "--keep", "0.6", "--calib", str(tmp_path / "imgs"), "--objective", "flops",
                          "--alloc", "global", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["factorized"] >= 1 and rep["flops_counted"] == "per image" and rep["flops_kept"] <= 0.6 + 1e-9
    assert json.loads((tmp_path / "o" / "layerzip.json").read_text())["calibration"]["images"] == 3
    assert isinstance(lz.load(tmp_path / "o"), transformers.ResNetModel)
    code, out, err = run_cli(capsys, "compress", str(tmp_path / "resnet"), "--out", str(tmp_path / "p"), "--method",
                          "tucker2", "--calib", str(tmp_path / "missing"))
    assert code == 2 and err.count("\n") == 1 and "--calib" in err and not (tmp_path / "p").exists()


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_balance_keeps_the_function_and_evens_the_factors(cls):
    conv = _conv(6, 8, 3, 1, 1, 1, True)
    layer = cls.from_conv(conv, **({"rank_in": 4, "rank_out": 5} if cls is Tucker2Conv else {"rank": 5}))
    with torch.no_grad():                         # badly scaled factors, as a whitened fit can leave them
        factors = [p for n, p in layer.named_parameters() if n != "bias"]
        factors[0].mul_(1e3)
        factors[-1].div_(1e3)
    x = torch.randn(2, 6, 9, 9, dtype=D)
    before = layer(x)
    ratio = lambda: max(p.norm() / p.numel() ** 0.5 for p in factors) / min(p.norm() / p.numel() ** 0.5 for p in factors)  # noqa: E731
    spread = ratio()
    layer.balance_()
    assert torch.allclose(layer(x), before, atol=1e-9 * before.abs().max().item())
    assert ratio() < spread / 100
