"""Training-time structure: `structurize` swaps a model's linear layers for one layer type; `Cuttlefish` and
`Maestro` learn ranks during training, as callbacks for any plain PyTorch loop (and Lightning-style hooks).

>>> import torch
>>> from layerzip.training import structurize
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
>>> _ = structurize(model, "monarch", nblocks=8, exclude=r"^2$")     # keep the head dense
>>> type(model[0]).__name__, type(model[2]).__name__
('MonarchLinear', 'Linear')

Rank callbacks:

    cb = Cuttlefish(model, optimizer, check_every=100)        # or Maestro(model, optimizer, ...)
    for step, (x, y) in enumerate(loader):
        cb.on_step_begin()                                    # Maestro: sample the ordered-dropout truncation
        loss = F.cross_entropy(model(x), y) + cb.penalty()    # Maestro: hierarchical group lasso (0 for Cuttlefish)
        opt.zero_grad(); loss.backward(); opt.step()
        cb.on_step_end(step)                                  # may swap layers; the optimizer is updated in place

- Cuttlefish (Wang et al. 2023): track the stable rank sr(W) = ‖W‖²_F / ‖W‖²_2 of every selected Linear; once every
  layer's sr changes by less than `tol` (relative) between checks, switch each to LowRankLinear of rank
  r = ⌈sr_t · r_full / sr_0⌉ (SVD of the current weights), unless that would not save parameters.
- Maestro (Horváth et al. 2024): each layer becomes W = A B at full rank (SVD, ordered by σ). Each step one sampled
  layer runs with only its first ⌈p·r⌉ components (ordered dropout, p ~ U[p_min, 1]), which orders the components by
  importance; a hierarchical group lasso λ Σ_b ‖(A[:, b:], B[b:])‖ pushes the tail to zero; every `shrink_every` steps
  the components with ‖A[:, b]‖·‖B[b]‖ < tol · max are cut off the tail (progressive shrinking).
When a layer's parameters are replaced, the optimizer's param groups are edited in place (new tensors start with
fresh optimizer state; shared tensors such as the bias keep theirs).
Modules are chosen by `layerzip.models.select_modules` (include / exclude: a regex, a list of them or a callable).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from .models import select_modules, set_module
from .nn import FactorizedLayer, LowRankLinear, choose_shape, dense_weight_and_bias
from .registry import LAYERS


def _check_shape(keep: float | None, shape: dict) -> None:
    if keep is not None and shape:
        raise ValueError(f"give keep or shape arguments, not both (got keep={keep} and {shape})")
    if keep is not None and not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    for k, v in shape.items():
        ints = v if isinstance(v, (tuple, list)) else [v]
        if any(isinstance(i, int) and not isinstance(i, bool) and i < 1 for i in ints):
            raise ValueError(f"{k} must be positive integers, got {v}")


def structurize(model: nn.Module, layer: type[FactorizedLayer] | str, *, keep: float | None = None, include=None,
                exclude=None, from_dense: bool = True, **shape) -> nn.Module:
    """Replace (in place) every linear-like module selected by `include` / `exclude` (see
    `layerzip.models.select_modules`) by `layer` (a class or its registered name). Its shape is `shape` (e.g.
    `nblocks=8`) or, with `keep`, per module `choose_shape(layer, in, out, keep)` (≤ keep·in·out weights).
    `from_dense=True` projects the trained weights (`layer.from_dense`); False gives the layer's fresh init (bias
    kept as is). Returns the model."""
    cls = LAYERS[layer] if isinstance(layer, str) else layer
    _check_shape(keep, shape)
    for name, module in select_modules(model, include, exclude).items():
        W, b = dense_weight_and_bias(module)
        m, n = W.shape
        args = choose_shape(cls, n, m, keep) if keep is not None else shape
        if from_dense:
            new = cls.from_dense(W.detach(), None if b is None else b.detach(), **args)
        else:
            new = cls(n, m, bias=b is not None, dtype=W.dtype, device=W.device, **args)
            if b is not None:
                with torch.no_grad():
                    new.bias.copy_(b)
        set_module(model, name, new)
    return model


@torch.no_grad()
def stable_rank(W: torch.Tensor) -> float:
    """‖W‖²_F / ‖W‖²_2 = Σσ² / σ_max² (between 1 and rank(W))."""
    s = torch.linalg.svdvals(W.detach().double())
    return float((s * s).sum() / s[0].clamp_min(1e-300) ** 2)


def _swap_params(optimizer, old: nn.Module, new: nn.Module) -> None:
    """Replace old's parameters by new's in the optimizer's param groups (tensors they share stay put)."""
    if optimizer is None:
        return
    new_ps = list(new.parameters())
    gone = [p for p in old.parameters() if all(p is not q for q in new_ps)]
    added = [p for p in new_ps if all(p is not q for q in old.parameters())]
    gone_ids = {id(p) for p in gone}
    group = next((g for g in optimizer.param_groups if any(id(p) in gone_ids for p in g["params"])),
                 optimizer.param_groups[0])
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if id(p) not in gone_ids]
    group["params"].extend(added)
    for p in gone:
        optimizer.state.pop(p, None)


class _Hooks:
    """No-op defaults and Lightning-style adapters (`on_train_batch_start/end(trainer, pl_module, ...)`)."""

    def on_step_begin(self) -> None:
        pass

    def penalty(self) -> torch.Tensor | float:
        return 0.0

    def on_train_batch_start(self, trainer, pl_module, *args, **kwargs):
        self.on_step_begin()

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
        self.on_step_end(trainer.global_step, trainer.optimizers[0])


