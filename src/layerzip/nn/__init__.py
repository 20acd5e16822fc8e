"""Structured linear layers for training and for projection of trained weights.

| class | W | parameters |
|---|---|---|
| LowRankLinear | A B | r(in+out) (LowBitLowRank: its int8 / int4 storage form, lowbit.py) |
| SharedBasisLinear | A B, B shared by a group of layers (--share) | r·out each, r·in once per group |
| BTTLinear | block tensor-train, 2 cores, rank r | r(n1·n2·m1 + m1·n1·m2) |
| MonarchLinear | block-diag · permutation · block-diag | b²(⌈in/b⌉ + ⌈out/b⌉) |
| KroneckerLinear | Σₜ Aₜ ⊗ Sₜ (PHM) | t(n² + ⌈out/n⌉⌈in/n⌉) |
| LowRankHadamardLinear | (X₁Y₁ᵀ) ⊙ (X₂Y₂ᵀ) (FedPara) | 2R(in+out) |
| BlastLinear | blocks Uᵢ diag(sᵢⱼ) Vⱼᵀ | r(b·p + b·q + b²) |
| TTLinear | tensor-train matrix | Σ r_{k−1} m_k n_k r_k |

ElasticLinear (elastic.py): one module of an elastic model (`compress --elastic`), low-rank factors whose
prefixes are every width it can be loaded at (or its dense weight), and the spectrum that chooses the width.
MoEFFN (moe.py): a whole FFN (GLU or two-layer MLP) as E experts of its intermediate neurons and a linear router,
top-k experts per token, a sparse forward; `to_dense()` gives the original FFN back as a DenseFFN.
SplitExperts (experts.py): a transformers MoE layer's fused experts as one Linear per expert and projection, so each
is a target of its own (`split_experts_` / `join_experts_`).

Embeddings (embedding.py): LowRankEmbedding (a row of A (vocab×r) looked up, times B (r×dim)), and TiedLowRankHead,
the LowRankLinear LM head sharing its A and B (tied weights stay tied).

Convolutions (conv.py; `from_conv(conv, **shape)`, `to_dense()` gives an `nn.Conv2d`): LowRankConv (kh×kw to r, then
1×1), Tucker2Conv (1×1, kh×kw core, 1×1), CPConv (1×1, depthwise kh×1 and 1×kw, 1×1), SpatialSVDConv (kh×1, 1×kw).

Each has `from_dense(W, bias, **shape)`, `from_linear(module, **shape)`, `to_dense()`, `spec()`/`from_spec()`,
`flops()`, a static `num_params(in, out, **shape)` and a classmethod `candidates(in, out, budget)` (the shapes
`choose_shape` picks from). Importing this package registers the layer types (`layerzip.registry.LAYERS`) so saved
models with them can be loaded. This package imports nothing of layerzip but `registry` and `errors`.
"""
from ._common import StructuredLinear, balanced_factors, layer_flops
from .base import FactorizedLayer, dense_weight_and_bias, is_conv1d, is_linear_like, layer_from_spec, register_layer
from .blast import BlastLinear
from .btt import BTTLinear
from .elastic import ElasticLinear
from .embedding import (LowBitLowRankEmbedding, LowBitTiedHead, LowRankEmbedding, ScaledEmbedding, TiedLowRankHead,
                        tie_heads_)
from .conv import CONV_LAYERS, CPConv, FactorizedConv, LowRankConv, SpatialSVDConv, Tucker2Conv, factorizable
from .hadamard import LowRankHadamardLinear
from .kronecker import KroneckerLinear
from .lowbit import BITS, GROUP_SIZE
from .lowrank import (LowBitLowRank, LowRankLinear, SharedBasisLinear, rebalanced, share_bases_, singular_values,
                      split_balanced, truncated_factors)
from .experts import SplitExperts, join_experts_, split_experts_
from .moe import DenseFFN, MoEFFN
from .monarch import MonarchLinear
from .quantize import LOWBIT_TYPES, LowBitLinear, dequantize_factors_, quantize_factors_, restore_modules_
from .shapes import choose_shape
from .tt import TTLinear

STRUCTURES = [c.layer_type for c in (LowRankLinear, BTTLinear, MonarchLinear, KroneckerLinear, LowRankHadamardLinear,
                                     BlastLinear, TTLinear)]

__all__ = ["BITS", "BTTLinear", "BlastLinear", "CONV_LAYERS", "CPConv", "FactorizedConv", "LowRankConv",
           "SpatialSVDConv", "Tucker2Conv", "factorizable", "FactorizedLayer", "GROUP_SIZE", "KroneckerLinear", "LowBitLowRank",
           "LowRankHadamardLinear", "LowRankLinear", "MonarchLinear", "STRUCTURES", "StructuredLinear", "TTLinear",
           "balanced_factors", "choose_shape", "dense_weight_and_bias", "dequantize_factors_", "is_conv1d",
           "is_linear_like", "layer_flops", "layer_from_spec", "quantize_factors_", "register_layer",
           "rebalanced", "restore_modules_", "singular_values", "split_balanced", "truncated_factors"]
__all__ += ["ElasticLinear", "LOWBIT_TYPES", "LowBitLinear", "LowBitLowRankEmbedding", "LowBitTiedHead",
            "LowRankEmbedding", "ScaledEmbedding", "TiedLowRankHead", "tie_heads_"]
__all__ += ["DenseFFN", "MoEFFN", "SharedBasisLinear", "SplitExperts", "join_experts_", "share_bases_",
            "split_experts_"]
