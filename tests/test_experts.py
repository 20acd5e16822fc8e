"""An MoE model's fused experts (transformers' 3-D gate_up_proj / down_proj) as targets (nn/experts.py): the split
form computes what the fused one does, each expert's projections are factorized on the tokens routed to it, experts
no token reaches stay dense, bases shared across the experts of a layer (`--share`), and the compressed model saves
and loads (layerzip and native transformers) with the split form only where something was factorized."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

import layerzip as lz
from layerzip.io import WEIGHTS
from layerzip.nn import SharedBasisLinear, SplitExperts, join_experts_, split_experts_

from conftest import run_cli

COMMON = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, num_experts_per_tok=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
              pad_token_id=0)
MOE = {
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(num_experts=8, moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=32, **COMMON),
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=8, **COMMON),
    "olmoe": lambda: transformers.OlmoeConfig(num_experts=8, **COMMON),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(num_experts=8, moe_intermediate_size=32, **COMMON),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        n_routed_experts=8, moe_intermediate_size=32, first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, **COMMON),
    "granitemoe": lambda: transformers.GraniteMoeConfig(num_local_experts=8, **COMMON),
}


def moe_model(arch="qwen2_moe", seed=0):
    config = MOE[arch]()
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, 128, (2, 32), generator=g),
             "attention_mask": torch.ones(2, 32, dtype=torch.long)} for _ in range(n)]


def copy_of(model):
    new = transformers.AutoModelForCausalLM.from_config(model.config).eval()
    new.load_state_dict(model.state_dict())
    return new


TEST = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("arch", list(MOE))
def test_split_computes_the_fused_experts_and_joins_back_exactly(arch):
    model = moe_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(TEST).logits
    fused = split_experts_(model)
    moe = "block_sparse_moe" if arch == "granitemoe" else "mlp"
    assert sorted(fused) == [f"model.layers.{l}.{moe}.experts" for l in (0, 1)]
    assert all(isinstance(model.get_submodule(n), SplitExperts) for n in fused)
    torch.testing.assert_close(model(TEST).logits, ref, atol=1e-5, rtol=1e-5)
    join_experts_(model, fused)
    joined = model.get_submodule(f"model.layers.0.{moe}.experts")
    assert type(joined).__name__.endswith("Experts") and not isinstance(joined, SplitExperts)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and before.keys() == \
        model.state_dict().keys()


def test_other_layouts_stay_fused():
    """gpt-oss keeps its experts transposed, with biases and a clamped activation: not the default layout."""
    config = transformers.GptOssConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, vocab_size=128, num_local_experts=4,
                                       num_experts_per_tok=2, layer_types=["full_attention"])
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert split_experts_(model) == {}


@pytest.mark.parametrize("kind", ["plain", "bits8", "elastic"])
def test_compressed_experts_save_and_load_natively(tmp_path, kind):
    model = moe_model()
    report = lz.compress_(model, lz.SVDLLM(keep=0.5, elastic=kind == "elastic"), calib=batches(), progress=False)
    names = list(report["modules"])
    assert names.index("model.layers.0.mlp.experts") < names.index("model.layers.0.mlp.experts.gate_up.0")
    assert report["modules"]["model.layers.0.mlp.experts"]["type"] == "experts"
    assert any(".experts.gate_up." in n and r is not None for n, r in report["ranks"].items())
    assert abs(report["keep_achieved"] - 0.5) < 0.02
    lz.save(model, tmp_path / "out", bits=8 if kind == "bits8" else 16)
    out = model(TEST).logits
    back = lz.load(tmp_path / "out")(TEST).logits
    torch.testing.assert_close(back, out, **({"atol": 0.05, "rtol": 0} if kind == "bits8" else {}))
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(native.model.layers[0].mlp.experts, SplitExperts)
    torch.testing.assert_close(native(TEST).logits, back)


def test_nothing_factorized_keeps_the_fused_layout(tmp_path):
    model = moe_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = lz.compress_(model, lz.SVDLLM(keep=0.5, include=r".*self_attn\..*"), calib=batches(), progress=False)
    assert report["factorized"] > 0 and not any("experts" in n for n in report["modules"])
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen2MoeExperts"
    experts = {k: v for k, v in model.state_dict().items() if ".experts." in k}
    assert experts.keys() == {k for k in state if ".experts." in k}
    assert all(torch.equal(v, state[k]) for k, v in experts.items())


def _route_around(model, expert):
    """Every router of `model` picks its top-k among the other experts (a forward hook on the router)."""
    def hook(mod, args, out):
        logits = out[0].clone()
        logits[:, expert] = float("-inf")
        probs = logits.softmax(-1)
        top, index = probs.topk(mod.top_k, dim=-1)
        return out[0], top / top.sum(-1, keepdim=True), index
    return [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]


def test_experts_no_token_reaches_stay_dense(tmp_path):
    model = moe_model()
    _route_around(model, 7)
    report = lz.compress_(model, lz.SVDLLM(keep=0.5), calib=batches(), progress=False)
    unrouted = {f"model.layers.{l}.mlp.experts.{p}.7" for l in (0, 1) for p in ("gate_up", "down")}
    assert set(report["unrouted_experts"]) == unrouted
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in unrouted)
    assert unrouted.isdisjoint(report["ranks"])
    assert isinstance(model.get_submodule("model.layers.0.mlp.experts.gate_up.6"), lz.nn.LowRankLinear)


def _shared_input_experts(model, rank=16, noise=1e-3, kinds=1):
    """Every expert's gate_up of a layer is A_e B_k for one of `kinds` bases B_k (rank × hidden) of that layer
    (expert e takes B_{e mod kinds}), plus a little noise."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            gu = layer.mlp.experts.gate_up_proj
            Bs = [torch.randn(rank, gu.shape[2], generator=g) for _ in range(kinds)]
            for e in range(gu.shape[0]):
                gu[e] = (torch.randn(gu.shape[1], rank, generator=g) @ Bs[e % kinds] / rank ** 0.5
                         + noise * torch.randn(gu.shape[1:], generator=g))
    return model


