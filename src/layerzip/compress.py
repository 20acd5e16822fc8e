"""One in-place entry point: `compress_(model, config, calib=batches)`.

    select targets -> calibrate (if the method needs statistics) -> allocate ranks -> decompose -> swap modules

A config dataclass picks the method (torchao style): validated in `__post_init__`, JSON round-trip via
`to_dict` / `config_from_dict`, registered by name with `@register_method`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from . import allocate
from .calibrate import collect_stats
from .errors import LayerzipError
from .layers import LowRankLinear, dense_weight_and_bias
from .methods import asvd_factors, svd_factors, svdllm_factors
from .models import check_finite, count_params, linear_shape, select_targets, set_module

METHODS: dict[str, type["CompressConfig"]] = {}
ALLOCATORS = ("uniform",)


def register_method(name: str):
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


@dataclass
class CompressConfig:
    """Common options. `keep`: fraction of the targeted modules' parameters kept, in (0, 1]."""
    keep: float = 0.5
    alloc: str = "uniform"
    include: str | None = None
    exclude: str | None = None

    name: ClassVar[str] = "?"
    needs_stats: ClassVar[bool] = False

    def __post_init__(self):
        if not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise LayerzipError(f"--keep must be in (0, 1] (the fraction of parameters kept), got {self.keep}")
        if self.alloc not in ALLOCATORS:
            raise LayerzipError(f"--alloc must be one of {', '.join(ALLOCATORS)}, got {self.alloc!r}")

    def factors(self, W: torch.Tensor, stats, rank: int):
        raise NotImplementedError

    def build_layer(self, W: torch.Tensor, bias, stats, rank: int) -> nn.Module:
        """W: float64 out×in. Returns the replacement module (float64; the caller casts)."""
        A, B = self.factors(W, stats, rank)
        return LowRankLinear.from_factors(A, B, None if bias is None else bias.detach().double())

    def ranks(self, shapes: dict[str, tuple[int, int]], stats) -> dict[str, int | None]:
        return allocate.uniform_ranks(shapes, self.keep)

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}


def config_from_dict(d: dict) -> CompressConfig:
    d = dict(d)
    name = d.pop("method", None)
    if name not in METHODS:
        raise LayerzipError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    cls = METHODS[name]
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known and v is not None})


@register_method("svd")
@dataclass
class SVD(CompressConfig):
    """Truncated SVD of W (no calibration)."""

    def factors(self, W, stats, rank):
        return svd_factors(W, stats, rank)


@register_method("asvd")
@dataclass
class ASVD(CompressConfig):
    """Activation-aware SVD: input channels scaled by (mean |x|)^alpha."""
    alpha: float = 0.5
    needs_stats: ClassVar[bool] = True

    def factors(self, W, stats, rank):
        return asvd_factors(W, stats, rank, self.alpha)


@register_method("svd-llm")
@dataclass
class SVDLLM(CompressConfig):
    """Truncation-aware whitening (Cholesky of XᵀX), optimal layer loss at every rank."""
    needs_stats: ClassVar[bool] = True

    def factors(self, W, stats, rank):
        return svdllm_factors(W, stats, rank, whitening=stats.whitening)


@torch.no_grad()
def compress_(model: nn.Module, config: CompressConfig, calib: list[dict] | None = None,
              progress: bool = True) -> dict:
    """Replace the target Linear layers of `model` by factorized ones, in place. Returns a report (JSON-able).

    >>> import layerzip as lz
    >>> m = lz.load("minilm")                                         # doctest: +SKIP
    >>> batches = lz.calibration_batches(m, "builtin", n_samples=16)  # doctest: +SKIP
    >>> report = lz.compress_(m, lz.SVDLLM(keep=0.5), calib=batches)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    targets = select_targets(model, config.include, config.exclude)
    check_finite(targets)
    shapes = {n: linear_shape(m) for n, m in targets.items()}
    params_before = count_params(model)
    target_before = sum(p.numel() for m in targets.values() for p in m.parameters())

    stats: dict = {}
    if config.needs_stats:
        if not calib:
            raise LayerzipError(f"method {config.name} needs calibration text; pass --calib FILE or --calib builtin")
        stats = collect_stats(model, targets, {n: s[1] for n, s in shapes.items()}, calib, progress)
    t_calib = time.perf_counter()

    ranks = config.ranks(shapes, stats)
    modules = {}
    for name in tqdm(targets, desc=f"decomposing ({config.name})", unit="module", disable=not progress):
        if ranks[name] is None:
            continue
        mod = targets[name]
        W, bias = dense_weight_and_bias(mod)
        new = config.build_layer(W.detach().to("cpu", torch.float64), bias, stats.get(name), ranks[name])
        set_module(model, name, new.to(device=W.device, dtype=W.dtype))
        modules[name] = new.spec()
    t_dec = time.perf_counter()

    target_after = sum(p.numel() for n in targets for p in model.get_submodule(n).parameters())
    report = {
        "method": config.name,
        "config": config.to_dict(),
        "params_before": params_before,
        "params_after": count_params(model),
        "target_params_before": target_before,
        "target_params_after": target_after,
        "keep": config.keep,
        "keep_achieved": target_after / target_before,
        "targets": len(targets),
        "factorized": len(modules),
        "modules": modules,
        "seconds_calibration": t_calib - t0,
        "seconds_decomposition": t_dec - t_calib,
    }
    if stats:
        report["calibration"] = {"tokens": max(s.tokens for s in stats.values()),
                                 "distinct_inputs": len({id(s) for s in stats.values()})}
        report["whitening"] = _whitening_summary(stats) if config.name == "svd-llm" else None
    return report


def _whitening_summary(stats: dict) -> dict:
    """How often the Gram needed help: jitter added (relative to its mean diagonal) or the eigen fallback."""
    uniq = {id(s): s for s in stats.values()}.values()
    jit = [w.jitter / max(s.gram.diagonal().mean().item(), 1e-300) for s in uniq if (w := s.whitening).jitter > 0]
    return {"inputs": len(uniq), "jittered": len(jit), "max_relative_jitter": max(jit, default=0.0),
            "eigen_fallback": sum(not s.whitening.triangular for s in uniq)}
