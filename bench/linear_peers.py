"""Issue 15, item 6: the linear-layer low-rank peers side by side with layerzip, in one run: same model, same
calibration, same parameter count, the same held-out metrics, and the compression time of each.

Rows (every one at each keep, the block Linears of the model, nothing else touched):

    layerzip default       `lz.compress_(model, lz.SVDLLM(keep=k), calib=calib)`: the default command
    layerzip global        `lz.SVDLLM(keep=k, alloc="global")`: global allocation with the diagonal output Fisher
    goldcrest svd          goldcrest's `SVD(rank=r)` plugin through its `ModelConsolidator` (plain truncated SVD)
    goldcrest asvd         the same with `use_activation_scaling=True` after its `CalibrationCollectorPlugin` and
                           `ActivationScalingPlugin` (ASVD: columns scaled by mean |activation|^0.5, its defaults)
    goldcrest whitening    the same with `use_data_whitening=True` after its `DataWhiteningPlugin` (SVD-LLM's Cholesky
                           whitening of XᵀX)
    ptdeco falor           `ptdeco.falor.decompose_in_place` (FALOR: the eigenvectors of each layer's output
                           covariance; per-layer ranks from a noise-to-signal threshold on the model's output)
    aimet weight-svd       aimet-torch's `ModelCompressor.compress_model(..., CompressionScheme.weight_svd, ...)`,
                           manual mode, run in the venv of its own (torch 2.14.1) in a subprocess that writes the
                           factorized layers as safetensors, loaded back here and scored like every other row

Equal parameters: layerzip's default row runs first; its achieved fraction of the block-Linear parameters (weights
and biases, after ÷ before) is the budget of every other row at that keep. goldcrest and aimet get one rank per layer
shape (MiniLM: 384×384, 1536×384, 384×1536; the same fraction of every layer, as layerzip's default for an encoder)
chosen so that their own layers' parameters (goldcrest keeps diag(S) as an r×r factor; aimet adds a zero bias to its
first factor) come nearest the budget. FALOR takes no rank or budget, only thresholds: its noise-to-signal threshold is
searched (at most `--falor-runs` decompositions per keep, each a full run) and the run nearest the budget is the row.
The achieved fraction of every row is measured on the model (the replaced modules' parameters) and reported.

Metrics (bench/pieces.py's `evaluator`): an encoder (MiniLM) by Recall@1, MRR and cosine to the dense embeddings on
held-out python-docs pairs and Recall@1 / MRR on 200 held-out standard-library docstring pairs; a causal LM (Gemma)
by held-out perplexity ÷ dense on python-docs windows and docstrings. One thread (`--threads`).

Peers (dev-only, layerzip never imports them), installed without touching torch 2.13 / transformers:
    .venv/bin/pip install --no-deps goldcrest==0.1.0 ptdeco==0.5.0
    (goldcrest imports tensorly, tensorly-torch, psutil, pyyaml, scipy, accelerate: already in the bench extra's env)
    python -m venv bench/cache/aimet-venv && bench/cache/aimet-venv/bin/pip install torch==2.14.1 \
        torchvision==0.29.1 aimet-torch -e .        (aimet-torch imports torchvision: its own torch)

    python bench/linear_peers.py [--model minilm] [--keeps 0.5 0.3] [--rows ...]    # measure (merged into the JSON)
    python bench/linear_peers.py --report                                          # JSON → plot + LINEAR_PEERS.md
Writes bench/results/linear_peers_<model>.json, linear_peers_<model>.png and bench/LINEAR_PEERS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import common
from common import lz
from layerzip.models import module_params, select_targets, set_module

HERE = Path(__file__).resolve().parent
AIMET_PYTHON = HERE / "cache" / "aimet-venv" / "bin" / "python"
ROWS = {
    "layerzip default": ("layerzip", "the default command: `lz.SVDLLM(keep=k)` (an encoder with 64 documents: uniform "
                                     "ranks weighted by its contrastive loss's Fisher; a causal LM: global allocation, "
                                     "output Fisher, 32 refinement steps)"),
    "layerzip global": ("layerzip", "`lz.SVDLLM(keep=k, alloc=\"global\")`: global allocation (+ the diagonal output "
                                    "Fisher for a causal LM; an encoder with 64 documents: none)"),
    "goldcrest svd": ("goldcrest", "`SVD(rank=r)` via `ModelConsolidator`: plain truncated SVD of each weight"),
    "goldcrest asvd": ("goldcrest", "`SVD(rank=r, use_activation_scaling=True)` after `CalibrationCollectorPlugin` + "
                                    "`ActivationScalingPlugin` (abs-mean, alpha 0.5)"),
    "goldcrest whitening": ("goldcrest", "`SVD(rank=r, use_data_whitening=True)` after `CalibrationCollectorPlugin` "
                                         "+ `DataWhiteningPlugin` (Cholesky of XᵀX)"),
    "ptdeco falor": ("ptdeco", "`falor.decompose_in_place` (output-covariance eigenvectors; ranks from its "
                               "noise-to-signal threshold, searched to the budget)"),
    "aimet weight-svd": ("aimet-torch", "`ModelCompressor.compress_model`, `CompressionScheme.weight_svd`, manual "
                                        "mode, one ratio per layer shape (data-free SVD)"),
}


def version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def achieved(model: nn.Module, names: list[str], before: int) -> float:
    return module_params(model.get_submodule(n) for n in names) / before


# ---- equal parameters: one rank per layer shape

def shape_ranks(targets: dict[str, nn.Module], budget: float, extra=lambda r: 0) -> dict[str, int]:
    """One rank per (out, in, bias) group of Linears, each the rank whose factorized parameters (r·(out+in) +
    extra(r) + the bias) come nearest `budget` × the group's parameters before. `extra`: what a peer's layer stores
    beyond two factors (goldcrest: the r×r diag(S); aimet: a zero bias of r on its first factor)."""
    groups: dict[tuple, list[str]] = {}
    for n, m in targets.items():
        groups.setdefault((m.out_features, m.in_features, m.bias is not None), []).append(n)
    ranks = {}
    for (o, i, b), names in groups.items():
        want = budget * (o * i + (o if b else 0))
        r = min(range(1, min(o, i) + 1), key=lambda r: abs(r * (o + i) + extra(r) + (o if b else 0) - want))
        ranks.update({n: r for n in names})
    return ranks


# ---- goldcrest

def goldcrest_compress_(model: nn.Module, ranks: dict[str, int], calib: list[dict], mode: str) -> None:
    """goldcrest's SVD plugin on the named Linears: its calibration collector and scaling / whitening plugins on one
    pipeline context, then its ModelConsolidator's `compress_model_with_surgery` per rank (one rank per call)."""
    from goldcrest.framework.context import PipelineContext
    from goldcrest.plugins.compression.consolidator import ModelConsolidator
    names = list(ranks)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):   # it prints an analysis
        ctx = PipelineContext(workspace_dir=tmp)
        docs = unpadded(calib)
        if mode == "whitening":
            from goldcrest.plugins.compression.calibration_collector import CalibrationCollectorPlugin
            from goldcrest.plugins.compression.svd_data_whitening import DataWhiteningPlugin
            col = CalibrationCollectorPlugin(n_samples=len(docs), collect_activations=False, collect_outputs=False,
                                             collect_xtx=True, target_modules=names)
            col.initialize(ctx)
            col.execute(model=model, dataloader=docs)
            plug = DataWhiteningPlugin()
        elif mode == "asvd":
            from goldcrest.plugins.compression.svd_activation_scaling import ActivationScalingPlugin
            collect_inputs(model, names, docs, ctx.state_manager.state)
            plug = ActivationScalingPlugin()
        if mode != "svd":
            plug.initialize(ctx)
            out = plug.execute(target_layers=names)
            if out.get("failed_layers"):
                raise RuntimeError(f"goldcrest whitening failed on {out['failed_layers']}")
        for r in sorted(set(ranks.values())):
            group = [n for n in names if ranks[n] == r]
            cons = ModelConsolidator(compression_method="svd", target_modules=group, rank=r,
                                     use_activation_scaling=mode == "asvd", use_data_whitening=mode == "whitening")
            cons.initialize(ctx)
            cons.compress_model_with_surgery(model)


