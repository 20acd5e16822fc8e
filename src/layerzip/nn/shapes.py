"""choose_shape: the shape of a layer type that keeps a given fraction of a dense layer's weights.

>>> from layerzip.nn import choose_shape
>>> choose_shape("lowrank", 64, 64, keep=0.25)             # r·(64 + 64) ≤ 0.25·64²
{'rank': 8}
"""
from __future__ import annotations

from ..registry import LAYERS
from .base import FactorizedLayer


def choose_shape(layer: type[FactorizedLayer] | str, in_features: int, out_features: int, keep: float) -> dict:
    """Shape args of `layer` (a class or its registered name) with ≤ keep·in·out weights: among the candidates
    within 10% of the most parameters that fit, the one with the fewest forward FLOPs (matters for Kronecker, whose
    FLOPs grow with n·t at equal parameters). ValueError if none fits."""
    cls = LAYERS[layer] if isinstance(layer, str) else layer
    budget = keep * in_features * out_features
    fits = [(args, p) for args in cls.candidates(in_features, out_features, budget)
            if (p := cls.num_params(in_features, out_features, **args)) <= budget]
    if not fits:
        raise ValueError(f"{cls.layer_type}: no shape fits keep={keep} on a {out_features}x{in_features} layer")
    top = max(p for _, p in fits)
    near = [args for args, p in fits if p >= 0.9 * top]
    if len(near) == 1:
        return near[0]
    return min(near, key=lambda a: cls(in_features, out_features, bias=False, device="meta", **a).flops())
