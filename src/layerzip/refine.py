"""Block refinement (AA-SVD's anchored refit, its block stage): after a block's layers are decomposed, a few Adam
steps on their factors so that the compressed block, fed the compressed model's own stream, reproduces the original
block's output on the original stream:

    min over the block's factors   Σ_batches ‖f'_l(h'_l) − f_l(h_l)‖² / ‖f_l(h_l) − h_l‖²     (non-padding tokens)

h_l: the original model's input of block l, h'_l: the compressed model's (blocks < l already compressed and
refined), f_l / f'_l: block l before / after its decomposition. Anchoring to the original output (not to f_l(h'_l))
lets each block also undo the error the earlier blocks left in its input. The loss is normalized by the block's
own update (a residual block's output is mostly its input). The block driver calls it per block (driver.walk's
`refine`), so it needs one block's graph in memory and runs the same streamed and in memory.

Only low-rank factors train (A, B of LowRankLinear, re-split balanced first: SVD-LLM's whitened B can be badly
scaled for Adam); biases and everything else stay. Cosine decay of the learning rate to 0; gradients clipped to
norm 1."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LayerzipError
from .models import run_block, token_rows
from .nn import FactorizedConv, FactorizedLayer, rebalanced


@torch.no_grad()
def rebalance_(model: nn.Module) -> int:
    """Re-split every low-rank A·B as U√S · √S Vᵀ (same product; nn.rebalanced), and every factorized convolution
    its own way (FactorizedConv.balance_). Whitened factors (SVD-LLM's B = √S Vᵀ L⁻¹) can be badly scaled, and Adam
    moves every entry by about lr: balanced factors make that step uniform in effect. The layers of one shared
    basis (--share) are re-split together, their A's stacked. Returns the layers re-split."""
    groups: dict[int, list[nn.Module]] = {}
    convs = 0
    for m in model.modules():
        A, B = getattr(m, "A", None), getattr(m, "B", None)
        if isinstance(m, FactorizedConv):
            m.balance_()
            convs += 1
        elif isinstance(m, FactorizedLayer) and isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter) \
                and A.dim() == 2 and B.dim() == 2 and A.shape[1] == B.shape[0]:
            groups.setdefault(id(B), []).append(m)
    for mods in groups.values():
        A, B = rebalanced(torch.cat([m.A for m in mods]), mods[0].B)
        for m, a in zip(mods, A.split([m.A.shape[0] for m in mods])):
            m.A.copy_(a)
        mods[0].B.copy_(B)
    return sum(map(len, groups.values())) + convs


def clipped_step_(loss: torch.Tensor, opt, sched, params: list[nn.Parameter], error: str) -> float:
    """One optimizer step on `loss`, gradients clipped to norm 1, then the schedule's; returns the loss. A loss
    that is not finite raises LayerzipError(`error` with {loss} filled in) before anything moves."""
    if not torch.isfinite(loss):
        raise LayerzipError(error.format(loss=loss.item()))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return loss.item()


def low_rank_factors(block: nn.Module) -> list[nn.Parameter]:
    """The A, B factors of the block's low-rank layers (what refinement and healing train)."""
    mods = [m for m in block.modules() if isinstance(m, FactorizedLayer)]
    return list({id(p): p for m in mods for n, p in m.named_parameters() if n in ("A", "B")}.values())


@dataclass
class Refine:
    """`steps` Adam steps per block at learning rate `lr`, one slice of about `tokens` calibration tokens a step
    (cycled)."""
    steps: int
    lr: float = 1e-4
    tokens: int = 1024   # a step reads the calibration in slices of about this many tokens (whole sequences)
    EXACT = 1e-10        # a block whose first loss is below this is left as it is

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise LayerzipError(f"--refine-steps must be a whole number ≥ 0, got {self.steps}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise LayerzipError(f"--refine-lr must be in (0, 1), got {self.lr}")

    def __call__(self, block: nn.Module, calls: list, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                 originals: list[torch.Tensor], masks: list) -> dict:
        """Refine `block` in place: block(calls[b] on inputs[b]) → targets[b]; `originals[b]`: the original
        block's input (the loss's scale). Returns {"loss_first", "loss_last"} (the normalized loss of the first
        slices when first trained on, and of the same slices after the last step) and "drift"
        (‖p − p₀‖ / ‖p₀‖ over all factors at the end, p₀: the balanced decomposition's)."""
        params = low_rank_factors(block)
        if not params or not self.steps:
            return {}
        calls, inputs, targets, originals, masks = self._slices(calls, inputs, targets, originals, masks)
        scale = [token_rows(t - h, m).float().square().sum().clamp_min(1e-12)
                 for t, h, m in zip(targets, originals, masks)]

        def loss_of(b: int) -> torch.Tensor:
            out = run_block(block, calls[b], inputs[b])
            return (token_rows(out, masks[b]) - token_rows(targets[b], masks[b])).float().square().sum() / scale[b]
        with torch.no_grad():
            if loss_of(0).item() < self.EXACT:
                return {}              # already exact (full rank): Adam's unit-size steps would only add noise
        rebalance_(block)
        frozen = {p: p.requires_grad for p in block.parameters()}
        for p in block.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        start = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / self.steps)))
        losses = []
        try:
            with torch.enable_grad():
                for step in range(self.steps):
                    b = step % len(calls)
                    losses.append(clipped_step_(loss_of(b), opt, sched, params,
                                                "block refinement's loss became {loss}; lower --refine-lr or "
                                                "pass --refine-steps 0"))
        finally:
            for p, g in frozen.items():
                p.requires_grad_(g)
            for p in params:
                p.grad = None
        k = max(1, min(len(calls), len(losses) // 4))     # the first k steps trained on slices 0 … k − 1
        with torch.no_grad():
            last = sum(loss_of(b).item() for b in range(k)) / k
            moved = sum((p - p0).square().sum() for p, p0 in zip(params, start))
            drift = (moved / sum(p0.square().sum() for p0 in start).clamp_min(1e-30)).sqrt().item()
        return {"loss_first": sum(losses[:k]) / k, "loss_last": last, "drift": drift}

    def _slices(self, calls, inputs, targets, originals, masks):
        """Each batch cut into slices of whole sequences of about `tokens` tokens (everything that has the batch
        as its first dimension, in the block's call too): a step's cost does not grow with the batch size."""
        out = [], [], [], [], []
        for call, *ts in zip(calls, inputs, targets, originals, masks):
            n, seq = ts[0].shape[0], ts[0].shape[1] if ts[0].dim() > 2 else 1
            rows = max(1, self.tokens // max(seq, 1))
            for i in range(0, n, rows):
                for acc, x in zip(out, (call, *ts)):
                    acc.append(_rows(x, n, i, i + rows) if n > rows else x)
        return out


def _rows(x, n: int, i: int, j: int):
    """x with rows i:j of every tensor (within tuples, lists, dicts) whose first dimension is the batch `n`;
    one-dimensional tensors (positions) are not batched."""
    if isinstance(x, torch.Tensor):
        return x[i:j] if x.dim() > 1 and x.shape[0] == n else x
    if isinstance(x, (tuple, list)):
        return type(x)(_rows(v, n, i, j) for v in x)
    if isinstance(x, dict):
        return {k: _rows(v, n, i, j) for k, v in x.items()}
    return x
