"""`layerzip` command line: a thin shell over the jobs (jobs.py). Every command can print one JSON object (--json).

`compress` offers every field of every registered method's config as an option (`--alpha`, `--energy`, ...),
with the field's help; an option that does not apply to the chosen --method is refused by `config_from_dict`.
Bad input exits with code 2 and one line on stderr saying what to do."""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
import typing

import click

from ._version import __version__
from .errors import LayerzipError
from .heal import HEAL_LR
from .io import DTYPES
from .registry import METHODS


def _emit(obj: dict, as_json: bool, table: str | None = None) -> None:
    for w in obj.get("warnings") or []:
        print(f"layerzip: warning: {w}", file=sys.stderr)
    if as_json:
        print(json.dumps(obj, default=str))
    else:
        print(table if table is not None else "\n".join(f"{k}: {v}" for k, v in obj.items()
                                                         if not isinstance(v, (dict, list))))


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


# options shared by several commands
model_arg = click.argument("model")
json_opt = click.option("--json", "as_json", is_flag=True, help="print one JSON object")
force_opt = click.option("--force", is_flag=True, help="replace a non-empty --out")
device_opt = click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "auto"]),
                          help="where forward passes, statistics and decompositions run")


def calib_opts(f):
    for opt in reversed([
            click.option("--calib", default="builtin", show_default=True,
                         help="calibration text: .txt (a document per line), .jsonl, or builtin"),
            click.option("--calib-samples", default=64, show_default=True,
                         help="documents (encoders) or windows (causal LMs) used"),
            click.option("--seq-len", default=512, show_default=True, help="tokens per calibration sequence")]):
        f = opt(f)
    return f


def _plain(tp):
    """float / int / str / bool of an annotation such as `float | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def method_options(f):
    """One option per config field of every registered method (the first definition's help), default None: not
    given, so each method's own default applies (shown where all methods share it)."""
    fields: dict[str, tuple] = {}
    for cls in METHODS.values():
        hints = typing.get_type_hints(cls)
        for fld in dataclasses.fields(cls):
            tp = _plain(hints[fld.name])
            if tp in (bool, int, float, str):
                fields.setdefault(fld.name, (fld.metadata.get("help", ""), tp, set()))[2].add(fld.default)
    for name, (help_, tp, defaults) in reversed(fields.items()):
        flag = "--" + name.replace("_", "-")
        default = next(iter(defaults)) if len(defaults) == 1 else None
        if default not in (None, False):
            help_ += f"  [default: {default}]"
        if tp is bool:
            f = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_)(f)
        else:
            f = click.option(flag, name, type=tp, default=None, help=help_)(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, no_args_is_help=True)
@click.version_option(__version__, "--version", prog_name="layerzip")
def app():
    """Measure and decompose the layers of trained neural networks."""


@app.command()
@model_arg
@click.option("--out", required=True, help="output directory (must be empty unless --force)")
@click.option("--method", default="svd-llm", show_default=True,
              help=f"decomposition method: {', '.join(METHODS)} (drop-blocks+METHOD: both under one --keep)")
@calib_opts
@method_options
@click.option("--heal-steps", type=int, default=None,
              help="then distill towards MODEL on the --calib text, one window of about 512 tokens a step; 0: off  "
                   "[default: 32 for a causal LM that svd-llm compresses in memory, else 0]")
@click.option("--heal-lr", default=HEAL_LR, show_default=True, help="learning rate of --heal-steps")
@click.option("--seed", default=0, show_default=True, help="random seed")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES),
              help="dtype of the saved weights: auto keeps the source's (a .gguf file: bfloat16); the factors are "
                   "computed in float64 and cast once")
@click.option("--bits", default=16, show_default=True, type=int,
              help="storage of the low-rank factors: 16 (the model's dtype), 8 (int8) or 4 (int4, two per byte), "
                   "with a float32 scale per --group-size values; dequantized on load")
@click.option("--budget-bytes", type=float, default=None,
              help="bytes of the written tensors (> 1; 250e6 = 250 MB), or that fraction of the model's (≤ 1): each "
                   "layer's rank and storage (16, 8 or 4 bits; --bits 8: not 4) chosen together by the global "
                   "allocation, instead of --keep")
@click.option("--group-size", default=128, show_default=True, type=int,
              help="values per scale of --bits 8/4, along each factor's input dimension (that dimension when "
                   "smaller)")
@click.option("--stream/--no-stream", default=None,
              help="read one block at a time from disk [default: when the model would not fit in memory]")
@device_opt
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="where each block's decompositions run: this process, or Ray tasks (RAY_ADDRESS, else a local "
                   "cluster; pip install 'layerzip[ray]')")
@click.option("--workers", type=click.IntRange(min=1), help="CPUs of the local Ray cluster [default: all]")
@click.option("--resume", is_flag=True, help="require an interrupted streamed run of the same arguments to continue "
                                             "(the same command continues one anyway)")
