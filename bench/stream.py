"""Streaming past RAM: `layerzip compress` of a real 1.5B model, one block in memory at a time.

Each run is the real command line in a fresh process; this script samples its resident memory (psutil, every
0.2 s) and tags each sample with the stage the progress bars show (gradients forward / backward, spectra walk,
decomposition walk, save). Then the compressed and the dense model are scored, streamed too, on held-out
python-docs windows.

    python bench/stream.py [--model qwen|gemma] [--blocks 28 14] [--calib-samples 64] [--keep 0.8]
                           [--refine-steps N]           # default: the CLI's (svd-llm: 32 on causal LMs)
    python bench/stream.py --model gemma --compare-in-memory     # the same run with --no-stream: ranks, perplexity
    python bench/stream.py --ray-workers 1 2                     # MiniLM, --executor ray on 1 then 2 workers
    python bench/stream.py --report                              # bench/STREAM.md from the JSON (run_all inlines it)

Limits measured in the same run: one streamed forward of the dense model over the calibration tokens (the eval
of the dense model gives its time per token), and the bare float64 SVDs of one block's target weights × blocks
(every block has the same shapes). `--blocks K`: the same model cut to its first K blocks (a directory whose
config says K layers and whose index lists only their tensors, the shards linked), to show that peak memory does
not grow with depth. Rows are merged into bench/results/stream_<model>.json by (blocks, calibration windows,
refinement steps), so runs of different depths or settings add up; stream_<model>.png plots every row's peak per stage. Each compression
writes to bench/cache/stream_runs/ until its row is kept, so a run cut short (a session's end) continues from its
last finished block when the same command is given again.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common
import data

MB = 2 ** 20
WALKS = ["spectra walk", "decomposition walk"]    # global allocation's two walks over the blocks


def cut(src: Path, blocks: int, dst: Path) -> Path:
    """`src` cut to its first `blocks` blocks (shards linked, not copied)."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = blocks
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][:blocks]
    (dst / "config.json").write_text(json.dumps(cfg))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    keep = {k: v for k, v in index["weight_map"].items()
            if not (m := re.search(r"\.layers\.(\d+)\.", k)) or int(m.group(1)) < blocks}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors.index.json") and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    return dst


def monitored(cmd: list[str]) -> dict:
    """Run `cmd`, sampling its RSS and the stage its stderr progress bars name. Returns the samples, the peak,
    per-stage peaks, the seconds and the last stdout line (the --json report)."""
    import psutil
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ,
                                                                                     "TQDM_MININTERVAL": "1"})
    proc = psutil.Process(p.pid)
    stage = ["load + capture"]
    samples = []
    err_tail: list[str] = []

    def read_err():                 # the stage: the progress bar most recently drawn
        walks, in_walk = 0, False
        while chunk := p.stderr.read1(65536):
            for seg in re.split(r"[\r\n]", chunk.decode(errors="replace")):
                if "gradients: forward" in seg:
                    stage[0] = "gradients: forward"
                elif "gradients: backward" in seg:
                    stage[0] = "gradients: backward"
                elif re.search(r"decomposing \(.*\d+%", seg):     # the second walk, statistics read from disk
                    walks = len(WALKS)
                    stage[0] = "save" if "100%" in seg else "decomposition (statistics from disk)"
                elif re.search(r": blocks:\s+\d+%", seg):
                    if not in_walk:
                        walks, in_walk = walks + 1, True
                        stage[0] = WALKS[min(walks, len(WALKS)) - 1]
                    if "100%" in seg:
                        in_walk = False
                        stage[0] = "save" if walks >= len(WALKS) else stage[0]
                if seg.strip():
                    err_tail[:] = (err_tail + [seg])[-5:]
    th = threading.Thread(target=read_err, daemon=True)
    th.start()
    while p.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            break
        samples.append((round(time.perf_counter() - t0, 2), rss / MB, stage[0]))
        time.sleep(0.2)
    out = p.stdout.read().decode()
    p.wait()
    th.join(timeout=5)
    seconds = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {err_tail}")
    per_stage: dict[str, float] = {}
    for _, mb, s in samples:
        per_stage[s] = max(per_stage.get(s, 0.0), mb)
    return {"seconds": seconds, "peak_rss_mb": max(mb for _, mb, _ in samples), "peak_by_stage_mb": per_stage,
            "samples": samples, "report": json.loads(out.strip().splitlines()[-1])}


