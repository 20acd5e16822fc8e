"""One in-place entry point: `compress_(model, config, calib=batches)`.

    select targets -> restructure (drop-blocks) -> gradient statistics -> block driver: activation statistics
    -> allocate ranks -> decompose and swap modules -> report

With uniform ranks every block is decomposed as soon as its statistics are ready (the driver then frees them);
global allocation first collects every module's statistics (its spectra), then allocates, then decomposes.
`--sequential` decomposes inside the driver's walk, each group of modules from the compressed stream.
`--refine-steps` (svd-llm's default): after a block is decomposed, the driver fits its factors on the compressed
stream to the original block's output (refine.py); with the statistics already at hand (global allocation), one
more walk, without hooks, decomposes and refines block by block.
`merge_` turns every factorized layer back into `nn.Linear` (PEFT's `merge_and_unload`).
`--elastic` (elastic.py): the same walk, every module decomposed up to its largest rank of the keep range, then
wrapped as an ElasticLinear with its spectrum and set to `--keep`; the report counts the parameters that size uses.

Streamed models (lazy.source_of(model)): the gradient statistics come from the driver's block-wise backward;
global allocation makes two walks, the first keeping each module's spectrum (and, where the disk has room, each
block's statistics, so that the second reads them instead of running the blocks); every block is written to the
work directory (`source.workdir`) as soon as it is decomposed, with what a restart needs (`_Progress`): a run
killed at block k and started again on the same work directory continues from block k.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import elastic
from .driver import BlockDriver
from .embeddings import factorize_embeddings, split_embeddings, swap_
from .errors import LayerzipError
from .executors import LocalExecutor, make_executor
from .lazy import source_of
from .share import decompose_shared_
from .methods import CompressConfig
from .models import (check_finite, count_params, find_blocks, is_causal, linear_shape, module_params,
                     set_module)
from .allocate import BytesBudget, bytes_options, option_choice
from .io import tensor_bytes
from .nn import (FactorizedLayer, SplitExperts, TiedLowRankHead, dense_weight_and_bias, join_experts_, layer_from_spec,
                 split_experts_)
from .nn.lowbit import rounding_error
from .stats import collect_fisher, collect_output_fisher, stats_from_tensors, stats_tensors, with_fisher


@torch.no_grad()
def compress_(model: nn.Module, config: CompressConfig, calib: list[dict] | None = None, progress: bool = True,
              listeners=(), stats: dict | None = None, executor=None, budget: BytesBudget | None = None) -> dict:
    """Replace the target Linear layers of `model` by factorized ones, in place. Returns a report (JSON-able).
    `listeners`: callables receiving the block driver's events (driver.BlockEvent). `stats`: statistics of the
    original model from `calibrate` (to decompose at several keeps from one calibration); not with --sequential.
    `executor`: where each block's decompositions run (executors.make_executor: "local" or "ray"; same result).
    `budget`: a bytes budget (--budget-bytes): each module's rank and storage bits chosen together, the bits in
    report["module_bits"] for `save(..., bits=report["module_bits"])`.

    >>> import layerzip as lz
    >>> m = lz.load("minilm")                                         # doctest: +SKIP
    >>> batches = lz.calibration_batches(m, "builtin", n_samples=16)  # doctest: +SKIP
    >>> report = lz.compress_(m, lz.SVDLLM(keep=0.5), calib=batches)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    config = config.resolve(model, calib)
    if config.needs_stats and not calib:
        raise LayerzipError(f"method {config.label} needs calibration text; pass --calib FILE or --calib builtin")
    if source_of(model) is not None and (not config.stream_ok or config.elastic):
        raise LayerzipError(f"method {config.label} needs the whole model in memory; pass --no-stream")
    if budget is not None:
        _check_budget(model, config, budget)
    fused = split_experts_(model)      # an MoE layer's experts: each projection a target (a streamed model's are
    routed = config.needs_stats and any(isinstance(m, SplitExperts) for m in model.modules())   # split as it loads)
    unrouted = unrouted_experts(model, calib, progress) if routed else set()
    targets = _routed(config.targets_of(model), unrouted)
    check_finite(targets)
    target_before = module_params(targets.values())
    report = {"method": config.label, "config": config.to_dict(), "params_before": count_params(model),
              "target_params_before": target_before}
    extra = config.restructure_(model, calib, progress)
    if extra:                                   # the architecture changed: what is left to decompose
        targets = _routed(config.targets_of(model), unrouted)
    t_restructure = time.perf_counter()
    inner = config.module_config(module_params(targets.values()), target_before)
    if inner is not None:
        inner = inner.resolve(model, calib)
        embeds, linear = split_embeddings(targets)      # embeddings: their own math and keep (embeddings.py)
        if embeds and inner.elastic:
            raise LayerzipError("--elastic does not cover factorized embeddings yet; leave them out of --include")
        new_embeds, embed_ranks = factorize_embeddings(model, embeds, inner, calib, inner.keep, progress)
        own = not hasattr(executor, "map")
        pool = make_executor(executor) if own else executor
        try:
            modules, ranks, calibration, t_decompose, t_gradients, bits = _decompose(
                model, linear, inner, calib, progress, listeners, stats, pool, budget) if linear else \
                ({}, {}, {}, 0.0, 0.0, {})
        finally:
            if own:
                pool.close()
        modules.update(swap_(model, new_embeds))
        ranks.update(embed_ranks)
    else:
        modules, ranks, calibration, bits = extra.get("modules", {}), extra.get("ranks", {}), None, {}
        t_decompose = t_gradients = 0.0
    t_end = time.perf_counter()
    unused = elastic.unused_params(model) if config.elastic else 0     # stored for larger sizes, not used now
    target_after = module_params(model.get_submodule(n) for n in targets) - unused
    if source_of(model) is None:     # experts with nothing factorized: their own layout again (streamed: weights
        join_experts_(model, fused, {n for n in fused if any(m.startswith(n + ".") for m in modules)})   # not at hand)
    split = {n: m.spec() for n, m in model.named_modules() if isinstance(m, SplitExperts)}
    report.update(extra)
    report.update({
        "params_after": count_params(model) - unused, "target_params_after": target_after, "keep": config.keep,
        "keep_achieved": target_after / target_before, "keep_total": (count_params(model) - unused) / report["params_before"],
        "targets": len(targets), "factorized": len(modules),
        "modules": {**split, **modules}, "seconds_calibration": t_end - t0 - t_decompose,
        "seconds_decomposition": t_decompose,
        "seconds_gradients": t_gradients})
    if extra:
        report["seconds_restructure"] = t_restructure - t0
    if inner is not None and inner is not config:
        report["then_config"] = inner.to_dict()
    if config.elastic:
        report["elastic"] = {**getattr(model, elastic.ATTR), "stored_params": count_params(model),
                             "stored_ranks": {n: m.rank for n, m in elastic.modules(model).items()}}
    if calibration and "refine" in calibration:
        report["refine"] = calibration["refine"]          # block refinement: steps, mean normalized losses, time
    if calibration and "calibration" in calibration:
        report["calibration"] = calibration["calibration"]
        if calibration["whitening"]["inputs"]:
            report["whitening"] = calibration["whitening"]
        if "share" in calibration:               # blocks per shared basis, by projection type
            report["share"] = calibration["share"]
    report["ranks"] = ranks
    if unrouted:
        report["unrouted_experts"] = sorted(unrouted)
    if budget is not None:
        report["module_bits"] = bits
    return report


