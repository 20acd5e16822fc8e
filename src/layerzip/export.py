"""ONNX export of an in-memory model, and latency in torch or onnxruntime (`pip install 'layerzip[onnx]'`).

    export_onnx(model, FILE.onnx)   encoders -> `last_hidden_state`, causal LMs -> `logits`; inputs `input_ids` and
                                    `attention_mask` (int64), batch and sequence axes dynamic; float32
    ort_session(FILE.onnx, threads) an onnxruntime CPU session with fixed threads
    ort_latency(session, b, s)      median milliseconds of one run over (b × s) tokens
    runtime_latency(model, dense)   `eval --latency --runtime torch|onnxruntime`: medians at batch 1 and 16, the
                                    speedup over the dense model in the same runtime and its ratio to the FLOP bound

Every factorized layer keeps its forward in the graph: a LowRankLinear is two MatMuls against its factors (Bᵀ:
in×r, Aᵀ: r×out), never the product A·B; `dense_initializers` finds any initializer of a factorized layer's dense
shape, and the tests assert there is none. The exporter is torch's TorchScript one (`dynamo=False`: offline, no
onnxscript, ≈ 1 s for a small model; `dynamo=True` also works, ≈ 10× slower). It traces one example, so the example
has a padded row: the attention-mask path that padding needs is what gets recorded (an all-ones example lets
transformers skip the mask, and left-padded inputs would then be scored without it).

Written to a hidden temporary sibling and renamed into place at the end; a model over the 2 GB protobuf limit is
written with its tensors in one `FILE.onnx.data` beside it (renamed first).
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LayerzipError
from .evaluate import flops, latency
from .lazy import source_of
from .models import backbone, is_causal
from .nn import LOWBIT_TYPES, FactorizedLayer, SplitExperts, dequantize_factors_, is_linear_like
from .nn.experts import fused_layout

OPSET = 18
RUNTIMES = ("torch", "onnxruntime")
PROTOBUF_LIMIT = 2**31 - 2**26       # leave room for the graph itself under protobuf's 2 GiB


def require_onnx():
    """(onnx, onnxruntime), or a one-line error saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise LayerzipError("ONNX export needs onnx and onnxruntime: pip install 'layerzip[onnx]'") from None
    return onnx, onnxruntime


