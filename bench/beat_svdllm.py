"""Beat uniform SVD-LLM at equal parameters (issue 4): global allocation, output-Fisher weighting, sequential
calibration, closed-form correction, on MiniLM (retrieval Recall@1 / MRR, embedding cosine) and Gemma-3-270M
(perplexity). (CUR, FWSVD, ASVD and SVD at every keep are in the quality grid, bench/quality.py.)

    python bench/beat_svdllm.py                     # everything (≈ 2 h on one thread), then --report
    python bench/beat_svdllm.py --model minilm [--calib-docs 512] [--keeps 0.5] [--only "+ global alloc"]
    python bench/beat_svdllm.py --report            # merged JSON, plots, tables in BEAT_SVDLLM.md

Every row is one compress_ run from the same calibration batches, measured against the same dense model.
MiniLM: calibration = 64 built-in docstrings (the CLI's default) or 512; evaluation = 128 python-docs paragraphs
(cosine) and 500 section-title -> section-body pairs (retrieval, bench/data.py), never seen in calibration.
Gemma: calibration = 16 windows × 256 tokens of python-docs calib paragraphs; perplexity on 8 windows × 512 tokens of
the eval paragraphs, BOS first in every window.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402

import layerzip as lz  # noqa: E402
from layerzip.data import load_documents, token_batches  # noqa: E402
from layerzip import config_from_dict  # noqa: E402
from layerzip.evaluate import embed, mean_cosine, perplexity  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEEPS = (0.8, 0.6, 0.5)
SVDLLM_VARIANTS = {      # name -> options of the svd-llm method, all explicit (its defaults depend on the model)
    "svd-llm uniform": dict(alloc="uniform", fisher=False, sequential=False, correct=False),
    "+ global alloc": dict(alloc="global", fisher=False, sequential=False, correct=False),
    "+ sequential": dict(alloc="uniform", fisher=False, sequential=True, correct=False),
    "+ sequential + correct": dict(alloc="uniform", fisher=False, sequential=True, correct=True),
    "global + sequential + correct": dict(alloc="global", fisher=False, sequential=True, correct=True),
    "+ fisher": dict(alloc="uniform", fisher=True),
    "+ fisher + global alloc": dict(alloc="global", fisher=True),
    "fisher global + sequential + correct": dict(alloc="global", fisher=True, sequential=True, correct=True),
    "+ fisher + sequential + correct": dict(alloc="uniform", fisher=True, sequential=True, correct=True),
}
SKIP = {"gemma": {"+ sequential", "+ fisher + sequential + correct"},   # CPU time: the rows that decide
        "minilm": {"+ sequential", "global + sequential + correct", "fisher global + sequential + correct"}}
MORE_DATA = ("svd-llm uniform", "+ global alloc", "+ fisher + global alloc")   # MiniLM rows also run @512 docs
# cur, fwsvd, svd, asvd at every keep: the quality grid (bench/quality.py)


def minilm_setup(n_eval=128, n_pairs=500, calib_docs=64):
    L = lz.load_model("minilm")
    calib = token_batches(L.tokenizer, load_documents("builtin", calib_docs), False, calib_docs, 256)
    texts = data.eval_texts(n_eval)
    pairs = data.retrieval_pairs(n_pairs)

    def measure(model, ref_cache={}):
        emb = lambda t, n=256: embed(model, L.tokenizer, t, seq_len=n, progress=False)
        e, q, d = emb(texts), emb([p["query"] for p in pairs], 64), emb([p["doc"] for p in pairs], 128)
        if "e" not in ref_cache:
            ref_cache["e"] = e
        sim = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T
        rank = (sim > sim.diagonal()[:, None]).sum(1)            # 0 = the right doc ranks first
        return {"cosine": mean_cosine(e, ref_cache["e"]), "recall@1": (rank == 0).float().mean().item(),
                "mrr": (1.0 / (rank + 1).float()).mean().item()}
    return L, calib, measure


def gemma_setup():
    L = lz.load_model(str(data.gemma_dir()))
    calib = token_batches(L.tokenizer, data.calib_texts(400), True, 16, 256, batch_size=4)
    texts = data.eval_texts(400)

    def measure(model):
        return {"perplexity": perplexity(model, L.tokenizer, texts, 512, 8, progress=False)}
    return L, calib, measure


def run(model_name: str, only: list[str] | None, keeps=KEEPS, threads: int = 1, calib_docs: int | None = None):
    """`calib_docs` (MiniLM): calibration documents instead of the default 64; rows are named "... @N docs"."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    L, calib, measure = (minilm_setup(calib_docs=calib_docs or 64) if model_name == "minilm" else gemma_setup())
    suffix = f" @{calib_docs} docs" if calib_docs else ""
    out_path = RESULTS / f"beat_svdllm_{model_name}.json"
    res = json.loads(out_path.read_text()) if out_path.exists() else {"model": model_name, "rows": []}
    res["dense"] = measure(L.model)
    print(json.dumps({"dense": res["dense"]}), flush=True)
    plan = [(n, {"method": "svd-llm", **o}) for n, o in SVDLLM_VARIANTS.items()]
    for keep in keeps:
        for name, opts in plan:
            if (only and name not in only) or name in SKIP[model_name]:
                continue
            m = copy.deepcopy(L.model)
            t = time.perf_counter()
            rep = lz.compress_(m, config_from_dict({**opts, "keep": keep}), calib=calib, progress=False)
            row = {"name": name + suffix, "keep": keep, "config": rep["config"], "keep_achieved": rep["keep_achieved"],
                   "seconds": time.perf_counter() - t, **measure(m),
                   "ranks": rep["ranks"], "shapes": {n: list(s) for n, s in _shapes(L.model, rep["ranks"]).items()}}
            res["rows"] = [r for r in res["rows"] if (r["name"], r["keep"]) != (row["name"], keep)] + [row]
            print(json.dumps({k: v for k, v in row.items() if k not in ("ranks", "shapes", "config")}), flush=True)
            out_path.write_text(json.dumps(res, indent=1))
            del m


