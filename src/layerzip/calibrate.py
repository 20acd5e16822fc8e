"""Calibration: text in, per-module activation statistics out.

    documents (builtin | .txt | .jsonl) -> token batches -> forward with hooks -> {module name: ModuleStats}

Statistics are streamed: each hook adds its batch to a float64 Gram XᵀX and a per-feature sum of |x|. Modules that
read the very same input tensor (q/k/v, gate/up) share one ModuleStats, so each Gram is built once.
"""
from __future__ import annotations

import ast
import functools
import json
import random
import sysconfig
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LayerzipError

MIN_DOC_CHARS = 80


# ----------------------------------------------------------------------------------------------------------- text
def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc:
            text = " ".join(doc.split())   # one document per line: collapse whitespace
            if len(text) >= MIN_DOC_CHARS:
                out.append(text)
    return out


def builtin_documents(split: str = "calib", limit: int | None = None) -> list[str]:
    """Docstrings of the Python standard library, read with `ast` (nothing imported, nothing downloaded).

    Files are split by a fixed hash of their name: ~80% "calib", ~20% "heldout"; a "heldout" docstring whose text
    also occurs in a "calib" file (copied modules) is left out, so evaluation never sees calibration text. Files are
    visited in a fixed shuffled order, so a small `limit` still spans the library.
    """
    assert split in ("calib", "heldout")
    seen = _calib_texts() if split == "heldout" else frozenset()
    docs: list[str] = []
    for p in _split_files(split):
        docs.extend(d for d in _docstrings(p) if d not in seen)
        if limit is not None and len(docs) >= limit:
            return docs[:limit]
    return docs


def _split_files(split: str) -> list[Path]:
    files = [p for p in _stdlib_files() if (zlib.crc32(p.name.encode()) % 5 == 0) == (split == "heldout")]
    random.Random(0).shuffle(files)
    return files


@functools.lru_cache(maxsize=1)
def _calib_texts() -> frozenset[str]:
    return frozenset(d for p in _split_files("calib") for d in _docstrings(p))


def builtin_pairs(limit: int | None = None) -> list[dict]:
    """A retrieval task from held-out standard-library docstrings: the summary sentence is the query, the rest of
    the docstring its document ({"query", "doc"}); docstrings whose rest is shorter than 80 characters are skipped."""
    pairs = []
    for doc in builtin_documents("heldout"):
        head, sep, rest = doc.partition(". ")
        if sep and 20 <= len(head) <= 200 and len(rest) >= MIN_DOC_CHARS:
            pairs.append({"query": head + ".", "doc": rest})
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


def load_documents(source: str | Path, limit: int | None = None) -> list[str]:
    """`builtin`, `builtin-heldout`, a .txt file (one document per non-empty line) or a .jsonl file (field "text")."""
    if str(source) in ("builtin", "builtin-heldout"):
        return builtin_documents("heldout" if str(source).endswith("heldout") else "calib", limit)
    path = Path(source)
    if not path.is_file():
        raise LayerzipError(f"text file {path} not found; pass an existing .txt/.jsonl file or 'builtin'")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LayerzipError(f"{path} is not UTF-8 text; pass a .txt (one document per line) or .jsonl file") from None
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise LayerzipError(f"{path}:{i} is not a JSON object with a 'text' field; fix that line") from None
    else:
        docs = raw.splitlines()
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise LayerzipError(f"{path} holds no text; give at least one non-empty document")
    return docs[:limit] if limit else docs


