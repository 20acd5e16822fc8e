"""Peak resident memory of `compress` per model, and what dominates it.

Each model is compressed (svd-llm, keep 0.5: the method with the largest statistics) in a fresh subprocess that
reports its resident set after each stage (psutil) and the running peak (getrusage ru_maxrss), so the peak can be
attributed: interpreter + libraries, dense weights, calibration (Grams, activations), decomposition (float64
copies, whitening factors, new factors), save. Next to it, the sizes that explain it: weight bytes and Gram bytes.

    python bench/memory.py [--quick] [--models minilm gemma] [--method svd-llm]
    python bench/memory.py --cli [--models gemma]     # the default command, healed and not (rows "cli")
Writes bench/results/memory.json.

`--cli`: the peak of the whole default command, `layerzip compress MODEL --keep 0.8 --calib docs_calib.txt`
(causal LMs: block refinement, then 32 healing steps toward a second copy of the model), and of the same with
`--heal-steps 0`, each in a fresh process (ru_maxrss of the command), with its wall time and dense weight bytes.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

import common
from layerzip.compress import distinct_stats

MB = 2 ** 20


def _rss() -> dict:
    import psutil
    return {"rss_mb": psutil.Process().memory_info().rss / MB,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(name: str, quick: bool, method: str) -> dict:
    """Runs inside the subprocess."""
    import torch
    torch.set_num_threads(common.DEFAULT_THREADS)
    b = common.benches(quick, [name])[0]
    stages = {"start": _rss()}
    loaded = b.load()
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in loaded.model.parameters()}.values())
    stages["loaded"] = _rss()
    calib = b.calib(loaded)
    cfg = common.config(method, 0.5)
    stats_bytes = {"gram_mb": 0.0, "distinct_inputs": 0}

    def on_event(event):                        # the block driver's events: statistics of one block are ready
        if event.kind == "stats_ready":
            stages["calibrated"] = _rss()              # after the last block's: the statistics all held
            uniq = distinct_stats(event.stats)
            stats_bytes["gram_mb"] += sum(s.gram.numel() * 8 for s in uniq) / MB
            stats_bytes["distinct_inputs"] += len(uniq)
    rep = common.lz.compress_(loaded.model, cfg, calib=calib, progress=False, listeners=[on_event])
    stages["decomposed"] = _rss()
    with tempfile.TemporaryDirectory() as tmp:
        common.lz.save(loaded.model, f"{tmp}/m", tokenizer=loaded.tokenizer)
    stages["saved"] = _rss()
    names = list(stages)
    steps = {f"{a}->{c}": stages[c]["peak_mb"] - stages[a]["peak_mb"] for a, c in zip(names, names[1:])}
    return {"model": name, "method": method, "keep": 0.5, "peak_mb": stages["saved"]["peak_mb"], "stages": stages,
            "peak_increase_by_stage_mb": steps, "dominant_stage": max(steps, key=steps.get),
            "dense_weights_mb": weights / MB, **stats_bytes, "calib_tokens": rep.get("calibration", {}).get("tokens"),
            "params_before": rep["params_before"], "params_after": rep["params_after"]}


def cli_child(name: str, heal: bool) -> dict:
    """Runs inside the subprocess: the CLI as a child of its own, so RUSAGE_CHILDREN is that command's peak."""
    import os
    import time
    from pathlib import Path
    import data
    source = {"gemma": str(data.gemma_dir()), "minilm": "minilm"}[name]
    extra = [] if heal else ["--heal-steps", "0"]
    exe = str(Path(sys.executable).with_name("layerzip"))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        p = subprocess.run([exe, "compress", source, "--out", f"{tmp}/o", "--keep", "0.8", "--calib",
                            str(data.TEXT_DIR / "docs_calib.txt"), "--json", *extra], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
        seconds = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(p.stderr.strip().splitlines()[-1])
    rep = json.loads(p.stdout)
    return {"model": name, "command": f"layerzip compress --keep 0.8 {' '.join(extra)}".strip(),
            "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "seconds": seconds,
            "healed": "heal" in rep, "bytes_before_mb": rep["bytes_before"] / MB, "keep_achieved": rep["keep_achieved"],
            "warnings": rep.get("warnings", [])}


def run_cli(models) -> list[dict]:
    out = []
    for name in models or ["gemma"]:
        for heal in (True, False):
            p = subprocess.run([sys.executable, __file__, "--cli-child", name] + ([] if heal else ["--no-heal"]),
                               capture_output=True, text=True)
            out.append({"model": name, "healed": heal, "error": p.stderr.strip().splitlines()[-1:]} if p.returncode
                       else json.loads(p.stdout.strip().splitlines()[-1]))
    return out


def run(quick: bool, models, method: str) -> list[dict]:
    out = []
    for b in common.benches(quick, models):
        p = subprocess.run([sys.executable, __file__, "--child", b.name, "--method", method]
                           + (["--quick"] if quick else []), capture_output=True, text=True)
        if p.returncode:
            out.append({"model": b.name, "error": p.stderr.strip().splitlines()[-1:]})
        else:
            out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--method", default="svd-llm")
    ap.add_argument("--child")
    ap.add_argument("--cli", action="store_true", help="the default command's peak, healed and not")
    ap.add_argument("--cli-child")
    ap.add_argument("--no-heal", action="store_true")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.quick, a.method)))
        return
    if a.cli_child:
        print(json.dumps(cli_child(a.cli_child, not a.no_heal)))
        return
    old = common.read_json("memory") or {}
    if a.cli:
        rows = {(r["model"], r["healed"]): r for r in old.get("cli", [])}
        rows.update({(r["model"], r["healed"]): r for r in run_cli(a.models)})
        common.write_json("memory", {**old, "cli": list(rows.values()), "cli_env": common.env()})
        return
    res = run(a.quick, a.models, a.method)
    prev = {r["model"]: r for r in old.get("rows", [])}
    prev.update({r["model"]: r for r in res})
    common.write_json("memory", {**old, "rows": list(prev.values()), "env": common.env()})


if __name__ == "__main__":
    main()
