"""Shared plumbing for the structured layers: shape factoring, padding, the generic spec / from_dense / from_spec,
and `layer_flops`.

Every structure reshapes x (…, in) into a grid such as (n1, n2); when `in` has no balanced factorization the grid is
padded (x gets zero columns, y is cut back to `out`). Padded weights are real parameters, counted in `num_params`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import FactorizedLayer, dense_weight_and_bias


def _balanced_exact(n: int, d: int) -> tuple[int, ...]:
    """Greedy factorization of n into d factors near n^(1/d) (exact product, maybe unbalanced)."""
    if d == 1:
        return (n,)
    target = round(n ** (1.0 / d))
    f = max(k for k in range(1, max(target, 1) + 1) if n % k == 0)
    return tuple(sorted((f,) + _balanced_exact(n // f, d - 1)))


def balanced_factors(n: int, d: int = 2) -> tuple[int, ...]:
    """d factors each ≲ 2·n^(1/d) with product ≥ n: exact when possible, else the smallest padding (≤ 12.5%) that
    allows it, else ⌈n^(1/d)⌉ each.  784 → (28, 28); 10 → (2, 5); 13 → (2, 7) (one padded row)."""
    for N in range(n, int(n * 1.125) + 2):
        f = _balanced_exact(N, d)
        if max(f) <= 2 * math.ceil(N ** (1.0 / d)):
            return f
    return (math.ceil(n ** (1.0 / d)),) * d


def pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def pad_matrix(W: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad W (out×in) to rows×cols."""
    return F.pad(W, (0, cols - W.shape[1], 0, rows - W.shape[0]))


class StructuredLinear(FactorizedLayer):
    """Base for layerzip.nn layers: y = W x + b with W structured.

    Subclasses define `__init__(in_features, out_features, *, <shape args>, bias, device, dtype)`, `_shape_args()`
    (the JSON-able shape arguments), `forward`, `dense_weight`, `project_(W64)` (set the factors from a dense
    float64 matrix, exactly or by a documented optimizer), `flops()`, `num_params` and `candidates`."""

    def _shape_args(self) -> dict:
        raise NotImplementedError

    def project_(self, W: torch.Tensor) -> None:
        raise NotImplementedError

    def _init_bias(self, bias: bool, kw: dict) -> None:
        self.bias = torch.nn.Parameter(torch.zeros(self.out_features, **kw)) if bias else None

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        """Cut padded outputs and add the bias."""
        if y.shape[-1] != self.out_features:
            y = y[..., : self.out_features]
        return y if self.bias is None else y + self.bias

    # --- constructors and serialization, shared by all structures
    @classmethod
    @torch.no_grad()
    def from_dense(cls, W: torch.Tensor, bias: torch.Tensor | None = None, **shape_args) -> "StructuredLinear":
        """Project a dense W (out×in) onto the structure (math in float64, factors cast to W's dtype)."""
        dtype = W.dtype if W.dtype.is_floating_point else torch.float32
        layer = cls(W.shape[1], W.shape[0], bias=bias is not None, dtype=dtype, device=W.device, **shape_args)
        layer.project_(W.detach().double())
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def spec(self) -> dict:
        return {"type": self.layer_type, "in": self.in_features, "out": self.out_features,
                "bias": self.bias is not None, **self._shape_args()}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "StructuredLinear":
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()
              if k not in ("type", "in", "out", "bias")}
        return cls(spec["in"], spec["out"], bias=spec["bias"], dtype=dtype, device=device, **kw)

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self._shape_args().items())
        return f"in={self.in_features}, out={self.out_features}, {args}, bias={self.bias is not None}"


def layer_flops(layer: torch.nn.Module) -> int:
    """Forward FLOPs (2 × multiply-adds) per input row of a linear-like layer."""
    if isinstance(layer, FactorizedLayer):
        return layer.flops()
    W, _ = dense_weight_and_bias(layer)
    return 2 * W.numel()