def test_share_gives_the_experts_of_a_layer_one_basis(tmp_path):
    """Experts whose gate_up rows span one subspace: `--share auto` groups all of a layer's experts, which stores
    that basis once and fits them far better than each expert's own factors at the same parameters (at keep 0.29 an
    expert's own rank is 9 of the 16 it needs, groups of 4 get 14, all 8 experts 16)."""
    model = _shared_input_experts(moe_model())
    ref = model(TEST).logits
    cal = batches()
    errors, keeps = {}, {}
    for share in (None, "auto"):
        m = copy_of(model)
        report = lz.compress_(m, lz.SVDLLM(keep=0.29, share=share, alloc="uniform",
                                                          include=r".*experts\.gate_up\..*"), calib=cal, progress=False)
        errors[share], keeps[share] = (m(TEST).logits - ref).norm().item(), report["keep_achieved"]
        if share:
            assert report["share"]["model.layers.0.mlp.experts.gate_up"] == 8
            gate_up = m.model.layers[0].mlp.experts.gate_up
            assert all(isinstance(x, SharedBasisLinear) and x.B is gate_up[0].B for x in gate_up)
            lz.save(m, tmp_path / "shared")
            with safe_open(str(tmp_path / "shared" / WEIGHTS), "pt") as f:
                assert sum(k.startswith("model.layers.0.mlp.experts.gate_up.") and k.endswith(".B")
                           for k in f.keys()) == 1
            native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "shared")
            torch.testing.assert_close(native(TEST).logits, m(TEST).logits)
    assert abs(keeps["auto"] - keeps[None]) < 0.03
    assert errors["auto"] < 0.5 * errors[None]


def test_share_groups_the_experts_that_share_a_basis(monkeypatch):
    """Even and odd experts built on two different bases: `--share 4` groups {0, 2, 4, 6} and {1, 3, 5, 7} (by
    their whitened weights' overlap), which fits far better than groups of consecutive experts."""
    from layerzip.share import Sharing, chunk
    model = _shared_input_experts(moe_model(), rank=12, kinds=2)
    ref, cal = model(TEST).logits, batches()
    config = lambda: lz.SVDLLM(keep=0.35, share=4, alloc="uniform", include=r".*experts\.gate_up\..*")  # noqa: E731
    m = copy_of(model)
    lz.compress_(m, config(), calib=cal, progress=False)
    owners = [x.basis_of.rpartition(".")[2] for x in m.model.layers[0].mlp.experts.gate_up]
    assert owners == ["0", "1"] * 4
    similar = (m(TEST).logits - ref).norm().item()
    monkeypatch.setattr(Sharing, "similar", lambda self, t, n: chunk(self.types[t], n))
    m = copy_of(model)
    lz.compress_(m, config(), calib=cal, progress=False)
    assert [x.basis_of.rpartition(".")[2] for x in m.model.layers[0].mlp.experts.gate_up] == ["0"] * 4 + ["4"] * 4
    assert similar < 0.5 * (m(TEST).logits - ref).norm().item()


