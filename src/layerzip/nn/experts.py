"""SplitExperts: the fused experts of a transformers MoE layer as one nn.Linear per expert and projection.

transformers keeps an MoE layer's experts as two 3-D parameters of one module (Mixtral, Qwen2/3-MoE, OLMoE, …):

    gate_up_proj  E × 2I × H,   down_proj  E × H × I,   experts(hidden_states, top_k_index, top_k_weights)
    y_t = Σ_{(e, w) routed to t} w · down_e( σ(gate_e x_t) ⊙ up_e x_t )

SplitExperts computes the same with `gate_up[e]` (H -> 2I) and `down[e]` (I -> H) as modules of their own, so every
expert's projections are targets like any Linear: their statistics come from the tokens routed to them, any method
factorizes them, and `compress --share` gives the experts of a layer one input basis (MoBE's shared bases across
experts). `split_experts_` swaps every fused experts module of a model whose forward it reproduces (checked on
random tokens and routes); `join_experts_` puts the fused module back where nothing was factorized, so a model saves
in its own layout wherever it can.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import register_layer
from .moe import activation, activation_name

FUSED = ("gate_up_proj", "down_proj")


def fused_layout(module: nn.Module) -> tuple[int, int, int, str] | None:
    """(experts, hidden, intermediate, activation name) when `module` holds fused experts in transformers' default
    layout (gate and up concatenated, not transposed, no bias, no norm after the experts), else None."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != set(FUSED) or any(True for _ in module.children() if any(True for _ in _.parameters())):
        return None
    gu, dn = params["gate_up_proj"], params["down_proj"]
    if gu.dim() != 3 or dn.dim() != 3:
        return None
    E, I2, H = gu.shape
    if I2 % 2 or tuple(dn.shape) != (E, H, I2 // 2):
        return None
    flags = (getattr(module, "has_gate", True), getattr(module, "has_bias", False),
             getattr(module, "is_transposed", False), getattr(module, "is_concatenated", True),
             getattr(module, "has_post_expert_norm", False))
    if flags != (True, False, False, True, False) or not isinstance(getattr(module, "act_fn", None), nn.Module):
        return None
    act = activation_name(module.act_fn)
    return None if act is None else (E, H, I2 // 2, act)


@register_layer("experts")
class SplitExperts(nn.Module):
    """E experts, each `gate_up[e]` (H -> 2I, gate rows then up rows) and `down[e]` (I -> H), called as
    transformers calls its fused experts. Not a FactorizedLayer: it holds layers (each plain or factorized) and
    is saved as a spec only so that loading rebuilds the split form before the layers' own specs.

    >>> torch.manual_seed(0) and None
    >>> m = SplitExperts(hidden=8, intermediate=4, experts=3, act="silu")
    >>> x, idx, w = torch.randn(5, 8), torch.tensor([[0, 2]] * 5), torch.full((5, 2), 0.5)
    >>> m(x, idx, w).shape, sum(p.numel() for p in m.parameters()) == 3 * (8 * 8 + 4 * 8)
    (torch.Size([5, 8]), True)
    """

    def __init__(self, hidden: int, intermediate: int, experts: int, act: str, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype, "bias": False}
        self.in_features = self.out_features = hidden
        self.intermediate, self.experts, self.act_name, self.bias = intermediate, experts, act, None
        self.gate_up = nn.ModuleList(nn.Linear(hidden, 2 * intermediate, **kw) for _ in range(experts))
        self.down = nn.ModuleList(nn.Linear(intermediate, hidden, **kw) for _ in range(experts))
        self.act_fn = activation(act)

    @classmethod
    def from_fused(cls, module: nn.Module) -> "SplitExperts | None":
        """The same experts split (weights copied), or None when `module` is not in the default fused layout."""
        layout = fused_layout(module)
        if layout is None:
            return None
        E, H, I, act = layout
        gu = module.gate_up_proj
        new = cls(H, I, E, act, device=gu.device, dtype=gu.dtype)
        if gu.is_meta:          # a streamed skeleton: each expert's weight is read as a slice of the fused tensor
            return new
        with torch.no_grad():
            for e in range(E):
                new.gate_up[e].weight.copy_(module.gate_up_proj[e])
                new.down[e].weight.copy_(module.down_proj[e])
        return new

    def fused_weights(self) -> dict[str, torch.Tensor]:
        """{gate_up_proj, down_proj} stacked back (each expert's dense weight, factorized or not)."""
        def dense(m):
            return m.weight if isinstance(m, nn.Linear) else m.dense_weight()
        return {"gate_up_proj": torch.stack([dense(m).detach() for m in self.gate_up]),
                "down_proj": torch.stack([dense(m).detach() for m in self.down])}

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.experts + 1)[: self.experts].tolist()  # index E: not routed
        tokens, weights = order // k, top_k_weights.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = tokens[start:start + n]
                gate, up = self.gate_up[e](hidden_states[rows]).chunk(2, dim=-1)
                y = self.down[e](self.act_fn(gate) * up) * weights[start:start + n, None]
                out.index_add_(0, rows, y.to(out.dtype))
            start += n
        return out

    def spec(self) -> dict:
        return {"type": self.layer_type, "in": self.in_features, "out": self.out_features,
                "intermediate": self.intermediate, "experts": self.experts, "act": self.act_name}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "SplitExperts":
        if spec["in"] != spec["out"]:
            raise ValueError("experts map the model width to itself (in == out)")
        return cls(spec["in"], spec["intermediate"], spec["experts"], spec["act"], device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"hidden={self.in_features}, intermediate={self.intermediate}, experts={self.experts}, "
                f"act={self.act_name}")


def _same_forward(fused: nn.Module, split: SplitExperts) -> bool:
    """Both give the same output on random tokens routed to random experts (top-2, random weights)."""
    gen = torch.Generator().manual_seed(0)
    w = split.gate_up[0].weight
    x = torch.randn(16, split.in_features, generator=gen).to(w)
    idx = torch.stack([torch.randperm(split.experts, generator=gen)[:min(2, split.experts)] for _ in range(16)])
    wt = torch.rand(idx.shape, generator=gen).to(w)
    with torch.no_grad():
        a, b = fused(x, idx.to(w.device), wt), split(x, idx.to(w.device), wt)
    tol = 1e-4 if w.dtype == torch.float32 or w.dtype == torch.float64 else 2e-2
    return torch.allclose(a, b, rtol=tol, atol=tol * float(a.abs().max().clamp_min(1)))


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def split_experts_(model: nn.Module) -> dict[str, nn.Module]:
    """Replace every fused experts module that SplitExperts reproduces by its split form, in place (on the meta
    device, a streamed skeleton's, by the layout alone: there are no weights to run). Returns {name: the fused
    module}, its parameters moved to the meta device (no memory), for `join_experts_`."""
    found = {}
    for name, mod in list(model.named_modules()):
        if name in found or any(name.startswith(f + ".") for f in found) or fused_layout(mod) is None:
            continue
        split = SplitExperts.from_fused(mod)
        if not mod.gate_up_proj.is_meta and not _same_forward(mod, split):
            continue
        _set(model, name, split)
        found[name] = mod.to("meta")
    return found


def join_experts_(model: nn.Module, fused: dict[str, nn.Module], keep_split: set[str] = frozenset()) -> list[str]:
    """Put each fused module of `split_experts_` back, with the split module's (dense) weights, except those in
    `keep_split`; returns the names joined."""
    joined = []
    for name, mod in fused.items():
        try:                # (a method that drops blocks renumbers them: the fused module of a block that is
            split = model.get_submodule(name)       # gone goes where that name now points, or nowhere)
        except AttributeError:
            continue
        if name in keep_split or not isinstance(split, SplitExperts):
            continue
        weights = split.fused_weights()
        mod.to_empty(device=weights["gate_up_proj"].device)
        with torch.no_grad():
            for p, w in weights.items():
                getattr(mod, p).copy_(w)
        _set(model, name, mod)
        joined.append(name)
    return joined
