"""Issue "quality past the records": each new piece of the default compression in a row of its own, on held-out text.

Every row compresses Gemma-3-270M (or another causal bench model) with svd-llm at each keep from the same
calibration (the benchmark's), one statistics pass per kind shared by the rows that read it, and scores perplexity
on two held-out sets: python-docs windows (the calibration's source, disjoint files) and standard-library
docstrings (another source), each as a ratio to the dense model's. Rows:

    default        `layerzip compress`'s defaults: svd-llm with global allocation, diagonal output Fisher, 32
                   block-refinement steps, then (a causal LM) 32 healing steps (jobs.default_heal_steps)
    noheal         the previous default: the same without healing (--heal-steps 0; lz.compress_'s defaults)
    refine0        the one before: without block refinement either (--refine-steps 0)
    refine16       the default with 16 refinement steps
    refine32       32 refinement steps asked for (an encoder's default has none)
    kfac           the output gradients' whole covariance, shrunk toward its diagonal (--kfac)
    share2         the defaults with one input basis per projection shared by 2 consecutive blocks (--share 2)
    share-auto     the same with the blocks per basis chosen per projection type by the allocation (--share auto)

    global         global allocation (an encoder's default with 64 documents is uniform ranks)
    global-fisher  global allocation with the output Fisher (an encoder's default from 512 documents)
    uniform        uniform ranks with the output Fisher (an encoder's default below 512 documents)
    nofisher       uniform ranks without the output Fisher: plain SVD-LLM (an encoder's previous default)
    heal8          refine0, then 8 steps of healing (lz.heal_) toward the dense model on calibration text, at
                   the first healing default (lr 1e-5, 2 × 128 tokens a step)
    refine+heal8   noheal, then the same healing
    heal64         default, then 64 healing steps as `compress --heal-steps 64` takes them (CLI batches, lr 5e-5)

kfac, share2, share-auto, global, global-fisher, uniform and nofisher are measured without block refinement and
healing (each against refine0). An encoder's output Fisher is that of its contrastive loss (two views per document)
at uniform ranks and that of its pooled embedding with global allocation (`SVDLLM.encoder_loss`, layerzip.stats.fisher).

An encoder (`--model minilm`) is scored by Recall@1, MRR and cosine to the dense embeddings on held-out python-docs
pairs, and Recall@1 and MRR on held-out standard-library docstring pairs, instead. Rows already in bench/results/pieces_<model>.json with the same data are kept (merged by row and
keep), so a run can be resumed or extended with `--rows`. Writes the JSON, a plot and bench/PIECES.md (every model).
`--calib-samples N --calib-seq-len L`: another calibration than the benchmark's (e.g. the CLI's default, 64 × 512),
kept in pieces_<model>_c<N>x<L>.json.
    python bench/pieces.py --rows default refine0 kfac share2 share-auto --keeps 0.8 0.6 0.5
    python bench/pieces.py --model minilm --rows default nofisher global share2 share-auto --keeps 0.5 0.3
    python bench/pieces.py --rows default noheal refine0 --keeps 0.6 0.5 --calib-samples 64 --calib-seq-len 512
"""
from __future__ import annotations

import argparse
import time

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402
from common import lz  # noqa: E402
from fisher_tokens import held_out, score  # noqa: E402
from layerzip.compress import gradients  # noqa: E402
from layerzip.heal import HEAL_LR, HEAL_STEPS, windows_per_step  # noqa: E402
from layerzip.data import builtin_pairs, token_batches  # noqa: E402
from layerzip.jobs import retrieval_eval  # noqa: E402
from layerzip.models import select_targets  # noqa: E402
from layerzip.stats import with_fisher  # noqa: E402