@torch.no_grad()
def unrouted_experts(model: nn.Module, calib: list[dict], progress: bool = True) -> set[str]:
    """The projections of the SplitExperts' experts that no calibration token is routed to (one pass over the
    blocks, streamed too): with no statistics they are left out of the targets, dense."""
    counts: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            seen = torch.bincount(index.reshape(-1).cpu(), minlength=mod.experts + 1)[: mod.experts]
            counts[name] = counts.get(name, 0) + seen
        return fn
    split = {n: m for n, m in model.named_modules() if isinstance(m, SplitExperts)}
    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in split.items()]
    try:
        BlockDriver(model, calib, progress, desc="routing census").final_states(calib)
    finally:
        for h in handles:
            h.remove()
    return {f"{n}.{proj}.{e}" for n, m in split.items() for e in range(m.experts)
            if n not in counts or not counts[n][e] for proj in ("gate_up", "down")}


def _routed(targets: dict[str, nn.Module], unrouted: set[str]) -> dict[str, nn.Module]:
    return {n: m for n, m in targets.items() if n not in unrouted}


def _weight_keep(config: CompressConfig, shapes: dict, target_params: int) -> float:
    """Biases stay dense: the weight matrices get what `keep` leaves after them."""
    n_bias = target_params - sum(m * n for m, n in shapes.values())
    return min(max((config.keep * target_params - n_bias) / (target_params - n_bias), 1e-9), 1.0)