def unpadded(calib: list[dict]) -> list[dict]:
    """The calibration batches' documents, one per batch without its padding: goldcrest's collector hooks every
    position of its batches (padding included) and concatenates activations across batches, which needs one length."""
    out = []
    for b in calib:
        for i in range(len(b["input_ids"])):
            keep = b["attention_mask"][i].bool()
            out.append({k: v[i][keep].unsqueeze(0) for k, v in b.items()})
    return out


def collect_inputs(model: nn.Module, names: list[str], docs: list[dict], state) -> None:
    """The inputs of the named layers on `docs`, stored where goldcrest's ActivationScalingPlugin reads them (the keys
    its CalibrationCollectorPlugin writes: `calibration.activations.<layer>` (tokens × features), `.layer_names`,
    `.collected`). Its collector concatenates (batch, tokens, features) blocks, so it cannot take documents of
    different lengths without padding them; these are the same tokens, unpadded."""
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, inp, out, n=n: acts[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1]))) for n in names]
    try:
        with torch.no_grad():
            for d in docs:
                model(**d)
    finally:
        for h in hooks:
            h.remove()
    for n in names:
        state.set(f"calibration.activations.{n}", torch.cat(acts[n]))
    state.set("calibration.layer_names", names)
    state.set("calibration.collected", True)
    state.set("calibration.sample_count", len(docs))


