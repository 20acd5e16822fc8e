"""MiniLM, svd-llm: how calibration size decides whether sequential calibration + correction pays off.

For each (calibration docstrings, setting): keep 0.5, cosine of mean-pooled embeddings to dense on held-out
python-docs paragraphs, and retrieval Recall@1 / MRR on the held-out title→body pairs. JSON to
bench/results/calib_size.json (rows merged across runs). Usage:
    python bench/calib_size.py --docs 64 1024 --settings uniform seqcorr
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import layerzip as lz  # noqa: E402
from data import eval_texts, retrieval_pairs  # noqa: E402
from layerzip.evaluate import embed, mean_cosine, retrieval_metrics  # noqa: E402

OUT = Path(__file__).parent / "results" / "calib_size.json"
SETTINGS = {"uniform": {}, "seqcorr": {"sequential": True, "correct": True}}


def measure(model, tok, ref_emb, pairs):
    emb = embed(model, tok, eval_texts(100), progress=False)
    q = embed(model, tok, [p["query"] for p in pairs], progress=False)
    d = embed(model, tok, [p["doc"] for p in pairs], progress=False)
    return {"cosine_to_dense": mean_cosine(emb, ref_emb), **retrieval_metrics(q, d)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, nargs="+", default=[64, 1024])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--keep", type=float, default=0.5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ref = lz.load_model("minilm")
    pairs = retrieval_pairs(100)
    ref_emb = embed(ref.model, ref.tokenizer, eval_texts(100), progress=False)
    dense = {"setting": "dense", **measure(ref.model, ref.tokenizer, ref_emb, pairs)}
    for n in a.docs:
        for s in a.settings:
            m = lz.load_model("minilm")
            t = time.perf_counter()
            batches = lz.calibration_batches(m, "builtin", n_samples=n, seq_len=512)
            rep = lz.compress_(m.model, lz.SVDLLM(keep=a.keep, **SETTINGS[s]), calib=batches, progress=False)
            row = {"docs": n, "setting": s, "keep": a.keep, "keep_achieved": rep["keep_achieved"],
                   "seconds_compress": time.perf_counter() - t, **measure(m.model, m.tokenizer, ref_emb, pairs)}
            rows = json.loads(OUT.read_text())["rows"] if OUT.is_file() else []     # re-read: runs may overlap
            rows = [r for r in rows if (r["docs"], r["setting"], r["keep"]) != (n, s, a.keep)] + [row]
            OUT.write_text(json.dumps({"model": "minilm", "dense": dense, "rows": rows}, indent=1))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
