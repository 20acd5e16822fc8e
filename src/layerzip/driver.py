"""The block driver: one loop over the model's repeated blocks, in order, for every calibrated method.

    capture block 0's inputs and every block's keyword arguments (a forward of the original model whose blocks run
    on the first batch only)
    for block l:   block started
                   default:      run block l on the original stream with hooks on its targets -> statistics
                                 (and the original stream's next state, taken before anything changes)
                   --sequential: for each group of targets sharing one input (q/k/v, then o, then gate/up, ...):
                                 run the partly compressed block on the compressed stream, stop at the group's input,
                                 accumulate its Grams (paired with the original stream's input for --correct)
                   statistics ready -> `on_stats(names, stats)` (which may decompose those modules right away)
                   --sequential: the compressed stream's next state = compressed block l (its current state)
                   block done
    targets outside the blocks (a head named by --include): one forward of the whole model, before the blocks
    change (default) or after (--sequential)

Events (`BlockEvent`: block started / statistics ready / block done) go to listeners: the progress bar is one,
reports and resumable runs can be others. Kwargs are kept per block: Gemma 3 alternates sliding-window and full
attention masks and position embeddings. Holding one block's hidden states for every batch is the only
activation memory the walk needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LayerzipError
from .models import (backbone, block_hidden, block_output, capture_input, capture_inputs, find_blocks,
                     input_groups, linear_shape, run_block, token_rows, with_hidden)
from .stats import ModuleStats, PairedStats, StatsCollector, batch_mask, collect_stats

OnStats = Callable[[list, dict], None]


@dataclass
class BlockEvent:
    kind: str                   # "block_started" | "stats_ready" | "block_done"
    block: int | None           # index among the repeated blocks; None: targets outside them
    names: list = field(default_factory=list)
    stats: dict | None = None   # stats_ready: {name: statistics}


class Progress:
    """A listener: one tqdm bar over the blocks."""

    def __init__(self, desc: str, total: int):
        self.bar = tqdm(total=total, desc=desc, unit="block")

    def __call__(self, event: BlockEvent) -> None:
        if event.kind == "block_done" and event.block is not None:
            self.bar.update(1)

    def close(self):
        self.bar.close()


class BlockDriver:
    """Walks `model`'s repeated blocks over the calibration `batches` (see the module doc).

    >>> driver = BlockDriver(model, batches)               # doctest: +SKIP
    >>> stats = driver.collect(targets)                    # doctest: +SKIP
    >>> driver.walk(targets, decompose, sequential=True)   # doctest: +SKIP