def _shapes(model, ranks):
    from layerzip.models import linear_shape
    return {n: linear_shape(model.get_submodule(n)) for n in ranks}


def tables_md(merged: dict) -> str:
    """One markdown table per model: every setting × keep, with the share of uniform SVD-LLM's gap to dense closed
    (left out where that gap is under 3% of the dense value: a ratio of noise)."""
    out = []
    for m, res in merged.items():
        metrics = ["recall@1", "mrr", "cosine"] if m == "minilm" else ["perplexity"]
        main = metrics[0]
        dense = res["dense"]
        out += [f"**{m}** (dense: " + ", ".join(f"{k} {dense[k]:.4g}" for k in metrics) + ")", "",
                "| keep | setting | keep achieved | " + " | ".join(metrics) + f" | gap closed ({main}) | compress s |",
                "|---" * (len(metrics) + 5) + "|"]
        for keep in sorted({r["keep"] for r in res["rows"]}, reverse=True):
            rows = [r for r in res["rows"] if r["keep"] == keep]
            base = {r["name"].replace("svd-llm uniform", ""): r for r in rows if r["name"].startswith("svd-llm uniform")}
            for r in rows:
                suffix = r["name"][r["name"].find(" @"):] if " @" in r["name"] else ""
                ref = base.get(suffix)
                gap = "–"
                if ref is not None and r is not ref and abs(dense[main] - ref[main]) >= 0.03 * abs(dense[main]):
                    gap = f"{(r[main] - ref[main]) / (dense[main] - ref[main]):+.0%}"
                out.append(f"| {keep} | {r['name']} | {r['keep_achieved']:.4f} | "
                           + " | ".join(f"{r[k]:.4g}" for k in metrics) + f" | {gap} | {r['seconds']:.0f} |")
        out.append("")
    return "\n".join(out)


