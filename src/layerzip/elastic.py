"""Elastic size: compress once, choose the size when loading.

`compress --elastic [--keep-min K0] [--keep-max K1]` (CompressConfig.elastic) calibrates and decomposes once. Every
target becomes an `ElasticLinear` (nn/elastic.py) holding the method's factors up to the largest rank any keep in
[K0, K1] gives it, and its spectrum. Loading at a keep K (`lz.load(DIR, keep=K)`, `eval/export --keep K`, native
`from_pretrained(DIR, keep=K)`) rebuilds the global allocation at K from the stored spectra — the same function of
the same numbers as a direct compression at K with the same calibration — and truncates each module to its rank:
no statistics, no decomposition. The result is a plain compressed model (LowRankLinear / nn.Linear modules).
`lz.load` reads that size directly (io.load_elastic_size: the spectra, then only the tensors of that size — the
first r columns of A and rows of B, a dense module's weight); native loading and `eval --keep-sweep` read the
ElasticLinear modules whole and `materialize_` / `materialized` them (the same model, tested).

Why a truncation is exact: the methods that may be elastic (`prefix_ok`: svd, svd-llm — also with its output-Fisher
row weights — asvd, fwsvd) take their rank-r factors as the first r components of one decomposition: the truncated
SVD of one matrix (D W L for svd-llm, W·s for asvd, D W for fwsvd, W for svd) that does not depend on r, with A and
B's columns / rows in the order of its singular values. So A[:, :r], B[:r] of the stored factors are the rank-r
factors (tests/test_elastic.py checks it for each). cur, --correct and --sequential fit per rank and are refused.

Why keeps nest: the global allocation is one path through every budget (allocate.AllocationPath), so a smaller keep
never gets a larger rank. The dense-or-factorized choice is part of that path: a module leaves its ranks for dense
when its whole matrix is worth more than its rank-r factors. Such a module (dense at some keep of the range, e.g.
every module at keep 1) is stored with factors at full rank min(m, n), where A B is W itself (up to float rounding,
formed in float32 at least), so it can be either: loading at a keep where it is dense builds nn.Linear(A B). A module dense
at every keep of the range (dense already at K0) is stored as its dense weight. So each keep of the range gets
exactly the allocation of a direct compression at that keep, and its `keep_achieved` is that allocation's (within
one rank of one module of the keep asked). The price is the file: full-rank factors hold min(m, n)(m+n) numbers,
more than the m·n of W (1.25–2× for square to 1:4 matrices), so an elastic file with --keep-max 1 is larger than
the dense model's targets; a lower --keep-max stores fewer ranks (bench/ELASTIC.md measures both).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .allocate import AllocationPath
from .errors import LayerzipError
from .models import set_module
from .nn import ElasticLinear, LowRankLinear, dense_weight_and_bias

ATTR = "layerzip_elastic"      # the model attribute holding the elastic settings (what layerzip.json records)


def weight_keep(keep: float, shapes: dict[str, tuple[int, int]], target_params: int) -> float:
    """The keep of the weight matrices that leaves `keep` of the targets' parameters: biases stay dense, the
    weights get what `keep` leaves after them (the same numbers as compress._weight_keep)."""
    n_bias = target_params - sum(m * n for m, n in shapes.values())
    return min(max((keep * target_params - n_bias) / (target_params - n_bias), 1e-9), 1.0)


def stored_ranks(config, shapes: dict[str, tuple[int, int]], spectra: dict[str, torch.Tensor],
                 target_params: int) -> dict[str, int | None]:
    """Each module's stored rank: its rank at --keep-max, or min(m, n) where it is dense there (A B = W), or None
    where it is dense already at --keep-min (it is stored dense)."""
    path = config.allocation(spectra, shapes)
    lo = path.ranks(weight_keep(config.keep_min, shapes, target_params) * path.dense_params)
    hi = path.ranks(weight_keep(config.keep_max, shapes, target_params) * path.dense_params)
    return {n: None if lo[n] is None else min(shapes[n]) if hi[n] is None else hi[n] for n in shapes}


def settings(config) -> dict:
    """What loading needs besides the modules (recorded in layerzip.json and config.json's quantization_config)."""
    return {"keep": config.keep, "keep_min": config.keep_min, "keep_max": config.keep_max,
            "normalize": not config.loss_units, "method": config.name}


@torch.no_grad()
def wrap_(model: nn.Module, names: list[str], spectra: dict[str, torch.Tensor], config) -> tuple[dict, dict]:
    """Every target (decomposed at its stored rank, or still dense) becomes an ElasticLinear with its spectrum; the
    model is set to --keep (the default size). Returns ({name: spec}, set_keep_'s summary)."""
    specs = {}
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, LowRankLinear):
            new = ElasticLinear.from_lowrank(mod, spectra[name])
        else:
            W, b = dense_weight_and_bias(mod)
            new = ElasticLinear.dense(W.detach(), None if b is None else b.detach(), spectra[name])
        set_module(model, name, new)
        specs[name] = new.spec()
    setattr(model, ATTR, settings(config))
    return specs, set_keep_(model, config.keep)


def modules(model: nn.Module) -> dict[str, ElasticLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ElasticLinear)}


