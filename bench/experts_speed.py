"""Speed of an MoE layer's experts after compression, against their FLOP bound (issue 15, MoE experts as targets).

Latency depends on shapes, ranks and routing, not on the values of the weights, so one layer of experts is built at a
real MoE's shapes (Qwen1.5-MoE-A2.7B: hidden 2048, 60 experts of intermediate 1408, top-4; `--quick`: a small one)
with random weights and uniformly random routes: transformers' fused experts (`Qwen2MoeExperts`, eager), the same
split (`layerzip.nn.SplitExperts`, dense) and split with every expert's gate_up and down a LowRankLinear of the rank
uniform allocation gives at each keep (random factors). Timed at decode (1 token) and prefill (512 tokens), threads
fixed (default 1), the median of repeats with the variants alternating. The bound of a keep is the ratio of expert
FLOPs (= keep, every expert factorized alike).

    python bench/experts_speed.py [--quick] [--threads 1] [--keeps 0.8 0.5]
Writes bench/results/experts_speed.json.
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers

import common
from layerzip import LowRankLinear, allocate
from layerzip.nn import SplitExperts

SHAPES = {"full": dict(hidden_size=2048, moe_intermediate_size=1408, num_experts=60, num_experts_per_tok=4),
          "quick": dict(hidden_size=256, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2)}


def fused_experts(shape: dict) -> torch.nn.Module:
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts
    config = transformers.Qwen2MoeConfig(**shape, num_hidden_layers=1, num_attention_heads=16)
    config._experts_implementation = "eager"
    mod = Qwen2MoeExperts(config).eval()
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.02)
    return mod


def low_rank(split: SplitExperts, keep: float) -> tuple[SplitExperts, dict]:
    """`split` with every expert's projections as LowRankLinear at the uniform rank of `keep` (random factors)."""
    ranks = {}
    for lst in (split.gate_up, split.down):
        for e, lin in enumerate(lst):
            out, inp = lin.weight.shape
            r = allocate.uniform_ranks({"x": (out, inp)}, keep)["x"]
            ranks[(out, inp)] = r
            if r is not None:
                lst[e] = LowRankLinear(inp, out, r, bias=False)
    return split, {f"{o}x{i}": r for (o, i), r in ranks.items()}


@torch.no_grad()
def timings(variants: dict, tokens: int, shape: dict, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(tokens)
    E, k, H = shape["num_experts"], shape["num_experts_per_tok"], shape["hidden_size"]
    x = torch.randn(tokens, H, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    times = {n: [] for n in variants}
    for _ in range(repeats + 1):                      # the first round warms up, not counted
        for name, mod in variants.items():
            t = time.perf_counter()
            mod(x, index, weights)
            times[name].append(time.perf_counter() - t)
    return {n: 1000 * sorted(ts[1:])[len(ts[1:]) // 2] for n, ts in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keeps", type=float, nargs="*", default=[0.8, 0.5])
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    shape = SHAPES["quick" if a.quick else "full"]
    fused = fused_experts(shape)
    variants, ranks = {"fused": fused, "split": SplitExperts.from_fused(fused)}, {}
    for keep in a.keeps:
        variants[f"keep {keep}"], ranks[keep] = low_rank(SplitExperts.from_fused(fused), keep)
    rows = []
    for tokens in (1, 512):
        ms = timings(variants, tokens, shape, a.repeats)
        for name, t in ms.items():
            keep = float(name.split()[1]) if name.startswith("keep") else 1.0
            rows.append({"tokens": tokens, "variant": name, "ms": t, "speedup": ms["fused"] / t,
                         "flop_bound": 1 / keep, "ranks": ranks.get(keep)})
        print(tokens, {n: round(t, 3) for n, t in ms.items()})
    out = {"shape": shape, "threads": a.threads, "repeats": a.repeats, "rows": rows, "env": common.env()}
    if not a.quick:
        common.write_json("experts_speed", out)
    return out


def markdown(res: dict) -> list[str]:
    s = res["shape"]
    lines = [f"One MoE layer's experts at Qwen1.5-MoE-A2.7B's shapes (hidden {s['hidden_size']}, {s['num_experts']} "
             f"experts of intermediate {s['moe_intermediate_size']}, top-{s['num_experts_per_tok']}; random weights "
             f"and routes), {res['threads']} thread(s), median of {res['repeats']} (`python bench/experts_speed.py`):",
             "", "| tokens | experts | ms | speedup over fused | FLOP bound |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['tokens']} | {r['variant']} | {r['ms']:.2f} | {r['speedup']:.2f}× | "
                     f"{r['flop_bound']:.2f}× |")
    return lines + [""]


if __name__ == "__main__":
    main()
