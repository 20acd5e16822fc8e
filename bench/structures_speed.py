"""Forward latency of every layerzip.nn structure vs nn.Linear of the same shape and vs its FLOP-proportional bound.

bound = t(nn.Linear) · FLOPs(structure) / FLOPs(dense): the time the structure would take if it ran at the dense
GEMM's FLOP rate. ratio_to_bound = t(structure) / bound (1 = as efficient as dense GEMM; > 1 = overhead).
Each structure is sized by `choose_shape(name, d, d, keep)` (largest shape with ≤ keep·d² weights), fresh init,
float32, inference mode, fixed thread count, median of repeats.

    python bench/structures_speed.py [--threads 1] [--keep 0.0625] [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import layerzip.nn as lnn
from layerzip.registry import LAYERS

OUT = Path(__file__).parent / "results"


def median_time(fn, min_time=2e-3, repeats=15) -> float:
    fn()
    fn()
    n, t = 1, 0.0
    while True:                                   # inner loop long enough for the clock
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= min_time:
            break
        n *= 2
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)  # 2 threads spin-wait on a shared 2-core box
    ap.add_argument("--keep", type=float, default=1 / 16)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for d in args.sizes:
        dense = torch.nn.Linear(d, d)
        layers = {name: LAYERS[name](d, d, **lnn.choose_shape(name, d, d, args.keep)) for name in lnn.STRUCTURES}
        for B in args.batches:
            x = torch.randn(B, d)
            with torch.inference_mode():
                t_dense = median_time(lambda: dense(x), repeats=5 if args.quick else 15)
                for name, layer in layers.items():
                    t = median_time(lambda: layer(x), repeats=5 if args.quick else 15)
                    f, f_dense = lnn.layer_flops(layer), 2 * d * d
                    bound = t_dense * f / f_dense
                    rows.append(dict(structure=name, d=d, batch=B, spec=layer.spec(),
                                     params=sum(p.numel() for p in layer.parameters()), dense_params=d * d + d,
                                     flops_per_row=f, dense_flops_per_row=f_dense, t_ms=1e3 * t,
                                     t_dense_ms=1e3 * t_dense, speedup_vs_dense=t_dense / t,
                                     ratio_to_bound=t / bound, gflops=f * B / t / 1e9,
                                     dense_gflops=f_dense * B / t_dense / 1e9))
                    r = rows[-1]
                    print(f"d={d:5d} B={B:4d} {name:9s} {r['t_ms']:8.3f} ms  dense {r['t_dense_ms']:8.3f} ms  "
                          f"flops {f / f_dense:6.3f}x  speedup {r['speedup_vs_dense']:6.2f}  "
                          f"ratio_to_bound {r['ratio_to_bound']:6.2f}", flush=True)
    meta = dict(torch=torch.__version__, threads=args.threads, keep=args.keep, cpu=platform.processor() or
                platform.machine(), python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M"))
    OUT.mkdir(exist_ok=True)
    (OUT / "structures_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, args)


def plot(rows, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, sizes = lnn.STRUCTURES, sorted({r["d"] for r in rows})
    batches = [min(args.batches), max(args.batches)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for i, B in enumerate(batches):
        for j, (key, title) in enumerate([("speedup_vs_dense", "speedup vs nn.Linear (higher is better)"),
                                          ("ratio_to_bound", "time / FLOP-proportional bound (1 = ideal)")]):
            ax = axes[i, j]
            w = 0.8 / len(sizes)
            for k, d in enumerate(sizes):
                vals = [next(r[key] for r in rows if r["structure"] == n and r["d"] == d and r["batch"] == B)
                        for n in names]
                ax.bar([x + k * w for x in range(len(names))], vals, w, label=f"d={d}")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")
            ax.set_xticks([x + w * (len(sizes) - 1) / 2 for x in range(len(names))], names)
            ax.set_title(f"batch {B}: {title}", fontsize=10)
            ax.legend(fontsize=8)
    fig.suptitle(f"forward latency, keep={args.keep:.4g} of dense weights, {args.threads} threads, float32 CPU")
    fig.tight_layout()
    fig.savefig(OUT / "structures_speed.png", dpi=110)


if __name__ == "__main__":
    main()