ROWS = {
    "default": dict(config=dict(), gradients="output", heal_steps="default",
                    what="`layerzip compress` defaults (causal LMs: global allocation, diagonal output Fisher, 32 "
                         "block-refinement steps per block, then 32 healing steps at lr 5e-5, one 512-token "
                         "calibration window a step; an encoder: global allocation + Fisher from 512 documents, "
                         "below uniform ranks weighted by its contrastive loss's Fisher; no refinement or healing)"),
    "noheal": dict(config=dict(), gradients="output",
                   what="the previous default: the same without healing (--heal-steps 0; lz.compress_ alone)"),
    "refine0": dict(config=dict(refine_steps=0), gradients="output",
                    what="the one before: without block refinement or healing (--refine-steps 0 --heal-steps 0)"),
    "refine32": dict(config=dict(refine_steps=32), gradients="output",
                     what="--refine-steps 32 (what causal LMs get by default; an encoder's default has none)"),
    "refine16": dict(config=dict(refine_steps=16), gradients="output",
                     what="the default with 16 block-refinement steps instead of 32"),
    "kfac": dict(config=dict(kfac=True, refine_steps=0), gradients="output_cov",
                 what="two-sided: the output gradients' covariance, shrunk toward its diagonal (--kfac)"),
    "share2": dict(config=dict(share=2), gradients="output",
                   what="defaults + one input basis per projection for 2 consecutive blocks (--share 2)"),
    "share-auto": dict(config=dict(share="auto", alloc="global"), gradients="output",
                       what="defaults + blocks per shared basis chosen per projection type (--share auto; "
                            "global allocation)"),
    "global": dict(config=dict(alloc="global", refine_steps=0), gradients="output",
                   what="global allocation (an encoder's default with 64 documents is uniform)"),
    "global-fisher": dict(config=dict(alloc="global", fisher=True, refine_steps=0), gradients="output",
                          what="global allocation with the output Fisher (what an encoder gets from 512 documents)"),
    "uniform": dict(config=dict(alloc="uniform", refine_steps=0), gradients="output",
                    what="uniform ranks with the output Fisher (an encoder's default below 512 documents)"),
    "nofisher": dict(config=dict(alloc="uniform", fisher=False, refine_steps=0), gradients="output",
                     what="uniform ranks without the output Fisher: plain SVD-LLM (an encoder's previous default)"),
    "heal8": dict(config=dict(refine_steps=0), gradients="output", heal_steps=8,
                  what="refine0, then 8 steps of healing (lz.heal_: logits KL to the dense model, "
                       "balanced factors, lr 1e-5, 2 × 128 calibration tokens a step)"),
    "refine+heal8": dict(config=dict(), gradients="output", heal_steps=8,
                         what="noheal (with block refinement), then the same 8 healing steps"),
    "heal64": dict(config=dict(), gradients="output", heal_steps="cli64",
                   what="default, then 64 healing steps as `compress --heal-steps 64` takes them (an encoder: "
                        "last hidden states' relative squared error, 16 calibration documents a step, lr 5e-5)"),
}


def evaluator(bench, loaded, windows: int = 4, wide: bool = False):
    """The held-out scoring of every row: `evaluate(m)` for a loaded model `m` (a `lz.models.Loaded`) compressed from
    `loaded` (the dense model). Causal: perplexity on `windows` held-out windows of python docs and of standard-library
    docstrings. Encoder: Recall@1, MRR and cosine to the dense embeddings on held-out python-docs pairs, and Recall@1
    and MRR on 200 held-out standard-library docstring pairs (`docstrings_`); `wide`: also Recall@1 among 500 pairs of
    each set (`_500`: 100 pairs give Recall@1 a standard error of about 0.045, 500 about 0.02). Shared with
    bench/linear_peers.py."""
    if bench.causal:
        sets = held_out(bench)

        def evaluate(m):
            return score(m.model, m.tokenizer, sets, windows, bench.eval_seq_len)
    else:           # an encoder: retrieval on held-out python-docs pairs, cosine to the dense embeddings, and
        ref = bench.reference(loaded)       # retrieval on a second held-out set (standard-library docstring pairs)
        doc_pairs = builtin_pairs(200)
        import data
        big = {"500": [{"query": r["query"], "doc": r["doc"][:common.DOC_CHARS]} for r in data.retrieval_pairs(500)],
               "docstrings_500": builtin_pairs(500)} if wide else {}

        def evaluate(m):
            out = {k: v for k, v in bench.evaluate(m, ref).items() if k in ("recall_at_1", "mrr", "cosine_to_dense")}
            second = retrieval_eval(m, doc_pairs, progress=False)
            out.update(docstrings_recall_at_1=second["recall_at_1"], docstrings_mrr=second["mrr"])
            for name, pairs in big.items():
                r = retrieval_eval(m, pairs, progress=False)
                out[f"recall_at_1_{name}"] = r["recall_at_1"]
            return out
    return evaluate


def cli_heal(bench, m, loaded, steps: int) -> dict:
    """Heal `m` towards `loaded` as `compress --heal-steps STEPS` does (jobs.heal_after_compress): the calibration
    text in the CLI's batches (a causal LM: whole windows, about HEAL_TOKENS tokens a step; an encoder: 16 documents
    a step), at HEAL_LR."""
    batches = token_batches(m.tokenizer, bench._data()["calib"], bench.causal, bench.calib_samples,
                            bench.calib_seq_len,
                            batch_size=windows_per_step(bench.calib_seq_len) if bench.causal else 16)
    return lz.heal_(m.model, loaded.model, batches, steps=steps, lr=HEAL_LR, progress=True)


