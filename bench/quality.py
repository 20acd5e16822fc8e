"""Quality curves: every registered method × keep on each benchmark model, plus the dense baseline.

For each method the first keep (0.5 if in the list) is a *fresh* compression — statistics collected, every SVD
computed, the model saved — and is timed stage by stage (see speed.py); the other keeps reuse that method's
statistics and SVDs (`SVDMemo`), which are the same at every keep, so the curve costs one decomposition per method.

    python bench/quality.py [--quick] [--models minilm gemma] [--methods svd svd-llm] [--keeps 0.8 0.5]
Writes bench/results/quality_<model>.json and quality_<model>.png.
"""
from __future__ import annotations

import argparse
import gc
import tempfile

import torch
from tqdm.auto import tqdm

import common
import speed


class SVDMemo:
    """While active, `torch.linalg.svd` returns a stored result for a matrix it has already decomposed.

    Keyed by shape and three cheap fingerprints of the data; `clear()` between methods bounds the memory."""

    def __init__(self):
        self.store, self.hits = {}, 0

    def _key(self, A, full_matrices):
        flat = A.reshape(-1)
        return (tuple(A.shape), A.dtype, full_matrices, float(flat.sum()), float((flat * flat).sum()),
                float(flat[::997].sum()))

    def __enter__(self):
        self._orig = orig = torch.linalg.svd

        def svd(A, full_matrices=True, **kw):
            key = self._key(A, full_matrices) if not kw else None
            if key is not None and key in self.store:
                self.hits += 1
                return self.store[key]
            out = orig(A, full_matrices=full_matrices, **kw)
            if key is not None:
                self.store[key] = out
            return out
        torch.linalg.svd = svd
        return self

    def __exit__(self, *exc):
        torch.linalg.svd = self._orig

    def clear(self):
        self.store.clear()


def run_model(b: common.Bench, methods: list[str], progress: bool = True, save: bool = False) -> dict:
    """`save`: rewrite quality_<model>.json and its plot after every row, so a cut-short run keeps what it did;
    rows of an earlier run for other (method, keep) pairs are kept."""
    loaded = b.load()
    ref = b.reference(loaded)
    with common.Timer() as t:
        dense = b.evaluate(loaded, ref)
    dense["seconds_eval"] = t.s
    calib = b.calib(loaded)
    limit = speed.limit(loaded, calib)            # plain forward + bare SVDs: the floor for every method
    del loaded
    keeps = sorted(b.keeps, key=lambda k: (k != 0.5, -k))   # fresh (timed) run first, at keep 0.5
    rows, cache = [], {}
    if save:   # add to an earlier run's rows (its other methods / keeps), replacing the ones redone here
        prev = common.read_json(f"quality_{b.name}") or {}
        rows += [r for r in prev.get("rows", []) if (r["method"], r["keep"]) not in
                 {(m, k) for m in methods for k in keeps}]
    res = {"model": b.name, "title": b.title, "metric": b.metric, "bench": common.asdict_bench(b),
           "methods_requested": methods, "dense": dense, "limit": limit, "rows": rows, "env": common.env()}
    bar = tqdm(total=len(methods) * len(keeps), desc=f"quality {b.name}", unit="model", disable=not progress)
    with SVDMemo() as memo:
        for method in methods:
            memo.clear()
            for i, keep in enumerate(keeps):
                bar.set_postfix_str(f"{method} keep {keep}")
                row = {"method": method, "keep": keep}
                try:
                    m = b.load()
                    cfg = common.config(method, keep)
                    if i == 0:       # fresh: collect and time everything, then share the statistics
                        with tempfile.TemporaryDirectory() as tmp:
                            rep, timing = speed.timed_compress(m, cfg, calib, tmp, limit, cache)
                        row["timing"] = timing
                    else:
                        rep = common.lz.compress_(m.model, common.cache_collect(cfg, cache), calib=calib,
                                                  progress=False)
                    row.update(keep_achieved=rep["keep_achieved"], params=rep["params_after"],
                               target_params=rep["target_params_after"], seconds_compress=
                               rep["seconds_calibration"] + rep["seconds_decomposition"])
                    with common.Timer() as t:
                        row.update(b.evaluate(m, ref))
                    row["seconds_eval"] = t.s
                except Exception as e:          # one broken method must not sink the whole benchmark
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                rows.append(row)
                bar.update()
                if save:
                    common.write_json(f"quality_{b.name}", res)
                    plot(res, common.read_json(f"peers_{b.name}"))
                del m
                gc.collect()
    bar.close()
    return res


def plot(res: dict, peers: dict | None = None, results=common.RESULTS):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metric = res["metric"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    lines = {}
    for r in res["rows"]:
        if metric in r:
            lines.setdefault(r["method"], []).append((r["keep"], r[metric]))
    for r in (peers or {}).get("rows", []):
        if metric in r:
            lines.setdefault(f"tltorch {r['method']}", []).append((r["keep_achieved"], r[metric]))
    for name, pts in lines.items():
        pts.sort()
        ax.plot(*zip(*pts), marker="o", ls="--" if name.startswith("tltorch") else "-", label=name)
    ax.axhline(res["dense"][metric], color="k", lw=1, label="dense")
    ax.set_xlabel("keep (fraction of block-linear parameters kept)")
    ax.set_ylabel(metric.replace("_", " "))
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title(f"{res['title']}: {metric.replace('_', ' ')} vs keep")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return common.save_figure(fig, results / f"quality_{res['model']}.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random models (smoke run)")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--methods", nargs="*", help="default: every registered method")
    ap.add_argument("--keeps", nargs="*", type=float)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    for b in common.benches(a.quick, a.models):
        if a.keeps:
            b.keeps = tuple(a.keeps)
        res = run_model(b, a.methods or common.methods(), save=True)
        common.write_json(f"quality_{b.name}", res)
        plot(res, common.read_json(f"peers_{b.name}"))


if __name__ == "__main__":
    main()
