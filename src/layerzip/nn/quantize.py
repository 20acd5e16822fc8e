"""Low-bit storage of a model (`save(..., bits=8|4)`): each low-rank layer swapped for its storage form and back.
LowRankLinear -> LowBitLowRank; LowRankEmbedding -> LowBitLowRankEmbedding, and the TiedLowRankHead beside it ->
LowBitTiedHead, which holds no tensors (tied weights stay one copy on disk); the dense nn.Linear layers the caller
names (io.save: those of the repeated blocks that stayed dense) -> LowBitLinear. Loading dequantizes each to the
layer it stores, in the model's dtype (`dequantize_factors_`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import FactorizedLayer, register_layer
from .embedding import LowBitLowRankEmbedding, LowBitTiedHead, LowRankEmbedding, TiedLowRankHead, tie_heads_
from .lowbit import GROUP_SIZE, add_lowbit_buffers, read_lowbit, store_lowbit_
from .lowrank import LowBitLowRank, LowRankLinear


@register_layer("lowbit_linear")
class LowBitLinear(FactorizedLayer):
    """A dense `nn.Linear` whose weight is stored with `bits` (8 or 4) and a float32 scale per group of
    `group_size` input columns (lowbit.py); the bias stays in `dtype`. Its storage form only: loading gives the
    nn.Linear back (`dequantized`).

    >>> lin = nn.Linear(300, 8)
    >>> q = LowBitLinear.from_linear(lin, bits=8)
    >>> x = torch.randn(2, 300)
    >>> bool(torch.allclose(q(x), lin(x), atol=0.02)), type(q.dequantized()).__name__, q.spec()["bits"]
    (True, 'Linear', 8)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8,
                 group_size: int = GROUP_SIZE, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.dtype = dtype or torch.get_default_dtype()
        add_lowbit_buffers(self, "weight", out_features, in_features, bits, group_size, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.dtype)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, bits: int = 8, group_size: int = GROUP_SIZE) -> "LowBitLinear":
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, bits, group_size,
                  device=lin.weight.device, dtype=lin.weight.dtype)
        store_lowbit_(new, "weight", lin.weight)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
        return new

    def dense_weight(self) -> torch.Tensor:
        return read_lowbit(self, "weight", self.in_features, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def dequantized(self) -> nn.Linear:
        return self.to_dense()

    num_params = staticmethod(lambda in_features, out_features, **shape: in_features * out_features)

    def flops(self) -> int:
        return 2 * self.in_features * self.out_features

    def spec(self) -> dict:
        return {"type": "lowbit_linear", "in": self.in_features, "out": self.out_features,
                "bias": self.bias is not None, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "LowBitLinear":
        return cls(spec["in"], spec["out"], spec["bias"], spec["bits"], spec["group_size"], device=device,
                   dtype=dtype)


LOWBIT_TYPES = (LowBitLowRank, LowBitLowRankEmbedding, LowBitTiedHead, LowBitLinear)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_factors_(model: nn.Module, bits: int | dict[str, int], group_size: int = GROUP_SIZE,
                      dense: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Replace every low-rank layer of `model`, and the nn.Linear layers named in `dense`, by their low-bit storage
    form at `bits`; or, `bits` a {name: bits} map (--budget-bytes), exactly the layers it names at their own bits
    (16: left as they are). Returns {name: the replaced module}."""
    def bits_of(name: str) -> int:
        return bits.get(name, 16) if isinstance(bits, dict) else bits

    def listed(name: str) -> bool:
        return name in bits if isinstance(bits, dict) else name in dense
    old = {n: m for n, m in model.named_modules()
           if (type(m) is TiedLowRankHead and bits_of(m.tied_to) != 16) or (bits_of(n) != 16 and (
               type(m) in (LowRankLinear, LowRankEmbedding) or (listed(n) and type(m) is nn.Linear)))}
    for name, m in old.items():
        b = bits_of(name)
        if type(m) is nn.Linear:
            _swap(model, name, LowBitLinear.from_linear(m, b, group_size))
        elif type(m) is LowRankLinear:
            _swap(model, name, LowBitLowRank.from_lowrank(m, b, group_size))
        elif type(m) is LowRankEmbedding:
            _swap(model, name, LowBitLowRankEmbedding.from_lowrank(m, b, group_size))
    for name, m in old.items():                 # heads once their embeddings are swapped
        if type(m) is TiedLowRankHead:
            _swap(model, name, LowBitTiedHead.of(model.get_submodule(m.tied_to), m.tied_to))
    return old


def restore_modules_(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put back the modules `quantize_factors_` replaced."""
    for name, m in modules.items():
        _swap(model, name, m)


def dequantize_factors_(model: nn.Module) -> int:
    """Replace every low-bit storage form in `model` by its low-rank layer in its dtype (tied heads tied again);
    returns how many."""
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, LOWBIT_TYPES)]
    for name, m in found:
        _swap(model, name, m.dequantized())
    tie_heads_(model)
    return len(found)