# ---- ptdeco FALOR: it calls the model on one tensor, so a wrapper unpacks the bench's batches

class Packed(nn.Module):
    """`model` called on one integer tensor (batch, fields, tokens) that stacks a token batch's fields; returns the
    mean-pooled last hidden state (an encoder: its sentence embedding) or the logits (a causal LM)."""

    def __init__(self, model: nn.Module, keys: list[str], causal: bool):
        super().__init__()
        self.model, self.keys, self.causal = model, keys, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = {k: x[:, i] for i, k in enumerate(self.keys)}
        out = self.model(**kw)
        if self.causal:
            return out.logits.float()
        h, mask = out.last_hidden_state, kw["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1)


def falor_compress_(model: nn.Module, names: list[str], calib: list[dict], causal: bool, nsr: float) -> dict:
    """FALOR on the named Linears: every calibration batch for each layer's output covariance (num_data_steps = the
    batches), one batch per metric step of its rank bisection, the noise-to-signal threshold `nsr` on the model's
    output (the KL threshold off: an encoder's output is no distribution), every rank that saves parameters kept."""
    import itertools
    from ptdeco import falor
    keys = list(calib[0])
    wrapped = Packed(model, keys, causal)
    stacked = [torch.stack([b[k] for k in keys], 1) for b in calib]
    own = {"model." + n for n in names}
    black = [n for n, m in wrapped.named_modules() if falor.is_decomposeable_module(m) and n not in own]
    return falor.decompose_in_place(
        module=wrapped, device=torch.device("cpu"), data_iterator=itertools.cycle(stacked),
        blacklisted_module_names=black, proportion_threshold=1.0, nsr_final_threshold=nsr,
        kl_final_threshold=math.inf, num_data_steps=len(stacked), num_metric_steps=1, use_float64=True,
        use_mean=True, use_damping=True)


# ---- aimet-torch weight SVD: in bench/cache/aimet-venv (torch 2.14.1), a subprocess

def aimet_worker(spec_path: str) -> None:
    """Runs under bench/cache/aimet-venv: load the bench model, weight-SVD its block Linears at the ratios of the spec,
    write the factorized layers as safetensors and the time / versions as JSON (never a pickle; aimet's own ./data
    pickles go to the temporary working directory)."""
    from decimal import Decimal
    from aimet_torch.common.defs import CompressionScheme, CostMetric
    from aimet_torch.compress import ModelCompressor
    from aimet_torch.defs import ModuleCompRatioPair, WeightSvdParameters
    from safetensors.torch import save_file
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    bench = common.benches(False, only=[spec["bench"]])[0]
    loaded = bench.load()

    class Ids(nn.Module):           # aimet traces the model on a random float tensor of input_shape
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            out = self.model(input_ids=x.long())
            return out.logits if spec["causal"] else out.last_hidden_state

    wrapped = Ids(loaded.model).eval()
    pairs = []
    for n, r in spec["ranks"].items():
        m = loaded.model.get_submodule(n)
        o, i = m.out_features, m.in_features    # rank r ⇔ memory ratio just above r·(o+i)/(o·i) (aimet rounds down)
        pairs.append(ModuleCompRatioPair(m, Decimal(r * (o + i) + 0.5) / Decimal(o * i)))
    params = WeightSvdParameters(WeightSvdParameters.Mode.manual, WeightSvdParameters.ManualModeParams(pairs))
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp), contextlib.redirect_stdout(sys.stderr):
        new, stats = ModelCompressor.compress_model(wrapped, lambda m, iters, use_cuda=False: 0.0, 1, (1, 16),
                                                    CompressionScheme.weight_svd, CostMetric.memory, params)
    seconds = time.perf_counter() - t
    inner = new.model
    tensors, ranks = {}, {}
    for n in spec["ranks"]:
        mod = inner.get_submodule(n)
        for k, v in mod.state_dict().items():
            tensors[f"{n}.{k}"] = v.detach().contiguous().clone()
        ranks[n] = mod[0].out_features if isinstance(mod, nn.Sequential) else None
    save_file(tensors, spec["out"] + ".safetensors")
    Path(spec["out"] + ".json").write_text(json.dumps({
        "seconds": seconds, "ranks": ranks, "aimet_torch": version("aimet-torch"), "torch": torch.__version__,
        "threads": torch.get_num_threads()}))


