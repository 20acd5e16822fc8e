"""structurize(model, config): swap a model's Linear layers (nn.Linear and GPT-2 Conv1D) for one structure.

One config dataclass per structure, validated in `__post_init__`, registered by name in `CONFIGS`. A config either
fixes the structure's shape arguments (e.g. `BTTConfig(rank=4)`) or sets `keep` (fraction of each layer's dense
parameter count to keep); then `choose_shape` picks, per layer, the largest shape whose parameter count is ≤ keep·in·out.
`structure_factory(name)` gives the `(W, bias, keep) -> layer` function that `layerzip compress --method <name>` uses.

>>> import torch
>>> from layerzip.nn import structurize, MonarchConfig
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
>>> _ = structurize(model, MonarchConfig(nblocks=8), exclude=[r"^2$"])   # keep the head dense
>>> type(model[0]).__name__, type(model[2]).__name__
('MonarchLinear', 'Linear')
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from ..layers.base import FactorizedLayer, dense_weight_and_bias, is_linear_like
from ..layers.lowrank import LowRankLinear
from ._common import balanced_factors, layer_flops
from .blast import BlastLinear
from .btt import BTTLinear
from .hadamard import LowRankHadamardLinear
from .kronecker import KroneckerLinear
from .monarch import MonarchLinear
from .tt import TTLinear

CONFIGS: dict[str, type] = {}


def register_config(cls):
    CONFIGS[cls.name] = cls
    return cls


@dataclass
class StructureConfig:
    name: ClassVar[str] = "?"
    keep: float | None = None  # if set: per layer, the largest shape with params ≤ keep·in·out

    def __post_init__(self):
        if self.keep is not None and not 0 < self.keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "keep" and isinstance(v, int) and v < 1:
                raise ValueError(f"{type(self).__name__}.{f.name} must be >= 1, got {v}")

    def shape_args(self, in_features: int, out_features: int) -> dict:
        if self.keep is not None:
            return choose_shape(self.name, in_features, out_features, self.keep)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "keep"}

    def to_dict(self) -> dict:
        return {"structure": self.name, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: dict) -> "StructureConfig":
        d = dict(d)
        return CONFIGS[d.pop("structure")](**d)


@register_config
@dataclass
class LowRankConfig(StructureConfig):
    name: ClassVar[str] = "lowrank"
    rank: int = 8


@register_config
@dataclass
class BTTConfig(StructureConfig):
    name: ClassVar[str] = "btt"
    rank: int = 1


@register_config
@dataclass
class MonarchConfig(StructureConfig):
    name: ClassVar[str] = "monarch"
    nblocks: int = 4


@register_config
@dataclass
class KroneckerConfig(StructureConfig):
    name: ClassVar[str] = "kronecker"
    n: int = 4
    terms: int | None = None


@register_config
@dataclass
class HadamardConfig(StructureConfig):
    name: ClassVar[str] = "hadamard"
    rank: int = 4


@register_config
@dataclass
class BlastConfig(StructureConfig):
    name: ClassVar[str] = "blast"
    nblocks: int = 4
    rank: int = 8


@register_config
@dataclass
class TTConfig(StructureConfig):
    name: ClassVar[str] = "tt"
    rank: int = 8
    ncores: int = 3


LAYERS = {"lowrank": LowRankLinear, "btt": BTTLinear, "monarch": MonarchLinear, "kronecker": KroneckerLinear,
          "hadamard": LowRankHadamardLinear, "blast": BlastLinear, "tt": TTLinear}
STRUCTURES = list(LAYERS)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _candidates(name: str, n: int, m: int, budget: float):
    """(shape args, weight parameter count) for every sensible shape of structure `name` on an m×n layer."""
    if name == "lowrank":
        for r in range(1, min(m, n) + 1):
            yield {"rank": r}, LowRankLinear.num_params(n, m, r)
    elif name == "btt":
        # balanced grids first (ties go to the first); smaller n1, m1 give fewer parameters (n1 = m1 = 1 is low rank)
        grids = sorted(((a, n // a), (c, m // c)) for a in _divisors(n) for c in _divisors(m))
        grids.sort(key=lambda g: abs(math.log(g[0][0] / g[0][1])) + abs(math.log(g[1][0] / g[1][1])))
        for si, so in grids:
            for r in range(1, min(si[1], so[1]) + 1):
                yield {"rank": r, "in_shape": si, "out_shape": so}, BTTLinear.num_params(si, so, r)
    elif name == "monarch":
        for b in range(1, min(m, n) + 1):
            yield {"nblocks": b}, MonarchLinear.num_params(n, m, b)
    elif name == "kronecker":
        g = math.gcd(m, n)
        ns = [k for k in range(2, min(g, 64) + 1) if g % k == 0] or list(range(2, min(m, n, 16) + 1))
        for k in ns:   # params grow linearly in t: only the largest t within budget matters
            pq = math.ceil(m / k) * math.ceil(n / k)
            t = min(k * k, pq, int(budget // (k * k + pq)))
            if t >= 1:
                yield {"n": k, "terms": t}, KroneckerLinear.num_params(n, m, k, t)
    elif name == "hadamard":
        for r in range(1, math.isqrt(min(m, n)) + 1):
            yield {"rank": r}, LowRankHadamardLinear.num_params(n, m, r)
    elif name == "blast":
        g = math.gcd(m, n)
        for b in [k for k in (16, 8, 4, 2) if g % k == 0 and k * k <= min(m, n)] + [1]:   # most blocks first
            for r in range(1, min(math.ceil(m / b), math.ceil(n / b)) + 1):
                yield {"nblocks": b, "rank": r}, BlastLinear.num_params(n, m, b, r)
    elif name == "tt":
        si, so = balanced_factors(n, 3), balanced_factors(m, 3)
        for r in range(1, 257):
            yield {"rank": r, "in_shape": si, "out_shape": so}, TTLinear.num_params(si, so, r)
    else:
        raise ValueError(f"unknown structure {name!r}; choose from {STRUCTURES}")


def choose_shape(name: str, in_features: int, out_features: int, keep: float) -> dict:
    """Shape args of `name` with ≤ keep·in·out weights: among those within 10% of the most parameters that fit,
    the one with the fewest forward FLOPs (matters for Kronecker, whose FLOPs grow with n·t at equal parameters)."""
    budget = keep * in_features * out_features
    fits = [(args, p) for args, p in _candidates(name, in_features, out_features, budget) if p <= budget]
    if not fits:
        raise ValueError(f"{name}: no shape fits keep={keep} on a {out_features}x{in_features} layer")
    top = max(p for _, p in fits)
    near = [args for args, p in fits if p >= 0.9 * top]
    if len(near) == 1:
        return near[0]
    flops = lambda a: layer_flops(LAYERS[name](in_features, out_features, bias=False, device="meta", **a))  # noqa
    return min(near, key=flops)


def build_layer(name: str, W: torch.Tensor | None, in_features: int, out_features: int, bias, shape_args: dict,
                dtype=None, device=None) -> FactorizedLayer:
    """A fresh layer (W None; `bias` is a bool) or the projection of W (out×in; `bias` a tensor or None)."""
    cls = LAYERS[name]
    if W is None:
        return cls(in_features, out_features, bias=bias, dtype=dtype, device=device, **shape_args)
    if cls is LowRankLinear:
        from ..methods.svd import svd_factors
        A, B = svd_factors(W.detach().double(), None, shape_args["rank"])
        return LowRankLinear.from_factors(A, B, bias, dtype=W.dtype, device=W.device)
    return cls.from_dense(W, bias, **shape_args)


def structure_factory(name: str) -> Callable[[torch.Tensor, torch.Tensor | None, float], FactorizedLayer]:
    """`(W out×in float64, bias, keep) -> layer` with ≈ keep·in·out weights (never more). For `layerzip compress`."""
    if name not in LAYERS:
        raise ValueError(f"unknown structure {name!r}; choose from {STRUCTURES}")

    def make(W: torch.Tensor, bias: torch.Tensor | None, keep: float) -> FactorizedLayer:
        m, n = W.shape
        return build_layer(name, W, n, m, bias, choose_shape(name, n, m, keep))
    return make


def _selected(name: str, include, exclude) -> bool:
    if include is not None and not any(re.search(p, name) for p in include):
        return False
    return not (exclude and any(re.search(p, name) for p in exclude))


def structurize(model: nn.Module, config: StructureConfig, include: list[str] | None = None,
                exclude: list[str] | None = None, from_dense: bool = True) -> nn.Module:
    """Replace (in place) every linear-like module whose qualified name matches a regex in `include` (all if None)
    and none in `exclude`. `from_dense=True` projects the trained weights; False gives the structure's fresh init
    (bias kept as is). Returns the model."""
    targets = [(n, m) for n, m in model.named_modules() if is_linear_like(m) and _selected(n, include, exclude)]
    for qual, module in targets:
        W, b = dense_weight_and_bias(module)
        m, n = W.shape
        args = config.shape_args(n, m)
        if from_dense:
            new = build_layer(config.name, W.detach(), n, m, None if b is None else b.detach(), args)
        else:
            new = build_layer(config.name, None, n, m, b is not None, args, dtype=W.dtype, device=W.device)
            if b is not None:
                with torch.no_grad():
                    new.bias.copy_(b)
        parent_name, _, child = qual.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
