"""Quality curves: every registered method × keep on each benchmark model, plus the dense baseline.

For each method the first keep (0.5 if in the list) is a *fresh* compression — statistics collected, every SVD
computed, the model saved — and is timed stage by stage (see speed.py); the other keeps reuse that method's
statistics and SVDs (`SVDMemo`), which are the same at every keep, so the curve costs one decomposition per method.
Structured projections by ALS (hadamard, blast) and drop-blocks' block similarity are reused the same way
(`ProjectionMemo`) when a later keep asks for the same thing again.

Keeps: `Bench.keeps`, except where `Bench.method_keeps` plans fewer for a slow method (see common.benches);
`--keeps` overrides both. `--skip-done` leaves out (method, keep) pairs that quality_<model>.json already holds
without error (resume a cut-short run).

    python bench/quality.py [--quick] [--models minilm gemma] [--methods svd svd-llm] [--keeps 0.8 0.5] [--skip-done]
Writes bench/results/quality_<model>.json and quality_<model>.png.
"""
from __future__ import annotations

import argparse
import copy
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


def _fingerprint(t: torch.Tensor) -> tuple:
    flat = t.detach().reshape(-1).double()
    return tuple(t.shape), float(flat.sum()), float((flat * flat).sum()), float(flat[::997].sum())


class ProjectionMemo:
    """While active, reuse (1) the ALS projections (the classes' `from_dense`) of the structures in `STRUCTURES` for
    the same matrix and shape — Hadamard's rank is capped (R² ≤ min(in, out)), so every keep above ≈ 0.15 projects
    onto the same shape — and (2) drop-blocks' block similarity, which depends on the model and the calibration
    batches only. `clear()` between methods bounds the memory."""
    STRUCTURES = ("hadamard", "blast")

    def __init__(self):
        self.layers, self.sims, self.hits = {}, {}, 0

    def __enter__(self):
        import importlib
        from layerzip.registry import LAYERS
        analyze = importlib.import_module("layerzip.analyze")
        self._analyze, self._sim = analyze, analyze.block_similarity
        sim0 = self._sim
        # the classes' own `from_dense` (None: inherited), restored on exit
        self._own = {LAYERS[n]: vars(LAYERS[n]).get("from_dense") for n in self.STRUCTURES}

        def memoized(name, project):
            def from_dense(cls, W, bias=None, **shape):
                key = (name, _fingerprint(W), None if bias is None else _fingerprint(bias),
                       tuple(sorted((k, str(v)) for k, v in shape.items())))
                if key in self.layers:
                    self.hits += 1
                else:
                    self.layers[key] = project(W, bias, **shape)
                return copy.deepcopy(self.layers[key])
            return classmethod(from_dense)

        def block_similarity(model, batches, progress=True):
            first = next(model.parameters())
            key = (id(batches), len(batches), sum(p.numel() for p in model.parameters()), _fingerprint(first))
            if key in self.sims:
                self.hits += 1
            else:
                self.sims[key] = sim0(model, batches, progress)
            return self.sims[key]
        for cls in self._own:
            cls.from_dense = memoized(cls.layer_type, cls.from_dense)
        analyze.block_similarity = block_similarity
        return self

    def __exit__(self, *exc):
        for cls, own in self._own.items():
            if own is None:
                del cls.from_dense
            else:
                cls.from_dense = own
        self._analyze.block_similarity = self._sim

    def clear(self):
        self.layers.clear()
        self.sims.clear()


MERGE_FOR_EVAL = ("btt", "monarch", "kronecker", "hadamard", "blast", "tt")


def merge_for_eval(model) -> int:
    """Replace every structured layer by `nn.Linear(dense_weight())` (`FactorizedLayer.to_dense`): the same function
    up to float32 rounding (another summation order), evaluated at dense speed. The structures' own CPU forwards are
    slow at the shapes `choose_shape` picks (Monarch with ~120–230 blocks, TT of rank 30–100: up to 50× a dense
    layer, > 5 min per MiniLM evaluation), and quality does not depend on how the product is computed.
    Returns the number of layers merged."""
    from layerzip.nn import StructuredLinear
    n = sum(isinstance(m, StructuredLinear) for m in model.modules())
    common.lz.merge_(model, kind=StructuredLinear)
    return n


def done_pairs(prev: dict | None) -> set:
    return {(r["method"], r["keep"]) for r in (prev or {}).get("rows", []) if "error" not in r}


