"""ElasticLinear: one module of an elastic model (`compress --elastic`), stored once for every width.

    A (out×R), B (R×in)   low-rank factors whose first r columns of A and rows of B are the module's rank-r
                          factorization (the method's factors are truncations of one decomposition), R the largest
                          rank any keep of the elastic range gives it — min(in, out), where A B is W itself, when
                          some keep of the range leaves the module dense
    weight (out×in)       instead of A, B (R = None): a module dense at every keep of the range
    spectrum_bits         the method's spectrum of the module (the global allocation reads it to choose the ranks
                          at a keep), its float64 bits stored as int64 so that casting the model (bf16, float16)
                          leaves it exact

`width` is the rank the forward uses now (None: dense — W, or A B at full rank); `at_width(r)` is the plain module
of that width (a LowRankLinear of A[:, :r] and B[:r], or an nn.Linear), which is what loading at a keep builds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import FactorizedLayer, register_layer
from .lowrank import LowRankLinear


@register_layer("elastic")
class ElasticLinear(FactorizedLayer):
    """>>> lin = nn.Linear(6, 4)
    >>> el = ElasticLinear.from_lowrank(LowRankLinear.from_linear(lin), torch.tensor([3., 2., 1., .5]))
    >>> el.set_width(2); el.active_params(), el.num_parameters()
    (24, 44)
    >>> el.set_width(None); bool(torch.allclose(el(torch.ones(1, 6)), lin(torch.ones(1, 6)), atol=1e-5))
    True
    """

    def __init__(self, in_features: int, out_features: int, rank: int | None, bias: bool = True,
                 spectrum: int = 0, device=None, dtype=None):
        super().__init__()
        if rank is not None and not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank must be None or in [1, {min(in_features, out_features)}], got {rank}")
        kw = dict(device=device, dtype=dtype)     # uninitialized: always filled (from_* or a load) before use
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        if rank is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        else:
            self.A = nn.Parameter(torch.empty(out_features, rank, **kw))
            self.B = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.register_buffer("spectrum_bits", torch.empty(spectrum, dtype=torch.int64, device=device))
        self.width = rank

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_lowrank(cls, layer: LowRankLinear, spectrum: torch.Tensor) -> "ElasticLinear":
        A = layer.A.detach()
        new = cls(layer.in_features, layer.out_features, layer.rank, layer.bias is not None, spectrum.numel(),
                  device=A.device, dtype=A.dtype)
        with torch.no_grad():
            new.A.copy_(A)
            new.B.copy_(layer.B)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        new.set_spectrum(spectrum)
        return new

    @classmethod
    def dense(cls, W: torch.Tensor, bias: torch.Tensor | None, spectrum: torch.Tensor) -> "ElasticLinear":
        """A module kept dense at every keep: its weight W (out×in) as it is."""
        new = cls(W.shape[1], W.shape[0], None, bias is not None, spectrum.numel(), device=W.device, dtype=W.dtype)
        with torch.no_grad():
            new.weight.copy_(W)
            if bias is not None:
                new.bias.copy_(bias)
        new.set_spectrum(spectrum)
        return new

    def set_spectrum(self, spectrum: torch.Tensor) -> None:
        self.spectrum_bits = spectrum.detach().to(device=self.spectrum_bits.device,
                                                  dtype=torch.float64).contiguous().view(torch.int64).clone()

    @property
    def spectrum(self) -> torch.Tensor:
        """The float64 spectrum (on the CPU) the allocation reads."""
        return self.spectrum_bits.detach().cpu().view(torch.float64)

    # ------------------------------------------------------------------------------------------------ widths
    @property
    def full_rank(self) -> bool:
        """Whether the stored factors are W itself (A B at rank min(in, out)), so the module can be dense."""
        return self.rank is None or self.rank == min(self.in_features, self.out_features)

    def set_width(self, rank: int | None) -> None:
        """The rank the forward uses (None: dense)."""
        if rank is None and not self.full_rank:
            raise ValueError(f"this module stores rank {self.rank} < {min(self.in_features, self.out_features)}, "
                             "so it cannot be dense")
        if rank is not None and (self.rank is None or not 0 < rank <= self.rank):
            raise ValueError(f"width {rank} is outside the stored rank {self.rank}")
        self.width = rank

    def _dense(self) -> torch.Tensor:
        """W: the stored weight, or A B at full rank (formed in float32 at least: a bf16 model's product is not
        rounded twice)."""
        if self.rank is None:
            return self.weight
        return self.product(self.A, self.B)

    @staticmethod
    def product(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """A B in A's dtype, formed in float32 or wider (what a module dense at a keep gets; io reads the same)."""
        wide = torch.promote_types(A.dtype, torch.float32)
        return (A.to(wide) @ B.to(wide)).to(A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width is None:
            return F.linear(x, self._dense(), self.bias)
        r = self.width
        return F.linear(F.linear(x, self.B[:r]), self.A[:, :r], self.bias)

    @torch.no_grad()
    def at_width(self, rank: int | None) -> nn.Module:
        """The plain module of that width: LowRankLinear(A[:, :r], B[:r]) or, None, an nn.Linear of W (copies; built
        empty on the meta device and given the tensors, so no initialization is computed and thrown away)."""
        self.set_width(rank)
        if rank is None:
            new = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
            W = self._dense().detach()
            new.weight = nn.Parameter(W.clone() if self.rank is None else W)     # a product is a new tensor
        else:
            new = LowRankLinear(self.in_features, self.out_features, rank, self.bias is not None, device="meta")
            new.A = nn.Parameter(self.A.detach()[:, :rank].clone(memory_format=torch.contiguous_format))
            new.B = nn.Parameter(self.B.detach()[:rank].clone())
        if self.bias is not None:
            new.bias = nn.Parameter(self.bias.detach().clone())
        return new

    def active_params(self) -> int:
        """Parameters of the module at its current width (what `at_width(width)` holds)."""
        b = 0 if self.bias is None else self.out_features
        if self.width is None:
            return self.in_features * self.out_features + b
        return self.width * (self.in_features + self.out_features) + b

    # ------------------------------------------------------------------------------------------------ the API
    def dense_weight(self) -> torch.Tensor:
        if self.width is None:
            return self._dense()
        return self.A[:, :self.width] @ self.B[:self.width]

    def flops(self) -> int:
        if self.width is None:
            return 2 * self.in_features * self.out_features
        return 2 * self.width * (self.in_features + self.out_features)

    num_params = staticmethod(LowRankLinear.num_params)

    def spec(self) -> dict:
        return {"type": "elastic", "in": self.in_features, "out": self.out_features, "rank": self.rank,
                "bias": self.bias is not None, "spectrum": self.spectrum_bits.numel()}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "ElasticLinear":
        return cls(spec["in"], spec["out"], spec["rank"], spec["bias"], spec["spectrum"], device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, stored_rank={self.rank}, width={self.width}, "
                f"bias={self.bias is not None}")