def aimet_compress_(model: nn.Module, ranks: dict[str, int], bench, causal: bool, threads: int) -> dict:
    """aimet's weight SVD in its own venv; its factorized layers (nn.Sequential of two Linears, as aimet builds them)
    put into `model` from the safetensors it wrote. Returns the worker's JSON (its seconds, ranks, versions)."""
    from safetensors.torch import load_file
    if not AIMET_PYTHON.is_file():
        raise RuntimeError(f"{AIMET_PYTHON} is missing: see this script's docstring")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "aimet")
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"bench": bench.name, "causal": causal, "ranks": ranks, "out": out,
                                    "threads": threads}))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        p = subprocess.run([str(AIMET_PYTHON), str(Path(__file__).resolve()), "--aimet-worker", str(spec)],
                           cwd=tmp, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError("aimet worker failed: " + p.stderr.strip()[-2000:])
        info = json.loads(Path(out + ".json").read_text())
        tensors = load_file(out + ".safetensors")
    for n, r in info["ranks"].items():
        if r is None:
            continue                    # aimet left the layer whole: its tensors are the dense layer's
        old = model.get_submodule(n)
        set_module(model, n, nn.Sequential(nn.Linear(old.in_features, r, bias=f"{n}.0.bias" in tensors),
                                           nn.Linear(r, old.out_features, bias=old.bias is not None)))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    own = [k for k in missing if any(k.startswith(n + ".") for n in ranks)]
    if own or unexpected:
        raise RuntimeError(f"aimet's layers do not load: missing {own[:3]}, unexpected {unexpected[:3]}")
    return info


# ---- the run

def run(bench, keeps: list[float], rows: list[str], threads: int, falor_runs: int, windows: int) -> dict:
    import pieces
    torch.set_num_threads(threads)
    name = f"linear_peers_{bench.name}"
    loaded = bench.load()
    calib = bench.calib(loaded)
    evaluate = pieces.evaluator(bench, loaded, windows)
    targets = select_targets(loaded.model)
    names = list(targets)
    before = module_params(targets.values())
    key = {"calib_tokens": sum(int(b["attention_mask"].sum()) for b in calib), "threads": threads,
           "eval_windows": windows if bench.causal else None}
    prev = common.read_json(name) or {}
    res = {"model": bench.title, "bench": bench.name, "causal": bench.causal, **key,
           "calib": [bench.calib_samples, bench.calib_seq_len], "target_params_before": before,
           "targets": len(names), "env": common.env(), "code": common.code_version(),
           "versions": {p: version(p) for p in ("goldcrest", "ptdeco", "torch", "transformers", "layerzip")}}
    res["versions"]["aimet-torch"] = None     # filled from the worker (its own venv)
    if prev and all(prev.get(k) == v for k, v in key.items()):
        res["dense"], res["rows"], res["falor_search"] = prev["dense"], prev["rows"], prev.get("falor_search", [])
        res["versions"]["aimet-torch"] = prev.get("versions", {}).get("aimet-torch")
    else:
        res["dense"], res["rows"], res["falor_search"] = evaluate(loaded), [], []
    print("dense", res["dense"], flush=True)

    def save(row: dict):
        res["rows"] = [r for r in res["rows"] if (r["row"], r["keep"]) != (row["row"], row["keep"])] + [row]
        common.write_json(name, res)
        print(row["row"], row["keep"], f"achieved {row['keep_achieved']:.4f}", f"{row['seconds']:.1f}s",
              row.get("metrics") or row.get("ratio_to_dense"), flush=True)

    def finish(row: dict, m) -> dict:
        out = evaluate(m)
        if bench.causal:
            row.update(perplexity=out, ratio_to_dense={k: v / res["dense"][k] for k, v in out.items()})
        else:
            row["metrics"] = out
        return row

    for keep in keeps:
        budget = None
        for row_name in ["layerzip default"] + [r for r in rows if r != "layerzip default"]:
            old = next((r for r in res["rows"] if (r["row"], r["keep"]) == (row_name, keep)), None)
            if row_name == "layerzip default" and old and row_name not in rows:
                budget = old["keep_achieved"]           # the budget of a resumed run's peers
                continue
            if row_name not in rows:
                continue
            if budget is None and row_name != "layerzip default":
                raise SystemExit(f"keep {keep}: run the layerzip default row first (it sets the budget)")
            pkg, what = ROWS[row_name]
            row = {"row": row_name, "package": pkg, "what": what, "keep": keep, "budget": budget}
            m = bench.load()
            try:
                if pkg == "layerzip":
                    cfg = lz.SVDLLM(keep=keep) if row_name == "layerzip default" else \
                        lz.SVDLLM(keep=keep, alloc="global")
                    t = time.perf_counter()
                    rep = lz.compress_(m.model, cfg, calib=calib, progress=False)
                    row["seconds"] = time.perf_counter() - t
                    row["version"] = lz.__version__
                    row["config"] = rep["config"]
                    if row_name == "layerzip default":
                        budget = row["budget"] = rep["keep_achieved"]
                elif pkg == "goldcrest":
                    ranks = shape_ranks(targets, budget, extra=lambda r: r * r)
                    t = time.perf_counter()
                    goldcrest_compress_(m.model, ranks, calib, row_name.split()[1])
                    row["seconds"] = time.perf_counter() - t
                    row["version"], row["ranks"] = version("goldcrest"), sorted(set(ranks.values()))
                elif pkg == "aimet-torch":
                    ranks = shape_ranks(targets, budget, extra=lambda r: r)
                    t = time.perf_counter()
                    info = aimet_compress_(m.model, ranks, bench, bench.causal, threads)
                    row["seconds_with_start"] = time.perf_counter() - t
                    row["seconds"] = info["seconds"]
                    row["version"] = res["versions"]["aimet-torch"] = info["aimet_torch"]
                    row["torch"], row["ranks"] = info["torch"], sorted({r for r in info["ranks"].values() if r})
                else:
                    m, row = falor_row(bench, m, names, before, calib, budget, falor_runs, res, row)
                row["keep_achieved"] = achieved(m.model, names, before)
            except Exception as e:              # noqa: BLE001  a peer that cannot: the row says why
                row.update(error=f"{type(e).__name__}: {str(e)[:500]}", keep_achieved=None, seconds=None)
                print(row_name, keep, row["error"], flush=True)
                res["rows"] = [r for r in res["rows"] if (r["row"], r["keep"]) != (row_name, keep)] + [row]
                common.write_json(name, res)
                continue
            save(finish(row, m))
            del m
    return res


def falor_row(bench, m, names, before, calib, budget, max_runs, res, row):
    """Search FALOR's noise-to-signal threshold toward the budget (log-linear interpolation between the runs that
    bracket it, every earlier run of this model counted); the run nearest the budget is the row."""
    best = None
    tried = [(s["nsr"], s["keep_achieved"]) for s in res["falor_search"]]
    for i in range(max_runs):
        below = [(t, k) for t, k in tried if k <= budget]
        above = [(t, k) for t, k in tried if k > budget]
        if not tried:
            nsr = 0.01
        elif not below:
            nsr = max(t for t, _ in above) * 4
        elif not above:
            nsr = min(t for t, _ in below) / 4
        else:
            t0, k0 = min(above, key=lambda p: p[1])           # nearest above the budget
            t1, k1 = max(below, key=lambda p: p[1])           # nearest below
            f = (budget - k0) / (k1 - k0) if k1 != k0 else 0.5
            nsr = math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
        if i and best is not None and abs(best[1] - budget) < 0.01:
            break
        mm = m if i == 0 else bench.load()
        t = time.perf_counter()
        falor_compress_(mm.model, names, calib, bench.causal, nsr)
        secs = time.perf_counter() - t
        k = achieved(mm.model, names, before)
        tried.append((nsr, k))
        res["falor_search"].append({"nsr": nsr, "keep_achieved": k, "seconds": secs, "for_budget": budget})
        print(f"falor nsr {nsr:.4g}: achieved {k:.4f} in {secs:.0f}s (budget {budget:.4f})", flush=True)
        if best is None or abs(k - budget) < abs(best[1] - budget):
            best = (mm, k, nsr, secs)
    mm, k, nsr, secs = best
    row.update(seconds=secs, version=version("ptdeco"), nsr_threshold=nsr,
               search_runs=[s for s in res["falor_search"] if s["for_budget"] == budget])
    return mm, row


# ---- the report

def _cells(r: dict, causal: bool) -> list[str]:
    if r.get("error"):
        return ["–"] * (2 if causal else 2)
    if causal:
        def ratio(v):          # a collapsed model's ratio (> 1000) in powers of ten
            return f"{v:.3f}" if v < 1000 else f"{v:.1e}"
        return [ratio(r['ratio_to_dense']['python-docs']) if "python-docs" in r["ratio_to_dense"] else "–",
                " / ".join(ratio(v) for v in r["ratio_to_dense"].values())]
    x = r["metrics"]
    return [f"{x['recall_at_1']:.3f} / {x['mrr']:.3f} / {x['cosine_to_dense']:.3f}",
            f"{x['docstrings_recall_at_1']:.3f} / {x['docstrings_mrr']:.3f}"]


def metric_values(r: dict, causal: bool) -> dict:
    """Each metric as "higher is better" (perplexity ratios negated)."""
    if causal:
        return {k: -v for k, v in r["ratio_to_dense"].items()}
    return dict(r["metrics"])


def verdicts(res: dict) -> list[str]:
    causal = res["causal"]
    out = []
    for keep in sorted({r["keep"] for r in res["rows"]}, reverse=True):
        base = next((r for r in res["rows"] if r["keep"] == keep and r["row"] == "layerzip default"), None)
        if base is None:
            continue
        b = metric_values(base, causal)
        for r in res["rows"]:
            if r["keep"] != keep or r["package"] == "layerzip":
                continue
            if r.get("error"):
                out.append(f"- keep {keep}, {r['row']}: no result ({r['error'][:160]}).")
                continue
            v = metric_values(r, causal)
            lost = [k for k in b if v[k] > b[k]]
            more = r["keep_achieved"] - base["keep_achieved"]
            size = (f"with {more:+.4f} of the parameters" if abs(more) >= 5e-4 else "at equal parameters")
            out.append(f"- keep {keep}, {r['row']} ({size}): " + (
                "the default beats it on every metric." if not lost else
                "the default loses on " + ", ".join(f"{k} ({b[k] if not causal else -b[k]:.3f} vs "
                                                    f"{v[k] if not causal else -v[k]:.3f})" for k in lost) + "."))
    return out


def plot(res: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    causal = res["causal"]
    sets = list(res["dense"]) if causal else ["recall_at_1", "docstrings_recall_at_1"]
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 3.8), squeeze=False)
    marks = "os^v<>Dph"
    for ax, s in zip(axes[0], sets):
        for j, row in enumerate(ROWS):
            rs = sorted((r for r in res["rows"] if r["row"] == row and not r.get("error")),
                        key=lambda r: r["keep_achieved"])
            if not rs:
                continue
            ys = [r["ratio_to_dense"][s] if causal else r["metrics"][s] for r in rs]
            ax.plot([r["keep_achieved"] for r in rs], ys, marks[j % len(marks)] + ("-" if row.startswith("layerzip")
                                                                                   else "--"), label=row)
        if causal:
            ax.set_ylabel("perplexity ÷ dense")
            ax.set_yscale("log")
            ax.set_title(f"{res['model']}: held-out {s}", fontsize=10)
        else:
            ax.axhline(res["dense"][s], color="k", lw=0.8, ls=":", label="dense")
            ax.set_ylabel("Recall@1")
            ax.set_title(f"{res['model']}: " + ("held-out docstring pairs" if s.startswith("docstrings")
                                                 else "held-out python-docs pairs"), fontsize=10)
        ax.set_xlabel("achieved fraction of the block-Linear parameters")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return common.save_figure(fig, common.RESULTS / f"linear_peers_{res['bench']}.png")


