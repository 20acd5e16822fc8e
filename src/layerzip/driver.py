"""The block driver: one loop over the model's repeated blocks, in order, for every calibrated method.

    capture block 0's inputs and every block's keyword arguments (a forward of the model whose blocks pass their
    input through: only the embeddings and what the blocks' arguments need run; block 0 runs once, to learn the
    form of a block's output)
    for block l:   block started
                   default:      run block l on the original stream with hooks on its targets -> statistics
                                 (and the original stream's next state, taken before anything changes)
                   --sequential: for each group of targets sharing one input (q/k/v, then o, then gate/up, ...):
                                 run the partly compressed block on the compressed stream, stop at the group's input,
                                 accumulate its Grams (paired with the original stream's input for --correct)
                   statistics ready -> `on_stats(names, stats)` (which may decompose those modules right away)
                   --sequential: the compressed stream's next state = compressed block l (its current state)
                   refine (--refine-steps): fit the decomposed block l on the compressed stream to the original
                                 block's output (refine.py); the compressed stream's next state = block l on it
                   block done
    targets outside the blocks (a head named by --include): one forward of the whole model, before the blocks
    change (default) or after (--sequential)

Events (`BlockEvent`: block started / statistics ready / block done) go to listeners: the progress bar is one,
resumable runs another (block done carries the streams after the block). Kwargs are kept per block: Gemma 3
alternates sliding-window and full attention masks and position embeddings. Holding one block's hidden states for
every batch is the only activation memory the walk needs.

Streamed models (lazy.source_of(model) is set): each block's weights are read from disk while the block is walked
and put back after (`block_done` is emitted while they are still loaded, so a listener can write the block out);
the rest (embeddings, head) only while the capture or the loss runs.

Gradient statistics block by block (`gradients`): forward through the blocks keeping the block-boundary states
(on disk when streamed), the loss and the head on the last state, then backward one block at a time in reverse,
each block recomputed from its input — the same gradients as one backward of the whole model, with one block's
graph in memory.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LayerzipError
from .lazy import is_meta, source_of
from .models import (backbone, block_hidden, capture_input, capture_inputs, check_finite, find_blocks,
                     input_groups, is_causal, linear_shape, run_block, token_rows, with_hidden)
from .stats import (Frozen, ModuleStats, PairedStats, StatsCollector, add_row_fisher, batch_mask, collect_stats,
                    is_contrastive, lm_labels, output_fisher_hooks, pooled_views, sensitivity_loss,
                    sensitivity_samples, zeros_for_missing)

OnStats = Callable[[list, dict], None]
Refiner = Callable[[nn.Module, list, list, list, list, list], dict]
_UNKNOWN = object()       # a block's output form before block 0 has run


@dataclass
class BlockEvent:
    kind: str                   # "block_started" | "stats_ready" | "block_done"
    block: int | None           # index among the repeated blocks; None: targets outside them
    names: list = field(default_factory=list)
    stats: dict | None = None   # stats_ready: {name: statistics}
    streams: dict | None = None  # block_done: {"orig": [...], "cur": [...]} hidden states after the block


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
        self.source = source_of(model)
        self.device = self.source.device if self.source else next(model.parameters()).device
        self.template = _UNKNOWN      # what a block returns: None (a tensor) or (tuple type, the other entries)

    def emit(self, kind: str, block: int | None, names=(), stats=None, streams=None) -> None:
        for f in self.listeners:
            f(BlockEvent(kind, block, list(names), stats, streams))

    def hold(self, block: nn.Module):
        """The block's weights in memory while it is used (streamed models; a no-op otherwise)."""
        if self.source is None or not is_meta(block):
            return contextlib.nullcontext(block)
        return self.source.hold(block)

    def hold_backbone(self):
        """What a capture runs outside the blocks, in memory while it runs (streamed; a no-op otherwise): the
        embeddings, not the LM head."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return self._hold_rest([head] if head is not None else [])

    def hold_head(self):
        """What a run of the head on given last states (`head`, `_injected`) needs: the rest without the input
        embedding, whose lookup such a run replaces. Each hold leaves out one vocabulary matrix when they are
        untied."""
        return self._hold_rest(self._lookup())

    def _hold_rest(self, without: list[nn.Module]):
        if self.source is None:
            return contextlib.nullcontext()
        return self.source.hold_rest(without=tuple(without))

    def _lookup(self) -> list[nn.Embedding]:
        """The input embedding, when it is a plain lookup table that `_injected` can stand in for."""
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        return [emb] if isinstance(emb, nn.Embedding) else []

    def _bar(self, what: str, total: int):
        return tqdm(total=total, desc=f"{self.desc}: {what}", unit="block", disable=not self.progress)

    def collect(self, targets: dict[str, nn.Module]) -> dict:
        """Statistics of every target's input in the original model; the model is left unchanged."""
        out: dict = {}
        self.walk(targets, lambda names, stats: out.update(stats))
        return out

    def _split(self, targets: dict[str, nn.Module]):
        found = find_blocks(self.model)
        prefix = found[0] + "." if found else None
        inside = {n: m for n, m in targets.items() if prefix and n.startswith(prefix)}
        rest = {n: m for n, m in targets.items() if n not in inside}
        if rest and self.source is not None:
            raise LayerzipError(f"{next(iter(rest))} lies outside the repeated blocks, which a streamed model cannot "
                                "calibrate; pass --no-stream or leave it out of --include")
        return found, inside, rest

    @torch.no_grad()
    def walk(self, targets: dict[str, nn.Module], on_stats: OnStats, sequential: bool = False,
             paired: bool = False, start: int = 0, streams: dict | None = None, all_blocks: bool = False,
             collect: bool = True, refine: Refiner | None = None) -> None:
        """Call `on_stats(names, {name: stats})` for every target, block by block. `sequential`: statistics of the
        compressed stream (what `on_stats` did to earlier modules is seen by later ones); `paired` (with
        sequential): PairedStats against the original stream, for the correction. `start`, `streams`: resume at
        block `start` with the streams a `block_done` event carried. `all_blocks`: walk every block even when no
        target is inside (a streamed compression writes every block out). `collect` False: no statistics
        (`on_stats(names, {})`, which has them already). `refine` (not with sequential): after `on_stats`,
        `refine(block, calls, inputs, targets, originals, masks)` fits the changed block on the compressed stream
        (`inputs`) to the original block's output (`targets`; `originals` its input) — refine.Refine."""
        if refine is not None and sequential:
            raise LayerzipError("block refinement walks the original and the compressed stream itself; it does "
                                "not combine with --sequential")
        found, inside, rest = self._split(targets)
        if rest and not sequential:
            self._outside(rest, on_stats, collect)
        if inside or (all_blocks and found):
            bar = Progress(f"{self.desc}: blocks", len(found[1]) - start) if self.progress else None
            self.listeners += [bar] if bar else []
            try:
                self._blocks(found, inside, on_stats, sequential, paired, start, streams, collect, refine)
            finally:
                if bar:
                    self.listeners.remove(bar)
                    bar.close()
        if rest and sequential:
            self._outside(rest, on_stats)

    def _outside(self, rest: dict, on_stats: OnStats, collect: bool = True) -> None:
        self.emit("block_started", None, rest)
        stats = collect_stats(self.model, rest, self.batches, progress=False) if collect else {}
        self.emit("stats_ready", None, rest, stats)
        on_stats(list(rest), stats)
        self.emit("block_done", None, rest)

    def _capture(self, blocks: nn.ModuleList, batches: list[dict]) -> list[list[tuple]]:
        """calls[l][b] = (args, kwargs) of block l on batch b; the hidden state is kept for block 0 only (block l > 0
        gets it from the walk).

        The blocks pass their input through, so the forward only computes the embeddings and what the blocks'
        arguments need (masks, positions); block 0 runs once on the first batch to show what a block returns.
        Every block must then receive block 0's input unchanged: a model that changes the hidden state between
        its blocks (which the walk could not reproduce) is refused."""
        calls: list[list] = [[] for _ in blocks]
        h0: list[torch.Tensor] = []
        broken: list[int] = []

        def pre(l):
            def hook(module, args, kwargs):
                args, kwargs = tuple(args), dict(kwargs)
                h = block_hidden(args, kwargs)
                if l == 0:
                    h0.append(h)
                elif not (h is h0[-1] or (h.shape == h0[-1].shape and torch.equal(h, h0[-1]))):
                    broken.append(l)
                calls[l].append(with_hidden(args, kwargs, None) if l > 0 else (args, kwargs))
            return hook

        def first_run(block, args, kwargs):      # learn the output form from one real run of block 0
            with self.hold(block):
                out = type(block).forward(block, *args, **kwargs)
            if isinstance(out, torch.Tensor):
                return None
            if isinstance(out, (tuple, list)):
                return type(out), tuple(out[1:])
            raise LayerzipError(f"the model's blocks return {type(out).__name__}, not a tensor or tuple, so they "
                                "cannot be calibrated one by one; leave the blocks' modules out with --exclude")

        def passthrough(block):
            def forward(*args, **kwargs):
                if self.template is _UNKNOWN:
                    self.template = first_run(block, args, kwargs)
                return self._as_output(block_hidden(args, kwargs))
            return forward

        handles = [b.register_forward_pre_hook(pre(l), with_kwargs=True) for l, b in enumerate(blocks)]
        for b in blocks:
            b.forward = passthrough(b)
        try:
            with self.hold_backbone():
                for batch in batches:
                    self._run_model(batch)
        finally:
            for h in handles:
                h.remove()
            for b in blocks:
                b.__dict__.pop("forward", None)
        if any(len(c) != len(batches) for c in calls):
            raise LayerzipError("not every block ran once per calibration batch; this model's blocks cannot be "
                                "calibrated one by one")
        if broken:
            raise LayerzipError(f"this model changes the hidden state between its blocks (before block {broken[0]}), "
                                "so they cannot be calibrated one by one; leave the blocks' modules out with --exclude")
        return calls

    def _as_output(self, h: torch.Tensor):
        t = self.template
        return h if t is None else t[0]((h, *t[1]))

    def _run_model(self, batch: dict, head: bool = False, loss=None):
        """One forward of the backbone (or, `head`, of the whole model through `loss(model, batch)`)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if head:
            return loss(self.model, batch)
        net = backbone(self.model)
        try:
            return net(**batch, use_cache=False)
        except TypeError:                   # a backbone without `use_cache`
            return net(**batch)

    @contextlib.contextmanager
    def _injected(self, blocks: nn.ModuleList, h: torch.Tensor):
        """Every block passes its input through, except the last, which returns `h`: a forward of the model then
        runs only the final norm and the head on `h` (and what the blocks' arguments need). The input embedding's
        lookup, whose result the blocks ignore, gives zeros of its shape instead, so its weights need not be read."""
        if self.template is _UNKNOWN:
            raise LayerzipError("internal: the blocks' output form is learned by a capture first")
        lookup = self._lookup()
        for emb in lookup:
            emb.forward = lambda ids, *a, **k: torch.zeros(*ids.shape, emb.embedding_dim, dtype=h.dtype,
                                                           device=h.device)
        for b in blocks[:-1]:
            b.forward = lambda *args, **kwargs: self._as_output(block_hidden(args, kwargs))
        blocks[-1].forward = lambda *args, **kwargs: self._as_output(h)
        try:
            yield
        finally:
            for m in (*lookup, *blocks):
                m.__dict__.pop("forward", None)

    def _blocks(self, found, inside: dict, on_stats: OnStats, sequential: bool, paired: bool, start: int,
                streams: dict | None, collect: bool = True, refine: Refiner | None = None) -> None:
        prefix, blocks = found
        calls = self._capture(blocks, self.batches)
        if streams is None:
            h_orig = [block_hidden(*c) for c in calls[0]]      # the original model's stream
            h_cur = list(h_orig) if sequential or refine else None    # the compressed model's stream
        else:
            h_orig, h_cur = streams.get("orig"), streams.get("cur")
        for l, block in enumerate(blocks):   # noqa: E741
            if l < start:
                calls[l] = None
                continue
            pre = f"{prefix}.{l}."
            local = {n[len(pre):]: n for n in inside if n.startswith(pre)}
            self.emit("block_started", l, local.values())
            with self.hold(block):
                if self.source is not None:
                    check_finite({full: block.get_submodule(loc) for loc, full in local.items()})
                if not sequential:
                    h_next = self._stats_pass(block, local, calls[l], h_orig, l, on_stats, collect)
                    if refine is not None:
                        if local:
                            refine(block, calls[l], h_cur, h_next, h_orig, self.masks)
                        h_cur = [run_block(block, call, h_cur[b]) for b, call in enumerate(calls[l])]
                    h_orig = h_next
                else:
                    h_orig, h_cur = self._sequential_pass(block, local, calls[l], h_orig, h_cur, l, on_stats, paired)
                calls[l] = None                                # free this block's captured inputs
                self.emit("block_done", l, local.values(), streams={"orig": h_orig, "cur": h_cur})

    def _stats_pass(self, block, local, calls, h, l, on_stats, collect: bool = True):
        """One run of the original block per batch, hooks on its targets (`collect`): statistics and the next
        stream."""
        mods = {full: block.get_submodule(loc) for loc, full in local.items()} if collect else {}
        with StatsCollector(mods, {n: linear_shape(m)[1] for n, m in mods.items()}) as col:
            h_next = []
            for b, call in enumerate(calls):
                col.next_pass(self.masks[b])
                h_next.append(run_block(block, call, h[b]))
        if local:
            col.check_complete()
            stats = col.stats if collect else {}
            self.emit("stats_ready", l, local.values(), stats)
            on_stats(list(local.values()), stats)
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

    # ------------------------------------------------------------------------------------ gradients, block by block
    def gradients(self, targets: dict[str, nn.Module], kind: str = "output", micro_batch: int = 2,
                  encoder_loss: str = "embedding", seed: int = 0) -> dict[str, torch.Tensor]:
        """Gradient statistics of the sensitivity loss (stats.sensitivity_loss), one block's graph at a time.
        kind "output": {name: Σ over tokens of (∂L/∂y)²} per output feature (stats.collect_output_fisher);
        "output_cov": their shrunk covariance (collect_output_fisher(full=True));
        "weight": {name: Σ over micro-batches of (∂L/∂W)² per output row} (stats.collect_fisher). Micro-batches,
        seeds and losses are those of the whole-model versions, so the results are the same."""
        found, inside, _ = self._split(targets)
        if not found or len(inside) != len(targets):
            raise LayerzipError("block-wise gradients need every target inside the repeated blocks")
        prefix, blocks = found
        causal = is_causal(self.model)
        micro = sensitivity_samples(self.batches, causal, micro_batch, encoder_loss)
        calls = self._capture(blocks, micro)
        with ActivationStore(spill=self.source is not None) as states:
            h = [block_hidden(*c).detach() for c in calls[0]]
            with torch.no_grad(), self._bar("forward for gradients", len(blocks)) as bar:
                for l, block in enumerate(blocks):   # noqa: E741
                    states.put(l, h)
                    with self.hold(block):
                        h = [run_block(block, calls[l][m], h[m]) for m in range(len(micro))]
                    bar.update(1)
            with self.hold_head():
                with torch.no_grad():       # the contrastive loss's negatives: every document's two views
                    bank = torch.stack([self._head(blocks, b, h[m], pooled_views)
                                        for m, b in enumerate(micro)]) if is_contrastive(causal, encoder_loss) else None
                gen = torch.Generator().manual_seed(seed)
                grads = [self._head_grad(blocks, batch, h[m], causal, m, gen=gen, bank=bank)
                         for m, batch in enumerate(micro)]
            del h
            acc: dict[str, torch.Tensor] = {}
            with self._bar("backward", len(blocks)) as bar:
                for l in reversed(range(len(blocks))):   # noqa: E741
                    h = states.get(l)
                    pre = f"{prefix}.{l}."
                    with self.hold(blocks[l]):
                        mods = {n: blocks[l].get_submodule(n[len(pre):]) for n in inside if n.startswith(pre)}
                        grads = self._block_backward(blocks[l], calls[l], h, grads, mods, kind, acc)
                    calls[l] = None
                    bar.update(1)
        return zeros_for_missing(acc, targets, full=kind == "output_cov")

    def _head(self, blocks, batch: dict, h: torch.Tensor, fn):
        """fn(model, batch) run on the last block's output `h` (only the final norm and the head run)."""
        with self._injected(blocks, h):
            return self._run_model(batch, head=True, loss=fn)

    def _head_grad(self, blocks, batch: dict, h: torch.Tensor, causal: bool, index: int, gen,
                   bank=None) -> torch.Tensor:
        """∂L/∂h of micro-batch `index`'s loss at the last block's output (stats.sensitivity_loss: ε from `gen`, or
        the contrastive loss against `bank`). A causal LM's rows go through the head one at a time, each loss a sum
        over its tokens divided by the micro-batch's count (their sum is the micro-batch's mean loss), so only one
        window's vocabulary-wide logits are ever held."""
        rows = [slice(i, i + 1) for i in range(len(h))] if causal else [slice(None)]
        n_items = (lm_labels(batch)[:, 1:] != -100).sum() if causal else None
        out = []
        for r in rows:
            z = h[r].detach().requires_grad_(True)
            part = {k: v[r] for k, v in batch.items()}
            with torch.enable_grad():
                loss = self._head(blocks, part, z,
                                  lambda mdl, b: sensitivity_loss(mdl, b, causal, n_items, gen=gen, bank=bank,
                                                                 index=index))
                out.append(torch.autograd.grad(loss, [z])[0] if loss.requires_grad else torch.zeros_like(z))
        return torch.cat(out)

    def _block_backward(self, block, calls, h, grads, mods, kind, acc):
        """∂L/∂(block input) for every micro-batch from ∂L/∂(block output), accumulating the targets' statistics."""
        handles = output_fisher_hooks(mods, acc, full=kind == "output_cov") if kind.startswith("output") else []
        weights = {n: m.weight for n, m in mods.items()} if kind == "weight" else {}
        try:
            with Frozen(block):
                for w in weights.values():
                    w.requires_grad_(True)
                out = []
                for m, call in enumerate(calls):
                    x = h[m].detach().requires_grad_(True)
                    with torch.enable_grad():
                        y = run_block(block, call, x)
                        got = torch.autograd.grad(y, [x, *weights.values()], grads[m], allow_unused=True)
                    out.append(got[0] if got[0] is not None else torch.zeros_like(x))
                    for n, g in zip(weights, got[1:]):
                        if g is not None:
                            add_row_fisher(acc, n, mods[n], g)
                return out
        finally:
            for hd in handles:
                hd.remove()

    # ----------------------------------------------------------------------------------------- streamed forwards
    @torch.no_grad()
    def final_states(self, batches: list[dict]) -> list[torch.Tensor]:
        """The last block's output for every batch, the blocks run one at a time (streamed evaluation)."""
        prefix, blocks = find_blocks(self.model)
        calls = self._capture(blocks, batches)
        h = [block_hidden(*c) for c in calls[0]]
        with self._bar("forward", len(blocks)) as bar:
            for l, block in enumerate(blocks):   # noqa: E741
                with self.hold(block):
                    h = [run_block(block, calls[l][b], h[b]) for b in range(len(batches))]
                calls[l] = None
                bar.update(1)
        return h

    def head(self, batch: dict, h: torch.Tensor):
        """The model's own output for `batch` given its last block's output `h`: logits of a causal LM, the
        backbone's output (last_hidden_state) of an encoder."""
        _, blocks = find_blocks(self.model)
        with self._injected(blocks, h), self.hold_head():
            if is_causal(self.model):
                return self._run_model(batch, head=True, loss=lambda mdl, b: mdl(**b, use_cache=False))
            return self._run_model(batch)


class ActivationStore:
    """Lists of tensors by level (block-boundary states), in memory or, `spill`, in safetensors files of a
    temporary directory (removed on exit), so that only one level is in memory at a time."""

    def __init__(self, spill: bool):
        self.spill, self.levels = spill, {}

    def __enter__(self):
        self.dir = tempfile.TemporaryDirectory(prefix="layerzip-states-") if self.spill else None
        return self

    def __exit__(self, *exc):
        self.levels.clear()
        if self.dir is not None:
            self.dir.cleanup()

    def put(self, level: int, tensors: list[torch.Tensor]) -> None:
        if self.dir is None:
            self.levels[level] = list(tensors)
            return
        from safetensors.torch import save_file
        save_file({str(i): t.detach().contiguous() for i, t in enumerate(tensors)},
                  str(Path(self.dir.name) / f"{level}.safetensors"))

    def get(self, level: int) -> list[torch.Tensor]:
        if self.dir is None:
            return self.levels.pop(level)
        from safetensors.torch import load_file
        d = load_file(str(Path(self.dir.name) / f"{level}.safetensors"))
        return [d[str(i)] for i in range(len(d))]