def bare_svds_seconds(model_dir: Path, blocks: int) -> float:
    """float64 SVD of every target weight of block 0, × blocks (all blocks have the same shapes)."""
    import torch
    from safetensors import safe_open
    f = model_dir / "model.safetensors.index.json"
    if f.is_file():
        index = json.loads(f.read_text())["weight_map"]
    else:
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as h:
            index = {k: "model.safetensors" for k in h.keys()}
    keys = [k for k in index if re.search(r"\.layers\.0\..*(proj|fc|dense|query|key|value)\w*\.weight$", k)]
    t = 0.0
    for k in keys:
        with safe_open(str(model_dir / index[k]), framework="pt") as h:
            W = h.get_tensor(k).double()
        t0 = time.perf_counter()
        torch.linalg.svd(W, full_matrices=False)
        t += time.perf_counter() - t0
    return t * blocks


def lz_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "layerzip.cli", *map(str, args)]


def ranks_of(out: Path) -> dict:
    return json.loads((out / "layerzip.json").read_text())["report"]["ranks"]


def refine_steps_of(row: dict) -> int:
    """Block refinement steps of a row (rows measured before refinement existed had none)."""
    return ((row.get("report") or {}).get("refine") or {}).get("steps", 0)


def dense_eval(model: str, windows: int) -> dict | None:
    """The dense model's streamed eval from the newest stored row of the same held-out windows (the dense model and
    the windows do not change between runs): spares the slowest part of a rerun."""
    f = common.RESULTS / f"stream_{model}.json"
    for r in reversed(json.loads(f.read_text())["rows"] if f.is_file() else []):
        ev = r.get("eval") or {}
        if ev.get("windows") == windows and ev.get("dense_eval_tokens"):
            return {"perplexity": ev["dense_perplexity"], "seconds": ev["dense_eval_seconds"],
                    "tokens": ev["dense_eval_tokens"], "from_row": r.get("code")}
    return None


def run(model: str, blocks_list: list[int], calib_samples: int, keep: float, eval_windows: int,
        compare: bool = False, refine_steps: int | None = None) -> dict:
    src = data.qwen_dir() if model == "qwen" else data.gemma_dir()
    full = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    text = data.TEXT_DIR / "docs_eval.txt"
    rows = []
    runs = common.RESULTS.parent / "cache" / "stream_runs"       # kept until the row is: a cut run continues
    with tempfile.TemporaryDirectory(dir=common.RESULTS.parent / "cache") as tmp:
        tmp = Path(tmp)
        for n in blocks_list:
            d = src if n == full else cut(src, n, runs / f"{model}-cut{n}")
            out = runs / f"{model}-{n}-c{calib_samples}-k{keep}-r{refine_steps}"
            args = ["--keep", keep, "--calib", data.TEXT_DIR / "docs_calib.txt", "--calib-samples", calib_samples,
                    "--json"] + ([] if refine_steps is None else ["--refine-steps", refine_steps])
            done = out.with_name(out.name + ".compress.json")     # a finished compression whose row is not kept
            if (out / "layerzip.json").is_file() and done.is_file():
                comp = json.loads(done.read_text())
            else:
                comp = monitored(lz_cmd("compress", d, "--out", out, "--stream", "--force", *args))
                done.write_text(json.dumps(comp))
            row = {"blocks": n, "compress": {k: v for k, v in comp.items() if k != "report"},
                   "report": {k: comp["report"].get(k) for k in (
                       "keep_achieved", "params_before", "params_after", "seconds", "calibration",
                       "size_on_disk_before", "size_on_disk_after", "streamed", "refine", "resumed_from_block")}}
            if n == full:
                ev = monitored(lz_cmd("eval", out, "--stream", "--text", text, "--samples", 4 * eval_windows,
                                      "--json"))
                dense = dense_eval(model, ev["report"]["windows"])
                if dense is None:
                    r = monitored(lz_cmd("eval", d, "--stream", "--text", text, "--samples", 4 * eval_windows,
                                         "--json"))
                    dense = {"perplexity": r["report"]["perplexity"], "seconds": r["seconds"],
                             "tokens": r["report"]["tokens"], "from_row": None}
                row["eval"] = {"perplexity": ev["report"]["perplexity"], "dense_perplexity": dense["perplexity"],
                               "ratio": ev["report"]["perplexity"] / dense["perplexity"],
                               "windows": ev["report"]["windows"], "eval_peak_rss_mb": ev["peak_rss_mb"],
                               "dense_eval_seconds": dense["seconds"], "dense_eval_tokens": dense["tokens"],
                               "dense_eval_from_row": dense["from_row"]}
                tokens = (comp["report"].get("calibration") or {}).get("tokens") or 0
                forward = dense["seconds"] * tokens / max(dense["tokens"], 1)
                svds = bare_svds_seconds(src, n)
                row["limit"] = {"forward_seconds_est": forward, "bare_svds_seconds": svds,
                                # a resumed run's seconds cover only its resumed part
                                "compress_over_limit": None if comp["report"].get("resumed_from_block")
                                else comp["seconds"] / (forward + svds)}
                if compare:             # the same compression in memory: ranks, perplexity, memory, time (not
                    # healed: a streamed run is not, so the in-memory default's healing is turned off)
                    mem = monitored(lz_cmd("compress", d, "--out", tmp / "mem", "--no-stream", "--heal-steps", "0",
                                           *args))
                    ev_mem = monitored(lz_cmd("eval", tmp / "mem", "--no-stream", "--text", text, "--samples",
                                              4 * eval_windows, "--json"))
                    a, b = ranks_of(out), ranks_of(tmp / "mem")
                    row["in_memory"] = {"peak_rss_mb": mem["peak_rss_mb"], "seconds": mem["seconds"],
                                        "perplexity": ev_mem["report"]["perplexity"],
                                        "ranks_equal": a == b, "ranks_differing": sum(a[n] != b[n] for n in a),
                                        "perplexity_rel_diff": ev["report"]["perplexity"]
                                        / ev_mem["report"]["perplexity"] - 1}
            row.update(calib_samples=calib_samples, code=common.code_version())
            rows.append(row)
            merge(f"stream_{model}", {"model": model, "keep": keep, "calib_samples": calib_samples, "rows": [row],
                                      "env": common.env()})          # each row kept as soon as it is measured
            print(json.dumps({k: v for k, v in row.items() if k != "compress"}, default=str), flush=True)
            shutil.rmtree(out, ignore_errors=True)
            done.unlink()
    res = {"model": model, "keep": keep, "calib_samples": calib_samples, "rows": rows, "env": common.env()}
    if len(rows) > 1:
        peaks = [r["compress"]["peak_rss_mb"] for r in rows]
        res["peak_spread"] = max(peaks) / min(peaks) - 1
    return res


