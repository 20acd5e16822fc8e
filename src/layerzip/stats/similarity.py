"""Similarity of the residual stream across blocks (x^ℓ: the stream entering block ℓ, x^L the last block's output;
means over every non-padding token of the calibration batches):

  Block Influence   BIℓ = 1 − E[cos(x^ℓ, x^{ℓ+1})]                          (ShortGPT, Men et al. 2024)
  angular distance  d(ℓ, n) = E[arccos(cos(x^ℓ, x^{ℓ+n}))] / π                (Gromov et al. 2024; they read the
                    last token only, we average every token, which is steadier on little calibration text)
"""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LayerzipError
from ..models import backbone, block_hidden, block_output, find_blocks, token_rows
from .activations import batch_mask


@torch.no_grad()
def block_similarity(model: nn.Module, batches: list[dict], progress: bool = True) -> dict:
    """Cosine and angular distance between the residual streams x^0 … x^L (L blocks), averaged over tokens.

    Returns {"cosine": (L+1)×(L+1), "angular": (L+1)×(L+1), "influence": [BIℓ], "tokens": n} (plain lists)."""
    found = find_blocks(model)
    if found is None:
        raise LayerzipError("the model has no repeated blocks (a ModuleList of ≥ 2 same-class layers) to measure")
    blocks = found[1]
    L = len(blocks)
    states: list[torch.Tensor | None] = [None] * (L + 1)

    def first_input(module, args, kwargs):
        states[0] = block_hidden(args, kwargs)

    def output(i):
        def hook(module, args, kwargs, out):
            states[i + 1] = block_output(out)
        return hook

    handles = [blocks[0].register_forward_pre_hook(first_input, with_kwargs=True)]
    handles += [b.register_forward_hook(output(i), with_kwargs=True) for i, b in enumerate(blocks)]
    cos_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    ang_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    tokens = 0
    device = next(model.parameters()).device
    net = backbone(model)
    try:
        for batch in tqdm(batches, desc="residual stream", unit="batch", disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            states[:] = [None] * (L + 1)
            net(**batch)
            if any(s is None for s in states):
                raise LayerzipError("a block was skipped in the forward pass; cannot measure its influence")
            mask = batch_mask(batch)
            X = torch.stack([token_rows(s, mask) for s in states])
            X = torch.nn.functional.normalize(X.double(), dim=-1)          # (L+1, tokens, d)
            cos = torch.einsum("itd,jtd->ijt", X, X).clamp(-1, 1)           # per-token cosine of every pair
            cos_sum += cos.sum(-1).cpu()
            ang_sum += (torch.arccos(cos) / math.pi).sum(-1).cpu()
            tokens += X.shape[1]
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise LayerzipError("no calibration tokens reached the blocks; give more calibration text")
    cosine, angular = cos_sum / tokens, ang_sum / tokens
    influence = [1 - cosine[i, i + 1].item() for i in range(L)]
    return {"cosine": cosine.tolist(), "angular": angular.tolist(), "influence": influence, "tokens": tokens}