def run(bench, rows: list[str], keeps: list[float], windows: int, name: str) -> dict:
    loaded = bench.load()
    calib = bench.calib(loaded)
    evaluate = evaluator(bench, loaded, windows, wide=True)
    key = {"calib_tokens": sum(int(b["attention_mask"].sum()) for b in calib), "eval_windows": windows,
           "eval_seq_len": bench.eval_seq_len}
    prev = common.read_json(name) if (common.RESULTS / f"{name}.json").is_file() else {}
    res = {"model": bench.title, "bench": bench.name, "name": name, "causal": bench.causal, **key,
           "calib": [bench.calib_samples, bench.calib_seq_len], "env": common.env(),
           "code": common.code_version()}
    if prev and all(prev.get(k) == v for k, v in key.items()):
        res["dense"], res["rows"] = prev["dense"], prev["rows"]
        if not bench.causal and "recall_at_1_500" not in res["dense"]:    # rows before the 500-pair metrics
            res["dense"] = evaluate(loaded)
    else:
        res["dense"], res["rows"] = evaluate(loaded), []
    print("dense", res["dense"], flush=True)
    t = time.perf_counter()
    grams = lz.calibrate(loaded.model, lz.SVDLLM(alloc="global", fisher=False), calib, progress=True)
    seconds_grams = time.perf_counter() - t
    targets = select_targets(loaded.model)
    grads: dict[str, tuple] = {}
    for row in rows:
        spec = ROWS[row]
        cfg0 = lz.SVDLLM(keep=keeps[0], **spec["config"]).resolve(loaded.model, calib)
        kind = (spec["gradients"], cfg0.encoder_loss) if cfg0.fisher else None
        if kind is not None and kind not in grads:
            t = time.perf_counter()
            grads[kind] = (gradients(loaded.model, targets, kind[0], cfg0.gradient_batches(calib), progress=True,
                                     encoder_loss=kind[1]), time.perf_counter() - t)
        fisher, seconds_fisher = grads[kind] if kind is not None else (None, 0.0)
        stats = with_fisher(grams, fisher) if fisher is not None else grams
        for keep in keeps:
            m = bench.load()
            t = time.perf_counter()
            rep = lz.compress_(m.model, lz.SVDLLM(keep=keep, **spec["config"]), calib=calib, progress=False,
                               stats=stats)
            healed, steps = None, spec.get("heal_steps")
            if steps == "default" and bench.causal:       # what compress does (an encoder's default: no healing)
                healed = cli_heal(bench, m, loaded, HEAL_STEPS)
            elif steps == "cli64":
                healed = cli_heal(bench, m, loaded, 64)
            elif isinstance(steps, int):
                heal_batches = token_batches(m.tokenizer, bench._data()["calib"], bench.causal, 2 * steps, 128,
                                             batch_size=2)
                healed = lz.heal_(m.model, loaded.model, heal_batches, steps=steps, progress=True)
            out = {"row": row, "what": spec["what"], "keep": keep, "keep_achieved": rep["keep_achieved"],
                   "seconds": {"grams": seconds_grams, "gradients": seconds_fisher,
                               "decompose": time.perf_counter() - t},
                   "perplexity" if bench.causal else "metrics": evaluate(m),
                   "code": common.code_version()}
            for k in ("share", "refine"):
                if k in rep:
                    out[k] = rep[k]
            if healed is not None:
                out["heal"] = {k: v for k, v in healed.items() if k != "losses"}
            if bench.causal:
                out["ratio_to_dense"] = {k: v / res["dense"][k] for k, v in out["perplexity"].items()}
            res["rows"] = [r for r in res["rows"] if (r["row"], r["keep"]) != (row, keep)] + [out]
            print(row, keep, out.get("ratio_to_dense") or out["metrics"], flush=True)
            common.write_json(name, res)
    return res


def _value(r: dict, s: str) -> float:
    """What a row's cell shows for metric / set `s`: perplexity ÷ dense (causal), the metric itself (encoders)."""
    return r["ratio_to_dense"][s] if "ratio_to_dense" in r else r["metrics"].get(s, float("nan"))