@force_opt
@json_opt
def compress(model, out, method, calib, calib_samples, seq_len, heal_steps, heal_lr, seed, dtype, bits, budget_bytes,
             group_size, stream, device, executor, workers, resume, force, as_json, **options):
    """Compress MODEL into a factorized model saved at --out.

    --method drop-blocks removes whole blocks; --method drop-blocks+svd-llm then applies low rank to the rest,
    both under one --keep."""
    from .jobs import compress_model
    from .methods import config_from_dict

    config = config_from_dict({"method": method, **options})
    rep = compress_model(model, out, config, calib, calib_samples, seq_len, force, seed,
                         heal_steps=heal_steps, heal_lr=heal_lr, stream=stream, device=device, resume=resume,
                         executor=executor, workers=workers, dtype=dtype, bits=bits, group_size=group_size,
                         budget_bytes=budget_bytes)
    _emit({k: v for k, v in rep.items() if k not in ("modules", "config")}, as_json)


@app.command("eval")
@model_arg
@click.option("--reference", help="original model, for cosine of embeddings (encoders)")
@click.option("--text", help="held-out text (.txt / .jsonl); default: held-out docstrings")
@click.option("--samples", default=128, show_default=True, help="documents (encoders) or 4×windows (causal LMs)")
@click.option("--seq-len", default=512, show_default=True, help="tokens per window (causal LMs)")
@click.option("--retrieval", help=".jsonl of {query, doc} pairs, or builtin (docstring summary -> rest): "
                                  "Recall@1 and MRR")
@click.option("--latency", is_flag=True, help="median forward ms at batch 1 and 16, FLOPs per token")
@click.option("--latency-seq-len", default=128, show_default=True, help="tokens per sequence for --latency")
@click.option("--threads", default=1, show_default=True, help="threads fixed for --latency")
@click.option("--runtime", default="torch", show_default=True, type=click.Choice(["torch", "onnxruntime"]),
              help="where --latency runs (onnxruntime: exported to ONNX first; pip install 'layerzip[onnx]'); "
                   "the dense model (--reference, else the recorded source) runs in the same one")
@click.option("--stream/--no-stream", default=None,
              help="run one block at a time from disk [default: when the model would not fit in memory]")
@click.option("--keep", type=float, help="elastic models only: the size evaluated [default: its --keep]")
@click.option("--keep-sweep", help="elastic models only: several sizes from one load, e.g. 0.9,0.8,0.7,0.6,0.5; "
                                   "prints a row each and plots the curve (--plot)")
@click.option("--plot", help="PNG of --keep-sweep's curve [default: MODEL-keep-sweep.png beside MODEL]")
@device_opt
@json_opt
def eval_(model, reference, text, samples, seq_len, retrieval, latency, latency_seq_len, threads, runtime, stream,
          keep, keep_sweep, plot, device, as_json):
    """Parameters, size on disk, perplexity (causal LMs) or cosine to --reference (encoders); optionally
    retrieval quality (--retrieval) and speed (--latency); an elastic model at --keep K or at every size of
    --keep-sweep."""
    from .jobs import evaluate_model

    if plot and not keep_sweep:
        raise LayerzipError("--plot draws the curve of --keep-sweep; add --keep-sweep K,K,... or drop --plot")
    res = evaluate_model(model, reference, text, samples, seq_len, retrieval=retrieval, latency=latency,
                         latency_seq_len=latency_seq_len, threads=threads, stream=stream, device=device,
                         runtime=runtime, progress=not as_json, keep=keep, keep_sweep=keep_sweep, plot=plot)
    _emit(res, as_json, _sweep_table(res) if "keep_sweep" in res else None)


def _sweep_table(res: dict) -> str:
    """One line per size of --keep-sweep."""
    from .jobs import SWEEP_METRICS
    metrics = [m for m in SWEEP_METRICS if m in res["keep_sweep"][0]]
    head = f"{'keep':>6} {'achieved':>9} {'params':>12} " + " ".join(f"{m:>20}" for m in metrics)
    lines = [head, "-" * len(head)]
    for r in res["keep_sweep"]:
        lines.append(f"{r['keep']:>6.3f} {r['keep_achieved']:>9.4f} {r['params']:>12,} "
                     + " ".join(f"{r[m]:>20.4f}" for m in metrics))
    if "reference_perplexity" in res:
        lines.append(f"reference perplexity: {res['reference_perplexity']:.4f}")
    if "plot" in res:
        lines.append(f"plot: {res['plot']}")
    return "\n".join(lines)


@app.command()
@model_arg
@click.option("--out", required=True, help="directory for analysis.json, PNG plots and report.html")
@calib_opts
@click.option("--keep", default=0.5, show_default=True,
              help="budget of the recommended plan (fraction of block parameters kept)")
@click.option("--include", help="regex: analyze only the linear layers whose name matches")
@click.option("--exclude", help="regex: leave matching layers out")
@click.option("--force", is_flag=True, help="replace a non-empty --out")
@json_opt
def analyze(model, out, calib, calib_samples, seq_len, keep, include, exclude, force, as_json):
    """Spectra, ranks, Block Influence, angular distances and a plan: analysis.json + plots + report.html."""
    from .jobs import analyze_model

    _emit(analyze_model(model, out, calib, calib_samples, seq_len, keep, include, exclude, force,
                        progress=not as_json), as_json)


