"""Block refinement (--refine-steps): each compressed block fitted on the compressed stream to the original block's
output; only low-rank factors train; exact blocks stay exact; streamed = in memory; defaults and refusals."""
from __future__ import annotations

import json

import pytest
import torch

import layerzip as lz
from layerzip.driver import BlockDriver
from layerzip.errors import LayerzipError
from layerzip.io import load_model
from layerzip.models import find_blocks, select_targets, set_module
from layerzip.nn import FactorizedLayer, LowRankLinear
from layerzip.refine import Refine, rebalance_

from conftest import run_cli, tiny_model
from test_stream import _batches, _output, _rel, sharded  # noqa: F401  (a fixture)


def _error(model, dense, batches, causal) -> float:
    return sum(_rel(_output(model, b, causal), _output(dense, b, causal)) for b in batches)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "bert"])
def test_refinement_brings_the_output_closer_and_trains_only_factors(arch):
    dense = tiny_model(arch)
    causal = arch != "bert"
    batches = _batches(causal)
    errors = {}
    for steps in (0, 32):
        m = tiny_model(arch)
        rep = lz.compress_(m, lz.SVDLLM(keep=0.4, alloc="uniform", fisher=False, refine_steps=steps,
                                        refine_lr=1e-3), calib=batches, progress=False)
        errors[steps] = _error(m, dense, batches, causal)
        if steps:
            ref = rep["refine"]
            assert ref["steps"] == 32 and ref["blocks"] == len(find_blocks(m)[1])
            assert ref["loss_last"] < ref["loss_first"]
            factored = {n for n, mod in m.named_modules() if isinstance(mod, FactorizedLayer)}
            original = dense.state_dict()
            for n, p in m.state_dict().items():
                if n.rpartition(".")[0] not in factored:        # norms, embeddings, heads: untouched
                    assert torch.equal(p, original[n]), n
            assert not any(p.requires_grad for p in m.parameters() if p.grad is not None)
        else:
            assert "refine" not in rep
    assert errors[32] < 0.9 * errors[0], errors


def test_drift_grows_with_the_learning_rate():
    """The report's drift: the factors' relative distance from the (balanced) decomposition's, 0 < drift, larger
    with a larger learning rate."""
    batches = _batches(True)
    drift = {}
    for lr in (1e-4, 1e-3):
        rep = lz.compress_(tiny_model("llama"), lz.SVDLLM(keep=0.4, alloc="uniform", fisher=False, refine_steps=16,
                                                          refine_lr=lr), calib=batches, progress=False)
        drift[lr] = rep["refine"]["drift"]
    assert 0 < drift[1e-4] < drift[1e-3] < 1, drift


def test_rebalance_keeps_the_product():
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 16)
    low = LowRankLinear.from_linear(lin, rank=6)
    with torch.no_grad():
        low.A.mul_(100.0)
        low.B.div_(100.0)
    before = low.to_dense().weight.clone()
    assert rebalance_(low) == 1
    assert torch.allclose(low.to_dense().weight, before, atol=1e-5)
    assert (low.A.norm() / low.B.norm()).item() == pytest.approx(1.0, rel=1e-3)   # balanced: √S on both sides


def test_exact_blocks_stay_exact():
    """Full-rank factors reproduce the block: refinement leaves them bit for bit (Adam would only add noise)."""
    model = tiny_model("llama")
    batches = _batches(True)
    targets = select_targets(model)
    for name, mod in targets.items():
        set_module(model, name, LowRankLinear.from_linear(mod).double().float())
    before = {n: p.clone() for n, p in model.named_parameters()}
    reports = []

    def refine(*args):
        reports.append(Refine(8, 1e-2)(*args))
    BlockDriver(model, batches, progress=False).walk(targets, lambda names, st: None, collect=False, refine=refine)
    assert reports == [{}] * len(find_blocks(model)[1])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("alloc", ["uniform", "global"])
def test_streamed_refinement_equals_in_memory(sharded, alloc, tmp_path):  # noqa: F811
    batches = _batches(True)
    config = lambda: lz.SVDLLM(keep=0.5, alloc=alloc, fisher=False, refine_steps=6, refine_lr=1e-3)  # noqa: E731
    mem = load_model(sharded["llama"]).model
    r_mem = lz.compress_(mem, config(), calib=batches, progress=False)
    lazy = load_model(sharded["llama"], stream=True).model
    r_lazy = lz.compress_(lazy, config(), calib=batches, progress=False)
    assert r_lazy["ranks"] == r_mem["ranks"] and r_mem["refine"]["blocks"] == 2
    assert r_lazy["refine"]["loss_last"] == pytest.approx(r_mem["refine"]["loss_last"], rel=1e-5)
    lz.save(lazy, tmp_path / "o")
    back = lz.load(tmp_path / "o")
    assert _rel(_output(back, batches[0], True), _output(mem, batches[0], True)) < 1e-5


def test_defaults():
    model = tiny_model("llama")
    batches = _batches(True)
    assert lz.SVDLLM(keep=0.5).resolve(model, batches).refine_steps == lz.SVDLLM.REFINE_STEPS > 0
    assert lz.SVDLLM(keep=0.5, sequential=True).resolve(model, batches).refine_steps == 0
    assert lz.SVDLLM(keep=0.5, share=2).resolve(model, batches).refine_steps == 0
    assert lz.SVDLLM(keep=0.5, alloc="global", elastic=True).resolve(model, batches).refine_steps == 0
    assert lz.SVDLLM(keep=0.5).resolve(tiny_model("bert"), _batches(False)).refine_steps == 0    # encoders: opt-in
    assert lz.SVD(keep=0.5).resolve(model).refine_steps == 0           # opt-in for the other low-rank methods
    assert lz.SVD(keep=0.5, refine_steps=4).refine is not None
    assert lz.SVDLLM(keep=0.5, refine_steps=0).refine is None and lz.SVDLLM(keep=0.5).refine is None


@pytest.mark.parametrize("make, words", [
    (lambda: lz.SVDLLM(refine_steps=-1), "--refine-steps"),
    (lambda: lz.SVDLLM(refine_steps=2, refine_lr=0.0), "--refine-lr"),
    (lambda: lz.CUR(refine_steps=4), "no low-rank factors"),
    (lambda: lz.SVDLLM(refine_steps=4, sequential=True), "--sequential"),
    (lambda: lz.SVDLLM(refine_steps=4, alloc="global", elastic=True), "--elastic"),
    (lambda: lz.SVDLLM(refine_steps=4, share=2), "--share"),
])
def test_refusals(make, words):
    with pytest.raises(LayerzipError, match=words):
        make()


def test_cli_refine_flags(tiny_dirs, calib_file, tmp_path, capsys):
    code, out, err = run_cli(capsys, "compress", str(tiny_dirs["llama"]), "--out", str(tmp_path / "a"),
                             "--method", "cur", "--refine-steps", "4", "--calib", str(calib_file))
    assert code == 2 and "no low-rank factors" in err and not (tmp_path / "a").exists()
    code, out, err = run_cli(capsys, "compress", str(tiny_dirs["llama"]), "--out", str(tmp_path / "a"),
                             "--refine-steps", "-1", "--calib", str(calib_file))
    assert code == 2 and "--refine-steps must be" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "compress", str(tiny_dirs["llama"]), "--out", str(tmp_path / "b"),
                             "--refine-steps", "3", "--calib", str(calib_file), "--calib-samples", "4",
                             "--seq-len", "32", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["refine"]["steps"] == 3
    assert json.loads((tmp_path / "b" / "layerzip.json").read_text())["config"]["refine_steps"] == 3
