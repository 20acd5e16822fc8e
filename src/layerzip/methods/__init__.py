"""Decomposition methods. Each is a short pure function `(W float64 out×in, stats, rank) -> (A, B)`."""
from .asvd import asvd_factors
from .cur import cur_factors
from .fwsvd import fwsvd_factors
from .svd import svd_factors
from .svdllm import svdllm_factors, whiten

__all__ = ["asvd_factors", "cur_factors", "fwsvd_factors", "svd_factors", "svdllm_factors", "whiten"]
