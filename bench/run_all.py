"""The one command: every benchmark, then BENCHMARKS.md from the JSON results.

    python bench/run_all.py                 # full run (needs `python bench/prepare.py` once)
    python bench/run_all.py --quick         # smoke run on tiny random models (~1 min), results in a temp dir
    python bench/run_all.py --report-only   # rewrite BENCHMARKS.md from bench/results/*.json

Steps (each a subprocess, so one failure is reported and the rest still run): quality curves (+ compression time
vs limit), latency vs FLOP bound, tltorch peers, peak memory; then the other engineers' scripts when present
(bench/beat_svdllm.py, depth_and_heal.py, structures_speed.py, mnist_structures.py, export_latency.py, moe.py;
`--skip-others` skips them).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OTHERS = ("beat_svdllm.py", "depth_and_heal.py", "structures_speed.py", "mnist_structures.py", "export_latency.py",
          "elastic.py", "moe.py", "bytes.py", "pieces.py", "linear_peers.py")
OTHER_DOCS = (("Beating SVD-LLM (methods, allocation, sequential calibration)", "bench/BEAT_SVDLLM.md"),
              ("Depth: dropping blocks and healing", "bench/DEPTH_HEAL.md"),
              ("Structured layers (speed, MNIST)", "bench/STRUCTURES.md"),
              ("Streaming past RAM (Qwen2.5-Coder-1.5B, Gemma streamed vs in memory, Ray)", "bench/STREAM.md"),
              ("ONNX export and latency-aware allocation (--objective params vs latency)", "bench/EXPORT.md"),
              ("Convolutions on real CNNs (MNIST CNN, EfficientNet-Lite0, CRAFT) vs tltorch and aimet-torch",
               "bench/CONV.md"),
              ("The default compression's cost against its limit; how many tokens the Fisher needs", "bench/COST.md"),
              ("Elastic size: one file, every keep (vs a direct compression at each keep)", "bench/ELASTIC.md"),
              ("MoEfication: FFNs as mixtures of experts vs low rank at equal FFN FLOPs", "bench/MOE.md"),
              ("Bytes vs quality: low rank, int8 / int4 storage, the embedding, against quantization and the GGUF",
               "bench/BYTES.md"),
              ("Quality past the records: each new piece of the default in a row of its own", "bench/PIECES.md"),
              ("Linear-layer peers side by side (goldcrest SVD / ASVD / whitening, ptdeco FALOR, aimet-torch weight "
               "SVD) at layerzip's parameter count", "bench/LINEAR_PEERS.md"))


def steps(a) -> list[list[str]]:
    q = ["--quick"] if a.quick else []
    models = ["--models", *a.models] if a.models else []
    methods = ["--methods", *a.methods] if a.methods else []
    th = ["--threads", str(a.threads)] if a.threads else []
    out = [["quality.py", *q, *models, *methods, *th], ["latency.py", *q, *models, *th],
           ["peers.py", *q, *models, *th], ["memory.py", *q, *models], ["experts_speed.py", *q, *th]]
    if not a.quick and not a.skip_others:
        out += [[s] for s in OTHERS if (HERE / s).is_file()]
    return out


def run(a) -> dict:
    log = {}
    for cmd in steps(a):
        t = time.perf_counter()
        print(f"== {' '.join(cmd)}", flush=True)
        p = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]], cwd=ROOT)
        log[" ".join(cmd)] = {"seconds": round(time.perf_counter() - t, 1), "returncode": p.returncode}
    return log


# ------------------------------------------------------------------------------------------------------ report
def _load(results: Path, name: str):
    p = results / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _f(x, nd=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{nd}g}" if abs(x) < 1 else f"{x:.{nd}f}".rstrip("0").rstrip(".")
    return str(x)


def _order(names) -> list[str]:
    """Registered methods in registry order (low rank, drop-blocks, structures), then anything else (peers)."""
    try:
        sys.path.insert(0, str(HERE))
        import common
        reg = common.methods()
    except Exception:   # the report must not depend on importing the package
        reg = []
    names = list(dict.fromkeys(names))
    return [m for m in reg if m in names] + [m for m in names if m not in reg]


STRUCTURE_NOTES = {
    "drop-blocks": "drop-blocks: keep → the number of whole blocks removed, n = round((1 − keep) · blocks) (span rule); "
                   "the cell gives the fraction of block-linear parameters left and n. Two keeps can round to the same "
                   "n (same model).",
    "hadamard": "hadamard: the rank R is capped at R² ≤ min(in, out) (the Hadamard product of two rank-R factors has "
                "rank ≤ R²), so every keep above ≈ 0.15 gives the same model (kept 0.14 on MiniLM, 0.10 on Gemma): "
                "the curve is flat by construction. ALS projection, 30 rounds (default).",
    "blast": "blast: `choose_shape` picks, among shapes within 10% of the budget, the fewest FLOPs, which on these "
             "layers is mostly 1 block (= a truncated SVD of W, no ALS needed); a few square/short layers get 2 blocks "
             "(100 ALS rounds, default).",
    "kronecker": "kronecker, tt: more FLOPs than the dense layer at equal parameters (a quality table, not a speed "
                 "one).",
    "btt": "btt, monarch, kronecker, hadamard, blast, tt: no calibration (Frobenius projection of W). "
           "`choose_shape` takes, among the shapes within 10% of the parameter budget, the one with the fewest FLOPs, "
           "so they keep ≈ 0.9 × keep (\"kept\").",
}


def quality_md(q: dict, peers: dict | None, rel: str) -> list[str]:
    metric = q["metric"]
    keeps = sorted({r["keep"] for r in q["rows"]}, reverse=True)
    extra = " / MRR / cosine to dense" if metric == "recall_at_1" else ""
    out = [f"### {q['title']}: {metric.replace('_', ' ')}{extra} (dense: {_f(q['dense'][metric], 4)}"
           + (f", MRR {_f(q['dense']['mrr'], 3)}" if "mrr" in q["dense"] else "") + ")", "",
           "| method | " + " | ".join(f"keep {k}" for k in keeps) + " |", "|---" * (len(keeps) + 1) + "|"]
    rows = [(r["method"], r) for r in q["rows"]] + [(f"tltorch {r['method']}", r) for r in (peers or {}).get("rows", [])]
    by: dict = {}
    for name, r in rows:
        by.setdefault(name, {})[r["keep"]] = r
    for name in _order(by):
        cells = by[name]
        vals = []
        for k in keeps:
            r = cells.get(k)
            if r is None:
                vals.append("–")
            elif "error" in r:
                vals.append("error")
            elif metric == "recall_at_1":
                vals.append(f"{r['recall_at_1']:.3f} / {r['mrr']:.3f} / {r['cosine_to_dense']:.3f}")
            else:
                vals.append(_f(r[metric], 4))
            if r is not None and "error" not in r and "dropped_blocks" in r:
                n = len(r["dropped_blocks"])
                vals[-1] += f" (kept {r['keep_achieved']:.2f}, −{n} block{'s' * (n > 1)})"
            elif r is not None and abs(r.get("keep_achieved", k) - k) > 0.02:
                vals[-1] += f" (kept {r['keep_achieved']:.2f})"
        out.append(f"| {name} | " + " | ".join(vals) + " |")
    errs = {f"{n}": r["error"] for n, c in by.items() for r in c.values() if "error" in r}
    for n, e in errs.items():
        out.append(f"\n- `{n}` failed: {e}")
    notes = [v for k, v in STRUCTURE_NOTES.items() if k in by]
    structured = ("btt", "monarch", "kronecker", "hadamard", "blast", "tt")
    merged = [r for r in q["rows"] if r.get("eval_merged_layers")]
    if merged:
        own: dict = {}
        for r in q["rows"]:
            if r["method"] in structured and "error" not in r and not r.get("eval_merged_layers"):
                own.setdefault(r["method"], []).append(r["keep"])
        own_txt = ", ".join(m + ("" if len(ks) == len(by[m]) else " " + "/".join(map(str, sorted(ks, reverse=True))))
                            for m, ks in own.items())
        notes.append(f"{len(merged)} structured rows were scored through the merged dense weight (`nn.Linear` of "
                     "`dense_weight()`: the same function up to float32 rounding; the structures' own CPU forwards "
                     "are up to 50× slower at these shapes)" + (f"; {own_txt} through their own forward (scored "
                     "both ways, MiniLM monarch and tt at keep 0.5 agree to 1e-7)" if own else "") + ".")
    planned = {}
    for m, ks in (q["bench"].get("method_keeps") or {}).items():
        if m in by:
            planned.setdefault(tuple(ks), []).append(m)
    if planned:
        notes.append("Fewer keeps on this model (a full curve does not fit one run's time on this machine; "
                     "`common.GEMMA_METHOD_KEEPS`): " + "; ".join(f"{', '.join(ms)} at {', '.join(map(str, ks))}"
                                                                  for ks, ms in planned.items()) + ".")
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    if peers:
        out.append("\ntltorch rows: `from_linear(rank=keep)` does not land on the asked parameter count; "
                   "\"(kept x)\" gives the fraction it actually kept.")
    b = q["bench"]
    out += ["", f"![{q['title']} quality]({rel}/quality_{q['model']}.png)", "",
            (f"Perplexity on {b['eval_windows']} held-out windows × {b['eval_seq_len']} tokens (BOS first). "
             if q["metric"] == "perplexity" else
             f"Recall@1 / MRR over {b['retrieval_pairs']} held-out {{query, doc}} pairs (each query ranked against "
             f"all docs by cosine); cosine: mean cosine to the dense model's embedding of {b['cosine_texts']} "
             "held-out paragraphs. ")
            + f"Calibration: {b['calib_samples']} × {b['calib_seq_len']} tokens of python-docs text disjoint from "
            "the evaluation text. The plot's x is the fraction of block-linear parameters actually kept.", ""]
    return out


def speed_md(q: dict) -> list[str]:
    lim = q["limit"]
    out = [f"### {q['title']} (limit = plain forward over the {lim['calib_tokens']} calibration tokens "
           f"{_f(lim['seconds_forward'])} s + bare float64 SVD of the {lim['targets']} targets {_f(lim['seconds_svd'])} s)",
           "", "| method | keep | calibration forward s | statistics s | decomposition s | save s | total s | limit s | "
           "total / limit |", "|---|---|---|---|---|---|---|---|---|"]
    for r in q["rows"]:
        t = r.get("timing")
        if t:
            out.append(f"| {r['method']} | {r['keep']} | {_f(t['calibration_forward'])} | {_f(t['statistics'])} | "
                       f"{_f(t['decomposition'])} | {_f(t['save'])} | {_f(t['total'])} | {_f(t['limit'])} | "
                       f"**{_f(t['ratio_to_limit'])}** |")
    return out + [""]


def latency_md(lat: dict, peers: dict | None, rel: str) -> list[str]:
    d = lat["dense"]
    out = [f"### {lat['title']} ({lat['seq_len']} tokens per sequence, {lat['threads']} thread; dense "
           f"{_f(d['latency_ms_batch1'])} ms at batch 1, {_f(d['latency_ms_batch16'])} ms at batch 16; "
           f"{_f(d['flops_per_token'] / 1e6)} MFLOP/token, of which LM head {_f(d['flops_per_token_lm_head'] / 1e6)})",
           "", "| layers | keep | FLOP bound | speedup b1 | speedup b16 | speedup / bound b1 | speedup / bound b16 |",
           "|---|---|---|---|---|---|---|"]
    for r in lat["rows"]:
        out.append(f"| low rank | {r['keep']} | {_f(r['flop_bound'])} | {_f(r['speedup_batch1'])} | "
                   f"{_f(r['speedup_batch16'])} | {_f(r['speedup_over_bound_batch1'])} | "
                   f"{_f(r['speedup_over_bound_batch16'])} |")
    for r in (peers or {}).get("rows", []):
        if "speedup_batch1" in r:
            out.append(f"| tltorch {r['method']} | {r['keep']} | {_f(r['flop_bound'])} | {_f(r['speedup_batch1'])} | "
                       f"{_f(r['speedup_batch16'])} | {_f(r['speedup_batch1'] / r['flop_bound'])} | "
                       f"{_f(r['speedup_batch16'] / r['flop_bound'])} |")
    slow = lat["slower_layers"]
    out += ["", f"Per layer (dense `F.linear` vs the two GEMMs of `LowRankLinear`, {len(lat['layers'])} shape × keep"
            f" × tokens cases): **{len(slow)} slower than dense**"
            + (": " + ", ".join(f"{s['out']}×{s['in']} rank {s['rank']} (keep {s['keep']}, {s['tokens']} tokens, "
                                f"{s['speedup']:.2f}×)" for s in slow[:8]) + (" …" if len(slow) > 8 else "")
               if slow else "."),
            "", f"![{lat['title']} latency]({rel}/latency_{lat['model']}.png)", ""]
    return out


def dense_rule_md(results: Path, models: list[str]) -> list[str]:
    """Where factorized layers lose to dense, by keep, from the per-layer timings."""
    by: dict = {}
    for m in models:
        lat = _load(results, f"latency_{m}")
        for x in (lat or {}).get("layers", []):
            c = by.setdefault(x["keep"], [0, 0, []])
            c[0] += x["slower_than_dense"]
            c[1] += 1
            c[2].append(x["speedup"])
    if not by:
        return []
    out = ["### Where a factorized layer is slower than its dense layer", "",
           "| keep | FLOP ratio mn / r(m+n) | cases slower than dense | median per-layer speedup |", "|---|---|---|---|"]
    for k in sorted(by, reverse=True):
        slow, n, sp = by[k]
        out.append(f"| {k} | ≈ {1 / k:.2f} | {slow} / {n} | {sorted(sp)[len(sp) // 2]:.2f} |")
    return out + ["", "Two skinny GEMMs only pay off once they save enough FLOPs: near keep 0.9 (FLOP ratio ≈ 1.1) the "
                  "factorized layer is about as fast as the dense one or slower. `compress` still factorizes those "
                  "layers, because `--keep` is a parameter budget (keeping them dense would overshoot it); "
                  "`--alloc global --objective latency` keeps them dense (see the section on ONNX export and "
                  "latency-aware allocation below). Timings on a shared, loaded machine are noisy: single cases far above "
                  "their FLOP ratio are preemption of the dense run, not real gains.", ""]


def memory_md(mem: dict) -> list[str]:
    out = ["| model | method | peak RSS MiB | dense weights MiB | Grams MiB | largest step (peak growth MiB) |",
           "|---|---|---|---|---|---|"]
    for r in mem["rows"]:
        if "error" in r:
            out.append(f"| {r['model']} | error: {r['error']} | | | | |")
            continue
        step = r["dominant_stage"]
        out.append(f"| {r['model']} | {r['method']} keep {r['keep']} | {_f(r['peak_mb'])} | "
                   f"{_f(r['dense_weights_mb'])} | {_f(r.get('gram_mb'))} | {step} "
                   f"(+{_f(r['peak_increase_by_stage_mb'][step])}) |")
    out += ["", "Peak growth per stage: `start->loaded` is the dense model; `loaded->calibrated` the float64 "
            "Grams (one per distinct input) plus the activations of one calibration batch; "
            "`calibrated->decomposed` the float64 copies, whitening factors and SVD workspaces plus the new "
            "factors; `decomposed->saved` the serialized tensors.", ""]
    if mem.get("cli"):
        out += ["The whole default command (`python bench/memory.py --cli`: `layerzip compress MODEL --keep 0.8 "
                "--calib docs_calib.txt`, each in a fresh process), healed (the default for a causal LM: a second "
                "copy of the model as the teacher, AdamW on the factors) and not:", "",
                "| model | command | healed | peak RSS MiB | ÷ dense bytes | seconds |", "|---|---|---|---|---|---|"]
        for r in mem["cli"]:
            if "error" in r:
                out.append(f"| {r['model']} | error: {r['error']} | {r['healed']} | | | |")
                continue
            out.append(f"| {r['model']} | `{r['command']}` | {'yes' if r['healed'] else 'no'} | {_f(r['peak_mb'])} | "
                       f"{_f(r['peak_mb'] / r['bytes_before_mb'])} | {r['seconds']:.0f} |")
        out.append("")
    return out


def replot(results: Path) -> None:
    """Redraw every figure from the saved JSON (never from live model state)."""
    sys.path.insert(0, str(HERE))
    import latency
    import quality
    for p in sorted(results.glob("quality_*.json")):
        m = p.stem.removeprefix("quality_")
        quality.plot(json.loads(p.read_text()), _load(results, f"peers_{m}"), results)
        lat = _load(results, f"latency_{m}")
        if lat:
            latency.plot(lat, results)


def write_benchmarks_md(results: Path, out: Path, runtime: dict | None = None) -> Path:
    rel = os.path.relpath(results, out.parent)
    models = [p.stem.removeprefix("quality_") for p in sorted(results.glob("quality_*.json"))]
    qs = {m: _load(results, f"quality_{m}") for m in models}
    env = next((q["env"] for q in qs.values() if q), {})
    lines = ["# Benchmarks", "",
             f"Generated by `python bench/run_all.py` (see [bench/README.md](bench/README.md)) from the JSON in "
             f"`{rel}/`. Every number below is as measured; ratios are against limits measured in the same run.", "",
             f"Machine: {env.get('cpu', '?')}, {env.get('cores', '?')} cores (shared with other jobs; 1-min load "
             f"average at start {_f(env.get('load_average_1min'))}). Date: {env.get('date', '?')}. Versions: "
             f"python {env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
             f"layerzip {env.get('layerzip')}.", ""]
    if runtime:
        lines += ["Runtime of this run: " + ", ".join(f"`{k}` {v['seconds']:.0f} s" + ("" if v["returncode"] == 0
                                                                                    else " (failed)")
                                                   for k, v in runtime.items()), ""]
    lines += ["### Scope of this run", ""]
    for m, q in qs.items():
        done = sorted({r["method"] for r in q["rows"]})
        keeps = sorted({r["keep"] for r in q["rows"]}, reverse=True)
        lines.append(f"- {q['title']}: methods {', '.join(done)}; keeps {', '.join(map(str, keeps))}.")
    try:
        sys.path.insert(0, str(HERE))
        import common
        missing = [x for x in common.methods() if not any(x in {r["method"] for r in q["rows"]} for q in qs.values())]
        if missing:
            lines.append(f"- Registered but not in these tables (the default run includes them; this shared 2-core "
                         f"machine had no time for them): {', '.join(missing)}. Their own benchmarks are linked at "
                         "the end.")
    except Exception:   # the report must not depend on importing the package
        pass
    lines += ["", "## Quality vs keep", ""]
    for m, q in qs.items():
        lines += quality_md(q, _load(results, f"peers_{m}"), rel)
    lines += ["## Compression time against its limit", "",
              "Each row is the first (fresh) compression of its method in a quality run, against the limit measured "
              "in that same process: `calibration forward` = the limit's plain forward, `statistics` = the rest of "
              "the hooked calibration, `decomposition` includes svd-llm's sequential block-by-block calibration. "
              "Rows from different processes ran under different loads of this shared machine; a ratio below 1 "
              "means the load dropped between the limit's measurement and the method's run. The structures use no "
              "calibration (their limit is the bare SVDs) and some need less than an SVD (ratio < 1); hadamard and "
              "blast (with 2 blocks) run ALS.", ""]
    for q in qs.values():
        lines += speed_md(q)
    lines += ["## Inference speed against the FLOP bound", ""]
    for m in models:
        lat = _load(results, f"latency_{m}")
        if lat:
            lines += latency_md(lat, _load(results, f"peers_{m}"), rel)
    lines += dense_rule_md(results, models)
    experts = _load(results, "experts_speed")
    if experts:
        sys.path.insert(0, str(HERE))
        import experts_speed
        lines += ["### MoE experts", ""] + experts_speed.markdown(experts)
    mem = _load(results, "memory")
    if mem:
        lines += ["## Peak memory of compress", ""] + memory_md(mem)
    inst = _load(results, "peers_install")
    cp = _load(results, "peers_cp_probe")
    if inst or cp:
        lines += ["## Peers that were not run", ""]
    if cp:
        lines.append(f"- tltorch CP: at keep {cp['keep']} a {cp['shape'][0]}×{cp['shape'][1]} MiniLM weight "
                     f"(tensorized {cp['tensorized']}) gets CP rank {cp['cp_rank']}; one ALS iteration of "
                     f"`from_linear` on that one layer took {cp['seconds_one_als_iteration_one_layer']:.0f} s, so "
                     "the default 100 iterations × 36 layers is out of reach on this machine.")
    if inst:
        for pkg, i in inst.items():
            lines.append(f"- `{pkg}` ({i['api']}): a dry-run install resolves {i.get('resolved')} "
                         f"({i.get('packages')} packages) — a different torch than ours, with its CUDA wheels; "
                         "it would need its own multi-GB environment, so it was not run.")
        lines.append("")
    lines += ["## Results of the other benchmark scripts", ""]
    for title, doc in OTHER_DOCS:
        lines += [f"### {title}", "", f"From [{doc}]({doc}), written by its script's run:" if (ROOT / doc).is_file()
                  else "not run yet", ""]
        if (ROOT / doc).is_file():
            lines += _inline(ROOT / doc)
    out.write_text("\n".join(lines) + "\n")
    return out


def _inline(doc: Path) -> list[str]:
    """A bench/*.md section inside BENCHMARKS.md: its title dropped, headings one level down, links re-rooted."""
    text = doc.read_text().split("\n")
    if text and text[0].startswith("# "):
        text = text[1:]
    rel = doc.parent.relative_to(ROOT).as_posix()
    out = []
    for line in text:
        if line.startswith("#"):
            line = "##" + line
        out.append(re.sub(r"\]\((?!https?:|/|#)", f"]({rel}/", line))
    return out + [""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random models, results in a temp dir (smoke run)")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--methods", nargs="*", help="default: every registered method")
    ap.add_argument("--threads", type=int, help="torch threads for quality, latency and peers (their default: 1)")
    ap.add_argument("--skip-others", action="store_true", help="do not run the other engineers' bench scripts")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--results", help="results directory (default bench/results; --quick: a temp dir)")
    a = ap.parse_args(argv)
    results = Path(a.results or (tempfile.mkdtemp(prefix="layerzip-bench-") if a.quick else HERE / "results"))
    os.environ["LAYERZIP_BENCH_RESULTS"] = str(results)
    runtime = None
    if not a.report_only:
        t = time.perf_counter()
        runtime = run(a)
        runtime["total"] = {"seconds": time.perf_counter() - t, "returncode": 0}
        (results / "runtime.json").write_text(json.dumps(runtime, indent=1))
    else:
        p = results / "runtime.json"
        runtime = json.loads(p.read_text()) if p.is_file() else None
    replot(results)
    out = results / "BENCHMARKS.md" if a.quick else ROOT / "BENCHMARKS.md"
    print(f"wrote {write_benchmarks_md(results, out, runtime)}")
    failed = [k for k, v in (runtime or {}).items() if v["returncode"]]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
