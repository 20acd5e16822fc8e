"""ONNX export (`layerzip export`, lz.export_onnx) and latency in onnxruntime (`eval --latency --runtime`).

Every architecture and every method: onnx.checker passes, onnxruntime equals torch within 1e-4 (float32) on inputs
of another shape than the traced one, left-padded too, and no factorized layer is re-densified (its factors are
initializers, no initializer has its dense shape)."""
import json
import sys

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import layerzip as lz  # noqa: E402
from layerzip.errors import LayerzipError  # noqa: E402
from layerzip.export import _Graph, dense_initializers, ort_session  # noqa: E402
from layerzip.models import linear_shape, select_targets, set_module  # noqa: E402
from layerzip.nn import STRUCTURES, FactorizedLayer, LowRankLinear, choose_shape  # noqa: E402
from layerzip.registry import LAYERS  # noqa: E402

from conftest import ARCHS, tiny_model  # noqa: E402
from conftest import run_cli  # noqa: E402
from test_cli import assert_bad, digest  # noqa: E402
from test_method_matrix import ROWS, batches  # noqa: E402

TOL = 1e-4


def onnx_vs_torch(model, path) -> float:
    """max |onnxruntime − torch| on 3 × 21 tokens (traced at 2 × 8), one row left-padded, one right-padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (3, 21), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, -4:] = 0
    with torch.no_grad():
        ref = _Graph(model)(ids, mask)
    got = torch.from_numpy(ort_session(path).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
    assert got.shape == ref.shape
    return (got - ref)[mask.bool()].abs().max().item()


def assert_factored(model, path):
    """Each low-rank layer's factors are initializers (Bᵀ in×r, Aᵀ r×out, either orientation); none is dense."""
    assert dense_initializers(path, model) == []
    graph = onnx.load(str(path)).graph
    dims = [tuple(t.dims) for t in graph.initializer]
    layers = [m for m in model.modules() if isinstance(m, FactorizedLayer)]
    assert layers
    for m in layers:
        if isinstance(m, LowRankLinear):
            assert {(m.in_features, m.rank), (m.rank, m.in_features)} & set(dims)
            assert {(m.rank, m.out_features), (m.out_features, m.rank)} & set(dims)
    assert sum(n.op_type in ("MatMul", "Gemm") for n in graph.node) >= 2 * sum(isinstance(m, LowRankLinear)
                                                                              for m in layers)


def compressed(arch, method="svd", keep=0.5, **options):
    model = tiny_model(arch)
    cfg = lz.config_from_dict({"method": method, "keep": keep, **options})
    lz.compress_(model, cfg, calib=batches(), progress=False)
    return model


@pytest.mark.parametrize("arch", [pytest.param(a, marks=[] if a in ("llama", "gemma3", "gpt2", "bert") else
                                                 pytest.mark.slow) for a in ARCHS])
def test_every_architecture(arch, tmp_path):
    model = compressed(arch)
    rep = lz.export_onnx(model, tmp_path / "m.onnx", progress=False)
    assert rep["output"] == ("last_hidden_state" if arch == "bert" else "logits")
    assert rep["max_abs_diff"] <= TOL and rep["factorized_layers"] > 0
    assert onnx_vs_torch(model, tmp_path / "m.onnx") <= TOL
    assert_factored(model, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]      # no temporary left


@pytest.mark.parametrize("method", [pytest.param(n, marks=[] if n == "svd-llm" else pytest.mark.slow)
                                    for n, (_, kind) in ROWS.items() if kind == "lowrank"])
def test_every_lowrank_method(method, tmp_path):
    for arch in ("llama", "bert"):
        model = compressed(arch, method, **ROWS[method][0])
        path = tmp_path / f"{arch}.onnx"
        rep = lz.export_onnx(model, path, progress=False)
        assert rep["max_abs_diff"] <= TOL
        assert onnx_vs_torch(model, path) <= TOL
        assert_factored(model, path)


@pytest.mark.parametrize("layer", [pytest.param(n, marks=[] if n in ("lowrank", "btt") else pytest.mark.slow)
                                   for n in STRUCTURES])
def test_every_structure(layer, tmp_path):
    """Each structured layer type (random factors of the shape compress would choose at keep 0.5: the export does
    not depend on the values) exports as its own contractions: no initializer of a dense weight's shape."""
    model = tiny_model("llama")
    for name, mod in select_targets(model).items():
        out_f, in_f = linear_shape(mod)
        torch.manual_seed(0)
        new = LAYERS[layer](in_f, out_f, bias=mod.bias is not None, **choose_shape(layer, in_f, out_f, 0.5))
        with torch.no_grad():
            for p in new.parameters():
                p.normal_(0, 0.2)
        set_module(model, name, new)
    path = tmp_path / "m.onnx"
    rep = lz.export_onnx(model, path, progress=False)
    assert rep["max_abs_diff"] <= TOL and rep["factorized_layers"] == 14
    assert onnx_vs_torch(model, path) <= TOL
    assert_factored(model, path)


