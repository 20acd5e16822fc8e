"""Shared bases across blocks (share.py, `--share N|auto`): the math (exact at full rank, optimal for the stacked
whitened loss, the closed-form per-member losses), the model (one B per group in memory and on disk, lz.load and
native loading equal, merge_), auto's choice, and the refusals."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

import layerzip as lz
from layerzip.errors import LayerzipError
from layerzip.io import WEIGHTS, load_model
from layerzip.nn import SharedBasisLinear
from layerzip.methods.svdllm import parse_share
from layerzip.share import Sharing, group_losses, shared_factors
from layerzip.stats import ModuleStats

from conftest import run_cli


def _members(n=3, out=12, inp=10, tokens=200, seed=0, weighted=True):
    """n weights, their input Grams (correlated, different inputs per member) and output row weights."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g, dtype=torch.float64)
    Ws, grams, rows = [], [], []
    for _ in range(n):
        Ws.append(torch.randn(out, inp, generator=g, dtype=torch.float64))
        X = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ (mix + torch.randn(inp, inp, generator=g,
                                                                                              dtype=torch.float64))
        grams.append(X.T @ X)
        rows.append(torch.rand(out, generator=g, dtype=torch.float64) + 0.1 if weighted else None)
    return Ws, grams, rows


def _loss(Ws, grams, rows, As, B, gram_of=None):
    """Σ_i ‖D_i (W_i − A_i B) L‖² with L from member i's Gram (or `gram_of` for all)."""
    total = 0.0
    for W, G, d, A in zip(Ws, grams, rows, As):
        E = W - A @ B
        E = E if d is None else d[:, None] * E
        total += torch.trace(E @ (G if gram_of is None else gram_of) @ E.T).item()
    return total


@pytest.mark.parametrize("weighted", [True, False])
def test_full_rank_is_exact(weighted):
    Ws, grams, rows = _members(weighted=weighted)
    As, B = shared_factors(Ws, grams, rows, rank=10)
    for W, A in zip(Ws, As):
        torch.testing.assert_close(A @ B, W, rtol=1e-9, atol=1e-9)


def test_factors_are_optimal_for_the_stacked_whitened_loss():
    Ws, grams, rows = _members()
    mean = sum(grams) / len(grams)
    rank = 4
    As, B = shared_factors(Ws, grams, rows, rank)
    got = _loss(Ws, grams, rows, As, B, gram_of=mean)
    L = torch.linalg.cholesky(mean)
    S = torch.linalg.svdvals(torch.cat([d[:, None] * W for W, d in zip(Ws, rows)]) @ L)
    assert got == pytest.approx(S[rank:].square().sum().item(), rel=1e-8)       # Eckart–Young bound reached
    # any other basis does worse: member 0's own SVD-LLM basis with each A fitted by least squares
    U, s, Vh = torch.linalg.svd(rows[0][:, None] * Ws[0] @ L)
    B0 = torch.linalg.solve_triangular(L, Vh[:rank], upper=False, left=False)
    A0 = [W @ mean @ B0.T @ torch.linalg.inv(B0 @ mean @ B0.T) for W in Ws]
    assert _loss(Ws, grams, rows, A0, B0, gram_of=mean) > got * 1.01


def test_group_losses_are_each_members_loss_on_its_own_inputs():
    Ws, grams, rows = _members()
    E = group_losses(Ws, grams, rows)
    assert E.shape == (11,) and E[-1] == 0
    for r in (1, 3, 6, 9):
        As, B = shared_factors(Ws, grams, rows, r)
        assert E[r].item() == pytest.approx(_loss(Ws, grams, rows, As, B), rel=1e-7)
    assert E[0].item() == pytest.approx(_loss(Ws, grams, rows, [torch.zeros(12, 1, dtype=torch.float64)] * 3,
                                              torch.zeros(1, 10, dtype=torch.float64)), rel=1e-9)


@pytest.mark.parametrize("bad", ["1", "0", "x", "2.5", 1, True, -3])
def test_bad_share_refused(bad):
    with pytest.raises(LayerzipError, match="--share"):
        parse_share(bad)


def test_share_values():
    assert (parse_share(None), parse_share("auto"), parse_share("AUTO"), parse_share("4"), parse_share(3)) == \
        (None, "auto", "auto", 4, 3)
    assert lz.SVDLLM(share="2").share == 2


@pytest.mark.parametrize("kw", [dict(kfac=True), dict(sequential=True), dict(elastic=True, alloc="global"),
                                dict(objective="latency", alloc="global")])
def test_share_refuses_what_it_cannot_combine_with(kw):
    with pytest.raises(LayerzipError, match="--share"):
        lz.SVDLLM(keep=0.5, share=2, **kw)


