"""Text in, token batches out — for calibration, healing and evaluation alike.

    documents (builtin | .txt | .jsonl) -> token batches (`token_batches`, `calibration_batches`)

`builtin` is real English text every Python install has: the docstrings of the standard library, read with `ast`
(nothing imported, nothing downloaded), split by file into a calibration and a held-out part.
"""
from __future__ import annotations

import ast
import functools
import json
import random
import sysconfig
import zlib
from pathlib import Path

import torch

from .errors import LayerzipError
from .models import fit_seq_len

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
class Batches(list):
    """Token batches ({"input_ids", "attention_mask"} dicts) and what was used to make them:
    `used` = {"documents", "windows", "tokens", "seq_len"} (windows: packed windows or encoder sequences)."""

    def __init__(self, batches, **used):
        super().__init__(batches)
        self.used = used


def token_batches(tokenizer, docs: list[str], causal: bool, n_samples: int = 64, seq_len: int = 512,
                  batch_size: int = 8, min_tokens: int = 16) -> Batches:
    """Causal LMs: documents packed into windows of `seq_len` tokens, each starting with BOS where the tokenizer has
    one (some models, e.g. Gemma, degrade badly without it). Encoders: one document per sequence, truncated."""
    if causal:
        bos = tokenizer.bos_token_id
        sep = tokenizer.eos_token_id
        body = seq_len - (bos is not None)
        ids: list[int] = []
        read = 0
        for d in docs:
            ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
            read += 1
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
        return Batches([{"input_ids": t[i:i + batch_size], "attention_mask": torch.ones_like(t[i:i + batch_size])}
                        for i in range(0, n_win, batch_size)],
                       documents=read, windows=n_win, tokens=t.numel(), seq_len=seq_len)
    docs = docs[:n_samples]
    enc = [tokenizer(d, truncation=True, max_length=seq_len) for d in docs]
    tokens = sum(len(e["input_ids"]) for e in enc)
    if tokens < min_tokens:
        raise LayerzipError(f"calibration text too short (< {min_tokens} tokens); give more text")
    return Batches([dict(tokenizer.pad(enc[i:i + batch_size], return_tensors="pt"))
                    for i in range(0, len(docs), batch_size)],
                   documents=len(docs), windows=len(docs), tokens=tokens, seq_len=seq_len)


def spread_sequences(batches: list[dict], n: int | None) -> list[dict]:
    """`n` of the batches' sequences, evenly spread over all of them (every k-th, from the first), in batches of
    the rows kept from each input batch, trailing columns that are padding in every kept row cut off. All of
    them when n is None or not smaller than their count.

    >>> b = [{"input_ids": torch.arange(8).reshape(4, 2), "attention_mask": torch.ones(4, 2, dtype=torch.long)}]
    >>> [x["input_ids"][:, 0].tolist() for x in spread_sequences(b * 2, 4)]
    [[0, 4], [2, 6]]
    """
    total = sum(len(b["input_ids"]) for b in batches)
    if n is None or n >= total:
        return list(batches)
    picked = {int(i) for i in torch.linspace(0, total - 1, max(n, 1)).round().long()}
    out, start = [], 0
    for b in batches:
        rows = [i - start for i in range(start, start + len(b["input_ids"])) if i in picked]
        start += len(b["input_ids"])
        if rows:
            part = {k: v[rows] for k, v in b.items()}
            if "attention_mask" in part and part["attention_mask"].any():
                width = int(part["attention_mask"].any(0).nonzero().max()) + 1
                part = {k: v[:, :width] for k, v in part.items()}
            out.append(part)
    return out


def check_token_ids(model, batches: list[dict]) -> None:
    """Every token id must have a row in the model's input embedding (a tokenizer of another model does not)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    top = max((int(b["input_ids"].max()) for b in batches if b["input_ids"].numel()), default=-1)
    if rows is not None and top >= rows:
        raise LayerzipError(f"the tokenizer gives token id {top}, but the model's input embedding has only {rows} "
                            "rows: the tokenizer does not match the model; put the model's own tokenizer files in "
                            "its directory")


def calibration_batches(loaded, source: str = "builtin", n_samples: int = 64, seq_len: int = 512,
                        batch_size: int = 8) -> Batches:
    """Token batches of `source` for a loaded model (anything with .model, .tokenizer, .causal): causal LMs get
    `n_samples` packed windows, encoders `n_samples` documents; `seq_len` is capped at the model's positions; every
    token id is checked against the model's vocabulary."""
    # a causal window needs ~seq_len tokens; documents average ~60 tokens, so read enough of them
    docs = load_documents(source, limit=None if loaded.causal else n_samples)
    batches = token_batches(loaded.tokenizer, docs, loaded.causal, n_samples, fit_seq_len(loaded.model, seq_len),
                            batch_size)
    check_token_ids(loaded.model, batches)
    return batches
