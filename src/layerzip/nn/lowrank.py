"""LowRankLinear: y = (x Bᵀ) Aᵀ + b, with A (out×r) and B (r×in).

Stores r·(in+out) weights instead of in·out. Two skinny GEMMs, so the forward costs what its FLOPs say.
Projection: truncated SVD W ≈ U_r Σ_r V_rᵀ (Frobenius-optimal, Eckart–Young), split evenly as A = U_r Σ_r^½,
B = Σ_r^½ V_rᵀ; exact at r = min(in, out).

LowBitLowRank is its storage form with low-bit factors (`save(..., bits=8|4)`, lowbit.py): buffers A_q, A_scale, B_q,
B_scale. `save` swaps it in for the write (`quantize_factors_`) and back; loading builds it from the spec (which
records `bits` and `group_size`), fills the buffers from the safetensors file and swaps in a plain LowRankLinear in
the model's dtype (`dequantize_factors_`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import FactorizedLayer, register_layer
from .lowbit import GROUP_SIZE, add_lowbit_buffers, read_lowbit, store_lowbit_


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """σ(M), descending, from the eigenvalues of the smaller Gram (MᵀM or MMᵀ): one GEMM and a symmetric eigensolve
    without vectors, several times faster on a CPU than the bidiagonal reduction of `torch.linalg.svdvals`. Each σ²
    is exact to about eps·σ_max² (1e-16 relative in float64), far below what a spectrum's tail sum (the layer loss
    at a rank, which is all allocation reads) resolves.

    >>> M = torch.randn(30, 8, dtype=torch.float64)
    >>> bool(torch.allclose(singular_values(M), torch.linalg.svdvals(M)))
    True
    """
    G = M.mT @ M if M.shape[-2] >= M.shape[-1] else M @ M.mT
    return torch.linalg.eigvalsh(G).flip(-1).clamp_min(0).sqrt()


def truncated_factors(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (U_r Σ_r^½, Σ_r^½ V_rᵀ) of M's rank-r truncated SVD, from the eigendecomposition of the smaller
    Gram (MᵀM = V Σ² Vᵀ, then U_r Σ_r^½ = M V_r Σ_r^-½; or the same from M Mᵀ): a GEMM and a symmetric eigensolve,
    about half a bidiagonal SVD's time on a CPU. A B = M V_r V_rᵀ whatever Σ is, so the product is exact at full
    rank; a kept direction is accurate to about eps·σ_max²/gap (float64: far below a layer's loss), and singular
    values under eps·σ_max are floored there so no factor overflows when cast to float32.

    >>> M = torch.randn(12, 7, dtype=torch.float64)
    >>> A, B = truncated_factors(M, 7)
    >>> bool(torch.allclose(A @ B, M))
    True
    >>> A, B = truncated_factors(M, 3)
    >>> U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    >>> bool(torch.allclose(A @ B, U[:, :3] * S[:3] @ Vh[:3]))
    True
    """
    tall = M.shape[-2] >= M.shape[-1]
    lam, Q = torch.linalg.eigh(M.mT @ M if tall else M @ M.mT)
    lam, Q = lam.flip(-1)[:rank], Q.flip(-1)[:, :rank]
    s = lam.clamp_min(0).sqrt()
    s = s.clamp_min(s[0] * torch.finfo(M.dtype).eps if s.numel() and s[0] > 0 else torch.finfo(M.dtype).tiny)
    if tall:                                   # Q = V_r
        return (M @ Q) / s.sqrt(), s.sqrt()[:, None] * Q.mT
    return Q * s.sqrt(), (Q.mT @ M) / s.sqrt()[:, None]          # Q = U_r


def split_balanced(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int):
    """A = U_r Σ_r^½ (out×r), B = Σ_r^½ V_rᵀ (r×in) from an SVD U diag(S) Vh."""
    s = S[:rank].clamp_min(0).sqrt()
    return U[:, :rank] * s, s[:, None] * Vh[:rank]