def markdown(res: dict) -> list[str]:
    causal = res["causal"]
    v = res["versions"]
    head = (["python-docs ppl ÷ dense", "all sets ÷ dense"] if causal else
            ["python-docs R@1 / MRR / cosine", "docstrings R@1 / MRR"])
    dense = (" / ".join(f"{s} {p:.2f}" for s, p in res["dense"].items()) if causal else
             "python-docs {recall_at_1:.3f} / {mrr:.3f} / {cosine_to_dense:.3f}, docstrings "
             "{docstrings_recall_at_1:.3f} / {docstrings_mrr:.3f}".format(**res["dense"]))
    out = [f"## {res['model']}", "",
           f"`python bench/linear_peers.py --model {res['bench']}` ({res['env']['date']}, code {res['code']}, "
           f"{res['threads']} thread{'s' if res['threads'] > 1 else ''}, {res['env']['cpu']}, torch "
           f"{v['torch']}, transformers {v['transformers']}; aimet-torch {v.get('aimet-torch')} in its own venv with "
           f"torch 2.14.1). {res['targets']} block Linears, {res['target_params_before']:,} parameters; calibration "
           f"{res['calib_tokens']} tokens ({res['calib'][0]} × ≤ {res['calib'][1]}, the benchmark's), the same token "
           f"batches for every row that reads data. Dense: {dense}.", "",
           f"![](results/linear_peers_{res['bench']}.png)", "",
           "| row | package | keep | achieved | " + " | ".join(head) + " | seconds |",
           "|---|---|---|---|---|---|---|"]
    for keep in sorted({r["keep"] for r in res["rows"]}, reverse=True):
        for row in ROWS:
            r = next((r for r in res["rows"] if (r["row"], r["keep"]) == (row, keep)), None)
            if r is None:
                continue
            pkg = f"{r['package']} {r.get('version') or v.get(r['package'], '')}".strip()
            ach = f"{r['keep_achieved']:.4f}" if r.get("keep_achieved") else "–"
            secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "–"
            out.append(f"| {row} | {pkg} | {keep} | {ach} | " + " | ".join(_cells(r, causal)) + f" | {secs} |")
    out += ["", "Seconds: the compression alone (calibration included; evaluation not), one thread. aimet's is "
            "measured inside its worker (without the subprocess start and model load)."
            + (" FALOR's is its run nearest the budget; every threshold tried:" if res.get("falor_search") else "")]
    for s in res.get("falor_search", []):
        out.append(f"  nsr {s['nsr']:.4g} → {s['keep_achieved']:.4f} ({s['seconds']:.0f} s, budget "
                   f"{s['for_budget']:.4f})")
    if any(r["row"] == "goldcrest whitening" for r in res["rows"]):
        out += ["", "goldcrest whitening, as released (0.1.0): `SVD.compress` whitens W·L (XᵀX = LLᵀ) and maps the "
                "right factor back with `DataWhiteningPlugin.inverse_whitening(Vtₖᵀ, L⁻¹)ᵀ` = Vtₖ·L⁻ᵀ, where "
                "SVD-LLM's inverse is Vtₖ·L⁻¹; so its factors are not a truncation of W (on a random 64×48 weight and "
                "correlated inputs, rank 16: output error 13.9 × ‖XWᵀ‖ as released, 0.38 with Vtₖ·L⁻¹). The row "
                "measures the package as it is."]
    ranks = [(r["row"], r["keep"], r["ranks"]) for r in res["rows"] if r.get("ranks")]
    if ranks:
        out += ["", "Ranks per layer shape (" + ", ".join(f"{n} at {k}: {rr}" for n, k, rr in ranks) + ")."]
    return out + ["", "Against the default command at each keep:", ""] + verdicts(res) + [""]