class _Graph(nn.Module):
    """input_ids, attention_mask -> last hidden state (encoders) or logits (causal LMs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.causal = is_causal(model)
        self.net = model if self.causal else backbone(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.causal:
            return self.net(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return self.net(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def example_inputs(model: nn.Module, batch_size: int = 2, seq_len: int = 8, padded: bool = True) -> dict:
    """Random token ids (fixed seed) and an attention mask; `padded`: the last row's final quarter is padding."""
    vocab = getattr(model.config, "vocab_size", 1000)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, 30000), (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    if padded and batch_size > 1:
        mask[-1, seq_len - max(1, seq_len // 4):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _export_copy(model: nn.Module) -> nn.Module:
    """The model itself when it is float32 with plain factors, else a float32 copy with dequantized factors."""
    float32 = all(p.dtype == torch.float32 for p in model.parameters())
    lowbit = any(isinstance(m, LOWBIT_TYPES) for m in model.modules())
    if float32 and not lowbit:
        return model
    twin = copy.deepcopy(model)
    dequantize_factors_(twin)
    return twin.float()


@contextlib.contextmanager
def _atomic_file(path: Path):
    """Yields a temporary directory to write `path.name` (and its `.data`) into; both renamed into place at the
    end (the data file first), removed on any error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp / path.name
        data = tmp / (path.name + ".data")
        if data.exists():
            os.replace(data, path.with_name(path.name + ".data"))
        os.replace(tmp / path.name, path)
    finally:
        for f in tmp.iterdir() if tmp.exists() else ():
            f.unlink()
        with contextlib.suppress(OSError):
            tmp.rmdir()


@torch.no_grad()
def export_onnx(model: nn.Module, path: str | Path, opset: int = OPSET, dynamo: bool = False,
                verify: bool = True, progress: bool = True) -> dict:
    """Write `model` (a transformers encoder or causal LM, factorized or not) to `path` as ONNX, check it with
    `onnx.checker` and (`verify`) run it in onnxruntime against torch on a padded example. Returns a report:
    `out`, `output` (its name), `bytes`, `initializer_params`, `factorized_layers`, `max_abs_diff`, `seconds`.

    >>> import layerzip as lz                                           # doctest: +SKIP
    >>> rep = lz.export_onnx(lz.load("minilm-lz"), "minilm-lz.onnx")   # doctest: +SKIP
    >>> rep["output"], rep["max_abs_diff"] < 1e-4                       # doctest: +SKIP
    ('last_hidden_state', True)
    """
    onnx, _ = require_onnx()
    if source_of(model) is not None:
        raise LayerzipError("ONNX export needs the whole model in memory; load it with --no-stream")
    if any(getattr(m, "sparse", False) for m in model.modules()):
        raise LayerzipError("a mixture-of-experts FFN (--method moe) routes each token through data-dependent "
                            "control flow, which an ONNX trace would freeze; export the merged model (lz.merge_)")
    if any(isinstance(m, SplitExperts) or fused_layout(m) is not None for m in model.modules()):
        raise LayerzipError("an MoE model's experts run on the tokens routed to them (data-dependent control flow, "
                            "which an ONNX trace would freeze): ONNX export of MoE models is not supported")
    t0 = time.perf_counter()
    path = Path(path)
    net = _Graph(_export_copy(model)).eval()
    out_name = "logits" if net.causal else "last_hidden_state"
    inputs = example_inputs(model)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            out_name: {0: "batch", 1: "sequence"}}
    n_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    with _atomic_file(path) as tmp, tqdm(total=3 if verify else 2, desc="export onnx", unit="step",
                                         disable=not progress) as steps:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")              # tracer and deprecation warnings: the check below decides
            kw = ({"dynamic_shapes": {k: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
                                      for k in inputs}, "external_data": n_bytes > PROTOBUF_LIMIT}
                  if dynamo else {"dynamic_axes": axes})
            torch.onnx.export(net, (inputs["input_ids"], inputs["attention_mask"]), str(tmp), dynamo=dynamo,
                              input_names=list(inputs), output_names=[out_name], opset_version=opset, **kw)
        _single_data_file(onnx, tmp)
        steps.update()
        onnx.checker.check_model(str(tmp))               # by path: works past 2 GB
        steps.update()
        diff = None
        if verify:
            diff = _max_abs_diff(net, tmp, inputs)
            steps.update()
    graph = onnx.load(str(path), load_external_data=False)
    return {"out": str(path), "format": "onnx", "output": out_name, "opset": opset,
            "exporter": "dynamo" if dynamo else "torchscript", "bytes": _file_bytes(path),
            "initializer_params": sum(_numel(t) for t in graph.graph.initializer),
            "factorized_layers": sum(isinstance(m, FactorizedLayer) for m in net.modules()),
            "max_abs_diff": diff, "seconds": time.perf_counter() - t0}


def _numel(t) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _single_data_file(onnx, path: Path) -> None:
    """The exporter writes one external file per tensor past 2 GB: gather them into `NAME.data` beside it."""
    extra = [f for f in path.parent.iterdir() if f != path]
    if not extra:
        return
    model = onnx.load(str(path))                          # reads the external tensors
    for f in extra:
        f.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _max_abs_diff(net: nn.Module, path: Path, inputs: dict) -> float:
    """max |onnxruntime − torch| over the example's unpadded positions."""
    sess = ort_session(path, threads=1)
    ref = net(**inputs)
    got = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0])
    keep = inputs["attention_mask"].bool()
    return (got - ref)[keep].abs().max().item()


def dense_initializers(path: str | Path, model: nn.Module) -> list[tuple[str, tuple]]:
    """(name, shape) of every initializer of `path` shaped like a factorized layer's dense weight (out×in or
    in×out) — a re-densified layer — beyond those that are some layer's factor or a layer left dense of the same
    shape (a rank equal to another layer's width). Empty when every factorized layer kept its factors."""
    from collections import Counter
    onnx, _ = require_onnx()
    dense, factors = set(), Counter()                    # factors: 2-D tensors that may legitimately match
    for m in model.modules():
        if isinstance(m, FactorizedLayer):
            dense |= {(m.out_features, m.in_features), (m.in_features, m.out_features)}
            factors.update(tuple(sorted(p.shape)) for p in m.parameters() if p.dim() == 2)
        elif is_linear_like(m):                          # a layer left dense
            factors[tuple(sorted(m.weight.shape))] += 1
    graph = onnx.load(str(path), load_external_data=False).graph
    found = []
    for t in graph.initializer:
        shape = tuple(t.dims)
        if shape in dense:
            if factors[tuple(sorted(shape))] > 0:
                factors[tuple(sorted(shape))] -= 1
            else:
                found.append((t.name, shape))
    return found


def ort_session(path: str | Path, threads: int | None = 1):
    """An onnxruntime CPU session, `threads` intra-op threads (None: onnxruntime's default), one inter-op."""
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_latency(session, batch_size: int, seq_len: int, repeats: int = 5, warmup: int = 1,
                vocab: int = 30000) -> float:
    """Median wall-clock milliseconds of one session run over (batch_size × seq_len) tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g).numpy()
    feed = {"input_ids": ids, "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.int64).numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def _median(v: list[float]) -> float:
    return sorted(v)[len(v) // 2]


def runtime_latency(model: nn.Module, dense: nn.Module | None = None, runtime: str = "torch", seq_len: int = 128,
                    threads: int = 1, repeats: int = 5, progress: bool = True) -> dict:
    """Median milliseconds of one forward of `model` at batch 1 and 16 (`seq_len` tokens, `threads` fixed) in
    `runtime` (onnxruntime: both models exported to a temporary directory first), and FLOPs per token.

    With `dense` (the uncompressed model): its latencies in the same runtime, measured alternately with the
    model's (one pair per repeat: a shared machine's load drifts within seconds), `speedup_batch{1,16}` = the
    median of the per-pair ratios, `flop_bound` = dense FLOPs ÷ the model's, and `speedup_over_bound_batch{1,16}`.
    """
    if runtime not in RUNTIMES:
        raise LayerzipError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "onnxruntime":
        require_onnx()
    res = {"latency_runtime": runtime, "latency_seq_len": seq_len, "latency_threads": threads, **flops(model, seq_len)}
    models = {"model": model, "dense": dense} if dense is not None else {"model": model}
    with tempfile.TemporaryDirectory() as tmp:
        run = {}
        for name, m in models.items():
            if runtime == "torch":
                run[name] = lambda b, m=m: latency(m, b, seq_len, 1, warmup=0, threads=threads)
            else:
                export_onnx(m, Path(tmp) / f"{name}.onnx", verify=False, progress=progress)
                sess = ort_session(Path(tmp) / f"{name}.onnx", threads)
                vocab = min(getattr(m.config, "vocab_size", 1000), 30000)
                run[name] = lambda b, s=sess, v=vocab: ort_latency(s, b, seq_len, 1, warmup=0, vocab=v)
        pairs = [(b, repeats if b == 1 else max(3, repeats // 2)) for b in (1, 16)]
        bar = tqdm(total=sum(n + 1 for _, n in pairs), desc=f"latency ({runtime})", unit="pair",
                   disable=not progress)
        for b, n in pairs:
            times = {k: [] for k in run}
            for i in range(n + 1):                           # the first round warms up
                for k, fn in run.items():
                    t = fn(b)
                    if i:
                        times[k].append(t)
                bar.update()
            res[f"latency_ms_batch{b}"] = _median(times["model"])
            if dense is not None:
                res[f"dense_latency_ms_batch{b}"] = _median(times["dense"])
                res[f"speedup_batch{b}"] = _median([d / c for d, c in zip(times["dense"], times["model"])])
        bar.close()
    if dense is not None:
        res["flop_bound"] = flops(dense, seq_len)["flops_per_token"] / res["flops_per_token"]
        for b in (1, 16):
            res[f"speedup_over_bound_batch{b}"] = res[f"speedup_batch{b}"] / res["flop_bound"]
    return res
