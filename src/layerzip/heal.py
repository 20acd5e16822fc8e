"""Healing: distill a compressed model towards its original, training only the factor matrices.

    loss = KL(teacher ‖ student) of next-token distributions            (causal LMs)
         | ‖h_s − h_t‖² / ‖h_t‖² of the last hidden states              (encoders; mean over non-padding tokens)
         + hint_weight · Σ_blocks ‖b_s − b_t‖² / ‖b_t‖²                  (FitNets hints, optional)
    on images (any nn.Module; batches without input_ids: tensors, tuples or dicts such as {"pixel_values": x}):
         KL(teacher ‖ student) of the class distributions               (a classifier: 2-D logits)
         | Σ_outputs ‖y_s − y_t‖² / ‖y_t‖²                               (anything else: maps, features)

Only the factor matrices of factorized layers train (A, B; biases stay); with none (a model that only lost
blocks), the weights of the Linear layers of the remaining blocks train. Memory stays bounded: one micro-batch at a time, and for causal LMs the
vocabulary-wide logits are built `chunk` tokens at a time under activation checkpointing, so a 262k-word head never
holds more than chunk × vocab floats.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .errors import LayerzipError
from .models import BlockOutputs, backbone, call_model, find_blocks, is_causal, select_targets
from .nn import FactorizedLayer
from .refine import clipped_step_, rebalance_

# `compress`'s healing when --heal-steps is not given: a causal LM that svd-llm compressed in memory gets HEAL_STEPS
# steps at HEAL_LR, each on about HEAL_TOKENS calibration tokens (whole windows). Measured on Gemma-3-270M with the
# CLI's default calibration (README "Healing by default"): held-out perplexity 14-26% lower at keep 0.6 / 0.5.
HEAL_STEPS = 32
HEAL_LR = 5e-5
HEAL_TOKENS = 512


def windows_per_step(seq_len: int) -> int:
    """Calibration windows of `seq_len` tokens in one healing step of a causal LM (about HEAL_TOKENS tokens)."""
    return max(1, HEAL_TOKENS // seq_len)


def trainable_parameters(model: nn.Module, blocks: bool = True) -> tuple[list[nn.Parameter], str]:
    """Factor matrices; else (`blocks`) the weights of the Linear layers inside the blocks. Freezes everything
    else."""
    mods = [m for m in model.modules() if isinstance(m, FactorizedLayer)]
    what = "factors"
    if not mods and not blocks:
        raise LayerzipError(f"{type(model).__name__} has no factorized layers to heal; compress it first")
    if not mods:
        mods, what = list(select_targets(model).values()), "block linears"
    for p in model.parameters():
        p.requires_grad_(False)
    # biases stay frozen: they are the original ones, and the loss is very sharp along some of them
    params = list({id(p): p for m in mods for n, p in m.named_parameters() if n != "bias"}.values())
    for p in params:
        p.requires_grad_(True)
    return params, what


def _head(model: nn.Module):
    """h -> logits as the model's own forward computes them (LM head, then Gemma-style soft-capping)."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        return lambda h: torch.tanh(head(h) / cap) * cap
    return head


def _kl_chunk(head_s, head_t):
    def f(hs, ht):
        ls = F.log_softmax(head_s(hs).float(), -1)
        with torch.no_grad():
            lt = F.log_softmax(head_t(ht).float(), -1)
        return (lt.exp() * (lt - ls)).sum()
    return f


