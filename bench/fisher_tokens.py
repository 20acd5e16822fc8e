"""How many calibration sequences the output Fisher needs (svd-llm's default on causal LMs: global allocation
weighted by the diagonal output Fisher).

The Fisher pass is a whole-model forward and backward through the LM head (on Gemma-3-270M the 262k-word head holds
63% of the forward FLOPs), so it costs several times the Gram pass. Here the Grams come from every calibration
sequence (once), the Fisher from n of them, evenly spread (`SVDLLM(fisher_samples=n)`); each row is compressed at
every keep from those statistics and scored on two held-out sets: python-docs windows (the benchmark's data, the same
source as the calibration, disjoint files) and standard-library docstrings (`builtin-heldout`, another source).
Timing rows: the Gram pass, each Fisher pass, and the limit (one plain forward over the calibration + bare float64
SVDs of every target), all in this process. `--timed N` then runs one fresh default compression with
fisher_samples=N (or the method's default with N=0) and reports its stages against that limit.

Writes bench/results/fisher_tokens_<model>.json and a plot. Usage:
    python bench/fisher_tokens.py --samples 16 8 4 2 --keeps 0.8 0.6 --timed 0
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402
import speed  # noqa: E402
from common import lz  # noqa: E402
from layerzip.compress import gradients  # noqa: E402
from layerzip.data import load_documents, spread_sequences  # noqa: E402
from layerzip.evaluate import perplexity  # noqa: E402
from layerzip.models import select_targets  # noqa: E402
from layerzip.stats import with_fisher  # noqa: E402


def held_out(bench) -> dict[str, list[str]]:
    return {"python-docs": bench._data()["eval"], "docstrings": load_documents("builtin-heldout")}


def score(model, tok, sets: dict, windows: int, seq_len: int) -> dict:
    return {name: perplexity(model, tok, docs, seq_len, windows, progress=False) for name, docs in sets.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma")
    ap.add_argument("--samples", type=int, nargs="+", default=[16, 8, 4, 2])
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6])
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--timed", type=int, default=None, help="then one fresh default compression (0: the default)")
    ap.add_argument("--quick", action="store_true", help="a tiny random-weight model (a smoke run)")
    ap.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bench = common.benches(a.quick, only=[a.model])[0]
    loaded = bench.load()
    calib = bench.calib(loaded)
    sets = held_out(bench)
    n_seq = sum(len(b["input_ids"]) for b in calib)
    lim = speed.limit(loaded, calib)
    res = {"model": bench.title, "bench": bench.name, "calib_sequences": n_seq, "calib_tokens": lim["calib_tokens"], "limit": lim,
           "eval_windows": a.eval_windows, "eval_seq_len": bench.eval_seq_len, "env": common.env(), "rows": []}
    prev = common.read_json(f"fisher_tokens_{bench.name}") if \
        (common.RESULTS / f"fisher_tokens_{bench.name}.json").is_file() else {}
    same = {k: prev.get(k) for k in ("calib_tokens", "eval_windows", "eval_seq_len")} == \
        {k: res[k] for k in ("calib_tokens", "eval_windows", "eval_seq_len")}
    if same:                                   # rows of earlier runs with the same data are kept (merged by key)
        res["dense"], res["rows"] = prev["dense"], prev["rows"]
    else:
        res["dense"] = score(loaded.model, loaded.tokenizer, sets, a.eval_windows, bench.eval_seq_len)
    print("dense", res["dense"], flush=True)

    t = time.perf_counter()
    grams = lz.calibrate(loaded.model, lz.SVDLLM(alloc="global", fisher=False), calib, progress=False)
    res["seconds_grams"] = time.perf_counter() - t
    targets = select_targets(loaded.model)
    for n in sorted(set(a.samples), reverse=True):
        part = spread_sequences(calib, n)
        t = time.perf_counter()
        fisher = gradients(loaded.model, targets, "output", part, progress=False)
        sec = time.perf_counter() - t
        stats = with_fisher(grams, fisher)
        for keep in a.keeps:
            m = bench.load()
            rep = lz.compress_(m.model, lz.SVDLLM(keep=keep, alloc="global", fisher=True, fisher_samples=n),
                               calib=calib, progress=False, stats=stats)
            row = {"fisher_samples": min(n, n_seq), "fisher_tokens": sum(int(b["attention_mask"].sum()) for b in part),
                   "keep": keep, "keep_achieved": rep["keep_achieved"], "seconds_fisher": sec,
                   "perplexity": score(m.model, m.tokenizer, sets, a.eval_windows, bench.eval_seq_len)}
            row["ratio_to_dense"] = {k: v / res["dense"][k] for k, v in row["perplexity"].items()}
            res["rows"] = [r for r in res["rows"] if (r["fisher_samples"], r["keep"]) != (row["fisher_samples"], keep)]
            res["rows"].append(row)
            print(row, flush=True)
            common.write_json(f"fisher_tokens_{bench.name}", res)
    if a.timed is not None:
        cfg = lz.SVDLLM(keep=a.keeps[0], fisher_samples=a.timed or None)
        m = bench.load()
        with tempfile.TemporaryDirectory() as d:
            rep, stages = speed.timed_compress(m, cfg, calib, d, lim)
        res["timed"] = {"config": rep["config"], "keep_achieved": rep["keep_achieved"], **stages,
                        "perplexity": score(m.model, m.tokenizer, sets, a.eval_windows, bench.eval_seq_len)}
        print(res["timed"], flush=True)
    common.write_json(f"fisher_tokens_{bench.name}", res)
    plot(res)


def plot(res: dict) -> Path:
    sets = list(res["dense"])
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sets):
        for keep in sorted({r["keep"] for r in res["rows"]}, reverse=True):
            rows = sorted((r for r in res["rows"] if r["keep"] == keep), key=lambda r: r["fisher_samples"])
            ax.plot([r["fisher_tokens"] for r in rows], [r["ratio_to_dense"][name] for r in rows], "o-",
                    label=f"keep {keep}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens the output Fisher reads")
        ax.set_ylabel("perplexity ÷ dense")
        ax.set_title(f"{res['model']}: held-out {name}")
        ax.legend()
    fig.tight_layout()
    return common.save_figure(fig, common.RESULTS / f"fisher_tokens_{res['bench']}.png")


if __name__ == "__main__":
    main()
