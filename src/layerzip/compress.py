"""One in-place entry point: `compress_(model, config, calib=batches)`.

    select targets -> calibrate (if the method needs statistics) -> allocate ranks -> decompose -> swap modules

Options every method shares: `alloc` ("uniform" ranks, or "global": all ranks chosen together from the methods'
spectra, see allocate.py), `sequential` (compress block by block, each block calibrated on the output of the already
compressed ones, see sequential.py) and `correct` (refit each left factor by least squares toward the original
outputs, see correct.py).

A config dataclass picks the method (torchao style): validated in `__post_init__`, JSON round-trip via
`to_dict` / `config_from_dict`, registered by name with `@register_method`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from . import allocate
from .calibrate import collect_stats
from .errors import LayerzipError
from .nn import LowRankLinear, dense_weight_and_bias
from .correct import refit_left, target_aware_factors
from .methods import asvd_factors, cur_factors, fwsvd_factors, svd_factors, svdllm_factors
from .methods.cur import score_singular_values
from .methods.fwsvd import FisherStats, collect_fisher, collect_output_fisher, row_weights
from .methods.svdllm import whitened_singular_values
from .models import check_finite, count_params, is_causal, linear_shape, select_targets, set_module

METHODS: dict[str, type["CompressConfig"]] = {}
ALLOCATORS = ("uniform", "global")


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
    sequential: bool = False
    correct: bool = False

    name: ClassVar[str] = "?"
    needs_stats: ClassVar[bool] = False
    sequential_ok: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise LayerzipError(f"--keep must be in (0, 1] (the fraction of parameters kept), got {self.keep}")
        if self.alloc is not None and self.alloc not in ALLOCATORS:
            raise LayerzipError(f"--alloc must be one of {', '.join(ALLOCATORS)}, got {self.alloc!r}")
        if (self.sequential or self.correct) and not self.needs_stats:
            raise LayerzipError(f"--sequential and --correct need calibration statistics, which method {self.name} "
                                "does not use; pick svd-llm, asvd or cur, or drop those flags")
        if self.sequential and not self.sequential_ok:
            raise LayerzipError(f"method {self.name} cannot run --sequential; drop that flag")

    def factors(self, W: torch.Tensor, stats, rank: int):
        raise NotImplementedError

    def build_layer(self, W: torch.Tensor, bias, stats, rank: int) -> nn.Module:
        """W: float64 out×in. Returns the replacement module (float64; the caller casts)."""
        A, B = self.factors(W, stats, rank)
        if self.correct:                 # A = W C Bᵀ (B G' Bᵀ)⁻¹: least squares toward the original outputs
            A = refit_left(W, A, B, stats)
        return LowRankLinear.from_factors(A, B, None if bias is None else bias.detach().double())

    def spectrum(self, W: torch.Tensor, stats) -> torch.Tensor:
        """Singular values whose squared tail is this method's layer loss at each rank (for --alloc global)."""
        return torch.linalg.svdvals(W)

    def collect(self, model: nn.Module, targets: dict[str, nn.Module], calib: list[dict], progress: bool) -> dict:
        """Per-module statistics for `factors` (default: streamed Grams and |x| means)."""
        return collect_stats(model, targets, {n: linear_shape(m)[1] for n, m in targets.items()}, calib, progress)

    def ranks(self, shapes: dict[str, tuple[int, int]], stats, spectrum_of=None) -> dict[str, int | None]:
        """`spectrum_of(name)` -> that module's spectrum; needed by --alloc global."""
        if self.alloc == "global":
            spectra = {n: spectrum_of(n) for n in shapes}
            return allocate.global_ranks(shapes, spectra, self.keep, normalize=not self.loss_units)
        return allocate.uniform_ranks(shapes, self.keep)

    @property
    def loss_units(self) -> bool:
        """Whether `spectrum` is already in comparable units across modules (else global allocation normalizes it)."""
        return False

    @property
    def needs_original_stats(self) -> bool:
        """Whether statistics of the original model are collected up front: always, except for sequential + uniform
        ranks, which gathers its own block by block (global allocation needs the original spectra)."""
        return self.needs_stats and not (self.sequential and self.alloc == "uniform")

    def resolve(self, model: nn.Module, calib: list[dict] | None = None) -> "CompressConfig":
        """The config with model- and data-dependent defaults filled in (see SVDLLM); the report records this one."""
        return self

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}