def calibrate(model: nn.Module, config: CompressConfig, calib: list[dict], progress: bool = True,
              targets: dict[str, nn.Module] | None = None, listeners=()) -> dict:
    """{name: statistics} of the original model that `config` decomposes from (activations through the block
    driver, gradient statistics attached), for every target; the model is left unchanged."""
    config = config.resolve(model, calib)
    targets = split_embeddings(targets or config.targets_of(model))[1]
    if source_of(model) is None:
        _check_stats_memory(targets)
    grads = config_gradients(model, targets, config, calib, progress)
    stats = BlockDriver(model, calib, progress, desc=config.name, listeners=list(listeners)).collect(targets)
    return with_fisher(stats, grads) if grads is not None else stats


def gradients(model: nn.Module, targets: dict[str, nn.Module], kind: str | None, calib: list[dict],
              progress: bool = True, encoder_loss: str = "embedding") -> dict[str, torch.Tensor] | None:
    """The gradient statistics `kind` ("output" | "output_cov" | "weight", see CompressConfig.gradients) of the
    original model:
    one whole-model backward per micro-batch in memory, block by block for a streamed model (the same values).
    `encoder_loss`: an encoder's sensitivity loss (stats.fisher; CompressConfig.encoder_loss)."""
    if kind is None:
        return None
    if kind == "output_cov":
        _check_covariance_memory(targets)
    if source_of(model) is not None:
        return BlockDriver(model, calib, progress, desc="gradients").gradients(targets, kind,
                                                                              encoder_loss=encoder_loss)
    if kind == "weight":
        return collect_fisher(model, targets, calib, is_causal(model), progress, encoder_loss=encoder_loss)
    return collect_output_fisher(model, targets, calib, is_causal(model), progress, full=kind == "output_cov",
                                 encoder_loss=encoder_loss)


def config_gradients(model: nn.Module, targets: dict[str, nn.Module], config: CompressConfig, calib: list[dict],
                     progress: bool = True) -> dict[str, torch.Tensor] | None:
    """The gradient statistics a resolved `config` weights by (its kind, sequences and encoder loss)."""
    return gradients(model, targets, config.gradients, config.gradient_batches(calib), progress, config.encoder_loss)


def _check_covariance_memory(targets: dict[str, nn.Module]) -> None:
    """The output-gradient covariances are summed for every target at once (two out × out float64 each)."""
    import psutil
    need = sum(2 * 8 * linear_shape(m)[0] ** 2 for m in targets.values())
    free = psutil.virtual_memory().available
    if need > free / 2:
        raise LayerzipError(f"--kfac holds {need / 1e9:.1f} GB of output-gradient covariances (two out × out float64 "
                            f"per module) and {free / 1e9:.1f} GB are free; drop --kfac or select fewer modules "
                            "(--include)")


def _check_stats_memory(targets: dict[str, nn.Module]) -> None:
    """Global allocation (and --share) of an in-memory model holds every block's input statistics at once: one
    float64 in × in Gram per distinct input. Counted at its least (targets of one block with the same input width
    taken to share it), so that only a run that cannot fit is refused, before it runs out of memory."""
    import psutil
    inputs = {(re.sub(r"^(.*?\.\d+)\..*$", r"\1", n), linear_shape(m)[1]) for n, m in targets.items()}
    need = sum(8 * i * i for _, i in inputs)
    free = psutil.virtual_memory().available
    if need > free:
        raise LayerzipError(f"the global allocation holds every block's input statistics at once, at least "
                            f"{need / 1e9:.1f} GB of float64 Grams, and {free / 1e9:.1f} GB are free; stream the model "
                            "(--stream, lz.load(..., stream=True)) or pass --alloc uniform")


