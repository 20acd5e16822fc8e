"""In-memory model surgery: which modules are targets, how to swap one, and how to run one block on its own.

Nothing here touches the disk (loading and saving are io.py's).

- `find_blocks`: the model's repeated blocks, the ModuleList of ≥ 2 same-class modules holding the most parameters.
- `select_modules` / `select_targets`: one selector (regex, list of regexes, or callable) for every caller.
- block I/O: the hidden state a block reads (`block_hidden` / `with_hidden`), what it returns (`block_output`),
  the input one of its modules sees (`capture_input`, stopping the block right there).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn

from .errors import LayerzipError
from .nn import is_conv1d, is_linear_like

Selector = Union[None, str, list, tuple, Callable[[str, nn.Module], bool]]


@dataclass
class Loaded:
    """A model with what came with it (io.load_model returns one)."""
    model: nn.Module
    tokenizer: object
    causal: bool
    source: str          # what the user named
    path: Path | None    # directory (or .gguf file) it came from
    elastic: dict | None = None   # an elastic directory: the size loaded (keep, keep_achieved, ranks; elastic.py)


def is_causal(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM") or hasattr(model, "lm_head") and hasattr(model, "generate") \
        and not getattr(model.config, "is_encoder_decoder", False)


def backbone(model: nn.Module) -> nn.Module:
    """The model without its LM head: calibration needs the blocks' inputs, not 100k-wide logits."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


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
    if is_conv1d(module):                                               # Conv1D: weight (in, out)
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def _matcher(sel: Selector, what: str) -> Callable[[str, nn.Module], bool] | None:
    """A (name, module) -> bool test from a regex, a list of regexes (any matches) or a callable."""
    if sel is None or callable(sel):
        return sel
    try:
        pats = [re.compile(p) for p in ([sel] if isinstance(sel, str) else sel)]
    except re.error as e:
        raise LayerzipError(f"bad --{what} regular expression ({e}); fix the pattern") from None
    return lambda name, mod: any(p.search(name) for p in pats)


def select_modules(model: nn.Module, include: Selector = None, exclude: Selector = None,
                   kind: Callable[[nn.Module], bool] = is_linear_like) -> dict[str, nn.Module]:
    """Modules of `model` for which kind(module) is true, whose qualified name matches `include` and not `exclude`.
    include / exclude: None, a regex string (re.search on the qualified name), a list of regex strings (any), or a
    callable (name, module) -> bool.

    >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> list(select_modules(m)), list(select_modules(m, exclude=r"^2$")), list(select_modules(m, lambda n, _: n > "1"))
    (['0', '2'], ['0'], ['2'])
    """
    inc, exc = _matcher(include, "include"), _matcher(exclude, "exclude")
    return {n: m for n, m in model.named_modules()
            if kind(m) and (inc is None or inc(n, m)) and not (exc is not None and exc(n, m))}


PRESETS = ("blocks", "embeddings", "lm_head")


def include_presets(include: Selector) -> list[str] | None:
    """The presets a comma list such as "blocks,embeddings" names; None when `include` is a regex (anything else
    than bare words, or one word that is not a preset). A list of bare words naming an unknown preset is refused."""
    if not isinstance(include, str):
        return None
    parts = [p.strip() for p in include.split(",")]
    if not all(re.fullmatch(r"[A-Za-z_]+", p) for p in parts) or (len(parts) == 1 and parts[0] not in PRESETS):
        return None
    unknown = [p for p in parts if p not in PRESETS]
    if unknown:
        raise LayerzipError(f"unknown --include preset {unknown[0]!r}; name presets from {', '.join(PRESETS)} "
                            "(comma-separated) or give a regular expression")
    return parts


def _preset_targets(model: nn.Module, presets: list[str]) -> dict[str, nn.Module]:
    """blocks: the Linears of the repeated blocks; embeddings: the input embedding; lm_head: the output embedding,
    or, tied to the input embedding, that embedding (one factorization serves both)."""
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, nn.Module] = {}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if "blocks" in presets:
        out.update(select_targets(model))
    if "embeddings" in presets:
        if not isinstance(emb, nn.Embedding):
            raise LayerzipError(f"--include embeddings: {type(model).__name__} has no nn.Embedding input embedding; "
                                "drop that preset")
        out[names[id(emb)]] = emb
    if "lm_head" in presets:
        if head is None or not is_linear_like(head):
            raise LayerzipError(f"--include lm_head: {type(model).__name__} has no linear LM head; drop that preset")
        if isinstance(emb, nn.Embedding) and tied_head(model) is head:
            out[names[id(emb)]] = emb
        else:
            out[names[id(head)]] = head
    return out


