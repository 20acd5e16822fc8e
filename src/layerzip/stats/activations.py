"""Activation statistics of module inputs, streamed: a float64 Gram XᵀX, Σ|x| per feature, the token count.

Modules that read the very same input tensor (q/k/v, gate/up) share one ModuleStats, so each Gram is built once,
and its square-root factor (`whitening`) is computed once for all of them.

Whitening: with G = XᵀX, a factor L with G = L Lᵀ (Cholesky). A Gram that is singular or numerically indefinite
(dead features, fewer tokens than features, float error) gets the smallest diagonal jitter that makes Cholesky
succeed; if none up to 1e-2·mean(diag) does, an eigendecomposition G = QΛQᵀ gives L = QΛ^½ instead. `whiten` says
which happened, never raises.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar
from functools import cached_property

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LayerzipError
from ..models import backbone, linear_shape, token_rows


def positive_floor(v: torch.Tensor) -> torch.Tensor:
    """v with every entry ≤ 0 replaced by the smallest positive entry (1 if there is none): scales of dead features
    or rows that must stay invertible.

    >>> positive_floor(torch.tensor([0.0, 2.0, 0.5])).tolist()
    [0.5, 2.0, 0.5]
    """
    live = v[v > 0]
    return torch.where(v > 0, v, live.min() if live.numel() else torch.ones((), dtype=v.dtype, device=v.device))


@dataclass
class Whitening:
    L: torch.Tensor            # n×n with G(+jitter) = L Lᵀ
    triangular: bool           # lower-triangular Cholesky factor, else the eigen square root Q Λ^½
    jitter: float = 0.0        # added to the diagonal of G (absolute)
    eig: tuple | None = None   # (Q, sqrt Λ) when not triangular
    scale: float = 1.0         # mean |diagonal| of G: the jitter's relative size is jitter / scale

    def right_solve(self, M: torch.Tensor) -> torch.Tensor:
        """M L⁻¹ without forming the inverse."""
        if self.triangular:
            return torch.linalg.solve_triangular(self.L, M, upper=False, left=False)
        Q, sqrt_lam = self.eig
        return (M / sqrt_lam) @ Q.T      # (Q Λ^½)⁻¹ = Λ^-½ Qᵀ


@torch.no_grad()
def whiten(G: torch.Tensor) -> Whitening:
    """A square-root factor of the Gram, robust to singular / indefinite G (see module doc). Reads G's lower
    triangle (as Cholesky and eigh do), so it is not symmetrized; one n×n factor is allocated, jittered tries
    reuse it."""
    n = G.shape[0]
    scale = G.diagonal().abs().mean().item()
    if not scale > 0:                   # no signal at all: whitening degenerates to plain SVD
        return Whitening(torch.eye(n, dtype=G.dtype, device=G.device), True, 1.0)
    L = torch.empty_like(G)               # each try factors a (jittered) copy of G in place: G + one n×n at most
    info = torch.empty((), dtype=torch.int32, device=G.device)
    for jitter in [0.0] + [scale * 10.0 ** k for k in range(-12, -1)]:
        L.copy_(G)
        L.diagonal().add_(jitter)
        torch.linalg.cholesky_ex(L, out=(L, info))
        if info.item() == 0 and torch.isfinite(L).all():
            return Whitening(L.tril_(), True, jitter, scale=scale)
    del L
    lam, Q = torch.linalg.eigh(G)
    lam = lam.clamp_min(lam.max() * n * torch.finfo(G.dtype).eps)
    return Whitening(Q * lam.sqrt(), False, 0.0, (Q, lam.sqrt()), scale)


@dataclass
class ModuleStats:
    """Streaming statistics of one module input: Gram XᵀX (float64), Σ|x| per feature, the token count.
    `keep_gram=False`: the Gram is freed once its whitening is computed (for methods that read only L).

    Only the Gram's lower triangle is accumulated, by column blocks (about half of XᵀX's products for a wide
    input); the upper triangle is mirrored from it when `gram` is next read."""
    CHUNK: ClassVar[int] = 1024       # rows made float64 at a time
    BLOCK: ClassVar[int] = 1024       # Gram columns per product of the lower-triangle accumulation
    n: int
    _gram: torch.Tensor | None = field(init=False, repr=False)
    abs_sum: torch.Tensor = field(init=False)
    tokens: int = 0
    keep_gram: bool = True

    def __post_init__(self):
        self._gram = torch.zeros(self.n, self.n, dtype=torch.float64)
        self._mirrored = True
        self.abs_sum = torch.zeros(self.n, dtype=torch.float64)

    @property
    def gram(self) -> torch.Tensor | None:
        if not self._mirrored:
            B, G = self.BLOCK, self._gram
            for j in range(0, self.n, B):              # block by block: no n×n temporary
                G[j:j + B, j + B:] = G[j + B:, j:j + B].T
                d = G[j:j + B, j:j + B]
                d.copy_(d.tril() + d.tril(-1).T)
            self._mirrored = True
        return self._gram

    @gram.setter
    def gram(self, value: torch.Tensor | None) -> None:
        self._gram, self._mirrored = value, True

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        if self._gram.device != x.device:          # accumulated where the activations are (--device cuda)
            self._move(x.device)
        x = x.reshape(-1, self.n)
        B, G = self.BLOCK, self._gram
        for c in x.split(self.CHUNK):     # float64 copies of CHUNK rows at a time, not of the whole batch
            c = c.to(torch.float64)
            for j in range(0, self.n, B):              # columns j:j+B, rows from j down: the lower triangle
                G[j:, j:j + B].addmm_(c[:, j:].T, c[:, j:j + B])
            self.abs_sum += c.abs().sum(0)
        self._mirrored = False
        self.tokens += x.shape[0]

    def _move(self, device) -> None:
        for k, v in list(vars(self).items()):
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device))

    @classmethod
    def restored(cls, gram: torch.Tensor, abs_sum: torch.Tensor, tokens: int) -> "ModuleStats":
        st = cls.__new__(cls)
        st.n, st.gram, st.abs_sum, st.tokens, st.keep_gram = gram.shape[0], gram, abs_sum, int(tokens), True
        return st

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @cached_property
    def whitening(self) -> Whitening:
        """Square-root factor of the Gram, computed once and shared by every module that reads this input."""
        wt = whiten(self.gram)
        if not self.keep_gram:
            self.gram = None
        return wt


def stats_tensors(stats: dict[str, ModuleStats]) -> dict[str, torch.Tensor]:
    """`stats` as flat tensors (safetensors), each shared input once: `{i}.gram`, `{i}.abs_sum`, `{i}.tokens`, and
    `{name}@` = i for every module. `stats_from_tensors` gives them back, sharing included."""
    out, ids = {}, {}
    for name, st in stats.items():
        i = ids.setdefault(id(st), len(ids))
        if f"{i}.gram" not in out:
            out.update({f"{i}.gram": st.gram, f"{i}.abs_sum": st.abs_sum, f"{i}.tokens": torch.tensor(st.tokens)})
        out[f"{name}@"] = torch.tensor(i)
    return out


def stats_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, ModuleStats]:
    """The inverse of `stats_tensors`.

    >>> a = ModuleStats(3); a.add(torch.ones(2, 3))
    >>> back = stats_from_tensors(stats_tensors({"q": a, "k": a}))
    >>> back["q"] is back["k"], back["q"].tokens, torch.equal(back["q"].gram, a.gram)
    (True, 2, True)
    """
    shared = {}
    for k, v in tensors.items():
        if k.endswith(".gram"):
            i = k[:-len(".gram")]
            shared[i] = ModuleStats.restored(v, tensors[f"{i}.abs_sum"], tensors[f"{i}.tokens"].item())
    return {k[:-1]: shared[str(v.item())] for k, v in tensors.items() if k.endswith("@")}


class StatsCollector:
    """Forward pre-hooks on the target modules. Use as a context manager around forward passes; set `token_mask`
    (batch, seq) before each pass so that padding is left out."""

    def __init__(self, targets: dict[str, nn.Module], in_features: dict[str, int]):
        self.targets, self.in_features = targets, in_features
        self.stats: dict[str, ModuleStats] = {}
        self.token_mask: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, ModuleStats] | None = None
        self._handles = []

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            if self._last is not None and self._last[0] is x:      # same tensor as the previous target: share
                self.stats.setdefault(name, self._last[1])
                return
            st = self.stats.get(name)
            if st is None:
                st = self.stats[name] = ModuleStats(self.in_features[name])
            st.add(token_rows(x, self.token_mask))
            self._last = (x, st)   # holding x also keeps its id from being reused within this pass
        return hook

    def next_pass(self, mask: torch.Tensor | None) -> None:
        self.token_mask, self._last = mask, None

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.targets.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._last = None

    def check_complete(self) -> None:
        missing = [n for n in self.targets if n not in self.stats]
        if missing:
            raise LayerzipError(f"calibration never reached {missing[0]} (and {len(missing) - 1} more); "
                                "exclude it with --exclude or check the model's forward")


def batch_mask(batch: dict) -> torch.Tensor | None:
    return batch["attention_mask"].bool() if "attention_mask" in batch else None


@torch.no_grad()
def collect_stats(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict],
                  progress: bool = True) -> dict[str, ModuleStats]:
    """One forward pass of the whole model over `batches`, streaming statistics of every target's input (the block
    driver does the same block by block; this is for targets outside the blocks and for checks). The LM head's
    input is the backbone's last hidden state (the forward stops before the head: no vocabulary-wide logits)."""
    device = next(model.parameters()).device
    net = backbone(model)
    head = model.get_output_embeddings() if net is not model and hasattr(model, "get_output_embeddings") else None
    heads = {n: m for n, m in targets.items() if m is head}       # the backbone's output is what the head reads
    with StatsCollector(targets, {n: linear_shape(m)[1] for n, m in targets.items()}) as col:
        hooks = [net.register_forward_hook(lambda mod, args, out, n=n, m=m: col._hook(n)(
            m, (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0],))) for n, m in heads.items()]
        try:
            for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
                col.next_pass(batch_mask(batch))
                net(**{k: v.to(device) for k, v in batch.items()})
        finally:
            for h in hooks:
                h.remove()
    col.check_complete()
    return col.stats
