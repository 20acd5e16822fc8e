"""Depth decomposition and healing on real models (issue 5).

    python bench/depth_and_heal.py --part minilm     # drop curves + heal for MiniLM   -> results/depth_heal_minilm.json
    python bench/depth_and_heal.py --part gemma      # the same for Gemma-3-270M      -> results/depth_heal_gemma.json
    python bench/depth_and_heal.py --part plot       # merge -> results/depth_heal.json + depth_heal_*.png

MiniLM: mean cosine of mean-pooled embeddings to the original on held-out doc paragraphs, and retrieval Recall@1
(section title -> section body). Gemma: perplexity on held-out doc windows (BOS per window). For each number of
dropped blocks n, both selection rules, next to SVD-LLM low rank at the same parameter count (keep = (L−n)/L of
the block parameters: blocks are identical, so this matches exactly). Healing: SVD-LLM keep 0.5 (MiniLM) and keep
0.8 (Gemma), distilled on the calibration half of the docs, measured on the held-out half; its cost in seconds.
A re-run keeps the earlier drop rows for other n (and, with --no-heal, the earlier heal result).
Runs on CPU with one thread per process (this machine's 2 cores are shared: run the two parts side by side).
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
from data import calib_texts, eval_texts, gemma_dir, retrieval_pairs  # noqa: E402

from layerzip import compress_, config_from_dict  # noqa: E402
from layerzip.stats import block_similarity  # noqa: E402
from layerzip.data import token_batches  # noqa: E402
from layerzip.methods.drop_blocks import choose_blocks, drop_blocks_  # noqa: E402
from layerzip.evaluate import embed, mean_cosine, perplexity  # noqa: E402
from layerzip.heal import heal_  # noqa: E402
from layerzip.io import load_model  # noqa: E402
from layerzip.models import count_params, select_targets

RESULTS = Path(__file__).resolve().parent / "results"


def svdllm(keep: float):
    """Plain SVD-LLM (uniform ranks, one calibration pass), whatever compress.py's defaults become."""
    return config_from_dict({"method": "svd-llm", "keep": keep, "sequential": False, "correct": False})


def target_params(model) -> int:
    return sum(p.numel() for m in select_targets(model).values() for p in m.parameters())


# --------------------------------------------------------------------------------------------------- metrics
def recall_at_1(model, tok, pairs) -> float:
    q = F.normalize(embed(model, tok, [p["query"] for p in pairs], progress=False), dim=-1)
    d = F.normalize(embed(model, tok, [p["doc"] for p in pairs], progress=False), dim=-1)
    return (q @ d.T).argmax(1).eq(torch.arange(len(pairs))).float().mean().item()


def minilm_metrics(model, tok, ref_emb, texts, pairs) -> dict:
    return {"cosine": mean_cosine(embed(model, tok, texts, progress=False), ref_emb),
            "recall_at_1": recall_at_1(model, tok, pairs)}


def gemma_metrics(model, tok, texts, windows, seq_len) -> dict:
    return {"perplexity": perplexity(model, tok, texts, seq_len, windows, progress=False)}


# ------------------------------------------------------------------------------------------------------ runs
def drop_curves(loaded, calib, ns, metric, prev: dict | None = None, save=None) -> dict:
    """Both selection rules and SVD-LLM at the same parameter count, for every n in ns.

    Rows of `prev` (an earlier run's "drop") for other n are kept, so runs over disjoint ns add up; `save(rows)` is
    called after every new row, so an interrupted run keeps what it measured."""
    L = len(loaded.model.get_submodule(select_blocks_name(loaded.model)))
    t = time.perf_counter()
    sim = block_similarity(loaded.model, calib, progress=False)
    rows = {"span": [], "influence": [], "svd-llm": [], "similarity_seconds": time.perf_counter() - t,
            "block_influence": sim["influence"], "num_blocks": L}
    for rule in ("span", "influence", "svd-llm"):
        rows[rule] += [r for r in (prev or {}).get(rule, []) if r["blocks_dropped"] not in ns]

    def add(rule, row):
        rows[rule] = sorted(rows[rule] + [row], key=lambda r: r["blocks_dropped"])
        print(json.dumps({"rule": rule, **row}), flush=True)
        if save:
            save(rows)
    before = target_params(loaded.model)
    for n in ns:
        for rule in ("span", "influence"):
            m = copy.deepcopy(loaded.model)
            drop = choose_blocks(sim, n, rule)
            drop_blocks_(m, drop)
            add(rule, {"blocks_dropped": n, "dropped": drop, "keep": target_params(m) / before,
                       "params": count_params(m), **metric(m)})
        m = copy.deepcopy(loaded.model)
        t = time.perf_counter()
        rep = compress_(m, svdllm((L - n) / L), calib=calib, progress=False)
        add("svd-llm", {"blocks_dropped": n, "keep": rep["keep_achieved"], "params": count_params(m),
                        "seconds": time.perf_counter() - t, **metric(m)})
    return rows


def select_blocks_name(model) -> str:
    from layerzip.models import find_blocks
    return find_blocks(model)[0]


def heal_run(loaded, keep, calib, heal_batches, steps, lr, metric) -> dict:
    m = copy.deepcopy(loaded.model)
    compress_(m, svdllm(keep), calib=calib, progress=False)
    before = metric(m)
    rep = heal_(m, loaded.model, heal_batches, steps=steps, lr=lr, progress=True)
    after = metric(m)
    out = {"method": "svd-llm", "keep": keep, "steps": steps, "lr": lr, "before": before, "after": after,
           "seconds": rep["seconds"], "seconds_per_step": rep["seconds"] / steps,
           "trainable_params": rep["trainable_params"], "loss_first": rep["loss_first"],
           "loss_last": rep["loss_last"], "losses": rep["losses"],
           "tokens_per_step": int(heal_batches[0]["attention_mask"].sum())}
    print(json.dumps({k: v for k, v in out.items() if k != "losses"}), flush=True)
    return out