def _fixed_bytes(model: nn.Module, targets: dict[str, nn.Module], elem_bytes: int | None) -> int:
    """Bytes written for everything but the targets' weight matrices (embeddings, norms, biases, the rest); floating
    tensors at `elem_bytes` each (None: their own dtype's)."""
    weights = [dense_weight_and_bias(m)[0] for m in targets.values()]
    return tensor_bytes(model, elem_bytes) - sum(W.numel() * (elem_bytes or W.element_size()) for W in weights)


def _check_budget(model: nn.Module, config: CompressConfig, budget: BytesBudget) -> None:
    """--budget-bytes refusals, before any calibration."""
    if source_of(model) is not None:
        raise LayerzipError("--budget-bytes chooses low-bit storage, which needs the whole model in memory; pass "
                            "--no-stream")
    if getattr(config, "share", None) is not None:
        raise LayerzipError("--budget-bytes chooses low-bit storage per module, which a shared basis does not have; "
                            "drop --share or --budget-bytes")
    if config.elastic or config.objective == "latency" or config.alloc == "uniform" or not config.uses_stats:
        raise LayerzipError("--budget-bytes chooses ranks and bits by the global allocation of an activation-aware "
                            "method; use --method svd-llm (or asvd/fwsvd with --alloc global), without --elastic, "
                            "--alloc uniform or --objective latency")
    embeds, targets = split_embeddings(config.targets_of(model))
    if embeds:
        raise LayerzipError("--budget-bytes allocates the blocks' Linear layers; leave embeddings / lm_head out of "
                            "--include (or give them --keep with --bits)")
    fixed = _fixed_bytes(model, targets, budget.elem_bytes)
    if budget.total <= fixed:
        raise LayerzipError(f"--budget-bytes {budget.total:.0f} is not more than the {fixed} bytes outside the "
                            "compressed layers (embeddings, norms, biases); give a larger budget")


def _bytes_allocation(model, targets, shapes, spectrum_of, stats, config, budget: BytesBudget, progress: bool):
    """({name: rank or None}, {name: bits}) under `budget`: what lies outside the targets' weight matrices is
    written as it is; the rest of the budget is spent by allocate.option_choice over every rank × bits."""
    weights = {n: dense_weight_and_bias(targets[n])[0] for n in targets}
    fixed = _fixed_bytes(model, targets, budget.elem_bytes)
    options, what = {}, {}
    for n, W in tqdm(weights.items(), desc="bytes options", unit="module", disable=not progress):
        st = stats.get(n)
        diag = st.gram.diagonal() if st is not None and getattr(st, "gram", None) is not None else None
        errors = {b: rounding_error(W.detach(), b, budget.group_size, diag) for b in budget.bits}
        c, l, what[n] = bytes_options(spectrum_of(n), *shapes[n], errors, budget.elem_bytes or W.element_size(),
                                      budget.group_size, normalize=not config.loss_units)
        options[n] = (c, l)
    choice = option_choice(options, budget.total - fixed)
    picked = {n: what[n][i] for n, i in choice.items()}
    return {n: r for n, (r, _) in picked.items()}, {n: b for n, (_, b) in picked.items()}


