"""Embeddings and LM heads as targets: LowRankEmbedding, token-frequency weighting, tied heads staying tied through
compress -> save -> lz.load / native from_pretrained, untied heads, presets, keep_total."""
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn

import layerzip as lz
from layerzip.nn.lowbit import dequantize_groups, quantize_groups
from layerzip.embeddings import token_counts
from layerzip.methods.embedding import (embedding_factors, embedding_gram, embedding_spectrum, token_weights,
                                        weighted_error)
from layerzip.models import count_params, select_targets
from layerzip.nn import LowRankEmbedding, LowRankLinear, ScaledEmbedding, TiedLowRankHead, layer_from_spec

from conftest import run_cli, tiny_model


def batches_for(tokenizer, n=8, seq=32):
    from layerzip.data import builtin_documents
    enc = tokenizer(builtin_documents("calib", limit=n), return_tensors="pt", padding="max_length", truncation=True,
                    max_length=seq)
    return [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("scale", [1.0, 6.93])
def test_full_rank_exact_and_round_trips(scale):
    torch.manual_seed(0)
    emb = nn.Embedding(50, 12, padding_idx=0)
    lr = LowRankEmbedding.from_dense(emb.weight.T, rank=12, padding_idx=0, scale=scale)
    ids = torch.randint(0, 50, (3, 7))
    assert torch.allclose(lr(ids), emb(ids) * scale, atol=1e-5)
    assert lr.num_parameters() == LowRankEmbedding.num_params(50, 12, rank=12) == 12 * 62
    assert lr.flops() == 2 * 12 * 12
    dense = lr.to_dense()
    assert isinstance(dense, ScaledEmbedding if scale != 1 else nn.Embedding)
    assert torch.allclose(dense(ids), lr(ids), atol=1e-5)
    empty = layer_from_spec(json.loads(json.dumps(lr.spec())))
    empty.load_state_dict(lr.state_dict())
    assert torch.equal(empty(ids), lr(ids)) and empty.spec() == lr.spec()


def test_tied_head_shares_factors():
    emb = LowRankEmbedding(40, 8, rank=3)
    head = TiedLowRankHead.of(emb, "embed")
    h = torch.randn(2, 5, 8)
    assert head.A is emb.A and head.B is emb.B
    assert torch.allclose(head(h), h @ emb.table().T, atol=1e-6)
    assert layer_from_spec(head.spec()).tied_to == "embed"


# ------------------------------------------------------------------------------------------------------ the math
def test_frequency_weighting_is_optimal():
    """At equal rank, the weighted SVD has a lower weighted error than the plain SVD (and than random
    perturbations of its factors), and that error is the tail of its spectrum."""
    torch.manual_seed(0)
    V, d, r = 300, 24, 6
    E = torch.randn(V, d, dtype=torch.float64) @ torch.diag(torch.linspace(2, 0.2, d, dtype=torch.float64))
    counts = torch.zeros(V, dtype=torch.float64)
    counts[:40] = torch.randint(1, 200, (40,)).double()          # a few frequent tokens, most never seen
    w = token_weights(counts, V)
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64)) and (w > 0).all()
    for G in (embedding_gram(d, None), embedding_gram(d, (lambda H: H.T @ H)(torch.randn(100, d).double()))):
        A, B = embedding_factors(E, w, G, r)
        ours = weighted_error(E, A @ B, w, G)
        Ap, Bp = lz.nn.truncated_factors(E, r)                       # plain SVD
        assert ours < 0.9 * weighted_error(E, Ap @ Bp, w, G)
        assert ours == pytest.approx(embedding_spectrum(E, w, G)[r:].square().sum().item(), rel=1e-8)
        for _ in range(3):
            dA = 1e-3 * torch.randn_like(A)
            assert ours <= weighted_error(E, (A + dA) @ B, w, G)