def merge(name: str, res: dict) -> dict:
    """`res`'s rows replace the stored rows of the same (blocks, calibration windows, refinement steps); the
    others are kept."""
    f = common.RESULTS / f"{name}.json"
    old = json.loads(f.read_text()) if f.is_file() else {"rows": []}
    key = lambda r: (r["blocks"], r.get("calib_samples", old.get("calib_samples")), refine_steps_of(r))  # noqa: E731
    for r in res["rows"]:
        r.setdefault("calib_samples", res["calib_samples"])
        r.setdefault("env", res["env"])
    new = {key(r) for r in res["rows"]}
    rows = [r for r in old["rows"] if key(r) not in new] + res["rows"]
    out = {**old, **{k: v for k, v in res.items() if k != "rows"}, "rows": sorted(rows, key=key)}
    common.write_json(name, out)
    return out


def plot(res: dict, path: Path) -> None:
    """Peak resident memory per stage, one group of bars per row (depth, calibration windows)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stages = list(dict.fromkeys(s for r in res["rows"] for s in r["compress"]["peak_by_stage_mb"]))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(res["rows"]), 1)
    for i, r in enumerate(res["rows"]):
        peaks = r["compress"]["peak_by_stage_mb"]
        ax.bar([j + i * width for j in range(len(stages))], [peaks.get(s, 0) / 1024 for s in stages], width,
               label=f"{r['blocks']} blocks, {r.get('calib_samples')} windows ({r.get('code', 'earlier code')})")
    ax.axhline(4, color="red", lw=0.8, ls="--", label="4 GiB target")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(stages))], stages, rotation=15, fontsize=8)
    ax.set_ylabel("peak resident memory (GiB)")
    ax.set_title(f"layerzip compress --stream, {res['model']}, keep {res['keep']}: peak memory per stage")
    ax.legend(fontsize=7)
    common.save_figure(fig, path)


def ray_rows(workers: list[int], keep: float = 0.5) -> dict:
    """MiniLM compressed with --executor ray on a local cluster of 1, then 2, workers (and the local executor):
    seconds of the whole command and of the decompositions, and whether the ranks agree."""
    rows, ranks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in [None, *workers]:
            out = Path(tmp) / f"o{w}"
            extra = ["--executor", "ray", "--workers", w] if w else []
            r = monitored(lz_cmd("compress", "minilm", "--out", out, "--keep", keep, "--json", *extra))
            ranks[w] = ranks_of(out)
            rows.append({"executor": f"ray, {w} workers" if w else "local", "seconds": r["seconds"],
                         "seconds_decomposition": r["report"].get("seconds_decomposition"),
                         "peak_rss_mb": r["peak_rss_mb"], "ranks_equal_local": ranks[w] == ranks[None]})
    return {"model": "minilm", "keep": keep, "rows": rows, "env": common.env()}


def _load_of(env: dict) -> str:
    x = env.get("load_average_1min", "")
    return f"{x:.1f}" if isinstance(x, float) else str(x)


def report() -> Path:
    """bench/STREAM.md from stream_qwen.json, stream_gemma.json and stream_ray.json."""
    def load(name):
        f = common.RESULTS / f"{name}.json"
        return json.loads(f.read_text()) if f.is_file() else None
    gib = lambda mb: f"{mb / 1024:.2f}"   # noqa: E731
    lines = ["# Streaming past RAM", "",
             "`bench/stream.py`: the real `layerzip compress DIR --keep K --stream` (svd-llm defaults: global "
             "allocation + output Fisher, i.e. a block-wise backward and two walks over the blocks) in a fresh "
             "process whose resident memory (RSS, children included) is sampled every 0.2 s and tagged with the stage "
             "its progress bars show; then `layerzip eval --stream` of the output and of the dense model on held-out "
             "python-docs windows (full depth only). Limit = one forward over the calibration tokens (from the "
             "streamed dense eval's time per token) + bare float64 SVDs of every target.", ""]
    for model in ("qwen", "gemma"):
        res = load(f"stream_{model}")
        if not res:
            continue
        lines += [f"## {model}", "", f"![](results/stream_{model}.png)", "",
                  "| blocks | windows (tokens) | code | peak RSS GiB | peak by stage (GiB) | seconds | keep_achieved "
                  "| perplexity (dense) | ratio | compress ÷ limit | load (1 min) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            c, ev, lim = r["compress"], r.get("eval"), r.get("limit")
            stages = ", ".join(f"{k} {gib(v)}" for k, v in c["peak_by_stage_mb"].items())
            tokens = ((r.get("report") or {}).get("calibration") or {}).get("tokens", "")
            lines.append(
                f"| {r['blocks']} | {r.get('calib_samples')} ({tokens}) | {r.get('code', 'earlier code')} | "
                f"**{gib(c['peak_rss_mb'])}** | {stages} | {c['seconds']:.0f} | "
                f"{(r.get('report') or {}).get('keep_achieved', float('nan')):.4f} | "
                + (f"{ev['perplexity']:.3f} ({ev['dense_perplexity']:.3f}) | {ev['ratio']:.3f} | " if ev else "– | – | ")
                + (f"{lim['compress_over_limit']:.2f} | " if lim and lim["compress_over_limit"] is not None else "– | ")
                + f"{_load_of(r.get('env') or res.get('env') or {})} |")
            if r.get("in_memory"):
                m = r["in_memory"]
                lines.append(f"| ↳ same run `--no-stream` | | | {gib(m['peak_rss_mb'])} | | {m['seconds']:.0f} | | "
                             f"{m['perplexity']:.3f} | ranks equal: {m['ranks_equal']} ({m['ranks_differing']} "
                             f"differ), perplexity {100 * m['perplexity_rel_diff']:+.3f} % | | |")
        lines.append("")
        for note in res.get("notes", []):
            lines += [note, ""]
    ray = load("stream_ray")
    if ray:
        lines += ["## Ray executor", "", f"`python bench/stream.py --ray-workers 1 2`: MiniLM, keep {ray['keep']}, "
                  "a local Ray cluster started for the run (its start is part of the seconds).", "",
                  "| executor | seconds | of which decomposition | peak RSS GiB (driver + workers) | ranks = local |",
                  "|---|---|---|---|---|"]
        for r in ray["rows"]:
            lines.append(f"| {r['executor']} | {r['seconds']:.1f} | {r['seconds_decomposition']:.1f} | "
                         f"{gib(r['peak_rss_mb'])} | {r['ranks_equal_local']} |")
        lines += [""] + [x for note in ray.get("notes", []) for x in (note, "")]
    out = Path(__file__).resolve().parent / "STREAM.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen", choices=["qwen", "gemma"])
    ap.add_argument("--blocks", type=int, nargs="*")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--refine-steps", type=int, help="passed to compress [default: the CLI's]")
    ap.add_argument("--compare-in-memory", action="store_true", help="also compress --no-stream and compare")
    ap.add_argument("--ray-workers", type=int, nargs="*", help="instead: MiniLM with --executor ray on these")
    ap.add_argument("--report", action="store_true", help="only write bench/STREAM.md from the JSON")
    a = ap.parse_args(argv)
    if a.ray_workers:
        common.write_json("stream_ray", ray_rows(a.ray_workers))
    elif not a.report:
        src = data.qwen_dir() if a.model == "qwen" else data.gemma_dir()
        full = json.loads((src / "config.json").read_text())["num_hidden_layers"]
        res = run(a.model, a.blocks or [full], a.calib_samples, a.keep, a.eval_windows, a.compare_in_memory,
                  a.refine_steps)
        res = merge(f"stream_{a.model}", res)
        plot(res, common.RESULTS / f"stream_{a.model}.png")
    print(f"wrote {report()}")


if __name__ == "__main__":
    main()
