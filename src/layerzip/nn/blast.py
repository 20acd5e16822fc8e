"""BlastLinear: Block-Level Adaptive STructure (Lee et al. 2024). W is a b×b grid of (p×q) blocks,

    W_ij = U_i diag(s_ij) V_jᵀ,   U_i p×r shared along block row i, V_j q×r along block column j, s_ij ∈ ℝʳ.

Forward: z_j = V_jᵀ x_j, w_i = Σ_j s_ij ⊙ z_j, y_i = U_i w_i. Parameters r·(b·p + b·q + b²) ≈ r·(in + out + b²),
FLOPs per row 2× that. b = 1 is a rank-r SVD (U diag(s) Vᵀ).
Projection (`project_`), no closed form for b > 1: U_i ← top-r left singular vectors of block row i, V_j ← top-r right
singular vectors of block column j, s_ij ← least squares; then `als_steps` rounds of alternating least squares on
U, V, s (each a closed-form ridge solve, so the error never increases; the best iterate is kept; skipped for b = 1,
where the start is already the truncated SVD). Not exact in
one step: the singular-vector bases span the right spaces but are not the basis that makes every s_ij diagonal;
ALS converges to a random BLAST matrix to ~1e-9 relative error in ~100 rounds in our tests.
Init: V ~ N(0, 1/q), s ~ N(0, 1/b), U ~ N(0, 1/r): every stage keeps unit RMS.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import register_layer
from ._common import StructuredLinear, pad_last, pad_matrix


def _ridge_solve(G: torch.Tensor, rhs: torch.Tensor, lam: float = 1e-10) -> torch.Tensor:
    """Solve (G + λ·tr(G)/r·I) X = rhs for a batch of r×r Gram matrices G."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    scale = G.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(1e-300)
    return torch.linalg.solve(G + lam * scale * eye, rhs)


