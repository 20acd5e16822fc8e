"""Measure a model: parameters, size on disk, perplexity (causal LMs), embedding fidelity (encoders)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibrate import backbone, token_batches

MODEL_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def size_on_disk(path: Path | None) -> int | None:
    """Bytes of weight files (a .gguf file, or the weight files in a directory)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in MODEL_FILES)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: list[str], seq_len: int = 512, max_windows: int = 32,
               progress: bool = True) -> float:
    """exp(mean next-token NLL) over packed windows of `seq_len`, each starting with BOS (as in calibration)."""
    batches = token_batches(tokenizer, texts, causal=True, n_samples=max_windows, seq_len=seq_len, batch_size=4)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for b in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        ids = b["input_ids"].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        tgt = ids[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").item()
        count += tgt.numel()
    return math.exp(nll / count)


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: list[str], seq_len: int = 256, batch_size: int = 16,
          progress: bool = True) -> torch.Tensor:
    """Mean-pooled last hidden states (as sentence-transformers pools MiniLM), float32, one row per text."""
    device = next(model.parameters()).device
    net = backbone(model)
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc="embedding", unit="batch", disable=not progress):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=seq_len,
                        return_tensors="pt").to(device)
        h = net(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append((h * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=-1).mean().item()
