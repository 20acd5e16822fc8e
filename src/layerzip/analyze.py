"""See a model before cutting it: per-module spectra and ranks, per-block influence, a recommended plan.

    calibration batches -> (1) Gram of every target's input  -> spectra of W and of W·L (whitened), ranks, loss curve
                        -> (2) residual stream at every block -> Block Influence, angular distance heatmap
                        -> plan for a --keep (blocks to drop, low rank for the rest)       -> analysis.json

Definitions (x^ℓ: the residual stream entering block ℓ, x^L the output of the last block; means over every
non-padding token of the calibration batches):
  Block Influence   BIℓ = 1 − E[cos(x^ℓ, x^{ℓ+1})]                          (ShortGPT, Men et al. 2024)
  angular distance  d(ℓ, n) = E[arccos(cos(x^ℓ, x^{ℓ+n}))] / π                (Gromov et al. 2024; they read the
                    last token only, we average every token, which is steadier on little calibration text)
  effective rank    exp(H(p)), p = σ / Σσ                                     (Roy & Vetterli 2007)
  stable rank       Σσ² / σ₁²
  utilized rank q   smallest r with Σ_{i≤r} σ̃ᵢ² ≥ q Σ σ̃ᵢ², σ̃ = σ(W L), XᵀX = L Lᵀ  (whitened energy)
  layer loss(r)     Σ_{i>r} σ̃ᵢ² / Σ σ̃ᵢ²  = ‖(W − W_r)Xᵀ‖² / ‖W Xᵀ‖² of the best rank-r (SVD-LLM) approximation

Plots and HTML (report.py) are drawn from the saved analysis.json only.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from . import allocate
from .compress import unrouted_experts
from .errors import LayerzipError
from .models import find_blocks, linear_shape, select_targets
from .nn import dense_weight_and_bias, join_experts_, split_experts_
from .stats import block_similarity, collect_stats

FORMAT = "layerzip-analysis"
VERSION = 1
UTILIZED = (0.90, 0.95, 0.99)
CURVE_POINTS = 48


# ------------------------------------------------------------------------------------------------ residual stream
def span_distances(angular: list[list[float]]) -> list[list[float | None]]:
    """d(ℓ, n) for n = 1 … L as rows ℓ = 0 … L−1 (None where ℓ + n > L): the heatmap of Gromov et al."""
    L = len(angular) - 1
    return [[angular[l][l + n] if l + n <= L else None for n in range(1, L + 1)] for l in range(L)]


# ---------------------------------------------------------------------------------------------------- per module
def _g(x: float) -> float:
    return float(f"{x:.6g}")


def rank_measures(s: torch.Tensor, sw: torch.Tensor) -> dict:
    """Effective / stable rank of σ(W); utilized ranks and the layer loss curve of the whitened σ̃ = σ(W L)."""
    s, sw = s.double(), sw.double()
    p = s / s.sum().clamp_min(1e-300)
    p = p[p > 0]
    energy = sw.square()
    total = energy.sum().clamp_min(1e-300)
    cum = energy.cumsum(0) / total
    util = {f"{int(q * 100)}": int(torch.searchsorted(cum, torch.tensor(q, dtype=cum.dtype) - 1e-12).item()) + 1
            for q in UTILIZED}
    k = len(sw)
    ranks = sorted({max(1, round(k * i / CURVE_POINTS)) for i in range(CURVE_POINTS + 1)} | {0})
    loss = [1.0 if r == 0 else max(0.0, 1 - cum[r - 1].item()) for r in ranks]
    return {"effective_rank": _g(torch.exp(-(p * p.log()).sum()).item()),
            "stable_rank": _g((s.square().sum() / s[0].square().clamp_min(1e-300)).item()),
            "utilized_rank": {q: min(r, k) for q, r in util.items()},
            "loss_curve": {"rank": ranks, "relative_loss": [_g(x) for x in loss]}}


@torch.no_grad()
def module_spectra(model: nn.Module, targets: dict[str, nn.Module], stats: dict, progress: bool = True) -> dict:
    blocks_name = find_blocks(model)[0]
    out = {}
    for name, mod in tqdm(targets.items(), desc="spectra", unit="module", disable=not progress):
        W, _ = dense_weight_and_bias(mod)
        W = W.detach().to("cpu", torch.float64)
        # float32 SVDs: spectra are reported to 6 digits, and this is 2-4× faster than float64
        s = torch.linalg.svdvals(W.float()).double()
        sw = torch.linalg.svdvals((W @ stats[name].whitening.L).float()).double()
        m, n = linear_shape(mod)
        rest = name[len(blocks_name) + 1:] if name.startswith(blocks_name + ".") else name
        idx, _, kind = rest.partition(".")
        out[name] = {"block": int(idx) if idx.isdigit() else None, "kind": kind or rest, "shape": [m, n],
                     "params": m * n, "spectrum": [_g(x) for x in s.tolist()],
                     "whitened_spectrum": [_g(x) for x in sw.tolist()], **rank_measures(s, sw)}
    return out


# ---------------------------------------------------------------------------------------------------------- plan
def relative_loss_at(module: dict, rank: int | None) -> float:
    """Layer loss of the best rank-r approximation, relative to ‖W Xᵀ‖² (0 for a module left dense)."""
    if rank is None:
        return 0.0
    e = torch.tensor(module["whitened_spectrum"], dtype=torch.float64).square()
    return max(0.0, e[rank:].sum().item() / max(e.sum().item(), 1e-300))


def make_plan(modules: dict, influence: list[float], angular: list[list[float]], keep: float) -> dict:
    """Choose how many blocks to drop (lowest BI first) and the uniform low-rank keep of the rest, under one budget.

    Heuristic damage (in units of the residual-stream angle): a dropped block costs its own angular step
    a_ℓ = d(ℓ, 1); a kept block costs a_ℓ · √(mean relative layer loss of its modules at their rank)."""
    L = len(influence)
    step = [angular[l][l + 1] for l in range(L)]
    per_block = [[m for m in modules.values() if m["block"] == l] for l in range(L)]
    block_params = [sum(m["params"] for m in ms) for ms in per_block]
    total = sum(block_params)
    order = sorted(range(L), key=lambda l: influence[l])
    candidates = []
    for n in range(0, L):
        drop = sorted(order[:n])
        left = total - sum(block_params[l] for l in drop)
        if left <= 0:
            break
        k2 = keep * total / left
        if k2 > 1 + 1e-9:
            break
        kept = [m for m in modules.values() if m["block"] not in drop]
        ranks = allocate.uniform_ranks({i: tuple(m["shape"]) for i, m in enumerate(kept)}, min(k2, 1.0)) \
            if k2 < 1 - 1e-9 else {i: None for i in range(len(kept))}
        err = {}
        for i, m in enumerate(kept):
            err.setdefault(m["block"], []).append(relative_loss_at(m, ranks[i]))
        damage = sum(step[l] for l in drop) + sum(step[l] * math.sqrt(sum(e) / len(e)) for l, e in err.items())
        candidates.append({"drop_blocks": drop, "lowrank_keep": _g(min(k2, 1.0)), "damage": _g(damage)})
    best = min(candidates, key=lambda c: c["damage"])
    return {"keep": keep, **best, "blocks": len(best["drop_blocks"]), "candidates": candidates,
            "rule": "drop the lowest-Block-Influence blocks, uniform SVD-LLM ranks on the rest; "
                    "damage = Σ dropped angular steps + Σ kept steps · √(relative layer loss)"}


# ------------------------------------------------------------------------------------------------------ pipeline
def analyze(model: nn.Module, batches: list[dict], keep: float = 0.5, include: str | None = None,
            exclude: str | None = None, progress: bool = True) -> dict:
    """Every statistic of analysis.json for an in-memory model (see the module doc)."""
    if not 0 < keep <= 1:
        raise LayerzipError(f"--keep must be in (0, 1] (the fraction of block parameters kept), got {keep}")
    t0 = time.perf_counter()
    blocks_name, blocks = find_blocks(model) or (None, None)
    if blocks is None:
        raise LayerzipError("the model has no repeated blocks to analyze")
    fused = split_experts_(model)          # an MoE's experts: each expert's projections analyzed on their own
    try:
        unrouted = unrouted_experts(model, batches, progress) if fused else set()
        targets = {n: m for n, m in select_targets(model, include, exclude).items()
                   if not isinstance(m, nn.Embedding) and n not in unrouted}
        if not targets:
            raise LayerzipError("analyze reads linear layers, and --include named only embeddings; add blocks")
        stats = collect_stats(model, targets, batches, progress)
        modules = module_spectra(model, targets, stats, progress)
    finally:
        join_experts_(model, fused)        # the model as it was given
    sim = block_similarity(model, batches, progress)
    plan = make_plan(modules, sim["influence"], sim["angular"], keep)
    return {"format": FORMAT, "version": VERSION, "architecture": type(model).__name__,
            "blocks_name": blocks_name, "num_blocks": len(blocks),
            "tokens": sim["tokens"], "modules": modules,
            "blocks": {"influence": [_g(x) for x in sim["influence"]],
                       "cosine": [[_g(x) for x in r] for r in sim["cosine"]],
                       "angular": [[_g(x) for x in r] for r in sim["angular"]],
                       "span_distance": [[None if x is None else _g(x) for x in r]
                                         for r in span_distances(sim["angular"])]},
            "plan": plan, "seconds": time.perf_counter() - t0}


def summary(doc: dict) -> dict:
    """The small part of analysis.json that `--json` prints."""
    mods = doc["modules"].values()
    return {"model": doc.get("model"), "architecture": doc["architecture"], "num_blocks": doc["num_blocks"],
            "modules": len(doc["modules"]), "tokens": doc["tokens"],
            "block_influence": doc["blocks"]["influence"],
            "mean_utilized_rank_fraction_95": _g(sum(m["utilized_rank"]["95"] / min(m["shape"]) for m in mods)
                                                 / max(len(doc["modules"]), 1)),
            "plan": {k: v for k, v in doc["plan"].items() if k != "candidates"},
            "seconds": doc["seconds"]}