@register_layer("blast")
class BlastLinear(StructuredLinear):
    """
    >>> import torch
    >>> layer = BlastLinear(64, 32, nblocks=4, rank=4)
    >>> layer(torch.randn(5, 64)).shape
    torch.Size([5, 32])
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int = 4, rank: int = 8, bias: bool = True,
                 device=None, dtype=None, als_steps: int = 100):
        super().__init__()
        b = nblocks
        if not 1 <= b <= min(in_features, out_features) or rank < 1:
            raise ValueError(f"need 1 <= nblocks <= min(in, out) and rank >= 1, got {b}, {rank}")
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.nblocks, self.rank = in_features, out_features, b, rank
        self.p, self.q, self.als_steps = math.ceil(out_features / b), math.ceil(in_features / b), als_steps
        self.U = nn.Parameter(torch.empty(b, self.p, rank, **kw))
        self.V = nn.Parameter(torch.empty(b, self.q, rank, **kw))
        self.s = nn.Parameter(torch.empty(b, b, rank, **kw))
        self._init_bias(bias, kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.V, std=1 / math.sqrt(self.q))
        nn.init.normal_(self.s, std=1 / math.sqrt(self.nblocks))
        nn.init.normal_(self.U, std=1 / math.sqrt(self.rank))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @staticmethod
    def num_params(in_features: int, out_features: int, nblocks: int = 4, rank: int = 8) -> int:
        b = nblocks
        return rank * (b * math.ceil(out_features / b) + b * math.ceil(in_features / b) + b * b)

    @classmethod
    def candidates(cls, in_features: int, out_features: int, budget: float):
        """b ∈ {16, 8, 4, 2} dividing gcd(in, out) with b² ≤ min(in, out), most blocks first, then b = 1; every rank
        up to the smaller block side."""
        g, small = math.gcd(out_features, in_features), min(out_features, in_features)
        for b in [k for k in (16, 8, 4, 2) if g % k == 0 and k * k <= small] + [1]:
            for r in range(1, min(math.ceil(out_features / b), math.ceil(in_features / b)) + 1):
                yield {"nblocks": b, "rank": r}

    def flops(self) -> int:
        return 2 * self.num_params(self.in_features, self.out_features, **self._shape_args())

    def _shape_args(self) -> dict:
        return {"nblocks": self.nblocks, "rank": self.rank}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, q, r = self.nblocks, self.p, self.q, self.rank
        lead = x.shape[:-1]
        x = pad_last(x, b * q).reshape(-1, b, q).transpose(0, 1)              # (b, B, q)
        z = torch.bmm(x, self.V)                                              # z_j = V_jᵀ x_j: (b_j, B, r)
        w = torch.bmm(z.permute(2, 1, 0), self.s.permute(2, 1, 0))            # Σ_j s_ij z_j per r: (r, B, b_i)
        y = torch.bmm(w.permute(2, 1, 0), self.U.transpose(1, 2))             # y_i = U_i w_i: (b_i, B, p)
        return self._out(y.transpose(0, 1).reshape(*lead, b * p))

    def dense_weight(self) -> torch.Tensor:
        b, p, q = self.nblocks, self.p, self.q
        W = torch.einsum("ipr,ijr,jqr->ipjq", self.U, self.s, self.V).reshape(b * p, b * q)
        return W[: self.out_features, : self.in_features]

    @torch.no_grad()
    def project_(self, W: torch.Tensor) -> None:
        b, p, q, r = self.nblocks, self.p, self.q, self.rank
        A = pad_matrix(W, b * p, b * q).reshape(b, p, b, q).permute(0, 2, 1, 3)   # A[i, j] = block (p×q)

        def top(M, k, left):                                                   # top-k singular vectors, 0-padded
            Uv, _, Vh = torch.linalg.svd(M, full_matrices=False)
            vecs = Uv[..., :k] if left else Vh[..., :k, :].transpose(-1, -2)
            return torch.nn.functional.pad(vecs, (0, k - vecs.shape[-1]))

        U = top(A.permute(0, 2, 1, 3).reshape(b, p, b * q), r, left=True)      # block rows
        V = top(A.permute(1, 0, 2, 3).reshape(b, b * p, q), r, left=False)     # block columns

        def gram(X):                                                           # XᵢᵀXᵢ: (b, r, r)
            return X.transpose(1, 2) @ X

        def solve_s(U, V):  # (UᵢᵀUᵢ ⊙ VⱼᵀVⱼ) s_ij = diag(Uᵢᵀ A_ij Vⱼ)
            G = gram(U)[:, None] * gram(V)[None]
            rhs = (U[:, None] * (A @ V[None])).sum(2)                          # (i, j, r)
            return _ridge_solve(G, rhs[..., None])[..., 0]

        def err(U, s, V):
            return ((U[:, None] * s[:, :, None]) @ V[None].transpose(-1, -2) - A).pow(2).sum().item()

        s = solve_s(U, V)
        best = (err(U, s, V), U, s, V)
        # b = 1: U, V are the top-r singular vectors of W and s their singular values, the truncated SVD, which is
        # optimal (Eckart–Young); ALS cannot improve it, so skip it.
        for _ in range(self.als_steps if b > 1 else 0):
            # U_i [diag(s_ij) V_jᵀ]_j = A_i,:  ->  U_i = (Σ_j A_ij V_j diag(s_ij)) (Σ_j diag(s_ij) VⱼᵀVⱼ diag(s_ij))⁻¹
            G = (s[..., :, None] * gram(V)[None] * s[..., None, :]).sum(1)
            U = _ridge_solve(G, ((A @ V[None]) * s[:, :, None]).sum(1).transpose(1, 2)).transpose(1, 2)
            G = (s[..., :, None] * gram(U)[:, None] * s[..., None, :]).sum(0)
            V = _ridge_solve(G, ((A.transpose(-1, -2) @ U[:, None]) * s[:, :, None]).sum(0).transpose(1, 2))
            V = V.transpose(1, 2)
            s = solve_s(U, V)
            e = err(U, s, V)
            if e < best[0]:
                best = (e, U, s, V)
        self.U.copy_(best[1])
        self.s.copy_(best[2])
        self.V.copy_(best[3])
