"""Factorized 2-D convolutions: a dense kernel W (out × in × kh × kw) replaced by a chain of smaller convolutions.

| class | chain (channels) | weights | exact at |
|---|---|---|---|
| LowRankConv (channel SVD) | kh×kw (in→r) · 1×1 (r→out) | r(in·kh·kw + out) | r = min(out, in·kh·kw) |
| Tucker2Conv | 1×1 (in→r_in) · kh×kw core (r_in→r_out) · 1×1 (r_out→out) | r_in·in + r_out·r_in·kh·kw + out·r_out | r_in = in, r_out = out |
| CPConv | 1×1 (in→R) · depthwise kh×1 · depthwise 1×kw · 1×1 (R→out) | R(in + kh + kw + out) | R = kh·kw·min(in, out) |
| SpatialSVDConv (Jaderberg) | kh×1 (in→r) · 1×kw (r→out) | r(in·kh + out·kw) | r = min(in·kh, out·kw) |

Stride, zero padding and dilation of the original are kept: the spatial part sits in the k×k (or k×1 / 1×k) steps,
whose zero padding composes to the original's (a separable kernel padded in two steps is the same convolution), and
the 1×1 steps run at the resolution they read. The bias goes on the last step. `from_dense(W, bias, **geometry)` with no
rank is the exact full-rank decomposition; smaller ranks give the projections documented per class (Frobenius-
optimal for LowRankConv and SpatialSVDConv, truncated HOSVD for Tucker2Conv, ALS for CPConv). `to_dense()` merges
back into an `nn.Conv2d`. Only plain convolutions (groups = 1, zero padding) are factorized (`factorizable`).

FLOPs (`flops(in_hw)`: 2 × multiply-adds for one input image of in_hw = (H, W); without it, per output position)
count each step at the resolution it runs at: a 1×1 before a strided step runs on the input's grid.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import FactorizedLayer, register_layer
from .lowrank import rebalanced

Pair = tuple[int, int]


def _pair(v) -> Pair:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def numeric_padding(conv: nn.Conv2d) -> Pair | None:
    """The padding as two integers ('valid' → 0; 'same' → d(k−1)/2 when that is whole), else None."""
    p = conv.padding
    if p == "valid":
        return (0, 0)
    if p == "same":
        tot = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(t % 2 for t in tot) else (tot[0] // 2, tot[1] // 2)
    return _pair(p)


def factorizable(module: nn.Module) -> bool:
    """A plain 2-D convolution these layers can replace: groups 1, zero padding, a numeric padding."""
    return (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and numeric_padding(module) is not None)


def conv_out_hw(hw: Pair, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> Pair:
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(hw, kernel, stride, padding, dilation))


def dense_conv_flops(conv: nn.Module, in_hw: Pair | None = None) -> int:
    """2 × multiply-adds of a dense nn.Conv2d (any groups) on one image of in_hw (None: per output position)."""
    o, i_g, kh, kw = conv.weight.shape
    ho, wo = (1, 1) if in_hw is None else conv_out_hw(in_hw, conv.kernel_size, conv.stride,
                                                     numeric_padding(conv) or (0, 0), conv.dilation)
    return 2 * o * i_g * kh * kw * ho * wo


class FactorizedConv(FactorizedLayer):
    """Base of the factorized convolutions: geometry, spec / from_spec, from_conv, to_dense (an nn.Conv2d).

    Subclasses define `__init__(in_channels, out_channels, kernel_size, *, <shape args>, stride, padding, dilation,
    bias, device, dtype)`, `_shape_args()`, `full_shape(in, out, kernel)`, `forward`, `dense_weight` (out×in×kh×kw),
    `project_(W64)`, `num_params(in, out, kernel, **shape)` and `count_flops(in, out, kernel, in_hw, out_hw, **shape)`."""

    def _init_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, bias, kw) -> None:
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.bias = nn.Parameter(torch.zeros(out_channels, **kw)) if bias else None

    def geometry(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def _shape_args(self) -> dict:
        raise NotImplementedError

    @staticmethod
    def full_shape(in_channels: int, out_channels: int, kernel_size: Pair) -> dict:
        """Shape args of the exact (full-rank) decomposition."""
        raise NotImplementedError

    def project_(self, W: torch.Tensor) -> None:
        raise NotImplementedError

    def balance_(self) -> None:
        """Re-scale the factors among themselves, the layer's function unchanged, so that an optimizer step of
        about the same size on every entry (Adam's) means about as much in each (healing calls it first)."""
        raise NotImplementedError

    @staticmethod
    def count_flops(in_channels: int, out_channels: int, kernel_size: Pair, in_hw: Pair, out_hw: Pair,
                    **shape) -> int:
        """2 × multiply-adds of that shape for an input of in_hw giving an output of out_hw."""
        raise NotImplementedError

    def flops(self, in_hw: Pair | None = None) -> int:
        """2 × multiply-adds for one image of in_hw = (H, W); None: per output position (every step at the output's
        resolution)."""
        out_hw = (1, 1) if in_hw is None else conv_out_hw(in_hw, self.kernel_size, self.stride, self.padding,
                                                          self.dilation)
        return self.count_flops(self.in_channels, self.out_channels, self.kernel_size, in_hw or (1, 1), out_hw,
                                **self._shape_args())

    @classmethod
    @torch.no_grad()
    def from_dense(cls, W: torch.Tensor, bias: torch.Tensor | None = None, *, stride=1, padding=0, dilation=1,
                   **shape) -> "FactorizedConv":
        """Decompose the kernel W (out×in×kh×kw) in float64; the factors are cast to W's dtype. No shape args: the
        exact full-rank decomposition."""
        assert W.dim() == 4, W.shape
        o, i, kh, kw = W.shape
        shape = {**cls.full_shape(i, o, (kh, kw)), **{k: v for k, v in shape.items() if v is not None}}
        dtype = W.dtype if W.dtype.is_floating_point else torch.float32
        layer = cls(i, o, (kh, kw), stride=stride, padding=padding, dilation=dilation, bias=bias is not None,
                    device=W.device, dtype=torch.float64, **shape)
        layer.project_(W.detach().double())
        if bias is not None:
            layer.bias.copy_(bias)
        return layer.to(dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **shape) -> "FactorizedConv":
        """`from_dense` of an nn.Conv2d with its geometry (see `factorizable`)."""
        if not factorizable(conv):
            raise ValueError(f"cannot factorize {conv} (grouped, non-zero padding mode, or uneven 'same' padding)")
        b = None if conv.bias is None else conv.bias.detach()
        return cls.from_dense(conv.weight.detach(), b, stride=conv.stride, padding=numeric_padding(conv),
                              dilation=conv.dilation, **shape)

    @classmethod
    def from_linear(cls, module, **shape):
        raise TypeError(f"{cls.__name__} factorizes convolutions: use from_conv")

    def to_dense(self) -> nn.Conv2d:
        """Merge the factors back into a plain `nn.Conv2d`."""
        W = self.dense_weight().detach()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None,
                         device=W.device, dtype=W.dtype, **self.geometry())
        with torch.no_grad():
            conv.weight.copy_(W)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def spec(self) -> dict:
        return {"type": self.layer_type, "in": self.in_channels, "out": self.out_channels,
                "kernel": list(self.kernel_size), **{k: list(v) for k, v in self.geometry().items()},
                "bias": self.bias is not None, **self._shape_args()}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "FactorizedConv":
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()
              if k not in ("type", "in", "out", "kernel", "bias")}
        return cls(spec["in"], spec["out"], tuple(spec["kernel"]), bias=spec["bias"], dtype=dtype, device=device,
                   **kw)

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self._shape_args().items())
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, {args}, bias={self.bias is not None}")