def _nmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖² / ‖b‖² over rows (already masked)."""
    return (a.float() - b.float()).square().sum() / b.float().square().sum().clamp_min(1e-12)


def head_supported(model: nn.Module, batch: dict) -> bool:
    """Whether the chunked head reproduces the model's own logits (not: architectures with extra logit scaling)."""
    ids = batch["input_ids"][:1, :8]
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        mine = _head(model)(backbone(model)(input_ids=ids).last_hidden_state).float()
    return torch.allclose(ref, mine, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


def check_head(model: nn.Module, batch: dict) -> None:
    if not head_supported(model, batch):
        raise LayerzipError(f"{type(model).__name__} computes its logits in a way heal does not reproduce; "
                            "healing supports LM-head (+ soft-capping) models")


def is_text_batch(batch) -> bool:
    return isinstance(batch, dict) and "input_ids" in batch


def output_tensors(out) -> list[torch.Tensor]:
    """What a model returned, as tensors: a classifier's `logits` alone (HF outputs), else every floating tensor
    (a tensor, tuples / lists / dicts of them, nested)."""
    logits = getattr(out, "logits", None)
    if torch.is_tensor(logits):
        return [logits]
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    return []


def output_loss(student, teacher, item) -> tuple[torch.Tensor, str]:
    """(distillation loss, its kind) on one batch of a model's own inputs (images): KL of the class distributions
    ("output-kl") when the model returns one 2-D logits tensor, else the mean relative squared error of its output
    tensors ("output-nmse")."""
    with torch.no_grad():
        ts = output_tensors(call_model(teacher, item))
    ss = output_tensors(call_model(student, item))
    if not ts or len(ss) != len(ts):
        raise LayerzipError(f"{type(student).__name__} returns no floating tensor to distill (or not the same as "
                            "its teacher); heal needs the compressed model and its original")
    if len(ts) == 1 and ts[0].dim() == 2:
        lt = F.log_softmax(ts[0].float(), -1)
        return (lt.exp() * (lt - F.log_softmax(ss[0].float(), -1))).sum(-1).mean(), "output-kl"
    return sum(_nmse(a, b) for a, b in zip(ss, ts)) / len(ts), "output-nmse"


def distill_loss(student, teacher, batch: dict, causal: bool, chunk: int = 128, hint_weight: float = 0.0,
                 hooks: tuple | None = None, block_map: list[int] | None = None) -> torch.Tensor:
    mask = batch.get("attention_mask")
    mask = mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)
    with torch.no_grad():
        ht = backbone(teacher)(**batch).last_hidden_state[mask]
    hs = backbone(student)(**batch).last_hidden_state[mask]
    if causal:
        f = _kl_chunk(_head(student), _head(teacher))
        loss = sum(checkpoint(f, hs[i:i + chunk], ht[i:i + chunk], use_reentrant=False)
                   for i in range(0, hs.shape[0], chunk)) / hs.shape[0]
    else:
        loss = _nmse(hs, ht)
    if hint_weight and hooks:
        s_out, t_out = hooks[0].outs, hooks[1].outs
        hint = sum(_nmse(s_out[i][mask], t_out[j][mask].detach()) for i, j in enumerate(block_map))
        loss = loss + hint_weight * hint / len(block_map)
    return loss


def heal_(student: nn.Module, teacher: nn.Module, batches: list[dict], steps: int = 100, lr: float = 1e-5,
          causal: bool | None = None, hint_weight: float = 0.0, block_map: list[int] | None = None,
          chunk: int = 128, device: str | None = None, progress: bool = True) -> dict:
    """Distill `student` towards `teacher` for `steps` optimizer steps over `batches` (cycled), in place.

    >>> import layerzip as lz                                                  # doctest: +SKIP
    >>> rep = lz.heal_(compressed, original, batches, steps=50)                # doctest: +SKIP
    >>> rep["loss_first"], rep["loss_last"]                                    # doctest: +SKIP
    """
    if steps < 1:
        raise LayerzipError(f"--steps must be ≥ 1, got {steps}")
    if not lr > 0:
        raise LayerzipError(f"--lr must be > 0, got {lr}")
    if not batches:
        raise LayerzipError("healing needs text (or images); pass --text FILE with at least one document")
    text = is_text_batch(batches[0])
    causal = text and (is_causal(student) if causal is None else causal)
    if hint_weight and not text:
        raise LayerzipError("hints compare the blocks' hidden states of a text model; run heal without --hints")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    home = next(student.parameters()).device
    student.to(device).eval()                       # eval: no dropout noise, the teacher's exact function
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params, what = trainable_parameters(student, blocks=text)
    rebalance_(student)
    hooks = None
    if hint_weight:
        if find_blocks(student) is None or find_blocks(teacher) is None:
            raise LayerzipError("hints need repeated blocks; run heal without --hints")
        s_blocks, t_blocks = len(find_blocks(student)[1]), len(find_blocks(teacher)[1])
        block_map = block_map or (list(range(s_blocks)) if s_blocks == t_blocks else None)
        if block_map is None or len(block_map) != s_blocks or max(block_map) >= t_blocks:
            raise LayerzipError("hints need to know which teacher block each student block came from "
                                "(kept_blocks in layerzip.json); run heal without --hints")
        hooks = (BlockOutputs(student), BlockOutputs(teacher))
    if causal:
        check_head(student, {k: v.to(device) for k, v in batches[0].items()})
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)       # linear warm-up, then cosine decay to 10 % of lr
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    losses, kind = [], "kl" if causal else "hidden-nmse"
    bar = tqdm(range(steps), desc="healing", unit="step", disable=not progress)
    try:
        for step in bar:
            if text:
                batch = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
                loss = distill_loss(student, teacher, batch, causal, chunk, hint_weight, hooks, block_map)
            else:
                loss, kind = output_loss(student, teacher, batches[step % len(batches)])
            losses.append(clipped_step_(loss, opt, sched, params,
                                        f"the distillation loss became {{loss}} at step {step}; lower --lr"))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    finally:
        if hooks:
            hooks[0].remove()
            hooks[1].remove()
        for p in student.parameters():
            p.requires_grad_(False)
        student.to(home)
    k = max(1, min(5, steps // 4))
    return {"steps": steps, "lr": lr, "loss": kind, "hint_weight": hint_weight,
            "trained": what, "trainable_params": sum(p.numel() for p in params),
            "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "losses": losses,
            "device": str(device), "seconds": time.perf_counter() - t0}
