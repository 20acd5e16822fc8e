"""Low rank of an embedding table E (vocab×dim), alone or tied to the LM head: E ≈ A B, A vocab×r, B r×dim.

Token weights: w = (1 − β)·p + β/vocab, p the tokens' frequencies in the calibration text and β = `SMOOTHING` the
share given to every token alike (a token absent from the calibration text still counts, so it is not destroyed).
With G a dim×dim Gram (below), the rank-r factorization minimizing

    Σ_t w_t (E_t − Ê_t) G (E_t − Ê_t)ᵀ  =  ‖diag(√w) (E − Ê) L‖²_F,   G = L Lᵀ

is the truncated SVD of diag(√w) E L = U Σ Vᵀ: A = diag(√w)⁻¹ U_r Σ_r^½, B = Σ_r^½ V_rᵀ L⁻¹ (SVD-LLM's solution
with row weights √w, methods/svdllm.py), and the loss is Σ_{i>r} σ_i².

- input embedding alone: G = I — the frequency-weighted squared error of the looked-up vectors;
- tied embedding + head (one factorization serves both): G = λ·I/dim + (1 − λ)·HᵀH / tr(HᵀH), H the final hidden
  states the head reads — a share λ (`LOOKUP_SHARE`) of the looked-up vectors' error, 1 − λ of the logits'
  (h·(E_t − Ê_t))², each relative to its scale, for each token weighted by w. For the head, w_t is the expected
  Fisher of logit t (E[p_t(1 − p_t)] ≈ the token's frequency for a calibrated model), so λ = 0 is the
  activation-aware (SVD-LLM) loss of the head. λ = 0 is the default: on Gemma-3-270M (bench/embeddings.py, the
  embedding alone at keep 0.8 / 0.5) held-out perplexity ÷ dense was 1.04 / 1.19 with λ = 0, 1.11 / 1.37 with
  λ = ½, 1.32 / 1.96 with the lookup's loss alone (G = I) and 14 / 62 with the plain SVD;
- without calibration text (method svd): w uniform and G = I — the plain truncated SVD.
"""
from __future__ import annotations

import torch

from ..stats import whiten
from .svdllm import svdllm_factors, whitened_singular_values

SMOOTHING = 0.1     # β: the share of the token weights spread evenly over the vocabulary
LOOKUP_SHARE = 0.0  # λ: the looked-up vectors' share of a tied pair's loss (the head's: 1 − λ); 0 measured best


def token_weights(counts: torch.Tensor | None, vocab: int, smoothing: float = SMOOTHING) -> torch.Tensor:
    """w = (1 − β)·counts/Σcounts + β/vocab (float64, sums to 1); uniform without counts.

    >>> [round(x, 6) for x in token_weights(torch.tensor([3., 1., 0., 0.]), 4, smoothing=0.2).tolist()]
    [0.65, 0.25, 0.05, 0.05]
    """
    uniform = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    if counts is None or counts.sum() <= 0:
        return uniform
    assert counts.numel() == vocab and (counts >= 0).all() and 0 < smoothing <= 1
    return (1 - smoothing) * counts.double() / counts.double().sum() + smoothing * uniform


def embedding_gram(dim: int, head_gram: torch.Tensor | None, lookup_share: float = LOOKUP_SHARE) -> torch.Tensor:
    """G of the module doc: I (lookup only), or λ·I/dim + (1 − λ)·HᵀH/tr(HᵀH), λ = `lookup_share` (tied to the
    head whose input Gram is `head_gram`)."""
    eye = torch.eye(dim, dtype=torch.float64)
    if head_gram is None:
        return eye
    Gh = head_gram.double()
    tr = Gh.diagonal().sum()
    if not tr > 0:
        return eye / dim
    return lookup_share * eye / dim + (1 - lookup_share) * Gh / tr


@torch.no_grad()
def embedding_factors(E: torch.Tensor, weights: torch.Tensor, gram: torch.Tensor, rank: int):
    """(E vocab×dim float64, token weights, G dim×dim, rank) -> (A vocab×r, B r×dim) minimizing the module doc's
    loss. G is positive definite (its identity part), so its Cholesky factor needs no jitter."""
    assert weights.shape == (E.shape[0],) and (weights > 0).all()
    wt = whiten(gram.to(E))
    return svdllm_factors(E, None, rank, whitening=wt, rows=weights.to(E).sqrt())


def embedding_spectrum(E: torch.Tensor, weights: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """σ(diag(√w) E L): the loss at rank r is Σ_{i>r} σ_i²."""
    return whitened_singular_values(E, whiten(gram.to(E)), rows=weights.to(E).sqrt())


def weighted_error(E: torch.Tensor, E_hat: torch.Tensor, weights: torch.Tensor, gram: torch.Tensor) -> float:
    """Σ_t w_t (E_t − Ê_t) G (E_t − Ê_t)ᵀ."""
    D = (E - E_hat).double()
    return float((weights.double()[:, None] * (D @ gram.double()) * D).sum())