class Cuttlefish(_Hooks):
    def __init__(self, model: nn.Module, optimizer=None, check_every: int = 100, tol: float = 0.1,
                 include=None, exclude=None):
        self.model, self.optimizer, self.check_every, self.tol = model, optimizer, check_every, tol
        self.names = list(select_modules(model, include, exclude))
        self.sr0 = {n: stable_rank(dense_weight_and_bias(model.get_submodule(n))[0]) for n in self.names}
        self.history: list[dict] = []   # {"step", name: stable rank}
        self.ranks: dict[str, int | None] = {}   # chosen rank per layer (None: kept dense)
        self.switch_step: int | None = None

    def on_step_end(self, step: int, optimizer=None) -> bool:
        """Returns True when it switched the model to low rank at this step."""
        if self.switch_step is not None or (step + 1) % self.check_every:
            return False
        sr = {n: stable_rank(dense_weight_and_bias(self.model.get_submodule(n))[0]) for n in self.names}
        self.history.append({"step": step + 1, **sr})
        if len(self.history) < 2:
            return False
        prev = self.history[-2]
        if any(abs(sr[n] - prev[n]) > self.tol * prev[n] for n in self.names):
            return False
        self.switch(sr, optimizer or self.optimizer)
        self.switch_step = step + 1
        return True

    @torch.no_grad()
    def switch(self, sr: dict, optimizer=None) -> None:
        for n in self.names:
            old = self.model.get_submodule(n)
            W, b = dense_weight_and_bias(old)
            m, k = W.shape
            r = min(min(m, k), math.ceil(sr[n] * min(m, k) / self.sr0[n]))
            if r * (m + k) >= m * k:            # low rank would not be smaller: stay dense
                self.ranks[n] = None
                continue
            new = LowRankLinear.from_dense(W, None, rank=r)
            new.bias = b if isinstance(b, nn.Parameter) else (None if b is None else nn.Parameter(b.detach().clone()))
            _swap_params(optimizer, old, new)
            set_module(self.model, n, new)
            self.ranks[n] = r


class OrderedLowRankLinear(LowRankLinear):
    """LowRankLinear whose forward can use only its first `active` components (ordered dropout, training only).
    Saves and loads as a plain "lowrank" layer: at full width its forward is LowRankLinear's."""

    active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.active
        if k is None or k >= self.rank or not self.training:
            return super().forward(x)
        return F.linear(F.linear(x, self.B[:k]), self.A[:, :k], self.bias)

    def importance(self) -> torch.Tensor:
        return self.A.detach().norm(dim=0) * self.B.detach().norm(dim=1)

    def group_norms(self) -> torch.Tensor:
        """‖(A[:, b:], B[b:])‖_F for every b: the nested groups of the hierarchical lasso."""
        c = self.A.pow(2).sum(0) + self.B.pow(2).sum(1)
        return c.flip(0).cumsum(0).flip(0).clamp_min(1e-30).sqrt()

    @torch.no_grad()
    def truncated(self, k: int) -> "OrderedLowRankLinear":
        new = OrderedLowRankLinear.from_factors(self.A[:, :k], self.B[:k], None)
        new.bias = self.bias
        return new


class Maestro(_Hooks):
    def __init__(self, model: nn.Module, optimizer=None, p_min: float = 0.25, lasso: float = 1e-4,
                 shrink_every: int = 100, tol: float = 0.05, include=None, exclude=None, seed: int = 0):
        self.model, self.optimizer, self.p_min, self.lasso = model, optimizer, p_min, lasso
        self.shrink_every, self.tol, self.rng = shrink_every, tol, random.Random(seed)
        self.names = list(select_modules(model, include, exclude))
        with torch.no_grad():
            for n in self.names:
                old = model.get_submodule(n)
                W, b = dense_weight_and_bias(old)
                new = OrderedLowRankLinear.from_dense(W, None)
                new.bias = b if isinstance(b, nn.Parameter) else (None if b is None else nn.Parameter(b.clone()))
                _swap_params(optimizer, old, new)
                set_module(model, n, new)
        self.history: list[dict] = [{"step": 0, **self.ranks}]

    @property
    def ranks(self) -> dict[str, int]:
        return {n: self.model.get_submodule(n).rank for n in self.names}

    def on_step_begin(self) -> None:
        for n in self.names:
            self.model.get_submodule(n).active = None
        layer = self.model.get_submodule(self.rng.choice(self.names))
        layer.active = math.ceil(self.rng.uniform(self.p_min, 1.0) * layer.rank)

    def penalty(self) -> torch.Tensor:
        return self.lasso * sum(self.model.get_submodule(n).group_norms().sum() for n in self.names)

    def on_step_end(self, step: int, optimizer=None) -> bool:
        """Cut negligible tail components every `shrink_every` steps; True if any layer shrank."""
        if (step + 1) % self.shrink_every:
            return False
        changed = False
        for n in self.names:
            layer = self.model.get_submodule(n)
            imp = layer.importance()
            k = int((imp >= self.tol * imp.max()).nonzero().max()) + 1   # keep up to the last important one
            if k < layer.rank:
                new = layer.truncated(k)
                _swap_params(optimizer or self.optimizer, layer, new)
                set_module(self.model, n, new)
                changed = True
        for n in self.names:
            self.model.get_submodule(n).active = None
        self.history.append({"step": step + 1, **self.ranks})
        return changed
