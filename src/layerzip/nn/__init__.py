"""Structured linear layers for training and for projection of trained weights.

| class | W | parameters |
|---|---|---|
| LowRankLinear | A B | r(in+out) |
| BTTLinear | block tensor-train, 2 cores, rank r | r(n1·n2·m1 + m1·n1·m2) |
| MonarchLinear | block-diag · permutation · block-diag | b²(⌈in/b⌉ + ⌈out/b⌉) |
| KroneckerLinear | Σₜ Aₜ ⊗ Sₜ (PHM) | t(n² + ⌈out/n⌉⌈in/n⌉) |
| LowRankHadamardLinear | (X₁Y₁ᵀ) ⊙ (X₂Y₂ᵀ) (FedPara) | 2R(in+out) |
| BlastLinear | blocks Uᵢ diag(sᵢⱼ) Vⱼᵀ | r(b·p + b·q + b²) |
| TTLinear | tensor-train matrix | Σ r_{k−1} m_k n_k r_k |

Each has `from_dense(W, bias, **shape)`, `to_dense()`, `spec()`/`from_spec()`, a static `num_params(...)` and
`flops()`. Importing this package registers the layer types so saved models with them can be loaded.
"""
from ..layers.lowrank import LowRankLinear
from ._common import StructuredLinear, balanced_factors, layer_flops
from .blast import BlastLinear
from .btt import BTTLinear
from .callbacks import Cuttlefish, Maestro, stable_rank
from .hadamard import LowRankHadamardLinear
from .kronecker import KroneckerLinear
from .monarch import MonarchLinear
from .structurize import (CONFIGS, STRUCTURES, BlastConfig, BTTConfig, HadamardConfig, KroneckerConfig,
                          LowRankConfig, MonarchConfig, StructureConfig, TTConfig, choose_shape, structure_factory,
                          structurize)
from .tt import TTLinear

__all__ = ["BTTLinear", "BlastLinear", "BlastConfig", "BTTConfig", "CONFIGS", "Cuttlefish", "HadamardConfig",
           "KroneckerConfig", "KroneckerLinear", "LowRankConfig", "LowRankHadamardLinear", "LowRankLinear", "Maestro",
           "MonarchConfig", "MonarchLinear", "STRUCTURES", "StructureConfig", "StructuredLinear", "TTConfig",
           "TTLinear", "balanced_factors", "choose_shape", "layer_flops", "stable_rank", "structure_factory",
           "structurize"]