def test_bf16_and_lowbit_models_export_in_float32(tmp_path):
    model = compressed("llama")
    lz.save(model, tmp_path / "int4", bits=4)
    loaded = lz.load(tmp_path / "int4")                      # dequantized on load
    rep = lz.export_onnx(loaded.to(torch.bfloat16), tmp_path / "m.onnx", progress=False)
    assert rep["max_abs_diff"] <= TOL
    assert next(loaded.parameters()).dtype == torch.bfloat16  # the caller's model is left as it was
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert {t.data_type for t in graph.initializer if len(t.dims) == 2} == {onnx.TensorProto.FLOAT}


def test_cli_export_and_ort_latency(tiny_dirs, calib_file, tmp_path, capsys):
    src = tiny_dirs["gpt2"]
    lzdir = tmp_path / "gpt2-lz"
    code, out, err = run_cli(capsys, "compress", str(src), "--method", "svd", "--keep", "0.5", "--out", str(lzdir),
                         "--json")
    assert code == 0, err
    code, out, err = run_cli(capsys, "export", str(lzdir), "--format", "onnx", "--out", str(tmp_path / "g.onnx"),
                         "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["output"] == "logits" and rep["max_abs_diff"] <= TOL and rep["kind"] == "causal-lm"
    assert_factored(lz.load(lzdir), tmp_path / "g.onnx")
    code, out, err = run_cli(capsys, "eval", str(lzdir), "--latency", "--runtime", "onnxruntime", "--latency-seq-len",
                         "8", "--samples", "4", "--seq-len", "16", "--text", str(calib_file), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["latency_runtime"] == "onnxruntime" and res["latency_threads"] == 1
    for k in ("latency_ms_batch1", "latency_ms_batch16", "dense_latency_ms_batch1", "dense_latency_ms_batch16",
              "speedup_batch1", "speedup_batch16", "speedup_over_bound_batch16"):
        assert res[k] > 0, k
    assert res["flop_bound"] > 1                  # dense FLOPs ÷ the compressed model's
    code, out, err = run_cli(capsys, "eval", str(src), "--latency", "--latency-seq-len", "8", "--samples", "4",
                         "--seq-len", "16", "--text", str(calib_file), "--json")     # dense: no speedup
    res = json.loads(out)
    assert code == 0 and res["latency_runtime"] == "torch" and "speedup_batch1" not in res


def test_cli_bad_inputs(tiny_dirs, tmp_path, capsys):
    src = tiny_dirs["bert"]
    before = digest(src)
    onnx_file = tmp_path / "m.onnx"
    assert_bad(capsys, "export", str(src), "--format", "onnx", "--out", str(tmp_path / "m.txt"), match=".onnx")
    assert_bad(capsys, "export", str(src), "--format", "tflite", "--out", str(onnx_file), match="--format")
    assert_bad(capsys, "export", str(src), "--out", str(onnx_file), match="--format")
    assert_bad(capsys, "export", str(src), "--format", "onnx", "--out", str(onnx_file), "--keep", "0.5",
               match="not one; drop --keep")
    assert_bad(capsys, "export", str(src), "--format", "onnx", "--out", str(src / "m.onnx"), match="inside")
    assert_bad(capsys, "export", str(tmp_path / "nope"), "--format", "onnx", "--out", str(onnx_file),
               match="does not exist")
    onnx_file.write_text("mine")
    assert_bad(capsys, "export", str(src), "--format", "onnx", "--out", str(onnx_file), match="--force")
    assert onnx_file.read_text() == "mine" and digest(src) == before
    assert_bad(capsys, "eval", str(src), "--latency", "--runtime", "tvm", match="--runtime")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_failed_export_leaves_nothing(tiny_dirs, tmp_path, monkeypatch, capsys):
    model = compressed("llama")

    def broken(net, args, f, **kw):
        open(f, "wb").write(b"half")
        raise RuntimeError("exporter crashed")
    monkeypatch.setattr(torch.onnx, "export", broken)
    (tmp_path / "m.onnx").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        lz.export_onnx(model, tmp_path / "m.onnx", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and (tmp_path / "m.onnx").read_bytes() == b"old"
    assert_bad(capsys, "export", str(tiny_dirs["bert"]), "--format", "onnx", "--out", str(tmp_path / "n.onnx"),
               "--json", match="exporter crashed")              # the CLI: one line, exit 2
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_without_onnx_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(LayerzipError, match=r"pip install 'layerzip\[onnx\]'"):
        lz.export_onnx(compressed("llama"), tmp_path / "m.onnx", progress=False)


@pytest.mark.slow
def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript")
    model = compressed("llama")
    rep = lz.export_onnx(model, tmp_path / "m.onnx", dynamo=True, progress=False)
    assert rep["exporter"] == "dynamo" and rep["max_abs_diff"] <= TOL
    assert onnx_vs_torch(model, tmp_path / "m.onnx") <= TOL
    assert dense_initializers(tmp_path / "m.onnx", model) == []