def _decompose(model, targets, config, calib, progress, listeners, given=None, executor=None, budget=None):
    """Statistics -> ranks -> new modules. Returns ({name: spec}, ranks, calibration summary, seconds spent
    decomposing (the rest is calibration, with which a walk interleaves it), seconds of the gradient pass)."""
    if given is not None and config.sequential:
        raise LayerzipError("precollected statistics cannot be used with --sequential (it recollects them)")
    source = source_of(model)
    if source is not None and given is not None:
        raise LayerzipError("precollected statistics cannot be used with a streamed model")
    shapes = {n: linear_shape(m) for n, m in targets.items()}
    keep = _weight_keep(config, shapes, module_params(targets.values()))
    collect = config.needs_stats and given is None
    saved = _Progress(source.workdir, config) if source is not None else None
    grads, t_gradients = None, time.perf_counter()
    if collect and config.gradients:
        def collect_gradients():
            return config_gradients(model, targets, config, calib, progress)
        grads = saved.cached("gradients", collect_gradients) if saved else collect_gradients()
    t_gradients = time.perf_counter() - t_gradients

    def attach(st: dict) -> dict:
        if not config.reads_gram:
            for s in distinct_stats(st):
                s.keep_gram = False
        return with_fisher(st, grads) if grads is not None else st
    driver = BlockDriver(model, calib or [], progress, desc=config.name, listeners=list(listeners))
    log = _StatsLog()
    stats: dict = dict(given or {})
    if getattr(config, "share", None) is not None:     # bases shared across blocks: every block's statistics first
        if collect:
            _check_stats_memory(targets)
            stats = attach(driver.collect(targets))
        t = time.perf_counter()
        modules, ranks, sizes = decompose_shared_(model, targets, config, stats, keep, progress)
        log.add(stats)
        return modules, ranks, {**log.summary(), "share": sizes}, time.perf_counter() - t, t_gradients, {}
    t = time.perf_counter()                    # allocation (the spectra's SVDs) counts as decomposition

    def spectrum(name, st):
        W, _ = dense_weight_and_bias(targets[name])
        return config.spectrum(W.detach().to(torch.float64), st).cpu()
    spectrum_of = None
    if config.needs_spectra and saved is not None:      # streamed: a first walk keeps the spectra (stats on disk)
        spectrum_of = saved.spectra_walk(driver, targets, attach, spectrum).__getitem__
    elif config.needs_spectra:
        if collect:
            _check_stats_memory(targets)
            stats = attach(driver.collect(targets))
            t = time.perf_counter()
        spectrum_of = lambda name: spectrum(name, stats.get(name))   # noqa: E731
    if config.elastic:      # every size of the range: each module up to its largest rank there, spectra kept
        spectra = {n: spectrum_of(n) for n in shapes}
        ranks = elastic.stored_ranks(config, shapes, spectra, module_params(targets.values()))
    elif budget is not None:    # ranks and storage bits together, under a bytes budget
        ranks, bits = _bytes_allocation(model, targets, shapes, spectrum_of, stats, config, budget,
                                         progress)
    else:
        ranks = config.ranks(shapes, keep, spectrum_of)
    bits = {n: b for n, b in bits.items() if b != 16} if budget is not None else {}
    chosen = {n: m for n, m in targets.items() if ranks[n] is not None}
    modules: dict[str, dict] = {}
    seconds = time.perf_counter() - t

    executor = executor or LocalExecutor()
    refine = _RefineLog(config.refine) if config.refine_steps and chosen else None
    if refine is not None and not calib:
        raise LayerzipError("--refine-steps fits each block on calibration text; pass calibration batches or "
                            "--refine-steps 0")

    def decompose(names, st):
        nonlocal seconds
        t = time.perf_counter()

        def job(name):
            W, bias = dense_weight_and_bias(chosen[name])
            return config, W.detach().to(torch.float64), bias, st.get(name), ranks[name]
        for name, new in zip(names, executor.map(build_layer, map(job, names))):
            W = dense_weight_and_bias(chosen[name])[0]
            set_module(model, name, new.to(device=W.device, dtype=W.dtype))
            modules[name] = new.spec()
            if source is not None:      # streamed: the replaced layer's weights were read for this block only,
                chosen[name].to("meta")   # and `chosen` would keep them for the rest of the run
        log.add(st)
        seconds += time.perf_counter() - t

    if saved is not None:
        saved.walk(model, driver, chosen, config, collect, decompose, attach, modules, log, refine)
    elif collect and (config.sequential or not stats):
        stats = {}                             # the walk recollects (sequential) or collects as it goes
        driver.walk(chosen, lambda names, st: decompose(names, attach(st)), sequential=config.sequential,
                    paired=config.sequential and config.correct, refine=refine)
    elif refine is not None:                   # statistics at hand; a walk for the refinement's streams
        driver.walk(chosen, lambda names, _: decompose(names, {n: stats[n] for n in names if n in stats}),
                    collect=False, refine=refine)
    else:
        groups: dict[int, list[str]] = {}        # modules that read one input together, as a walk gives them
        for name in chosen:
            groups.setdefault(id(stats[name]) if name in stats else id(name), []).append(name)
        for names in tqdm(groups.values(), desc=f"decomposing ({config.name})", unit="input", disable=not progress):
            decompose(names, {n: stats[n] for n in names if n in stats})
    if config.elastic:      # ElasticLinear modules, set to --keep: the ranks reported are that size's
        modules, now = elastic.wrap_(model, list(targets), spectra, config)
        ranks = now["ranks"]
    summary = log.summary() if config.needs_stats else {}
    if refine is not None:
        summary["refine"] = refine.summary()
    return modules, ranks, summary, seconds, t_gradients, bits