def run_model(b: common.Bench, methods: list[str], progress: bool = True, save: bool = False,
              skip: set | None = None) -> dict:
    """`save`: rewrite quality_<model>.json and its plot after every row, so a cut-short run keeps what it did;
    rows of an earlier run for other (method, keep) pairs are kept. `skip`: (method, keep) pairs not to run."""
    skip = skip or set()
    plan = {m: [k for k in sorted(b.keeps_for(m), key=lambda k: (k != 0.5, -k))   # fresh (timed) run first, at 0.5
                if (m, k) not in skip] for m in methods}
    plan = {m: ks for m, ks in plan.items() if ks}
    prev = (common.read_json(f"quality_{b.name}") or {}) if save else {}
    if not plan and prev:
        return prev
    loaded, ref, dense, calib = b.dense_baseline()
    limit = speed.limit(loaded, calib)            # plain forward + bare SVDs: the floor for every method
    del loaded
    rows, cache = [], {}
    if save:   # add to an earlier run's rows (its other methods / keeps), replacing the ones redone here
        rows += [r for r in prev.get("rows", []) if (r["method"], r["keep"]) not in
                 {(m, k) for m, ks in plan.items() for k in ks}]
    res = {"model": b.name, "title": b.title, "metric": b.metric, "bench": common.asdict_bench(b),
           "methods_requested": methods, "dense": dense, "limit": limit, "rows": rows, "env": common.env()}
    bar = tqdm(total=sum(map(len, plan.values())), desc=f"quality {b.name}", unit="model", disable=not progress)
    with SVDMemo() as memo, ProjectionMemo() as pmemo:
        for method, keeps in plan.items():
            memo.clear()
            pmemo.clear()
            for i, keep in enumerate(keeps):
                bar.set_postfix_str(f"{method} keep {keep}")
                row = {"method": method, "keep": keep}
                try:
                    m = b.load()
                    # model-dependent defaults filled in first: compress_ would otherwise resolve a copy of cfg
                    # and lose the statistics cache patched onto this instance
                    cfg = common.config(method, keep).resolve(m.model, calib)
                    if i == 0:       # fresh: collect and time everything, then share the statistics
                        with tempfile.TemporaryDirectory() as tmp:
                            rep, timing = speed.timed_compress(m, cfg, calib, tmp, limit, cache)
                        row["timing"] = timing
                    else:
                        rep = common.lz.compress_(m.model, cfg, calib=calib, progress=False,
                                                  stats=common.cached_stats(cfg, calib, m.model, cache))
                    row.update(keep_achieved=rep["keep_achieved"], params=rep["params_after"],
                               target_params=rep["target_params_after"], seconds_compress=sum(speed.seconds(rep)))
                    if "dropped_blocks" in rep:
                        row["dropped_blocks"] = rep["dropped_blocks"]
                    if method in MERGE_FOR_EVAL:
                        row["eval_merged_layers"] = merge_for_eval(m.model)
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


LOWRANK = ("svd", "asvd", "svd-llm", "cur", "fwsvd")
PPL_CAP = 100.0   # zoomed perplexity panel: up to PPL_CAP × dense; worse points sit on the top edge (drawn as ▲)


def _style(name: str) -> str:
    if name.startswith("tltorch"):
        return "--"
    if name.startswith("drop-blocks"):
        return ":"
    return "-" if name in LOWRANK else "-."


def _line_order(names) -> list[str]:
    """Registered methods in registry order (so every model's plot gives a method the same color), then peers."""
    reg = common.methods()
    names = list(dict.fromkeys(names))
    return [m for m in reg if m in names] + sorted(m for m in names if m not in reg)


def plot(res: dict, peers: dict | None = None, results=common.RESULTS):
    """One PNG per model, against the fraction of block-linear parameters actually kept (`keep_achieved`:
    drop-blocks and Hadamard do not land on the asked keep), one line per method, dense as a horizontal line.
    MiniLM: Recall@1 and cosine to dense side by side. Gemma: perplexity on a log axis over its whole range, and
    zoomed to [dense, PPL_CAP × dense] (worse points on the top edge, drawn as ▲)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metric = res["metric"]
    panels = [(metric, None), ("cosine_to_dense", None)] if metric == "recall_at_1" else \
        [(metric, None), (metric, PPL_CAP * res["dense"][metric])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 1.8, 4.6), squeeze=False)
    cmap = plt.get_cmap("tab20")
    markers = "os^vD<>pP*Xh"
    colors = {m: i for i, m in enumerate(common.methods())}
    for ax, (key, cap) in zip(axes[0], panels):
        lines = {}
        for r in res["rows"]:
            if key in r:
                lines.setdefault(r["method"], []).append((r.get("keep_achieved", r["keep"]), r[key]))
        for r in (peers or {}).get("rows", []):
            if key in r:
                lines.setdefault(f"tltorch {r['method']}", []).append((r["keep_achieved"], r[key]))
        dense = res["dense"][key] if key in res["dense"] else 1.0
        for name in _line_order(lines):
            i = colors.setdefault(name, len(colors))
            pts = sorted(set(lines[name]))
            ys = [min(y, cap) if cap else y for _, y in pts]
            ms = 4 if len({x for x, _ in pts}) > 1 else 9          # a lone point (Hadamard) must stay visible
            ax.plot([x for x, _ in pts], ys, marker=markers[i % len(markers)], ms=ms, lw=1.3, ls=_style(name),
                    color=cmap(i % 20), label=name)
            over = [(x, cap) for x, y in pts if cap and y > cap]
            if over:
                ax.plot(*zip(*over), ls="none", marker="^", ms=7, color=cmap(i % 20))
        ax.axhline(dense, color="k", lw=1.2, label="dense")
        ax.set_xlabel("fraction of block-linear parameters kept")
        ax.set_ylabel(key.replace("_", " ").replace("recall at 1", "Recall@1"))
        title = f"{res['title']}: {ax.get_ylabel()}"
        if key == "perplexity":
            ax.set_yscale("log")
            if cap:
                ax.set_ylim(dense / 1.15, cap * 1.4)
                title += f" (zoom; ▲: > {cap:,.0f})"
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return common.save_figure(fig, results / f"quality_{res['model']}.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random models (smoke run)")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--methods", nargs="*", help="default: every registered method")
    ap.add_argument("--keeps", nargs="*", type=float)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-done", action="store_true", help="leave out (method, keep) rows already in the JSON")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    for b in common.benches(a.quick, a.models):
        if a.keeps:
            b.keeps, b.method_keeps = tuple(a.keeps), {}
        skip = done_pairs(common.read_json(f"quality_{b.name}")) if a.skip_done else None
        res = run_model(b, a.methods or common.methods(), save=True, skip=skip)
        common.write_json(f"quality_{b.name}", res)
        plot(res, common.read_json(f"peers_{b.name}"))


if __name__ == "__main__":
    main()