def _check_rank(name: str, r: int, top: int) -> int:
    if not isinstance(r, int) or not 0 < r <= top:
        raise ValueError(f"{name} must be in [1, {top}], got {r}")
    return r


def leading_left(A: torch.Tensor, r: int, gram: torch.Tensor | None = None) -> torch.Tensor:
    """The r leading left singular vectors of A (rows × r, orthonormal), from one symmetric eigensolve of A Aᵀ (or
    of `gram` = A Aᵀ when given): several times faster than an SVD of a tall or wide kernel matrix, and completed
    by an orthonormal basis beyond A's rank."""
    return torch.linalg.eigh(A @ A.T if gram is None else gram)[1].flip(1)[:, :r]


def singular_values(gram: torch.Tensor) -> torch.Tensor:
    """σ of A from A Aᵀ (or AᵀA), descending."""
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def _conv1x1(x: torch.Tensor, M: torch.Tensor, bias=None) -> torch.Tensor:
    return F.conv2d(x, M[:, :, None, None], bias)


# ------------------------------------------------------------------------------------------------- channel SVD
@register_layer("lowrank-conv")
class LowRankConv(FactorizedConv):
    """W (out × in·kh·kw, the im2col matrix) ≈ A B: a kh×kw conv to r channels (B), then a 1×1 (A).

    Truncated SVD of the unfolded kernel, A = U_r, B = U_rᵀ W (U from the eigenvectors of W Wᵀ): Frobenius-optimal
    (Eckart–Young); with
    the Gram of the input patches this is SVD-LLM for convolutions (methods/conv.py), the optimal layer loss.

    >>> conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    >>> lr = LowRankConv.from_conv(conv)                   # full rank: exact
    >>> bool(torch.allclose(lr.to_dense().weight, conv.weight, atol=1e-6))
    True
    """

    def __init__(self, in_channels, out_channels, kernel_size, rank: int | None = None, *, stride=1, padding=0,
                 dilation=1, bias=True, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, kw)
        kh, kwd = self.kernel_size
        self.rank = _check_rank("rank", rank or min(out_channels, in_channels * kh * kwd),
                                min(out_channels, in_channels * kh * kwd))
        self.B = nn.Parameter(torch.zeros(self.rank, in_channels, kh, kwd, **kw))
        self.A = nn.Parameter(torch.zeros(out_channels, self.rank, **kw))

    def _shape_args(self):
        return {"rank": self.rank}

    @staticmethod
    def full_shape(in_channels, out_channels, kernel_size):
        return {"rank": min(out_channels, in_channels * kernel_size[0] * kernel_size[1])}

    @staticmethod
    def num_params(in_channels, out_channels, kernel_size, rank=None) -> int:
        k = kernel_size[0] * kernel_size[1]
        return (rank or min(out_channels, in_channels * k)) * (in_channels * k + out_channels)

    @staticmethod
    def count_flops(in_channels, out_channels, kernel_size, in_hw, out_hw, rank=None) -> int:
        kh, kw = kernel_size
        rank = rank or min(out_channels, in_channels * kh * kw)
        return 2 * rank * (in_channels * kh * kw + out_channels) * out_hw[0] * out_hw[1]

    def forward(self, x):
        return _conv1x1(F.conv2d(x, self.B, None, **self.geometry()), self.A, self.bias)

    def dense_weight(self):
        return (self.A @ self.B.flatten(1)).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    @torch.no_grad()
    def set_factors_(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """A (out×r), B (r × in·kh·kw) with W ≈ A B."""
        self.A.copy_(A)
        self.B.copy_(B.reshape(self.B.shape))

    def project_(self, W):
        U = leading_left(W.flatten(1), self.rank)          # W ≈ U Uᵀ W: the truncated SVD
        self.set_factors_(U, U.T @ W.flatten(1))

    def balance_(self):
        self.set_factors_(*(f.to(self.A) for f in rebalanced(self.A, self.B.flatten(1))))


# ----------------------------------------------------------------------------------------------------- Tucker-2
@register_layer("tucker2-conv")
class Tucker2Conv(FactorizedConv):
    """W ≈ core ×₀ U_out ×₁ U_in: a 1×1 conv in → r_in (`first` = U_inᵀ), the kh×kw core r_in → r_out with the
    original stride / padding / dilation, a 1×1 r_out → out (`last` = U_out) with the bias.

    Projection: truncated HOSVD (sequential): U_in = the leading r_in right singular vectors of the channel unfolding
    (rows (o, h, w), columns i), then U_out = the leading r_out left singular vectors of the reduced kernel's
    output unfolding; core = the kernel in those bases. Exact at r_in = in, r_out = out (Kim et al. 2016 use it with
    VBMF ranks; methods/conv.py has the activation-whitened version).

    >>> conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    >>> t = Tucker2Conv.from_conv(conv)
    >>> x = torch.randn(2, 8, 9, 9)
    >>> bool(torch.allclose(t(x), conv(x), atol=1e-5)), Tucker2Conv.from_conv(conv, rank_in=4, rank_out=8).spec()["rank_in"]
    (True, 4)
    """

    def __init__(self, in_channels, out_channels, kernel_size, rank_in: int | None = None,
                 rank_out: int | None = None, *, stride=1, padding=0, dilation=1, bias=True, device=None,
                 dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, kw)
        self.rank_in = _check_rank("rank_in", rank_in or in_channels, in_channels)
        self.rank_out = _check_rank("rank_out", rank_out or out_channels, out_channels)
        self.first = nn.Parameter(torch.zeros(self.rank_in, in_channels, **kw))
        self.core = nn.Parameter(torch.zeros(self.rank_out, self.rank_in, *self.kernel_size, **kw))
        self.last = nn.Parameter(torch.zeros(out_channels, self.rank_out, **kw))

    def _shape_args(self):
        return {"rank_in": self.rank_in, "rank_out": self.rank_out}

    @staticmethod
    def full_shape(in_channels, out_channels, kernel_size):
        return {"rank_in": in_channels, "rank_out": out_channels}

    @staticmethod
    def num_params(in_channels, out_channels, kernel_size, rank_in=None, rank_out=None) -> int:
        ri, ro = rank_in or in_channels, rank_out or out_channels
        return ri * in_channels + ro * ri * kernel_size[0] * kernel_size[1] + out_channels * ro

    @staticmethod
    def count_flops(in_channels, out_channels, kernel_size, in_hw, out_hw, rank_in=None, rank_out=None) -> int:
        kh, kw = kernel_size
        ri, ro = rank_in or in_channels, rank_out or out_channels
        hi, ho = in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]
        return 2 * (ri * in_channels * hi + ro * ri * kh * kw * ho + out_channels * ro * ho)

    def forward(self, x):
        z = F.conv2d(_conv1x1(x, self.first), self.core, None, **self.geometry())
        return _conv1x1(z, self.last, self.bias)

    def dense_weight(self):
        return torch.einsum("os,stpq,ti->oipq", self.last, self.core, self.first)

    @torch.no_grad()
    def set_factors_(self, first: torch.Tensor, core: torch.Tensor, last: torch.Tensor) -> None:
        self.first.copy_(first)
        self.core.copy_(core.reshape(self.core.shape))
        self.last.copy_(last)

    def project_(self, W):
        o, i, kh, kw = W.shape
        M = W.permute(0, 2, 3, 1).reshape(-1, i)                       # rows (o, h, w), columns i
        V = leading_left(M.T, self.rank_in) if self.rank_in < i else \
            torch.eye(i, dtype=W.dtype, device=W.device)                # i × r_in, orthonormal columns
        K = torch.einsum("oipq,is->ospq", W, V).reshape(o, -1)          # o × (r_in·kh·kw)
        # a rank_out above K's rank gets an orthonormal completion (zero core rows)
        U = leading_left(K, self.rank_out) if self.rank_out < o else torch.eye(o, dtype=W.dtype, device=W.device)
        self.set_factors_(V.T, U.T @ K, U)

    def balance_(self):
        """first = Rᵀ Qᵀ and last = Q' R' (QR): orthonormal first rows and last columns, R and R' moved into the
        core."""
        Q, R = torch.linalg.qr(self.first.double().T)
        Q2, R2 = torch.linalg.qr(self.last.double())
        core = torch.einsum("as,stpq,ut->aupq", R2, self.core.double(), R)
        self.set_factors_(*(f.to(self.first) for f in (Q.T, core, Q2)))


