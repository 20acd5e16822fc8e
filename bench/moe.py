"""MoEfication on Gemma-3-270M and Qwen2.5-Coder-1.5B: held-out perplexity and CPU latency against the fraction of FFN FLOPs each token runs,
for E = 8 and 16 experts (k = 1 … E/2 active), against dense and against low rank (`svd-llm` on the FFN
projections only) at the same FFN FLOPs.

Each E is fitted once (clustering and router do not depend on k); k is then set on every MoEFFN (`active`), which is
what `--active k` would have saved. Low rank at FFN fraction f: `svd-llm --include '\\.mlp\\.' --keep f` (its
default global ranks with the Fisher; a low-rank layer's FLOPs are 2× its weights, so keep = FLOP fraction), one
calibration shared across the keeps. Latency (one thread, medians, dense and compressed alternated so that the
load of a shared machine falls on both): a forward of `--latency-seq-len` tokens at batch 1, and one decoding step
(one new token with a KV cache of that many tokens) at batch 1; plus one FFN alone at 1 and 32 tokens.

    python bench/moe.py [--model gemma|qwen] [--quick] [--experts 8 16] [--calib-samples 32] [--eval-windows 4]
                        [--lowrank 0.25 0.5] [--refine-steps N]
    python bench/moe.py --report-only        # PNGs + MOE.md again from bench/results/moe_<model>.json
Writes bench/results/moe_<model>.json, moe_<model>.png and bench/MOE.md (a section per model measured).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from tqdm.auto import tqdm

import common
import layerzip as lz
from layerzip.data import token_batches
from layerzip.evaluate import flops, latency, perplexity
from layerzip.nn import MoEFFN

FFN = r"\.mlp\."


def set_active(model, k: int) -> None:
    for m in model.modules():
        if isinstance(m, MoEFFN):
            m.active = k


def dense_ffn_flops(model) -> int:
    """FLOPs per token of the dense model's FFN projections (2 per weight)."""
    return sum(2 * m.weight.numel() for n, m in model.named_modules()
               if n.endswith(("gate_proj", "up_proj", "down_proj")))


def ffn_fraction(model, dense_ffn: int) -> float:
    """FFN FLOPs per token of `model` ÷ the dense FFNs' (MoE: routed experts + router; low rank: its factors)."""
    got = 0
    for name, m in model.named_modules():
        if isinstance(m, MoEFFN):
            got += m.flops()
        elif name.endswith(("gate_proj", "up_proj", "down_proj")) and ".mlp." in name + ".":
            got += m.flops() if isinstance(m, lz.FactorizedLayer) else 2 * m.weight.numel()
    return got / dense_ffn


@torch.no_grad()
def decode_ms(model, ids: torch.Tensor) -> float:
    """One decoding step: the next token's forward with the KV cache of `ids` (batch 1)."""
    past = model(input_ids=ids, use_cache=True).past_key_values
    nxt = ids[:, -1:]
    t = time.perf_counter()
    model(input_ids=nxt, past_key_values=past, use_cache=True)
    return 1000 * (time.perf_counter() - t)


def paired(dense, model, fn, repeats: int) -> dict:
    """fn(dense) and fn(model) alternated; medians and the median per-pair speedup."""
    d, c = [], []
    for _ in range(repeats):
        d.append(fn(dense))
        c.append(fn(model))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"dense_ms": med(d), "ms": med(c), "speedup": med([x / y for x, y in zip(d, c)])}


def speed(dense, model, seq: int, repeats: int, threads: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (1, seq), generator=g)
    torch.set_num_threads(threads)
    fwd = paired(dense, model, lambda m: latency(m, 1, seq, 1, warmup=0, threads=threads), repeats)
    dec = paired(dense, model, lambda m: decode_ms(m, ids), repeats)
    return {"forward_ms": fwd["ms"], "forward_dense_ms": fwd["dense_ms"], "forward_speedup": fwd["speedup"],
            "decode_ms": dec["ms"], "decode_dense_ms": dec["dense_ms"], "decode_speedup": dec["speedup"]}


