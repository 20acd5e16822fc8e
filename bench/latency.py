"""Inference speed against its FLOP bound: dense vs compressed latency at batch 1 and 16, and per layer.

Latency depends on shapes and ranks, not on the values of the factors, and every low-rank method gives the same
ranks at a given keep (uniform allocation). So each keep is built with `allocate.uniform_ranks` and LowRankLinear
layers of those ranks (random factors) — no decomposition needed. Threads are fixed (default 1), every number is
the median of repeated runs, dense and compressed forwards alternate and the speedup is the median of pairs. The
bound for a keep is flops(dense) / flops(compressed), with FLOPs counted on every module
(`layerzip.evaluate.flops`: linears, factorized layers, attention matmuls, LM head).

    python bench/latency.py [--quick] [--models minilm gemma] [--threads 1] [--keeps 0.8 0.5]
Writes bench/results/latency_<model>.json and latency_<model>.png.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common
from layerzip import LowRankLinear, allocate
from layerzip.evaluate import flops, latency
from layerzip.models import linear_shape, select_targets, set_module


def factorize_like(model, keep: float) -> dict:
    """Swap every target for a LowRankLinear of the rank `compress` would give it at `keep` (random factors)."""
    targets = select_targets(model)
    shapes = {n: linear_shape(m) for n, m in targets.items()}
    ranks = allocate.uniform_ranks(shapes, keep)
    for n, m in targets.items():
        if ranks[n] is not None:
            set_module(model, n, LowRankLinear(shapes[n][1], shapes[n][0], ranks[n], bias=m.bias is not None,
                                               dtype=m.weight.dtype))
    return {n: (shapes[n], ranks[n]) for n in targets}


@torch.no_grad()
def _median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * sorted(ts)[len(ts) // 2]


@torch.no_grad()
def layer_table(shapes: set, keeps, tokens: tuple, repeats: int = 7) -> list[dict]:
    """Dense F.linear vs the two skinny GEMMs of LowRankLinear, for each target shape × keep × token count."""
    rows = []
    for (m, n) in sorted(shapes):
        W = torch.randn(m, n)
        for keep in keeps:
            r = allocate.uniform_ranks({"x": (m, n)}, keep)["x"]
            if r is None:
                continue
            A, B = torch.randn(m, r), torch.randn(r, n)
            for t in tokens:
                x = torch.randn(t, n)
                pairs = [(_median_ms(lambda: F.linear(x, W), 1), _median_ms(lambda: F.linear(F.linear(x, B), A), 1))
                         for _ in range(repeats)]          # alternated, as in `paired`
                dense, low = (sorted(v)[repeats // 2] for v in zip(*pairs))
                speedup = sorted(d / f for d, f in pairs)[repeats // 2]
                rows.append({"out": m, "in": n, "keep": keep, "rank": r, "tokens": t, "dense_ms": dense,
                             "factorized_ms": low, "speedup": speedup, "flop_bound": m * n / (r * (m + n)),
                             "slower_than_dense": speedup < 1})
    return rows


@torch.no_grad()
def paired(dense, comp, batch_size: int, seq: int, repeats: int, threads: int) -> dict:
    """Dense and compressed forwards alternated, one pair per repeat: the load of a shared machine drifts within
    seconds, so the speedup is the median of per-pair ratios; latencies are medians too."""
    d, c = [], []
    for _ in range(repeats):
        d.append(latency(dense, batch_size, seq, 1, warmup=0, threads=threads))
        c.append(latency(comp, batch_size, seq, 1, warmup=0, threads=threads))
    ratios = sorted(x / y for x, y in zip(d, c))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"dense_ms": med(d), "ms": med(c), "speedup": ratios[len(ratios) // 2]}


def run_model(b: common.Bench, threads: int = 1, progress: bool = True) -> dict:
    seq = b.latency_seq_len
    reps, reps16 = (3, 3) if b.causal and not b.quick else (9, 5)
    loaded = b.load()

    def measure(model):
        return {"latency_ms_batch1": latency(model, 1, seq, reps, threads=threads),
                "latency_ms_batch16": latency(model, 16, seq, reps16, threads=threads), **flops(model, seq)}

    dense = measure(loaded.model)
    rows, shapes = [], set()
    for keep in tqdm(b.keeps, desc=f"latency {b.name}", unit="keep", disable=not progress):
        m = b.load().model
        layers = factorize_like(m, keep)
        shapes |= {s for s, _ in layers.values()}
        latency(m, 1, seq, 1, threads=threads)                    # warm-up
        r = {"keep": keep, **flops(m, seq)}
        r["flop_bound"] = dense["flops_per_token"] / r["flops_per_token"]
        for bs in (1, 16):
            p = paired(loaded.model, m, bs, seq, reps if bs == 1 else reps16, threads)
            r[f"latency_ms_batch{bs}"], r[f"dense_latency_ms_batch{bs}"] = p["ms"], p["dense_ms"]
            r[f"speedup_batch{bs}"] = p["speedup"]
            r[f"speedup_over_bound_batch{bs}"] = r[f"speedup_batch{bs}"] / r["flop_bound"]
        rows.append(r)
    torch.set_num_threads(threads)
    layers = layer_table(shapes, b.keeps, (seq, 16 * seq))
    torch.set_num_threads(common.DEFAULT_THREADS)
    return {"model": b.name, "title": b.title, "seq_len": seq, "threads": threads, "dense": dense, "rows": rows,
            "layers": layers, "slower_layers": [x for x in layers if x["slower_than_dense"]], "env": common.env()}


def plot(res: dict, results=common.RESULTS):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    keeps = [r["keep"] for r in res["rows"]]
    ax.plot(keeps, [r["flop_bound"] for r in res["rows"]], "k--", marker="o", label="FLOP bound")
    for bs in (1, 16):
        ax.plot(keeps, [r[f"speedup_batch{bs}"] for r in res["rows"]], marker="o", label=f"measured, batch {bs}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("keep")
    ax.set_ylabel("speedup over dense")
    ax.set_title(f"{res['title']}: inference speedup ({res['seq_len']} tokens, {res['threads']} thread)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return common.save_figure(fig, results / f"latency_{res['model']}.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keeps", nargs="*", type=float)
    a = ap.parse_args(argv)
    for b in common.benches(a.quick, a.models):
        if a.keeps:
            b.keeps = tuple(a.keeps)
        res = run_model(b, a.threads)
        common.write_json(f"latency_{b.name}", res)
        plot(res)


if __name__ == "__main__":
    main()