# ----------------------------------------------------------------------------------------------------------- CP
@register_layer("cp-conv")
class CPConv(FactorizedConv):
    """W[o,i,p,q] ≈ Σ_r last[o,r] first[r,i] vert[r,p] horiz[r,q] (Lebedev et al. 2015): a 1×1 in → R, a depthwise
    kh×1 (vertical stride / padding / dilation), a depthwise 1×kw (horizontal ones), a 1×1 R → out with the bias.

    Full rank R = kh·kw·min(in, out) is exact by construction (one component per (channel, tap) of the smaller
    side); smaller R by CP-ALS (`cp_als`) whose unfolding products are computed in chunks of components, so no
    tensor larger than the kernel is ever allocated (tltorch's from_conv forms the Khatri–Rao product instead).

    >>> conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    >>> cp = CPConv.from_conv(conv)                         # R = 9·4: exact
    >>> x = torch.randn(1, 4, 7, 7)
    >>> bool(torch.allclose(cp(x), conv(x), atol=1e-5)), cp.rank
    (True, 36)
    """
    ALS_ITERS = 100

    def __init__(self, in_channels, out_channels, kernel_size, rank: int | None = None, *, stride=1, padding=0,
                 dilation=1, bias=True, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, kw)
        kh, kwd = self.kernel_size
        self.rank = _check_rank("rank", rank or kh * kwd * min(in_channels, out_channels),
                                max(kh * kwd * min(in_channels, out_channels), 1))
        self.first = nn.Parameter(torch.zeros(self.rank, in_channels, **kw))
        self.vert = nn.Parameter(torch.zeros(self.rank, 1, kh, 1, **kw))
        self.horiz = nn.Parameter(torch.zeros(self.rank, 1, 1, kwd, **kw))
        self.last = nn.Parameter(torch.zeros(out_channels, self.rank, **kw))

    def _shape_args(self):
        return {"rank": self.rank}

    @staticmethod
    def full_shape(in_channels, out_channels, kernel_size):
        return {"rank": kernel_size[0] * kernel_size[1] * min(in_channels, out_channels)}

    @staticmethod
    def num_params(in_channels, out_channels, kernel_size, rank=None) -> int:
        kh, kw = kernel_size
        R = rank or kh * kw * min(in_channels, out_channels)
        return R * (in_channels + kh + kw + out_channels)

    @staticmethod
    def count_flops(in_channels, out_channels, kernel_size, in_hw, out_hw, rank=None) -> int:
        kh, kw = kernel_size
        R = rank or kh * kw * min(in_channels, out_channels)
        mid = out_hw[0] * in_hw[1]                       # after the vertical step: output rows, input columns
        return 2 * R * (in_channels * in_hw[0] * in_hw[1] + kh * mid + (kw + out_channels) * out_hw[0] * out_hw[1])

    def forward(self, x):
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        z = F.conv2d(_conv1x1(x, self.first), self.vert, None, (sh, 1), (ph, 0), (dh, 1), self.rank)
        z = F.conv2d(z, self.horiz, None, (1, sw), (0, pw), (1, dw), self.rank)
        return _conv1x1(z, self.last, self.bias)

    def dense_weight(self):
        return torch.einsum("or,ri,rp,rq->oipq", self.last, self.first, self.vert[:, 0, :, 0], self.horiz[:, 0, 0])

    @torch.no_grad()
    def set_factors_(self, last, first, vert, horiz) -> None:
        """last (out×R), first (in×R), vert (kh×R), horiz (kw×R): the four CP factors (weights spread evenly)."""
        norms = [f.norm(dim=0) for f in (last, first, vert, horiz)]
        lam = torch.stack(norms).prod(0)
        share = lam.clamp_min(1e-300) ** 0.25
        f = [m / n.clamp_min(1e-300) * share for m, n in zip((last, first, vert, horiz), norms)]
        self.last.copy_(f[0])
        self.first.copy_(f[1].T)
        self.vert.copy_(f[2].T[:, None, :, None])
        self.horiz.copy_(f[3].T[:, None, None, :])

    def project_(self, W):
        o, i, kh, kw = W.shape
        if self.rank == self.full_shape(i, o, (kh, kw))["rank"]:
            self.set_factors_(*cp_exact(W))
        else:
            self.set_factors_(*cp_als(W, self.rank, iters=self.ALS_ITERS))

    def balance_(self):
        """Each component's weight spread evenly over its four factors again (set_factors_)."""
        self.set_factors_(self.last, self.first.T, self.vert[:, 0, :, 0].T, self.horiz[:, 0, 0].T)


