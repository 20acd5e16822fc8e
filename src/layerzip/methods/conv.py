"""Convolution methods: `tucker2`, `cp`, `spatial-svd` and `conv-svd` factorize the 2-D convolutions of any
nn.Module (layerzip.nn.conv has the layers and their plain, calibration-free projections).

With calibration images, each conv's layer loss is ‖(W − W') Xᵀ‖² over its input patches X (im2col, G = XᵀX =
L Lᵀ; stats/conv.py), and:

    conv-svd      W' = A B (k×k to r, then 1×1): A = U_r from W G Wᵀ = (W L)(W L)ᵀ, B = U_rᵀ W — the optimal rank-r
                  layer loss
                  (SVD-LLM on the im2col matrix; Zhang et al. 2015's channel decomposition with whitening)
    tucker2       the input basis from the channel Gram G_c (the diagonal blocks of G): first = V_rᵀ L_c⁻¹ with V
                  from the SVD of W_(in) L_c; then the reduced kernel K = W G Fᵀ (F G Fᵀ)⁻¹ (F = first ⊗ I: the exact
                  least-squares fit given `first`) and its output basis from the SVD of K L_z (G_z = F G Fᵀ = L_z L_zᵀ):
                  optimal given `first`
    spatial-svd   the vertical filters from the vertical-patch Gram G_v (SVD of L_vᵀ M, M[(i,p),(o,q)] = W[o,i,p,q]),
                  then the horizontal ones by exact least squares with G
    cp            CP-ALS on W (memory-safe), then the last 1×1 by exact least squares with G (when R ≤ out)

1×1 convolutions get `conv-svd`'s pair (unless `pointwise=False`); grouped / depthwise convs stay dense. Ranks:
`keep` of each conv's parameters or FLOPs (`objective`), or the fewest components keeping `energy` of the
(whitened) spectrum, or (`vbmf`) EVBMF's ranks of the kernel's unfoldings, or (`alloc="global"`) all convs
together under one budget — each conv's normalized loss
estimate (the spectra's squared tails) against its cost, by bisection on a shared price.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocate import vbmf_rank
from ..errors import LayerzipError
from ..models import select_modules, set_module
from ..nn.conv import (CPConv, FactorizedConv, LowRankConv, SpatialSVDConv, Tucker2Conv, conv_out_hw,
                       dense_conv_flops, factorizable, leading_left, numeric_padding, singular_values)
from ..stats import Whitening, whiten
from ..stats.conv import ConvStats, collect_conv_stats
from .base import CompressConfig, option, register_method

OBJECTIVES = ("params", "flops")


# ------------------------------------------------------------------------------------------------ the pure math
def refit_left(Wm: torch.Tensor, E: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """argmin_A tr((Wm − A E) G (Wm − A E)ᵀ) = Wm G Eᵀ (E G Eᵀ)⁻¹ (a tiny ridge keeps a singular E G Eᵀ solvable)."""
    GE = G @ E.T
    M = E @ GE
    M.diagonal().add_(1e-12 * M.diagonal().abs().mean().clamp_min(1e-300))
    return torch.linalg.solve(M, (Wm @ GE).T).T


def _left_inv_t(wt: Whitening, U: torch.Tensor) -> torch.Tensor:
    """L⁻ᵀ U."""
    return wt.right_solve(U.T).T


def channel_gram(G: torch.Tensor, in_channels: int, k: int) -> torch.Tensor:
    """Σ over taps of the patch Gram's diagonal blocks: the Gram of the input pixels' channels (in × in)."""
    return G.reshape(in_channels, k, in_channels, k).diagonal(dim1=1, dim2=3).sum(-1)


def vertical_gram(G: torch.Tensor, in_channels: int, kh: int, kw: int) -> torch.Tensor:
    """Σ over horizontal taps q of the blocks (·, ·, q), (·, ·, q): the Gram of the kh×1 patches, (in·kh)²."""
    n = in_channels * kh
    return G.reshape(n, kw, n, kw).diagonal(dim1=1, dim2=3).sum(-1)


@torch.no_grad()
def conv_svd_factors(W: torch.Tensor, G: torch.Tensor | None, rank: int):
    """(A out×r, B r×(in·kh·kw)): W' = A B with the smallest layer loss (G None: the smallest ‖W − W'‖).
    A = U_r, the leading eigenvectors of W G Wᵀ (= the left singular vectors of W L), B = U_rᵀ W: the projection
    U_r U_rᵀ W L is the truncated SVD of W L (Eckart–Young), computed from an out×out eigensolve."""
    Wm = W.flatten(1)
    U = leading_left(Wm, rank, gram=None if G is None else Wm @ G @ Wm.T)
    return U, U.T @ Wm


@torch.no_grad()
def tucker2_factors(W: torch.Tensor, G: torch.Tensor, rank_in: int, rank_out: int):
    """(first r_in×in, core r_out×r_in×kh×kw, last out×r_out), activation-aware (module doc)."""
    o, i, kh, kw = W.shape
    k = kh * kw
    eye = lambda n: torch.eye(n, dtype=W.dtype, device=W.device)   # noqa: E731
    if rank_in < i:
        wc = whiten(channel_gram(G, i, k))
        M = W.permute(0, 2, 3, 1).reshape(-1, i)                  # rows (o, p, q), columns i
        first = wc.right_solve(leading_left((M @ wc.L).T, rank_in).T)   # V_rᵀ L_c⁻¹
    else:
        first = eye(i)
    F_ = torch.kron(first.contiguous(), eye(k))                               # (r_in·k) × (in·k)
    K = refit_left(W.flatten(1), F_, G)                           # o × (r_in·k): exact given `first`
    if rank_out < o:
        U = leading_left(K, rank_out, gram=K @ (F_ @ G @ F_.T) @ K.T)  # left singular vectors of K L_z
    else:
        U = eye(o)
    return first, (U.T @ K).reshape(-1, rank_in, kh, kw), U


@torch.no_grad()
def spatial_factors(W: torch.Tensor, G: torch.Tensor, rank: int):
    """(Vv (in·kh)×r, H r×(out·kw)) with M ≈ Vv H (SpatialSVDConv.unfold), activation-aware (module doc)."""
    o, i, kh, kw = W.shape
    wv = whiten(vertical_gram(G, i, kh, kw))
    U = leading_left(wv.L.T @ SpatialSVDConv.unfold(W), rank)
    Vv = _left_inv_t(wv, U)
    E = torch.kron(Vv.T.contiguous(), torch.eye(kw, dtype=W.dtype, device=W.device))   # (r·kw) × (in·kh·kw)
    Hm = refit_left(W.flatten(1), E, G)                                    # o × (r, q)
    return Vv, Hm.reshape(o, rank, kw).permute(1, 0, 2).reshape(rank, o * kw)


def cp_refit_last(layer: CPConv, W: torch.Tensor, G: torch.Tensor) -> None:
    """The last 1×1 of a CPConv by exact least squares toward the original outputs (only when R ≤ out, so that
    the component matrix is no larger than the kernel)."""
    if layer.rank > layer.out_channels:
        return
    E = torch.einsum("ri,rp,rq->ripq", layer.first, layer.vert[:, 0, :, 0], layer.horiz[:, 0, 0]).reshape(layer.rank, -1)
    with torch.no_grad():
        layer.last.copy_(refit_left(W.flatten(1), E, G))


def tucker2_shapes(i: int, o: int, k: int) -> list[dict]:
    """Tucker-2 ranks with r_in/in ≈ r_out/out, increasing, each rank at most what the other side can use
    (r_out ≤ r_in·k, r_in ≤ r_out·k: beyond that the core cannot have more independent rows / columns)."""
    n, out = max(i, o), []
    for t in range(1, n + 1):
        ri, ro = max(1, round(t * i / n)), max(1, round(t * o / n))
        sh = {"rank_in": min(ri, ro * k), "rank_out": min(ro, ri * k)}
        if sh not in out:
            out.append(sh)
    return out


def vbmf_shape(cls: type[FactorizedConv], W: torch.Tensor) -> dict:
    """The ranks EVBMF (allocate.vbmf_rank) keeps in the kernel's unfoldings (at least 1): the im2col matrix
    (out × in·kh·kw) for a channel SVD, Tucker-2's input (out·kh·kw × in) and output unfoldings, the spatial
    unfolding (in·kh × out·kw) for spatial SVD."""
    o, i, kh, kw = W.shape

    def rank(M):
        return max(1, vbmf_rank(torch.linalg.svdvals(M.double()), *M.shape))
    if cls is LowRankConv:
        return {"rank": rank(W.flatten(1))}
    if cls is SpatialSVDConv:
        return {"rank": rank(SpatialSVDConv.unfold(W))}
    if cls is Tucker2Conv:
        ri, ro = rank(W.permute(0, 2, 3, 1).reshape(-1, i)), rank(W.flatten(1))
        return {"rank_in": min(ri, ro * kh * kw), "rank_out": min(ro, ri * kh * kw)}
    raise LayerzipError(f"--vbmf has no unfolding to choose {cls.__name__}'s rank from; use --keep")


def _tail(s: torch.Tensor) -> torch.Tensor:
    """tail[r] = Σ_{j≥r} sⱼ² / Σ sⱼ² (the normalized loss of keeping r components), r = 0..len."""
    e = s.double().square()
    c = torch.cat([e.new_zeros(1), e.cumsum(0)])
    return ((c[-1] - c) / c[-1].clamp_min(1e-300)).clamp_min(0)


# ------------------------------------------------------------------------------------------------ the configs
@dataclass
class ConvConfig(CompressConfig):
    """Factorize every plain 2-D convolution (k×k with the method's layer, 1×1 as a low-rank pair)."""
    energy: float | None = option(None, "conv methods, cur: rank from this fraction of the (whitened) spectrum's "
                                        "energy (instead of --keep)")
    vbmf: bool = option(False, "conv methods: each convolution's ranks by empirical variational Bayesian matrix "
                               "factorization of its kernel's unfoldings (EVBMF, as Kim et al. 2016), instead of "
                               "--keep")
    pointwise: bool = option(True, "conv methods: also factorize 1×1 convolutions (a 1×1 pair of rank r)")
    whiten: bool = option(True, "conv methods: with calibration images, minimize each convolution's output error "
                                "(Gram of its input patches) instead of the kernel's")

    layer: ClassVar[type] = LowRankConv
    objectives: ClassVar[tuple] = OBJECTIVES
    correct_ok: ClassVar[bool] = False
    sequential_ok: ClassVar[bool] = False
    stream_ok: ClassVar[bool] = False
    global_ok: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.energy is not None and not (isinstance(self.energy, (int, float)) and 0 < self.energy <= 1):
            raise LayerzipError(f"--energy must be in (0, 1], got {self.energy}")
        if self.alloc == "global" and not self.global_ok:
            raise LayerzipError(f"method {self.name} supports --alloc uniform only (no loss estimate per rank)")
        if self.vbmf and (self.energy is not None or self.alloc == "global" or self.objective == "flops"):
            raise LayerzipError("--vbmf chooses every rank itself; drop --energy, --alloc global or --objective flops")

    # ------------------------------------------------------------------------------------------------ targets
    def targets_of(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every plain nn.Conv2d (groups 1, zero padding; 1×1 ones only with `pointwise`) and every conv layerzip
        already factorized, matching `include` and not `exclude`."""
        def kind(m):
            if isinstance(m, FactorizedConv):
                return True
            return factorizable(m) and (self.pointwise or m.kernel_size != (1, 1))
        out = select_modules(model, self.include, self.exclude, kind=kind)
        if not out:
            raise LayerzipError("no convolution to factorize (plain nn.Conv2d, groups 1, zero padding)"
                                + (f" matching --include {self.include!r}" if self.include else "")
                                + "; grouped and depthwise convolutions stay dense")
        return out

    def layer_for(self, conv: nn.Conv2d) -> type[FactorizedConv]:
        return LowRankConv if conv.kernel_size == (1, 1) else self.layer

    def module_config(self, left_params, target_params):
        return None                                  # restructure_ did everything

    # ------------------------------------------------------------------------------------------------ the math
    def build(self, cls, W: torch.Tensor, bias, geom: dict, shape: dict, stats: ConvStats | None) -> FactorizedConv:
        """One conv's replacement (float64) from its float64 kernel."""
        G = stats.gram if stats is not None and self.whiten and stats.patches.tokens else None
        if G is None:
            return cls.from_dense(W, bias, **geom, **shape)
        layer = cls(W.shape[1], W.shape[0], W.shape[2:], **geom, **shape, bias=bias is not None, dtype=W.dtype)
        if cls is LowRankConv:
            layer.set_factors_(*conv_svd_factors(W, G, shape["rank"]))
        elif cls is Tucker2Conv:
            layer.set_factors_(*tucker2_factors(W, G, shape["rank_in"], shape["rank_out"]))
        elif cls is SpatialSVDConv:
            layer.set_factors_(*spatial_factors(W, G, shape["rank"]))
        elif cls is CPConv:
            layer.project_(W)
            cp_refit_last(layer, W, G)
        else:
            raise TypeError(cls)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    def options(self, cls, W: torch.Tensor, stats: ConvStats | None, loss: bool = True
                ) -> tuple[list[dict], torch.Tensor | None]:
        """Every shape worth trying (increasing size) and, `loss`, its normalized loss estimate (None: none)."""
        o, i, kh, kw = W.shape
        G = stats.gram if stats is not None and self.whiten and stats.patches.tokens else None
        if not loss:
            if cls is Tucker2Conv:
                return tucker2_shapes(i, o, kh * kw), None
            top = cls.full_shape(i, o, (kh, kw))["rank"]
            return [{"rank": r} for r in range(1, top + 1)], None
        if cls is LowRankConv:
            Wm = W.flatten(1)
            s = singular_values(Wm @ G @ Wm.T if G is not None else Wm @ Wm.T)
            top = min(o, i * kh * kw)
            return [{"rank": r} for r in range(1, top + 1)], _tail(s)[1: top + 1]
        if cls is SpatialSVDConv:
            M = SpatialSVDConv.unfold(W)
            A = whiten(vertical_gram(G, i, kh, kw)).L.T @ M if G is not None else M
            s = singular_values(A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A)
            top = min(i * kh, o * kw)
            return [{"rank": r} for r in range(1, top + 1)], _tail(s)[1: top + 1]
        if cls is Tucker2Conv:
            M = W.permute(0, 2, 3, 1).reshape(-1, i)
            A = M @ whiten(channel_gram(G, i, kh * kw)).L if G is not None else M
            s_in = singular_values(A.T @ A)
            Wm = W.flatten(1)
            s_out = singular_values(Wm @ G @ Wm.T if G is not None else Wm @ Wm.T)
            t_in, t_out = _tail(s_in), _tail(s_out)
            shapes = tucker2_shapes(i, o, kh * kw)
            loss = torch.stack([t_in[min(sh["rank_in"], len(t_in) - 1)] + t_out[min(sh["rank_out"], len(t_out) - 1)]
                                for sh in shapes]) / 2
            return shapes, loss
        top = kh * kw * min(i, o)                         # CP: no loss estimate
        return [{"rank": r} for r in range(1, top + 1)], None

    # ------------------------------------------------------------------------------------------------ the walk
    def restructure_(self, model: nn.Module, calib, progress: bool) -> dict:
        return self.apply_(model, calib=calib, progress=progress)

    def calibrate(self, model: nn.Module, calib, progress: bool = True) -> dict[str, ConvStats]:
        """{name: ConvStats} of every target conv over `calib` (patch Grams with `whiten`; always the input sizes):
        pass it to `apply_` to decompose at several settings from one calibration."""
        targets = {n: m for n, m in self.targets_of(model).items() if not isinstance(m, FactorizedConv)}
        return collect_conv_stats(model, targets, calib, {n: numeric_padding(m) for n, m in targets.items()},
                                  grams=self.whiten, progress=progress)

    def apply_(self, model: nn.Module, calib=None, stats: dict[str, ConvStats] | None = None,
               progress: bool = True) -> dict:
        """Factorize the target convs of `model` in place (what compress_ runs); `stats` from `calibrate` (of this
        model's targets, before any change) instead of `calib`. Returns the report entries."""
        targets = {n: m for n, m in self.targets_of(model).items() if not isinstance(m, FactorizedConv)}
        pads = {n: numeric_padding(m) for n, m in targets.items()}
        if stats is not None:
            stats = {n: stats[n] for n in targets}
        elif calib:
            stats = collect_conv_stats(model, targets, calib, pads, grams=self.whiten, progress=progress)
        elif self.objective == "flops":
            raise LayerzipError("--objective flops counts each convolution at its feature-map size: pass "
                                "calibration images (calib=...)")
        else:
            stats = {}
        plan = {}
        for name, conv in tqdm(targets.items(), desc=f"{self.name}: spectra", unit="conv",
                               disable=not progress or self.alloc != "global" and self.energy is None):
            cls = self.layer_for(conv)
            W = conv.weight.detach().double()
            st = stats.get(name)
            geom = {"stride": conv.stride, "padding": pads[name], "dilation": conv.dilation}
            in_hw = st.in_hw if st is not None else None
            out_hw = conv_out_hw(in_hw, conv.kernel_size, conv.stride, pads[name], conv.dilation) if in_hw else None
            k = tuple(conv.kernel_size)

            def cost(shape, cls=cls, conv=conv, in_hw=in_hw, out_hw=out_hw, k=k):
                if self.objective == "flops":
                    return cls.count_flops(conv.in_channels, conv.out_channels, k, in_hw, out_hw, **shape)
                return cls.num_params(conv.in_channels, conv.out_channels, k, **shape)
            dense = dense_conv_flops(conv, in_hw) if self.objective == "flops" else conv.weight.numel()
            # parameters: `keep` counts the biases, which stay, so the kernel keeps (keep·(w + b) − b) / w
            nb = 0 if self.objective == "flops" or conv.bias is None else conv.bias.numel()
            if self.vbmf:
                shapes, loss = [vbmf_shape(cls, W)], None
            else:
                shapes, loss = self.options(cls, W, st, loss=self.alloc == "global" or self.energy is not None)
            costs = [cost(s) for s in shapes]
            useful = [j for j, c in enumerate(costs) if c < dense]
            plan[name] = dict(cls=cls, conv=conv, geom=geom, stats=st, dense=dense, in_hw=in_hw,
                              bias=nb, shapes=[shapes[j] for j in useful], costs=[costs[j] for j in useful],
                              loss=None if loss is None else loss[useful])
        choice = self._choose(plan)
        modules, ranks = {}, {}
        flops_before = flops_after = 0
        for name in tqdm(list(plan), desc=f"decomposing ({self.name})", unit="conv", disable=not progress):
            p = plan[name]
            conv = p["conv"]
            flops_before += dense_conv_flops(conv, p["in_hw"])
            j = choice[name]
            if j is None:
                ranks[name] = None
                flops_after += dense_conv_flops(conv, p["in_hw"])
                continue
            W = conv.weight.detach()
            bias = None if conv.bias is None else conv.bias.detach().double()
            new = self.build(p["cls"], W.double(), bias, p["geom"], p["shapes"][j], p["stats"])
            new = new.to(device=W.device, dtype=W.dtype)
            set_module(model, name, new)
            modules[name] = new.spec()
            ranks[name] = p["shapes"][j]
            flops_after += new.flops(p["in_hw"])
            p["stats"] = None                         # this walk's reference to the Gram
        per = "per image" if stats else "per output position"
        return {"modules": modules, "ranks": ranks, "objective": self.objective,
                "flops_before": flops_before, "flops_after": flops_after, "flops_counted": per,
                "flops_kept": flops_after / max(flops_before, 1), "convolutions": len(plan),
                "factorized": len(modules)}

    def _choose(self, plan: dict) -> dict[str, int | None]:
        """Index into each conv's shapes (None: stays dense)."""
        if self.vbmf:                                   # its one shape, where it is smaller than the conv
            return {n: 0 if p["shapes"] else None for n, p in plan.items()}
        if self.energy is not None:
            out = {}
            for n, p in plan.items():
                ok = [j for j, l in enumerate(p["loss"].tolist()) if l <= 1 - self.energy]
                out[n] = ok[0] if ok else None
            return out
        if self.keep >= 1:
            return dict.fromkeys(plan)
        if self.alloc != "global":
            return {n: max((j for j, c in enumerate(p["costs"]) if c <= self.keep * (p["dense"] + p["bias"]) - p["bias"]),
                           default=None) for n, p in plan.items()}
        return allocate_shapes(plan, sum(self.keep * (p["dense"] + p["bias"]) - p["bias"] for p in plan.values()))


def allocate_shapes(plan: dict, budget: float) -> dict[str, int | None]:
    """min Σ loss subject to Σ cost ≤ budget, each conv's options its shapes then dense (cost dense, loss 0): each
    conv minimizes loss + λ·cost/dense at a shared price λ found by bisection, then a greedy fill of what is left."""
    opts = {}
    for n, p in plan.items():
        c = torch.tensor([*p["costs"], p["dense"]], dtype=torch.float64)
        l = torch.cat([p["loss"].double(), torch.zeros(1, dtype=torch.float64)])
        opts[n] = (c, l)

    def pick(lam):
        return {n: int(torch.argmin(l + lam * c / c[-1])) for n, (c, l) in opts.items()}

    def total(ch):
        return sum(opts[n][0][j].item() for n, j in ch.items())
    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget and hi < 1e30:
        hi *= 4
    for _ in range(100):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        lo, hi = (mid, hi) if total(pick(mid)) > budget else (lo, mid)
        if hi - lo <= 1e-12 * hi:
            break
    choice = pick(hi)
    left = budget - total(choice)
    while True:                                     # greedy: best loss drop per unit of cost that still fits
        best, gain = None, 0.0
        for n, j in choice.items():
            c, l = opts[n]
            for j2 in range(j + 1, len(c)):
                dc = (c[j2] - c[j]).item()
                if dc <= left and dc > 0:
                    g = (l[j] - l[j2]).item() / dc
                    if g > gain:
                        best, gain = (n, j2), g
                    break
        if best is None:
            break
        n, j2 = best
        left -= (opts[n][0][j2] - opts[n][0][choice[n]]).item()
        choice[n] = j2
    return {n: None if j == len(opts[n][0]) - 1 else j for n, j in choice.items()}


@register_method("conv-svd")
@dataclass
class ConvSVD(ConvConfig):
    """Every conv as a k×k conv to r channels then a 1×1 (LowRankConv): with calibration images, the optimal rank-r
    output error (whitened SVD of the im2col kernel)."""
    layer: ClassVar[type] = LowRankConv


@register_method("tucker2")
@dataclass
class Tucker2(ConvConfig):
    """k×k convs as 1×1 → k×k core → 1×1 (Tucker2Conv), ranks r_in/in = r_out/out."""
    layer: ClassVar[type] = Tucker2Conv


@register_method("cp")
@dataclass
class CP(ConvConfig):
    """k×k convs as 1×1 → depthwise k×1 → depthwise 1×k → 1×1 (CPConv, memory-safe ALS)."""
    layer: ClassVar[type] = CPConv
    global_ok: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        if self.energy is not None or self.vbmf:
            raise LayerzipError("method cp has no spectrum to take --energy or --vbmf from; use --keep")


@register_method("spatial-svd")
@dataclass
class SpatialSVD(ConvConfig):
    """k×k convs as k×1 then 1×k (SpatialSVDConv, Jaderberg et al.)."""
    layer: ClassVar[type] = SpatialSVDConv


__all__ = ["CP", "ConvSVD", "SpatialSVD", "Tucker2", "allocate_shapes", "conv_svd_factors", "refit_left",
           "spatial_factors", "tucker2_factors"]
