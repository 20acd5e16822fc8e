"""`--method moe --experts E --active k`: MoEfication — each dense FFN of the blocks becomes E experts and a router.

    calibration -> each FFN's input rows X (block by block, the block driver's walk) -> activations h(X) (tokens × I)
    -> experts: balanced k-means of the I neurons on their co-activation patterns (|h_i| ‖W_d[:, i]‖ over tokens),
       E clusters of I/E neurons each (Zhang et al., MoEfication, 2022)
    -> router: a linear layer on X fitted to each token's expert mass m_e = Σ_{i∈S_e} |h_i| ‖W_d[:, i]‖ (how much of
       the output the expert carries): soft cross-entropy against m / Σm, Adam, a few hundred steps
    -> MoEFFN (nn/moe.py) in place of the FFN: top-k experts per token, a sparse forward

GLU FFNs (Gemma GeGLU, Llama / Qwen SwiGLU: gate_proj, up_proj, down_proj) split gate, up and down consistently;
two-layer MLPs held in one module (GPT-2's c_fc / c_proj) too. FFNs split across modules (BERT's intermediate /
output, with the residual and LayerNorm inside) are refused. Every weight is kept: MoE cuts the FLOPs each token
runs (about k/E of the FFN's, plus the router's), not the parameters, so `--keep` does not apply, and low rank
inside the experts is not offered (refused in one line). `lz.merge_` gives the original FFN back, bit for bit.
`--include` / `--exclude` select FFN modules by name (e.g. `model.layers.3.mlp`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayerzipError
from ..models import find_blocks, select_modules, set_module, token_rows
from ..nn import DenseFFN, MoEFFN
from .base import CompressConfig, option, register_method


# ------------------------------------------------------------------------------------------------- the math
def coactivation_features(h: torch.Tensor, out_norm: torch.Tensor | None = None) -> torch.Tensor:
    """neurons × tokens: neuron i's output magnitude |h_i| ‖W_d[:, i]‖ on each token. k-means on these puts neurons
    that fire on the same tokens together, the loud ones weighing most (on Gemma-3-270M this left 20–50% less
    output error at 2 of 8 experts than unit-normalised patterns)."""
    f = h.abs().float() * (1.0 if out_norm is None else out_norm.float())
    return f.t().contiguous()


def _balanced_assign(D: torch.Tensor, cap: int) -> torch.Tensor:
    """Each row to its nearest cluster that still has room (`cap` per cluster); the rows that lose most by not
    getting their first choice (largest gap to the second) choose first."""
    gap = (D.topk(2, dim=1, largest=False).values.diff(dim=1).squeeze(1) if D.shape[1] > 1
           else torch.zeros(D.shape[0]))
    prefs = D.argsort(dim=1).tolist()
    room = [cap] * D.shape[1]
    labels = [0] * D.shape[0]
    for i in gap.argsort(descending=True).tolist():
        c = next(c for c in prefs[i] if room[c])
        room[c] -= 1
        labels[i] = c
    return torch.tensor(labels)


def balanced_kmeans(X: torch.Tensor, k: int, iters: int = 30, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """Labels splitting the rows of X (n × d, n a multiple of k) into k clusters of exactly n/k rows: k-means++
    seeding, then Lloyd's iterations whose assignment step is `_balanced_assign` (until no label changes).

    >>> X = torch.cat([torch.randn(6, 2) + 10, torch.randn(6, 2) - 10])
    >>> labels = balanced_kmeans(X, 2, generator=torch.Generator().manual_seed(0))
    >>> torch.bincount(labels).tolist(), len(set(labels[:6].tolist())), len(set(labels[6:].tolist()))
    ([6, 6], 1, 1)
    """
    n = X.shape[0]
    assert n % k == 0, f"{n} rows do not split into {k} equal clusters"
    X = X.float().contiguous()
    sq = X.square().sum(1)

    def dist2(C):                                   # ‖x − c‖², by one matmul
        return (sq[:, None] - 2 * X @ C.t() + C.square().sum(1)).clamp_min(0)
    C = X[torch.randint(n, (1,), generator=generator)]
    for _ in range(k - 1):                          # k-means++: next centre drawn ∝ squared distance
        C = torch.cat([C, X[torch.multinomial(dist2(C).min(dim=1).values + 1e-12, 1, generator=generator)]])
    labels = None
    for _ in range(iters):
        new = _balanced_assign(dist2(C), n // k)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        C = torch.zeros_like(C).index_add_(0, labels, X) / (n // k)
    return labels


def expert_mass(h: torch.Tensor, out_norm: torch.Tensor, labels: torch.Tensor, experts: int) -> torch.Tensor:
    """tokens × experts: m_e = Σ_{i ∈ S_e} |h_i| ‖W_d[:, i]‖, a bound on the norm of expert e's output share."""
    return (h.abs().float() * out_norm.to(h.device)) @ F.one_hot(labels, experts).float().to(h.device)


