"""What the default compression costs against its limit, both measured in one process, and what it gives.

For each model: the limit (speed.limit: one plain forward over the calibration tokens + a bare float64 SVD of every
target; the median of `--repeats` measurements), then `--repeats` fresh default compressions `SVDLLM(keep=K)` + save
(speed.timed_compress), each split into stages — calibration forward, statistics (of which the gradient pass),
decomposition, save — with the median ratio to the limit, then the held-out quality of the last one (bench.Bench).
Rows are merged into bench/results/cost.json by (model, keep, code version). `--report` writes bench/COST.md from
it and from the Fisher-tokens study (fisher_tokens.py), which run_all.py inlines into BENCHMARKS.md.

    python bench/cost.py --models minilm gemma --keep 0.8 --repeats 3 1
    python bench/cost.py --report
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

import common
import speed
from common import lz

ROOT = Path(__file__).resolve().parent
DOC = ROOT / "COST.md"


def measure(bench, keep: float, repeats: int) -> dict:
    loaded = bench.load()
    calib = bench.calib(loaded)
    limits = [speed.limit(loaded, calib) for _ in range(repeats)]
    lim = {k: statistics.median(x[k] for x in limits) if isinstance(limits[0][k], float) else limits[0][k]
           for k in limits[0]}
    runs = []
    for _ in range(repeats):
        m = bench.load()
        with tempfile.TemporaryDirectory() as d:
            rep, stages = speed.timed_compress(m, lz.SVDLLM(keep=keep), calib, d, lim)
        stages["gradients"] = rep.get("seconds_gradients", 0.0)
        runs.append((stages, rep, m))
        print(bench.name, {k: round(v, 3) if isinstance(v, float) else v for k, v in stages.items()}, flush=True)
    ratios = [s["ratio_to_limit"] for s, _, _ in runs]
    stages, rep, m = runs[-1]
    ref = bench.reference(bench.load()) if not bench.causal else {}
    return {"model": bench.name, "title": bench.title, "keep": keep, "code": common.code_version(),
            "config": rep["config"], "keep_achieved": rep["keep_achieved"], "calib_tokens": lim["calib_tokens"],
            "limit": lim, "stages": stages, "ratios": ratios, "ratio_to_limit": statistics.median(ratios),
            "quality": bench.evaluate(m, ref), "env": common.env()}


def merge(row: dict) -> None:
    old = common.read_json("cost") if (common.RESULTS / "cost.json").is_file() else {"rows": []}
    rows = [r for r in old["rows"] if (r["model"], r["keep"], r["code"]) != (row["model"], row["keep"], row["code"])]
    common.write_json("cost", {"rows": rows + [row]})


def report() -> Path:
    lines = ["Written by `python bench/cost.py --report` from bench/results/cost.json and fisher_tokens_*.json.", ""]
    if (common.RESULTS / "cost.json").is_file():
        lines += ["**The default compression against its limit** (`SVDLLM(keep=K)` with its defaults; limit = one "
                  "plain forward over the calibration tokens + bare float64 SVDs of every target, measured in the same "
                  "process; the median over the repeats). Before the Fisher read a subset and the SVDs came from symmetric "
                  "eigensolves (commit a2a7e86, BENCHMARKS.md's compression-time table): Gemma-3-270M 4.34, "
                  "MiniLM 2.08.", "",
                  "| model | code | keep | config | calib tokens | forward s | statistics s (gradients) | "
                  "decomposition s | save s | limit s | total / limit | quality |", "|---" * 12 + "|"]
        for r in common.read_json("cost")["rows"]:
            s, c = r["stages"], r["config"]
            cfg = f"{c['alloc']}{' + fisher' if c.get('fisher') else ''}"
            if c.get("fisher") and c.get("fisher_samples"):
                cfg += f" ({c['fisher_samples']} seq.)"
            q = ", ".join(f"{k} {v:.5g}" for k, v in r["quality"].items())
            lines.append(f"| {r['title']} | {r['code']} | {r['keep']} | {cfg} | {r['calib_tokens']} | "
                         f"{s['calibration_forward']:.1f} | {s['statistics']:.1f} ({s['gradients']:.1f}) | "
                         f"{s['decomposition']:.1f} | {s['save']:.1f} | {s['limit']:.1f} | "
                         f"**{r['ratio_to_limit']:.2f}** ({', '.join(f'{x:.2f}' for x in r['ratios'])}) | {q} |")
        lines.append("")
    for f in sorted(common.RESULTS.glob("fisher_tokens_*.json")):
        res = common.read_json(f.stem)
        lines += [f"**How many tokens the output Fisher needs: {res['model']}** (Grams from all "
                  f"{res['calib_tokens']} calibration tokens, the Fisher from n of the {res['calib_sequences']} "
                  f"sequences, evenly spread; held-out perplexity ÷ dense on {res['eval_windows']} windows of "
                  f"{res['eval_seq_len']} tokens per set; dense: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in res["dense"].items())
                  + f"). Plot `bench/results/{f.stem}.png`. The seconds were taken beside other jobs on the 2 shared "
                  "cores and are not comparable across rows; the Fisher's cost is proportional to its tokens.", "",
                  "| Fisher sequences | Fisher tokens | Fisher s | keep | " + " | ".join(res["dense"]) + " |",
                  "|---" * (4 + len(res["dense"])) + "|"]
        for r in sorted(res["rows"], key=lambda r: (-r["keep"], -r["fisher_samples"])):
            lines.append(f"| {r['fisher_samples']} | {r['fisher_tokens']} | {r['seconds_fisher']:.0f} | {r['keep']} | "
                         + " | ".join(f"{r['ratio_to_dense'][k]:.4f}" for k in res["dense"]) + " |")
        lines.append("")
    DOC.write_text("\n".join(lines) + "\n")
    return DOC


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["minilm", "gemma"])
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, nargs="+", default=[3, 1], help="per model, in --models order")
    ap.add_argument("--quick", action="store_true", help="the tiny random-weight models (a smoke run)")
    ap.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    ap.add_argument("--report", action="store_true", help="only write bench/COST.md from the JSON")
    a = ap.parse_args()
    if not a.report:
        torch.set_num_threads(a.threads)
        for i, bench in enumerate(common.benches(a.quick, only=a.models)):
            merge(measure(bench, a.keep, a.repeats[min(i, len(a.repeats) - 1)]))
    print(report())


if __name__ == "__main__":
    main()