def tied_head(model: nn.Module) -> nn.Module | None:
    """The LM head when it shares its weight with the input embedding (tie_word_embeddings), else None."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(head, "weight", None)
    return head if w is not None and w is getattr(emb, "weight", None) else None


def select_targets(model: nn.Module, include: Selector = None, exclude: Selector = None) -> dict[str, nn.Module]:
    """Default: every Linear / Conv1D inside the repeated blocks. `include` selects among all linear layers of the
    model instead, so it can name a head; or it names presets (`PRESETS`, a comma list: "blocks,embeddings,lm_head"),
    which can select the input embedding (an nn.Embedding: compress.py decomposes it apart); `exclude` removes
    matches."""
    presets = include_presets(include)
    if presets is not None:
        exc = _matcher(exclude, "exclude")
        out = {n: m for n, m in _preset_targets(model, presets).items() if not (exc is not None and exc(n, m))}
        if not out:
            raise LayerzipError(f"no target modules left of --include {include!r} after --exclude; change them")
        return out
    if include is None:
        blocks = find_blocks(model)
        prefix = blocks[0] + "." if blocks else None
        chosen = lambda name, mod: prefix is not None and name.startswith(prefix)   # noqa: E731
    else:
        chosen = _matcher(include, "include")
    out = select_modules(model, chosen, exclude)
    head = tied_head(model)
    for name, mod in list(out.items()):
        if mod is head:           # a tied head is factorized with its embedding, as one pair
            del out[name]
            emb = model.get_input_embeddings()
            out[next(n for n, m in model.named_modules() if m is emb)] = emb
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


def call_model(model: nn.Module, item, device=None):
    """`model` on one calibration item: a tensor (model(x)), a dict (model(**d)) or a tuple (model(*t)), its tensors
    moved to `device` (default: the model's)."""
    device = device or next(model.parameters()).device
    if isinstance(item, dict):
        return model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in item.items()})
    if isinstance(item, (tuple, list)):
        return model(*[v.to(device) if torch.is_tensor(v) else v for v in item])
    if torch.is_tensor(item):
        return model(item.to(device))
    raise LayerzipError(f"calibration items must be tensors, tuples or dicts of tensors, got {type(item).__name__}")


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def module_params(modules) -> int:
    """Parameters of several modules (an iterable of modules), each shared parameter (a tied head, a shared basis)
    once."""
    return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())


def check_finite(targets: dict[str, nn.Module]) -> None:
    for name, mod in targets.items():
        for pname, p in mod.named_parameters():
            if not p.is_meta and not torch.isfinite(p).all():   # a streamed block is checked when it is read
                raise LayerzipError(f"{name}.{pname} holds NaN or Inf values; repair the checkpoint or leave the "
                                    f"module out with --exclude '{re.escape(name)}'")


# ------------------------------------------------------------------------------------------------------ block I/O
def block_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a block call reads (first positional argument, or `hidden_states=`)."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, h) -> tuple[tuple, dict]:
    """The same call with hidden state `h`."""
    return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})


def block_output(out) -> torch.Tensor:
    """The hidden state a block returns, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Token rows of x (…, features), padding excluded where `mask` (batch, seq) matches x's leading dims."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        return x[mask]
    return x.reshape(-1, x.shape[-1])


class _Stop(Exception):
    """Raised by a hook once the wanted input has been captured: the rest of the block need not run."""


def capture_input(block: nn.Module, module: nn.Module, args, kwargs) -> torch.Tensor:
    """The input of `module` when `block` runs on (args, kwargs); the block stops right there."""
    box = []

    def hook(mod, a):
        box.append(a[0])
        raise _Stop

    h = module.register_forward_pre_hook(hook)
    try:
        block(*args, **kwargs)
    except _Stop:
        pass
    finally:
        h.remove()
    if not box:
        raise LayerzipError("a target was not reached inside its block; leave it out with --exclude")
    return box[0]


def capture_inputs(block: nn.Module, modules: list[nn.Module], args, kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The inputs of several modules in one full run of `block`, and the block's output hidden state."""
    box: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, i=i: box.setdefault(i, a[0])) for i, m in enumerate(modules)]
    try:
        out = block_output(block(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return [box[i] for i in range(len(modules))], out


def run_block(block: nn.Module, call: tuple, h: torch.Tensor) -> torch.Tensor:
    """Block output when `block` runs its recorded call (args, kwargs) on hidden state `h`."""
    args, kwargs = with_hidden(*call, h)
    return block_output(block(*args, **kwargs))


def input_groups(block: nn.Module, names: dict[str, str], call) -> list[list[str]]:
    """Targets of one block ({local name: full name}) grouped by the input tensor they read, in execution order
    (q/k/v share one)."""
    seen: list[tuple[torch.Tensor, list[str]]] = []
    handles = []
    for local, full in names.items():
        def hook(module, args, full=full):
            x = args[0]
            if seen and seen[-1][0] is x:
                seen[-1][1].append(full)
            else:
                seen.append((x, [full]))
        handles.append(block.get_submodule(local).register_forward_pre_hook(hook))
    try:
        block(*call[0], **call[1])
    finally:
        for h in handles:
            h.remove()
    return [g for _, g in seen]


class BlockOutputs:
    """Forward hooks that keep the last output hidden state of every block ({index: tensor})."""

    def __init__(self, model: nn.Module):
        found = find_blocks(model)
        if found is None:
            raise LayerzipError("the model has no repeated blocks (a ModuleList of ≥ 2 same-class layers)")
        self.outs: dict[int, torch.Tensor] = {}
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(found[1])]

    def _hook(self, i):
        def hook(module, args, out):
            self.outs[i] = block_output(out)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
