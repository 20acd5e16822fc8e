"""Sequential calibration: compress block by block, each calibrated on the output of the blocks already compressed.

    one forward of the original model, a pre-hook on every block  ->  each block's (args, kwargs) per batch
    for block l:   for each group of targets sharing one input (q/k/v, then o, then gate/up, then down):
                       run the partly compressed block l on the compressed stream h'ₗ, stop at the group's input X',
                       accumulate Grams (and, with --correct, the cross Gram XᵀX' with the original stream's X),
                       decompose the group
                   h'ₗ₊₁ = compressed block l (h'ₗ)

So every module sees the inputs the compressed model will really give it, errors of earlier modules included, and
the correction (correct.py) can pull each module's output back toward the original Y = W X.
Kwargs are kept per block: Gemma 3 alternates sliding-window and full attention masks and position embeddings.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibrate import ModuleStats, backbone, collect_stats
from .correct import PairedStats
from .errors import LayerzipError
from .models import find_blocks, linear_shape


class _Stop(Exception):
    """Raised by a hook once the group's input has been captured: the rest of the block need not run."""


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})


def _run(block, args, kwargs):
    """The block's output hidden state, whether it returns a tensor or a tuple."""
    y = block(*args, **kwargs)
    return y[0] if isinstance(y, (tuple, list)) else y


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[dict], keep_hidden: bool):
    """calls[l][b] = (args, kwargs) of block l on batch b in the original model. Hidden states are kept for every
    block when `keep_hidden` (the original stream, for the correction), else only for block 0."""
    device = next(model.parameters()).device
    calls: list[list] = [[] for _ in blocks]

    def hook_for(l):
        def hook(module, args, kwargs):
            args, kwargs = tuple(args), dict(kwargs)
            if not keep_hidden and l > 0:       # drop the hidden state: only block 0's input is needed
                args, kwargs = _with_hidden(args, kwargs, None)
            calls[l].append((args, kwargs))
        return hook

    handles = [b.register_forward_pre_hook(hook_for(l), with_kwargs=True) for l, b in enumerate(blocks)]
    net = backbone(model)
    try:
        for batch in tqdm(batches, desc="capturing block inputs", unit="batch", leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            try:
                net(**batch, use_cache=False)
            except TypeError:                   # a backbone without `use_cache`
                net(**batch)
    finally:
        for h in handles:
            h.remove()
    if any(len(c) != len(batches) for c in calls):
        raise LayerzipError("sequential calibration: not every block ran once per batch; drop --sequential")
    return calls


def _input_groups(block: nn.Module, names: dict[str, str], call) -> list[list[str]]:
    """Targets of one block grouped by the input tensor they read, in execution order (q/k/v share one)."""
    seen: list[tuple[torch.Tensor, list[str]]] = []
    handles = []
    for local, full in names.items():
        def hook(module, args, full=full):
            x = args[0]
            if seen and seen[-1][0] is x:
                seen[-1][1].append(full)
            else:
                seen.append((x, [full]))
        handles.append(block.get_submodule(local).register_forward_pre_hook(hook))
    try:
        block(*call[0], **call[1])
    finally:
        for h in handles:
            h.remove()
    return [g for _, g in seen]


def _capture(block: nn.Module, module: nn.Module, args, kwargs) -> torch.Tensor:
    """The input of `module` when `block` runs on (args, kwargs); the block stops right there."""
    box = []

    def hook(mod, a):
        box.append(a[0])
        raise _Stop

    h = module.register_forward_pre_hook(hook)
    try:
        block(*args, **kwargs)
    except _Stop:
        pass
    finally:
        h.remove()
    if not box:
        raise LayerzipError("sequential calibration: a target was not reached inside its block; drop --sequential")
    return box[0]


def _capture_all(block: nn.Module, modules: list[nn.Module], args, kwargs) -> list[torch.Tensor]:
    """The inputs of several modules in one full run of `block`."""
    box: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, i=i: box.setdefault(i, a[0])) for i, m in enumerate(modules)]
    try:
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return [box[i] for i in range(len(modules))]


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Token rows of x, padding excluded."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        return x[mask]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def compress_sequential(model: nn.Module, targets: dict[str, nn.Module], ranks: dict[str, int | None], config,
                        batches: list[dict], progress: bool = True, fisher: dict | None = None
                        ) -> tuple[dict[str, dict], int]:
    """Compress `targets` block by block (see module doc). Returns ({name: spec}, calibration tokens).
    `fisher`: per-module output Fisher of the original model, attached to each module's new statistics."""
    from .compress import replace_module
    from .methods.fwsvd import FisherStats

    def attach(name, stats):
        return FisherStats(fisher[name], stats) if fisher and name in fisher else stats

    found = find_blocks(model)
    if found is None:
        raise LayerzipError("sequential calibration needs a model with repeated blocks; drop --sequential")
    prefix, blocks = found
    masks = [b["attention_mask"].bool() if "attention_mask" in b else None for b in batches]
    calls = capture_block_inputs(model, blocks, batches, keep_hidden=config.correct)
    h_cur = [_hidden(*c) for c in calls[0]]
    modules, tokens = {}, 0
    for l, block in enumerate(tqdm(blocks, desc=f"sequential ({config.name})", unit="block", disable=not progress)):
        pre = f"{prefix}.{l}."
        local = {n[len(pre):]: n for n in targets if n.startswith(pre) and ranks[n] is not None}
        if local:
            groups = _input_groups(block, local, _with_hidden(*calls[l][0], h_cur[0]))
            firsts = [block.get_submodule(g[0][len(pre):]) for g in groups]
            # the original model's inputs of every group, taken before any module of this block changes
            refs = [[_rows(x, masks[b]) for x in _capture_all(block, firsts, *call)] for b, call in
                    enumerate(calls[l])] if config.correct else None
            for g, (group, first) in enumerate(zip(groups, firsts)):
                stats = (PairedStats if config.correct else ModuleStats)(linear_shape(first)[1])
                for b, call in enumerate(calls[l]):
                    x = _rows(_capture(block, first, *_with_hidden(*call, h_cur[b])), masks[b])
                    if config.correct:
                        stats.add_pair(refs[b][g], x)
                    else:
                        stats.add(x)
                tokens = max(tokens, stats.tokens)
                for name in group:
                    modules[name] = replace_module(model, name, targets[name], config, attach(name, stats),
                                                   ranks[name])
        h_cur = [_run(block, *_with_hidden(*call, h_cur[b])) for b, call in enumerate(calls[l])]
        calls[l] = None                      # free this block's captured inputs
    rest = {n: m for n, m in targets.items() if not n.startswith(prefix + ".") and ranks[n] is not None}
    if rest:                                 # targets outside the blocks (e.g. a head named by --include)
        stats = collect_stats(model, rest, {n: linear_shape(m)[1] for n, m in rest.items()}, batches, progress)
        for name, mod in rest.items():
            modules[name] = replace_module(model, name, mod, config, attach(name, stats[name]), ranks[name])
    return modules, tokens