def topk_recall(logits: torch.Tensor, mass: torch.Tensor, k: int) -> float:
    """Share of the best possible top-k expert mass that the router's top-k experts hold (1: it picks the best)."""
    got = mass.gather(1, logits.topk(k, dim=1).indices).sum()
    return (got / mass.topk(k, dim=1).values.sum().clamp_min(1e-30)).item()


def fit_router(X: torch.Tensor, mass: torch.Tensor, steps: int = 300, lr: float = 3e-3, batch: int = 512,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(weight E×H, bias E, losses) of the linear router: minimise the cross-entropy between softmax(W x + b) and
    the tokens' mass distribution m / Σm (Adam, cosine-decayed `lr`, minibatches of `batch` rows). Inputs are
    standardised while training and the scaling folded into W and b afterwards."""
    X, P = X.float(), mass / mass.sum(1, keepdim=True).clamp_min(1e-30)
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    Z = (X - mu) / sd
    router = nn.Linear(X.shape[1], P.shape[1])
    nn.init.zeros_(router.weight)
    nn.init.zeros_(router.bias)
    opt = torch.optim.Adam(router.parameters(), lr=lr, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(X.shape[0], (min(batch, X.shape[0]),), generator=generator)
            loss = -(P[idx] * F.log_softmax(router(Z[idx]), dim=-1)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    with torch.no_grad():
        W = router.weight / sd
        return W, router.bias - W @ mu, losses


def moefy(dense: DenseFFN, X: torch.Tensor, experts: int, active: int, router_steps: int = 300,
          cluster_tokens: int = 4096, generator: torch.Generator | None = None) -> tuple[MoEFFN, dict]:
    """An MoEFFN of `dense` from its input rows X (tokens × H), and what its fit measured: the router's training
    loss, and on held-out rows (every 10th) its top-k mass recall and the output error at `active`."""
    w = dense.weights()
    dtype = w["out"][0].dtype
    held = torch.arange(X.shape[0]) % 10 == 0
    if held.all() or not held.any():
        held = torch.zeros(X.shape[0], dtype=torch.bool)
    train, test = X[~held], X[held]
    out_norm = w["out"][0].float().norm(dim=0)
    pick = torch.randperm(train.shape[0], generator=generator)[:cluster_tokens]
    h = dense.intermediate(train[pick].to(dtype)).float()
    # activations on the FFN's device; clustering and the router's fit (small) on the CPU
    labels = balanced_kmeans(coactivation_features(h, out_norm).cpu(), experts, generator=generator)

    def mass(rows):
        return torch.cat([expert_mass(dense.intermediate(c.to(dtype)), out_norm, labels, experts).cpu()
                          for c in rows.split(4096)]) if rows.shape[0] else torch.zeros(0, experts)
    W, b, losses = fit_router(train.cpu(), mass(train), router_steps, generator=generator)
    moe = MoEFFN.from_dense_ffn(dense, labels, active, (W, b))
    k = max(1, min(5, len(losses) // 10))
    info = {"router_loss_first": sum(losses[:k]) / k, "router_loss_last": sum(losses[-k:]) / k,
            "expert_size": labels.numel() // experts, "tokens": X.shape[0]}
    if test.shape[0]:
        t = test.to(dtype)
        ref = dense(t).float()
        info.update(topk_recall=topk_recall(moe.route(t).float().cpu(), mass(test), active),
                    output_nmse=((moe(t).float() - ref).square().sum() / ref.square().sum().clamp_min(1e-30)).item())
    return moe, info


# ------------------------------------------------------------------------------------------------ the method
@register_method("moe")
@dataclass
class MoE(CompressConfig):
    """Every FFN of the blocks split into `experts` experts, `active` run per token (top-k of a fitted linear
    router). Keeps every weight: the saving is FLOPs per token (≈ active/experts of the FFN's).

    >>> import layerzip as lz
    >>> report = lz.compress_(model, lz.MoE(experts=8, active=2), calib=batches)   # doctest: +SKIP
    >>> report["ffn_flops_fraction"]                                               # doctest: +SKIP
    0.2504
    """
    keep: float = option(1.0, "fraction of the targeted modules' parameters kept, in (0, 1]")
    experts: int = option(8, "moe: experts per FFN (its intermediate neurons split into equal groups)")
    active: int = option(2, "moe: experts each token runs (the router's top-k)")
    router_steps: int = option(300, "moe: optimizer steps fitting each FFN's router")
    cluster_tokens: int = option(4096, "moe: calibration tokens whose activations cluster the neurons")
    then: str | None = option(None, "drop-blocks: low-rank method for the remaining blocks (or --method "
                                    "drop-blocks+METHOD)")
    uses_stats: ClassVar[bool] = True
    sequential_ok: ClassVar[bool] = False
    correct_ok: ClassVar[bool] = False
    stream_ok: ClassVar[bool] = False        # the FFN inputs of a block are kept while its experts are fitted
    objectives: ClassVar[tuple] = ("params",)

    def __post_init__(self):
        super().__post_init__()
        if self.then:
            raise LayerzipError(f"--method moe+{self.then}: low rank inside the experts is not supported; run "
                                "--method moe alone (it keeps every weight and cuts the FLOPs per token)")
        if self.keep != 1:
            raise LayerzipError(f"--method moe keeps every weight (it cuts FLOPs per token: --active of --experts "
                                f"run), so --keep {self.keep} does not apply; drop --keep")
        if self.alloc != "uniform":
            raise LayerzipError("--method moe has no ranks to allocate; drop --alloc")
        for name, low in (("experts", 2), ("router_steps", 1), ("cluster_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise LayerzipError(f"--{name.replace('_', '-')} must be a whole number ≥ {low}, got {v}")
        if isinstance(self.active, bool) or not isinstance(self.active, int) or not 1 <= self.active <= self.experts:
            raise LayerzipError(f"--active must be a whole number from 1 to --experts ({self.experts}), got "
                                f"{self.active}")

    @property
    def label(self) -> str:
        return f"moe-{self.experts}e{self.active}"

    def targets_of(self, model: nn.Module) -> dict[str, nn.Module]:
        """The FFN modules inside the repeated blocks (dense, or already MoEFFN) that `include`/`exclude` select."""
        found = find_blocks(model)
        prefix = found[0] + "." if found else "\0"
        ffns = select_modules(model, self.include, self.exclude,
                              kind=lambda m: isinstance(m, MoEFFN) or DenseFFN.adopt(m) is not None)
        ffns = {n: m for n, m in ffns.items() if n.startswith(prefix)}
        if not ffns:
            raise LayerzipError(f"method moe found no feed-forward module in the blocks of {type(model).__name__}"
                                f"{' matching --include/--exclude' if self.include or self.exclude else ''}: it "
                                "splits GLU FFNs (gate_proj/up_proj/down_proj) and one-module MLPs (c_fc/c_proj, "
                                "fc1/fc2), not FFNs split across modules such as BERT's")
        return ffns

    def restructure_(self, model: nn.Module, calib: list[dict] | None, progress: bool = True) -> dict:
        """Walk the blocks; at each, capture its FFN's input rows and replace the FFN by its MoEFFN."""
        from ..driver import BlockDriver      # the walk every calibrated method runs (a layer above methods)
        dense = {n: DenseFFN.adopt(m) for n, m in self.targets_of(model).items() if not isinstance(m, MoEFFN)}
        if not dense:
            raise LayerzipError("every FFN selected is already a mixture of experts; give the original model")
        for n, d in dense.items():
            I = d.weights()["out"][0].shape[1]
            if I % self.experts:
                raise LayerzipError(f"{n} has {I} intermediate neurons, which do not split into --experts "
                                    f"{self.experts} equal experts; choose a divisor of {I}")
        firsts = {f"{n}.{d.names[0]}": n for n, d in dense.items()}   # the projection reading the FFN input
        rows: dict[str, list] = {}
        hooks: dict[str, object] = {}
        driver = BlockDriver(model, calib or [], progress, desc="moe")
        gen = torch.Generator().manual_seed(int(torch.randint(2**31, (1,))))   # follows the run's seed

        def capture(name):
            def hook(module, args):
                got = rows.setdefault(name, [])
                got.append(token_rows(args[0], driver.masks[len(got)]).detach())
            return hook

        def listen(event):
            if event.kind == "block_started":
                for full in event.names:
                    hooks[full] = model.get_submodule(full).register_forward_pre_hook(capture(full))
        driver.listeners.append(listen)
        specs, info = {}, {}

        def build(names, stats):
            for full in names:
                hooks.pop(full).remove()
                X = torch.cat(rows.pop(full))
                name = firsts[full]
                ffn = model.get_submodule(name)
                probe = X[:16]
                ref = ffn(probe)
                if not torch.allclose(dense[name](probe), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item()):
                    raise LayerzipError(f"{name} ({type(ffn).__name__}) does not compute down(act(gate x)·up x) "
                                        "or down(act(up x)), so moe cannot split it; leave it out with --exclude")
                moe, info[name] = moefy(dense[name], X, self.experts, self.active, self.router_steps,
                                        self.cluster_tokens, gen)
                set_module(model, name, moe)
                specs[name] = moe.spec()
        try:
            driver.walk({f: model.get_submodule(f) for f in firsts}, build)
        finally:
            for h in hooks.values():
                h.remove()
        moes = [model.get_submodule(n) for n in specs]
        return {"modules": specs, "ranks": {}, "experts": self.experts, "active": self.active,
                "ffn_flops_fraction": sum(m.flops() for m in moes) / sum(m.dense_flops() for m in moes),
                "moe_layers": info}

    def module_config(self, left_params: int, target_params: int) -> None:
        return None