@torch.no_grad()
def rebalanced(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with A'B' = AB and A' = U√S, B' = √S Vᵀ (the product's SVD, in float64), from the QR factors:
    A = Qa Ra, Bᵀ = Qb Rb, Ra Rbᵀ = u s vᵀ  =>  A·B = (Qa u √s)(√s vᵀ Qbᵀ). Whitened or ALS factors can be badly
    scaled; Adam moves every entry by about its lr, so balanced factors make that step uniform in effect."""
    Qa, Ra = torch.linalg.qr(A.double())
    Qb, Rb = torch.linalg.qr(B.double().T)
    u, s, vh = torch.linalg.svd(Ra @ Rb.T)
    r = s.sqrt()
    return (Qa @ u) * r, (vh.T * r).T @ Qb.T


@register_layer("lowrank")
class LowRankLinear(FactorizedLayer):
    """A rank-r linear layer (r = min(in, out) when not given).

    >>> import torch
    >>> lin = torch.nn.Linear(64, 32)
    >>> lr = LowRankLinear.from_linear(lin)                 # full rank: exact
    >>> bool(torch.allclose(lr.to_dense().weight, lin.weight, atol=1e-5))
    True
    >>> LowRankLinear.num_params(64, 32, rank=4) == LowRankLinear.from_linear(lin, rank=4).num_parameters() - 32
    True
    """

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        rank = rank or min(in_features, out_features)
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.B = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Unit-scale activations like nn.Linear's default: B keeps the variance of x, A maps r -> out.
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @staticmethod
    def num_params(in_features: int, out_features: int, rank: int | None = None) -> int:
        return (rank or min(in_features, out_features)) * (in_features + out_features)

    @classmethod
    def candidates(cls, in_features: int, out_features: int, budget: float):
        for r in range(1, min(in_features, out_features) + 1):
            yield {"rank": r}

    def flops(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.A @ self.B

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype=None, device=None) -> "LowRankLinear":
        """Build from A (out×r), B (r×in); factors are cast to `dtype` (default: A's)."""
        assert A.shape[1] == B.shape[0], (A.shape, B.shape)
        dtype = dtype or A.dtype
        device = device or A.device
        layer = cls(B.shape[1], A.shape[0], A.shape[1], bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    @torch.no_grad()
    def from_dense(cls, W: torch.Tensor, bias: torch.Tensor | None = None, rank: int | None = None) -> "LowRankLinear":
        """Rank-r truncated SVD of W (out×in), computed in float64, factors cast to W's dtype."""
        rank = rank or min(W.shape)
        if not 0 < rank <= min(W.shape):
            raise ValueError(f"rank must be in [1, {min(W.shape)}], got {rank}")
        A, B = truncated_factors(W.detach().double(), rank)
        return cls.from_factors(A, B, bias, dtype=W.dtype, device=W.device)

    # --- serialization: the shape facts needed to rebuild an empty layer before loading tensors
    def spec(self) -> dict:
        return {"type": "lowrank", "in": self.in_features, "out": self.out_features,
                "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "LowRankLinear | LowBitLowRank":
        if spec.get("bits", 16) != 16:                 # low-bit factors on disk
            return LowBitLowRank.from_spec(spec, dtype=dtype, device=device)
        return cls(spec["in"], spec["out"], spec["rank"], spec["bias"], device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class LowBitLowRank(FactorizedLayer):
    """A `LowRankLinear` whose A and B are stored with `bits` (8 or 4) and float32 scales per group; `dtype` is the
    one its factors are dequantized to. The forward dequantizes on every call (a loaded model holds
    `LowRankLinear`s instead; see `dequantize_factors_`).

    >>> import torch
    >>> lr = LowRankLinear.from_linear(torch.nn.Linear(300, 32), rank=8)
    >>> q = LowBitLowRank.from_lowrank(lr, bits=4)            # A 32×8: 4 bytes a row; B 8×300: 3 groups a row
    >>> q.A_q.dtype, tuple(q.A_q.shape), tuple(q.A_scale.shape), tuple(q.B_scale.shape)
    (torch.uint8, (32, 4), (32, 1), (8, 3))
    >>> type(q.to_lowrank()).__name__, q.spec()["bits"], q.spec()["group_size"]
    ('LowRankLinear', 4, 128)
    """

    layer_type = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, bits: int = 8,
                 group_size: int = GROUP_SIZE, device=None, dtype=None):
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.group_size = bits, group_size
        self.dtype = dtype or torch.get_default_dtype()
        for name, (rows, cols) in (("A", (out_features, rank)), ("B", (rank, in_features))):
            add_lowbit_buffers(self, name, rows, cols, bits, group_size, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.dtype)) if bias else None

    @classmethod
    def from_lowrank(cls, layer: LowRankLinear, bits: int, group_size: int = GROUP_SIZE) -> "LowBitLowRank":
        """Quantize a LowRankLinear's factors (the bias is kept in its dtype)."""
        A, B = layer.A.detach(), layer.B.detach()
        new = cls(layer.in_features, layer.out_features, layer.rank, layer.bias is not None, bits, group_size,
                  device=A.device, dtype=A.dtype)
        with torch.no_grad():
            for name, W in (("A", A), ("B", B)):
                store_lowbit_(new, name, W)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    def factor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        cols = self.rank if name == "A" else self.in_features
        return read_lowbit(self, name, cols, dtype or self.dtype)

    def to_lowrank(self) -> LowRankLinear:
        """The plain LowRankLinear, factors dequantized to `dtype` (the bias in the dtype it holds)."""
        bias = None if self.bias is None else self.bias.detach()
        return LowRankLinear.from_factors(self.factor("A"), self.factor("B"), bias, dtype=self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.factor("B", x.dtype)), self.factor("A", x.dtype), self.bias)

    dequantized = to_lowrank          # what loading turns every low-bit storage form into (nn/quantize.py)

    def dense_weight(self) -> torch.Tensor:
        return self.factor("A") @ self.factor("B")

    def flops(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features)

    num_params = staticmethod(LowRankLinear.num_params)

    def spec(self) -> dict:
        return {"type": "lowrank", "in": self.in_features, "out": self.out_features, "rank": self.rank,
                "bias": self.bias is not None, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "LowBitLowRank":
        return cls(spec["in"], spec["out"], spec["rank"], spec["bias"], spec["bits"], spec["group_size"],
                   device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


@register_layer("lowrank_shared")
class SharedBasisLinear(LowRankLinear):
    """A LowRankLinear whose B (r×in, the input basis) is one Parameter shared by every layer of its group (Basis
    Sharing: the same projection in n consecutive blocks, `compress --share`), each layer with its own A and bias.
    `basis_of` names the group's owner, the module whose B the file holds (itself for the owner): `share_bases_`
    ties the others to it after a model is built from specs, so B is one tensor in memory and once on disk.

    >>> import torch
    >>> a, b = SharedBasisLinear(8, 6, 3, basis_of="a"), SharedBasisLinear(8, 4, 3, basis_of="a")
    >>> m = torch.nn.ModuleDict({"a": a, "b": b})
    >>> share_bases_(m), m.b.B is m.a.B, sum(p.numel() for p in m.parameters()) == 3 * 8 + 3 * (6 + 4) + 6 + 4
    ([('b', 'a')], True, True)
    """

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, bias: bool = True,
                 basis_of: str = "", device=None, dtype=None):
        super().__init__(in_features, out_features, rank, bias, device=device, dtype=dtype)
        self.basis_of = basis_of

    @classmethod
    def from_factors(cls, A, B, bias=None, dtype=None, device=None, basis_of: str = "") -> "SharedBasisLinear":
        layer = super().from_factors(A, B, bias, dtype=dtype, device=device)
        layer.basis_of = basis_of
        return layer

    def spec(self) -> dict:
        return {**super().spec(), "type": "lowrank_shared", "basis_of": self.basis_of}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "SharedBasisLinear":
        if not isinstance(spec.get("basis_of"), str) or not spec["basis_of"]:
            raise ValueError("basis_of must name the module holding the shared basis")
        if spec.get("bits", 16) != 16:
            raise ValueError("a shared basis is stored in the model's dtype, not low-bit")
        return cls(spec["in"], spec["out"], spec["rank"], spec["bias"], spec["basis_of"], device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, basis_of={self.basis_of}"


def share_bases_(model: nn.Module) -> list[tuple[str, str]]:
    """Every SharedBasisLinear of `model` takes its owner's B (the same Parameter); returns [(member, owner)] for
    the members that are not their own owner."""
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, SharedBasisLinear) and mod.basis_of != name:
            owner = model.get_submodule(mod.basis_of)
            if not (isinstance(owner, SharedBasisLinear) and owner.basis_of == mod.basis_of
                    and owner.B.shape == mod.B.shape):
                raise ValueError(f"{name} shares the basis of {mod.basis_of}, which does not hold a "
                                 f"{tuple(mod.B.shape)} shared basis")
            mod.B = owner.B
            pairs.append((name, mod.basis_of))
    return pairs