class _RefineLog:
    """refine.Refine applied per block by the driver, its losses and time kept for the report."""

    def __init__(self, refine):
        self.refine, self.blocks, self.seconds = refine, [], 0.0

    def __call__(self, *args):
        t = time.perf_counter()
        out = self.refine(*args)
        self.seconds += time.perf_counter() - t
        if out:
            self.blocks.append(out)
        return out

    def summary(self) -> dict:
        n = max(len(self.blocks), 1)
        return {"steps": self.refine.steps, "lr": self.refine.lr, "blocks": len(self.blocks),
                "loss_first": sum(b["loss_first"] for b in self.blocks) / n,
                "loss_last": sum(b["loss_last"] for b in self.blocks) / n,
                "drift": sum(b["drift"] for b in self.blocks) / n, "seconds": self.seconds}


class _Progress:
    """What a streamed compression keeps in its work directory, so that a killed run resumes where it stopped:

        gradients.safetensors, spectra.safetensors   the first passes' results, once computed
        spectra-0000k.safetensors, spectra-streams.safetensors
                                                     global allocation's first walk, block by block (resumable)
        stats-0000k.safetensors                      block k's activation statistics from that walk, when the disk
                                                     has room for all of them: the second walk then reads them
                                                     instead of running the blocks again (not with --sequential,
                                                     whose statistics come from the compressed stream)
        block-0000k.safetensors                      block k as decomposed (the model reads it from there)
        streams.safetensors                          the hidden states after the last finished block
        progress.json                                the config, blocks done, their module specs, the stats log

    Each file is written under a temporary name and renamed, progress.json last, so a kill at any point leaves
    the previous consistent state. The caller (jobs.compress_model) checks that the directory belongs to the same
    run (arguments and source)."""

    def __init__(self, workdir: Path, config: CompressConfig):
        self.dir, self.config = Path(workdir), config
        self.dir.mkdir(parents=True, exist_ok=True)
        f = self.dir / "progress.json"
        self.state = json.loads(f.read_text()) if f.is_file() else {}
        if self.state and self.state.get("config") != config.to_dict():
            self.state = {}                  # another configuration: start again

    STATS_DISK_SHARE = 0.5        # the statistics go to disk when all blocks' take at most this share of free space

    def _save_tensors(self, name: str, tensors: dict) -> None:
        from safetensors.torch import save_file
        tmp = self.dir / f"{name}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(self.dir / name)

    def _load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file
        return load_file(str(self.dir / name))

    def _save_streams(self, name: str, streams: dict) -> None:
        self._save_tensors(name, {f"{k}.{i}": t for k, v in streams.items() if v for i, t in enumerate(v)})

    def _load_streams(self, name: str) -> dict:
        raw = self._load_tensors(name)
        return {k: [raw[f"{k}.{i}"] for i in range(sum(x.startswith(k + ".") for x in raw))] or None
                for k in ("orig", "cur")}

    def spectra_walk(self, driver: BlockDriver, targets: dict, attach, spectrum) -> dict[str, torch.Tensor]:
        """Global allocation's first walk over a streamed model: each module's spectrum. Each block's statistics
        are written to disk (before anything frees their Grams) when all blocks' fit in STATS_DISK_SHARE of the
        free space, judged at the first block; the second walk then needs no forward. Resumes block by block."""
        if "spectra" in self.state.get("cached", []):
            return self._load_tensors("spectra.safetensors")
        blocks = find_blocks(driver.model)[1]
        start = self.state.get("spectra_blocks", 0)
        spectra: dict[str, torch.Tensor] = {}
        for l in range(start):   # noqa: E741
            spectra.update(self._load_tensors(f"spectra-{l:05d}.safetensors"))
        streams = self._load_streams("spectra-streams.safetensors") if start else None
        block, pending = [None], {}

        def keep(names, st):
            if self.state.get("stats_on_disk") is None:
                need = sum(t.numel() * t.element_size() for t in stats_tensors(st).values()) * len(blocks)
                self._commit(stats_on_disk=need < self.STATS_DISK_SHARE * shutil.disk_usage(self.dir).free)
            if self.state["stats_on_disk"]:
                self._save_tensors(f"stats-{block[0]:05d}.safetensors", stats_tensors(st))
            st = attach(st)
            pending.update({n: spectrum(n, st.get(n)) for n in names})

        def listener(ev):
            if ev.block is None:
                return
            if ev.kind == "block_started":
                block[0] = ev.block
            elif ev.kind == "block_done":
                self._save_tensors(f"spectra-{ev.block:05d}.safetensors", pending)
                spectra.update(pending)
                pending.clear()
                self._save_streams("spectra-streams.safetensors", ev.streams)
                self._commit(spectra_blocks=ev.block + 1)
        driver.listeners.append(listener)
        try:
            driver.walk(targets, keep, start=start, streams=streams, all_blocks=True)
        finally:
            driver.listeners.remove(listener)
        self._save_tensors("spectra.safetensors", spectra)
        self._commit(cached=sorted(set(self.state.get("cached", [])) | {"spectra"}))
        for f in [*self.dir.glob("spectra-*.safetensors")]:
            f.unlink()
        return spectra

    def cached(self, name: str, compute) -> dict[str, torch.Tensor]:
        f = self.dir / f"{name}.safetensors"
        if f.is_file() and name in self.state.get("cached", []):
            return self._load_tensors(f.name)
        out = compute()
        self._save_tensors(f.name, out)
        self._commit(cached=sorted(set(self.state.get("cached", [])) | {name}))
        return out

    def _commit(self, **changes) -> None:
        self.state.update(changes, config=self.config.to_dict())
        tmp = self.dir / "progress.json.tmp"
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.dir / "progress.json")

    def _restore(self, model, source, blocks, prefix: str, modules: dict, log: "_StatsLog") -> tuple[int, dict | None]:
        """Blocks already done: their factorized modules put in place (on meta) and read from their shards."""
        from safetensors import safe_open
        done = self.state.get("blocks_done", 0)
        for l in range(done):   # noqa: E741
            pre = f"{prefix}.{l}."
            for name, spec in self.state["modules"].items():
                if name.startswith(pre):
                    old = model.get_submodule(name)
                    set_module(model, name, layer_from_spec(spec, dtype=next(old.parameters()).dtype, device="meta"))
                    modules[name] = spec
            shard = self.dir / f"block-{l:05d}.safetensors"
            with safe_open(str(shard), framework="pt") as h:
                source.adopt(pre, list(h.keys()), shard)
        log.__dict__.update(self.state.get("log", {}))
        if not done or not (self.dir / "streams.safetensors").is_file():    # none when the stats were on disk
            return done, None
        return done, self._load_streams("streams.safetensors")

    def walk(self, model, driver, chosen, config, collect, decompose, attach, modules, log, refine=None) -> None:
        source = source_of(model)
        prefix, blocks = find_blocks(model)
        start, streams = self._restore(model, source, blocks, prefix, modules, log)

        def block_done(l, streams):   # noqa: E741
            source.offload(blocks[l], self.dir / f"block-{l:05d}.safetensors")
            if streams is not None:
                self._save_streams("streams.safetensors", streams)
            self._commit(blocks_done=l + 1, modules=modules, log=dict(log.__dict__))
            (self.dir / f"stats-{l:05d}.safetensors").unlink(missing_ok=True)

        on_disk = collect and not config.sequential and self.state.get("stats_on_disk")

        def from_disk(names):
            if not (on_disk and names):
                return {}
            l = int(names[0][len(prefix) + 1:].split(".")[0])    # noqa: E741
            st = stats_from_tensors(self._load_tensors(f"stats-{l:05d}.safetensors"))
            return attach({n: st[n] for n in names})

        if (collect and not on_disk) or refine is not None:     # a walk: statistics as it goes, or refinement
            def listener(ev):
                if ev.kind == "block_done" and ev.block is not None:
                    block_done(ev.block, ev.streams)
            gathers = collect and not on_disk
            driver.listeners.append(listener)
            try:
                driver.walk(chosen, lambda names, st: decompose(names, attach(st) if gathers else from_disk(names)),
                            sequential=config.sequential, paired=config.sequential and config.correct, start=start,
                            streams=streams, all_blocks=True, collect=gathers, refine=refine)
            finally:
                driver.listeners.remove(listener)
            return
        for l in tqdm(range(start, len(blocks)), desc=f"decomposing ({config.name})", unit="block",   # noqa: E741
                      disable=not driver.progress):
            with driver.hold(blocks[l]):
                names = [n for n in chosen if n.startswith(f"{prefix}.{l}.")]
                check_finite({n: chosen[n] for n in names})
                decompose(names, from_disk(names))
                block_done(l, None)