def cp_exact(W: torch.Tensor):
    """An exact CP decomposition with kh·kw·min(out, in) components: one per (channel, p, q) of the smaller channel
    side, whose factors there are unit vectors and whose other factor is the kernel's slice."""
    o, i, kh, kw = W.shape
    eye_h, eye_w = torch.eye(kh, dtype=W.dtype, device=W.device), torch.eye(kw, dtype=W.dtype, device=W.device)
    vert = eye_h[:, None, :, None].expand(kh, min(o, i), kh, kw).reshape(kh, -1)     # component (c, p, q) order
    horiz = eye_w[:, None, None, :].expand(kw, min(o, i), kh, kw).reshape(kw, -1)
    eye_c = torch.eye(min(o, i), dtype=W.dtype, device=W.device)[:, :, None, None].expand(-1, -1, kh, kw)
    eye_c = eye_c.reshape(min(o, i), -1)
    if i <= o:      # component (c, p, q): first = e_c, last = W[:, c, p, q]
        return W.permute(0, 1, 2, 3).reshape(o, -1), eye_c, vert, horiz
    return eye_c, W.permute(1, 0, 2, 3).reshape(i, -1), vert, horiz


def _mttkrp(T: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    """T_(mode) · KhatriRao(other factors) (dims × R), in chunks of components so that no intermediate exceeds
    T's size: the largest other mode is contracted first, `chunk` ≤ its length components at a time."""
    others = [m for m in range(T.dim()) if m != mode]
    big = max(others, key=lambda m: T.shape[m])
    rest = [m for m in others if m != big]
    R = factors[0].shape[1]
    chunk = max(1, T.shape[big])
    letters = "abcd"[: T.dim()]
    out = []
    for s in range(0, R, chunk):
        sl = slice(s, min(s + chunk, R))
        kept = "".join(letters[m] for m in range(T.dim()) if m != big)
        tmp = torch.einsum(f"{letters},{letters[big]}r->{kept}r", T, factors[big][:, sl])   # ≤ T's size
        for m in rest:
            kept_next = kept.replace(letters[m], "")
            tmp = torch.einsum(f"{kept}r,{letters[m]}r->{kept_next}r", tmp, factors[m][:, sl])
            kept = kept_next
        out.append(tmp)
    return torch.cat(out, 1)


@torch.no_grad()
def cp_als(T: torch.Tensor, rank: int, iters: int = 100, tol: float = 1e-8, seed: int = 0) -> list[torch.Tensor]:
    """CP-ALS of a 4-way tensor: factors (dims × rank) with T ≈ Σ_r ⊗ factors[:, r]. Initialized by the leading
    eigenvectors of each mode's Gram T_(n) T_(n)ᵀ (random columns beyond the mode's size); each step solves one
    factor exactly given the others (normal equations with the Hadamard product of the others' Grams)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    factors = []
    letters = "abcd"
    for n in range(4):
        G = torch.einsum(f"{letters},{letters.replace(letters[n], 'z')}->{letters[n]}z",
                         T, T) if T.shape[n] <= 4096 else None
        k = min(rank, T.shape[n])
        U = torch.linalg.eigh(G)[1].flip(1)[:, :k] if G is not None else torch.empty(T.shape[n], 0, dtype=T.dtype)
        extra = torch.randn(T.shape[n], rank - k, generator=g, dtype=torch.float64).to(T)
        factors.append(torch.cat([U, extra / math.sqrt(T.shape[n])], 1))
    norm2 = T.square().sum()
    prev = None
    for _ in range(iters):
        for n in range(4):
            V = torch.ones(rank, rank, dtype=T.dtype, device=T.device)
            for m in range(4):
                if m != n:
                    V = V * (factors[m].T @ factors[m])
            M = _mttkrp(T, factors, n)
            ridge = 1e-12 * V.diagonal().mean().clamp_min(1e-300)
            factors[n] = torch.linalg.solve(V + ridge * torch.eye(rank, dtype=T.dtype, device=T.device), M.T).T
        # ‖T − T̂‖² = ‖T‖² − 2⟨T, T̂⟩ + ‖T̂‖², from the last step's quantities (no full reconstruction)
        inner = (M * factors[3]).sum()
        V3 = V * (factors[3].T @ factors[3])
        err = (norm2 - 2 * inner + V3.sum()).clamp_min(0).item() / max(norm2.item(), 1e-300)
        if prev is not None and abs(prev - err) < tol:
            break
        prev = err
    return factors


# ------------------------------------------------------------------------------------------------- spatial SVD
@register_layer("spatial-svd-conv")
class SpatialSVDConv(FactorizedConv):
    """Jaderberg et al. 2014 (scheme 2): a kh×1 conv in → r (vertical stride / padding / dilation), then a 1×kw conv
    r → out (horizontal ones) with the bias. W as the matrix M[(i,p), (o,q)] = W[o,i,p,q]; truncated SVD of M is
    Frobenius-optimal for that structure; exact at r = min(in·kh, out·kw).

    >>> conv = torch.nn.Conv2d(8, 16, (3, 5), padding=(1, 2), dilation=1)
    >>> s = SpatialSVDConv.from_conv(conv)
    >>> x = torch.randn(2, 8, 6, 7)
    >>> bool(torch.allclose(s(x), conv(x), atol=1e-5)), s.rank
    (True, 24)
    """

    def __init__(self, in_channels, out_channels, kernel_size, rank: int | None = None, *, stride=1, padding=0,
                 dilation=1, bias=True, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, kw)
        kh, kwd = self.kernel_size
        top = min(in_channels * kh, out_channels * kwd)
        self.rank = _check_rank("rank", rank or top, top)
        self.vert = nn.Parameter(torch.zeros(self.rank, in_channels, kh, 1, **kw))
        self.horiz = nn.Parameter(torch.zeros(out_channels, self.rank, 1, kwd, **kw))

    def _shape_args(self):
        return {"rank": self.rank}

    @staticmethod
    def full_shape(in_channels, out_channels, kernel_size):
        return {"rank": min(in_channels * kernel_size[0], out_channels * kernel_size[1])}

    @staticmethod
    def num_params(in_channels, out_channels, kernel_size, rank=None) -> int:
        kh, kw = kernel_size
        return (rank or min(in_channels * kh, out_channels * kw)) * (in_channels * kh + out_channels * kw)

    @staticmethod
    def count_flops(in_channels, out_channels, kernel_size, in_hw, out_hw, rank=None) -> int:
        kh, kw = kernel_size
        rank = rank or min(in_channels * kh, out_channels * kw)
        return 2 * rank * (in_channels * kh * out_hw[0] * in_hw[1] + out_channels * kw * out_hw[0] * out_hw[1])

    def forward(self, x):
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        z = F.conv2d(x, self.vert, None, (sh, 1), (ph, 0), (dh, 1))
        return F.conv2d(z, self.horiz, self.bias, (1, sw), (0, pw), (1, dw))

    def dense_weight(self):
        return torch.einsum("rip,orq->oipq", self.vert[..., 0], self.horiz[:, :, 0])

    @staticmethod
    def unfold(W: torch.Tensor) -> torch.Tensor:
        """M[(i,p), (o,q)] = W[o,i,p,q]."""
        o, i, kh, kw = W.shape
        return W.permute(1, 2, 0, 3).reshape(i * kh, o * kw)

    @torch.no_grad()
    def set_factors_(self, Vv: torch.Tensor, H: torch.Tensor) -> None:
        """Vv ((in·kh) × r), H (r × (out·kw)) with M ≈ Vv H."""
        kh, kw = self.kernel_size
        self.vert.copy_(Vv.T.reshape(self.rank, self.in_channels, kh, 1))
        self.horiz.copy_(H.reshape(self.rank, self.out_channels, kw).permute(1, 0, 2)[:, :, None, :])

    def project_(self, W):
        M = self.unfold(W)
        if M.shape[0] <= M.shape[1]:
            U = leading_left(M, self.rank)                  # M ≈ U Uᵀ M: the truncated SVD
            self.set_factors_(U, U.T @ M)
        else:
            V = leading_left(M.T, self.rank)                # M ≈ M V Vᵀ
            self.set_factors_(M @ V, V.T)

    def balance_(self):
        H = self.horiz[:, :, 0, :].permute(1, 0, 2).reshape(self.rank, -1)
        self.set_factors_(*(f.to(H) for f in rebalanced(self.vert.reshape(self.rank, -1).T, H)))


CONV_LAYERS = (LowRankConv, Tucker2Conv, CPConv, SpatialSVDConv)
