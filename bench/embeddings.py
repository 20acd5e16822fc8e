"""Gemma-3-270M's tied 262k×640 embedding (63% of the parameters) factorized alone: which weighting keeps quality.

Every row factorizes only the embedding (and so the tied LM head, one factorization) at the same rank, from one set
of statistics (token counts and the final hidden states' Gram of `--calib-samples` python-docs windows), and is
scored by held-out python-docs perplexity (`--eval-windows` windows of 512 tokens) against the dense model:

    svd                  plain truncated SVD of E (no data)
    freq β, lookup       Σ_t w_t ‖E_t − Ê_t‖²  (G = I), w = (1 − β)·frequency + β/vocab
    freq β, tied         Σ_t w_t (E_t − Ê_t) G (E_t − Ê_t)ᵀ, G = ½ I/dim + ½ HᵀH/tr  (half lookup, half head)
    head only            G = HᵀH/tr (the head's SVD-LLM loss alone: layerzip's default, β = 0.1)

Writes bench/results/embeddings_gemma.json. Usage: python bench/embeddings.py --keeps 0.5 0.3
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import layerzip as lz
from layerzip.data import load_documents
from layerzip.embeddings import token_counts
from layerzip.evaluate import perplexity
from layerzip.methods.embedding import embedding_factors, embedding_gram, token_weights
from layerzip.models import set_module, tied_head
from layerzip.nn import LowRankEmbedding, TiedLowRankHead
from layerzip.nn.embedding import embedding_scale
from layerzip.stats import collect_stats

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "cache" / "gemma-3-270m"))
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.5])
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--rows", nargs="+", default=["svd", "lookup:0.1", "tied:0.1", "tied:0.01", "tied:0.5", "head:0.1"])
    ap.add_argument("--out", default=str(RESULTS / "embeddings_gemma.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    loaded = lz.load_model(args.model, dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    calib = lz.calibration_batches(loaded, str(ROOT / "cache" / "text" / "docs_calib.txt"), args.calib_samples, 512)
    held = load_documents(ROOT / "cache" / "text" / "docs_eval.txt")
    emb, head = model.get_input_embeddings(), tied_head(model)
    assert head is not None, "this benchmark is about a tied embedding"
    names = {id(m): n for n, m in model.named_modules()}
    emb_name, head_name = names[id(emb)], names[id(head)]
    V, d = emb.weight.shape
    t0 = time.perf_counter()
    counts = token_counts(calib, V)
    H = collect_stats(model, {head_name: head}, calib, progress=False)[head_name].gram
    t_stats = time.perf_counter() - t0

    def ppl():
        return perplexity(model, tok, held, 512, args.eval_windows, progress=False)

    rows = [{"row": "dense", "perplexity": ppl(), "params": lz.models.count_params(model)}]
    print(json.dumps(rows[-1]), flush=True)
    E = emb.weight.detach().double()
    for keep in args.keeps:
        rank = int(keep * V * d / (V + d))
        for row in args.rows:
            kind, _, beta = row.partition(":")
            w = token_weights(None if kind == "svd" else counts, V, float(beta or 0.1))
            G = {"svd": embedding_gram(d, None), "lookup": embedding_gram(d, None),
                 "tied": embedding_gram(d, H, lookup_share=0.5), "head": embedding_gram(d, H, lookup_share=0.0)}[kind]
            t = time.perf_counter()
            A, B = embedding_factors(E, w, G, rank)
            new = LowRankEmbedding.from_factors(A, B, emb.padding_idx, embedding_scale(emb), dtype=emb.weight.dtype)
            set_module(model, emb_name, new)
            set_module(model, head_name, TiedLowRankHead.of(new, emb_name))
            t_fact = time.perf_counter() - t
            rows.append({"row": row, "keep": keep, "rank": rank, "perplexity": ppl(),
                         "params": lz.models.count_params(model), "seconds_factorize": t_fact})
            rows[-1]["ratio_to_dense"] = rows[-1]["perplexity"] / rows[0]["perplexity"]
            print(json.dumps(rows[-1]), flush=True)
            set_module(model, emb_name, emb)
            set_module(model, head_name, head)
    doc = {"model": args.model, "calib_windows": len(calib) and sum(len(b["input_ids"]) for b in calib),
           "calib_tokens": int(counts.sum()), "distinct_calib_tokens": int((counts > 0).sum()), "vocab": V,
           "eval_windows": args.eval_windows, "seconds_stats": t_stats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
