"""Gradient statistics: how sensitive the model's loss is to each output row / output feature of a target.

The loss L: causal LMs use their language-model loss on the calibration text. Encoders have no such head; they use
one of two losses of their own embeddings (`encoder_loss`):

- "embedding": the Fisher of a unit-variance Gaussian model of the mean-pooled embedding e, L = εᵀe with ε ~ N(0, I)
  drawn per micro-batch, whose squared gradient has expectation diag(JᵀJ) — the embedding's own Fisher information,
  in one unit for every module (what global allocation compares);
- "contrastive": the in-batch contrastive loss sentence encoders are trained with (InfoNCE): each document is split
  into two views — attention on the first and on the second half of its tokens — and each view's normalized
  mean-pooled embedding must pick the other view of its document among every document's other view (temperature
  `CONTRAST_TEMPERATURE`). Every document is one sample and one backward; the other documents' views are the dense
  model's, computed once without gradients (`document_bank`), so a sample's gradient does not depend on how the
  documents are batched. It weights the rows of a module by what retrieval needs.

On MiniLM (bench/PIECES.md) the contrastive Fisher's row weights at uniform ranks beat plain uniform SVD-LLM on every
held-out metric with 64 documents, but lost to the embedding Fisher as global allocation's unit with 512.

- `collect_fisher`: FWSVD's row importance Iᵢ = Σⱼ E[(∂L/∂Wᵢⱼ)²] (weight gradients summed per output row);
- `collect_output_fisher`: Σ over tokens of (∂L/∂y)² per output feature y (the diagonal empirical Fisher of the
  module's outputs): Σᵢ fᵢ ‖(ΔW X)ᵢ‖² ≈ 2·T·(loss increase) for a change ΔW, in the same unit for every module.
  With `full=True`, the whole covariance F = Σ_t g_t g_tᵀ of the output gradients g_t = ∂L/∂y_t (KFAC's output
  factor): tr(ΔW X Xᵀ ΔWᵀ F) is that loss estimate without assuming the outputs independent. F is shrunk toward
  its diagonal (`OutputCovariance.shrunk`), so the diagonal version is the limit of no evidence for correlations.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models import backbone, linear_shape
from ..nn import is_conv1d
from .activations import whiten


@dataclass
class FisherStats:
    """Per-module Fisher row sums next to the module's activation statistics (`base`: Grams, whitening, cross
    Grams for --correct)."""
    fisher_rows: torch.Tensor
    base: object = None

    @cached_property
    def output_whitening(self):
        """R with F = R Rᵀ, F the (shrunk) output-gradient covariance in `fisher_rows` (collect_output_fisher with
        full=True)."""
        return whiten(self.fisher_rows)

    def __getattr__(self, name):              # gram, tokens, abs_mean, whitening ... of the base statistics
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


def with_fisher(stats: dict, fisher: dict[str, torch.Tensor]) -> dict:
    """{name: FisherStats(fisher[name], stats[name])} for the names in both."""
    return {n: FisherStats(fisher[n], s) for n, s in stats.items()}


def lm_labels(batch: dict) -> torch.Tensor:
    """The LM loss's labels: the input ids, padding not predicted (-100)."""
    labels = batch["input_ids"]
    if "attention_mask" in batch:
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    return labels


CONTRAST_TEMPERATURE = 0.05      # the contrastive loss (sentence-transformers' default scale 20)
ENCODER_LOSSES = ("embedding", "contrastive")