@torch.no_grad()
def ffn_table(dense_mlp, moes: dict, lowrank: dict, repeats: int = 31) -> list[dict]:
    """One FFN alone (block 0): dense vs MoE (E, k) vs low rank (keep), at 1 and 32 tokens, one thread."""
    torch.set_num_threads(1)
    rows = []
    H = dense_mlp.down_proj.out_features
    for tokens in (1, 32):
        x = torch.randn(tokens, H, dtype=dense_mlp.down_proj.weight.dtype)

        def ms(f):
            f(x)
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                f(x)
                ts.append(time.perf_counter() - t)
            return 1000 * sorted(ts)[repeats // 2]
        base = ms(dense_mlp)
        rows.append({"tokens": tokens, "kind": "dense", "ms": base, "speedup": 1.0})
        for (E, k), m in moes.items():
            set_active(m, k)
            t = ms(m)
            rows.append({"tokens": tokens, "kind": f"moe E={E} k={k}", "fraction": k / E, "ms": t, "speedup": base / t})
        for f, m in lowrank.items():
            t = ms(m)
            rows.append({"tokens": tokens, "kind": f"svd-llm keep {f:.3g}", "fraction": f, "ms": t, "speedup": base / t})
    return rows


def run(b: common.Bench, experts: list[int], calib_samples: int, seq_len: int, threads: int, repeats: int,
        lowrank_fractions: list[float], progress: bool = True, previous: dict | None = None,
        heal_steps: int = 0, heal_lr: float = 1e-5, refine_steps: int | None = None, alloc: str | None = None) -> dict:
    """The rows of `previous` (an earlier run's JSON, same settings) are kept and not measured again; an E whose
    rows are all there is fitted on block 0 alone, for the FFN-alone table."""
    loaded = b.load()
    tok = loaded.tokenizer
    texts = b._data()
    calib = token_batches(tok, texts["calib"], True, calib_samples, seq_len, batch_size=8)
    ev = texts["eval"]

    def ppl(model):
        return perplexity(model, tok, ev, b.eval_seq_len, b.eval_windows, progress=False)
    torch.set_num_threads(common.DEFAULT_THREADS)
    with common.Timer() as t:
        dense_ppl = ppl(loaded.model)
    dense = loaded.model
    dense_ffn = dense_ffn_flops(dense)
    res = {"model": b.name, "title": b.title, "dense": {"perplexity": dense_ppl, "seconds_eval": t.s,
                                                      "ffn_flops_per_token": dense_ffn,
                                                      **flops(dense, b.latency_seq_len)},
           "calib": {"windows": calib_samples, "seq_len": seq_len}, "eval": {"windows": b.eval_windows,
           "seq_len": b.eval_seq_len}, "latency": {"seq_len": b.latency_seq_len, "threads": threads,
           "repeats": repeats}, "rows": [], "env": common.env(), "code": common.code_version()}
    if previous is not None:
        for key in ("calib", "eval", "latency"):
            if previous[key] != res[key]:
                raise SystemExit(f"--resume: the saved run's {key} {previous[key]} differs from this one's {res[key]}")
        res["rows"] = previous["rows"]
        res["resumed"] = previous.get("resumed", []) + [{"code": previous["code"], "env": previous["env"]}]
    done_moe = {(r["experts"], r["active"]) for r in res["rows"] if r["method"] == "moe"}
    done_lowrank = {r["keep"] for r in res["rows"] if "keep" in r}
    done_healed = {(r["experts"], r["active"]) for r in res["rows"] if r["method"] == "moe healed"}
    heal_batches = token_batches(tok, texts["calib"], True, 2 * heal_steps, 128, batch_size=2) if heal_steps else []
    block0 = {}
    total = sum(E // 2 for E in experts) + len(lowrank_fractions)
    bar = tqdm(total=total, desc=f"moe {b.name}", unit="model", disable=not progress)
    for E in experts:
        if all((E, k) in done_moe for k in range(1, E // 2 + 1)) and (not heal_steps or (E, max(1, E // 4)) in done_healed):
            m = copy.deepcopy(dense)       # the block-0 FFN alone, fitted on its real inputs
            lz.compress_(m, lz.MoE(experts=E, active=max(1, E // 4), include=r"layers\.0\.mlp$"), calib=calib,
                         progress=False)
            block0[E] = m.model.layers[0].mlp
            del m
            bar.update(E // 2)
            continue
        model = copy.deepcopy(dense)
        torch.set_num_threads(common.DEFAULT_THREADS)
        with common.Timer() as t:
            rep = lz.compress_(model, lz.MoE(experts=E, active=max(1, E // 4)), calib=calib, progress=False)
        layers = rep["moe_layers"].values()
        fit = {"seconds": t.s, "router_loss_first": _mean(i["router_loss_first"] for i in layers),
               "router_loss_last": _mean(i["router_loss_last"] for i in layers)}
        for k in range(1, E // 2 + 1):
            if (E, k) in done_moe:
                bar.update()
                continue
            set_active(model, k)
            torch.set_num_threads(common.DEFAULT_THREADS)
            row = {"method": "moe", "experts": E, "active": k, "ffn_flops_fraction": ffn_fraction(model, dense_ffn),
                   "perplexity": ppl(model), **fit}
            row["ppl_ratio"] = row["perplexity"] / dense_ppl
            row.update(speed(dense, model, b.latency_seq_len, repeats, threads))
            res["rows"].append(row)
            bar.update()
            common.write_json(f"moe_{b.name}", res)
        block0[E] = copy.deepcopy(model.model.layers[0].mlp)
        if heal_steps and (E, max(1, E // 4)) not in done_healed:
            res["rows"].append(healed_row(model, dense, E, max(1, E // 4), heal_batches, heal_steps, heal_lr,
                                          dense_ffn, dense_ppl, ppl, b.latency_seq_len, repeats, threads))
            common.write_json(f"moe_{b.name}", res)
        del model
    lowrank0 = {}
    cache: dict = {}
    for f in lowrank_fractions:
        if f in done_lowrank:
            bar.update()
            continue
        model = copy.deepcopy(dense)
        cfg = lz.SVDLLM(keep=f, include=FFN, refine_steps=refine_steps, alloc=alloc).resolve(model, calib)
        torch.set_num_threads(common.DEFAULT_THREADS)
        with common.Timer() as t:
            # uniform ranks: no statistics kept across blocks (each block's are freed once it is decomposed)
            stats = common.cached_stats(cfg, calib, model, cache) if cfg.alloc == "global" else None
            lz.compress_(model, cfg, calib=calib, progress=False, stats=stats)
        row = {"method": "svd-llm (FFN only)", "keep": f, "ffn_flops_fraction": ffn_fraction(model, dense_ffn),
               "perplexity": ppl(model), "seconds": t.s, "refine_steps": cfg.refine_steps, "alloc": cfg.alloc}
        row["ppl_ratio"] = row["perplexity"] / dense_ppl
        row.update(speed(dense, model, b.latency_seq_len, repeats, threads))
        res["rows"].append(row)
        lowrank0[f] = model.model.layers[0].mlp
        bar.update()
        common.write_json(f"moe_{b.name}", res)
        del model
    bar.close()
    moes = {(E, k): m for E, m in block0.items() for k in (1, E // 4, E // 2)}
    mlp = dense.model.layers[0].mlp
    res["ffn_layer"] = ffn_table(mlp, moes, lowrank0)
    res["ffn_shape"] = [mlp.down_proj.out_features, mlp.down_proj.in_features, str(mlp.down_proj.weight.dtype)]
    return res


def healed_row(model, dense, E, k, batches, steps, lr, dense_ffn, dense_ppl, ppl, seq, repeats, threads) -> dict:
    """The MoE model at k active, distilled towards dense (router and experts; lz.heal_) for `steps` steps."""
    set_active(model, k)
    torch.set_num_threads(common.DEFAULT_THREADS)
    rep = lz.heal_(model, dense, batches, steps=steps, lr=lr, progress=True)
    row = {"method": "moe healed", "experts": E, "active": k, "ffn_flops_fraction": ffn_fraction(model, dense_ffn),
           "perplexity": ppl(model), "heal_steps": steps, "heal_lr": lr, "heal_seconds": rep["seconds"],
           "tokens_per_step": int(batches[0]["attention_mask"].sum()),
           "heal_loss_first": rep["loss_first"], "heal_loss_last": rep["loss_last"]}
    row["ppl_ratio"] = row["perplexity"] / dense_ppl
    row.update(speed(dense, model, seq, repeats, threads))
    return row


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def plot(res: dict, results=common.RESULTS):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    lines = {}
    for r in res["rows"]:
        name = r["method"] if "keep" in r else f"MoE E={r['experts']}" + (" healed" if r["method"] != "moe" else "")
        lines.setdefault(name, []).append(r)
    for name, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["ffn_flops_fraction"])
        x = [r["ffn_flops_fraction"] for r in rows]
        a1.plot(x, [r["ppl_ratio"] for r in rows], marker="o", label=name)
        a2.plot(x, [r["decode_speedup"] for r in rows], marker="o", label=f"{name}, decode step")
        a2.plot(x, [r["forward_speedup"] for r in rows], marker="s", ls="--",
                label=f"{name}, forward {res['latency']['seq_len']} tokens")
    a1.axhline(1.0, color="k", lw=1, label="dense")
    a1.set_yscale("log")
    a1.set_xlabel("fraction of FFN FLOPs run per token")
    a1.set_ylabel("held-out perplexity ÷ dense")
    a1.set_title(f"{res['title']}: quality", fontsize=10)
    a2.axhline(1.0, color="k", lw=1)
    a2.set_xlabel("fraction of FFN FLOPs run per token")
    a2.set_ylabel("speedup over dense (batch 1, 1 thread)")
    a2.set_title(f"{res['title']}: CPU latency", fontsize=10)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    return common.save_figure(fig, results / f"moe_{res['model']}.png")


def markdown(res: dict) -> str:
    """MOE.md's section for one model."""
    d = res["dense"]["perplexity"]
    lat = res["latency"]
    dense_fwd = _mean(r["forward_dense_ms"] for r in res["rows"])
    dense_dec = _mean(r["decode_dense_ms"] for r in res["rows"])
    out = ["## " + res["title"], "",
           f"Written by `python bench/moe.py --model {res['model']}` (code {res['code']}, {res['env']['date']}, "
           f"{res['env']['cpu']}, load average {res['env']['load_average_1min']:.1f} on {res['env']['cores']} cores). "
           f"Held-out python-docs "
           f"perplexity ({res['eval']['windows']} windows of {res['eval']['seq_len']} tokens; dense {d:.2f}); "
           f"calibration {res['calib']['windows']} windows of {res['calib']['seq_len']} tokens. Latency at batch 1, "
           f"{lat['threads']} thread, medians of {lat['repeats']} alternated pairs: a forward of {lat['seq_len']} "
           f"tokens (dense ≈ {dense_fwd:.0f} ms) and one decoding step with a {lat['seq_len']}-token KV cache "
           f"(dense ≈ {dense_dec:.1f} ms). FFN fraction: FLOPs the FFNs run per token ÷ dense (MoE: k/E + the "
           "router).", ""]
    if res.get("resumed"):
        runs = "; ".join(f"code {r['code']}, {r['env']['date']}, load average {r['env']['load_average_1min']:.1f}"
                         for r in res["resumed"])
        out += [f"Resumed (`--resume`): the rows of earlier runs ({runs}) were kept, the missing ones measured by "
                "this one.", ""]
    fl = res["dense"]
    if "flops_per_token" in fl:
        ffn, head = fl["ffn_flops_per_token"] / fl["flops_per_token"], fl["flops_per_token_lm_head"] / fl["flops_per_token"]
        out += [f"The FFNs are {ffn:.0%} of a dense token's FLOPs and the LM head {head:.0%}, so even FFNs that cost nothing would make a whole forward at most "
                f"{1 / (1 - ffn):.2f}× faster; the FFN alone (last table) shows the layer's own speedup.", ""]
    out += [f"![MoE {res['title']}]({'results/moe_' + res['model'] + '.png'})", "",
           "| model | FFN FLOPs | perplexity ÷ dense | forward speedup | decode-step speedup | fit s |",
           "|---|---|---|---|---|---|"]
    for r in sorted(res["rows"], key=lambda r: ("keep" in r, r.get("experts", 0), r["ffn_flops_fraction"])):
        name = (f"{r['method']} keep {r['keep']:.3g}" + (f", --refine-steps {r['refine_steps']}" if "refine_steps"
                in r else "") + (f", --alloc {r['alloc']}" if r.get("alloc") == "uniform" else "") if "keep" in r else f"MoE E={r['experts']} k={r['active']}"
                + (f", healed {r['heal_steps']} steps × {r['tokens_per_step']} tokens" if "heal_steps" in r else ""))
        out.append(f"| {name} | {r['ffn_flops_fraction']:.3f} | {r['ppl_ratio']:.3g} | {r['forward_speedup']:.2f}× | "
                   f"{r['decode_speedup']:.2f}× | " + (f"{r['heal_seconds']:.0f} (healing)" if "heal_seconds" in r
                                                        else f"{r['seconds']:.0f}") + " |")
    if res.get("ffn_layer"):
        H, I, dtype = res.get("ffn_shape", (640, 2048, "torch.float32"))
        out += ["", f"One FFN alone (block 0, {H} → {I} → {H}, {dtype.removeprefix('torch.')}, one thread), median ms:", "",
                "| FFN | 1 token | speedup | 32 tokens | speedup |", "|---|---|---|---|---|"]
        by = {}
        for r in res["ffn_layer"]:
            by.setdefault(r["kind"], {})[r["tokens"]] = r
        for kind, t in by.items():
            out.append(f"| {kind} | {t[1]['ms']:.3f} | {t[1]['speedup']:.2f}× | {t[32]['ms']:.3f} | "
                       f"{t[32]['speedup']:.2f}× |")
    out += ["", "Where it wins and where it loses (from the rows above):", "", *verdict(res)]
    return "\n".join(out) + "\n"


def verdict(res: dict) -> list[str]:
    """One line per low-rank fraction: MoE (each E with that k/E) against svd-llm at the same FFN FLOPs."""
    lines = []
    for lr in sorted((r for r in res["rows"] if "keep" in r), key=lambda r: r["keep"]):
        same = [r for r in res["rows"] if "keep" not in r and abs(r["active"] / r["experts"] - lr["keep"]) < 1e-9]
        if not same:
            continue
        best = min(same, key=lambda r: r["ppl_ratio"])
        q = "better" if best["ppl_ratio"] < lr["ppl_ratio"] else "worse"
        healed = ", healed" if "heal_steps" in best else ""
        lines.append(f"- {lr['keep']:.3g} of the FFN FLOPs: MoE E={best['experts']} k={best['active']}{healed} perplexity ÷ "
                     f"dense {best['ppl_ratio']:.3g} vs svd-llm {lr['ppl_ratio']:.3g} ({q}); decode step "
                     f"{best['decode_speedup']:.2f}× vs {lr['decode_speedup']:.2f}×, forward "
                     f"{best['forward_speedup']:.2f}× vs {lr['forward_speedup']:.2f}× over dense.")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma", choices=MODELS)
    ap.add_argument("--quick", action="store_true", help="tiny random Gemma (smoke run)")
    ap.add_argument("--experts", nargs="*", type=int, default=[8, 16])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--lowrank", nargs="*", type=float, default=[0.125, 0.25, 0.375, 0.5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--report-only", action="store_true", help="redraw the PNG and MOE.md from the saved JSON")
    ap.add_argument("--heal-steps", type=int, default=0, help="also a row per E at k = E/4 healed this many steps")
    ap.add_argument("--heal-lr", type=float, default=1e-5)
    ap.add_argument("--refine-steps", type=int, default=None, help="--refine-steps of the low-rank rows (default: "
                                                                      "svd-llm's)")
    ap.add_argument("--alloc", default=None, choices=["uniform", "global"], help="--alloc of the low-rank rows "
                    "(default: svd-llm's, global, which holds every block's statistics in memory: 18 GB for Qwen)")
    ap.add_argument("--resume", action="store_true", help="keep the saved JSON's rows and measure only the missing ones")
    a = ap.parse_args(argv)
    if a.report_only:
        report()
        return
    b = bench_for(a.model, a.quick)
    if a.quick:                 # the tiny model: 256 positions, 128 FFN neurons
        a.experts, a.calib_samples, a.seq_len, a.lowrank, a.repeats = [8], 8, 64, [0.25, 0.5], 2
    else:
        b.eval_windows = a.eval_windows
    res = run(b, a.experts, a.calib_samples, a.seq_len, a.threads, a.repeats, a.lowrank,
              previous=common.read_json(f"moe_{b.name}") if a.resume else None, heal_steps=a.heal_steps,
              heal_lr=a.heal_lr, refine_steps=a.refine_steps, alloc=a.alloc)
    common.write_json(f"moe_{b.name}", res)
    plot(res)
    if not a.quick:
        report()


MODELS = ("gemma", "qwen")


def bench_for(model: str, quick: bool) -> common.Bench:
    if quick:
        return common.benches(True, ["tiny-gemma"])[0]
    if model == "gemma":
        return common.benches(False, ["gemma"])[0]
    import data
    return common.Bench("qwen", "Qwen2.5-Coder-1.5B", str(data.qwen_dir()), True, calib_samples=16,
                        calib_seq_len=256, eval_seq_len=512, latency_seq_len=32)


def report() -> None:
    """MOE.md (and each PNG) from the saved JSON of every model measured."""
    sections = []
    for model in MODELS:
        if not (common.RESULTS / f"moe_{model}.json").is_file():
            continue
        res = common.read_json(f"moe_{model}")
        if "flops_per_token" not in res["dense"]:       # a run before they were recorded: count them now
            dense = bench_for(model, False).load().model
            res["dense"].update(ffn_flops_per_token=dense_ffn_flops(dense), **flops(dense, res["latency"]["seq_len"]))
            common.write_json(f"moe_{model}", res)
        plot(res)
        sections.append(markdown(res))
    head = ("# MoEfication (`--method moe`)\n\nEach dense FFN split into E experts and a router (k run per token), "
            "against dense and against low rank (`svd-llm` on the FFN projections only) at the same FFN FLOPs. "
            "Low-rank rows without `--refine-steps` predate block refinement (it was off).\n\n")
    (common.RESULTS.parent / "MOE.md").write_text(head + "\n".join(sections))


if __name__ == "__main__":
    main()
