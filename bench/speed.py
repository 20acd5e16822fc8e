"""Compression time against its limit, measured in the same run as the quality curves (quality.py calls these).

A compression is timed in four stages: calibration forward, statistics, decomposition, save. The statistics are
accumulated by hooks inside the calibration forward, so the split is: `calibration_forward` = one plain forward over
the same batches (timed once per model by `limit`), `statistics` = calibration wall time − that forward. Methods
with sequential calibration (svd-llm's default) calibrate block by block inside the decomposition stage.

The limit is what any method must at least do: one plain forward over the calibration tokens (methods that use
statistics) plus a bare float64 `torch.linalg.svd` of every target matrix (the same precision the methods use).
"""
from __future__ import annotations

import time

import torch

import common
from layerzip.models import backbone
from layerzip.models import select_targets


@torch.no_grad()
def limit(loaded, calib: list[dict]) -> dict:
    net = backbone(loaded.model)
    t = time.perf_counter()
    for batch in calib:
        net(**batch)
    fwd = time.perf_counter() - t
    targets = select_targets(loaded.model)
    t = time.perf_counter()
    for mod in targets.values():
        torch.linalg.svd(mod.weight.detach().double(), full_matrices=False)
    svd = time.perf_counter() - t
    tokens = sum(int(b["attention_mask"].sum()) for b in calib)
    return {"seconds_forward": fwd, "seconds_svd": svd, "targets": len(targets), "calib_tokens": tokens}


def timed_compress(loaded, cfg, calib: list[dict], out_dir: str, lim: dict, cache: dict | None = None):
    """Fresh compress_ + save, split into stages. With `cache`, the statistics are collected by `lz.calibrate` (timed
    as the calibration stage) and stored there (see common.cached_stats) so the other keeps of the curve reuse them."""
    stats, t_stats = None, 0.0
    if cache is not None and cfg.needs_stats and not cfg.sequential:
        t = time.perf_counter()
        stats = common.cached_stats(cfg, calib, loaded.model, cache)
        t_stats = time.perf_counter() - t
    rep = common.lz.compress_(loaded.model, cfg, calib=calib if cfg.needs_stats else None, progress=False,
                              stats=stats)
    rep["seconds_calibration"] += t_stats
    t = time.perf_counter()
    common.lz.save(loaded.model, f"{out_dir}/model", tokenizer=loaded.tokenizer)
    save = time.perf_counter() - t
    return rep, split(*seconds(rep), save, lim, cfg.needs_stats,
                      bool(getattr(cfg, "sequential", False)))


def seconds(rep: dict) -> tuple[float, float]:
    """(calibration, decomposition) seconds of a compress_ report (drop-blocks counts its block similarity
    forward and the removal as calibration)."""
    return rep["seconds_calibration"], rep["seconds_decomposition"]


def split(calibration: float, decomposition: float, save: float, lim: dict, needs_stats: bool,
          sequential: bool) -> dict:
    """Stages and the ratio to the limit. Sequential calibration runs its forwards block by block *inside* the
    decomposition stage, so there the calibration columns are 0 and `decomposition` holds both."""
    fwd = lim["seconds_forward"] if needs_stats else 0.0
    cal_fwd = min(fwd, calibration)
    stages = {"calibration_forward": cal_fwd, "statistics": calibration - cal_fwd,
              "decomposition": decomposition, "save": save}
    total = sum(stages.values())
    bound = fwd + lim["seconds_svd"]
    return {**stages, "total": total, "limit": bound, "limit_forward": fwd, "limit_svd": lim["seconds_svd"],
            "ratio_to_limit": total / bound if bound else None, "seconds_calibration_measured": calibration,
            "sequential": sequential}


def table(res: dict) -> list[dict]:
    """One row per method from a quality_<model>.json: the fresh run's stages and its ratio to the limit."""
    return [{"method": r["method"], "keep": r["keep"], **r["timing"]} for r in res["rows"] if "timing" in r]