class _StatsLog:
    """What the report says about the statistics used: tokens, distinct inputs, whitening that needed help.
    Built as modules are decomposed (a walk frees each block's statistics once its modules are done)."""

    def __init__(self):
        self.tokens, self.inputs = 0, 0
        self.jitter: list[float] = []
        self.eigen = self.whitened = 0

    def add(self, stats: dict) -> None:
        for s in distinct_stats(stats):
            self.inputs += 1
            self.tokens = max(self.tokens, s.tokens)
            wt = s.__dict__.get("whitening")          # computed (and cached) only by methods that whiten
            if wt is not None:
                self.whitened += 1
                self.eigen += not wt.triangular
                if wt.jitter > 0:
                    self.jitter.append(wt.jitter / max(wt.scale, 1e-300))

    def summary(self) -> dict:
        return {"calibration": {"tokens": self.tokens, "distinct_inputs": self.inputs},
                "whitening": {"inputs": self.whitened, "jittered": len(self.jitter),
                              "max_relative_jitter": max(self.jitter, default=0.0), "eigen_fallback": self.eigen}}


def distinct_stats(stats: dict) -> list:
    """The activation statistics behind `stats`, each once (modules reading one input share them; a FisherStats
    wraps its module's shared `base`)."""
    return list({id(s): s for s in (getattr(s, "base", None) or s for s in stats.values())}.values())


def build_layer(config: CompressConfig, W: torch.Tensor, bias, stats, rank: int) -> nn.Module:
    """One target's replacement from its float64 weight (an executor's job; the caller casts it back and swaps it
    in on the weight's device and dtype)."""
    return config.build_layer(W, bias, stats, rank)


@torch.no_grad()
def merge_(model: nn.Module, kind: type = FactorizedLayer) -> nn.Module:
    """Every factorized layer (every instance of `kind`) back to a plain `nn.Linear` (same outputs up to rounding),
    in place. Returns model.

    >>> from layerzip.nn import LowRankLinear
    >>> m = nn.Sequential(LowRankLinear(8, 4, rank=2))
    >>> type(merge_(m)[0]).__name__
    'Linear'
    """
    tied = [(n, m.tied_to) for n, m in model.named_modules() if isinstance(m, TiedLowRankHead)]
    for name, mod in list(model.named_modules()):
        if isinstance(mod, kind):
            set_module(model, name, mod.to_dense())
    for head, emb in tied:                     # a tied head and its merged embedding: one weight again
        if isinstance(getattr(model.get_submodule(emb), "weight", None), nn.Parameter):
            model.get_submodule(head).weight = model.get_submodule(emb).weight
    return model
