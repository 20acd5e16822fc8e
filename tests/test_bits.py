"""Low-bit factors (`compress --bits 8|4`, `lz.save(..., bits=)`): the group quantization round trip, the bytes
written, outputs close to the 16-bit model, native loading equal to lz.load, and the specs that record it."""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors import safe_open

import layerzip as lz
from layerzip.cli import main
from layerzip.io import LOWBIT_FORMAT, written_bytes
from layerzip.nn import LowBitLowRank, LowRankLinear
from layerzip.nn.lowbit import dequantize_groups, pack_int4, quantize_groups, unpack_int4

from conftest import tiny_model

QMAX = {8: 127, 4: 7}


# ------------------------------------------------------------------------------------------ the tensor math
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape, group", [((5, 37), 128), ((6, 37), 8), ((3, 256), 128), ((4, 9), 1)])
def test_round_trip_within_half_a_step(bits, shape, group):
    torch.manual_seed(0)
    W = torch.randn(*shape, dtype=torch.float64) * torch.logspace(-3, 1, shape[0], dtype=torch.float64)[:, None]
    q, s = quantize_groups(W, bits, group)
    g = min(group, shape[1])
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.shape == (shape[0], shape[1] if bits == 8 else math.ceil(shape[1] / 2))
    assert s.dtype == torch.float32 and s.shape == (shape[0], math.ceil(shape[1] / g))
    D = dequantize_groups(q, s, bits, shape[1], group, torch.float64)
    step = s.double().repeat_interleave(g, dim=1)[:, :shape[1]]
    assert ((W - D).abs() <= step / 2 * (1 + 1e-6)).all()
    # the step is max|w| / qmax of its group (rounded up to float32): no coarser than needed
    amax = torch.nn.functional.pad(W.abs(), (0, s.shape[1] * g - shape[1])).view(shape[0], -1, g).amax(-1)
    assert torch.allclose(s.double() * QMAX[bits], amax, rtol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_values_on_the_grid_are_exact(bits):
    g, rows, groups = 16, 4, 3
    torch.manual_seed(1)
    q = torch.randint(-QMAX[bits], QMAX[bits] + 1, (rows, groups * g))
    q[:, ::g] = QMAX[bits]                                    # every group reaches qmax: its step is exactly s
    s = 2.0 ** torch.randint(-6, 3, (rows, groups)).double()
    W = (q.double().view(rows, groups, g) * s[..., None]).view(rows, -1)[:, :-5]     # a short last group
    qq, ss = quantize_groups(W, bits, g)
    assert torch.equal(ss.double(), s)
    assert torch.equal(dequantize_groups(qq, ss, bits, W.shape[1], g, torch.float64), W)


def test_int4_packing_round_trip():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 1)[:, :15]          # every value, an odd row length
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 8)
    assert torch.equal(unpack_int4(packed, 15), q)
    assert packed[0, 0] == ((-8 + 8) | ((-7 + 8) << 4))                   # column 2j low nibble, 2j+1 high


def test_save_leaves_the_model_as_it_was(tmp_path):
    lin = torch.nn.Sequential(LowRankLinear.from_linear(torch.nn.Linear(40, 24), rank=6))
    A = lin[0].A.detach().clone()
    q = LowBitLowRank.from_lowrank(lin[0], 4)
    x = torch.randn(3, 40)
    assert (q(x) - lin(x)).norm() < 0.3 * lin(x).norm()
    assert torch.allclose(q.to_lowrank().A, q.factor("A")) and type(q.to_lowrank()) is LowRankLinear
    assert torch.equal(lin[0].A, A) and type(lin[0]) is LowRankLinear


# ------------------------------------------------------------------------------------------ compressed models
ARCH_CLASS = {"llama": transformers.AutoModelForCausalLM, "bert": transformers.AutoModel}


def compress_cli(src, out, bits, capfd):
    argv = ["compress", str(src), "--out", str(out), "--method", "svd", "--keep", "0.5", "--bits", str(bits),
            "--json"]
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    captured = capfd.readouterr()
    assert (e.value.code or 0) == 0, captured.err[-2000:]
    return json.loads(captured.out)


def factor_bytes(path) -> tuple[int, int, int]:
    """(bytes of the factor values, of their scales, of everything else) in a directory's safetensors file."""
    values = scales = rest = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as h:
        for k in h.keys():
            t = h.get_tensor(k)
            n = t.numel() * t.element_size()
            kind = k.rsplit(".", 1)[-1]
            if kind in ("A", "B", "A_q", "B_q"):
                values += n
            elif kind in ("A_scale", "B_scale"):
                scales += n
            else:
                rest += n
    return values, scales, rest


def expected_factor_bytes(specs: dict, bits: int, group: int = 128) -> int:
    total = 0
    for s in specs.values():
        for rows, cols in ((s["out"], s["rank"]), (s["rank"], s["in"])):
            values = rows * (cols if bits == 8 else math.ceil(cols / 2))
            total += values + 4 * rows * math.ceil(cols / min(group, cols))
    return total


def output(model, ids):
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.last_hidden_state if hasattr(o, "last_hidden_state") else o.logits


