"""`--method btt|monarch|kronecker|hadamard|blast|tt`: project each target onto one structured matrix family.

Each structure picks its shape so the layer stores ≈ keep × its dense weights (never more), by
`layerzip.nn.choose_shape`; no calibration is used (the projections are Frobenius-optimal or a documented optimizer
in `layerzip.nn`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import LayerzipError
from ..nn import BlastLinear, BTTLinear, KroneckerLinear, LowRankHadamardLinear, MonarchLinear, TTLinear, choose_shape
from .base import CompressConfig, register_method


@dataclass
class StructuredConfig(CompressConfig):
    """Projection of every target onto the structure `layer` at ≈ keep of its parameters."""
    layer: ClassVar[type] = None
    correct_ok: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        if self.alloc != "uniform":
            raise LayerzipError(f"method {self.name} supports --alloc uniform only")

    def ranks(self, shapes, keep, spectrum_of=None):
        return {n: 0 for n in shapes}       # not a rank: "project this module"; the shape comes from keep

    def build_layer(self, W, bias, stats, rank) -> nn.Module:
        m, n = W.shape
        try:
            shape = choose_shape(self.layer, n, m, self.keep)
        except ValueError as e:
            raise LayerzipError(f"{e}; raise --keep or exclude that layer with --exclude") from None
        return self.layer.from_dense(W, None if bias is None else bias.detach().double(), **shape)


@register_method("btt")
@dataclass
class BTT(StructuredConfig):
    """Block tensor-train, 2 cores (layerzip.nn.BTTLinear)."""
    layer: ClassVar[type] = BTTLinear


@register_method("monarch")
@dataclass
class Monarch(StructuredConfig):
    """Block-diagonal · permutation · block-diagonal (layerzip.nn.MonarchLinear)."""
    layer: ClassVar[type] = MonarchLinear


@register_method("kronecker")
@dataclass
class Kronecker(StructuredConfig):
    """A sum of Kronecker products (layerzip.nn.KroneckerLinear)."""
    layer: ClassVar[type] = KroneckerLinear


@register_method("hadamard")
@dataclass
class Hadamard(StructuredConfig):
    """(X₁Y₁ᵀ) ⊙ (X₂Y₂ᵀ), FedPara (layerzip.nn.LowRankHadamardLinear)."""
    layer: ClassVar[type] = LowRankHadamardLinear


@register_method("blast")
@dataclass
class Blast(StructuredConfig):
    """Blocks Uᵢ diag(sᵢⱼ) Vⱼᵀ (layerzip.nn.BlastLinear)."""
    layer: ClassVar[type] = BlastLinear


@register_method("tt")
@dataclass
class TT(StructuredConfig):
    """Tensor-train matrix, 3 cores (layerzip.nn.TTLinear)."""
    layer: ClassVar[type] = TTLinear