def config_from_dict(d: dict) -> CompressConfig:
    d = dict(d)
    name = d.pop("method", None)
    if name not in METHODS:
        raise LayerzipError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    cls = METHODS[name]
    known = {f.name for f in fields(cls)}
    stray = sorted(k for k, v in d.items() if k not in known and v is not None and v is not False)
    if stray:
        raise LayerzipError(f"option {', '.join('--' + k for k in stray)} does not apply to method {name}; "
                            "drop it or change --method")
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

    def spectrum(self, W, stats):
        s = stats.abs_mean.to(W).clamp_min(0) ** self.alpha    # same column scaling as asvd_factors
        s = torch.where(s > 0, s, s[s > 0].min() if (s > 0).any() else torch.ones_like(s))
        return torch.linalg.svdvals(W * s)


@register_method("svd-llm")
@dataclass
class SVDLLM(CompressConfig):
    """Truncation-aware whitening (Cholesky of XᵀX), optimal layer loss at every rank.

    Defaults, the best setting measured (bench/BEAT_SVDLLM.md): `alloc="global"` — all ranks chosen together from
    the whitened spectra — with `fisher` — each output feature's error weighted by its diagonal output Fisher
    (methods/fwsvd.collect_output_fisher), so the whitened SVD is exact for that weighted loss and every module's
    loss is in one unit (≈ the model's loss increase), which is what global allocation compares. Causal LMs always
    (the Fisher comes from their own LM loss, every token a sample). Encoders only with at least
    `ENCODER_FISHER_MIN_SEQUENCES` calibration sequences: their Fisher comes from random projections of the pooled
    embedding, one per sequence, and with the default 64 it was too noisy to beat uniform ranks (which they get).
    `sequential` and `correct` together fit A and B to map the compressed inputs to the original outputs
    (correct.target_aware_factors); off by default: they lost to the defaults on held-out data."""
    alloc: str | None = None            # None: see above
    fisher: bool | None = None          # None: see above
    needs_stats: ClassVar[bool] = True
    ENCODER_FISHER_MIN_SEQUENCES: ClassVar[int] = 512

    def resolve(self, model, calib=None):
        if self.alloc is not None and self.fisher is not None:
            return self                     # nothing left to decide (and the caller's instance is kept)
        sequences = sum(len(b["input_ids"]) for b in calib or [])
        best = is_causal(model) or sequences >= self.ENCODER_FISHER_MIN_SEQUENCES
        return replace(self, alloc=self.alloc or ("global" if best else "uniform"),
                       fisher=best if self.fisher is None else self.fisher)

    @property
    def loss_units(self):
        return bool(self.fisher)

    @property
    def needs_original_stats(self):          # the Fisher is the original model's, whatever the calibration mode
        return super().needs_original_stats or bool(self.fisher)

    def _rows(self, stats):
        return row_weights(stats.fisher_rows) if self.fisher else None

    def factors(self, W, stats, rank):
        if self.correct and hasattr(stats, "cross"):
            return target_aware_factors(W, stats, rank, rows=self._rows(stats))
        return svdllm_factors(W, stats, rank, whitening=stats.whitening, rows=self._rows(stats))

    def spectrum(self, W, stats):
        return whitened_singular_values(W, stats.whitening, rows=self._rows(stats))

    def collect(self, model, targets, calib, progress):
        base = super().collect(model, targets, calib, progress)
        if not self.fisher:
            return base
        fisher = collect_output_fisher(model, targets, calib, is_causal(model), progress)
        return {n: FisherStats(fisher[n], base[n]) for n in targets}


@register_method("cur")
@dataclass
class CUR(CompressConfig):
    """CURing: real rows and columns of W picked by DEIM on an activation-weighted score; U = C⁺ W R⁺.
    `energy` (optional): rank per module = fewest components keeping that fraction of the score's energy
    (then `keep` is not used)."""
    energy: float | None = None
    needs_stats: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.energy is not None and not 0 < self.energy <= 1:
            raise LayerzipError(f"CUR energy must be in (0, 1], got {self.energy}")

    def factors(self, W, stats, rank):
        return cur_factors(W, stats, rank)

    def spectrum(self, W, stats):
        return score_singular_values(W, stats)

    def ranks(self, shapes, stats, spectrum_of=None):
        if self.energy is None:
            return super().ranks(shapes, stats, spectrum_of)
        out = {}
        for n, (m, k) in shapes.items():
            e = spectrum_of(n).square().cumsum(0)
            r = int((e < self.energy * e[-1]).sum()) + 1
            out[n] = r if r <= allocate.max_useful_rank(m, k) else None
        return out


