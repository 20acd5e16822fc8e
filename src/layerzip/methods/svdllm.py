"""SVD-LLM (Wang et al. 2024): truncation-aware whitening.

With the input Gram G = XᵀX = L Lᵀ (Cholesky, stats.whiten), take the SVD W L = U Σ Vᵀ and keep r components:

    W' = U_r Σ_r V_rᵀ L⁻¹,    stored as  A = U_r Σ_r^½,  B = Σ_r^½ V_rᵀ L⁻¹  (a triangular solve, no inverse)

Then the layer loss ‖(W − W')Xᵀ‖²_F = Σ_{i>r} σ_i², the smallest any rank-r matrix can reach.

Output weighting (`fisher`): the loss of output i weighted by its diagonal output Fisher fᵢ, ‖D(W − W')Xᵀ‖ with
D = diag(√f) — or, two-sided (`kfac`), by the whole output-gradient covariance F = R Rᵀ (shrunk toward its
diagonal): ‖Rᵀ(W − W')Xᵀ‖, solved exactly the same way from the SVD of Rᵀ W L, with A = R⁻ᵀ U_r Σ_r^½.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..data import spread_sequences
from ..errors import LayerzipError
from ..models import is_causal
from ..nn import singular_values, truncated_factors
from ..stats import Whitening, whiten
from .base import CompressConfig, option, register_method
from .correct import target_aware_factors
from .fwsvd import row_weights


def _weigh(W: torch.Tensor, rows) -> torch.Tensor:
    """D W (rows: a vector of weights) or Rᵀ W (rows: the Whitening of the output covariance, F = R Rᵀ)."""
    if rows is None:
        return W
    if isinstance(rows, Whitening):
        return rows.L.to(W).T @ W
    return rows.to(W)[:, None] * W


def _unweigh(A: torch.Tensor, rows) -> torch.Tensor:
    """D⁻¹ A, or R⁻ᵀ A (a triangular solve)."""
    if rows is None:
        return A
    if isinstance(rows, Whitening):
        return rows.right_solve(A.T.to(rows.L)).T.to(A)
    return A / rows.to(A)[:, None]


@torch.no_grad()
def svdllm_factors(W: torch.Tensor, stats, rank: int, whitening: Whitening | None = None, rows=None):
    """(W out×in float64, stats with .gram, rank) -> (A, B). Pass `whitening` to reuse it across modules.

    `rows` (positive, length out): weight the loss of output i by rows[i]² — min ‖D(W − W')Xᵀ‖, D = diag(rows) —
    solved exactly the same way: SVD of D W L, then A = D⁻¹ U_r Σ_r^½. `rows` a Whitening of the output-gradient
    covariance F = R Rᵀ: min ‖Rᵀ(W − W')Xᵀ‖, from the SVD of Rᵀ W L, A = R⁻ᵀ U_r Σ_r^½."""
    wt = whitening or whiten(stats.gram.to(W))
    A, M = truncated_factors(_weigh(W, rows) @ wt.L, rank)
    return _unweigh(A, rows), wt.right_solve(M)


def whitened_singular_values(W: torch.Tensor, whitening: Whitening, rows=None) -> torch.Tensor:
    """σ(D W L) (or σ(Rᵀ W L)): σ_{r+1..}² summed is the exact (output-weighted) layer loss of rank r (for
    allocation and analysis)."""
    return singular_values(_weigh(W, rows) @ whitening.L)


def parse_share(value) -> int | str | None:
    """None, an integer n ≥ 2, or "auto" (from the command line's string or the Python API's int)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 2 or str(n) != str(value).strip():
        raise LayerzipError(f"--share must be an integer ≥ 2 (blocks per shared basis) or auto, got {value!r}")
    return n


@register_method("svd-llm")
@dataclass
class SVDLLM(CompressConfig):
    """Truncation-aware whitening (Cholesky of XᵀX), optimal layer loss at every rank.

    Defaults, the best setting measured (bench/BEAT_SVDLLM.md): `alloc="global"` — all ranks chosen together from
    the whitened spectra — with `fisher` — each output feature's error weighted by its diagonal output Fisher
    (stats.collect_output_fisher), so the whitened SVD is exact for that weighted loss and every module's loss is in
    one unit (≈ the model's loss increase), which is what global allocation compares. Causal LMs always (the Fisher
    comes from their own LM loss, every token a sample). Encoders: the same with at least
    `ENCODER_FISHER_MIN_SEQUENCES` calibration documents, the Fisher that of their pooled embedding (stats.fisher,
    "embedding"); below, uniform ranks with the row weights of their contrastive loss's Fisher (two views of each
    document, one sample each: `encoder_loss` "contrastive" whenever ranks are uniform). On MiniLM with the default 64
    documents that beat plain uniform SVD-LLM on every held-out metric, while global allocation (with either Fisher
    or none) lost the docstring pairs and cosine; with 512, global allocation with the embedding's Fisher beat both
    (bench/PIECES.md). Global allocation asked for below 512 (`alloc`, `elastic`, `objective="latency"`) keeps the
    Fisher off, as before.
    A causal LM's Fisher reads `fisher_samples` of the calibration sequences, evenly spread — by default enough for
    `FISHER_MIN_TOKENS` tokens or `FISHER_FRACTION` of the calibration, whichever is more: it is a backward through
    the whole model and its LM head (on Gemma-3-270M several forwards' cost per token), and on Gemma-3-270M 2048 of
    4096 calibration tokens gave the quality of all of them on two held-out sets while 1024 lost 2.5–3%
    (bench/COST.md). An encoder's Fisher reads every sequence (each is one sample).
    `sequential` and `correct` together fit A and B to map the compressed inputs to the original outputs
    (correct.target_aware_factors); off by default: they lost to the defaults on held-out data. `share` (N or
    "auto") shares one input basis per projection across N consecutive blocks (share.py); off by default: on
    Gemma-3-270M sharing 2 blocks lost at every keep and auto chose not to share (bench/PIECES.md).
    Causal LMs then get `REFINE_STEPS` steps of block refinement (refine.py; on Gemma-3-270M 7–10% lower held-out
    perplexity at keep 0.8 and 0.6 on two sets); encoders none by default (MiniLM: closer embeddings, no better
    retrieval)."""
    alloc: str | None = option(None, "rank allocation: uniform | global (default: the method's best)")
    fisher: bool | None = option(None, "svd-llm: weight each output by its loss gradient² (output Fisher)")
    kfac: bool = option(False, "svd-llm: with --fisher, weight by the output gradients' whole covariance (KFAC's "
                               "output factor), shrunk toward its diagonal, instead of the diagonal alone")
    share: str | None = option(None, "svd-llm: one input basis per projection shared by N consecutive blocks "
                                     "(Basis Sharing; the basis stored once), N ≥ 2, or auto: N per projection "
                                     "type chosen with the ranks by the allocation")
    fisher_samples: int | None = option(None, "calibration sequences the output Fisher reads, evenly spread "
                                        "(default: causal LMs ≥ 2048 tokens and 1/8 of the calibration, "
                                        "encoders all)")
    uses_stats: ClassVar[bool] = True
    prefix_ok: ClassVar[bool] = True          # A, B at rank r: the first r of one whitened SVD (also with fisher)
    refine_ok: ClassVar[bool] = True
    REFINE_STEPS: ClassVar[int] = 32
    ENCODER_FISHER_MIN_SEQUENCES: ClassVar[int] = 512
    FISHER_MIN_TOKENS: ClassVar[int] = 2048
    FISHER_FRACTION: ClassVar[float] = 1 / 8

    def __post_init__(self):
        super().__post_init__()
        if self.fisher_samples is not None and not (isinstance(self.fisher_samples, int) and self.fisher_samples > 0):
            raise LayerzipError(f"--fisher-samples must be a positive number of sequences, got {self.fisher_samples}")
        if self.kfac and self.fisher is False:
            raise LayerzipError("--kfac weights the output Fisher's covariance: drop --no-fisher")
        self.share = parse_share(self.share)
        if self.share is not None and (self.kfac or self.sequential or self.correct or self.elastic
                                       or self.objective == "latency" or self.refine_steps):
            raise LayerzipError("--share does not combine with --kfac, --sequential, --correct, --elastic, "
                                "--objective latency or --refine-steps; drop one")
        if self.kfac and self.correct:
            raise LayerzipError("--kfac and --correct do not combine (--correct refits with the diagonal Fisher); "
                                "drop one")

    @property
    def stream_ok(self):
        # --kfac holds every module's out × out gradient covariance until it decomposes; --share every block's Grams
        return not self.kfac and self.share is None

    def gradient_batches(self, calib):
        return spread_sequences(calib, self.fisher_samples)

    @property
    def encoder_loss(self):
        # measured on MiniLM: the contrastive Fisher's row weights win at uniform ranks, the embedding's Fisher as
        # global allocation's unit (bench/PIECES.md)
        return "contrastive" if self.alloc == "uniform" else "embedding"

    def resolved_refine_steps(self, model=None):
        if self.refine_steps is None and (self.share is not None or (model is not None and not is_causal(model))):
            return 0      # encoders: measured no better in retrieval (bench/PIECES.md); --share: its own groups
        return super().resolved_refine_steps(model)

    def resolve(self, model, calib=None):
        causal = is_causal(model)
        sequences = sum(len(b["input_ids"]) for b in calib or [])
        best = causal or sequences >= self.ENCODER_FISHER_MIN_SEQUENCES
        alloc = self.alloc or ("global" if best or self.objective == "latency" or self.elastic else "uniform")
        fisher = (best or self.kfac or alloc == "uniform") if self.fisher is None else self.fisher
        samples = self.fisher_samples
        if fisher and samples is None and causal and sequences:
            tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                         for b in calib)
            want = max(self.FISHER_MIN_TOKENS, self.FISHER_FRACTION * tokens)
            samples = min(sequences, math.ceil(want * sequences / max(tokens, 1)))
        resolved = {"alloc": alloc, "fisher": fisher, "fisher_samples": samples,
                    "refine_steps": self.resolved_refine_steps(model)}
        if all(getattr(self, k) == v for k, v in resolved.items()):
            return self                     # nothing left to decide (and the caller's instance is kept)
        return replace(self, **resolved)

    @property
    def loss_units(self):
        return bool(self.fisher)

    def rows(self, stats):
        """The output weighting of a module with these statistics: None, √(diagonal Fisher), or the Whitening of
        the output-gradient covariance (--kfac)."""
        if not self.fisher:
            return None
        return stats.output_whitening if self.kfac else row_weights(stats.fisher_rows)

    def factors(self, W, stats, rank):
        if self.correct and hasattr(stats, "cross"):
            return target_aware_factors(W, stats, rank, rows=self.rows(stats))
        return svdllm_factors(W, stats, rank, whitening=stats.whitening, rows=self.rows(stats))

    def spectrum(self, W, stats):
        return whitened_singular_values(W, stats.whitening, rows=self.rows(stats))

    @property
    def reads_gram(self):
        return bool(self.correct) or self.share is not None    # --correct's refit reads G', --share every G

    @property
    def gradients(self):
        return ("output_cov" if self.kfac else "output") if self.fisher else None