def report() -> Path:
    lines = ["# Linear-layer peers side by side", "",
             "The low-rank peers that factorize Linear layers, run with layerzip in one run per model "
             "(bench/linear_peers.py): the same model, the same calibration batches, the same held-out metrics "
             "(bench/pieces.py's), and each peer's rank chosen so that its block-Linear parameters match what "
             "layerzip's default command kept (the *achieved* column: parameters of the replaced layers after ÷ "
             "before, measured on each model). goldcrest's SVD plugin keeps diag(S) as an r×r factor and aimet a "
             "zero bias on its first factor, so at the same parameters their ranks are a little lower; FALOR has "
             "no rank argument (only a noise-to-signal threshold), so its threshold was searched and its row is "
             "the run nearest the budget.", ""]
    if not (common.RESULTS / "linear_peers_gemma.json").is_file():
        lines += ["Gemma-3-270M (`--model gemma`, keeps 0.8 and 0.5, perplexity ÷ dense on the two held-out sets) "
                  "runs through the same script but is not measured yet: on this 2-core machine FALOR alone would "
                  "take hours there (126 Linears, each with a forward pass per calibration batch and two per "
                  "bisection step of its rank search, every one scoring 262k-vocabulary logits), times the runs of "
                  "its threshold search; `--rows` without `\"ptdeco falor\"` measures the others.", ""]
    for f in sorted(common.RESULTS.glob("linear_peers_*.json")):
        res = common.read_json(f.stem)
        plot(res)
        lines += markdown(res)
    path = HERE / "LINEAR_PEERS.md"
    path.write_text("\n".join(lines))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", choices=["minilm", "gemma"])
    ap.add_argument("--keeps", type=float, nargs="+")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--falor-runs", type=int, default=3, help="FALOR decompositions per keep (threshold search)")
    ap.add_argument("--eval-windows", type=int, default=4, help="causal: held-out windows per set")
    ap.add_argument("--report", action="store_true", help="only write the plot and bench/LINEAR_PEERS.md")
    ap.add_argument("--aimet-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.aimet_worker:
        return aimet_worker(a.aimet_worker)
    if not a.report:
        bench = common.benches(False, only=[a.model])[0]
        keeps = a.keeps or ([0.5, 0.3] if a.model == "minilm" else [0.8, 0.5])
        run(bench, keeps, a.rows, a.threads, a.falor_runs, a.eval_windows)
    print(report())


if __name__ == "__main__":
    main()
