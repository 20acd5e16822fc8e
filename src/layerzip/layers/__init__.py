"""Factorized layers. Each registers its spec type so saved models can be rebuilt."""
from .base import LAYER_TYPES, FactorizedLayer, dense_weight_and_bias, is_linear_like, layer_from_spec, register_layer
from .lowrank import LowRankLinear

__all__ = ["LAYER_TYPES", "FactorizedLayer", "LowRankLinear", "dense_weight_and_bias", "is_linear_like",
           "layer_from_spec", "register_layer"]
