"""MoEFFN: a dense feed-forward block split into experts that a router picks per token (MoEfication).

    dense:  y = W_d · σ(W_g x) ⊙ (W_u x) + b            (GLU: Gemma's GeGLU, Llama / Qwen SwiGLU)
            y = W_d · σ(W_u x + b_u) + b                 (two-layer MLP: GPT-2's c_fc / c_proj)
    MoE:    y = Σ_{e ∈ top-k(R x + r)} W_d[:, S_e] · h_{S_e}(x) + b

The I intermediate neurons are split into E equal groups S_e (`perm` lists them expert by expert); expert e holds the
rows of W_g, W_u in S_e (`w_in[e]`: gate rows then up rows) and the columns of W_d in S_e (`w_out[e]`, stored
transposed). The forward is sparse: tokens are grouped by expert (argsort of the routing), each expert runs only on
its own tokens (index_select), and its output is added back in place (index_add_). With k = E it computes the dense
FFN (up to the order of the sums); `to_dense()` undoes the permutation and gives the original FFN's weights bit for
bit, as a `DenseFFN` whose parameters carry the original names and layout, so a merged model saves as the plain
architecture.

While the router trains (healing), each expert's output is scaled by p_e / stop_grad(p_e) (p: the router's
softmax): 1 in value, so the forward is unchanged, with the gradient of log p_e, so distillation reaches the router.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayerzipError
from .base import FactorizedLayer, is_conv1d, is_linear_like, register_layer

# the projections of an FFN module, by the names transformers gives them: GLU (gate, up, down), MLP (up, down)
GLU_NAMES = (("gate_proj", "up_proj", "down_proj"),)
MLP_NAMES = (("c_fc", "c_proj"), ("fc1", "fc2"), ("fc_in", "fc_out"), ("dense_h_to_4h", "dense_4h_to_h"))
_PASSIVE = (nn.Dropout, nn.Identity)


def activation(name: str) -> nn.Module:
    """transformers' activation module of that name (ACT2FN)."""
    from transformers.activations import ACT2FN
    if name not in ACT2FN:
        raise LayerzipError(f"unknown activation {name!r}; the directory is damaged or needs a newer transformers")
    return ACT2FN[name]


def activation_name(module: nn.Module) -> str | None:
    """The ACT2FN name under which transformers builds `module` (same class, same values), or None."""
    from transformers.activations import ACT2CLS, ACT2FN
    probe = torch.linspace(-8, 8, 161)
    for name, cls in ACT2CLS.items():
        if (cls[0] if isinstance(cls, tuple) else cls) is type(module):       # built only when the class matches
            if torch.allclose(ACT2FN[name](probe), module(probe), atol=1e-6):
                return name
    return None


def ffn_layout(module: nn.Module) -> tuple[tuple[str, ...], str] | None:
    """(projection names, activation attribute) when `module` is exactly an FFN: the named projections, one
    activation module and nothing else with weights (dropout allowed); else None."""
    children = dict(module.named_children())
    for names in GLU_NAMES + MLP_NAMES:
        if not all(is_linear_like(children.get(n)) for n in names):
            continue
        rest = {n: c for n, c in children.items() if n not in names and not isinstance(c, _PASSIVE)}
        if len(rest) == 1 and not any(True for _ in next(iter(rest.values())).parameters()):
            return names, next(iter(rest))
    return None


def _weight(layer: nn.Module) -> torch.Tensor:
    """out × in, whatever the storage (Conv1D holds in × out)."""
    return layer.weight.t() if is_conv1d(layer) else layer.weight


