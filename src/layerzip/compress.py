"""One in-place entry point: `compress_(model, config, calib=batches)`.

    select targets -> restructure (drop-blocks) -> gradient statistics -> block driver: activation statistics
    -> allocate ranks -> decompose and swap modules -> report

With uniform ranks every block is decomposed as soon as its statistics are ready (the driver then frees them);
global allocation first collects every module's statistics (its spectra), then allocates, then decomposes.
`--sequential` decomposes inside the driver's walk, each group of modules from the compressed stream.
`merge_` turns every factorized layer back into `nn.Linear` (PEFT's `merge_and_unload`).
"""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .driver import BlockDriver
from .errors import LayerzipError
from .methods import CompressConfig
from .models import check_finite, count_params, linear_shape, module_params, select_targets, set_module
from .nn import FactorizedLayer, dense_weight_and_bias
from .stats import with_fisher


@torch.no_grad()
def compress_(model: nn.Module, config: CompressConfig, calib: list[dict] | None = None, progress: bool = True,
              listeners=(), stats: dict | None = None) -> dict:
    """Replace the target Linear layers of `model` by factorized ones, in place. Returns a report (JSON-able).
    `listeners`: callables receiving the block driver's events (driver.BlockEvent). `stats`: statistics of the
    original model from `calibrate` (to decompose at several keeps from one calibration); not with --sequential.

    >>> import layerzip as lz
    >>> m = lz.load("minilm")                                         # doctest: +SKIP
    >>> batches = lz.calibration_batches(m, "builtin", n_samples=16)  # doctest: +SKIP
    >>> report = lz.compress_(m, lz.SVDLLM(keep=0.5), calib=batches)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    config = config.resolve(model, calib)
    if config.needs_stats and not calib:
        raise LayerzipError(f"method {config.label} needs calibration text; pass --calib FILE or --calib builtin")
    targets = select_targets(model, config.include, config.exclude)
    check_finite(targets)
    target_before = module_params(targets.values())
    report = {"method": config.label, "config": config.to_dict(), "params_before": count_params(model),
              "target_params_before": target_before}
    extra = config.restructure_(model, calib, progress)
    if extra:                                   # the architecture changed: what is left to decompose
        targets = select_targets(model, config.include, config.exclude)
    t_restructure = time.perf_counter()
    inner = config.module_config(module_params(targets.values()), target_before)
    if inner is not None:
        inner = inner.resolve(model, calib)
        modules, ranks, calibration, t_decompose = _decompose(model, targets, inner, calib, progress, listeners,
                                                              stats)
    else:
        modules, ranks, calibration, t_decompose = {}, {}, None, 0.0
    t_end = time.perf_counter()
    target_after = module_params(model.get_submodule(n) for n in targets)
    report.update(extra)
    report.update({
        "params_after": count_params(model), "target_params_after": target_after, "keep": config.keep,
        "keep_achieved": target_after / target_before, "targets": len(targets), "factorized": len(modules),
        "modules": modules, "seconds_calibration": t_end - t0 - t_decompose, "seconds_decomposition": t_decompose})
    if extra:
        report["seconds_restructure"] = t_restructure - t0
    if inner is not None and inner is not config:
        report["then_config"] = inner.to_dict()
    if calibration:
        report["calibration"] = calibration["calibration"]
        if calibration["whitening"]["inputs"]:
            report["whitening"] = calibration["whitening"]
    report["ranks"] = ranks
    return report


def _weight_keep(config: CompressConfig, shapes: dict, target_params: int) -> float:
    """Biases stay dense: the weight matrices get what `keep` leaves after them."""
    n_bias = target_params - sum(m * n for m, n in shapes.values())
    return min(max((config.keep * target_params - n_bias) / (target_params - n_bias), 1e-9), 1.0)


def calibrate(model: nn.Module, config: CompressConfig, calib: list[dict], progress: bool = True,
              targets: dict[str, nn.Module] | None = None, listeners=()) -> dict:
    """{name: statistics} of the original model that `config` decomposes from (activations through the block
    driver, gradient statistics attached), for every target; the model is left unchanged."""
    config = config.resolve(model, calib)
    targets = targets or select_targets(model, config.include, config.exclude)
    grads = config.gradient_stats(model, targets, calib, progress)
    stats = BlockDriver(model, calib, progress, desc=config.name, listeners=list(listeners)).collect(targets)
    return with_fisher(stats, grads) if grads is not None else stats


def _decompose(model, targets, config, calib, progress, listeners, given=None):
    """Statistics -> ranks -> new modules. Returns ({name: spec}, ranks, calibration summary, seconds spent
    decomposing: the rest is calibration, with which a walk interleaves it)."""
    if given is not None and config.sequential:
        raise LayerzipError("precollected statistics cannot be used with --sequential (it recollects them)")
    shapes = {n: linear_shape(m) for n, m in targets.items()}
    keep = _weight_keep(config, shapes, module_params(targets.values()))
    collect = config.needs_stats and given is None
    grads = config.gradient_stats(model, targets, calib, progress) if collect else None
    attach = (lambda st: with_fisher(st, grads)) if grads is not None else (lambda st: st)
    driver = BlockDriver(model, calib or [], progress, desc=config.name, listeners=list(listeners))
    log = _StatsLog()
    stats: dict = dict(given or {})
    if config.needs_spectra and collect:
        stats = attach(driver.collect(targets))
    t = time.perf_counter()                    # allocation (the spectra's SVDs) counts as decomposition

    def spectrum_of(name):
        W, _ = dense_weight_and_bias(targets[name])
        return config.spectrum(W.detach().to("cpu", torch.float64), stats.get(name))
    ranks = config.ranks(shapes, keep, spectrum_of if config.needs_spectra else None)
    chosen = {n: m for n, m in targets.items() if ranks[n] is not None}
    modules: dict[str, dict] = {}
    seconds = time.perf_counter() - t

    def decompose(names, st):
        nonlocal seconds
        t = time.perf_counter()
        for name in names:
            modules[name] = replace_module(model, name, chosen[name], config, st.get(name), ranks[name])
        log.add(st)
        seconds += time.perf_counter() - t

    if collect and (config.sequential or not stats):
        stats = {}                             # the walk recollects (sequential) or collects as it goes
        driver.walk(chosen, lambda names, st: decompose(names, attach(st)), sequential=config.sequential,
                    paired=config.sequential and config.correct)
    else:
        for name in tqdm(chosen, desc=f"decomposing ({config.name})", unit="module", disable=not progress):
            decompose([name], {name: stats[name]} if name in stats else {})
    return modules, ranks, log.summary() if config.needs_stats else None, seconds


class _StatsLog:
    """What the report says about the statistics used: tokens, distinct inputs, whitening that needed help.
    Built as modules are decomposed (a walk frees each block's statistics once its modules are done)."""

    def __init__(self):
        self.tokens, self.inputs = 0, 0
        self.jitter: list[float] = []
        self.eigen = self.whitened = 0

    def add(self, stats: dict) -> None:
        for s in distinct_stats(stats):
            self.inputs += 1
            self.tokens = max(self.tokens, s.tokens)
            wt = s.__dict__.get("whitening")          # computed (and cached) only by methods that whiten
            if wt is not None:
                self.whitened += 1
                self.eigen += not wt.triangular
                if wt.jitter > 0:
                    self.jitter.append(wt.jitter / max(s.gram.diagonal().mean().item(), 1e-300))

    def summary(self) -> dict:
        return {"calibration": {"tokens": self.tokens, "distinct_inputs": self.inputs},
                "whitening": {"inputs": self.whitened, "jittered": len(self.jitter),
                              "max_relative_jitter": max(self.jitter, default=0.0), "eigen_fallback": self.eigen}}


def distinct_stats(stats: dict) -> list:
    """The activation statistics behind `stats`, each once (modules reading one input share them; a FisherStats
    wraps its module's shared `base`)."""
    return list({id(s): s for s in (getattr(s, "base", None) or s for s in stats.values())}.values())


def replace_module(model: nn.Module, name: str, mod: nn.Module, config: CompressConfig, stats, rank: int) -> dict:
    """Decompose one target in float64 and swap the result in, cast back to the original dtype. Returns its spec."""
    W, bias = dense_weight_and_bias(mod)
    new = config.build_layer(W.detach().to("cpu", torch.float64), bias, stats, rank)
    set_module(model, name, new.to(device=W.device, dtype=W.dtype))
    return new.spec()


@torch.no_grad()
def merge_(model: nn.Module, kind: type = FactorizedLayer) -> nn.Module:
    """Every factorized layer (every instance of `kind`) back to a plain `nn.Linear` (same outputs up to rounding),
    in place. Returns model.

    >>> from layerzip.nn import LowRankLinear
    >>> m = nn.Sequential(LowRankLinear(8, 4, rank=2))
    >>> type(merge_(m)[0]).__name__
    'Linear'
    """
    for name, mod in list(model.named_modules()):
        if isinstance(mod, kind):
            set_module(model, name, mod.to_dense())
    return model