def plot(res: dict):
    sets = list(res["dense"])
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.6), squeeze=False)
    for ax, s in zip(axes[0], sets):
        for row in dict.fromkeys(r["row"] for r in res["rows"]):
            rs = sorted((r for r in res["rows"] if r["row"] == row), key=lambda r: r["keep_achieved"])
            ax.plot([r["keep_achieved"] for r in rs], [_value(r, s) for r in rs], "o-", label=row)
        ax.set_xlabel("keep_achieved (block-linear parameters)")
        if res.get("causal", True):
            ax.set_ylabel("perplexity ÷ dense")
            ax.set_yscale("log")
            ax.set_title(f"{res['model']}: held-out {s}", fontsize=10)
        else:
            ax.axhline(res["dense"][s], color="k", lw=0.8, ls=":", label="dense")
            ax.set_ylabel(s)
            ax.set_title(f"{res['model']}: held-out {s}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return common.save_figure(fig, common.RESULTS / f"{res.get('name', 'pieces_' + res['bench'])}.png")


def markdown(res: dict) -> list[str]:
    sets = list(res["dense"])
    keeps = sorted({r["keep"] for r in res["rows"]}, reverse=True)
    causal = res.get("causal", True)
    own = "the benchmark's" if res.get("name", "pieces_" + res["bench"]) == "pieces_" + res["bench"] else \
        "{} windows × {} tokens".format(*res["calib"])
    about = (f"Calibration {res['calib_tokens']} tokens of python docs ({own}); held-out perplexity on "
             f"{res['eval_windows']} windows × {res['eval_seq_len']} tokens of each set, ÷ dense ("
             + ", ".join(f"{s} {res['dense'][s]:.2f}" for s in sets) + "). Each cell: python-docs / docstrings."
             if causal else
             f"Calibration {res['calib_tokens']} tokens ({res['calib'][0]} standard-library docstrings"
             + (", the benchmark's" if own == "the benchmark's" else "") + "); held-out "
             "python-docs {section title → body} pairs (100) and held-out standard-library docstring {summary → rest} "
             "pairs (200, `docstrings_`)" + (", and Recall@1 among 500 pairs of each (`_500`)"
                                             if "recall_at_1_500" in res["dense"] else "") + ": each cell " + " / ".join(sets) + " (dense "
             + " / ".join(f"{res['dense'][s]:.3f}" for s in sets) + ").")
    name = res.get("name", "pieces_" + res["bench"])
    flags = "" if name == "pieces_" + res["bench"] else " --calib-samples {} --calib-seq-len {}".format(*res["calib"])
    out = [f"## {res['model']}" + (f", calibration {res['calib'][0]} × {res['calib'][1]}" if flags else ""), "",
           f"`python bench/pieces.py --model {res['bench']}{flags}` ({res['env']['date']}, code "
           f"{res['code']}). {about}", "", f"![](results/{name}.png)", "",
           "| row | what | " + " | ".join(f"keep {k}" for k in keeps) + " |", "|---|---|" + "---|" * len(keeps)]
    for row in dict.fromkeys(r["row"] for r in res["rows"]):
        by = {r["keep"]: r for r in res["rows"] if r["row"] == row}
        cells = [" / ".join(f"{_value(by[k], s):.3f}".replace("nan", "–") for s in sets) if k in by else "–"
                 for k in keeps]
        out.append(f"| {row} | {next(iter(by.values()))['what']} | " + " | ".join(cells) + " |")
    shared = [r for r in res["rows"] if r.get("share") and r["row"] == "share-auto"]
    if shared:
        out += ["", "Blocks per shared basis that `--share auto` chose: " + "; ".join(
            f"keep {r['keep']}: " + ", ".join(f"{t} {n}" for t, n in r["share"].items()) for r in shared) + "."]
    return out + [""]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma", choices=["gemma", "minilm"])
    ap.add_argument("--rows", nargs="+", default=["default", "refine0"], choices=list(ROWS))
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6, 0.5])
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, help="calibration windows [default: the benchmark's]")
    ap.add_argument("--calib-seq-len", type=int, help="tokens per calibration window [default: the benchmark's]")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    if not a.report_only:
        bench = common.benches(False, only=[a.model])[0]
        name = f"pieces_{bench.name}"
        if a.calib_samples or a.calib_seq_len:
            bench.calib_samples = a.calib_samples or bench.calib_samples
            bench.calib_seq_len = a.calib_seq_len or bench.calib_seq_len
            name += f"_c{bench.calib_samples}x{bench.calib_seq_len}"
        plot(run(bench, a.rows, a.keeps, a.eval_windows, name))
    lines = ["# Quality pieces", "", "Each piece of the default compression in a row of its own (svd-llm, one "
             "calibration and one statistics pass per model, every row at every keep from them); bench/pieces.py. "
             "kfac, share2, share-auto, the global and uniform rows, nofisher and heal8 are measured without block "
             "refinement and healing (compare them with refine0).", ""]
    for f in sorted(common.RESULTS.glob("pieces_*.json")):
        res = common.read_json(f.stem)
        plot(res)
        lines += markdown(res)
    (common.RESULTS.parent / "PIECES.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
