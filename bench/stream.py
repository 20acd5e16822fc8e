"""Streaming past RAM: `layerzip compress` of a real 1.5B model, one block in memory at a time.

Each run is the real command line in a fresh process; this script samples its resident memory (psutil, every
0.2 s) and tags each sample with the stage the progress bars show (gradients forward / backward, spectra walk,
decomposition walk, save). Then the compressed and the dense model are scored, streamed too, on held-out
python-docs windows.

    python bench/stream.py [--model qwen|gemma] [--blocks 28 14] [--calib-samples 64] [--keep 0.8]

Limits measured in the same run: one streamed forward of the dense model over the calibration tokens (the eval
of the dense model gives its time per token), and the bare float64 SVDs of one block's target weights × blocks
(every block has the same shapes). `--blocks K`: the same model cut to its first K blocks (a directory whose
config says K layers and whose index lists only their tensors, the shards linked), to show that peak memory does
not grow with depth. Writes bench/results/stream_<model>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import re
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


def run(model: str, blocks_list: list[int], calib_samples: int, keep: float, eval_windows: int,
        compare: bool = False) -> dict:
    src = data.qwen_dir() if model == "qwen" else data.gemma_dir()
    full = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    text = data.TEXT_DIR / "docs_eval.txt"
    rows = []
    with tempfile.TemporaryDirectory(dir=common.RESULTS.parent / "cache") as tmp:
        tmp = Path(tmp)
        for n in blocks_list:
            d = src if n == full else cut(src, n, tmp / f"cut{n}")
            out = tmp / f"out{n}"
            args = ["--keep", keep, "--calib", data.TEXT_DIR / "docs_calib.txt", "--calib-samples", calib_samples,
                    "--json"]
            comp = monitored(lz_cmd("compress", d, "--out", out, "--stream", *args))
            row = {"blocks": n, "compress": {k: v for k, v in comp.items() if k != "report"},
                   "report": {k: comp["report"].get(k) for k in (
                       "keep_achieved", "params_before", "params_after", "seconds", "calibration",
                       "size_on_disk_before", "size_on_disk_after", "streamed")}}
            if n == full:
                ev = monitored(lz_cmd("eval", out, "--stream", "--text", text, "--samples", 4 * eval_windows,
                                      "--json"))
                dense = monitored(lz_cmd("eval", d, "--stream", "--text", text, "--samples", 4 * eval_windows,
                                         "--json"))
                row["eval"] = {"perplexity": ev["report"]["perplexity"], "dense_perplexity":
                               dense["report"]["perplexity"], "ratio": ev["report"]["perplexity"] /
                               dense["report"]["perplexity"], "windows": ev["report"]["windows"],
                               "eval_peak_rss_mb": ev["peak_rss_mb"], "dense_eval_seconds": dense["seconds"],
                               "dense_eval_tokens": dense["report"]["tokens"]}
                tokens = (comp["report"].get("calibration") or {}).get("tokens") or 0
                forward = dense["seconds"] * tokens / max(dense["report"]["tokens"], 1)
                svds = bare_svds_seconds(src, n)
                row["limit"] = {"forward_seconds_est": forward, "bare_svds_seconds": svds,
                                "compress_over_limit": comp["seconds"] / (forward + svds)}
                if compare:             # the same compression in memory: ranks, perplexity, memory, time
                    mem = monitored(lz_cmd("compress", d, "--out", tmp / "mem", "--no-stream", *args))
                    ev_mem = monitored(lz_cmd("eval", tmp / "mem", "--no-stream", "--text", text, "--samples",
                                              4 * eval_windows, "--json"))
                    a, b = ranks_of(out), ranks_of(tmp / "mem")
                    row["in_memory"] = {"peak_rss_mb": mem["peak_rss_mb"], "seconds": mem["seconds"],
                                        "perplexity": ev_mem["report"]["perplexity"],
                                        "ranks_equal": a == b, "ranks_differing": sum(a[n] != b[n] for n in a),
                                        "perplexity_rel_diff": ev["report"]["perplexity"]
                                        / ev_mem["report"]["perplexity"] - 1}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "compress"}, default=str), flush=True)
    res = {"model": model, "keep": keep, "calib_samples": calib_samples, "rows": rows, "env": common.env()}
    if len(rows) > 1:
        peaks = [r["compress"]["peak_rss_mb"] for r in rows]
        res["peak_spread"] = max(peaks) / min(peaks) - 1
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = {}
    for r in res["rows"]:
        s = r["compress"]["samples"]
        ax.plot([t for t, _, _ in s], [mb / 1024 for _, mb, _ in s], lw=0.8, label=f"{r['blocks']} blocks",
                color="C0" if r["blocks"] == max(x["blocks"] for x in res["rows"]) else "C1")
        if not colors:
            for i, (t, mb, st) in enumerate(s):
                if st not in colors:
                    colors[st] = t
    for st, t in colors.items():
        ax.axvline(t, color="grey", lw=0.5, ls=":")
        ax.text(t, ax.get_ylim()[1] * 0.95, st, rotation=90, fontsize=7, va="top")
    ax.axhline(4, color="red", lw=0.8, ls="--", label="4 GiB target")
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident memory (GiB)")
    ax.set_title(f"layerzip compress --stream, {res['model']}, keep {res['keep']}, "
                 f"{res['calib_samples']} calibration windows")
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen", choices=["qwen", "gemma"])
    ap.add_argument("--blocks", type=int, nargs="*")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--compare-in-memory", action="store_true", help="also compress --no-stream and compare")
    a = ap.parse_args(argv)
    src = data.qwen_dir() if a.model == "qwen" else data.gemma_dir()
    full = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    res = run(a.model, a.blocks or [full], a.calib_samples, a.keep, a.eval_windows, a.compare_in_memory)
    name = f"stream_{a.model}"
    common.write_json(name, res)
    plot(res, common.RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
