"""Base class of factorized layers and their registry (`layerzip.registry.LAYERS`).

Every factorized layer can say what it is (`spec()`: a small JSON dict with its type and shapes), be rebuilt empty
from that spec before its tensors are loaded (`from_spec`), be projected from a dense weight (`from_dense`) and be
merged back into a plain `nn.Linear` (`to_dense()`). The registry maps the spec's "type" to the class; new layers
register with `@register_layer(name)`, which refuses a second class under a taken name.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..errors import LayerzipError
from ..registry import LAYERS

register_layer = LAYERS.register


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
    """A module computing y = W x + b with W (out×in) held in factored form.

    The shape of the factorization is given by keyword arguments ("shape args", e.g. `rank=8`), the same for the
    constructor, `from_dense`, `num_params` and what `candidates` yields."""

    layer_type = "?"
    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def dense_weight(self) -> torch.Tensor:  # out × in
        raise NotImplementedError

    @classmethod
    def from_dense(cls, W: torch.Tensor, bias: torch.Tensor | None = None, **shape) -> "FactorizedLayer":
        """Project a dense W (out×in) onto the factorization; the bias is copied."""
        raise NotImplementedError

    @classmethod
    def from_linear(cls, module: nn.Module, **shape) -> "FactorizedLayer":
        """`from_dense` of an `nn.Linear`, a GPT-2 `Conv1D` or any factorized layer."""
        W, b = dense_weight_and_bias(module)
        return cls.from_dense(W, None if b is None else b.detach(), **shape)

    @staticmethod
    def num_params(in_features: int, out_features: int, **shape) -> int:
        """Weight parameters (bias excluded) of an in -> out layer of that shape."""
        raise NotImplementedError

    @classmethod
    def candidates(cls, in_features: int, out_features: int, budget: float) -> Iterator[dict]:
        """Shape args worth considering for an in -> out layer with about `budget` weight parameters (the caller
        keeps those whose `num_params` fits)."""
        raise NotImplementedError

    def flops(self) -> int:
        """Forward FLOPs (2 × multiply-adds) per input row."""
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
    """An empty layer of the spec's type and shape, ready for `load_state_dict`."""
    if spec.get("type") not in LAYERS:
        raise LayerzipError(f"unknown factorized layer type {spec.get('type')!r} (known: {', '.join(LAYERS)}); "
                            "upgrade layerzip: pip install -U layerzip")
    return LAYERS[spec["type"]].from_spec(spec, dtype=dtype, device=device)