def document_views(batch: dict) -> list[dict]:
    """The contrastive loss's samples: each document of `batch` as a micro-batch of two rows, its ids twice (cut
    after its last attended token: the padding after it changes nothing), with attention on the first and on the
    second half of the tokens between its first and last (the special tokens, kept in both)."""
    masks = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    out = []
    for i, mask in enumerate(masks):
        idx = mask.nonzero().flatten()
        if not len(idx):                # nothing attended: no sample
            continue
        end = int(idx[-1]) + 1
        inner = idx[1:-1]
        views = torch.zeros(2, end, dtype=mask.dtype)
        views[0, inner[:len(inner) // 2]] = 1
        views[1, inner[len(inner) // 2:]] = 1
        views[:, idx[[0, -1]]] = 1
        row = {k: v[i:i + 1, :end].expand(2, end, *v.shape[2:]) for k, v in batch.items()}
        out.append({**row, "attention_mask": views})
    return out


def is_contrastive(causal: bool, encoder_loss: str) -> bool:
    """Whether the sensitivity loss is the contrastive one (an encoder asked for it); `encoder_loss` is checked."""
    if encoder_loss not in ENCODER_LOSSES:
        raise ValueError(f"encoder_loss: one of {ENCODER_LOSSES}, got {encoder_loss!r}")
    return not causal and encoder_loss == "contrastive"


def sensitivity_samples(batches: list[dict], causal: bool, micro_batch: int = 2,
                        encoder_loss: str = "embedding") -> list[dict]:
    """The micro-batches the sensitivity loss is taken over, one backward each: `micro_batch` sequences at a time;
    for the contrastive loss, one document at a time, as its two views (`document_views`)."""
    if is_contrastive(causal, encoder_loss):
        return [v for b in batches for v in document_views(b)]
    return [{k: v[i:i + micro_batch] for k, v in b.items()}
            for b in batches for i in range(0, len(b["input_ids"]), micro_batch)]


def pooled(model: nn.Module, batch: dict) -> torch.Tensor:
    """The mean-pooled embeddings of the rows of `batch` (the backbone's last hidden state over attended tokens)."""
    h = backbone(model)(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1).clamp_min(1)


def pooled_views(model: nn.Module, batch: dict) -> torch.Tensor:
    """The normalized mean-pooled embeddings of the rows of `batch`."""
    return F.normalize(pooled(model, batch), dim=-1)


@torch.no_grad()
def document_bank(model: nn.Module, samples: list[dict], device=None) -> torch.Tensor:
    """Every document's two view embeddings (documents × 2 × d) from the contrastive `sensitivity_samples`: the
    contrastive loss's negatives."""
    return torch.stack([pooled_views(model, {k: v.to(device) for k, v in b.items()}) for b in samples])


def contrastive_loss(views: torch.Tensor, bank: torch.Tensor, index: int) -> torch.Tensor:
    """InfoNCE both ways between document `index`'s two view embeddings (2 × d) and the other view of every
    document in `bank` (its own row replaced by `views`, so both views carry gradient)."""
    keys = bank.to(views).clone()
    keys[index] = views
    target = torch.tensor([index], device=views.device)
    return sum(F.cross_entropy((views[a] @ keys[:, 1 - a].T / CONTRAST_TEMPERATURE)[None], target) for a in (0, 1))


def sensitivity_loss(model: nn.Module, batch: dict, causal: bool, num_items: torch.Tensor | None = None, *,
                     gen: torch.Generator | None = None, bank: torch.Tensor | None = None,
                     index: int | None = None) -> torch.Tensor:
    """The LM loss for causal LMs; for an encoder, εᵀe of the pooled embedding (ε from `gen`), or with `bank`
    (`document_bank`) the contrastive loss of document `index` (`batch`: its two views) — module doc. `num_items`:
    the LM loss as a sum over this batch's tokens divided by `num_items` (the predicted tokens of a larger batch
    this one is a part of), so parts of a batch add up to the batch's mean loss."""
    if causal:
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        return model(**batch, labels=lm_labels(batch), use_cache=False, **extra).loss
    if bank is not None:
        return contrastive_loss(pooled_views(model, batch), bank, index)
    e = pooled(model, batch)
    return (e * torch.randn(e.shape, generator=gen).to(e)).sum()


class Frozen:
    """Every parameter's requires_grad off inside the block, restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.flags[n])


def add_row_fisher(acc: dict, name: str, module: nn.Module, grad: torch.Tensor) -> None:
    """acc[name] += (∂L/∂W)² summed per output row (a GPT-2 Conv1D stores W as in × out)."""
    g = grad.double().square().sum(0 if is_conv1d(module) else 1).cpu()
    acc[name] = acc[name] + g if name in acc else g


class OutputCovariance:
    """Running sums of one module's output gradients g, one sample per sequence: S = Σ_s G_s with G_s = Σ_{t∈s}
    g_t g_tᵀ, Q = Σ_s G_s∘G_s (for the variance of S's entries) and the sample count n. Sequences, not tokens, are
    the samples: the tokens of one sequence are far from independent."""

    def __init__(self, d: int):
        self.S = torch.zeros(d, d, dtype=torch.float64)
        self.Q = torch.zeros(d, d, dtype=torch.float64)
        self.n = 0

    def add(self, g: torch.Tensor) -> None:
        """g: (sequences, tokens, d), or (samples, d) for one token per sample."""
        g = g.double()
        g = g.reshape(-1, g.shape[-1], 1).transpose(1, 2) if g.dim() == 2 else g.reshape(g.shape[0], -1, g.shape[-1])
        for x in g:
            G = x.T @ x
            self.S += G.cpu()
            self.Q += G.square_().cpu()
        self.n += len(g)

    def shrunk(self) -> torch.Tensor:
        """S with its off-diagonal entries scaled by 1 − α, α the Schäfer–Strimmer (Ledoit–Wolf style) intensity
        toward the diagonal: the summed estimated variance of the off-diagonal entries of the mean over their summed
        squares, clipped to [0, 1]."""
        n = self.n
        if n < 2:
            return torch.diag(torch.diagonal(self.S))
        mean = self.S / n
        var = (self.Q - n * mean.square()).clamp_min(0) * (n / (n - 1) ** 3)
        off = ~torch.eye(len(mean), dtype=torch.bool)
        denom = mean.square()[off].sum()
        alpha = 1.0 if denom <= 0 else float((var[off].sum() / denom).clamp(0, 1))
        out = self.S * (1 - alpha)
        out.diagonal().copy_(torch.diagonal(self.S))
        return out


def output_fisher_hooks(targets: dict[str, nn.Module], acc: dict, full: bool = False) -> list:
    """Forward hooks whose gradient hooks add Σ over tokens of (∂L/∂y)² per output feature to acc[name] (`full`:
    the gradients' OutputCovariance sums); returns the handles to remove."""
    def out_hook(name):
        def hook(module, args, out):
            def grad_hook(g):
                g = g.detach()
                if full:
                    acc.setdefault(name, OutputCovariance(g.shape[-1])).add(g)
                    return
                g = g.reshape(-1, g.shape[-1]).double().square().sum(0).cpu()
                acc[name] = acc[name] + g if name in acc else g
            if out.requires_grad:
                out.register_hook(grad_hook)
        return hook
    return [m.register_forward_hook(out_hook(n)) for n, m in targets.items()]


def zeros_for_missing(acc: dict, targets: dict[str, nn.Module], full: bool = False) -> dict:
    """A target the loss does not depend on has no sensitivity at all: zeros. `full`: every OutputCovariance
    replaced by its shrunk sum (d × d)."""
    for n, mod in targets.items():
        if n not in acc:
            d = linear_shape(mod)[0]
            acc[n] = torch.zeros((d, d) if full else d, dtype=torch.float64)
        elif isinstance(acc[n], OutputCovariance):
            acc[n] = acc[n].shrunk()
    return acc


def sensitivity_losses(model: nn.Module, batches: list[dict], causal: bool, micro_batch: int = 2,
                       encoder_loss: str = "embedding", seed: int = 0):
    """(n, loss): `loss(i)` is the sensitivity loss of sample i < n of `sensitivity_samples`, in order, on the
    model's device. The contrastive loss's negatives (`document_bank`) are computed here, before the caller's hooks
    see any forward."""
    device = next(model.parameters()).device
    samples = sensitivity_samples(batches, causal, micro_batch, encoder_loss)
    bank = document_bank(model, samples, device) if is_contrastive(causal, encoder_loss) else None
    gen = torch.Generator().manual_seed(seed)

    def loss(i: int) -> torch.Tensor:
        b = {k: v.to(device) for k, v in samples[i].items()}
        return sensitivity_loss(model, b, causal, gen=gen, bank=bank, index=i)
    return len(samples), loss


def collect_fisher(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict], causal: bool,
                   progress: bool = True, micro_batch: int = 2,
                   encoder_loss: str = "embedding") -> dict[str, torch.Tensor]:
    """{name: Σ over samples of (∂L/∂W)² summed per output row} (float64, length out_features)."""
    weights = {n: m.weight for n, m in targets.items()}
    acc = {n: torch.zeros(linear_shape(targets[n])[0], dtype=torch.float64) for n in weights}
    n, loss = sensitivity_losses(model, batches, causal, micro_batch, encoder_loss)
    with Frozen(model):
        for w in weights.values():
            w.requires_grad_(True)
        for i in tqdm(range(n), desc="fisher", unit="sample", disable=not progress):
            with torch.enable_grad():
                grads = torch.autograd.grad(loss(i), list(weights.values()))
            for name, g in zip(weights, grads):
                add_row_fisher(acc, name, targets[name], g)
    return acc


def collect_output_fisher(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict], causal: bool,
                          progress: bool = True, micro_batch: int = 2, full: bool = False,
                          encoder_loss: str = "embedding") -> dict[str, torch.Tensor]:
    """{name: Σ over tokens of (∂L/∂y)²} per output feature y of each target (float64, length out_features);
    `full`: {name: Σ over tokens of (∂L/∂y)(∂L/∂y)ᵀ}, shrunk toward its diagonal (out × out)."""
    acc: dict[str, torch.Tensor] = {}
    n, loss = sensitivity_losses(model, batches, causal, micro_batch, encoder_loss)

    def leaf_hook(module, args, out):       # gradients reach the targets without any weight requiring grad
        return out.detach().requires_grad_(True)

    handles = output_fisher_hooks(targets, acc, full)
    handles.append(model.get_input_embeddings().register_forward_hook(leaf_hook))
    try:
        with Frozen(model):
            for i in tqdm(range(n), desc="output fisher", unit="sample", disable=not progress):
                with torch.enable_grad():
                    out = loss(i)
                    if out.requires_grad:
                        out.backward()
    finally:
        for h in handles:
            h.remove()
    return zeros_for_missing(acc, targets, full)
