"""On a CUDA machine: compress Gemma-3-270M with `--device cuda` and with `--device cpu` (same calibration),
streamed and in memory, and compare ranks and held-out perplexity. Nothing else in layerzip needs a GPU.

    python bench/gpu_check.py [--calib-samples 16] [--keep 0.8]
Prints one JSON object and writes bench/results/gpu_check.json. Exit code 1 when the GPU result differs (ranks
not equal, or perplexity more than 1% apart), 0 when it agrees, 2 when there is no CUDA device.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import common
import data


def one(device: str, stream: bool, calib_samples: int, keep: float, texts) -> dict:
    from layerzip.data import calibration_batches
    from layerzip.evaluate import perplexity_scored
    from layerzip.io import load_model
    lz = common.lz
    t0 = time.perf_counter()
    loaded = load_model(data.gemma_dir(), stream=stream, device=device)
    batches = calibration_batches(loaded, str(data.TEXT_DIR / "docs_calib.txt"), calib_samples, 512)
    rep = lz.compress_(loaded.model, lz.SVDLLM(keep=keep), calib=batches, progress=False)
    seconds = time.perf_counter() - t0
    ppl = perplexity_scored(loaded.model, loaded.tokenizer, texts, 512, 8, progress=False)["perplexity"]
    return {"device": device, "stream": stream, "seconds": seconds, "ranks": rep["ranks"], "perplexity": ppl,
            "keep_achieved": rep["keep_achieved"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--keep", type=float, default=0.8)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 2
    texts = data.eval_texts()
    runs = [one(d, s, a.calib_samples, a.keep, texts) for d in ("cuda", "cpu") for s in (False, True)]
    ref = runs[-1]
    out = {"runs": [{k: v for k, v in r.items() if k != "ranks"} for r in runs],
           "ranks_equal": [r["ranks"] == ref["ranks"] for r in runs],
           "rank_differences": [sum(r["ranks"][n] != ref["ranks"][n] for n in ref["ranks"]) for r in runs],
           "perplexity_rel_diff": [abs(r["perplexity"] / ref["perplexity"] - 1) for r in runs],
           "gpu": torch.cuda.get_device_name(0), "env": common.env()}
    ok = all(d < 0.01 for d in out["perplexity_rel_diff"]) and all(x <= 2 for x in out["rank_differences"])
    out["agrees"] = ok
    common.write_json("gpu_check", out)
    print(json.dumps(out, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