class DenseFFN(nn.Module):
    """A dense FFN under its original projection names (nn.Linear or GPT-2 Conv1D) and activation: what an MoEFFN
    merges back into, and the canonical view of a model's FFN that MoEfication reads (`adopt`)."""

    def __init__(self, names: tuple[str, ...], act: str, layers: list[nn.Module]):
        super().__init__()
        self.names, self.glu, self.act_name = tuple(names), len(names) == 3, act
        for n, layer in zip(names, layers):
            setattr(self, n, layer)
        self.act = activation(act)

    @classmethod
    def adopt(cls, module: nn.Module) -> "DenseFFN | None":
        """The same FFN (sharing `module`'s layers), or None when `module` is not one of the known layouts."""
        layout = ffn_layout(module)
        if layout is None:
            return None
        names, act_attr = layout
        act = activation_name(getattr(module, act_attr))
        return None if act is None else cls(names, act, [getattr(module, n) for n in names])

    @property
    def layers(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.glu:
            gate, up, down = self.layers
            return down(self.act(gate(x)) * up(x))
        up, down = self.layers
        return down(self.act(up(x)))

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """h(x), the I intermediate activations that W_d reads."""
        if self.glu:
            gate, up, _ = self.layers
            return self.act(gate(x)) * up(x)
        return self.act(self.layers[0](x))

    def weights(self) -> dict:
        """{"in": [(W out×in, bias), ...] (gate then up, or up), "out": (W_down, bias)} as stored (no copies)."""
        *ins, down = self.layers
        return {"in": [(_weight(m), m.bias) for m in ins], "out": (_weight(down), down.bias)}


@register_layer("moe")
class MoEFFN(FactorizedLayer):
    """An FFN of `intermediate` neurons in `experts` equal experts, `active` of them run per token (top-k of a
    linear router on the FFN input). in_features = out_features = the model width.

    >>> import torch
    >>> from torch import nn
    >>> class MLP(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gate_proj, self.up_proj = nn.Linear(8, 12, bias=False), nn.Linear(8, 12, bias=False)
    ...         self.down_proj, self.act_fn = nn.Linear(12, 8, bias=False), nn.SiLU()
    >>> dense = DenseFFN.adopt(MLP())
    >>> moe = MoEFFN.from_dense_ffn(dense, torch.arange(12) % 4, active=4)      # 4 experts of 3 neurons, all run
    >>> x = torch.randn(5, 8)
    >>> bool(torch.allclose(moe(x), dense(x), atol=1e-6)), moe.spec()["act"] in ("silu", "swish")
    (True, True)
    >>> all(torch.equal(a.weight, b.weight) for a, b in zip(moe.to_dense().layers, dense.layers))
    True
    """

    sparse = True        # its FLOPs follow the routing (`flops`), not its weight count

    def __init__(self, hidden: int, intermediate: int, experts: int, active: int, act: str, glu: bool = True,
                 names: tuple[str, ...] = GLU_NAMES[0], in_bias: bool = False, bias: bool = False,
                 conv1d: bool = False, device=None, dtype=None):
        super().__init__()
        if experts < 1 or intermediate % experts:
            raise ValueError(f"{intermediate} neurons do not split into {experts} equal experts")
        if not 1 <= active <= experts:
            raise ValueError(f"active must be in [1, {experts}], got {active}")
        if len(names) != (3 if glu else 2):
            raise ValueError(f"names {names} do not fit glu={glu}")
        self.in_features = self.out_features = hidden
        self.intermediate, self.experts, self.active = intermediate, experts, active
        self.act_name, self.glu, self.names, self.conv1d = act, glu, tuple(names), conv1d
        m, kw = intermediate // experts, {"device": device, "dtype": dtype}
        width = 2 * m if glu else m
        self.w_in = nn.Parameter(torch.zeros(experts, width, hidden, **kw))      # expert e: its gate rows, up rows
        self.b_in = nn.Parameter(torch.zeros(experts, width, **kw)) if in_bias else None
        self.w_out = nn.Parameter(torch.zeros(experts, m, hidden, **kw))         # W_d[:, S_e]ᵀ
        self.bias = nn.Parameter(torch.zeros(hidden, **kw)) if bias else None
        self.router_weight = nn.Parameter(torch.zeros(experts, hidden, **kw))
        self.router_bias = nn.Parameter(torch.zeros(experts, **kw))
        self.register_buffer("perm", torch.arange(intermediate, device=device))  # original neuron of each slot
        self.act = activation(act)

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    @torch.no_grad()
    def from_dense_ffn(cls, dense: DenseFFN, labels: torch.Tensor, active: int,
                       router: tuple[torch.Tensor, torch.Tensor] | None = None) -> "MoEFFN":
        """Expert e = the neurons with labels == e (every expert the same size); `router`: (weight E×H, bias E)."""
        w = dense.weights()
        (Wd, bd), ins = w["out"], w["in"]
        I, H = Wd.shape[1], Wd.shape[0]
        experts = int(labels.max()) + 1
        counts = torch.bincount(labels, minlength=experts)
        if labels.numel() != I or not (counts == counts[0]).all():
            raise ValueError(f"labels must split the {I} neurons into equal experts, got sizes {counts.tolist()}")
        m = I // experts
        perm = torch.argsort(labels, stable=True).to(Wd.device)
        moe = cls(H, I, experts, active, dense.act_name, dense.glu, dense.names, any(b is not None for _, b in ins),
                  bd is not None, is_conv1d(dense.layers[0]), device=Wd.device, dtype=Wd.dtype)
        moe.w_in.copy_(torch.cat([W[perm].reshape(experts, m, H) for W, _ in ins], 1))
        if moe.b_in is not None:
            moe.b_in.copy_(torch.cat([(torch.zeros(I, dtype=Wd.dtype, device=Wd.device) if b is None else b)[perm]
                                      .reshape(experts, m) for _, b in ins], 1))
        moe.w_out.copy_(Wd.t()[perm].reshape(experts, m, H))
        if bd is not None:
            moe.bias.copy_(bd)
        moe.perm.copy_(perm)
        if router is not None:
            moe.set_router(*router)
        return moe

    @torch.no_grad()
    def set_router(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.router_weight.copy_(weight)
        self.router_bias.copy_(bias)

    # ------------------------------------------------------------------------------------------------ forward
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits, tokens × experts."""
        return F.linear(x, self.router_weight, self.router_bias)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's share of the output on rows x (no output bias)."""
        h = F.linear(x, self.w_in[e], None if self.b_in is None else self.b_in[e])
        if self.glu:
            g, u = h.chunk(2, dim=-1)
            h = self.act(g) * u
        else:
            h = self.act(h)
        return h @ self.w_out[e]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        y = torch.zeros_like(x)
        if self.active == self.experts:            # every expert on every token: the dense FFN, no routing
            for e in range(self.experts):
                y += self.expert(e, x)
        else:
            logits = self.route(x)
            top = logits.topk(self.active, dim=-1).indices.reshape(-1)    # token t's choices at t·k … t·k+k−1
            order = torch.argsort(top, stable=True)
            tokens = (order // self.active).split(torch.bincount(top, minlength=self.experts).tolist())
            train = torch.is_grad_enabled() and self.router_weight.requires_grad
            p = logits.softmax(-1) if train else None
            for e, idx in enumerate(tokens):
                if idx.numel():
                    out = self.expert(e, x.index_select(0, idx))
                    if train:                      # value 1, gradient of log p: the router learns from the loss
                        w = p[idx, e, None]
                        out = out * (w / w.detach())
                    y.index_add_(0, idx, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(shape)

    # --------------------------------------------------------------------------------------------- accounting
    def flops(self) -> int:
        """Per token: the k active experts (2 or 3 projections of m neurons) and the router."""
        m = self.intermediate // self.experts
        return 2 * self.active * m * self.in_features * (3 if self.glu else 2) + 2 * self.in_features * self.experts

    def dense_flops(self) -> int:
        return 2 * self.intermediate * self.in_features * (3 if self.glu else 2)

    @staticmethod
    def num_params(in_features: int, out_features: int, intermediate: int = 0, experts: int = 1, glu: bool = True,
                   **_) -> int:
        """Weights of the projections (all experts) and the router; biases excluded."""
        return (3 if glu else 2) * intermediate * in_features + experts * in_features

    def dense_weight(self) -> torch.Tensor:
        raise LayerzipError("an MoE FFN is two projections with an activation between, not one matrix; "
                            "lz.merge_ turns it back into its dense FFN")

    # ------------------------------------------------------------------------------------------------ merge
    @torch.no_grad()
    def to_dense(self) -> DenseFFN:
        """The original FFN, weights back in their original neuron order (bit for bit)."""
        from transformers.pytorch_utils import Conv1D
        I, H, m = self.intermediate, self.in_features, self.intermediate // self.experts
        parts = self.w_in.detach().split(m, dim=1)
        bparts = self.b_in.detach().split(m, dim=1) if self.b_in is not None else [None] * len(parts)
        kw = {"device": self.w_in.device, "dtype": self.w_in.dtype}

        def layer(W, b):                  # W: out × in, rows/columns in the original order
            if self.conv1d:
                lin = Conv1D(W.shape[0], W.shape[1]).to(**kw)
                lin.weight.copy_(W.t())
                lin.bias.copy_(torch.zeros(W.shape[0], **kw) if b is None else b)
                return lin
            lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, **kw)
            lin.weight.copy_(W)
            if b is not None:
                lin.bias.copy_(b)
            return lin

        layers = []
        for P, bp in zip(parts, bparts):
            W = torch.empty(I, H, **kw)
            W[self.perm] = P.reshape(I, H)
            b = None
            if bp is not None:
                b = torch.empty(I, **kw)
                b[self.perm] = bp.reshape(I)
            layers.append(layer(W, b))
        Wd = torch.empty(I, H, **kw)
        Wd[self.perm] = self.w_out.detach().reshape(I, H)
        layers.append(layer(Wd.t(), None if self.bias is None else self.bias.detach()))
        return DenseFFN(self.names, self.act_name, layers)

    # ----------------------------------------------------------------------------------------- serialization
    def spec(self) -> dict:
        return {"type": self.layer_type, "in": self.in_features, "out": self.out_features,
                "intermediate": self.intermediate, "experts": self.experts, "active": self.active,
                "act": self.act_name, "glu": self.glu, "names": list(self.names), "in_bias": self.b_in is not None,
                "bias": self.bias is not None, "conv1d": self.conv1d}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "MoEFFN":
        if spec["in"] != spec["out"]:
            raise ValueError("an MoE FFN maps the model width to itself (in == out)")
        return cls(spec["in"], spec["intermediate"], spec["experts"], spec["active"], spec["act"], spec["glu"],
                   tuple(spec["names"]), spec["in_bias"], spec["bias"], spec["conv1d"], device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"hidden={self.in_features}, intermediate={self.intermediate}, experts={self.experts}, "
                f"active={self.active}, act={self.act_name}, glu={self.glu}")