@app.command()
@click.argument("model")
@click.option("--teacher", required=True, help="the original model to distill from")
@click.option("--text", required=True, help="training text: .txt (a document per line), .jsonl, or builtin; for a "
                                           "vision model a directory of PNG / JPEG images")
@click.option("--out", required=True, help="output directory for the healed model")
@click.option("--steps", default=100, show_default=True, help="optimizer steps")
@click.option("--lr", default=1e-5, show_default=True, help="learning rate (AdamW, warm-up then cosine decay)")
@click.option("--samples", default=64, show_default=True, help="documents (encoders), windows (causal LMs) or images "
                                                             "used")
@click.option("--seq-len", default=256, show_default=True, help="tokens per training sequence")
@click.option("--batch-size", default=4, show_default=True, help="sequences (or images) per step")
@click.option("--hints", default=0.0, show_default=True, help="weight of per-block hidden-state hints (FitNets)")
@force_opt
@json_opt
def heal(model, teacher, text, out, steps, lr, samples, seq_len, batch_size, hints, force, as_json):
    """Distill a compressed MODEL towards --teacher on --text, training only its factor matrices."""
    from .jobs import heal_model

    if samples < 1 or seq_len < 2 or batch_size < 1:
        raise LayerzipError("--samples and --batch-size must be ≥ 1 and --seq-len ≥ 2")
    if hints < 0:
        raise LayerzipError(f"--hints must be ≥ 0 (a loss weight), got {hints}")
    _emit(heal_model(model, teacher, text, out, steps, lr, samples, seq_len, batch_size, hints, force,
                     progress=not as_json), as_json)


@app.command()
@model_arg
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "layerzip"]),
              help="output format: onnx, or layerzip (one size of an elastic model as a plain compressed directory)")
@click.option("--out", required=True, help="FILE.onnx (written atomically; past 2 GB its tensors go to FILE.onnx.data), "
                                           "or the directory of --format layerzip")
@click.option("--keep", type=float, help="elastic models only: the size to export [default: its --keep]")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(14, 20), help="ONNX opset")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="run the exported graph in onnxruntime and report max_abs_diff to torch")
@click.option("--force", is_flag=True, help="replace an existing --out file")
@json_opt
def export(model, fmt, out, keep, opset, verify, force, as_json):
    """Export MODEL (encoders: last hidden state; causal LMs: logits) to ONNX, batch and sequence axes dynamic,
    float32; factorized layers stay factorized (a low-rank layer is two MatMuls). --format layerzip: one size
    (--keep) of an elastic model as a plain compressed directory."""
    from .jobs import export_model

    _emit(export_model(model, out, fmt, keep, force, opset, verify, progress=not as_json), as_json)


@app.command()
@click.option("--out", help="keep the compressed models in this directory (default: a temporary one, removed)")
@json_opt
def demo(out, as_json):
    """Compress the built-in MiniLM to half its block parameters (svd and svd-llm); before/after table."""
    from pathlib import Path

    from .io import check_out_dir, load_model
    from .jobs import compress_model, evaluate_model
    from .methods import SVD, SVDLLM

    progress = not as_json
    if out:
        check_out_dir(out, force=False)
    rows = []
    ref = load_model("minilm")
    base = evaluate_model("minilm", loaded=ref, ref_loaded=ref, progress=progress, retrieval="builtin")
    rows.append({"model": "MiniLM (dense)", "target_params": None, "params": base["params"],
                 "size_on_disk": base["size_on_disk"], "cosine": base["cosine_to_reference"],
                 "recall_at_1": base["recall_at_1"], "seconds": 0.0})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out or tmp)
        for cfg in (SVD(keep=0.5), SVDLLM(keep=0.5)):
            t = time.perf_counter()
            rep = compress_model("minilm", root / cfg.name, cfg, progress=progress)
            secs = time.perf_counter() - t
            ev = evaluate_model(str(root / cfg.name), ref_loaded=ref, progress=progress, retrieval="builtin")
            rows.append({"model": f"{cfg.name} keep 0.5", "target_params": rep["target_params_after"],
                         "target_params_before": rep["target_params_before"], "params": ev["params"],
                         "size_on_disk": ev["size_on_disk"], "cosine": ev["cosine_to_reference"],
                         "recall_at_1": ev["recall_at_1"], "seconds": secs, "keep_achieved": rep["keep_achieved"],
                         "out": str(root / cfg.name) if out else None})
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
    lines.append(f"compressed models: {out}/svd, {out}/svd-llm" if out else
                 "compressed models were written to a temporary directory and removed; --out DIR keeps them")
    _emit({"rows": rows}, as_json, "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input -> one line on stderr, exit code 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:                                  # a bare `layerzip`: the help, exit 0
        print(app.get_help(click.Context(app, info_name="layerzip")))
        return
    try:
        code = app.main(args=args, standalone_mode=False, prog_name="layerzip")
    except LayerzipError as e:
        print(f"layerzip: error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as e:
        print(f"layerzip: error: {' '.join(e.format_message().split())} (see: layerzip --help)", file=sys.stderr)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("layerzip: interrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
