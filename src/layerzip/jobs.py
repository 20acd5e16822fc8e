"""The path-in / path-out jobs behind the CLI commands: MODEL in, directory or report out.

    compress_model   load -> calibration batches -> compress_ -> (heal) -> save
    evaluate_model   load -> perplexity | cosine to a reference | retrieval | latency
    analyze_model    load -> analyze -> analysis.json, plots, report.html
    heal_model       load both -> heal_ -> save
    export_model     load (float32) -> export_onnx -> FILE.onnx; or one size of an elastic directory -> a plain
                     compressed directory (export_size)
    keep_sweep_model an elastic directory read once -> quality at several sizes, a PNG of the curve
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from . import elastic
from .analyze import analyze, summary
from .compress import compress_
from .data import builtin_pairs, calibration_batches, load_documents
from ._version import __version__
from .errors import LayerzipError
from .evaluate import embed, mean_cosine, perplexity, perplexity_scored, retrieval_metrics
from .heal import HEAL_LR, HEAL_STEPS, heal_, head_supported, windows_per_step
from .images import image_batches
from .allocate import BytesBudget
from .io import (BUILTIN, META, check_bits, check_out_dir, elastic_settings, load_model, read_meta, save,
                 size_on_disk, source_path, tensor_bytes, weights_dtype, write_analysis, written_bytes)
from .executors import make_executor
from .export import RUNTIMES, export_onnx, require_onnx, runtime_latency
from .lazy import source_of
from .methods import CompressConfig
from .models import Loaded, count_params
from .nn import GROUP_SIZE, FactorizedLayer


def _check_sizes(samples: int, seq_len: int, what: str = "--calib-samples") -> None:
    if samples < 1 or seq_len < 2:
        raise LayerzipError(f"{what} must be ≥ 1 and --seq-len ≥ 2")


def resolve_device(device: str) -> str:
    """cpu | cuda | auto (cuda when there is one)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise LayerzipError(f"--device must be cpu, cuda or auto, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise LayerzipError("--device cuda, but torch sees no CUDA device here; use --device cpu or auto")
    return device


def _work_dir(out: Path, run: dict, resume: bool) -> tuple[Path, int]:
    """The hidden `.OUT.partial` directory of a streamed run and the blocks it has already done. A directory
    left by the same run (same arguments and source, run.json) is continued; one of another run is discarded."""
    work = out.parent / f".{out.name}.partial"
    prev = None
    try:
        prev = json.loads((work / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    if prev != run:
        if resume:
            raise LayerzipError(f"--resume: no interrupted run of these arguments at {work}; drop --resume to "
                                "start afresh")
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "run.json").write_text(json.dumps(run))
    try:
        done = json.loads((work / "progress.json").read_text()).get("blocks_done", 0)
    except (OSError, json.JSONDecodeError):
        done = 0
    return work, done


def compress_model(source: str, out: str | Path, config: CompressConfig, calib: str = "builtin",
                   calib_samples: int = 64, seq_len: int = 512, force: bool = False, seed: int = 0,
                   progress: bool = True, heal_steps: int | None = None, heal_lr: float = HEAL_LR,
                   stream: bool | None = None,
                   device: str = "cpu", resume: bool = False, executor: str = "local",
                   workers: int | None = None, dtype: str | None = None, bits: int = 16,
                   group_size: int = GROUP_SIZE, budget_bytes: float | None = None) -> dict:
    """Load MODEL, compress it, save it to `out` (atomically). Returns the report written to layerzip.json.
    `heal_steps` > 0: then distill it towards MODEL on the calibration text (heal.py) before saving; None: the
    default (`default_heal_steps`: HEAL_STEPS for a causal LM that svd-llm compressed in memory, else none).
    `stream`: read one block at a time (None: when the model would not fit, io.needs_streaming); a streamed run
    keeps its progress in `.OUT.partial` and the same command continues a killed run from its last block.
    `executor`: "local" or "ray" (each block's decompositions as Ray tasks; `workers` CPUs of a local cluster).
    `dtype`: of the saved weights (None / "auto": the source's; a .gguf file: bfloat16). `bits` 8 or 4: the low-rank
    factors are written as int8 / packed int4 with a scale per `group_size` values (io.save), after healing.
    `budget_bytes`: the written tensors' bytes (> 1), or that fraction of MODEL's (≤ 1); each module's rank and bits
    (16, 8 or 4; `bits` 8: not 4) are chosen together by the global allocation, and --keep is what that achieves.
    The report's `bytes_before` / `bytes_after`: the tensors of MODEL (in the saved dtype) and those written."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    _check_sizes(calib_samples, seq_len)
    if heal_steps is not None and heal_steps < 0:
        raise LayerzipError(f"--heal-steps must be ≥ 0, got {heal_steps}")
    device = resolve_device(device)
    weights_dtype(dtype)                                          # refused before the (slow) load
    check_bits(bits, group_size)
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or not budget_bytes > 0):
        raise LayerzipError(f"--budget-bytes must be > 0 (bytes, or a fraction ≤ 1 of the model's), got {budget_bytes}")
    if config.elastic:
        stream = _elastic_compress_checks(stream, bits, heal_steps)
    out = check_out_dir(out, force, source_path(source))
    loaded = load_model(source, stream=stream, device=device, budget_tokens=calib_samples * seq_len, dtype=dtype)
    streamed = source_of(loaded.model) is not None
    if streamed and heal_steps:
        raise LayerzipError("--heal-steps needs the whole model in memory; pass --no-stream or heal afterwards")
    if resume and not streamed:
        raise LayerzipError("--resume continues a streamed run; add --stream")
    if streamed and bits != 16:
        raise LayerzipError(f"--bits {bits} needs the whole model in memory, and this run streams it; pass "
                            "--no-stream, or compress with --bits 16")
    bytes_before = tensor_bytes(loaded.model)
    # streamed: batches of 2 sequences, so one block's activations stay small (the Grams are the same sums)
    if _is_vision(loaded.model):                                              # a vision model: images, if given
        if heal_steps and calib == "builtin":
            raise LayerzipError("--heal-steps on a vision model distills on images; pass --calib IMAGES_DIR")
        batches = image_batches(calib, calib_samples, loaded.path) if calib != "builtin" else None
    else:
        batches = (calibration_batches(loaded, calib, calib_samples, seq_len, batch_size=2 if streamed else 8)
                   if config.needs_stats else None)
    work, resumed = None, 0
    if streamed:
        path = Path(loaded.path).resolve()
        run = {"source": str(path), "source_bytes": size_on_disk(path), "config": config.to_dict(),
               "calib": str(calib), "calib_samples": calib_samples, "seq_len": seq_len, "seed": seed, "dtype": dtype,
               "layerzip": __version__}
        work, resumed = _work_dir(out, run, resume)
        source_of(loaded.model).workdir = work
    t_load = time.perf_counter()
    pool = make_executor(executor, workers)
    budget = None
    if budget_bytes is not None:
        budget = BytesBudget(budget_bytes * bytes_before if budget_bytes <= 1 else budget_bytes,
                             (16, 8) if bits == 8 else (16, 8, 4), group_size)
    try:
        report = compress_(loaded.model, config, calib=batches, progress=progress, executor=pool, budget=budget)
    finally:
        pool.close()
    report.update(streamed=streamed, device=device, executor=pool.name)
    if streamed:
        report["resumed_from_block"] = resumed
    used = batches.used if batches is not None else {}
    report["warnings"] = _fewer_than_asked(used, calib_samples, loaded.causal, "calibration")
    if report.get("unrouted_experts"):
        report["warnings"].append(f"{len(report['unrouted_experts'])} expert projections saw no calibration token "
                                  "and stay dense (report: unrouted_experts); more --calib-samples reach more experts")
    default = heal_steps is None
    if default:
        heal_steps = default_heal_steps(loaded, config, streamed, bytes_before, report["warnings"])
    if heal_steps:
        healed = heal_after_compress(loaded, source, calib, calib_samples, seq_len, heal_steps, heal_lr, progress,
                                     report["warnings"] if default else None)
        if healed is not None:
            report["heal"] = healed
    t_comp = time.perf_counter()
    meta = {"method": config.name, "keep": config.keep, "config": report["config"], "requested": config.to_dict(),
            "source": {"model": str(source), "path": str(loaded.path) if loaded.path else None},
            "calibration": {"source": calib, **(report.get("calibration") or {}), **used,
                            "samples": used.get("windows"), "samples_requested": calib_samples,
                            "seq_len_requested": seq_len} if batches is not None else None,
            "report": {k: v for k, v in report.items() if k not in ("modules", "config")}}
    if "share" in report:               # --share: blocks per shared basis, by projection type (auto's choice)
        meta["share"] = report["share"]
    if budget is not None:              # each module at the bits the allocation chose
        bits = report["module_bits"]
        report["budget_bytes"] = budget.total
    save(loaded.model, out, tokenizer=loaded.tokenizer, meta=meta, bits=bits, group_size=group_size)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    t_save = time.perf_counter()
    report.update(out=str(out), seconds=t_save - t0, seconds_load=t_load - t0, seconds_save=t_save - t_comp,
                  size_on_disk_before=size_on_disk(loaded.path),
                  size_on_disk_after=size_on_disk(out), bytes_before=bytes_before, bytes_after=written_bytes(out),
                  bits=bits, group_size=group_size if bits not in (16, {}) else None)
    return report


def default_heal_steps(loaded, config: CompressConfig, streamed: bool, model_bytes: int, warnings: list) -> int:
    """`compress`'s --heal-steps when not given: HEAL_STEPS for a causal LM that svd-llm (without --share or
    --elastic) compressed in memory, when a second copy of the model (the teacher, `model_bytes`) fits in half the
    free memory (else, and for a streamed run, 0 with a warning); 0 for everything else (encoders and images:
    healing was not measured to win there)."""
    if not loaded.causal or config.name != "svd-llm" or config.elastic or config.share is not None \
            or not (streamed or any(isinstance(m, FactorizedLayer) for m in loaded.model.modules())):  # all dense
        return 0
    import psutil
    if streamed or model_bytes > psutil.virtual_memory().available / 2:
        warnings.append("not healed: healing needs the model and a second copy of it (the teacher, "
                        f"{model_bytes / 2**30:.1f} GiB) in memory, and "
                        + ("this run streams the model" if streamed else "they would not fit")
                        + "; heal afterwards with layerzip heal where they fit, or pass --heal-steps 0")
        return 0
    return HEAL_STEPS


def _elastic_compress_checks(stream: bool | None, bits: int, heal_steps: int) -> bool:
    """--elastic: what it cannot be combined with, refused before the load; it is never streamed."""
    if bits != 16:
        raise LayerzipError(f"--bits {bits} cannot be combined with --elastic yet (the low-bit groups of a factor "
                            "change with its rank); compress with --bits 16, or drop --elastic")
    if heal_steps:
        raise LayerzipError("--heal-steps trains the factors of one size, and --elastic stores every size; heal "
                            "one size afterwards (layerzip export DIR --format layerzip --keep K, then heal)")
    if stream:
        raise LayerzipError("--elastic needs the whole model in memory; pass --no-stream")
    return False


def _fewer_than_asked(used: dict, asked: int, causal: bool, what: str) -> list[str]:
    """A warning line when the text gave fewer windows (documents) than asked for."""
    got = used.get("windows", asked)
    if got >= asked:
        return []
    unit = f"windows of {used['seq_len']} tokens" if causal else "documents"
    return [f"the {what} text gave only {got} {unit} of the {asked} asked for; give more text or lower the count"]


def heldout_texts(text: str | None, n: int) -> list[str]:
    return load_documents(text or "builtin-heldout", limit=n)


def evaluate_model(source: str, reference: str | None = None, text: str | None = None, samples: int = 128,
                   seq_len: int = 512, progress: bool = True, loaded: Loaded | None = None,
                   ref_loaded: Loaded | None = None, retrieval: str | None = None,
                   latency: bool = False, latency_seq_len: int = 128, threads: int = 1, stream: bool | None = None,
                   device: str = "cpu", runtime: str = "torch", keep: float | None = None,
                   keep_sweep: list[float] | None = None, plot: str | Path | None = None) -> dict:
    """Parameters, size on disk; perplexity on `text` (causal LMs) or cosine of embeddings to `reference`.
    `stream`: run the blocks one at a time from disk (None: when the model would not fit in memory).

    Causal LMs also report the `windows` and `tokens` scored. `retrieval`: a .jsonl file of {"query", "doc"} pairs -> `recall_at_1`, `mrr` (query i's answer is doc i, ranked
    by cosine of mean-pooled embeddings among all docs). `latency`: median forward milliseconds at batch 1 and 16
    (`latency_seq_len` tokens, `threads` fixed) in `runtime` (torch | onnxruntime) and matmul FLOPs per token;
    with the dense model (`reference`, else the source a compressed directory records) also its latencies in the
    same runtime, the speedups and their ratio to the FLOP bound (export.runtime_latency).
    `keep`: the size of an elastic directory evaluated (`keep`, `keep_achieved` reported); `keep_sweep`: several
    sizes from one load (keep_sweep_model: a row each and a PNG of the curve at `plot`)."""
    if keep_sweep is not None:
        if keep is not None or latency or loaded is not None:
            raise LayerzipError("--keep-sweep evaluates several sizes; drop --keep and --latency")
        return keep_sweep_model(source, keep_sweep, reference, text, samples, seq_len, progress, ref_loaded,
                                retrieval, device, plot)
    _check_sizes(samples, seq_len, "--samples")
    if latency and (threads < 1 or latency_seq_len < 1):
        raise LayerzipError(f"--threads and --latency-seq-len must be ≥ 1, got {threads} and {latency_seq_len}")
    if latency and runtime not in RUNTIMES:
        raise LayerzipError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if latency and runtime == "onnxruntime":
        require_onnx()
    device = resolve_device(device)
    load = lambda s: load_model(s, stream=stream, device=device, statistics=False)   # noqa: E731
    loaded = loaded or load_model(source, stream=stream, device=device, statistics=False, keep=keep)
    if latency and source_of(loaded.model) is not None:
        raise LayerzipError("--latency times the whole model in memory; pass --no-stream")
    res = {"model": str(source), "params": count_params(loaded.model), "size_on_disk": size_on_disk(loaded.path),
           "kind": "causal-lm" if loaded.causal else "encoder", "streamed": source_of(loaded.model) is not None}
    if loaded.elastic:
        res.update(keep=loaded.elastic["keep"], keep_achieved=loaded.elastic["keep_achieved"])
    if loaded.causal:
        texts = heldout_texts(text, None)
        res.update(perplexity_scored(loaded.model, loaded.tokenizer, texts, seq_len, samples // 4 or 1, progress))
        if reference or ref_loaded:
            ref = ref_loaded or load(reference)
            res["reference_perplexity"] = perplexity(ref.model, ref.tokenizer, texts, seq_len, samples // 4 or 1,
                                                     progress)
    elif reference or ref_loaded:
        ref = ref_loaded or load(reference)
        texts = heldout_texts(text, samples)
        a = embed(loaded.model, loaded.tokenizer, texts, progress=progress)
        b = embed(ref.model, ref.tokenizer, texts, progress=progress)
        res["cosine_to_reference"] = mean_cosine(a, b)
        res["texts"] = len(texts)
    if retrieval:
        res.update(retrieval_eval(loaded, retrieval, progress=progress))
    if latency:
        dense, warnings = _dense_of(loaded, reference, ref_loaded, load)
        res.update(runtime_latency(loaded.model, dense, runtime, latency_seq_len, threads, progress=progress))
        res["warnings"] = res.get("warnings", []) + warnings
    return res


def parse_keeps(text: str | list) -> list[float]:
    """"0.9,0.8,0.7" -> [0.9, 0.8, 0.7] (each in (0, 1]; at least one)."""
    parts = text if isinstance(text, (list, tuple)) else [p for p in str(text).replace(" ", "").split(",") if p]
    try:
        keeps = [float(p) for p in parts]
    except ValueError:
        raise LayerzipError(f"--keep-sweep takes keeps separated by commas, such as 0.9,0.7,0.5; got {text!r}") \
            from None
    if not keeps or any(not 0 < k <= 1 for k in keeps):
        raise LayerzipError(f"--keep-sweep takes keeps in (0, 1] separated by commas, such as 0.9,0.7,0.5; got "
                            f"{text!r}")
    return keeps


SWEEP_METRICS = ("perplexity", "cosine_to_reference", "recall_at_1", "mrr")


def keep_sweep_model(source: str, keeps, reference: str | None = None, text: str | None = None, samples: int = 128,
                     seq_len: int = 512, progress: bool = True, ref_loaded: Loaded | None = None,
                     retrieval: str | None = None, device: str = "cpu", plot: str | Path | None = None) -> dict:
    """`eval DIR --keep-sweep K,K,...`: an elastic directory read once, evaluated at each size (the very model
    `lz.load(DIR, keep=K)` builds: elastic.materialized), one row each; the curve drawn into `plot` (default:
    DIR-keep-sweep.png beside DIR), written atomically."""
    keeps = parse_keeps(keeps)
    _check_sizes(samples, seq_len, "--samples")
    device = resolve_device(device)
    path = source_path(source)
    plot = Path(plot) if plot else (path.parent / f"{path.name}-keep-sweep.png" if path is not None else None)
    if plot is not None and plot.suffix.lower() != ".png":
        raise LayerzipError(f"--plot {plot} must be a file path ending in .png")
    info = elastic_settings(source)
    for k in keeps:                     # every keep checked before the (slow) load
        elastic.check_keep(info, k, str(source))
    base = load_model(source, device=device, statistics=False, elastic_form=True)
    ref = ref_loaded or (load_model(reference, device=device, statistics=False) if reference else None)
    rows, ref_ppl = [], None
    for k in keeps:
        with elastic.materialized(base.model, k) as summary:
            r = evaluate_model(source, None, text, samples, seq_len, progress, loaded=base,
                               ref_loaded=ref if (ref is not None and (not base.causal or ref_ppl is None)) else None,
                               retrieval=retrieval, device=device)
        ref_ppl = r.get("reference_perplexity", ref_ppl)
        rows.append({"keep": k, "keep_achieved": summary["keep_achieved"], "params": r["params"],
                     **{m: r[m] for m in SWEEP_METRICS if m in r}})
    res = {"model": str(source), "kind": "causal-lm" if base.causal else "encoder",
           "size_on_disk": size_on_disk(base.path), "keep_sweep": rows}
    if ref_ppl is not None:
        res["reference_perplexity"] = ref_ppl
    if plot is not None and any(m in rows[0] for m in SWEEP_METRICS):
        res["plot"] = str(_plot_sweep(res, plot))
    return res


def _plot_sweep(res: dict, out: Path) -> Path:
    """Quality against keep_achieved, one panel per metric the sweep measured; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["keep_sweep"]
    metrics = [m for m in SWEEP_METRICS if m in rows[0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        pts = sorted((r["keep_achieved"], r[m]) for r in rows)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o")
        if m == "perplexity" and "reference_perplexity" in res:
            ax.axhline(res["reference_perplexity"], color="gray", ls="--", lw=1, label="reference")
            ax.legend()
        ax.set_xlabel("keep achieved (fraction of targeted parameters)")
        ax.set_ylabel(m.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(res['model']).name}: one elastic file, every size", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _dense_of(loaded: Loaded, reference: str | None, ref_loaded: Loaded | None, load) -> tuple:
    """(the dense model latency is compared with, warnings): `reference` if given, else the source a compressed
    directory records in layerzip.json, else none (MODEL is the dense one)."""
    if ref_loaded or reference:
        return (ref_loaded or load(reference)).model, []
    if not (loaded.path and Path(loaded.path).is_dir() and (Path(loaded.path) / META).is_file()):
        return None, []
    src = read_meta(Path(loaded.path)).get("source") or {}
    for cand in (src.get("path"), src.get("model")):
        if cand and (cand in BUILTIN or Path(cand).exists()):
            return load(cand).model, []
    return None, [f"the source recorded in {META} ({src.get('model')}) is not here: no speedup; pass --reference"]


def read_pairs(path: str | Path) -> list[dict]:
    """{"query", "doc"} rows of a .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise LayerzipError(f"retrieval file {path} not found; give a .jsonl file of {{\"query\", \"doc\"}} rows")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
                rows.append({"query": str(r["query"]), "doc": str(r["doc"])})
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LayerzipError(f"{path}:{i} is not a JSON object with 'query' and 'doc'; fix that line") from None
    if len(rows) < 2:
        raise LayerzipError(f"{path} needs at least 2 query/doc pairs")
    return rows


def retrieval_eval(loaded: Loaded, pairs: str | Path | list[dict], progress: bool = True, limit: int = 500) -> dict:
    """Recall@1 and MRR of `pairs` (a .jsonl path, "builtin" — summary sentence -> rest of held-out standard-library
    docstrings, `limit` pairs — or rows) with the model's mean-pooled embeddings."""
    if str(pairs) == "builtin":
        rows = builtin_pairs(limit)
    else:
        rows = read_pairs(pairs) if isinstance(pairs, (str, Path)) else pairs
    q = embed(loaded.model, loaded.tokenizer, [r["query"] for r in rows], progress=progress)
    d = embed(loaded.model, loaded.tokenizer, [r["doc"] for r in rows], progress=progress)
    return retrieval_metrics(q, d)


def analyze_model(source: str, out: str | Path, calib: str = "builtin", calib_samples: int = 64,
                  seq_len: int = 512, keep: float = 0.5, include: str | None = None, exclude: str | None = None,
                  force: bool = False, progress: bool = True) -> dict:
    """`layerzip analyze`: analysis.json, PNG plots and report.html in `out`. Returns the summary."""
    _check_sizes(calib_samples, seq_len)
    out = check_out_dir(out, force, source_path(source))
    loaded = load_model(source)
    batches = calibration_batches(loaded, calib, calib_samples, seq_len)
    doc = analyze(loaded.model, batches, keep, include, exclude, progress)
    doc.update(model=str(source), causal=loaded.causal,
               calibration={"source": str(calib), "samples": calib_samples, "seq_len": seq_len})
    files = write_analysis(doc, out)
    return {**summary(doc), "out": str(out), "analysis": str(files["analysis"]), "report": str(files["html"]),
            "plots": [str(p) for p in files["plots"]]}


def heal_model(compressed: str, teacher: str, text: str, out: str | Path, steps: int = 100, lr: float = 1e-5,
               samples: int = 64, seq_len: int = 256, batch_size: int = 4, hints: float = 0.0,
               force: bool = False, progress: bool = True) -> dict:
    """`layerzip heal`: load both models, distill, save the healed model to `out` (never into COMPRESSED)."""
    if steps < 1 or not lr > 0:
        raise LayerzipError(f"--steps must be ≥ 1 and --lr > 0, got {steps} and {lr}")
    out = check_out_dir(out, force, source_path(compressed))
    student = load_model(compressed)
    ref = load_model(teacher)
    if student.causal != ref.causal or _is_vision(student.model) != _is_vision(ref.model):
        raise LayerzipError("--teacher must be the same kind of model (causal LM, encoder or vision model) as "
                            "COMPRESSED")
    if _is_vision(student.model):
        batches = image_batches(text, samples, student.path, batch_size)
    elif student.tokenizer is None:
        raise LayerzipError(f"{compressed} has no tokenizer files; re-save it with its tokenizer")
    else:
        batches = calibration_batches(student, text, samples, seq_len, batch_size)
    meta = read_meta(student.path) if student.path and (Path(student.path) / META).is_file() else {}
    block_map = (meta.get("report") or {}).get("kept_blocks")
    rep = heal_(student.model, ref.model, batches, steps, lr, student.causal, hints, block_map, progress=progress)
    keep = {k: v for k, v in meta.items() if k not in ("format_version", "layerzip_version", "architecture",
                                                        "dtype", "modules", "bits", "group_size")}
    summary = {k: v for k, v in rep.items() if k != "losses"}
    keep["heal"] = {**summary, "teacher": str(teacher), "text": str(text), "seq_len": seq_len, "samples": samples}
    # the healed factors are written with the bits COMPRESSED was (save validates what layerzip.json says)
    save(student.model, out, tokenizer=student.tokenizer, meta=keep, bits=meta.get("bits", 16),
         group_size=meta.get("group_size", GROUP_SIZE))
    return {**summary, "out": str(out), "teacher": str(teacher)}


def _is_vision(model) -> bool:
    return getattr(model, "main_input_name", None) == "pixel_values"


def heal_after_compress(loaded, source: str, calib: str, samples: int, seq_len: int, steps: int, lr: float,
                        progress: bool = True, skip_unsupported: list | None = None) -> dict | None:
    """`compress --heal-steps N`: distill the just-compressed `loaded.model` towards a fresh copy of `source`.
    `skip_unsupported` (a list: the report's warnings): a causal LM whose logits heal cannot rebuild is left
    unhealed with a warning there (returns None) instead of refused (the default healing)."""
    if _is_vision(loaded.model):          # images: the calibration directory's, 8 per step
        batches = image_batches(calib, samples, loaded.path)
    else:
        batches = calibration_batches(loaded, calib, samples, seq_len,
                                      windows_per_step(seq_len) if loaded.causal else 16)
        if skip_unsupported is not None and loaded.causal and not head_supported(loaded.model, batches[0]):
            skip_unsupported.append(f"not healed: {type(loaded.model).__name__} computes its logits in a way heal "
                                    "does not reproduce")
            return None
    teacher = load_model(source)
    rep = heal_(loaded.model, teacher.model, batches, steps, lr, loaded.causal, progress=progress)
    del teacher
    return {k: v for k, v in rep.items() if k != "losses"}


def export_model(source: str, out: str | Path, fmt: str = "onnx", keep: float | None = None, force: bool = False,
                 opset: int = 18, verify: bool = True, progress: bool = True) -> dict:
    """`layerzip export`: MODEL loaded in float32 (low-bit factors dequantized), written to `out` (FILE.onnx)
    atomically, checked by onnx.checker and, with `verify`, run in onnxruntime against torch (`max_abs_diff`).
    `keep` selects a size of an elastic directory; any other MODEL refuses it. `fmt` "layerzip": that size as a
    plain compressed directory at `out` (export_size)."""
    if fmt == "layerzip":
        return export_size(source, out, keep, force, progress)
    if fmt != "onnx":
        raise LayerzipError(f"--format must be onnx or layerzip, got {fmt!r}")
    out = Path(out)
    if out.suffix != ".onnx":
        raise LayerzipError(f"--out {out} must be a file path ending in .onnx")
    if out.is_dir():
        raise LayerzipError(f"--out {out} is a directory; give a file path ending in .onnx")
    if out.exists() and not force:
        raise LayerzipError(f"--out {out} exists; choose another path or pass --force to replace it")
    src = source_path(source)
    if src is not None and src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise LayerzipError(f"--out {out} is inside the input model {src}; write it elsewhere")
    require_onnx()
    if keep is not None:
        meta = read_meta(src) if src is not None and src.is_dir() and (src / META).is_file() else {}
        if not meta.get("elastic"):
            raise LayerzipError(f"--keep picks a width of an elastic model (compress --elastic), and {source} is "
                                "not one; drop --keep")
    loaded = load_model(source, dtype="float32", keep=keep)
    try:
        rep = export_onnx(loaded.model, out, opset=opset, verify=verify, progress=progress)
    except (LayerzipError, KeyboardInterrupt):
        raise
    except Exception as e:                       # the exporter's or the checker's own failure: one line
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise LayerzipError(f"exporting {source} to ONNX failed ({type(e).__name__}: {first}); nothing was "
                            "written — please report it with the model's config.json") from None
    return {"model": str(source), "kind": "causal-lm" if loaded.causal else "encoder",
            "params": count_params(loaded.model), **_size_of(loaded), **rep}


def _size_of(loaded: Loaded) -> dict:
    return {"keep": loaded.elastic["keep"], "keep_achieved": loaded.elastic["keep_achieved"]} if loaded.elastic \
        else {}


def export_size(source: str, out: str | Path, keep: float | None = None, force: bool = False,
                progress: bool = True) -> dict:
    """`layerzip export DIR --format layerzip --keep K --out SMALL`: one size of an elastic directory written as a
    plain compressed directory (atomically; what a direct compression at that keep writes, without recalibrating).
    `keep` None: the directory's default size."""
    src = source_path(source)
    meta = read_meta(src) if src is not None and src.is_dir() and (src / META).is_file() else {}
    if "elastic" not in meta:
        raise LayerzipError(f"--format layerzip writes one size of an elastic model (compress --elastic), and "
                            f"{source} is not one; compress it with --elastic, or copy it as it is")
    out = check_out_dir(out, force, src)
    if out.resolve().is_relative_to(src.resolve()):
        raise LayerzipError(f"--out {out} is inside the input model {src}; write it elsewhere")
    loaded = load_model(source, keep=keep)
    size = loaded.elastic
    report = {k: v for k, v in (meta.get("report") or {}).items() if k != "elastic"}
    report.update(keep=size["keep"], keep_achieved=size["keep_achieved"], ranks=size["ranks"],
                  target_params_after=size["target_params_after"], params_after=count_params(loaded.model))
    keep_meta = {k: v for k, v in meta.items() if k not in ("format_version", "layerzip_version", "architecture",
                                                            "dtype", "modules", "bits", "group_size", "elastic")}
    keep_meta.update(keep=size["keep"], report=report,
                     config={**(meta.get("config") or {}), "keep": size["keep"], "elastic": False},
                     elastic_source={"path": str(src), "keep": size["keep"], **meta["elastic"]})
    save(loaded.model, out, tokenizer=loaded.tokenizer, meta=keep_meta)
    return {"model": str(source), "out": str(out), "format": "layerzip", "keep": size["keep"],
            "keep_achieved": size["keep_achieved"], "params": count_params(loaded.model),
            "size_on_disk_before": size_on_disk(src), "size_on_disk": size_on_disk(out)}