`collect`: statistics of the original model, nothing changed; `walk`: `decompose(names, stats)` called per block
(per input group with `sequential`).
    """

    def __init__(self, model: nn.Module, batches: list[dict], progress: bool = True, desc: str = "blocks",
                 listeners: list[Callable[[BlockEvent], None]] = ()):
        self.model, self.batches, self.progress, self.desc = model, batches, progress, desc
        self.listeners = list(listeners)
        self.masks = [batch_mask(b) for b in batches]

    def emit(self, kind: str, block: int | None, names=(), stats=None) -> None:
        for f in self.listeners:
            f(BlockEvent(kind, block, list(names), stats))

    def collect(self, targets: dict[str, nn.Module]) -> dict:
        """Statistics of every target's input in the original model; the model is left unchanged."""
        out: dict = {}
        self.walk(targets, lambda names, stats: out.update(stats))
        return out

    @torch.no_grad()
    def walk(self, targets: dict[str, nn.Module], on_stats: OnStats, sequential: bool = False,
             paired: bool = False) -> None:
        """Call `on_stats(names, {name: stats})` for every target, block by block. `sequential`: statistics of the
        compressed stream (what `on_stats` did to earlier modules is seen by later ones); `paired` (with
        sequential): PairedStats against the original stream, for the correction."""
        found = find_blocks(self.model)
        prefix = found[0] + "." if found else None
        inside = {n: m for n, m in targets.items() if prefix and n.startswith(prefix)}
        rest = {n: m for n, m in targets.items() if n not in inside}
        if rest and not sequential:
            self._outside(rest, on_stats)
        if inside:
            bar = Progress(f"{self.desc}: blocks", len(found[1])) if self.progress else None
            self.listeners += [bar] if bar else []
            try:
                self._blocks(found, inside, on_stats, sequential, paired)
            finally:
                if bar:
                    self.listeners.remove(bar)
                    bar.close()
        if rest and sequential:
            self._outside(rest, on_stats)

    def _outside(self, rest: dict, on_stats: OnStats) -> None:
        self.emit("block_started", None, rest)
        stats = collect_stats(self.model, rest, self.batches, progress=False)
        self.emit("stats_ready", None, rest, stats)
        on_stats(list(rest), stats)
        self.emit("block_done", None, rest)

    def _capture(self, blocks: nn.ModuleList) -> list[list[tuple]]:
        """calls[l][b] = (args, kwargs) of block l on batch b in the original model; the hidden state is kept for
        block 0 only (block l > 0 gets it from the walk).

        Only the first batch runs the blocks: it checks that every block's output is the next block's input (which
        the walk relies on) and shows what each block returns. For the other batches the blocks pass their input
        through in that form, so the forward only computes what the blocks' arguments need (masks, positions)."""
        device = next(self.model.parameters()).device
        calls: list[list] = [[] for _ in blocks]
        first = [True]                    # the first batch is running
        templates: dict[int, object] = {}
        last: list = []                   # the previous block's output on the first batch
        broken: list[int] = []

        def pre(l):
            def hook(module, args, kwargs):
                args, kwargs = tuple(args), dict(kwargs)
                if first[0] and last:
                    h, y = block_hidden(args, kwargs), last.pop()
                    if h.shape != y.shape or not torch.allclose(h, y, rtol=1e-4, atol=1e-5 * max(1.0, y.abs().max().item())):
                        broken.append(l)
                calls[l].append(with_hidden(args, kwargs, None) if l > 0 else (args, kwargs))
            return hook

        def post(l):
            def hook(module, args, kwargs, out):
                if first[0]:          # what the block returns: a tensor, or a tuple whose first entry is it
                    templates[l] = (None if isinstance(out, torch.Tensor) else
                                    (type(out), tuple(out[1:])) if isinstance(out, (tuple, list)) else "other")
                    last[:] = [block_output(out)]
            return hook

        def passthrough(l):
            def forward(*args, **kwargs):
                h, t = block_hidden(args, kwargs), templates[l]
                return h if t is None else t[0]((h, *t[1]))
            return forward

        handles = [b.register_forward_pre_hook(pre(l), with_kwargs=True) for l, b in enumerate(blocks)]
        handles += [b.register_forward_hook(post(l), with_kwargs=True) for l, b in enumerate(blocks)]
        net = backbone(self.model)
        try:
            for i, batch in enumerate(self.batches):
                if i == 1:
                    first[0] = False
                    if "other" not in templates.values():
                        for l, b in enumerate(blocks):
                            b.forward = passthrough(l)
                batch = {k: v.to(device) for k, v in batch.items()}
                try:
                    net(**batch, use_cache=False)
                except TypeError:                   # a backbone without `use_cache`
                    net(**batch)
        finally:
            for h in handles:
                h.remove()
            for b in blocks:
                b.__dict__.pop("forward", None)
        if any(len(c) != len(self.batches) for c in calls):
            raise LayerzipError("not every block ran once per calibration batch; this model's blocks cannot be "
                                "calibrated one by one")
        if broken:
            raise LayerzipError(f"this model changes the hidden state between its blocks (before block {broken[0]}), "
                                "so they cannot be calibrated one by one; leave the blocks' modules out with --exclude")
        return calls

    def _blocks(self, found, inside: dict, on_stats: OnStats, sequential: bool, paired: bool) -> None:
        prefix, blocks = found
        calls = self._capture(blocks)
        h_orig = [block_hidden(*c) for c in calls[0]]          # the original model's stream
        h_cur = list(h_orig) if sequential else None           # the compressed model's stream
        for l, block in enumerate(blocks):   # noqa: E741
            pre = f"{prefix}.{l}."
            local = {n[len(pre):]: n for n in inside if n.startswith(pre)}
            self.emit("block_started", l, local.values())
            if not sequential:
                h_orig = self._stats_pass(block, local, calls[l], h_orig, l, on_stats)
            else:
                h_orig, h_cur = self._sequential_pass(block, local, calls[l], h_orig, h_cur, l, on_stats, paired)
            calls[l] = None                                    # free this block's captured inputs
            self.emit("block_done", l, local.values())

    def _stats_pass(self, block, local, calls, h, l, on_stats):
        """One run of the original block per batch, hooks on its targets: statistics and the next stream."""
        mods = {full: block.get_submodule(loc) for loc, full in local.items()}
        with StatsCollector(mods, {n: linear_shape(m)[1] for n, m in mods.items()}) as col:
            h_next = []
            for b, call in enumerate(calls):
                col.next_pass(self.masks[b])
                h_next.append(run_block(block, call, h[b]))
        if local:
            col.check_complete()
            self.emit("stats_ready", l, local.values(), col.stats)
            on_stats(list(local.values()), col.stats)
        return h_next

    def _sequential_pass(self, block, local, calls, h_orig, h_cur, l, on_stats, paired):
        h_orig_next = None
        if local:
            groups = input_groups(block, local, with_hidden(*calls[0], h_cur[0]))
            pre = {full: loc for loc, full in local.items()}
            firsts = [block.get_submodule(pre[g[0]]) for g in groups]
            refs = None
            if paired:   # the original model's inputs of every group (and its next state), before anything changes
                refs, h_orig_next = [], []
                for b, call in enumerate(calls):
                    xs, y = capture_inputs(block, firsts, *with_hidden(*call, h_orig[b]))
                    refs.append([token_rows(x, self.masks[b]) for x in xs])
                    h_orig_next.append(y)
            for g, (group, first) in enumerate(zip(groups, firsts)):
                stats = (PairedStats if paired else ModuleStats)(linear_shape(first)[1])
                for b, call in enumerate(calls):
                    x = token_rows(capture_input(block, first, *with_hidden(*call, h_cur[b])), self.masks[b])
                    if paired:
                        stats.add_pair(refs[b][g], x)
                    else:
                        stats.add(x)
                shared = {n: stats for n in group}
                self.emit("stats_ready", l, group, shared)
                on_stats(group, shared)
        elif paired:
            h_orig_next = [run_block(block, call, h_orig[b]) for b, call in enumerate(calls)]
        h_cur = [run_block(block, call, h_cur[b]) for b, call in enumerate(calls)]
        return h_orig_next, h_cur
