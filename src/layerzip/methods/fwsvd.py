"""FWSVD (Hsu et al. 2022): Fisher-weighted SVD.

Row importance Iᵢ = Σⱼ E[(∂L/∂Wᵢⱼ)²] (squared gradients summed per output row), then

    W ≈ D⁻¹ · trunc_r(D W),    D = diag(√I)      stored as A = D⁻¹ U_r Σ_r^½,  B = Σ_r^½ V_rᵀ

so rows the loss is sensitive to are approximated better. The loss L: causal LMs use their language-model loss on the
calibration text; encoders have no such head, so they use the Fisher of a unit-variance Gaussian model of the
mean-pooled embedding e: L = εᵀe with ε ~ N(0, I) sampled per batch, whose squared gradient has expectation
diag(JᵀJ) — the embedding's own Fisher information.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .svd import split_balanced


@dataclass
class FisherStats:
    """Per-module Fisher row sums (FWSVD's weight-gradient rows, or svd-llm's output Fisher), next to the module's
    activation statistics (`base`: Grams, whitening, cross Grams for --correct)."""
    fisher_rows: torch.Tensor
    base: object = None

    def __getattr__(self, name):              # gram, tokens, abs_mean, whitening ... of the base statistics
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


def row_weights(fisher_rows: torch.Tensor) -> torch.Tensor:
    """√I, with rows of zero Fisher given the smallest positive weight (so D stays invertible)."""
    w = fisher_rows.double().clamp_min(0).sqrt()
    live = w[w > 0]
    return torch.where(w > 0, w, live.min() if live.numel() else torch.ones((), dtype=w.dtype))


@torch.no_grad()
def fwsvd_factors(W: torch.Tensor, stats, rank: int):
    """(W out×in float64, stats with .fisher_rows, rank) -> (A, B)."""
    w = row_weights(stats.fisher_rows).to(W)
    U, S, Vh = torch.linalg.svd(w[:, None] * W, full_matrices=False)
    A, B = split_balanced(U, S, Vh, rank)
    return A / w[:, None], B


def _sensitivity_loss(model: nn.Module, batch: dict, causal: bool, gen: torch.Generator) -> torch.Tensor:
    """The loss whose gradients measure sensitivity: the LM loss for causal LMs, εᵀe (ε ~ N(0, I)) of the mean-pooled
    embedding e for encoders (see module doc)."""
    from ..calibrate import backbone

    if causal:
        labels = batch["input_ids"]
        if "attention_mask" in batch:              # padding is not predicted
            labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
        return model(**batch, labels=labels, use_cache=False).loss
    h = backbone(model)(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    e = (h * mask).sum(1) / mask.sum(1).clamp_min(1)
    return (e * torch.randn(e.shape, generator=gen).to(e)).sum()


def _micro_batches(batches, micro_batch, device, progress, desc):
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        for i in range(0, len(batch["input_ids"]), micro_batch):
            yield {k: v[i:i + micro_batch].to(device) for k, v in batch.items()}


def collect_fisher(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict], causal: bool,
                   progress: bool = True, seed: int = 0, micro_batch: int = 2) -> dict[str, torch.Tensor]:
    """{name: Σ over micro-batches of (∂L/∂W)² summed per output row} (float64, length out_features)."""
    from ..nn import is_conv1d

    device = next(model.parameters()).device
    weights = {n: m.weight for n, m in targets.items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    acc = {n: torch.zeros(w.shape[1] if is_conv1d(targets[n]) else w.shape[0], dtype=torch.float64)
           for n, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for b in _micro_batches(batches, micro_batch, device, progress, "fisher"):
            with torch.enable_grad():
                grads = torch.autograd.grad(_sensitivity_loss(model, b, causal, gen), list(weights.values()))
            for (n, w), g in zip(weights.items(), grads):
                acc[n] += g.double().square().sum(0 if is_conv1d(targets[n]) else 1).cpu()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return acc


def collect_output_fisher(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict], causal: bool,
                          progress: bool = True, seed: int = 0, micro_batch: int = 2) -> dict[str, torch.Tensor]:
    """{name: Σ over tokens of (∂L/∂y)²} per output feature y of each target (float64, length out_features): the
    diagonal empirical Fisher of the module's outputs. With it, Σᵢ fᵢ ‖(ΔW X)ᵢ‖² ≈ 2·T·(loss increase) for a
    change ΔW, in the same units for every module (second-order Taylor, Fisher for the Hessian, diagonal)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, torch.Tensor] = {}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def out_hook(name):
        def hook(module, args, out):
            def grad_hook(g):
                g = g.detach().reshape(-1, g.shape[-1]).double().square().sum(0).cpu()
                acc[name] = acc[name] + g if name in acc else g
            if out.requires_grad:
                out.register_hook(grad_hook)
        return hook

    def leaf_hook(module, args, out):       # gradients reach the targets without any weight requiring grad
        return out.detach().requires_grad_(True)

    handles = [m.register_forward_hook(out_hook(n)) for n, m in targets.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(leaf_hook))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for b in _micro_batches(batches, micro_batch, device, progress, "output fisher"):
            with torch.enable_grad():
                loss = _sensitivity_loss(model, b, causal, gen)
                if loss.requires_grad:
                    loss.backward()
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    from ..models import linear_shape
    for n in targets:                        # a target the loss does not depend on: no sensitivity at all
        if n not in acc:
            acc[n] = torch.zeros(linear_shape(targets[n])[0], dtype=torch.float64)
    return acc
