"""analyze: Block Influence and angular distance against a direct computation; rank measures on known spectra;
the plan respects the budget; the CLI writes analysis.json, plots and report.html."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from layerzip.analyze import make_plan, rank_measures, span_distances

from layerzip.stats import block_similarity
from layerzip.data import builtin_documents, token_batches
from test_depth import cli, deep_tiny


def direct(hidden: list[torch.Tensor], mask: torch.Tensor):
    """cos and arccos/π between every pair of residual states, averaged over the non-padding tokens."""
    H = [h[mask.bool()].double() for h in hidden]
    n = len(H)
    cos = torch.zeros(n, n, dtype=torch.float64)
    ang = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            c = F.cosine_similarity(H[i], H[j], dim=-1).clamp(-1, 1)
            cos[i, j], ang[i, j] = c.mean(), (torch.arccos(c) / math.pi).mean()
    return cos, ang


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_influence_and_angular_match_direct(arch, tokenizer):
    model = deep_tiny(arch, layers=3)
    causal = arch != "bert"
    docs = ["A short line of text."] + builtin_documents("calib", 12)
    batches = token_batches(tokenizer, docs, causal, n_samples=4, seq_len=24, batch_size=4)
    assert causal or (batches[0]["attention_mask"] == 0).any()      # padding present, and must be skipped
    assert len(batches) == 1
    sim = block_similarity(model, batches, progress=False)
    b = batches[0]
    with torch.no_grad():
        hs = model(**b, output_hidden_states=True).hidden_states
    # BERT: hidden_states are exactly x^0..x^L; Llama's last entry is after the final norm, so compare x^0..x^{L-1}
    k = len(hs) if arch == "bert" else len(hs) - 1
    cos, ang = direct(list(hs[:k]), b["attention_mask"])
    got_cos = torch.tensor(sim["cosine"], dtype=torch.float64)[:k, :k]
    got_ang = torch.tensor(sim["angular"], dtype=torch.float64)[:k, :k]
    torch.testing.assert_close(got_cos, cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_ang, ang, rtol=0, atol=1e-6)
    for l in range(k - 1):
        assert sim["influence"][l] == pytest.approx(1 - cos[l, l + 1].item(), abs=1e-6)
    assert len(sim["influence"]) == 3 and len(sim["cosine"]) == 4
    spans = span_distances(sim["angular"])
    assert spans[0][2] == sim["angular"][0][3] and spans[2][1] is None


def test_rank_measures_on_known_spectrum():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    r = rank_measures(s, s)
    p = torch.tensor([0.5, 1 / 3, 1 / 6])
    assert r["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)
    assert r["stable_rank"] == pytest.approx(14 / 9, rel=1e-5)
    # energy 9, 4, 1 of 14: cumulative 0.643, 0.929, 1.0
    assert r["utilized_rank"] == {"90": 2, "95": 3, "99": 3}
    curve = dict(zip(r["loss_curve"]["rank"], r["loss_curve"]["relative_loss"]))
    assert curve[0] == 1.0 and curve[1] == pytest.approx(5 / 14, rel=1e-5) and curve[4] == 0.0


def test_plan_respects_budget():
    torch.manual_seed(0)
    modules = {}
    for l in range(4):
        for kind in ("a", "b"):
            s = torch.linspace(1, 0.01, 16).tolist()
            modules[f"blocks.{l}.{kind}"] = {"block": l, "kind": kind, "shape": [16, 16], "params": 256,
                                             "whitened_spectrum": s}
    angular = [[abs(i - j) * (0.01 if i == 2 or j == 2 else 0.2) for j in range(5)] for i in range(5)]
    influence = [0.3, 0.3, 0.001, 0.3]
    plan = make_plan(modules, influence, angular, keep=0.75)
    assert plan["drop_blocks"] in ([], [2]) and all(len(c["drop_blocks"]) <= 1 for c in plan["candidates"])
    assert plan["drop_blocks"] == [2]     # block 2 barely moves the stream: dropping it is nearly free
    assert make_plan(modules, influence, angular, keep=1.0)["drop_blocks"] == []


@pytest.mark.slow
def test_cli_analyze_writes_report(tokenizer, calib_file, tmp_path, capsys):
    src = tmp_path / "gemma3"
    deep_tiny("gemma3").save_pretrained(src)
    tokenizer.save_pretrained(src)
    code, out, err = cli(capsys, "analyze", src, "--out", tmp_path / "a", "--calib", calib_file,
                         "--calib-samples", 4, "--seq-len", 32, "--keep", 0.6, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["num_blocks"] == 4 and len(summary["block_influence"]) == 4
    doc = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert set(doc["modules"]) and all(m["utilized_rank"]["99"] <= min(m["shape"]) for m in doc["modules"].values())
    html = (tmp_path / "a" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 7 and "http" not in html.replace("http-equiv", "")
    assert len(list((tmp_path / "a").glob("*.png"))) == 7

    code, _, err = cli(capsys, "analyze", src, "--out", tmp_path / "a", "--calib", calib_file)
    assert code == 2 and "not empty" in err
    code, _, err = cli(capsys, "analyze", src, "--out", tmp_path / "b", "--keep", 0, "--calib", calib_file)
    assert code == 2 and "--keep" in err
