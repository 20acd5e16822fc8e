"""Depth decomposition: remove whole blocks that barely change the residual stream.

    calibration -> residual-stream similarity (stats.block_similarity) -> choose n blocks -> remove them

Two rules pick the blocks:
  span       the contiguous blocks ℓ*..ℓ*+n−1 with the smallest angular distance d(x^ℓ*, x^{ℓ*+n})  (Gromov et al.)
  influence  the n blocks of lowest Block Influence 1 − E[cos(x_in, x_out)]                     (ShortGPT)

Removal shrinks the blocks' ModuleList and rewrites the config (layer count, per-layer lists such as Gemma 3's
`layer_types`) and the `layer_idx` of attention modules (their key into the KV cache), so the saved directory
reloads with `lz.load` and with plain `transformers` `from_pretrained`.

`DropBlocks` is a method whose `restructure_` removes the blocks; `DropBlocks(then="svd-llm")` (CLI:
`--method drop-blocks+svd-llm`) then has `compress_` apply low rank to the remaining blocks so that both together
meet one `--keep`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import LayerzipError
from ..models import find_blocks, set_module
from ..stats import block_similarity
from .base import CompressConfig, config_from_dict, option, register_method

SELECT = ("span", "influence")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def choose_blocks(sim: dict, n: int, select: str = "span") -> list[int]:
    """Indices of the n blocks to remove, from `analyze.block_similarity`'s result."""
    L = len(sim["influence"])
    if select not in SELECT:
        raise LayerzipError(f"--select must be one of {', '.join(SELECT)}, got {select!r}")
    if not 1 <= n < L:
        raise LayerzipError(f"--blocks must be between 1 and {L - 1} (the model has {L} blocks), got {n}")
    if select == "influence":
        return sorted(sorted(range(L), key=lambda i: sim["influence"][i])[:n])
    ang = sim["angular"]
    start = min(range(L - n + 1), key=lambda l: ang[l][l + n])
    return list(range(start, start + n))


def drop_blocks_(model: nn.Module, drop: list[int]) -> dict:
    """Remove blocks `drop` (indices into the repeated blocks) in place; fix config and layer indices."""
    found = find_blocks(model)
    if found is None:
        raise LayerzipError("the model has no repeated blocks to drop")
    name, blocks = found
    L = len(blocks)
    drop = sorted(set(drop))
    if not drop or drop[0] < 0 or drop[-1] >= L or len(drop) >= L:
        raise LayerzipError(f"cannot drop blocks {drop} of {L}; give 1 to {L - 1} indices in 0..{L - 1}")
    config = model.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise LayerzipError("this GPT-2 config scales attention by the block index "
                            "(scale_attn_by_inverse_layer_idx); dropping blocks would change the kept blocks")
    keep = [i for i in range(L) if i not in drop]
    set_module(model, name, nn.ModuleList([blocks[i] for i in keep]))
    for new, block in enumerate(model.get_submodule(name)):
        for mod in block.modules():                  # KV-cache keys and per-layer lookups follow the new order
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new
    raw = config.to_dict()
    counted = False
    for key in LAYER_COUNT_KEYS:
        if raw.get(key) == L:
            setattr(config, key, len(keep))
            counted = True
    if not counted and getattr(config, "num_hidden_layers", None) == L:
        config.num_hidden_layers = len(keep)       # via the config's attribute_map (e.g. GPT-2's n_layer)
        counted = True
    if not counted:
        raise LayerzipError(f"cannot find the layer count ({L}) in the {type(config).__name__} config; "
                            "this architecture is not supported by drop-blocks")
    for key, value in raw.items():                   # per-layer lists, e.g. Gemma 3 / Qwen2 `layer_types`
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == L:
            setattr(config, key, [value[i] for i in keep])
    return {"blocks_name": name, "dropped_blocks": drop, "kept_blocks": keep, "num_blocks_before": L,
            "num_blocks_after": len(keep)}


@register_method("drop-blocks")
@dataclass
class DropBlocks(CompressConfig):
    """Remove `blocks` whole blocks (default: as many as `keep` allows), chosen by `select` (span | influence).

    `then`: a low-rank method applied afterwards to the remaining blocks; `keep` then covers both steps, and
    `blocks` defaults to half of the removed fraction."""
    blocks: int | None = option(None, "drop-blocks: number of whole blocks to remove (default: from --keep)")
    select: str = option("span", "drop-blocks: span (smallest angular distance) or influence (lowest Block "
                                 "Influence)")
    then: str | None = option(None, "drop-blocks: low-rank method for the remaining blocks (or --method "
                                    "drop-blocks+METHOD)")
    alloc: str | None = option(None, "rank allocation: uniform | global (default: the method's best)")
    uses_stats: ClassVar[bool] = True
    stream_ok: ClassVar[bool] = False       # block similarity runs the whole model

    def __post_init__(self):
        super().__post_init__()
        if self.select not in SELECT:
            raise LayerzipError(f"--select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if self.blocks is not None and (not isinstance(self.blocks, int) or self.blocks < 1):
            raise LayerzipError(f"--blocks must be a whole number ≥ 1, got {self.blocks}")
        self.then = self.then or None
        if self.then == "drop-blocks":
            raise LayerzipError("drop-blocks+drop-blocks is not a plan; use --method drop-blocks+svd-llm "
                                "(or another low-rank method)")
        if self.then:
            config_from_dict({"method": self.then, "keep": 0.5})      # validates the name

    @property
    def label(self):
        return self.name + (f"+{self.then}" if self.then else "")

    def n_blocks(self, L: int) -> int:
        if self.blocks is not None:
            return self.blocks
        cut = (1 - self.keep) * L * (0.5 if self.then else 1.0)
        n = math.floor(cut + 0.5)
        if n < 1:
            raise LayerzipError(f"--keep {self.keep} removes less than one of the {L} blocks; lower --keep "
                                "or pass --blocks N")
        return n

    def restructure_(self, model: nn.Module, calib: list[dict] | None, progress: bool = True) -> dict:
        """Choose the blocks from the residual-stream similarity and remove them."""
        found = find_blocks(model)
        if found is None:
            raise LayerzipError("the model has no repeated blocks to drop")
        L = len(found[1])
        n = self.n_blocks(L)
        if n >= L:
            raise LayerzipError(f"--blocks {n} would remove every block (the model has {L}); give at most {L - 1}")
        sim = block_similarity(model, calib, progress)
        drop = choose_blocks(sim, n, self.select)
        return {**drop_blocks_(model, drop), "select": self.select, "block_influence": sim["influence"],
                "dropped_angular_distance": sim["angular"][drop[0]][drop[-1] + 1] if self.select == "span" else None}

    def module_config(self, left_params: int, target_params: int) -> CompressConfig | None:
        """`then` at the keep that leaves `keep` of the original targets once the blocks are gone."""
        if not self.then:
            return None
        k2 = self.keep * target_params / left_params
        if k2 >= 1:
            raise LayerzipError(f"dropping blocks already keeps {left_params / target_params:.3f} ≤ --keep "
                                f"{self.keep}; use --method drop-blocks alone or drop fewer blocks")
        mine = {"blocks", "select", "then"}
        return config_from_dict({**{k: v for k, v in self.to_dict().items() if k not in mine and v is not None},
                                 "method": self.then, "keep": k2})