@pytest.mark.parametrize("arch", list(ARCH_CLASS))
def test_low_bit_compress_bytes_outputs_native(arch, tiny_dirs, tmp_path, capfd):
    reports, dirs = {}, {}
    for bits in (16, 8, 4):
        dirs[bits] = tmp_path / f"{arch}-{bits}"
        reports[bits] = compress_cli(tiny_dirs[arch], dirs[bits], bits, capfd)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = output(lz.load(dirs[16]), ids)
    f16, _, rest16 = factor_bytes(dirs[16])
    for bits in (16, 8, 4):
        rep, d = reports[bits], dirs[bits]
        assert rep["bytes_after"] == written_bytes(d) and rep["bytes_before"] == reports[16]["bytes_before"]
        assert rep["bytes_after"] < rep["bytes_before"]
        meta = json.loads((d / "layerzip.json").read_text())
        cfg = json.loads((d / "config.json").read_text())["quantization_config"]
        if bits == 16:
            assert meta["format_version"] == 2 and "bits" not in next(iter(meta["modules"].values()))
            continue
        assert meta["format_version"] == cfg["format_version"] == LOWBIT_FORMAT
        assert meta["bits"] == bits and meta["group_size"] == 128
        assert all(s["bits"] == bits and s["group_size"] == 128 for s in meta["modules"].values())
        assert cfg["modules"] == meta["modules"]
        values, scales, rest = factor_bytes(d)
        fb = values + scales
        assert rest == rest16                                   # only the factors changed
        assert fb == expected_factor_bytes(meta["modules"], bits)
        if bits == 8:
            assert values * 4 == f16                            # 1 byte a value for 4 in float32
        else:                                                   # half a byte (a row of odd length: one more)
            assert f16 / 8 <= values <= f16 / 8 + sum(s["out"] + s["rank"] for s in meta["modules"].values())
        assert rep["bytes_after"] == reports[16]["bytes_after"] - f16 + fb
        print(f"{arch} bits {bits}: factor bytes {fb} ({values} values + {scales} scales) / {f16} = "
              f"{fb / f16:.3f}; total {rep['bytes_after']} / {reports[16]['bytes_after']}")
        model = lz.load(d)
        assert not any(isinstance(m, LowBitLowRank) for m in model.modules())
        lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
        assert len(lowrank) == len(meta["modules"]) and all(m.A.dtype == torch.float32 for m in lowrank)
        y = output(model, ids)
        rel = ((y - ref).norm() / ref.norm()).item()
        assert 0 < rel < {8: 2e-2, 4: 0.25}[bits], (arch, bits, rel)
        native = ARCH_CLASS[arch].from_pretrained(d)
        assert sum(isinstance(m, LowRankLinear) for m in native.modules()) == len(lowrank)
        assert (output(native, ids) - y).abs().max() <= 1e-5


def test_dense_block_linears_are_stored_low_bit_too(tmp_path):
    """Global allocation leaves some block Linears dense; --bits writes them as LowBitLinear (weight_q + scales),
    and lz.load / native loading give nn.Linear layers holding the round-to-nearest weights."""
    model = tiny_model("llama")
    rep = lz.compress_(model, lz.SVDLLM(keep=0.85, alloc="global", fisher=False), calib=[
        {"input_ids": torch.randint(5, 1000, (4, 32), generator=torch.Generator().manual_seed(1))}], progress=False)
    dense = [n for n, r in rep["ranks"].items() if r is None]
    assert dense and len(dense) < len(rep["ranks"]), rep["ranks"]
    lz.save(model, tmp_path / "o", bits=4)
    meta = json.loads((tmp_path / "o" / "layerzip.json").read_text())
    assert all(meta["modules"][n] == {"type": "lowbit_linear", "in": model.get_submodule(n).in_features,
                                      "out": model.get_submodule(n).out_features, "bias": False, "bits": 4,
                                      "group_size": 128} for n in dense)
    with safe_open(str(tmp_path / "o" / "model.safetensors"), framework="pt") as h:
        assert f"{dense[0]}.weight_q" in h.keys() and f"{dense[0]}.weight" not in h.keys()
    W = model.get_submodule(dense[0]).weight.detach()
    loaded = lz.load(tmp_path / "o")
    got = loaded.get_submodule(dense[0])
    assert type(got) is torch.nn.Linear
    assert torch.equal(got.weight.detach(), dequantize_groups(*quantize_groups(W, 4), 4, W.shape[1]))
    ids = torch.randint(0, 1000, (2, 8))
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert type(native.get_submodule(dense[0])) is torch.nn.Linear
    assert (output(native, ids) - output(loaded, ids)).abs().max() <= 1e-5
    assert rep["ranks"] and type(model.get_submodule(dense[0])) is torch.nn.Linear       # the model is unchanged