def is_elastic(model: nn.Module) -> bool:
    return bool(modules(model))


def check_settings(info, where: str) -> dict:
    """The elastic settings read from a file, validated (a damaged file gets a one-line error)."""
    ok = isinstance(info, dict) and all(
        isinstance(info.get(k), (int, float)) and not isinstance(info.get(k), bool) and 0 < info[k] <= 1
        for k in ("keep", "keep_min", "keep_max")) and isinstance(info.get("normalize"), bool)
    if not ok or not info["keep_min"] <= info["keep"] <= info["keep_max"]:
        raise LayerzipError(f"{where}'s elastic settings are damaged ({info!r:.120}); re-run layerzip compress "
                            "--elastic")
    return info


def check_keep(info: dict, keep, source: str = "this model") -> float:
    """`keep` (None: the default size) checked against the elastic range."""
    if keep is None:
        return info["keep"]
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise LayerzipError(f"--keep must be in (0, 1] (the fraction of parameters kept), got {keep}")
    if not info["keep_min"] - 1e-12 <= keep <= info["keep_max"] + 1e-12:
        raise LayerzipError(f"--keep {keep} is outside the sizes {source} holds ({info['keep_min']} .. "
                            f"{info['keep_max']}); ask for a keep in that range, or compress again with --keep-min / "
                            "--keep-max covering it")
    return float(keep)


def ranks_at(model: nn.Module, keep: float | None = None) -> tuple[dict[str, int | None], dict]:
    """({name: rank, None: dense}, summary) of the elastic model at `keep` (None: its default size), from the
    stored spectra by the global allocation a direct compression at that keep runs."""
    info = getattr(model, ATTR, None)
    mods = modules(model)
    if info is None or not mods:
        raise LayerzipError("--keep picks a size of an elastic model (compress --elastic), and this model is not "
                            "one; drop --keep")
    return allocation_at(info, {n: m.spec() for n, m in mods.items()}, {n: m.spectrum for n, m in mods.items()},
                         keep)


def allocation_at(info: dict, specs: dict[str, dict], spectra: dict[str, torch.Tensor],
                  keep: float | None = None) -> tuple[dict[str, int | None], dict]:
    """ranks_at from the modules' specs (ElasticLinear.spec: in, out, stored rank, bias) and spectra, in model
    order (the order a direct compression allocates in: it breaks ties between equal rates)."""
    keep = check_keep(info, keep)
    shapes = {n: (s["out"], s["in"]) for n, s in specs.items()}
    target = sum(m * n + (m if specs[k]["bias"] else 0) for k, (m, n) in shapes.items())
    path = AllocationPath(shapes, spectra, normalize=info["normalize"])
    ranks = path.ranks(weight_keep(keep, shapes, target) * path.dense_params)
    for n, r in ranks.items():          # nested allocation: every keep of the range fits what is stored
        stored, full = specs[n]["rank"], min(shapes[n])
        if (r is None and stored not in (None, full)) or (r is not None and (stored is None or r > stored)):
            raise LayerzipError(f"{n} needs rank {r} at keep {keep}, more than the {stored} stored; the elastic "
                                "directory is damaged — re-run layerzip compress --elastic")
    kept = sum(m * n if r is None else r * (m + n) for (m, n), r in zip(shapes.values(), ranks.values()))
    kept += target - path.dense_params
    return ranks, {"keep": keep, "keep_achieved": kept / target, "target_params_before": target,
                   "target_params_after": kept, "ranks": ranks}


def set_keep_(model: nn.Module, keep: float | None = None) -> dict:
    """Set every ElasticLinear's width to its rank at `keep` (in place; any keep of the range, any number of
    times). Returns the summary (keep, keep_achieved, ranks)."""
    ranks, summary = ranks_at(model, keep)
    for n, m in modules(model).items():
        m.set_width(ranks[n])
    return summary


def unused_params(model: nn.Module) -> int:
    """Parameters stored but not used at the current widths (a report counts what the forward uses)."""
    return sum(m.num_parameters() - m.active_params() for m in modules(model).values())


@torch.no_grad()
def materialize_(model: nn.Module, keep: float | None = None) -> dict:
    """The plain compressed model at `keep`, in place: each ElasticLinear replaced by its module of that width
    (LowRankLinear of the first r factors, or nn.Linear); the model is no longer elastic. Returns the summary."""
    summary = set_keep_(model, keep)
    for n, m in modules(model).items():
        set_module(model, n, m.at_width(m.width))
    if hasattr(model, ATTR):
        delattr(model, ATTR)
    return summary


@contextlib.contextmanager
def materialized(model: nn.Module, keep: float):
    """The model as `materialize_` makes it at `keep` while inside, elastic again after (the sweep of eval
    --keep-sweep: the very modules `lz.load(DIR, keep=K)` builds, from one load)."""
    mods = modules(model)
    info = getattr(model, ATTR)
    summary = set_keep_(model, keep)
    try:
        with torch.no_grad():
            for n, m in mods.items():
                set_module(model, n, m.at_width(m.width))
        yield summary
    finally:
        for n, m in mods.items():
            set_module(model, n, m)
        setattr(model, ATTR, info)