@register_method("fwsvd")
@dataclass
class FWSVD(CompressConfig):
    """Fisher-weighted SVD: rows weighted by √(Σ squared gradients of the loss); see methods/fwsvd.py."""
    needs_stats: ClassVar[bool] = True
    sequential_ok: ClassVar[bool] = False

    def factors(self, W, stats, rank):
        return fwsvd_factors(W, stats, rank)

    def spectrum(self, W, stats):
        return torch.linalg.svdvals(row_weights(stats.fisher_rows).to(W)[:, None] * W)

    def collect(self, model, targets, calib, progress):
        base = super().collect(model, targets, calib, progress)
        fisher = collect_fisher(model, targets, calib, is_causal(model), progress)
        return {n: FisherStats(fisher[n], base[n]) for n in targets}


@torch.no_grad()
def compress_(model: nn.Module, config: CompressConfig, calib: list[dict] | None = None,
              progress: bool = True) -> dict:
    """Replace the target Linear layers of `model` by factorized ones, in place. Returns a report (JSON-able).

    >>> import layerzip as lz
    >>> m = lz.load("minilm")                                         # doctest: +SKIP
    >>> batches = lz.calibration_batches(m, "builtin", n_samples=16)  # doctest: +SKIP
    >>> report = lz.compress_(m, lz.SVDLLM(keep=0.5), calib=batches)  # doctest: +SKIP
    """
    apply = getattr(config, "apply", None)      # whole-model transforms (drop-blocks) run themselves
    if apply is not None:
        return apply(model, calib, progress)
    t0 = time.perf_counter()
    config = config.resolve(model, calib)
    targets = select_targets(model, config.include, config.exclude)
    check_finite(targets)
    shapes = {n: linear_shape(m) for n, m in targets.items()}
    params_before = count_params(model)
    target_before = sum(p.numel() for m in targets.values() for p in m.parameters())

    stats: dict = {}
    if config.needs_stats and not calib:
        raise LayerzipError(f"method {config.name} needs calibration text; pass --calib FILE or --calib builtin")
    if config.needs_original_stats:
        stats = config.collect(model, targets, calib, progress)
    t_calib = time.perf_counter()

    def spectrum_of(name):
        W, _ = dense_weight_and_bias(targets[name])
        return config.spectrum(W.detach().to("cpu", torch.float64), stats.get(name))

    # biases stay dense: the weight matrices get what `keep` leaves after them
    n_bias = target_before - sum(m * n for m, n in shapes.values())
    weight_keep = max((config.keep * target_before - n_bias) / (target_before - n_bias), 1e-9)
    ranks = replace(config, keep=min(weight_keep, 1.0)).ranks(shapes, stats, spectrum_of)
    if config.sequential:
        from .sequential import compress_sequential
        fisher = {n: s.fisher_rows for n, s in stats.items() if isinstance(s, FisherStats)}
        modules, seq_tokens = compress_sequential(model, targets, ranks, config, calib, progress, fisher)
    else:
        modules = {}
        for name in tqdm(targets, desc=f"decomposing ({config.name})", unit="module", disable=not progress):
            if ranks[name] is not None:
                modules[name] = replace_module(model, name, targets[name], config, stats.get(name), ranks[name])
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
        report["calibration"] = {"tokens": max(getattr(s, "tokens", 0) for s in stats.values()),
                                 "distinct_inputs": len(distinct_stats(stats))}
        report["whitening"] = _whitening_summary(stats) if config.name == "svd-llm" else None
    if config.sequential:
        report["calibration"] = {**report.get("calibration", {}), "sequential_tokens": seq_tokens}
    report["ranks"] = {n: r for n, r in ranks.items()}
    return report


def replace_module(model: nn.Module, name: str, mod: nn.Module, config: CompressConfig, stats, rank: int) -> dict:
    """Decompose one target in float64 and swap the result in, cast back to the original dtype. Returns its spec."""
    W, bias = dense_weight_and_bias(mod)
    new = config.build_layer(W.detach().to("cpu", torch.float64), bias, stats, rank)
    set_module(model, name, new.to(device=W.device, dtype=W.dtype))
    return new.spec()


def distinct_stats(stats: dict) -> list:
    """The activation statistics behind `stats`, each once (modules reading one input share them; a FisherStats
    wraps its module's shared `base`)."""
    return list({id(s): s for s in (getattr(s, "base", None) or s for s in stats.values())}.values())


def _whitening_summary(stats: dict) -> dict:
    """How often the Gram needed help: jitter added (relative to its mean diagonal) or the eigen fallback."""
    uniq = distinct_stats(stats)
    jit = [w.jitter / max(s.gram.diagonal().mean().item(), 1e-300) for s in uniq if (w := s.whitening).jitter > 0]
    return {"inputs": len(uniq), "jittered": len(jit), "max_relative_jitter": max(jit, default=0.0),
            "eigen_fallback": sum(not s.whitening.triangular for s in uniq)}