def _llama_dir(tmp_path, tokenizer, layers=4, duplicate=False):
    cfg = transformers.LlamaConfig(hidden_size=48, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                                   vocab_size=30528)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if duplicate:                       # every block the same weights (inputs still differ block to block)
        for block in model.model.layers[1:]:
            block.load_state_dict(model.model.layers[0].state_dict())
    d = tmp_path / ("dup" if duplicate else "llama")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _compressed(d, **kw):
    loaded = load_model(d)
    batches = lz.calibration_batches(loaded, "builtin", n_samples=8, seq_len=32, batch_size=4)
    report = lz.compress_(loaded.model, lz.SVDLLM(keep=0.5, **kw), calib=batches, progress=False)
    return loaded, report, batches


def test_shared_model_saves_each_basis_once_and_loads_natively(tmp_path, tokenizer):
    d = _llama_dir(tmp_path, tokenizer)
    loaded, report, _ = _compressed(d, share=2)
    model = loaded.model
    shared = {n: m for n, m in model.named_modules() if isinstance(m, SharedBasisLinear)}
    assert shared and report["share"] == dict.fromkeys(report["share"], 2) and len(report["share"]) == 7
    owners = {m.basis_of for m in shared.values()}
    assert len(owners) * 2 == len(shared)
    for n, m in shared.items():
        assert m.B is model.get_submodule(m.basis_of).B
    assert report["params_after"] == sum(p.numel() for p in model.parameters())
    assert 0.45 < report["keep_achieved"] <= 0.5
    out = tmp_path / "out"
    lz.save(model, out, tokenizer=tokenizer)
    with safe_open(str(out / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    assert {k for k in keys if k.endswith(".B")} == {f"{o}.B" for o in owners}
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        back = lz.load(out)
        native = transformers.AutoModelForCausalLM.from_pretrained(out)
        for other in (back, native):
            torch.testing.assert_close(other(input_ids=ids).logits, want, rtol=0, atol=0)
            members = [m for m in other.modules() if isinstance(m, SharedBasisLinear)]
            assert len({id(m.B) for m in members}) == len(owners)
        from layerzip.heal import rebalance_
        rebalance_(back)                     # healing re-splits a group's A's and its B together
        torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        assert all(m.B is back.get_submodule(m.basis_of).B for m in back.modules() if isinstance(m, SharedBasisLinear))
        lz.merge_(back)
        assert not any(isinstance(m, lz.FactorizedLayer) for m in back.modules())
        torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(LayerzipError, match="--bits 4"):
        lz.save(model, tmp_path / "int4", bits=4)


def test_auto_shares_duplicated_blocks_and_never_loses_to_no_sharing(tmp_path, tokenizer):
    for duplicate in (True, False):
        loaded, report, batches = _compressed(_llama_dir(tmp_path, tokenizer, duplicate=duplicate), share="auto")
        fresh = load_model(_llama_dir(tmp_path, tokenizer, duplicate=duplicate))
        config = lz.SVDLLM(keep=0.5).resolve(fresh.model, batches)
        stats = lz.calibrate(fresh.model, config, batches, progress=False)
        targets = config.targets_of(fresh.model)
        sharing = Sharing(fresh.model, targets, config, stats)
        keep = 0.5 * sum(m.weight.numel() for m in targets.values()) / sum(m.weight.numel() for m in targets.values())
        none = sharing.loss(sharing.groups(dict.fromkeys(sharing.types, 1)), keep)
        chosen = {t: report["share"][t.split(" ")[0]] for t in sharing.types}
        assert sharing.loss(sharing.groups(chosen), keep) <= none
        if duplicate:       # the same weights in every block: one basis serves them all at a fraction of the cost
            assert all(n > 1 for n in report["share"].values()), report["share"]
            assert sharing.loss(sharing.groups(chosen), keep) < 0.5 * none


def test_cli_share_and_its_refusals(tmp_path, tokenizer, capsys, calib_file):
    d = _llama_dir(tmp_path, tokenizer)
    code, out, err = run_cli(capsys, "compress", str(d), "--out", str(tmp_path / "o"), "--keep", "0.5", "--share",
                             "2", "--calib-samples", "8", "--seq-len", "32", "--json")
    assert code == 0, err
    assert json.loads(out)["keep_achieved"] <= 0.5
    assert json.loads((tmp_path / "o" / "layerzip.json").read_text())["share"]["mlp.up_proj"] == 2
    ppl = {}
    for how in ("--stream", "--no-stream"):        # a streamed read ties each member to its basis too
        code, out, err = run_cli(capsys, "eval", str(tmp_path / "o"), how, "--text", str(calib_file), "--json")
        assert code == 0, err
        ppl[how] = json.loads(out)["perplexity"]
    assert ppl["--stream"] == pytest.approx(ppl["--no-stream"], rel=1e-4)
    for extra, what in [(["--share", "1"], "--share"), (["--share", "2", "--stream"], "--no-stream"),
                        (["--share", "2", "--budget-bytes", "1e6"], "--share")]:
        code, out, err = run_cli(capsys, "compress", str(d), "--out", str(tmp_path / "x"), "--keep", "0.5", *extra,
                                 "--calib-samples", "8", "--seq-len", "32")
        assert code == 2 and what in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()
