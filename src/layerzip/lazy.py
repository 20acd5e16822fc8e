"""Lazy weights: a model whose parameters stay in safetensors files until a module needs them.

    skeleton: the architecture with its parameters on the meta device (buffers real), built by io.load_model(...,
              stream=True); `LazyWeights(model, files)` knows which file holds every tensor
    hold(block):    read the block's tensors (memory-mapped, one tensor at a time), use them, put them back on meta
    hold_rest():    the same for everything outside the blocks (embeddings, final norm, head): read only while the
                    embeddings or the loss run, so a walk over the blocks holds one block and no vocabulary matrix
    offload(block): write the block's current tensors (its factorized modules after compression) to a shard of the
                    work directory; from then on the block is read from there

Compute and storage dtypes: a half-precision checkpoint (bf16, fp16) streamed on the CPU computes in float32 — CPU
matmuls in bf16 are several times slower than in float32 without native support (6× on an AVX2 machine), and the
statistics are more accurate — and is written back in its own dtype (`storage_dtype`): a block costs 4 bytes a
parameter while it is held, the files stay as small as the source's.

Tied parameters (an LM head sharing the input embedding) are one Parameter under several names: they are read
once, set under every name, and released only with every module that uses them. The source of a streamed model is
registered beside it (`source_of(model)`), so every layer that walks the blocks (driver, evaluate, io.save) finds
it without a new argument; `source_of(model)` is None for an ordinary in-memory model.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn

from .errors import LayerzipError

_SPLIT = re.compile(r"^(.+)\.(gate_up|down)\.(\d+)\.weight$")     # an expert's weight of nn.SplitExperts
_SOURCES: "weakref.WeakKeyDictionary[nn.Module, LazyWeights]" = weakref.WeakKeyDictionary()


def _libc():
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:                     # not glibc: nothing to tune
        return None


_LIBC = _libc()


def tune_malloc() -> None:
    """Large CPU tensors (≥ 4 MiB) in their own mmap, returned to the system when freed: glibc's default raises
    that threshold after each free, and a block's freed Grams and activations would then stay resident."""
    if _LIBC is not None:
        _LIBC.mallopt(-3, 4 * 2 ** 20)          # M_MMAP_THRESHOLD


def trim_memory() -> None:
    """Give freed heap memory back to the system (after each block)."""
    import gc
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def source_of(model: nn.Module) -> "LazyWeights | None":
    """The LazyWeights of a streamed model, None for an in-memory one."""
    return _SOURCES.get(model)


