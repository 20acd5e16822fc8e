"""Base class and registry of factorized layers.

Every factorized layer can say what it is (`spec()`: a small JSON dict with its type and shapes), be rebuilt empty
from that spec before its tensors are loaded (`from_spec`), and be merged back into a plain `nn.Linear`
(`to_dense()`). The registry maps the spec's "type" to the class; new layers register with `@register_layer`.
"""
from __future__ import annotations

import torch
from torch import nn

LAYER_TYPES: dict[str, type] = {}


def register_layer(name: str):
    def deco(cls):
        if name in LAYER_TYPES and LAYER_TYPES[name] is not cls:
            raise ValueError(f"layer type {name!r} registered twice")
        LAYER_TYPES[name] = cls
        cls.layer_type = name
        return cls
    return deco


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D: y = x @ weight + bias, weight stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dense_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W out×in, bias) of a Linear, a Conv1D (transposed storage) or any factorized layer."""
    if isinstance(module, FactorizedLayer):
        return module.dense_weight(), module.bias
    if is_conv1d(module):
        return module.weight.t(), module.bias
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    raise TypeError(f"not a linear layer: {type(module).__name__}")


class FactorizedLayer(nn.Module):
    """A module computing y = W x + b with W held in factored form."""

    layer_type = "?"
    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def dense_weight(self) -> torch.Tensor:  # out × in
        raise NotImplementedError

    def spec(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "FactorizedLayer":
        raise NotImplementedError

    def to_dense(self) -> nn.Linear:
        """Merge the factors back into a plain `nn.Linear`."""
        W = self.dense_weight().detach()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=W.device, dtype=W.dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def layer_from_spec(spec: dict, dtype=None, device=None) -> FactorizedLayer:
    try:
        cls = LAYER_TYPES[spec["type"]]
    except KeyError:
        raise ValueError(f"unknown factorized layer type {spec.get('type')!r}; upgrade layerzip") from None
    return cls.from_spec(spec, dtype=dtype, device=device)
