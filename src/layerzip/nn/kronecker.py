"""KroneckerLinear: a sum of Kronecker products, W = Σₜ Aₜ ⊗ Sₜ (PHM layer, Zhang et al. 2021, with t = n terms).

Aₜ is n×n, Sₜ is p×q with p = ⌈out/n⌉, q = ⌈in/n⌉. With x viewed as X (n×q): (A ⊗ S) x = vec(A X Sᵀ), so
y = Σₜ Aₜ X Sₜᵀ.  Parameters t·(n² + p·q) ≈ in·out/n + n³ for t = n — but FLOPs ≈ 2t·(n·p·q + n²·p), i.e. the same as
dense for t = n: PHM saves parameters, not compute.
Projection (Van Loan & Pitsianis 1993): rearrange W into R(W) (n² × p·q) with R(A ⊗ S) = vec(A) vec(S)ᵀ; the best
t-term approximation is the rank-t truncated SVD of R(W) — exact and optimal; lossless for t ≥ min(n², p·q).
Init: Sₜ ~ N(0, 1/q), Aₜ ~ N(0, 1/(t·n)) so both stages keep unit RMS.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import register_layer
from ._common import StructuredLinear, pad_last, pad_matrix


@register_layer("kronecker")
class KroneckerLinear(StructuredLinear):
    """
    >>> import torch
    >>> k = KroneckerLinear(64, 32, n=4)               # PHM: 4 terms of (4×4) ⊗ (8×16)
    >>> k.num_parameters() == KroneckerLinear.num_params(64, 32, n=4, terms=4) + 32
    True
    """

    def __init__(self, in_features: int, out_features: int, n: int = 4, terms: int | None = None,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        terms = terms or n
        if not (1 <= n <= min(in_features, out_features)) or terms < 1:
            raise ValueError(f"need 1 <= n <= min(in, out) and terms >= 1, got n={n}, terms={terms}")
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.n, self.terms = in_features, out_features, n, terms
        self.p, self.q = math.ceil(out_features / n), math.ceil(in_features / n)
        self.A = nn.Parameter(torch.empty(terms, n, n, **kw))
        self.S = nn.Parameter(torch.empty(terms, self.p, self.q, **kw))
        self._init_bias(bias, kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.S, std=1 / math.sqrt(self.q))
        nn.init.normal_(self.A, std=1 / math.sqrt(self.terms * self.n))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @staticmethod
    def num_params(in_features: int, out_features: int, n: int = 4, terms: int | None = None) -> int:
        terms = terms or n
        return terms * (n * n + math.ceil(out_features / n) * math.ceil(in_features / n))

    @classmethod
    def candidates(cls, in_features: int, out_features: int, budget: float):
        """n: the divisors ≥ 2 of gcd(in, out) up to 64 (else 2…16, padded); parameters grow linearly in t, so per
        n only the largest t within `budget` (and ≤ min(n², p·q), where it is lossless)."""
        g, small = math.gcd(out_features, in_features), min(out_features, in_features)
        ns = [k for k in range(2, min(g, 64) + 1) if g % k == 0] or list(range(2, min(small, 16) + 1))
        for k in ns:
            pq = math.ceil(out_features / k) * math.ceil(in_features / k)
            t = min(k * k, pq, int(budget // (k * k + pq)))
            if t >= 1:
                yield {"n": k, "terms": t}

    def flops(self) -> int:
        t, n, p, q = self.terms, self.n, self.p, self.q
        return 2 * t * (n * p * q + n * n * p)

    def _shape_args(self) -> dict:
        return {"n": self.n, "terms": self.terms}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, n, p, q = self.terms, self.n, self.p, self.q
        lead = x.shape[:-1]
        X = pad_last(x, n * q).reshape(-1, n, q)
        Z = X.reshape(-1, q) @ self.S.reshape(t * p, q).t()                  # X Sₜᵀ for all t: (B·n, t·p)
        Z = Z.view(-1, n, t, p).permute(0, 3, 2, 1).reshape(-1, t * n)       # (B·p, (t, b))
        y = Z @ self.A.permute(0, 2, 1).reshape(t * n, n)                     # Σₜ Aₜ (X Sₜᵀ): (B·p, n)
        return self._out(y.view(-1, p, n).transpose(1, 2).reshape(*lead, n * p))

    def dense_weight(self) -> torch.Tensor:
        t, n, p, q = self.terms, self.n, self.p, self.q
        W = torch.einsum("tab,tsu->asbu", self.A, self.S).reshape(n * p, n * q)
        return W[: self.out_features, : self.in_features]

    @torch.no_grad()
    def project_(self, W: torch.Tensor) -> None:
        t, n, p, q = self.terms, self.n, self.p, self.q
        R = pad_matrix(W, n * p, n * q).reshape(n, p, n, q).permute(0, 2, 1, 3).reshape(n * n, p * q)
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        k = min(t, S.numel())
        s = S[:k].sqrt()
        A = torch.zeros(t, n, n, dtype=W.dtype, device=W.device)
        Sm = torch.zeros(t, p, q, dtype=W.dtype, device=W.device)
        A[:k] = (U[:, :k] * s).t().reshape(k, n, n)
        Sm[:k] = (s[:, None] * Vh[:k]).reshape(k, p, q)
        self.A.copy_(A)
        self.S.copy_(Sm)
