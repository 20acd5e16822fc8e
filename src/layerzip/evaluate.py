"""Measure an in-memory model: perplexity (causal LMs), embeddings and their fidelity or retrieval quality (encoders),
latency and FLOPs."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import check_token_ids, token_batches
from .driver import BlockDriver
from .lazy import source_of
from .models import backbone, fit_seq_len, is_causal
from .nn import SplitExperts


@torch.no_grad()
def perplexity_scored(model: nn.Module, tokenizer, texts: list[str], seq_len: int = 512, max_windows: int = 32,
                      progress: bool = True) -> dict:
    """{"perplexity": exp(mean next-token NLL), "windows", "tokens" scored} over packed windows of `seq_len`, each
    starting with BOS (as in calibration)."""
    seq_len = fit_seq_len(model, seq_len)
    batches = token_batches(tokenizer, texts, causal=True, n_samples=max_windows, seq_len=seq_len, batch_size=4)
    check_token_ids(model, batches)
    nll, count = 0.0, 0
    for ids, logits in _logits(model, batches, progress):
        tgt = ids[:, 1:]
        nll += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                               reduction="sum").item()
        count += tgt.numel()
    return {"perplexity": math.exp(nll / count), "windows": batches.used["windows"], "tokens": count}


def _logits(model: nn.Module, batches: list[dict], progress: bool):
    """(input ids, logits) per batch; a streamed model runs its blocks one at a time over all batches, then the
    head one window at a time (a window's logits, vocabulary-wide, are the largest tensor)."""
    source = source_of(model)
    if source is None:
        device = next(model.parameters()).device
        for b in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
            ids = b["input_ids"].to(device)
            yield ids, model(input_ids=ids).logits
        return
    batches = [{"input_ids": b["input_ids"]} for b in batches]
    driver = BlockDriver(model, batches, progress, desc="perplexity")
    states = driver.final_states(batches)
    with driver.hold_head():
        for b, h in zip(batches, states):
            for i in range(len(h)):
                ids = b["input_ids"][i:i + 1].to(source.device)
                yield ids, driver.head({"input_ids": ids}, h[i:i + 1]).logits


def perplexity(model: nn.Module, tokenizer, texts: list[str], seq_len: int = 512, max_windows: int = 32,
               progress: bool = True) -> float:
    """exp(mean next-token NLL) over packed windows (see perplexity_scored)."""
    return perplexity_scored(model, tokenizer, texts, seq_len, max_windows, progress)["perplexity"]


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: list[str], seq_len: int = 256, batch_size: int = 16,
          progress: bool = True) -> torch.Tensor:
    """Mean-pooled last hidden states (as sentence-transformers pools MiniLM), float32, one row per text."""
    source = source_of(model)
    device = source.device if source else next(model.parameters()).device
    seq_len = fit_seq_len(model, seq_len)
    net = backbone(model)
    encs = [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=seq_len,
                           return_tensors="pt").to(device)) for i in range(0, len(texts), batch_size)]
    check_token_ids(model, encs)
    if source is not None:           # streamed: the blocks one at a time over all batches
        driver = BlockDriver(model, encs, progress, desc="embedding")
        states = driver.final_states(encs)
        with driver.hold_head():
            hs = [driver.head(enc, h).last_hidden_state for enc, h in zip(encs, states)]
    else:
        hs = (net(**enc).last_hidden_state for enc in tqdm(encs, desc="embedding", unit="batch",
                                                            disable=not progress))
    out = []
    for enc, h in zip(encs, hs):
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append((h.float() * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=-1).mean().item()


# ------------------------------------------------------------------------------------------- retrieval and speed
def retrieval_metrics(queries: torch.Tensor, docs: torch.Tensor) -> dict:
    """Query i's relevant document is docs[i]; documents ranked by cosine. Recall@1 and mean reciprocal rank.

    >>> q = torch.eye(3); retrieval_metrics(q, q)["recall_at_1"]
    1.0
    """
    assert queries.shape == docs.shape, (queries.shape, docs.shape)
    q, d = F.normalize(queries.float(), dim=-1), F.normalize(docs.float(), dim=-1)
    sim = q @ d.T
    rank = (sim > sim.diagonal().unsqueeze(1)).sum(1) + 1          # 1 + documents scored above the right one
    return {"recall_at_1": (rank == 1).float().mean().item(), "mrr": (1.0 / rank.float()).mean().item(),
            "pairs": len(q)}


def _dummy_inputs(model: nn.Module, batch_size: int, seq_len: int) -> dict:
    vocab = getattr(model.config, "vocab_size", 1000)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, 30000), (batch_size, seq_len), generator=g)
    return {"input_ids": ids.to(next(model.parameters()).device), "attention_mask": torch.ones_like(ids)}