def test_token_counts_skip_padding():
    b = {"input_ids": torch.tensor([[1, 2, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    assert token_counts([b], 4).tolist() == [0.0, 1.0, 2.0, 0.0]


# ------------------------------------------------------------------------------------------------- model targets
def test_presets_select_the_pair(tokenizer):
    m = tiny_model("gemma3")
    assert list(select_targets(m, "embeddings")) == ["model.embed_tokens"]
    assert list(select_targets(m, "lm_head")) == ["model.embed_tokens"]          # tied: the pair
    assert list(select_targets(m, "lm_head$")) == ["model.embed_tokens"]         # a regex naming it too
    both = select_targets(m, "blocks,embeddings")
    assert "model.embed_tokens" in both and len(both) == 1 + len(select_targets(m))
    assert list(select_targets(tiny_model("llama"), "lm_head")) == ["lm_head"]    # untied: a Linear
    with pytest.raises(lz.LayerzipError, match="unknown --include preset 'embedings'"):
        select_targets(m, "blocks,embedings")


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])
def test_tied_stays_tied_through_save_load_native(arch, tokenizer, tmp_path):
    model = tiny_model(arch)
    before = count_params(model)
    rep = lz.compress_(model, lz.SVDLLM(keep=0.5, include="blocks,embeddings,lm_head", alloc="uniform",
                                        fisher=False), calib=batches_for(tokenizer), progress=False)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, LowRankEmbedding) and isinstance(head, TiedLowRankHead) and head.A is emb.A
    assert rep["params_after"] == count_params(model) and rep["keep_total"] == pytest.approx(
        rep["params_after"] / before)
    assert rep["ranks"][head.tied_to] == rep["ranks"][[n for n, m in model.named_modules() if m is head][0]]
    ids = torch.randint(0, 1000, (2, 9))
    ref = logits(model, ids)
    lz.save(model, tmp_path / "o", tokenizer=tokenizer)
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        vocab_sized = [k for k in f.keys() if f.get_slice(k).get_shape()[0] == emb.num_embeddings]
    assert len(vocab_sized) == 1                                       # one copy of A on disk
    loaded = lz.load(tmp_path / "o")
    assert loaded.get_output_embeddings().A is loaded.get_input_embeddings().A
    assert count_params(loaded) == rep["params_after"]
    assert torch.allclose(logits(loaded, ids), ref, atol=1e-5)
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert native.get_output_embeddings().A is native.get_input_embeddings().A
    assert (logits(native, ids) - logits(loaded, ids)).abs().max() <= 1e-5
    with pytest.raises(lz.LayerzipError, match="not streamed; pass --no-stream"):
        lz.io.load_model(tmp_path / "o", stream=True)
    lz.merge_(loaded)                                                  # dense and tied again
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert torch.allclose(logits(loaded, ids), ref, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_low_bit_tied_embedding_one_copy_load_and_native(bits, tokenizer, tmp_path):
    """--bits also stores the embedding's factors low-bit, once for the tied pair: on disk vocab×r takes one byte
    (int8) or half a byte (int4) per value; lz.load and native transformers give the same logits, tied again,
    close to the unquantized model's; the model saved is left as it was."""
    model = tiny_model("gemma3")
    lz.compress_(model, lz.SVDLLM(keep=0.5, include="blocks,embeddings", alloc="uniform", fisher=False),
                 calib=batches_for(tokenizer), progress=False)
    emb = model.get_input_embeddings()
    ids = torch.randint(0, 1000, (2, 9))
    ref = logits(model, ids)
    lz.save(model, tmp_path / "o", tokenizer=tokenizer, bits=bits)
    assert type(model.get_input_embeddings()) is LowRankEmbedding and model.get_output_embeddings().A is emb.A
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        vocab_sized = {k: f.get_slice(k).get_shape() for k in f.keys()
                       if f.get_slice(k).get_shape()[0] == emb.num_embeddings}
    assert sorted(k.rsplit(".", 1)[1] for k in vocab_sized) == ["A_q", "A_scale"]     # one copy, low-bit
    q = next(v for k, v in vocab_sized.items() if k.endswith("A_q"))
    assert q == [emb.num_embeddings, emb.rank if bits == 8 else -(-emb.rank // 2)]
    meta = json.loads((tmp_path / "o" / "layerzip.json").read_text())
    assert {meta["modules"][n]["bits"] for n in meta["modules"]} == {bits}
    loaded = lz.load(tmp_path / "o")
    l_emb, l_head = loaded.get_input_embeddings(), loaded.get_output_embeddings()
    assert type(l_emb) is LowRankEmbedding and type(l_head) is TiedLowRankHead and l_head.A is l_emb.A
    for name in ("A", "B"):           # the factors are exactly the round-to-nearest grid values of the originals
        W = getattr(emb, name).detach()
        want = dequantize_groups(*quantize_groups(W, bits), bits, W.shape[1], dtype=W.dtype)
        assert torch.equal(getattr(l_emb, name).detach(), want), name
    got = logits(loaded, ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < {8: 2e-2, 4: 0.6}[bits], rel
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert native.get_output_embeddings().A is native.get_input_embeddings().A
    assert (logits(native, ids) - got).abs().max() <= 1e-5


def test_untied_head_on_llama(tokenizer, tmp_path):
    model = tiny_model("llama")
    rep = lz.compress_(model, lz.SVDLLM(keep=0.5, include="lm_head", alloc="uniform", fisher=False),
                       calib=batches_for(tokenizer), progress=False)
    assert type(model.lm_head) is LowRankLinear and isinstance(model.model.embed_tokens, nn.Embedding)
    assert list(rep["modules"]) == ["lm_head"] and rep["keep_achieved"] <= 0.5
    ids = torch.randint(0, 1000, (2, 9))
    lz.save(model, tmp_path / "o", tokenizer=tokenizer)
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert (logits(native, ids) - logits(model, ids)).abs().max() <= 1e-5


def test_svd_without_calibration_and_refusals(tokenizer):
    model = tiny_model("llama")
    E = model.model.embed_tokens.weight.detach().clone()
    rep = lz.compress_(model, lz.SVD(keep=0.5, include="embeddings"), progress=False)
    A, B = lz.nn.truncated_factors(E.double(), rep["ranks"]["model.embed_tokens"])
    assert torch.allclose(model.model.embed_tokens.table(), (A @ B).float(), atol=1e-5)    # plain SVD
    with pytest.raises(lz.LayerzipError, match="decomposed low rank"):
        lz.compress_(tiny_model("llama"), lz.config_from_dict({"method": "btt", "include": "embeddings"}),
                     progress=False)


def test_cli_keep_total_and_bad_preset(tiny_dirs, calib_file, tmp_path, capsys):
    args = ["compress", str(tiny_dirs["gemma3"]), "--calib", str(calib_file), "--calib-samples", "4",
            "--seq-len", "32", "--keep", "0.5", "--alloc", "uniform", "--json"]
    code, out, err = run_cli(capsys, *args, "--out", str(tmp_path / "bad"), "--include", "blocks,embedings")
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and out == "" and len(lines) == 1 and "unknown --include preset 'embedings'" in lines[0]
    assert not (tmp_path / "bad").exists()
    code, out, err = run_cli(capsys, *args, "--out", str(tmp_path / "ok"), "--include", "blocks,embeddings")
    rep = json.loads(out)
    assert code == 0 and rep["keep_total"] == pytest.approx(rep["params_after"] / rep["params_before"])
    assert rep["keep_total"] < 0.6 and rep["bytes_after"] < 0.6 * rep["bytes_before"]
