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
    """Per-module Fisher row sums, next to the module's activation statistics (`base`, for --correct)."""
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


def collect_fisher(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict], causal: bool,
                   progress: bool = True, seed: int = 0, micro_batch: int = 2) -> dict[str, torch.Tensor]:
    """{name: Σ over micro-batches of (∂L/∂W)² summed per output row} (float64, length out_features)."""
    from ..calibrate import backbone
    from ..layers.base import is_conv1d

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
        for batch in tqdm(batches, desc="fisher", unit="batch", disable=not progress):
            for i in range(0, len(batch["input_ids"]), micro_batch):
                b = {k: v[i:i + micro_batch].to(device) for k, v in batch.items()}
                with torch.enable_grad():
                    if causal:
                        labels = b["input_ids"].masked_fill(b.get("attention_mask", 1) == 0, -100)
                        loss = model(**b, labels=labels, use_cache=False).loss
                    else:
                        h = backbone(model)(**b).last_hidden_state
                        mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                        e = (h * mask).sum(1) / mask.sum(1).clamp_min(1)
                        loss = (e * torch.randn(e.shape, generator=gen).to(e)).sum()
                    grads = torch.autograd.grad(loss, list(weights.values()))
                for (n, w), g in zip(weights.items(), grads):
                    acc[n] += g.double().square().sum(0 if is_conv1d(targets[n]) else 1).cpu()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return acc