def write_tables(merged: dict, doc=Path(__file__).resolve().parent / "BEAT_SVDLLM.md"):
    """Replace the text between the table markers of BEAT_SVDLLM.md by the tables of `merged`."""
    text = doc.read_text()
    a, b = "<!-- tables: generated by beat_svdllm.py --report -->", "<!-- /tables -->"
    if a in text and b in text:
        doc.write_text(text[:text.index(a) + len(a)] + "\n" + tables_md(merged) + text[text.index(b):])


def report():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merged = {}
    for name in ("minilm", "gemma"):
        p = RESULTS / f"beat_svdllm_{name}.json"
        if p.exists():
            merged[name] = json.loads(p.read_text())
    slim = {k: {**v, "rows": [{kk: vv for kk, vv in r.items() if kk not in ("shapes",)} for r in v["rows"]]}
            for k, v in merged.items()}
    (RESULTS / "beat_svdllm.json").write_text(json.dumps(slim, indent=1))
    write_tables(merged)
    metrics = [("minilm", "recall@1"), ("minilm", "cosine"), ("gemma", "perplexity")]
    metrics = [(m, k) for m, k in metrics if m in merged]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2))
    for ax, (m, k) in zip(axes if len(metrics) > 1 else [axes], metrics):
        rows = merged[m]["rows"]
        for name in dict.fromkeys(r["name"] for r in rows):
            pts = sorted((r["keep_achieved"], r[k]) for r in rows if r["name"] == name)
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(merged[m]["dense"][k], color="k", ls="--", lw=0.8, label="dense")
        ax.set_xlabel("keep achieved (targeted params)")
        ax.set_title(f"{m}: {k}")
        if k == "perplexity":
            ax.set_yscale("log")
    axes_list = axes if len(metrics) > 1 else [axes]
    axes_list[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "beat_svdllm.png", dpi=110)
    # chosen ranks per module: global allocation, as a fraction of each module's dense-equivalent rank
    fig, axes = plt.subplots(len(merged), 1, figsize=(12, 3.6 * len(merged)), squeeze=False)
    for ax, (m, res) in zip(axes[:, 0], merged.items()):
        for keep in KEEPS:
            for name in ("+ global alloc", "svd-llm uniform"):
                row = next((r for r in res["rows"] if r["name"] == name and r["keep"] == keep), None)
                if row is None:
                    continue
                names = list(row["ranks"])
                frac = [1.0 if row["ranks"][n] is None else
                        row["ranks"][n] * sum(row["shapes"][n]) / (row["shapes"][n][0] * row["shapes"][n][1])
                        for n in names]
                ax.plot(frac, marker="." if name.startswith("+") else None, ls="-" if name.startswith("+") else ":",
                        label=f"{name} keep {keep}")
        short = [n.split("layers.")[-1].split("layer.")[-1] for n in names]
        ax.set_xticks(range(len(short)), short, rotation=90, fontsize=5)
        ax.set_ylabel("params kept (1 = dense)")
        ax.set_title(f"{m}: per-module share of parameters kept, global allocation vs uniform")
        ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(RESULTS / "beat_svdllm_ranks.png", dpi=110)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["minilm", "gemma"], help="default: both, then --report")
    ap.add_argument("--only", nargs="*", help="row names to (re)run")
    ap.add_argument("--keeps", nargs="*", type=float, default=KEEPS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-docs", type=int, help="MiniLM: calibration documents (default 64)")
    ap.add_argument("--report", action="store_true", help="only rewrite the merged JSON, plots and tables")
    a = ap.parse_args()
    if not a.report:
        for name in [a.model] if a.model else ["minilm", "gemma"]:
            run(name, a.only, a.keeps, a.threads, a.calib_docs)
            more = [r for r in MORE_DATA if not a.only or r in a.only]
            if name == "minilm" and not a.model and not a.calib_docs and more:
                run(name, more, a.keeps, a.threads, 512)
    if a.report or not a.model:
        report()