def run_minilm(args) -> dict:
    ref = load_model("minilm")
    tok = ref.tokenizer
    texts, pairs = eval_texts(args.eval_docs), retrieval_pairs(args.eval_docs)
    ref_emb = embed(ref.model, tok, texts, progress=False)
    metric = lambda m: minilm_metrics(m, tok, ref_emb, texts, pairs)   # noqa: E731
    calib = token_batches(tok, calib_texts(64), False, 64, 256, 16)
    res = {"model": "minilm", "metric": "cosine to original embeddings; retrieval Recall@1",
           "eval_texts": len(texts), "retrieval_pairs": len(pairs), "dense": metric(ref.model)}
    heal_b = token_batches(tok, calib_texts(args.heal_docs), False, args.heal_docs, 128, 16)
    prev = previous("minilm")
    res["heal"] = prev.get("heal") if args.no_heal else heal_run(ref, 0.5, calib, heal_b, args.minilm_steps,
                                                                 args.lr, metric)
    write("minilm", {**res, "drop": prev.get("drop")})
    res["drop"] = drop_curves(ref, calib, args.ns or [1, 2, 3, 4], metric, prev.get("drop"),
                              lambda rows: write("minilm", {**res, "drop": rows}))
    return res


def run_gemma(args) -> dict:
    ref = load_model(str(gemma_dir()))
    tok = ref.tokenizer
    texts = eval_texts()
    metric = lambda m: gemma_metrics(m, tok, texts, args.windows, 256)   # noqa: E731
    calib = token_batches(tok, calib_texts(), True, 16, 256, 8)
    res = {"model": "gemma-3-270m", "metric": f"perplexity, {args.windows} held-out windows of 256 tokens",
           "dense": metric(ref.model)}
    print(json.dumps(res), flush=True)
    prev = previous("gemma")
    if args.no_heal:
        res["heal"] = prev.get("heal")
    else:
        heal_b = token_batches(tok, calib_texts(), True, 32, 128, 2)
        res["heal"] = heal_run(ref, 0.8, calib, heal_b, args.gemma_steps, args.lr, metric)
    write("gemma", {**res, "drop": prev.get("drop")})
    res["drop"] = drop_curves(ref, calib, args.ns or [1, 2, 4], metric, prev.get("drop"),
                              lambda rows: write("gemma", {**res, "drop": rows}))
    return res


def write(part: str, res: dict) -> None:
    res = {k: v for k, v in res.items() if v is not None}
    (RESULTS / f"depth_heal_{part}.json").write_text(json.dumps(res, indent=1))


def previous(part: str) -> dict:
    """The part's earlier results (heal, drop rows), {} if none."""
    p = RESULTS / f"depth_heal_{part}.json"
    return json.loads(p.read_text()) if p.exists() else {}


# ------------------------------------------------------------------------------------------------------ plots
def plot(res: dict) -> list[Path]:
    from matplotlib.figure import Figure
    paths = []
    for name, r in res.items():
        if "drop" not in r:
            continue
        keys = ["cosine", "recall_at_1"] if name == "minilm" else ["perplexity"]
        fig = Figure(figsize=(5 * len(keys), 3.6))
        axes = fig.subplots(1, len(keys), squeeze=False)[0]
        for ax, k in zip(axes, keys):
            for rule, style in (("span", "o-"), ("influence", "s-"), ("svd-llm", "^--")):
                rows = r["drop"][rule]
                ax.plot([x["blocks_dropped"] for x in rows], [x[k] for x in rows], style,
                        label=rule if rule == "svd-llm" else f"drop blocks ({rule})")
            ax.axhline(r["dense"][k], color="gray", lw=0.8, label="dense")
            ax.set_xlabel(f"blocks dropped of {r['drop']['num_blocks']} (svd-llm: same parameter count)")
            ax.set_ylabel(k)
            if k == "perplexity":
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.suptitle(f"{r['model']}: depth vs low rank", fontsize=10)
        fig.tight_layout()
        p = RESULTS / f"depth_heal_{name}.png"
        fig.savefig(p, dpi=90)
        paths.append(p)
    return paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["minilm", "gemma", "plot"], required=True)
    ap.add_argument("--eval-docs", type=int, default=200)
    ap.add_argument("--heal-docs", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--minilm-steps", type=int, default=60)
    ap.add_argument("--gemma-steps", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-heal", action="store_true",
                    help="skip healing; keep the heal result already in results/depth_heal_<part>.json")
    ap.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="numbers of blocks to drop, e.g. 1,2,3")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    RESULTS.mkdir(exist_ok=True)
    if args.part == "plot":
        res = {k: json.loads((RESULTS / f"depth_heal_{k}.json").read_text()) for k in ("minilm", "gemma")
               if (RESULTS / f"depth_heal_{k}.json").exists()}
        (RESULTS / "depth_heal.json").write_text(json.dumps(res, indent=1))
        print(json.dumps({"figures": [str(p) for p in plot(res)]}))
        return
    t = time.perf_counter()
    res = run_minilm(args) if args.part == "minilm" else run_gemma(args)
    res["seconds_total"] = time.perf_counter() - t
    res["threads"] = args.threads
    write(args.part, res)


if __name__ == "__main__":
    main()
