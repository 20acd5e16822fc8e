"""Smoke run of the benchmark harness on tiny random-weight models (not a timed test: it checks the plumbing)."""
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERZIP_BENCH_RESULTS", str(tmp_path))
    monkeypatch.syspath_prepend(str(BENCH))
    for m in ("common", "quality", "speed", "latency", "run_all"):
        sys.modules.pop(m, None)
    import common
    return common


def test_harness_smoke(bench, tmp_path):
    import latency
    import quality
    import run_all
    torch.set_num_threads(1)
    tiny = bench.benches(quick=True)
    for b in tiny:
        b.keeps = (0.5, 0.8)
    bert, gemma = tiny
    res = quality.run_model(bert, ["svd", "svd-llm"], progress=False)
    assert {r["method"] for r in res["rows"]} == {"svd", "svd-llm"}
    assert all("error" not in r and 0 <= r["recall_at_1"] <= 1 for r in res["rows"])
    fresh = [r["timing"] for r in res["rows"] if "timing" in r]
    assert len(fresh) == 2 and all(t["ratio_to_limit"] > 0 for t in fresh)
    bench.write_json("quality_tiny-bert", res)
    quality.plot(res)
    gemma.keeps = (0.5,)
    lat = latency.run_model(gemma, threads=1, progress=False)
    r = lat["rows"][0]
    assert r["flop_bound"] > 1 and r["latency_ms_batch1"] > 0 and lat["dense"]["flops_per_token_lm_head"] > 0
    bench.write_json("latency_tiny-gemma", lat)
    md = run_all.write_benchmarks_md(tmp_path, tmp_path / "BENCHMARKS.md")
    text = md.read_text()
    assert "svd-llm" in text and "FLOP bound" in text and (tmp_path / "quality_tiny-bert.png").is_file()
    json.loads((tmp_path / "quality_tiny-bert.json").read_text())


def test_retrieval_metrics_and_flops():
    from layerzip.evaluate import retrieval_metrics
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    d = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 1.0]])      # right docs ranked 2nd, 3rd, 1st
    m = retrieval_metrics(q, d)
    assert m["recall_at_1"] == pytest.approx(1 / 3) and m["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    # FLOPs of a tiny Llama (hidden 48, 4 heads of 12, 2 KV heads, FFN 96, 2 blocks): linear, attention and head
    # per token as their formulas give them; a rank-4 layer then costs 2·4·(48 + 48) instead of 2·48·48
    from conftest import VOCAB, tiny_model
    from layerzip.evaluate import flops
    from layerzip.models import set_module
    from layerzip.nn import LowRankLinear
    model, t = tiny_model("llama"), 8
    f = flops(model, seq_len=t)
    per_block = 2 * (48 * 48 + 2 * 48 * 24 + 48 * 48 + 3 * 48 * 96)        # q, k, v, o, gate, up, down
    assert f["flops_per_token_linear"] == 2 * per_block
    assert f["flops_per_token_lm_head"] == 2 * 48 * VOCAB
    assert f["flops_per_token_attention"] == 2 * 4 * 4 * 12 * (t + 1) / 2    # QKᵀ and AV over the causal context
    q = "model.layers.0.self_attn.q_proj"
    set_module(model, q, LowRankLinear.from_linear(model.get_submodule(q), rank=4))
    g = flops(model, seq_len=t)
    assert g["flops_per_token_factorized"] == 2 * 4 * (48 + 48)
    assert g["flops_per_token_linear"] == f["flops_per_token_linear"] - 2 * 48 * 48


def test_cli_eval_retrieval_and_latency(bench, tmp_path, capsys):
    from layerzip.cli import main
    tiny = bench.tiny_model("bert")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"query": f"topic {i}", "doc": f"text about topic {i} and more"})
                               for i in range(4)))
    main(["eval", tiny, "--retrieval", str(pairs), "--latency", "--latency-seq-len", "8", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("recall_at_1", "mrr", "latency_ms_batch1", "latency_ms_batch16", "flops_per_token", "params"):
        assert key in out
    assert 0 <= out["recall_at_1"] <= 1 and out["flops_per_token"] > 0


def test_builtin_pairs_are_held_out():
    from layerzip.data import builtin_documents, builtin_pairs
    pairs = builtin_pairs(200)
    assert len(pairs) == 200 and all(p["query"].endswith(".") and len(p["doc"]) >= 80 for p in pairs)
    calib = set(builtin_documents("calib"))
    assert not any(f"{p['query']} {p['doc']}" in calib for p in pairs)


def test_experts_speed_harness(bench):
    """bench/experts_speed.py --quick: every variant timed at decode and prefill, its rows rendered (no speed is
    asserted: benchmarks are not tests)."""
    import experts_speed
    res = experts_speed.main(["--quick", "--repeats", "1", "--keeps", "0.5"])
    assert [(r["tokens"], r["variant"]) for r in res["rows"]] == [(t, v) for t in (1, 512)
                                                                  for v in ("fused", "split", "keep 0.5")]
    assert all(r["ms"] > 0 for r in res["rows"]) and res["rows"][2]["ranks"]
    assert len(experts_speed.markdown(res)) == 4 + len(res["rows"]) + 1
