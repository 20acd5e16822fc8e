"""Elastic size: one `--elastic` compression loaded at several keeps against a direct compression at each keep.

For each model (MiniLM, Gemma-3-270M; `--quick`: tiny random-weight ones) the calibration statistics are collected
once (`lz.calibrate`, svd-llm's defaults: whitening, output Fisher for causal LMs, global allocation — which
`--elastic` always uses, so MiniLM's direct rows use `--alloc global` too). From them:

    elastic   lz.compress_(SVDLLM(keep=0.5, elastic=True, keep_min=0.3)) -> lz.save -> DIR
    direct K  lz.compress_(SVDLLM(keep=K, alloc="global")) from the same statistics -> lz.save -> DIR_K

and for each K: the quality of `lz.load(DIR, keep=K)` and of the direct model (Gemma: perplexity on held-out
python-docs windows; MiniLM: Recall@1 / MRR of held-out python-docs pairs and the cosine to the dense model), their
ranks and keep_achieved, the load time of `lz.load_model(DIR, keep=K)` against `lz.load_model(DIR_K)` (medians of
`--repeats` alternating loads), and the bytes written (elastic directory, each single-keep directory, dense).

    python bench/elastic.py [--quick] [--models gemma minilm] [--keeps 0.8 0.6 0.5] [--repeats 3]
Writes bench/results/elastic_<model>.json, bench/results/elastic.png and bench/ELASTIC.md (--quick: the
markdown beside the results; LAYERZIP_BENCH_RESULTS moves them).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import common
from layerzip import elastic
from layerzip.io import load_model, written_bytes
from layerzip.methods import SVDLLM

HERE = Path(__file__).resolve().parent
DOC = HERE / "ELASTIC.md"


def _write_json(name: str, obj) -> Path:
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
    return path


def _timed_load(path, keep=None):
    t = time.perf_counter()
    loaded = load_model(path, keep=keep)
    return time.perf_counter() - t, loaded


def run_model(b: common.Bench, keeps: list[float], keep_min: float, repeats: int, progress: bool = True) -> dict:
    dense, ref, dense_q, calib = b.dense_baseline()
    cfg = SVDLLM(keep=0.5, elastic=True, keep_min=keep_min)
    with common.Timer() as t:
        stats = common.lz.calibrate(dense.model, cfg, calib, progress=progress)
    seconds_calibrate = t.s
    res = {"model": b.name, "title": b.title, "metric": b.metric, "bench": common.asdict_bench(b),
           "code": common.code_version(), "env": common.env(), "dense": dense_q, "keep_min": keep_min,
           "default_keep": cfg.keep, "seconds_calibrate": seconds_calibrate, "rows": []}
    with tempfile.TemporaryDirectory(prefix="lz-elastic-bench-") as tmp:
        tmp = Path(tmp)
        el = copy.deepcopy(dense.model)
        with common.Timer() as t:
            rep = common.lz.compress_(el, cfg, calib=calib, progress=progress, stats=stats)
        common.lz.save(el, tmp / "elastic", tokenizer=dense.tokenizer)
        res["elastic"] = {"seconds_decompose": t.s, "bytes": written_bytes(tmp / "elastic"),
                          "stored_params": rep["elastic"]["stored_params"], "params_before": rep["params_before"],
                          "target_params_before": rep["target_params_before"],
                          "stored_dense_modules": sum(r is None for r in rep["elastic"]["stored_ranks"].values()),
                          "full_rank_modules": sum(m.full_rank and m.rank is not None
                                                   for m in elastic.modules(el).values()),
                          "modules": len(rep["elastic"]["stored_ranks"])}
        del el
        common.lz.save(dense.model, tmp / "dense", tokenizer=dense.tokenizer)
        res["dense_bytes"] = written_bytes(tmp / "dense")
        for keep in keeps:
            row = {"keep": keep}
            direct = copy.deepcopy(dense.model)
            with common.Timer() as t:
                dr = common.lz.compress_(direct, SVDLLM(keep=keep, alloc="global"), calib=calib, progress=False,
                                         stats=stats)
            row["direct_seconds_decompose"] = t.s
            common.lz.save(direct, tmp / f"direct-{keep}", tokenizer=dense.tokenizer)
            row["direct_bytes"] = written_bytes(tmp / f"direct-{keep}")
            row["direct_keep_achieved"] = dr["keep_achieved"]
            with common.Timer() as t:
                q = b.evaluate(common.lz.models.Loaded(direct, dense.tokenizer, dense.causal, "direct", None), ref)
            row["direct"] = {**q, "seconds_eval": t.s}
            del direct
            gc.collect()
            t_el, t_plain = [], []
            for i in range(repeats):              # alternate, so a load-time drift hits both
                for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                    if which == 0:
                        s, loaded = _timed_load(tmp / "elastic", keep)
                        t_el.append(s)
                    else:
                        s, _ = _timed_load(tmp / f"direct-{keep}")
                        t_plain.append(s)
                        _ = None
                    gc.collect()
            row["load_seconds_elastic"], row["load_seconds_plain"] = t_el, t_plain
            row["load_ratio"] = statistics.median(t_el) / statistics.median(t_plain)
            row["elastic_keep_achieved"] = loaded.elastic["keep_achieved"]
            row["same_ranks"] = loaded.elastic["ranks"] == dr["ranks"]
            with common.Timer() as t:
                q = b.evaluate(loaded, ref)
            row["elastic"] = {**q, "seconds_eval": t.s}
            m = b.metric
            row["quality_gap"] = (row["elastic"][m] / row["direct"][m] - 1 if m == "perplexity"
                                  else row["elastic"][m] - row["direct"][m])
            del loaded
            gc.collect()
            res["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("load_seconds")}), flush=True)
            _write_json(f"elastic_{b.name}", res)
    return res


def plot(results: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        m = res["metric"]
        rows = sorted(res["rows"], key=lambda r: r["keep"])
        ax.plot([r["direct_keep_achieved"] for r in rows], [r["direct"][m] for r in rows], "o-", ms=9, mfc="none",
                label="direct compression at each keep")
        ax.plot([r["elastic_keep_achieved"] for r in rows], [r["elastic"][m] for r in rows], "x--", ms=8,
                label="one elastic file, loaded at the keep")
        ax.axhline(res["dense"][m], color="gray", ls=":", lw=1, label="dense")
        ax.set_xlabel("keep achieved (fraction of targeted parameters)")
        ax.set_ylabel(m.replace("_", " "))
        if m == "perplexity":
            ax.set_yscale("log")
        ax.set_title(res["title"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path = common.RESULTS / "elastic.png"
    tmp = path.with_name(".elastic.png.tmp")
    fig.tight_layout()
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _mib(n):
    return f"{n / 2**20:.1f}"


def write_doc(results: list[dict], doc: Path = DOC) -> Path:
    lines = ["# Elastic size: compress once, choose the size when loading", "",
             "`bench/elastic.py`: one `layerzip compress --elastic --keep-min 0.3` (svd-llm defaults: whitening, "
             "output Fisher for causal LMs, global allocation) loaded at several keeps (`lz.load(DIR, keep=K)`), "
             "against a direct compression at each keep from the same calibration statistics (`--alloc global`, "
             "what `--elastic` uses; for MiniLM it is not the default, which is uniform ranks). Done means: quality "
             "within 2% perplexity (0.01 Recall@1) of the direct compression, keep_achieved within ±1% of the keep, "
             "loading ≤ 2× a plain directory of that keep.", "", "![](results/elastic.png)", ""]
    for res in results:
        m = res["metric"]
        e = res["elastic"]
        lines += [f"## {res['title']}", "",
                  f"code {res['code']}, {res['env']['cores']} cores, 1-min load {res['env']['load_average_1min']:.1f} "
                  f"(shared machine). Dense {m}: {res['dense'][m]:.4f}. Calibration (once): "
                  f"{res['seconds_calibrate']:.0f} s; elastic decomposition {e['seconds_decompose']:.0f} s "
                  f"({e['modules']} modules: {e['full_rank_modules']} stored at full rank — dense at some keep ≤ 1 — "
                  f"{e['stored_dense_modules']} stored dense).", "",
                  f"| keep | keep_achieved elastic / direct | same ranks | {m} elastic | {m} direct | gap | "
                  "load s elastic / plain (ratio) | direct dir MiB |", "|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            gap = f"{100 * r['quality_gap']:+.3f}%" if m == "perplexity" else f"{r['quality_gap']:+.4f}"
            lines.append(
                f"| {r['keep']} | {r['elastic_keep_achieved']:.4f} / {r['direct_keep_achieved']:.4f} | "
                f"{r['same_ranks']} | {r['elastic'][m]:.4f} | {r['direct'][m]:.4f} | {gap} | "
                f"{min(r['load_seconds_elastic']):.2f}–{max(r['load_seconds_elastic']):.2f} / "
                f"{min(r['load_seconds_plain']):.2f}–{max(r['load_seconds_plain']):.2f} "
                f"({r['load_ratio']:.2f}×) | {_mib(r['direct_bytes'])} |")
        singles = sum(r["direct_bytes"] for r in res["rows"])
        lines += ["", f"Bytes written: elastic directory **{_mib(e['bytes'])} MiB** (every keep from "
                  f"{res['keep_min']} to 1) against the dense model's {_mib(res['dense_bytes'])} MiB and "
                  f"{_mib(singles)} MiB for the {len(res['rows'])} single-keep directories above together. "
                  "With --keep-max 1 every module is dense at keep 1, so every module is stored at full rank "
                  "(min(m, n)(m+n) numbers, more than its m·n): the elastic file is larger than the dense one; a "
                  "lower --keep-max stores fewer ranks.", ""]
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, doc)
    return doc


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="+", default=["minilm", "gemma"])
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6, 0.5])
    ap.add_argument("--keep-min", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = {"minilm": "tiny-bert", "gemma": "tiny-gemma"} if a.quick else {}
    results = []
    for b in common.benches(a.quick, [names.get(m, m) for m in a.models]):
        results.append(run_model(b, a.keeps, a.keep_min, a.repeats))
    plot(results)
    write_doc(results, common.RESULTS / "ELASTIC.md" if a.quick else DOC)    # --quick: beside its results


if __name__ == "__main__":
    main()