def test_cli_compresses_an_moe_directory(tmp_path, capsys, tokenizer, calib_file):
    src = tmp_path / "moe"
    model = moe_model()
    model.config.vocab_size = tokenizer.vocab_size       # the MiniLM tokenizer's ids must fit the embedding
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    code, out, err = run_cli(capsys, "compress", str(src), "--out", str(tmp_path / "out"), "--method", "svd-llm",
                             "--keep", "0.6", "--calib", str(calib_file), "--calib-samples", "8", "--seq-len", "32", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert "heal" in report and report["factorized"] > 0
    assert bool(report.get("unrouted_experts")) == any("saw no calibration token" in w for w in report["warnings"])
    meta = json.loads((tmp_path / "out" / "layerzip.json").read_text())
    assert meta["modules"]["model.layers.0.mlp.experts"]["type"] == "experts"
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(native.model.layers[1].mlp.experts, SplitExperts)
    assert torch.isfinite(native(TEST).logits).all()


@pytest.mark.parametrize("alloc,writer", [("global", "transformers"), ("uniform", "transformers"),
                                          ("global", "layerzip")])
def test_streamed_experts_equal_in_memory(tmp_path, alloc, writer):
    """A streamed MoE checkpoint: the skeleton's experts split on the meta device, each expert's weight read from
    the file (transformers writes a module per expert: gate and up concatenated; layerzip the fused tensors: a
    slice); same ranks as in memory, and the saved shards load to the same model."""
    from layerzip.io import load_model
    if writer == "transformers":
        moe_model().save_pretrained(tmp_path / "src", max_shard_size="100KB")
    else:
        lz.save(moe_model(), tmp_path / "src")
    config = lambda: lz.SVDLLM(keep=0.5, alloc=alloc)     # noqa: E731
    mem = load_model(tmp_path / "src").model
    r_mem = lz.compress_(mem, config(), calib=batches(), progress=False)
    lazy = load_model(tmp_path / "src", stream=True).model
    r_lazy = lz.compress_(lazy, config(), calib=batches(), progress=False)
    assert r_lazy["ranks"] == r_mem["ranks"] and r_lazy.get("unrouted_experts") == r_mem.get("unrouted_experts")
    lz.save(lazy, tmp_path / "o")
    back = lz.load(tmp_path / "o")
    assert set(back.state_dict()) == set(mem.state_dict())
    torch.testing.assert_close(back(TEST).logits, mem(TEST).logits, atol=1e-5, rtol=1e-5)


def test_streaming_decision_counts_every_experts_statistics(tmp_path):
    """Each expert's two Grams (hidden², its intermediate²) join the dense estimate: Qwen1.5-MoE-A2.7B's shapes
    (24 blocks, 60 experts, hidden 2048, expert intermediate 1408) add ≈ 71 GB of float64 Grams to the 8.5 GB of
    the dense estimate."""
    from layerzip.io import statistics_bytes
    shapes = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24)
    (tmp_path / "config.json").write_text(json.dumps(shapes))
    dense = statistics_bytes(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**shapes, "num_experts": 60, "moe_intermediate_size": 1408}))
    moe = statistics_bytes(tmp_path)
    assert dense == 24 * 8 * (3 * 2048 ** 2 + 5632 ** 2)
    assert moe - dense == 24 * 8 * 60 * (2048 ** 2 + 1408 ** 2) and moe - dense > 70e9


def test_flops_count_each_expert_on_its_own_tokens():
    """evaluate.flops counts a factorized expert only for the tokens routed to it (2 × its weights each), not the
    SplitExperts module for every token."""
    from layerzip.evaluate import flops
    model = moe_model()
    lz.compress_(model, lz.SVD(keep=0.5, include=r".*experts\..*"), progress=False)
    experts = [m for n, m in model.named_modules() if ".experts." in n and isinstance(m, lz.nn.LowRankLinear)]
    assert len(experts) == 2 * 2 * 8                  # every expert's gate_up and down factorized
    rows = []
    handles = [m.register_forward_hook(lambda mod, a, o: rows.append(
        2 * sum(p.numel() for p in mod.parameters() if p.dim() > 1) * a[0].shape[0])) for m in experts]
    counted = flops(model, seq_len=16)
    for h in handles:
        h.remove()
    assert counted["flops_per_token_factorized"] * 16 == pytest.approx(sum(rows))


@pytest.mark.parametrize("compressed", [False, True])
def test_onnx_export_refuses_moe_models(tmp_path, compressed):
    """Routing is data-dependent: a trace would freeze one routing, so export refuses, fused or split."""
    pytest.importorskip("onnx")
    from layerzip.errors import LayerzipError
    model = moe_model()
    if compressed:
        lz.compress_(model, lz.SVD(keep=0.5), progress=False)
    with pytest.raises(LayerzipError, match="ONNX export of MoE models is not supported"):
        lz.export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_analyze_reads_every_expert_and_leaves_the_model_fused():
    from layerzip.analyze import analyze
    model = moe_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    doc = analyze(model, batches(), keep=0.5, progress=False)
    assert {f"model.layers.{l}.mlp.experts.{p}.{e}" for l in (0, 1) for p in ("gate_up", "down") for e in range(8)} \
        <= set(doc["modules"])
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen2MoeExperts"
    assert model.state_dict().keys() == state.keys() and all(torch.equal(v, state[k])
                                                             for k, v in model.state_dict().items())
