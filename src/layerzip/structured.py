"""`layerzip compress --method btt|monarch|kronecker|hadamard|blast|tt`: project each target onto a structure.

Each structure picks its shape so the layer stores ≈ keep × its dense weights (never more), see
`layerzip.nn.choose_shape`; no calibration is used (the projections are Frobenius-optimal or
a documented optimizer in `layerzip.nn`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .compress import CompressConfig, register_method
from .errors import LayerzipError
from .nn import STRUCTURES, choose_shape
from .registry import LAYERS


@dataclass
class StructuredConfig(CompressConfig):
    """Projection of every target onto one structured matrix family at ≈ keep of its parameters."""
    structure: ClassVar[str] = "?"

    def __post_init__(self):
        super().__post_init__()
        if self.alloc != "uniform":
            raise LayerzipError(f"method {self.name} supports --alloc uniform only")

    def ranks(self, shapes, stats, spectrum_of=None):
        return {n: 0 for n in shapes}       # not a rank: "project this module"; the shape comes from keep

    def build_layer(self, W, bias, stats, rank) -> nn.Module:
        try:
            cls, (m, n) = LAYERS[self.structure], W.shape
            return cls.from_dense(W, None if bias is None else bias.detach().double(),
                                  **choose_shape(cls, n, m, self.keep))
        except ValueError as e:
            raise LayerzipError(f"{e}; raise --keep or exclude that layer with --exclude") from None


for _name in STRUCTURES:
    if _name != "lowrank":
        register_method(_name)(type(f"{_name.title()}Config", (StructuredConfig,), {"structure": _name,
                                                                                      "__module__": __name__}))
