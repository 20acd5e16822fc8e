"""`layerzip` command line: a thin shell over the Python API. Every command can print one JSON object (--json).

Bad input exits with code 2 and one line on stderr saying what to do."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from typing import Annotated, Optional

import click
import typer

from .errors import LayerzipError

# typer ≥ 0.20 vendors its own click: catch usage errors from both
USAGE_ERRORS = tuple({click.ClickException, getattr(typer, "TyperException", click.ClickException)})

# options shared by several commands
ModelArg = Annotated[str, typer.Argument(help="HF model directory, .gguf file, layerzip directory, or 'minilm'")]
CalibOpt = Annotated[str, typer.Option(help="calibration text: .txt (a document per line), .jsonl, or builtin")]
CalibSamplesOpt = Annotated[int, typer.Option(help="documents (encoders) or windows (causal LMs) used")]
SeqLenOpt = Annotated[int, typer.Option(help="tokens per calibration sequence")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure and decompose the layers of trained neural networks.")


def _emit(obj: dict, as_json: bool, table: str | None = None) -> None:
    if as_json:
        print(json.dumps(obj, default=str))
    else:
        print(table if table is not None else "\n".join(f"{k}: {v}" for k, v in obj.items()
                                                         if not isinstance(v, (dict, list))))


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


@app.command()
def compress(
    model: ModelArg,
    out: str = typer.Option(..., "--out", help="output directory (must be empty unless --force)"),
    method: str = typer.Option("svd-llm", help="decomposition method"),
    keep: float = typer.Option(0.5, help="fraction of the targeted modules' parameters kept, in (0, 1]"),
    calib: CalibOpt = "builtin",
    calib_samples: CalibSamplesOpt = 64,
    seq_len: SeqLenOpt = 512,
    include: Optional[str] = typer.Option(None, help="regex: compress only the linear layers whose name matches"),
    exclude: Optional[str] = typer.Option(None, help="regex: leave matching layers dense"),
    alloc: Optional[str] = typer.Option(None, help="rank allocation: uniform | global (default: the method's best)"),
    sequential: Optional[bool] = typer.Option(None, "--sequential/--no-sequential",
                                              help="calibrate each block on the already compressed blocks' output"),
    correct: Optional[bool] = typer.Option(None, "--correct/--no-correct",
                                           help="refit each left factor by least squares toward the original outputs"),
    fisher: Optional[bool] = typer.Option(None, "--fisher/--no-fisher",
                                          help="svd-llm: weight each output by its loss gradient² (output Fisher)"),
    blocks: Optional[int] = typer.Option(None, help="drop-blocks: number of whole blocks to remove "
                                         "(default: from --keep)"),
    select: str = typer.Option("span", help="drop-blocks: span (smallest angular distance) or influence "
                               "(lowest Block Influence)"),
    heal_steps: int = typer.Option(0, help="then distill towards MODEL on the --calib text for N steps"),
    heal_lr: float = typer.Option(1e-5, help="learning rate of --heal-steps"),
    seed: int = typer.Option(0, help="random seed"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out"),
    as_json: JsonOpt = False,
):
    """Compress MODEL into a factorized model saved at --out.

    --method drop-blocks removes whole blocks; --method drop-blocks+svd-llm then applies low rank to the rest,
    both under one --keep."""
    from .compress import config_from_dict
    from .pipeline import compress_model

    depth = {}
    if method == "drop-blocks" or method.startswith("drop-blocks+"):
        depth = {"method": "drop-blocks", "blocks": blocks, "select": select, "then": method[12:] or None}
    elif blocks is not None or select != "span":
        raise LayerzipError("--blocks and --select apply to --method drop-blocks (or drop-blocks+svd-llm); "
                            "drop them or change --method")
    config = config_from_dict({"method": method, "keep": keep, "alloc": alloc, "sequential": sequential,
                               "correct": correct, "fisher": fisher, "include": include,
                               "exclude": exclude, **depth})
    rep = compress_model(model, out, config, calib, calib_samples, seq_len, force, seed,
                         heal_steps=heal_steps, heal_lr=heal_lr)
    summary = {k: v for k, v in rep.items() if k not in ("modules", "config")}
    _emit(summary, as_json)


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="model to measure"),
    reference: Optional[str] = typer.Option(None, help="original model, for cosine of embeddings (encoders)"),
    text: Optional[str] = typer.Option(None, help="held-out text (.txt / .jsonl); default: held-out docstrings"),
    samples: int = typer.Option(128, help="documents (encoders) or 4×windows (causal LMs) evaluated"),
    seq_len: int = typer.Option(512, help="tokens per window (causal LMs)"),
    retrieval: Optional[str] = typer.Option(None, help=".jsonl of {query, doc} pairs, or builtin (docstring summary -> "
                                     "rest): Recall@1 and MRR"),
    latency: bool = typer.Option(False, "--latency", help="median forward ms at batch 1 and 16, FLOPs per token"),
    latency_seq_len: int = typer.Option(128, help="tokens per sequence for --latency"),
    threads: int = typer.Option(1, help="torch threads fixed for --latency"),
    as_json: JsonOpt = False,
):
    """Parameters, size on disk, perplexity (causal LMs) or cosine to --reference (encoders); optionally
    retrieval quality (--retrieval) and speed (--latency)."""
    from .pipeline import evaluate_model

    _emit(evaluate_model(model, reference, text, samples, seq_len, retrieval=retrieval, latency=latency,
                         latency_seq_len=latency_seq_len, threads=threads), as_json)


@app.command()
def analyze(
    model: ModelArg,
    out: str = typer.Option(..., "--out", help="directory for analysis.json, PNG plots and report.html"),
    calib: CalibOpt = "builtin",
    calib_samples: CalibSamplesOpt = 64,
    seq_len: SeqLenOpt = 512,
    keep: float = typer.Option(0.5, help="budget of the recommended plan (fraction of block parameters kept)"),
    include: Optional[str] = typer.Option(None, help="regex: analyze only the linear layers whose name matches"),
    exclude: Optional[str] = typer.Option(None, help="regex: leave matching layers out"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty --out"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
):
    """Spectra, ranks, Block Influence, angular distances and a plan: analysis.json + plots + report.html."""
    from .analyze import analyze_model

    rep = analyze_model(model, out, calib, calib_samples, seq_len, keep, include, exclude, force,
                        progress=not as_json)
    _emit(rep, as_json)


@app.command()
def heal(
    model: str = typer.Argument(..., help="the compressed model (a layerzip directory)"),
    teacher: str = typer.Option(..., "--teacher", help="the original model to distill from"),
    text: str = typer.Option(..., "--text", help="training text: .txt (a document per line), .jsonl, or builtin"),
    out: str = typer.Option(..., "--out", help="output directory for the healed model"),
    steps: int = typer.Option(100, help="optimizer steps"),
    lr: float = typer.Option(1e-5, help="learning rate (AdamW, warm-up then cosine decay)"),
    samples: int = typer.Option(64, help="documents (encoders) or windows (causal LMs) of --text used"),
    seq_len: int = typer.Option(256, help="tokens per training sequence"),
    batch_size: int = typer.Option(4, help="sequences per step"),
    hints: float = typer.Option(0.0, help="weight of per-block hidden-state hints (FitNets); 0 = off"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out"),
    as_json: JsonOpt = False,
):
    """Distill a compressed model towards --teacher on --text, training only its factor matrices."""
    from .heal import heal_model

    if samples < 1 or seq_len < 2 or batch_size < 1:
        raise LayerzipError("--samples and --batch-size must be ≥ 1 and --seq-len ≥ 2")
    if hints < 0:
        raise LayerzipError(f"--hints must be ≥ 0 (a loss weight), got {hints}")
    rep = heal_model(model, teacher, text, out, steps, lr, samples, seq_len, batch_size, hints, force,
                     progress=not as_json)
    _emit(rep, as_json)


@app.command()
def demo(as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Compress the built-in MiniLM to half its block parameters (svd and svd-llm); before/after table."""
    from .compress import SVD, SVDLLM
    from .models import load_model
    from .pipeline import compress_model, evaluate_model

    rows = []
    ref = load_model("minilm")
    base = evaluate_model("minilm", loaded=ref, ref_loaded=ref, progress=False, retrieval="builtin")
    rows.append({"model": "MiniLM (dense)", "target_params": None, "params": base["params"],
                 "size_on_disk": base["size_on_disk"], "cosine": base["cosine_to_reference"],
                 "recall_at_1": base["recall_at_1"], "seconds": 0.0})
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in (SVD(keep=0.5), SVDLLM(keep=0.5)):
            t = time.perf_counter()
            rep = compress_model("minilm", f"{tmp}/{cfg.name}", cfg, progress=not as_json)
            secs = time.perf_counter() - t
            ev = evaluate_model(f"{tmp}/{cfg.name}", ref_loaded=ref, progress=False, retrieval="builtin")
            rows.append({"model": f"{cfg.name} keep 0.5", "target_params": rep["target_params_after"],
                         "target_params_before": rep["target_params_before"], "params": ev["params"],
                         "size_on_disk": ev["size_on_disk"], "cosine": ev["cosine_to_reference"],
                         "recall_at_1": ev["recall_at_1"], "seconds": secs, "keep_achieved": rep["keep_achieved"]})
    rows[0]["target_params"] = rows[1]["target_params_before"]
    head = (f"{'model':<18} {'block params':>12} {'all params':>11} {'on disk':>10} {'cosine':>7} {'R@1':>6} "
            f"{'seconds':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<18} {r['target_params']:>12,} {r['params']:>11,} {_fmt_bytes(r['size_on_disk']):>10}"
                     f" {r['cosine']:>7.4f} {r['recall_at_1']:>6.3f} {r['seconds']:>8.1f}")
    lines.append(f"cosine: mean cosine of mean-pooled embeddings to the dense model on {base['texts']} held-out "
                 "standard-library docstrings (not in the calibration set); R@1: Recall@1 of each held-out "
                 f"docstring's summary sentence against the rest of all {base['pairs']} docstrings")
    _emit({"rows": rows}, as_json, "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input -> one line on stderr, exit code 2."""
    try:
        app(args=argv, standalone_mode=False, prog_name="layerzip")
    except LayerzipError as e:
        print(f"layerzip: error: {e}", file=sys.stderr)
        sys.exit(2)
    except USAGE_ERRORS as e:
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        print(f"layerzip: error: {' '.join(msg.split())} (see: layerzip --help)", file=sys.stderr)
        sys.exit(2)
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        print("layerzip: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
