"""Bytes vs quality on Gemma-3-270M: layerzip low rank (± the embedding, ± int8 / int4 storage) against plain
weight-only quantization of the dense model and against the Q4_K_M GGUF the model came from.

Every layerzip point is a real directory written by `lz.save(model in bfloat16, bits=...)`: its bytes are the tensors
in its safetensors files (`written_bytes`), and its perplexity is that of the model `lz.load` reads back from it
(computed in float32), on held-out python-docs windows. The dense baselines quantize every matrix of the dense model
(block Linears and the tied embedding) with the same round-to-nearest grid and group size as `--bits` (nn/lowbit.py;
torchao's int4 weight-only kernels need CUDA and its int8 path stores a scale per row, so the same-grid RTN is the
like-for-like baseline); their bytes are counted (values + float32 scales, the rest in bfloat16).

The dense reference is the GGUF's own weights (bench/cache/gemma-3-270m is that Q4_K_M file dequantized), so the
GGUF point sits at perplexity ratio 1 by construction, at its file size.

    python bench/bytes.py                       # the grid below -> bench/results/bytes_gemma.json + .png
    python bench/bytes.py --report              # bench/BYTES.md from the JSON (run_all.py inlines it)

A point is (blocks keep, embedding keep or dense, bits); blocks use svd-llm's default (global allocation + output
Fisher) from one calibration; the embedding (tied to the head: one factorization) is then factorized on the
block-compressed model with `--include embeddings`. A budget point is `--budget-bytes N` over the blocks (each Linear's
rank and bits, 16/8/4, chosen together; the embedding stays bf16), at the bytes of the uniform points beside it.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

import common
import data
from common import lz
from layerzip.evaluate import perplexity
from layerzip.allocate import BytesBudget
from layerzip.io import written_bytes
from layerzip.nn.lowbit import dequantize_groups, quantize_groups

NAME = "bytes_gemma"
GRID = [  # (blocks keep, embedding keep (None: dense), bits)
    (0.8, None, 16), (0.8, None, 8), (0.8, None, 4),
    (0.8, 0.8, 16), (0.8, 0.8, 8), (0.8, 0.8, 4),
    (0.9, 0.9, 8), (0.9, 0.9, 4),
    (0.8, 0.6, 8), (0.8, 0.6, 4),
]
BUDGETS = [419e6, 395e6, 378e6]   # --budget-bytes (blocks only): the bytes of "blocks 0.8, int8 / int4" and between


def rtn_dense_(model: torch.nn.Module, bits: int, group: int = 128) -> int:
    """Round every matrix of `model` to the `bits` grid in place; returns the bytes it would take (values + float32
    scales, everything else in bfloat16)."""
    total = 0
    with torch.no_grad():
        for p in model.parameters():            # a tied matrix once
            if p.ndim == 2:
                q, s = quantize_groups(p.detach(), bits, group)
                p.copy_(dequantize_groups(q, s, bits, p.shape[1], group, p.dtype))
                total += q.numel() * q.element_size() + s.numel() * 4
            else:
                total += p.numel() * 2
    return total


def run(eval_windows: int, grid: list[tuple]) -> dict:
    bench = common.benches(only=["gemma"])[0]
    bench.eval_windows = eval_windows
    loaded = bench.load()
    texts = bench._data()["eval"]

    def ppl(model):
        return perplexity(model, loaded.tokenizer, texts, bench.eval_seq_len, bench.eval_windows, progress=False)
    f = common.RESULTS / f"{NAME}.json"
    res = json.loads(f.read_text()) if f.is_file() else {}
    res.update(model="gemma-3-270m", eval_windows=eval_windows, eval_seq_len=bench.eval_seq_len,
               calib_samples=bench.calib_samples, calib_seq_len=bench.calib_seq_len,
               gguf_bytes=data.gemma_gguf().stat().st_size, env=common.env(), code=common.code_version())
    rows = {tuple(r["key"]): r for r in res.get("rows", [])}

    def put(key, row):
        rows[tuple(key)] = {"key": list(key), **row}
        res["rows"] = list(rows.values())
        common.write_json(NAME, res)
        print(json.dumps(rows[tuple(key)]), flush=True)

    base = loaded.model.float().eval()
    if ("dense", 16) not in rows:
        put(("dense", 16), {"bytes": sum(p.numel() * 2 for p in base.parameters()), "perplexity": ppl(base)})
    dense_ppl = rows[("dense", 16)]["perplexity"]
    for bits in (8, 4):
        if ("dense", bits) not in rows:
            m = copy.deepcopy(base)
            b = rtn_dense_(m, bits)
            put(("dense", bits), {"bytes": b, "perplexity": ppl(m), "ratio": ppl(m) / dense_ppl})
            del m
    todo = [g for g in grid if ("lz", *g) not in rows]
    calib = bench.calib(loaded)
    stats = lz.calibrate(base, lz.SVDLLM(keep=0.8), calib, progress=True) \
        if todo or any(("budget", b) not in rows for b in BUDGETS) else None
    for kb in sorted({g[0] for g in todo}):
        blocks = copy.deepcopy(base)
        t0 = time.perf_counter()
        rep = lz.compress_(blocks, lz.SVDLLM(keep=kb), calib=calib, stats=stats, progress=False)
        t_blocks = time.perf_counter() - t0
        for ke in sorted({g[1] for g in todo if g[0] == kb}, key=lambda k: -(k or 2)):
            model, t_emb = blocks, 0.0
            if ke is not None:
                model = copy.deepcopy(blocks)
                t0 = time.perf_counter()
                lz.compress_(model, lz.SVDLLM(keep=ke, include="embeddings"), calib=calib, progress=False)
                t_emb = time.perf_counter() - t0
            for bits in sorted({g[2] for g in todo if g[:2] == (kb, ke)}, reverse=True):
                with tempfile.TemporaryDirectory(dir=common.RESULTS.parent / "cache") as tmp:
                    out = Path(tmp) / "o"
                    lz.save(copy.deepcopy(model).to(torch.bfloat16), out, tokenizer=loaded.tokenizer, bits=bits)
                    nbytes = written_bytes(out)
                    back = lz.load(out).float().eval()
                    p = ppl(back)
                del back
                put(("lz", kb, ke, bits), {"bytes": nbytes, "perplexity": p, "ratio": p / dense_ppl,
                                           "keep_blocks_achieved": rep["keep_achieved"],
                                           "params": sum(t.numel() for t in model.parameters()),
                                           "seconds_blocks": t_blocks, "seconds_embedding": t_emb})
            if model is not blocks:
                del model
        del blocks
    for total in [b for b in BUDGETS if ("budget", b) not in rows]:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        rep = lz.compress_(model, lz.SVDLLM(keep=0.8), calib=calib, stats=stats, progress=False,
                           budget=BytesBudget(total, elem_bytes=2))
        t_blocks = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(dir=common.RESULTS.parent / "cache") as tmp:
            out = Path(tmp) / "o"
            lz.save(model.to(torch.bfloat16), out, tokenizer=loaded.tokenizer, bits=rep["module_bits"])
            nbytes = written_bytes(out)
            back = lz.load(out).float().eval()
            p = ppl(back)
        bits = [rep["module_bits"].get(n, 16) for n in rep["ranks"]]
        put(("budget", total), {"bytes": nbytes, "perplexity": p, "ratio": p / dense_ppl,
                                "keep_blocks_achieved": rep["keep_achieved"], "seconds_blocks": t_blocks,
                                "modules_by_bits": {b: bits.count(b) for b in (16, 8, 4)},
                                "dense_modules": sum(r is None for r in rep["ranks"].values())})
        del model, back
    return res


def label(key) -> str:
    if key[0] == "budget":
        return f"--budget-bytes {key[1] / 1e6:.0f} MB (blocks: rank and bits per layer)"
    if key[0] == "dense":
        return "dense bf16" if key[1] == 16 else f"dense RTN int{key[1]}"
    _, kb, ke, bits = key
    return (f"blocks {kb}" + (f" + embedding {ke}" if ke else "") + (f", int{bits}" if bits != 16 else ", bf16"))


def plot(res: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    mb = 1e6
    style = {16: "o", 8: "s", 4: "^"}
    for r in res["rows"]:
        k = r["key"]
        ratio = r.get("ratio", 1.0)
        if k[0] == "dense":
            ax.scatter(r["bytes"] / mb, ratio, marker=style[k[1]], color="black", zorder=3)
        elif k[0] == "budget":
            ax.scatter(r["bytes"] / mb, ratio, marker="D", color="tab:cyan", zorder=3)
        else:
            color = "tab:blue" if k[2] is None else {0.9: "tab:green", 0.8: "tab:orange", 0.6: "tab:red"}.get(
                k[2], "tab:purple")
            ax.scatter(r["bytes"] / mb, ratio, marker=style[k[3]], color=color, zorder=3)
        ax.annotate(label(k), (r["bytes"] / mb, ratio), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.scatter(res["gguf_bytes"] / mb, 1.0, marker="*", s=120, color="crimson", zorder=4)
    ax.annotate("Q4_K_M GGUF (the reference's own weights)", (res["gguf_bytes"] / mb, 1.0), fontsize=6,
                xytext=(3, -10), textcoords="offset points")
    ax.axvline(res["gguf_bytes"] / mb, color="crimson", lw=0.6, ls=":")
    ax.axhline(1.25, color="gray", lw=0.6, ls="--")
    ax.set_xlabel("bytes of tensors (MB)")
    ax.set_ylabel("held-out perplexity ÷ dense")
    ax.set_yscale("log")
    ax.set_title("Gemma-3-270M: bytes vs quality (o bf16, □ int8, △ int4, ◇ --budget-bytes; black: dense RTN)")
    return common.save_figure(fig, common.RESULTS / f"{NAME}.png")


def report() -> Path:
    res = json.loads((common.RESULTS / f"{NAME}.json").read_text())
    plot(res)
    mb = 1e6
    dense = next(r for r in res["rows"] if r["key"] == ["dense", 16])
    lines = ["# Bytes vs quality", "",
             f"`bench/bytes.py`: Gemma-3-270M, held-out python-docs perplexity ({res['eval_windows']} windows of "
             f"{res['eval_seq_len']} tokens) ÷ dense ({dense['perplexity']:.2f}); calibration {res['calib_samples']} "
             f"windows of {res['calib_seq_len']} tokens. Bytes: the tensors in the written safetensors files (the "
             f"dense rows: counted). The dense reference is the Q4_K_M GGUF's own weights, dequantized, so the GGUF "
             f"({res['gguf_bytes'] / mb:.0f} MB) sits at ratio 1 by construction. Code {res.get('code')}.", "",
             f"![](results/{NAME}.png)", "",
             "| model | bytes (MB) | ÷ GGUF | perplexity | ÷ dense | ≤ 1.25 and < GGUF |", "|---|---|---|---|---|---|"]
    gguf = res["gguf_bytes"]
    for r in sorted(res["rows"], key=lambda r: r["bytes"]):
        ratio = r.get("ratio", 1.0)
        ok = ratio <= 1.25 and r["bytes"] < gguf
        lines.append(f"| {label(r['key'])} | {r['bytes'] / mb:.0f} | {r['bytes'] / gguf:.2f} | "
                     f"{r['perplexity']:.2f} | {ratio:.3f} | {'**yes**' if ok else ''} |")
    lines.append("")
    for note in res.get("notes", []):
        lines += [note, ""]
    out = Path(__file__).resolve().parent / "BYTES.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    if not args.report:
        run(args.eval_windows, GRID)
    print(report())


if __name__ == "__main__":
    main()