def _forward(model: nn.Module, inputs: dict):
    """Causal LMs: the full model, LM head included (what generation pays). Encoders: the backbone."""
    if is_causal(model):
        return model(**inputs, use_cache=False)
    return backbone(model)(**inputs)


@torch.no_grad()
def latency(model: nn.Module, batch_size: int = 1, seq_len: int = 128, repeats: int = 5, warmup: int = 1,
            threads: int | None = None) -> float:
    """Median wall-clock milliseconds of one forward pass over (batch_size × seq_len) tokens.

    `threads` fixes torch's intra-op threads for the measurement (restored afterwards).
    """
    import time
    inputs = _dummy_inputs(model, batch_size, seq_len)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            _forward(model, inputs)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            _forward(model, inputs)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return 1000 * sorted(times)[len(times) // 2]


def _is_attention(mod: nn.Module) -> bool:
    return type(mod).__name__.endswith("Attention") and not any(
        type(c).__name__.endswith("Attention") for c in mod.modules() if c is not mod)


@torch.no_grad()
def flops(model: nn.Module, seq_len: int = 128) -> dict:
    """Matmul FLOPs of one forward pass over `seq_len` tokens (batch 1), counted on every module by hooks:

    - `nn.Linear` / GPT-2 `Conv1D`: 2·in·out per token (the LM head is reported apart);
    - factorized layers (anything else with `in_features`/`out_features` and its own weights): 2 × its weight count
      per token, i.e. the cost of contracting the input with its factors;
    - attention: 2·2·heads·head_dim·context per token for QKᵀ and AV (context = seq_len, or (seq_len+1)/2 causal).
    Elementwise work (norms, activations, softmax) is left out: it is < 2% of these models' FLOPs.
    """
    cfg = model.config
    causal = hasattr(model, "lm_head")
    heads = getattr(cfg, "num_attention_heads", 1)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    counts = {"linear": 0.0, "factorized": 0.0, "attention": 0.0, "lm_head": 0.0}
    handles = []

    def tokens_of(x, width):
        return x.numel() // width

    def hook(name, mod):
        def fn(m, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            if mod is head:
                counts["lm_head"] += 2.0 * m.in_features * m.out_features * tokens_of(x, m.in_features)
            elif isinstance(m, nn.Linear) or hasattr(m, "nf"):
                n_in, n_out = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else m.weight.shape
                counts["linear"] += 2.0 * n_in * n_out * tokens_of(x, n_in)
            elif _is_attention(m):
                t = x.shape[-2]
                ctx = (t + 1) / 2 if causal else t
                counts["attention"] += 4.0 * heads * head_dim * ctx * tokens_of(x, x.shape[-1])
            else:
                w = sum(p.numel() for p in m.parameters() if p.dim() > 1)
                per = m.flops() if getattr(m, "sparse", False) else 2.0 * w   # MoE: the routed experts only
                counts["factorized"] += per * tokens_of(x, m.in_features)
        return fn

    inside: tuple[str, ...] = ()          # factorized layers already counted: their submodules are not
    for name, mod in model.named_modules():
        if inside and name.startswith(inside):
            continue
        linear = isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"
        factorized = not linear and hasattr(mod, "in_features") and hasattr(mod, "out_features") \
            and any(p.dim() > 1 for p in mod.parameters()) \
            and not any(isinstance(c, (nn.Linear, SplitExperts)) for c in mod.modules())   # experts: each its own
        if factorized:
            inside += (name + ".",)
        if linear or factorized or _is_attention(mod):
            handles.append(mod.register_forward_hook(hook(name, mod), with_kwargs=True))
    try:
        _forward(model, _dummy_inputs(model, 1, seq_len))
    finally:
        for h in handles:
            h.remove()
    total = sum(counts.values())
    return {"flops_per_token": total / seq_len, "flops_seq_len": seq_len,
            **{f"flops_per_token_{k}": v / seq_len for k, v in counts.items()}}
