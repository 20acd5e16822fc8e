"""End-to-end jobs behind the CLI commands: MODEL path in, directory / report out."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .calibrate import load_documents, token_batches
from .compress import CompressConfig, compress_
from . import depth  # noqa: F401  (registers the "drop-blocks" method)
from .errors import LayerzipError
from .evaluate import embed, flops, latency, mean_cosine, perplexity, retrieval_metrics, size_on_disk
from .io import check_out_dir, save
from .models import Loaded, count_params, fit_seq_len, load_model


def calibration_batches(loaded: Loaded, source: str = "builtin", n_samples: int = 64, seq_len: int = 512,
                        batch_size: int = 8) -> list[dict]:
    """Token batches for calibration (see `calibrate.token_batches`)."""
    # a causal window needs ~seq_len tokens; documents average ~60 tokens, so read enough of them
    docs = load_documents(source, limit=None if loaded.causal else n_samples)
    seq_len = fit_seq_len(loaded.model, seq_len)
    return token_batches(loaded.tokenizer, docs, loaded.causal, n_samples, seq_len, batch_size)


def compress_model(source: str, out: str | Path, config: CompressConfig, calib: str = "builtin",
                   calib_samples: int = 64, seq_len: int = 512, force: bool = False, seed: int = 0,
                   progress: bool = True, heal_steps: int = 0, heal_lr: float = 1e-5) -> dict:
    """Load MODEL, compress it, save it to `out` (atomically). Returns the report written to layerzip.json.
    `heal_steps` > 0: then distill it towards MODEL on the calibration text (heal.py) before saving."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    if calib_samples < 1 or seq_len < 2:
        raise LayerzipError("--calib-samples must be ≥ 1 and --seq-len ≥ 2")
    if heal_steps < 0:
        raise LayerzipError(f"--heal-steps must be ≥ 0, got {heal_steps}")
    loaded = load_model(source)
    out = check_out_dir(out, force, loaded.path)
    batches = calibration_batches(loaded, calib, calib_samples, seq_len) if config.needs_stats else None
    t_load = time.perf_counter()
    report = compress_(loaded.model, config, calib=batches, progress=progress)
    if heal_steps:
        from .heal import heal_after_compress
        report["heal"] = heal_after_compress(loaded, source, calib, calib_samples, seq_len, heal_steps, heal_lr,
                                             progress)
    t_comp = time.perf_counter()
    meta = {"method": config.name, "keep": config.keep, "config": config.to_dict(),
            "source": {"model": str(source), "path": str(loaded.path) if loaded.path else None},
            "calibration": {"source": calib, "samples": calib_samples, "seq_len": seq_len,
                            **(report.get("calibration") or {})},
            "report": {k: v for k, v in report.items() if k not in ("modules", "config")}}
    save(loaded.model, out, tokenizer=loaded.tokenizer, meta=meta)
    t_save = time.perf_counter()
    report.update(out=str(out), seconds=t_save - t0, seconds_load=t_load - t0, seconds_save=t_save - t_comp,
                  size_on_disk_before=size_on_disk(loaded.path),
                  size_on_disk_after=size_on_disk(out))
    return report


def heldout_texts(text: str | None, n: int) -> list[str]:
    return load_documents(text or "builtin-heldout", limit=n)


def evaluate_model(source: str, reference: str | None = None, text: str | None = None, samples: int = 128,
                   seq_len: int = 512, progress: bool = True, loaded: Loaded | None = None,
                   ref_loaded: Loaded | None = None, retrieval: str | None = None,
                   latency: bool = False, latency_seq_len: int = 128, threads: int = 1) -> dict:
    """Parameters, size on disk; perplexity on `text` (causal LMs) or cosine of embeddings to `reference`.

    `retrieval`: a .jsonl file of {"query", "doc"} pairs -> `recall_at_1`, `mrr` (query i's answer is doc i, ranked
    by cosine of mean-pooled embeddings among all docs). `latency`: median forward milliseconds at batch 1 and 16
    (`latency_seq_len` tokens, `threads` fixed) and matmul FLOPs per token."""
    loaded = loaded or load_model(source)
    res = {"model": str(source), "params": count_params(loaded.model), "size_on_disk": size_on_disk(loaded.path),
           "kind": "causal-lm" if loaded.causal else "encoder"}
    if loaded.causal:
        texts = heldout_texts(text, None)
        res["perplexity"] = perplexity(loaded.model, loaded.tokenizer, texts, seq_len, samples // 4 or 1, progress)
        if reference or ref_loaded:
            ref = ref_loaded or load_model(reference)
            res["reference_perplexity"] = perplexity(ref.model, ref.tokenizer, texts, seq_len, samples // 4 or 1,
                                                     progress)
    elif reference or ref_loaded:
        ref = ref_loaded or load_model(reference)
        texts = heldout_texts(text, samples)
        a = embed(loaded.model, loaded.tokenizer, texts, progress=progress)
        b = embed(ref.model, ref.tokenizer, texts, progress=progress)
        res["cosine_to_reference"] = mean_cosine(a, b)
        res["texts"] = len(texts)
    if retrieval:
        res.update(retrieval_eval(loaded, retrieval, progress=progress))
    if latency:
        res.update(latency_eval(loaded.model, latency_seq_len, threads))
    return res


def read_pairs(path: str | Path) -> list[dict]:
    """{"query", "doc"} rows of a .jsonl file."""
    import json
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
    from .calibrate import builtin_pairs
    if str(pairs) == "builtin":
        rows = builtin_pairs(limit)
    else:
        rows = read_pairs(pairs) if isinstance(pairs, (str, Path)) else pairs
    q = embed(loaded.model, loaded.tokenizer, [r["query"] for r in rows], progress=progress)
    d = embed(loaded.model, loaded.tokenizer, [r["doc"] for r in rows], progress=progress)
    return retrieval_metrics(q, d)


def latency_eval(model, seq_len: int = 128, threads: int = 1, repeats: int = 5) -> dict:
    """`latency_ms_batch1`, `latency_ms_batch16` (median of `repeats`) and `flops_per_token` (+ breakdown)."""
    return {"latency_ms_batch1": latency(model, 1, seq_len, repeats, threads=threads),
            "latency_ms_batch16": latency(model, 16, seq_len, max(3, repeats // 2), threads=threads),
            "latency_seq_len": seq_len, "latency_threads": threads, **flops(model, seq_len)}
