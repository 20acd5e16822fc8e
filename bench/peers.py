"""Peers side by side: tensorly-torch (tltorch) CP / Tucker / TT layers at the same parameter count as our keep.

Every target Linear is replaced by `tltorch.FactorizedLinear.from_linear(linear, rank=keep, factorization=...)`
(Tucker and block-TT; CP is probed with `--cp-probe`: at a matched parameter count its rank is in the thousands)
(tltorch's float rank is the fraction of the weight's parameters kept, the same meaning as our keep; the achieved
fraction is measured and reported). Same models, same calibration-free setting, same metric and latency as ours,
plus their compression time. Dev-only: layerzip never imports tltorch.

MosaicML Composer's `apply_factorization` and fasterai's decomposer are probed with a dry-run install into a
throw-away venv (`--probe`); what blocks them is written to peers_install.json.

    python bench/peers.py [--quick] [--models minilm gemma] [--keeps 0.8 0.5] [--probe]
Writes bench/results/peers_<model>.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

import common
from layerzip.evaluate import flops, latency
from layerzip.models import select_targets, set_module

warnings.filterwarnings("ignore", module="tensorly")

FACTORIZATIONS = ("tucker", "blocktt")   # blocktt: tltorch's tensor-train matrix (TT) format


def tltorch_compress_(model, factorization: str, keep: float) -> dict:
    import tltorch
    targets = select_targets(model)
    before = sum(p.numel() for m in targets.values() for p in m.parameters())
    t = time.perf_counter()
    for name, lin in targets.items():
        # implementation "reconstructed" (tltorch's default): "factorized" asks for 54 GB on a 128-token MiniLM batch
        new = tltorch.FactorizedLinear.from_linear(lin, rank=keep, factorization=factorization,
                                                   bias=lin.bias is not None)
        set_module(model, name, new)
    secs = time.perf_counter() - t
    after = sum(p.numel() for n in targets for p in model.get_submodule(n).parameters())
    return {"seconds_compress": secs, "keep_achieved": after / before, "target_params": after}


def run_model(b: common.Bench, keeps, threads: int = 1, progress: bool = True) -> dict:
    import tltorch
    loaded = b.load()
    ref = b.reference(loaded)
    seq = b.latency_seq_len
    dense_flops = flops(loaded.model, seq)["flops_per_token"]
    dense_lat = {bs: latency(loaded.model, bs, seq, 3, threads=threads) for bs in (1, 16)}
    rows = []
    for fac in FACTORIZATIONS:
        for keep in tqdm(keeps, desc=f"tltorch {fac} {b.name}", unit="keep", disable=not progress):
            row = {"method": fac, "keep": keep, "library": f"tensorly-torch {tltorch.__version__}"}
            try:
                m = b.load()
                row.update(tltorch_compress_(m.model, fac, keep))
                row.update(b.evaluate(m, ref))
                row["flops_per_token"] = flops(m.model, seq)["flops_per_token"]
                row["flop_bound"] = dense_flops / row["flops_per_token"]
                for bs in (1, 16):
                    ms = latency(m.model, bs, seq, 3, threads=threads)
                    row[f"latency_ms_batch{bs}"] = ms
                    row[f"speedup_batch{bs}"] = dense_lat[bs] / ms
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rows.append(row)
    return {"model": b.name, "dense_latency_ms": dense_lat, "dense_flops_per_token": dense_flops,
            "latency_seq_len": seq, "threads": threads, "rows": rows, "env": common.env()}


def cp_probe(keep: float = 0.5, shape=(1536, 384)) -> dict:
    """Why CP is not in the table: its rank at a matched parameter count, and the time of one ALS iteration."""
    import tltorch
    from tltorch.utils import get_tensorized_shape
    i, o = get_tensorized_shape(shape[1], shape[0], order=3, verbose=False)
    rank = tltorch.FactorizedLinear(i, o, factorization="cp", rank=keep).weight.rank
    t = time.perf_counter()
    tltorch.FactorizedLinear.from_linear(torch.nn.Linear(shape[1], shape[0]), rank=keep, factorization="cp",
                                         decomposition_kwargs={"n_iter_max": 1})
    return {"keep": keep, "shape": shape, "tensorized": [i, o], "cp_rank": rank,
            "seconds_one_als_iteration_one_layer": time.perf_counter() - t}


def probe_installs() -> dict:
    """Dry-run installs of the other peers into a scratch venv: would they install next to torch 2.13?"""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "venv", tmp], check=True)
        for pkg, fn in (("mosaicml", "composer.functional.apply_factorization"),
                        ("fasterai", "fasterai.misc.all.Fasterai decomposer")):
            rep = Path(tmp) / f"{pkg}.json"
            p = subprocess.run([f"{tmp}/bin/pip", "install", "--dry-run", "--quiet", "--report", str(rep), pkg],
                               capture_output=True, text=True, timeout=600)
            info = {"api": fn, "returncode": p.returncode, "stderr_tail": p.stderr.strip().splitlines()[-3:]}
            if rep.is_file():
                inst = json.loads(rep.read_text()).get("install", [])
                pins = {i["metadata"]["name"]: i["metadata"]["version"] for i in inst}
                info["resolved"] = {k: pins[k] for k in pins if k.lower() in (pkg, "torch", "torchvision",
                                                                              "fastai", "numpy")}
                info["packages"] = len(pins)
            out[pkg] = info
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--keeps", nargs="*", type=float)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", action="store_true", help="also dry-run-install composer and fasterai")
    ap.add_argument("--cp-probe", action="store_true", help="time one CP ALS iteration on one MiniLM-sized layer")
    a = ap.parse_args(argv)
    torch.set_num_threads(common.DEFAULT_THREADS)
    for b in common.benches(a.quick, a.models):
        res = run_model(b, a.keeps or b.keeps, a.threads)
        common.write_json(f"peers_{b.name}", res)
        q = common.read_json(f"quality_{b.name}")
        if q:                                   # redraw the quality curve with the peers' lines
            import quality
            quality.plot(q, res)
    if a.cp_probe:
        common.write_json("peers_cp_probe", cp_probe())
    if a.probe:
        common.write_json("peers_install", probe_installs())


if __name__ == "__main__":
    main()