def is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def _get(model: nn.Module, name: str):
    owner, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(owner) if owner else model
    except AttributeError:
        return None
    return mod._parameters.get(attr)


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` as parameter or buffer `name` of `model` (replacing the tensor object, not copying into it)."""
    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if attr in mod._parameters:
        mod._parameters[attr] = value
    else:
        mod._buffers[attr] = value


class LazyWeights:
    """Where each tensor of `model` lives: `files` maps checkpoint keys to safetensors files. Model names that
    differ from the checkpoint's by the base-model prefix (``bert.`` ...) are matched either way."""

    def __init__(self, model: nn.Module, files: dict[str, Path], device: str | torch.device = "cpu"):
        self.model, self.device = model, torch.device(device)
        self.where = {k: Path(f) for k, f in files.items()}
        self.aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.aliases.setdefault(id(p), []).append(name)
        self.persistent = {n for n, _ in model.state_dict(keep_vars=True).items()}
        missing = [names[0] for names in self.aliases.values() if all(self._key(n) is None for n in names)]
        if missing:
            raise LayerzipError(f"the checkpoint has no tensor for {missing[0]} (and {len(missing) - 1} more); "
                                "the model's files are incomplete or belong to another architecture")
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        self.storage_dtype = floats[0] if floats else torch.float32
        if self.device.type == "cpu" and self.storage_dtype in (torch.bfloat16, torch.float16):
            self._compute_in(torch.float32)
        self._workdir: Path | None = None
        self.blocks: nn.Module | None = None        # the repeated blocks (set by the loader): not part of the rest
        self._rest_held = 0
        _SOURCES[model] = self
        tune_malloc()

    def _compute_in(self, dtype: torch.dtype) -> None:
        """Floating parameters (still on meta) and buffers of the skeleton in `dtype`, tied names kept tied."""
        for names in list(self.aliases.values()):
            p = _get(self.model, names[0])
            if p.is_floating_point():
                new = nn.Parameter(torch.empty_like(p, device="meta", dtype=dtype), requires_grad=p.requires_grad)
                for alias in names:
                    set_tensor(self.model, alias, new)
                self.aliases[id(new)] = self.aliases.pop(id(p))
        for name, b in list(self.model.named_buffers()):
            if b.is_floating_point():
                set_tensor(self.model, name, b.to(dtype))

    def stored(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as it is written: floating tensors in the source's dtype, on the CPU."""
        return t.detach().to("cpu", self.storage_dtype if t.is_floating_point() else t.dtype).contiguous()

    @property
    def workdir(self) -> Path:
        """Where offloaded blocks go: set by the caller (a resumable run's directory), else a temporary directory
        that lives as long as this source."""
        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="layerzip-blocks-")
            self._workdir = Path(self._tmp.name)
        return self._workdir

    @workdir.setter
    def workdir(self, path: Path) -> None:
        self._workdir = Path(path)

    def _key(self, name: str) -> str | None:
        """The checkpoint's name of tensor `name`. One expert's weight of split experts (nn/experts.py) is read from
        a fused checkpoint as `<fused>#<e>` (expert e's slice of the 3-D tensor), from one with a module per expert
        (how transformers saves them: `experts.<e>.gate_proj` ...) as `<gate>+<up>` (concatenated) or `<down>`."""
        if name in self.where:
            return name
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        for k in (f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if prefix and k in self.where:
                return k
        split = _SPLIT.match(name)
        if split is None:
            return None
        experts, proj, e = split.groups()
        fused = self._key(f"{experts}.{proj}_proj")
        if fused is not None:
            return f"{fused}#{e}"
        parts = [self._key(f"{experts}.{e}.{p}_proj.weight") for p in (("gate", "up") if proj == "gate_up" else
                                                                          ("down",))]
        return None if None in parts else "+".join(parts)

    def _names(self, p: torch.Tensor, name: str) -> list[str]:
        """Every name of parameter `p` (found as `name`); ids of freed tensors are reused, so checked."""
        names = self.aliases.get(id(p))
        if names and all(_get(self.model, a) is p for a in names):
            return names
        self.aliases[id(p)] = [name]
        return [name]

    # ----------------------------------------------------------------------------------------------- reading
    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        by_file: dict[Path, list[str]] = {}
        keys = {n: k.split("+") for n in names if (k := self._key(n)) is not None}   # parts: see _key
        for n, parts in keys.items():
            for part in parts:
                by_file.setdefault(self.where[part.partition("#")[0]], []).append(part)
        got = {}
        for f, parts in by_file.items():
            with safe_open(str(f), framework="pt", device="cpu") as h:
                for part in parts:
                    k, _, expert = part.partition("#")
                    got[part] = h.get_slice(k)[int(expert)] if expert else h.get_tensor(k)
        return {n: torch.cat([got[p] for p in parts]) if len(parts) > 1 else got[parts[0]]
                for n, parts in keys.items()}

    def _outside(self, module: nn.Module | None = None) -> list[tuple[nn.Module, bool]]:
        """(module, recurse) pairs that cover every parameter outside the blocks."""
        module = self.model if module is None else module
        if module is self.blocks:
            return []
        if self.blocks is None or not any(m is self.blocks for m in module.modules()):
            return [(module, True)]
        return [pair for child in module.children() for pair in self._outside(child)] + [(module, False)]

    def _members(self, module: nn.Module, recurse: bool = True) -> tuple[str, list[tuple[str, torch.Tensor]]]:
        prefix = next((n for n, m in self.model.named_modules() if m is module), None)
        if prefix is None:
            raise LayerzipError("internal: the module is not part of the streamed model")
        pre = prefix + "." if prefix else ""
        return pre, [(pre + n, t) for n, t in module.named_parameters(recurse=recurse, remove_duplicate=False)]

    @torch.no_grad()
    def load(self, module: nn.Module, recurse: bool = True) -> None:
        """Read every meta parameter of `module` (and its checkpointed buffers) onto the device; `recurse=False`:
        only its own, not its children's."""
        pre, params = self._members(module, recurse)
        todo = [(n, p) for n, p in params if p.is_meta]
        bufs = [pre + n for n, b in module.named_buffers(recurse=recurse) if pre + n in self.persistent]
        want = {n: next((a for a in self._names(p, n) if self._key(a) is not None), n) for n, p in todo}
        got = self._read(list(set(want.values())) + bufs)
        done: set[int] = set()
        for n, p in todo:
            if id(p) in done:
                continue
            t = got[want[n]]
            if tuple(t.shape) != tuple(p.shape):
                raise LayerzipError(f"the checkpoint's {want[n]} has shape {tuple(t.shape)}, the model expects "
                                    f"{tuple(p.shape)}; the files belong to another configuration")
            new = nn.Parameter(t.to(device=self.device, dtype=p.dtype), requires_grad=p.requires_grad)
            for alias in self.aliases[id(p)]:
                set_tensor(self.model, alias, new)
            self.aliases[id(new)] = self.aliases.pop(id(p))
            done.add(id(p))
        for n in bufs:
            if n in got:
                b = self.model.get_buffer(n)
                set_tensor(self.model, n, got[n].to(device=self.device, dtype=b.dtype))

    @torch.no_grad()
    def release(self, module: nn.Module, recurse: bool = True) -> None:
        """Put `module`'s parameters back on the meta device (those shared with a module outside it stay)."""
        self._release(self._members(module, recurse)[1])

    def _release(self, params: list[tuple[str, torch.Tensor]]) -> None:
        inside = {n for n, _ in params}
        done: set[int] = set()                  # a tied parameter appears under each of its names
        for n, p in params:
            if p.is_meta or id(p) in done:
                continue
            done.add(id(p))
            names = self._names(p, n)
            if not set(names) <= inside:
                continue
            new = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for alias in names:
                set_tensor(self.model, alias, new)
            self.aliases[id(new)] = self.aliases.pop(id(p))

    @contextlib.contextmanager
    def hold(self, module: nn.Module):
        """`module`'s weights in memory for the duration of the block."""
        self.load(module)
        try:
            yield module
        finally:
            self.release(module)
            trim_memory()

    @contextlib.contextmanager
    def hold_rest(self, without: tuple[nn.Module, ...] = ()):
        """Everything outside the blocks, except the modules `without`, in memory for the duration (reentrant: an
        inner hold is free). Tied parameters (an embedding shared with the head) are released together."""
        self._rest_held += 1
        try:
            if self._rest_held == 1:
                for module, recurse in self._outside():
                    if not any(module is w for w in without):
                        self.load(module, recurse)
            yield
        finally:
            self._rest_held -= 1
            if self._rest_held == 0:
                self._release([p for module, recurse in self._outside() for p in self._members(module, recurse)[1]])
                trim_memory()

    # ----------------------------------------------------------------------------------------------- writing
    def tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """{full name: tensor} of a loaded `module` as it is saved (`stored`): parameters once (first name of a tied
        group) and persistent buffers."""
        pre, params = self._members(module)
        out, seen = {}, set()
        for n, p in params:
            if id(p) not in seen:
                seen.add(id(p))
                first = self._names(p, n)[0]
                out[first if first.startswith(pre) else n] = self.stored(p)
        for n, b in module.named_buffers():
            if pre + n in self.persistent or pre + n in self.where:
                out[pre + n] = self.stored(b)
        return out

    def rest_tensors(self) -> dict[str, torch.Tensor]:
        """{name: tensor} of everything outside the blocks as it is saved (`stored`; a tied parameter once),
        read straight from the files: a streamed compression never changes what lies outside the blocks."""
        names, seen = [], set()
        for module, recurse in self._outside():
            pre, params = self._members(module, recurse)
            for n, p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    names.append(next((a for a in self._names(p, n) if self._key(a) is not None), n))
            names += [pre + b for b, _ in module.named_buffers(recurse=recurse) if pre + b in self.persistent]
        return {n: self.stored(t) for n, t in self._read(names).items()}

    def offload(self, module: nn.Module, path: Path) -> None:
        """Write the loaded `module`'s tensors to `path` (atomically); later loads of it read from there."""
        from safetensors.torch import save_file
        pre, _ = self._members(module)
        tensors = self.tensors(module)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        self.adopt(pre, list(tensors), path)
        # structure changed (factorized modules): the persistent names of the new modules
        self.persistent |= {n for n in tensors}

    def adopt(self, prefix: str, names: list[str], path: Path) -> None:
        """Names under `prefix` are now read from `path` (a shard written by `offload`, also on resume)."""
        for k in [k for k in self.where if k.startswith(prefix)]:
            del self.where[k]
        for n in names:
            self.where[n] = Path(path)
