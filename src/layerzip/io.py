"""Save / load compressed models: a Hugging Face style directory, never a pickle.

    DIR/config.json          the original architecture's config (transformers)
    DIR/model.safetensors    every tensor, factorized modules under their own names (A, B, ...)
    DIR/layerzip.json        format version, method, keep, per-module spec {type, shapes, rank}, calibration, source
    DIR/tokenizer*           so AutoTokenizer.from_pretrained(DIR) works

Written into a temporary sibling directory and renamed into place at the end, so an interrupted save never leaves
a directory that looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .errors import LayerzipError
from .nn import FactorizedLayer, layer_from_spec

FORMAT_VERSION = 1
META = "layerzip.json"
WEIGHTS = "model.safetensors"


def factorized_specs(model: nn.Module) -> dict[str, dict]:
    return {n: m.spec() for n, m in model.named_modules() if isinstance(m, FactorizedLayer)}


def check_out_dir(out: str | Path, force: bool, source: Path | None = None) -> Path:
    out = Path(out)
    if source is not None and out.resolve() == Path(source).resolve():
        raise LayerzipError(f"--out {out} is the input model; choose another directory")
    if out.exists() and not out.is_dir():
        raise LayerzipError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LayerzipError(f"--out {out} is not empty; choose another directory or pass --force to replace it")
    return out


def save(model: nn.Module, out: str | Path, tokenizer=None, meta: dict | None = None) -> Path:
    """Write `model` (factorized or not) to `out` atomically; replaces an existing `out`.

    >>> import layerzip as lz
    >>> lz.save(model, "my-model-lz", tokenizer=tok)   # doctest: +SKIP
    """
    from safetensors.torch import save_model

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        dtype = next(model.parameters()).dtype
        doc = {"format_version": FORMAT_VERSION, "layerzip_version": __version__,
               "architecture": type(model).__name__, "dtype": str(dtype).removeprefix("torch."),
               **(meta or {}), "modules": factorized_specs(model)}
        (tmp / META).write_text(json.dumps(doc, indent=1))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LayerzipError(f"{path / META} is unreadable ({e}); re-run layerzip compress") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LayerzipError(f"{path} was written by a newer layerzip (format {version}, this one reads up to "
                            f"{FORMAT_VERSION}); upgrade layerzip: pip install -U layerzip")
    return meta


def build_skeleton(path: Path, meta: dict) -> nn.Module:
    """The architecture from config.json (random init, nothing fetched), factorized modules put in place."""
    import transformers
    from .models import model_class, set_module

    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, meta.get("architecture", ""), None) or model_class(config)
    dtype = getattr(torch, meta.get("dtype", "float32"))
    if hasattr(cls, "_from_config"):
        model = cls._from_config(config, dtype=dtype)
    else:
        model = cls.from_config(config, dtype=dtype)
    for name, spec in meta.get("modules", {}).items():
        set_module(model, name, layer_from_spec(spec, dtype=dtype))
    return model


def load_compressed(path: str | Path):
    """(model, tokenizer) from a directory written by `save`."""
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    meta = read_meta(path)
    if not (path / WEIGHTS).is_file():
        raise LayerzipError(f"{path / WEIGHTS} is missing; re-run layerzip compress")
    model = build_skeleton(path, meta)
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayerzipError(f"{path / WEIGHTS} is corrupt or does not match layerzip.json ({first}); "
                            "re-run layerzip compress") from None
    if missing or unexpected:
        raise LayerzipError(f"{path / WEIGHTS} does not match layerzip.json ({len(missing)} missing, "
                            f"{len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[0]}); "
                            "re-run layerzip compress")
    tok = None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        pass
    return model.eval(), tok