# -------------------------------------------------------------------------------------------------------- batches
def token_batches(tokenizer, docs: list[str], causal: bool, n_samples: int = 64, seq_len: int = 512,
                  batch_size: int = 8, min_tokens: int = 16) -> list[dict]:
    """Causal LMs: documents packed into windows of `seq_len` tokens, each starting with BOS where the tokenizer has
    one (some models, e.g. Gemma, degrade badly without it). Encoders: one document per sequence, truncated."""
    if causal:
        bos = tokenizer.bos_token_id
        sep = tokenizer.eos_token_id
        body = seq_len - (bos is not None)
        ids: list[int] = []
        for d in docs:
            ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
            if sep is not None:
                ids.append(sep)
            if len(ids) >= body * n_samples:
                break
        n_win = min(n_samples, len(ids) // body)
        if n_win == 0:
            raise LayerzipError(f"calibration text too short: {len(ids)} tokens, one window needs {body}; "
                                "give more text or a smaller --seq-len")
        wins = [([bos] if bos is not None else []) + ids[i * body:(i + 1) * body] for i in range(n_win)]
        t = torch.tensor(wins)
        return [{"input_ids": t[i:i + batch_size], "attention_mask": torch.ones_like(t[i:i + batch_size])}
                for i in range(0, n_win, batch_size)]
    docs = docs[:n_samples]
    enc = [tokenizer(d, truncation=True, max_length=seq_len) for d in docs]
    if sum(len(e["input_ids"]) for e in enc) < min_tokens:
        raise LayerzipError(f"calibration text too short (< {min_tokens} tokens); give more text")
    batches = []
    for i in range(0, len(docs), batch_size):
        batches.append(dict(tokenizer.pad(enc[i:i + batch_size], return_tensors="pt")))
    return batches


# ---------------------------------------------------------------------------------------------------- statistics
@dataclass
class ModuleStats:
    """Streaming statistics of one module input: Gram XᵀX (float64), Σ|x| per feature, token count."""
    n: int
    gram: torch.Tensor = field(init=False)
    abs_sum: torch.Tensor = field(init=False)
    tokens: int = 0

    def __post_init__(self):
        self.gram = torch.zeros(self.n, self.n, dtype=torch.float64)
        self.abs_sum = torch.zeros(self.n, dtype=torch.float64)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.n).to(torch.float64)
        self.gram.addmm_(x.T, x)
        self.abs_sum += x.abs().sum(0)
        self.tokens += x.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @cached_property
    def whitening(self):
        """Square-root factor of the Gram, computed once and shared by every module that reads this input."""
        from .methods.svdllm import whiten
        return whiten(self.gram)


class StatsCollector:
    """Forward pre-hooks on the target modules. Use as a context manager around forward passes."""

    def __init__(self, targets: dict[str, nn.Module], in_features: dict[str, int]):
        self.targets, self.in_features = targets, in_features
        self.stats: dict[str, ModuleStats] = {}
        self.token_mask: torch.Tensor | None = None   # (batch, seq) bool: rows to count (padding excluded)
        self._last: tuple[torch.Tensor, ModuleStats] | None = None
        self._handles = []

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            if self._last is not None and self._last[0] is x:      # same tensor as the previous target: share
                self.stats.setdefault(name, self._last[1])
                return
            st = self.stats.get(name)
            if st is None:
                st = self.stats[name] = ModuleStats(self.in_features[name])
            if self.token_mask is not None and x.dim() == 3 and x.shape[:2] == self.token_mask.shape:
                st.add(x[self.token_mask])
            else:
                st.add(x)
            self._last = (x, st)   # holding x also keeps its id from being reused within this pass
        return hook

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.targets.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._last = None


def backbone(model: nn.Module) -> nn.Module:
    """The model without its LM head: calibration needs the blocks' inputs, not 100k-wide logits."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


@torch.no_grad()
def collect_stats(model: nn.Module, targets: dict[str, nn.Module], in_features: dict[str, int],
                  batches: list[dict], progress: bool = True) -> dict[str, ModuleStats]:
    """One forward pass over `batches`, streaming statistics of every target's input."""
    device = next(model.parameters()).device
    net = backbone(model)
    with StatsCollector(targets, in_features) as col:
        for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            col.token_mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
            net(**batch)
            col._last = None
    missing = [n for n in targets if n not in col.stats]
    if missing:
        raise LayerzipError(f"calibration never reached {missing[0]} (and {len(missing) - 1} more); "
                            "exclude it with --exclude or check the model's forward")
    return col.stats
