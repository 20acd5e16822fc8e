"""Input embeddings (and the LM heads tied to them) as targets: statistics -> rank -> LowRankEmbedding in place.

    token counts of the calibration text    (the lookup's input Gram is diagonal: how often each token is read)
    the head's input Gram, when tied        (the final hidden states, one forward of the backbone)
    rank: `keep` of the table's parameters  (its own budget, the same `keep` as the other targets: see below)
    A, B = methods.embedding.embedding_factors(...) -> LowRankEmbedding; a tied head becomes a TiedLowRankHead
    sharing A and B (one copy in memory and on disk)
    swapped in after the other targets are decomposed (their statistics are the original model's)

The embedding gets the same keep as the Linear targets rather than a share of one global allocation: the other
modules' spectra are in units of their own layer loss (or of the LM loss, with svd-llm's Fisher), which the
embedding's frequency-weighted loss is not, so mixing them in one price would not compare like with like.
An untied LM head is a Linear: it goes with the other Linear targets (SVD-LLM on the final hidden states' Gram).
"""
from __future__ import annotations

import torch
from torch import nn

from .allocate import uniform_ranks
from .errors import LayerzipError
from .lazy import source_of
from .methods import CompressConfig
from .methods.embedding import embedding_factors, embedding_gram, token_weights
from .models import set_module, tied_head
from .nn import LowRankEmbedding
from .nn.embedding import TiedLowRankHead, embedding_scale
from .stats import collect_stats

LOW_RANK = ("svd", "asvd", "svd-llm", "fwsvd", "cur")     # methods whose layers are A·B: the embedding follows


def split_embeddings(targets: dict[str, nn.Module]) -> tuple[dict[str, nn.Embedding], dict[str, nn.Module]]:
    """(embedding targets, the others)."""
    emb = {n: m for n, m in targets.items() if isinstance(m, nn.Embedding)}
    return emb, {n: m for n, m in targets.items() if n not in emb}


def token_counts(batches: list[dict], vocab: int) -> torch.Tensor:
    """How often each token id occurs in the calibration batches (padding left out), float64 of length `vocab`."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for b in batches:
        ids = b["input_ids"]
        if "attention_mask" in b:
            ids = ids[b["attention_mask"].bool()]
        counts += torch.bincount(ids.reshape(-1).cpu(), minlength=vocab)[:vocab].double()
    return counts


@torch.no_grad()
def factorize_embeddings(model: nn.Module, targets: dict[str, nn.Embedding], config: CompressConfig,
                         calib: list[dict] | None, keep: float, progress: bool = False) -> tuple[dict, dict]:
    """The rank-r factorization of each embedding target (and its tied head) at `keep` of its parameters, from the
    statistics of `model` as it is. Returns ({name: new module}, {name: rank or None}); `swap_` puts them in place
    (after the other targets are decomposed from the original model's statistics)."""
    if not targets:
        return {}, {}
    if config.name not in LOW_RANK:
        raise LayerzipError(f"embeddings are decomposed low rank, which method {config.name} is not; use one of "
                            f"{', '.join(LOW_RANK)} or leave embeddings and lm_head out of --include")
    if source_of(model) is not None:
        raise LayerzipError("embedding targets need the whole model in memory; pass --no-stream or leave "
                            "embeddings and lm_head out of --include")
    use_data = bool(config.needs_stats and calib)
    head = tied_head(model)
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    new, ranks = {}, {}
    for name, emb in targets.items():
        V, d = emb.weight.shape
        rank = uniform_ranks({name: (d, V)}, keep)[name]
        tied = head is not None and emb is model.get_input_embeddings()
        ranks.update({name: rank, **({head_name: rank} if tied else {})})
        if rank is None:
            continue
        w = token_weights(token_counts(calib, V) if use_data else None, V)
        head_gram = collect_stats(model, {head_name: head}, calib, progress)[head_name].gram if tied and use_data \
            else None
        W = emb.weight
        A, B = embedding_factors(W.detach().double(), w, embedding_gram(d, head_gram), rank)
        new[name] = LowRankEmbedding.from_factors(A, B, emb.padding_idx, embedding_scale(emb), dtype=W.dtype,
                                                  device=W.device)
        if tied:
            new[head_name] = TiedLowRankHead.of(new[name], name)
    return new, ranks


def swap_(model: nn.Module, new: dict[str, nn.Module]) -> dict[str, dict]:
    """Put the new modules in place; returns their specs."""
    for name, mod in new.items():
        set_module(model, name, mod)
    return {name: mod.spec() for name, mod in new.items()}
