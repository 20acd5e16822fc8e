"""ONNX export and latency-aware allocation on the real models; writes bench/EXPORT.md.

1. Export (`export_<model>.json`): the default `compress` (svd-llm) at MiniLM keep 0.5 / Gemma keep 0.8, exported to
   ONNX with `lz.export_onnx` beside its dense model; max |onnxruntime − torch|, no re-densified layer, and latency
   at batch 1 and 16 (1 thread) in torch and in onnxruntime, each against the dense model in the same runtime and
   against the FLOP bound. Gemma (causal LM): perplexity of the exported graph in onnxruntime against torch on the
   same held-out windows.
2. Objective (`objective_<model>.json`): svd-llm with global allocation at one keep, `--objective params` against
   `--objective latency`, from one calibration (`lz.calibrate`): quality (Recall@1 / perplexity), parameters kept,
   modules left dense, and speedup over dense (torch and onnxruntime, 1 thread).

Calibration: MiniLM 64 documents × 256 tokens; Gemma 16 windows × 256 tokens (the bench's setting: the default
64-window Fisher pass takes 30+ minutes on this shared 2-core machine).

    python bench/export_latency.py [--quick] [--models minilm gemma] [--parts export objective] [--repeats 7]
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import layerzip as lz
from layerzip.data import token_batches
from layerzip.export import dense_initializers, export_onnx, ort_latency, ort_session, runtime_latency
from layerzip.models import count_params

KEEPS = {"minilm": 0.5, "gemma": 0.8, "tiny-bert": 0.5, "tiny-gemma": 0.8}             # of the export part
OBJECTIVE_KEEPS = {"minilm": (0.5, 0.8), "gemma": (0.8,), "tiny-bert": (0.5,), "tiny-gemma": (0.8,)}
HERE = Path(__file__).resolve().parent


def _median(v):
    return sorted(v)[len(v) // 2]


def _speed(comp, dense, seq: int, repeats: int, tmp: Path) -> dict:
    """Latency and speedups over dense in both runtimes, keyed by runtime: torch through export.runtime_latency
    (what `eval --latency` runs); onnxruntime the same way (paired medians, 1 thread) with the dense model's ONNX
    file exported once into `tmp` and reused."""
    r = runtime_latency(comp, dense, "torch", seq, threads=1, repeats=repeats, progress=False)
    out = {"torch": {k: v for k, v in r.items() if "latency" in k or "speedup" in k or k == "flop_bound"}}
    if not (tmp / "dense.onnx").is_file():
        export_onnx(dense, tmp / "dense.onnx", verify=False, progress=False)
    export_onnx(comp, tmp / "comp.onnx", verify=False, progress=False)
    vocab = min(dense.config.vocab_size, 30000)
    sess = {"dense": ort_session(tmp / "dense.onnx", 1), "comp": ort_session(tmp / "comp.onnx", 1)}
    o = {"latency_runtime": "onnxruntime", "flop_bound": out["torch"]["flop_bound"]}
    for bs, n in ((1, repeats), (16, max(3, repeats // 2))):
        t = {k: [] for k in sess}
        for i in range(n + 1):                     # the first round warms up
            for k, sx in sess.items():
                ms = ort_latency(sx, bs, seq, 1, warmup=0, vocab=vocab)
                if i:
                    t[k].append(ms)
        o[f"latency_ms_batch{bs}"], o[f"dense_latency_ms_batch{bs}"] = _median(t["comp"]), _median(t["dense"])
        o[f"speedup_batch{bs}"] = _median([d / c for d, c in zip(t["dense"], t["comp"])])
        o[f"speedup_over_bound_batch{bs}"] = o[f"speedup_batch{bs}"] / o["flop_bound"]
    del sess
    (tmp / "comp.onnx").unlink()
    out["onnxruntime"] = o
    return out


@torch.no_grad()
def _perplexities(model, path: Path, b: common.Bench, loaded) -> dict:
    """Perplexity of the torch model and of its ONNX graph in onnxruntime on the same windows (one row at a time)."""
    batches = token_batches(loaded.tokenizer, b._data()["eval"], True, b.eval_windows, b.eval_seq_len, batch_size=1)
    sess = ort_session(path, threads=None)
    nll = {"torch": 0.0, "onnxruntime": 0.0}
    count = 0
    for batch in batches:
        ids = batch["input_ids"]
        mask = torch.ones_like(ids)
        logits = {"torch": model(input_ids=ids, attention_mask=mask).logits.float(),
                  "onnxruntime": torch.from_numpy(sess.run(None, {"input_ids": ids.numpy(),
                                                                  "attention_mask": mask.numpy()})[0])}
        for k, lg in logits.items():
            nll[k] += F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1),
                                      reduction="sum").item()
        count += ids[:, 1:].numel()
    ppl = {k: math.exp(v / count) for k, v in nll.items()}
    return {"perplexity_torch": ppl["torch"], "perplexity_onnxruntime": ppl["onnxruntime"],
            "perplexity_rel_diff": abs(ppl["onnxruntime"] / ppl["torch"] - 1), "windows": len(batches),
            "tokens": count}


def export_part(b: common.Bench, tmp: Path, repeats: int) -> dict:
    keep = KEEPS[b.name]
    dense = b.load()
    comp = b.load()
    calib = b.calib(comp)
    t = time.perf_counter()
    rep = lz.compress_(comp.model, lz.SVDLLM(keep=keep), calib=calib, progress=True)
    seconds_compress = time.perf_counter() - t
    path = tmp / f"{b.name}.onnx"
    ex = export_onnx(comp.model, path)
    row = {"keep": keep, "method": "svd-llm", "config": rep["config"], "keep_achieved": rep["keep_achieved"],
           "seconds_compress": seconds_compress, "export": ex,
           "dense_initializers": dense_initializers(path, comp.model), "params": count_params(comp.model),
           "dense_params": count_params(dense.model)}
    if b.causal:
        row.update(_perplexities(comp.model, path, b, comp))
    path.unlink()
    row["speed"] = _speed(comp.model, dense.model, b.latency_seq_len, repeats, tmp)
    return {"model": b.name, "title": b.title, "seq_len": b.latency_seq_len, "threads": 1, "row": row,
            "env": common.env()}


def objective_part(b: common.Bench, tmp: Path, repeats: int, keeps=None) -> dict:
    keeps = keeps or OBJECTIVE_KEEPS[b.name]
    dense = b.load()
    calib = b.calib(dense)
    t = time.perf_counter()
    stats = lz.calibrate(dense.model, lz.SVDLLM(keep=keeps[0], alloc="global"), calib, progress=True)  # unchanged
    seconds_calibrate = time.perf_counter() - t
    ref = b.reference(dense)
    rows = [{"objective": "dense", "keep": 1.0, **b.evaluate(dense, ref), "params": count_params(dense.model)}]
    for keep in keeps:
        for objective in ("params", "latency"):
            loaded = b.load()
            cfg = lz.SVDLLM(keep=keep, alloc="global", objective=objective)
            t = time.perf_counter()
            rep = lz.compress_(loaded.model, cfg, calib=calib, stats=stats, progress=True)
            row = {"objective": objective, "keep": keep, "config": rep["config"],
                   "keep_achieved": rep["keep_achieved"], "seconds_compress": time.perf_counter() - t,
                   "params": count_params(loaded.model), "targets": rep["targets"], "factorized": rep["factorized"],
                   **b.evaluate(loaded, ref)}
            row["ranks"] = {n: m.rank for n, m in loaded.model.named_modules() if isinstance(m, lz.LowRankLinear)}
            row["speed"] = _speed(loaded.model, dense.model, b.latency_seq_len, repeats, tmp)
            rows.append(row)
            del loaded
    return {"model": b.name, "title": b.title, "keeps": list(keeps), "seq_len": b.latency_seq_len, "threads": 1,
            "seconds_calibrate": seconds_calibrate, "calib_samples": b.calib_samples,
            "calib_seq_len": b.calib_seq_len, "rows": rows, "env": common.env()}


# ------------------------------------------------------------------------------------------------------ report
def _f(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def export_md(r: dict) -> list[str]:
    row, sp = r["row"], r["row"]["speed"]
    lines = [f"### {r['title']}: export at keep {row['keep']} (svd-llm, default settings)", "",
             f"ONNX file {row['export']['bytes'] / 2**20:.1f} MiB, exported and checked in "
             f"{row['export']['seconds']:.1f} s; max |onnxruntime − torch| = {row['export']['max_abs_diff']:.1e} "
             f"(float32); factorized layers {row['export']['factorized_layers']}, re-densified "
             f"{len(row['dense_initializers'])}.", ""]
    if "perplexity_torch" in row:
        lines += [f"Perplexity on {row['windows']} held-out windows ({row['tokens']} tokens): torch "
                  f"{row['perplexity_torch']:.4f}, onnxruntime {row['perplexity_onnxruntime']:.4f} (relative "
                  f"difference {row['perplexity_rel_diff']:.1e}).", ""]
    lines += [f"| runtime | batch | dense ms | compressed ms | speedup | FLOP bound | speedup ÷ bound |",
              "|---|---|---|---|---|---|---|"]
    for rt, s in sp.items():
        for bs in (1, 16):
            lines.append(f"| {rt} | {bs} | {_f(s[f'dense_latency_ms_batch{bs}'], 1)} | "
                         f"{_f(s[f'latency_ms_batch{bs}'], 1)} | {_f(s[f'speedup_batch{bs}'], 2)} | "
                         f"{_f(s['flop_bound'], 2)} | {_f(s[f'speedup_over_bound_batch{bs}'], 2)} |")
    return lines + ["", f"{r['seq_len']} tokens per sequence, 1 thread, medians of paired runs (dense and "
                        "compressed alternated); onnxruntime: CPU provider, sequential, all graph optimizations.", ""]


def objective_md(r: dict) -> list[str]:
    metric = "perplexity" if "perplexity" in r["rows"][0] else "recall_at_1"
    keeps = " and ".join(map(str, r.get("keeps") or [r["keep"]]))
    lines = [f"### {r['title']}: `--objective params` vs `latency` at keep {keeps} (svd-llm, --alloc global)", "",
             f"One calibration ({r['calib_samples']} sequences × {r['calib_seq_len']} tokens, "
             f"{r['seconds_calibrate']:.0f} s), both allocations from it. Speedup over dense at batch 1 / 16, "
             f"{r['seq_len']} tokens, 1 thread.", "",
             f"| keep | objective | params | keep achieved | dense modules | {metric} | torch speedup b1 / b16 | "
             "onnxruntime speedup b1 / b16 | FLOP bound |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if row["objective"] == "dense":
            lines.append(f"| 1 | dense | {row['params']:,} | 1 | all | {_f(row[metric], 4)} | 1 | 1 | 1 |")
            continue
        t, o = row["speed"]["torch"], row["speed"]["onnxruntime"]
        lines.append(f"| {row['keep']} | {row['objective']} | {row['params']:,} | {_f(row['keep_achieved'])} | "
                     f"{row['targets'] - row['factorized']} of {row['targets']} | {_f(row[metric], 4)} | "
                     f"{_f(t['speedup_batch1'], 2)} / {_f(t['speedup_batch16'], 2)} | "
                     f"{_f(o['speedup_batch1'], 2)} / {_f(o['speedup_batch16'], 2)} | {_f(t['flop_bound'], 2)} |")
    return lines + [""]


def write_md(results: Path = common.RESULTS, out: Path = HERE / "EXPORT.md") -> Path:
    import json
    lines = ["# ONNX export and latency-aware allocation", "",
             "Generated by `python bench/export_latency.py` from `bench/results/export_*.json` and "
             "`objective_*.json`. Every number is as measured on the shared 2-core machine (other jobs running: "
             "latencies are noisy, speedups are medians of paired runs).", ""]
    for kind, fn in (("export", export_md), ("objective", objective_md)):
        for p in sorted(results.glob(f"{kind}_*.json")):
            r = json.loads(p.read_text())
            if r["model"].startswith("tiny"):
                continue
            lines += fn(r)
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--parts", nargs="*", default=["export", "objective"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--keeps", nargs="*", type=float, help="keeps of the objective part (default: per model)")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args(argv)
    if not a.report_only:
        import tempfile
        for b in common.benches(a.quick, a.models):
            with tempfile.TemporaryDirectory() as tmp:
                if "export" in a.parts:
                    common.write_json(f"export_{b.name}", export_part(b, Path(tmp), a.repeats))
                if "objective" in a.parts:
                    common.write_json(f"objective_{b.name}", objective_part(b, Path(tmp), a.repeats, a.keeps))
    if not a.quick:
        print(write_md())


if __name__ == "__main__":
    main()