def test_bf16_model_low_bit(tmp_path):
    """Factors dequantized to the model's dtype (bf16 stays bf16); scales are float32 on disk."""
    model = tiny_model("llama").to(torch.bfloat16)
    lz.compress_(model, lz.SVD(keep=0.5), progress=False)
    lz.save(model, tmp_path / "bf16", bits=8)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as h:
        keys = list(h.keys())
        scale = next(k for k in keys if k.endswith("A_scale"))
        assert h.get_tensor(scale).dtype == torch.float32
        assert h.get_tensor(scale.replace("A_scale", "A_q")).dtype == torch.int8
    loaded = lz.load(tmp_path / "bf16")
    assert next(m for m in loaded.modules() if isinstance(m, LowRankLinear)).A.dtype == torch.bfloat16
    ids = torch.randint(0, 1000, (1, 8))
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert torch.equal(output(native, ids), output(loaded, ids))


# ------------------------------------------------------------------------------------------ --budget-bytes
def test_option_choice_is_optimal_where_the_lagrangian_is():
    """At the cost of any Lagrangian solution (each module minimizing loss + λ·cost), that solution is optimal, so
    option_choice must reach its loss or less within its cost; and it never exceeds a budget."""
    from layerzip.allocate import option_choice
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        opts = {}
        for k in range(4):
            n = int(torch.randint(2, 9, (1,), generator=gen))
            opts[str(k)] = (torch.rand(n, generator=gen, dtype=torch.float64) * 10,
                            torch.rand(n, generator=gen, dtype=torch.float64))
        for lam in (0.0, 0.01, 0.05, 0.2, 1.0):
            pick = {k: int(torch.argmin(l + lam * c)) for k, (c, l) in opts.items()}
            cost = sum(opts[k][0][i].item() for k, i in pick.items())
            loss = sum(opts[k][1][i].item() for k, i in pick.items())
            got = option_choice(opts, cost)
            assert sum(opts[k][0][i].item() for k, i in got.items()) <= cost + 1e-9
            assert sum(opts[k][1][i].item() for k, i in got.items()) <= loss + 1e-9, (trial, lam)
        budget = float(torch.rand(1, generator=gen)) * 30
        got = option_choice(opts, budget)
        cheapest = sum(c.min().item() for c, _ in opts.values())
        assert sum(opts[k][0][i].item() for k, i in got.items()) <= max(budget, cheapest) + 1e-9


def test_budget_bytes_mixes_rank_and_bits(tiny_dirs, tmp_path, capsys):
    """--budget-bytes: the bytes written stay within the budget and use most of it; the bits recorded per module;
    lz.load equals native loading; and at no more bytes than --keep 0.5 --bits 8 the output is closer to dense."""
    from conftest import run_cli
    src = tiny_dirs["llama"]
    dense = lz.load(src)
    ids = torch.randint(5, 1000, (2, 32), generator=torch.Generator().manual_seed(3))
    ref = output(dense, ids)

    def err(model):
        return ((output(model, ids) - ref).norm() / ref.norm()).item()
    code, out, errs = run_cli(capsys, "compress", str(src), "--out", str(tmp_path / "k"), "--keep", "0.5", "--bits",
                              "8", "--json")
    assert code == 0, errs
    uniform = json.loads(out)
    code, out, errs = run_cli(capsys, "compress", str(src), "--out", str(tmp_path / "b"), "--budget-bytes",
                              str(uniform["bytes_after"]), "--json")
    assert code == 0, errs
    rep = json.loads(out)
    assert rep["bytes_after"] == written_bytes(tmp_path / "b") <= uniform["bytes_after"]
    assert rep["bytes_after"] > 0.97 * uniform["bytes_after"]
    assert rep["module_bits"] and set(rep["module_bits"].values()) <= {8, 4}
    meta = json.loads((tmp_path / "b" / "layerzip.json").read_text())
    assert meta["bits"] == rep["module_bits"]
    assert all(meta["modules"][n]["bits"] == b for n, b in rep["module_bits"].items() if n in meta["modules"])
    model = lz.load(tmp_path / "b")
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert (output(native, ids) - output(model, ids)).abs().max() <= 1e-5
    assert err(model) < err(lz.load(tmp_path / "k")), (err(model), err(lz.load(tmp_path / "k")))
    # a smaller budget: fewer bytes; --bits 8: int4 is not among the choices
    code, out, errs = run_cli(capsys, "compress", str(src), "--out", str(tmp_path / "s"), "--budget-bytes",
                              str(uniform["bytes_after"] - 5000), "--bits", "8", "--json")
    assert code == 0, errs
    small = json.loads(out)
    assert small["bytes_after"] <= uniform["bytes_after"] - 5000
    assert set(small["module_bits"].values()) == {8}


@pytest.mark.parametrize("extra, says", [
    (["--budget-bytes", "100"], "not more than the"),
    (["--budget-bytes", "0.9", "--alloc", "uniform"], "global allocation"),
    (["--budget-bytes", "0.9", "--elastic"], "global allocation"),
    (["--budget-bytes", "0.9", "--stream"], "--no-stream"),
    (["--budget-bytes", "-1"], "must be > 0"),
])
def test_budget_bytes_refusals(tiny_dirs, tmp_path, capsys, extra, says):
    from conftest import run_cli
    code, out, err = run_cli(capsys, "compress", str(tiny_dirs["llama"]), "--out", str(tmp_path / "o"), *extra)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
