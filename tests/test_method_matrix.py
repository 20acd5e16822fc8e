"""The shared test matrix: one row per registered method. Adding a method = its file in methods/ + one row here.

Every row is checked for: compress -> forward -> save -> load on a causal LM and an encoder (identical outputs after
loading, parameter budget met), the JSON round trip of its config, and, for low-rank methods, exact reconstruction
at full rank from real statistics."""
import pytest
import torch

import layerzip as lz
from layerzip.stats import ModuleStats, FisherStats

from conftest import tiny_model

# name: (config options, kind) — kind "lowrank": factors(W, stats, rank) exact at full rank, keep met within 1%;
# "structured": one projected layer per target, ≤ keep; "depth": removes blocks; "conv": convolutions only (these
# language models have none, so they are refused in one line; tests/test_conv.py runs them on CNNs and a ResNet);
# "moe": FFNs split into experts, every weight kept (the tiny BERT's FFN spans two modules: refused in one line)
ROWS = {
    "svd": ({}, "lowrank"),
    "asvd": ({"alpha": 0.5}, "lowrank"),
    "svd-llm": ({}, "lowrank"),
    "cur": ({}, "lowrank"),
    "fwsvd": ({}, "lowrank"),
    "btt": ({}, "structured"),
    "monarch": ({}, "structured"),
    "kronecker": ({}, "structured"),
    "hadamard": ({}, "structured"),
    "blast": ({}, "structured"),
    "tt": ({}, "structured"),
    "drop-blocks": ({"blocks": 1}, "depth"),
    "conv-svd": ({}, "conv"),
    "tucker2": ({}, "conv"),
    "cp": ({}, "conv"),
    "spatial-svd": ({}, "conv"),
    "moe": ({"experts": 2, "active": 1, "keep": 1.0, "router_steps": 10}, "moe"),
}


def test_every_registered_method_has_a_row():
    assert set(lz.METHODS) == set(ROWS), "add a row to ROWS for every new method"


def batches():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(100, 1000, (4, 16), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("name", list(ROWS))
def test_compress_save_load(name, arch, tmp_path):
    options, kind = ROWS[name]
    model = tiny_model(arch)
    if kind == "depth":                       # something to drop: 3 blocks
        from conftest import TINY
        config, cls = TINY[arch]()
        config.num_hidden_layers = 3
        torch.manual_seed(0)
        model = cls(config).eval()
    cfg = lz.config_from_dict({"method": name, "keep": 0.5, **options})
    assert lz.config_from_dict(cfg.to_dict()) == cfg
    calib = batches()
    if kind == "conv" or kind == "moe" and arch == "bert":
        with pytest.raises(lz.LayerzipError, match="no convolution" if kind == "conv" else "no feed-forward"):
            lz.compress_(model, cfg, calib=calib, progress=False)
        return
    rep = lz.compress_(model, cfg, calib=calib, progress=False)
    keep = rep["keep_achieved"]
    if kind == "lowrank":
        assert abs(keep - 0.5) <= 0.01 * 0.5 and rep["factorized"] > 0
    elif kind == "moe":
        assert 1 < keep < 1.05 and rep["factorized"] == rep["targets"] == 2
    elif kind == "structured":
        assert 0 < keep <= 0.5 + 1e-9 and rep["factorized"] == rep["targets"]
    else:
        assert len(rep["dropped_blocks"]) == 1
    ids = calib[0]["input_ids"][:2]
    out = outputs(model, ids)
    assert torch.isfinite(out).all()
    lz.save(model, tmp_path / "m")
    torch.testing.assert_close(outputs(lz.load(tmp_path / "m"), ids), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n, (_, kind) in ROWS.items() if kind == "lowrank"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_full_rank_is_exact(name, shape):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    X = torch.randn(200, shape[1], generator=g, dtype=torch.float64) @ torch.randn(shape[1], shape[1], generator=g,
                                                                                   dtype=torch.float64)
    st = ModuleStats(shape[1])
    st.add(X)
    stats = FisherStats(torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.1, st)
    cfg = lz.config_from_dict({"method": name, **ROWS[name][0]})
    if name == "svd-llm":
        cfg = lz.SVDLLM(alloc="uniform", fisher=True)      # the row-weighted variant: exact too
    A, B = cfg.factors(W, stats, min(shape))
    torch.testing.assert_close(A @ B, W, rtol=1e-8, atol=1e-8)


def test_method_registered_twice_is_refused():
    from dataclasses import dataclass

    with pytest.raises(ValueError, match="registered twice"):
        @lz.register_method("svd")
        @dataclass
        class AnotherSVD(lz.SVD):
            pass
    assert lz.METHODS["svd"] is lz.SVD
    with pytest.raises(lz.LayerzipError, match="unknown method 'nope'; choose one of"):
        lz.config_from_dict({"method": "nope"})
