"""MoEfication (`--method moe`): FFNs split into experts by co-activation clustering, a fitted router, a sparse
forward. k = E is the dense FFN; the sparse path runs only the chosen experts and matches a masked reference; the
clusters are balanced and find planted co-activation groups; the router's loss falls; save / lz.load / native
loading round-trip; merge_ gives the original weights bit for bit; bad input is refused in one line."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import layerzip as lz
from layerzip.methods.moe import balanced_kmeans, coactivation_features, fit_router, topk_recall
from layerzip.nn import DenseFFN, MoEFFN

from conftest import run_cli, tiny_model

ARCHS = ["llama", "qwen2", "gemma3", "gpt2"]       # SwiGLU, SwiGLU, GeGLU, GPT-2 Conv1D MLP


def batches(n: int = 4, seq: int = 24, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 1000, (n, seq), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def ffn_of(model):
    return model.transformer.h[0].mlp if hasattr(model, "transformer") else model.model.layers[0].mlp


def moe_of(model, k: int = 2, E: int = 4, dtype=torch.float64) -> tuple[MoEFFN, DenseFFN]:
    dense = DenseFFN.adopt(ffn_of(model).to(dtype))
    I = dense.weights()["out"][0].shape[1]
    labels = torch.randperm(I, generator=torch.Generator().manual_seed(0)) % E
    g = torch.Generator().manual_seed(1)
    H = dense.weights()["out"][0].shape[0]
    router = (torch.randn(E, H, generator=g, dtype=dtype), torch.randn(E, generator=g, dtype=dtype))
    return MoEFFN.from_dense_ffn(dense, labels, k, router), dense


@pytest.mark.parametrize("arch", ARCHS)
def test_all_experts_is_the_dense_ffn(arch):
    moe, dense = moe_of(tiny_model(arch), k=4, E=4)
    x = torch.randn(3, 7, moe.in_features, dtype=torch.float64)
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-6, atol=1e-6)
    assert moe.flops() == moe.dense_flops() + 2 * moe.in_features * 4


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])
def test_sparse_forward_runs_only_the_chosen_experts(arch):
    moe, dense = moe_of(tiny_model(arch), k=2, E=4)
    x = torch.randn(40, moe.in_features, dtype=torch.float64)
    ran = []
    expert = moe.expert
    moe.expert = lambda e, rows: ran.append((e, rows.shape[0])) or expert(e, rows)
    y = moe(x)
    # reference: every expert on every token, masked by the router's top-2
    top = moe.route(x).topk(2, dim=-1).indices
    mask = torch.zeros(40, 4, dtype=torch.float64).scatter_(1, top, 1.0)
    ref = sum(mask[:, e, None] * expert(e, x) for e in range(4)) + (0 if moe.bias is None else moe.bias)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    assert sum(n for _, n in ran) == 40 * 2 and {e for e, _ in ran} <= set(range(4))
    assert moe.flops() == moe.dense_flops() // 2 + 2 * moe.in_features * 4


def test_balanced_kmeans_finds_planted_coactivation_groups():
    g = torch.Generator().manual_seed(0)
    groups = torch.arange(32) % 4                       # neuron i fires on the tokens of topic groups[i]
    topic = torch.randint(4, (500,), generator=g)
    h = (topic[:, None] == groups[None, :]).double() * (1 + torch.rand(500, 32, generator=g))
    h += 0.05 * torch.randn(500, 32, generator=g, dtype=torch.float64)
    labels = balanced_kmeans(coactivation_features(h), 4, generator=g)
    assert torch.bincount(labels).tolist() == [8, 8, 8, 8]
    for c in range(4):                                  # each cluster is one planted group
        assert len(set(groups[labels == c].tolist())) == 1
    skewed = torch.cat([torch.randn(20, 3, generator=g) + 8, torch.randn(4, 3, generator=g)])
    assert torch.bincount(balanced_kmeans(skewed, 4, generator=g)).tolist() == [6] * 4


def test_router_training_lowers_its_loss_and_learns_the_mass():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 16, generator=g) * torch.linspace(0.1, 10, 16)     # badly scaled inputs
    mass = torch.nn.functional.softplus(3 * X @ torch.randn(16, 6, generator=g) / X.std(0).norm())
    W, b, losses = fit_router(X[:3000], mass[:3000], steps=300, generator=g)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.1
    logits = X[3000:] @ W.t() + b
    assert topk_recall(logits, mass[3000:], 2) > 0.95
    assert topk_recall(torch.randn(1000, 6, generator=g), mass[3000:], 2) < 0.9    # chance does worse


@pytest.fixture(scope="module")
def moefied(tmp_path_factory, tokenizer):
    """A tiny Gemma 3 MoEfied (4 experts, 2 active) and saved; its original."""
    model, original = tiny_model("gemma3"), tiny_model("gemma3")
    rep = lz.compress_(model, lz.MoE(experts=4, active=2, router_steps=50), calib=batches(), progress=False)
    out = tmp_path_factory.mktemp("moe") / "m"
    lz.save(model, out, tokenizer=tokenizer, meta={"method": "moe"})
    return model, original, rep, out


def test_compress_report(moefied):
    model, original, rep, _ = moefied
    assert rep["method"] == "moe-4e2" and rep["factorized"] == rep["targets"] == 2
    assert abs(rep["ffn_flops_fraction"] - 0.5) < 0.02                 # 2 of 4 experts (+ the router)
    assert 1 < rep["keep_achieved"] < 1.05                              # every weight kept, plus the routers
    for info in rep["moe_layers"].values():
        assert info["router_loss_last"] < info["router_loss_first"] and 0 < info["topk_recall"] <= 1 + 1e-6
        assert info["output_nmse"] < 1
    ids = batches()[0]["input_ids"]
    assert not torch.allclose(logits(model, ids), logits(original, ids))      # half the experts really skipped
    from layerzip.evaluate import flops                                      # eval --latency counts routed FLOPs
    moes = [m for m in model.modules() if isinstance(m, MoEFFN)]
    assert flops(model, 16)["flops_per_token_factorized"] == pytest.approx(sum(m.flops() for m in moes))


def test_save_load_and_native_loading(moefied):
    model, _, _, out = moefied
    ids = batches(seed=5)[0]["input_ids"]
    ref = logits(model, ids)
    spec = json.loads((out / "layerzip.json").read_text())["modules"]["model.layers.0.mlp"]
    assert spec["type"] == "moe" and spec["experts"] == 4 and spec["active"] == 2 and spec["act"]
    loaded = lz.load(out)
    assert isinstance(loaded.model.layers[0].mlp, MoEFFN)
    torch.testing.assert_close(logits(loaded, ids), ref, rtol=1e-6, atol=1e-6)
    native = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(native.model.layers[1].mlp, MoEFFN)
    torch.testing.assert_close(logits(native.eval(), ids), ref, rtol=1e-6, atol=1e-6)


def test_merge_gives_the_original_ffn(moefied, tmp_path):
    _, original, _, out = moefied
    model = lz.load(out)
    lz.merge_(model)
    for layer, orig in zip(model.model.layers, original.model.layers):
        assert isinstance(layer.mlp, DenseFFN)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(layer.mlp, name).weight, getattr(orig.mlp, name).weight)
    ids = batches(seed=6)[0]["input_ids"]
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=1e-6, atol=1e-6)
    lz.save(model, tmp_path / "merged")                 # a plain transformers directory again
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    torch.testing.assert_close(logits(plain.eval(), ids), logits(original, ids), rtol=1e-6, atol=1e-6)


def test_gpt2_conv1d_merge_is_exact():
    model, original = tiny_model("gpt2"), tiny_model("gpt2")
    lz.compress_(model, lz.MoE(experts=2, active=1, router_steps=10), calib=batches(), progress=False)
    assert isinstance(model.transformer.h[0].mlp, MoEFFN)
    lz.merge_(model)
    for a, b in zip(model.transformer.h, original.transformer.h):
        assert type(a.mlp.c_fc).__name__ == "Conv1D"
        assert all(torch.equal(x, y) for x, y in zip(a.mlp.state_dict().values(), b.mlp.state_dict().values()))


def test_healing_trains_router_and_experts(moefied, tokenizer):
    _, original, _, out = moefied
    student = lz.load(out)
    before = student.model.layers[0].mlp.router_weight.detach().clone()
    rep = lz.heal_(student, original, batches(seed=7), steps=3, lr=1e-3, progress=False, device="cpu")
    assert rep["trained"] == "factors" and rep["loss_last"] == rep["loss_last"]
    assert not torch.equal(student.model.layers[0].mlp.router_weight, before)


@pytest.mark.parametrize("kwargs, match", [
    ({"keep": 0.5}, "does not apply"),
    ({"active": 5, "experts": 4}, "--active must be"),
    ({"experts": 1}, "--experts must be"),
    ({"router_steps": 0}, "--router-steps"),
    ({"alloc": "global"}, "no ranks"),
    ({"then": "svd-llm"}, "low rank inside the experts"),
    ({"sequential": True}, "cannot run --sequential"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(lz.LayerzipError, match=match):
        lz.MoE(**kwargs)


def test_unsupported_models_are_refused():
    with pytest.raises(lz.LayerzipError, match="no feed-forward module in the blocks of BertModel"):
        lz.compress_(tiny_model("bert"), lz.MoE(experts=2), calib=batches(), progress=False)
    with pytest.raises(lz.LayerzipError, match="do not split into --experts 5"):     # 96 neurons
        lz.compress_(tiny_model("llama"), lz.MoE(experts=5, active=1), calib=batches(), progress=False)
    with pytest.raises(lz.LayerzipError, match="needs calibration text"):
        lz.compress_(tiny_model("llama"), lz.MoE(), calib=None, progress=False)


def test_cli(tiny_dirs, calib_file, tmp_path, capsys):
    code, out, err = run_cli(capsys, "compress", str(tiny_dirs["qwen2"]), "--out", str(tmp_path / "o"), "--method",
                             "moe", "--experts", "4", "--active", "1", "--router-steps", "20", "--calib",
                             str(calib_file), "--calib-samples", "4", "--seq-len", "32", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["method"] == "moe-4e1" and rep["ffn_flops_fraction"] < 0.3
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "o"), "--text", str(calib_file), "--samples", "2",
                             "--seq-len", "32", "--json")
    assert code == 0 and json.loads(out)["perplexity"] > 0, err
    for argv, match in ((["--method", "moe+svd-llm"], "low rank inside the experts"),
                        (["--method", "moe", "--keep", "0.5"], "does not apply"),
                        (["--method", "moe", "--experts", "5"], "do not split")):
        code, out, err = run_cli(capsys, "compress", str(tiny_dirs["qwen2"]), "--out", str(tmp_path / "x"), *argv,
                                 "--calib", str(calib_file), "--calib-samples", "2", "--seq-len", "16")
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_heal_steps(tiny_dirs, calib_file, tmp_path, capsys):
    code, out, err = run_cli(capsys, "compress", str(tiny_dirs["llama"]), "--out", str(tmp_path / "o"), "--method",
                             "moe", "--experts", "4", "--active", "2", "--router-steps", "20", "--calib",
                             str(calib_file), "--calib-samples", "4", "--seq-len", "32", "--heal-steps", "2",
                             "--heal-lr", "1e-4", "--json")
    assert code == 0, err
    assert json.loads(out)["heal"]["steps"] == 2
    model = lz.load(tmp_path / "o")
    assert isinstance(model.model.layers[0].mlp, MoEFFN)
    assert logits(model, torch.randint(5, 500, (1, 8))).isfinite().all()


def test_onnx_export_is_refused(moefied, tmp_path):
    model, *_ = moefied
    with pytest.raises(lz.LayerzipError, match="export the merged model"):
        lz.export_onnx(model, tmp_path / "m.onnx")
