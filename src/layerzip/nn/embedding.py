"""LowRankEmbedding: a token's vector is row t of A (vocab×r), times B (r×dim), times an optional scale.

Stores r·(vocab + dim) numbers instead of vocab·dim. The lookup reads r numbers per token and the small matmul
costs 2·r·dim FLOPs per token. A tied LM head (logits = h Eᵀ) is a `LowRankLinear` (in=dim, out=vocab) holding the
very same A and B parameters: logits = (h Bᵀ) Aᵀ, one factorization for both (`tie_head_`); its spec records
`tied_to`, the embedding's module name, so loading ties them again (io.place_factorized).

`scale` reproduces embeddings that multiply their lookup by a constant (Gemma's √dim); it is cast to the factors'
dtype before the product, as Gemma does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import FactorizedLayer, register_layer
from .lowbit import GROUP_SIZE, add_lowbit_buffers, dequantize_groups, read_lowbit, store_lowbit_
from .lowrank import LowRankLinear, truncated_factors


class ScaledEmbedding(nn.Embedding):
    """nn.Embedding whose lookup is multiplied by `scale` (what `LowRankEmbedding.to_dense` returns when scale ≠ 1)."""

    def __init__(self, *args, scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = float(scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * torch.tensor(self.scale).to(self.weight.dtype)


@register_layer("lowrank_embedding")
class LowRankEmbedding(FactorizedLayer):
    """A rank-r embedding table E ≈ A B (r = min(vocab, dim) when not given: exact).

    As a factorized layer it is the linear map one-hot(t) -> E_t: in_features = vocab, out_features = dim, and
    `dense_weight()` is Eᵀ (dim×vocab).

    >>> emb = nn.Embedding(100, 16)
    >>> lr = LowRankEmbedding.from_embedding(emb)              # full rank: exact
    >>> ids = torch.tensor([[3, 7, 99]])
    >>> bool(torch.allclose(lr(ids), emb(ids), atol=1e-5)), lr.num_params(100, 16, rank=4)
    (True, 464)
    """

    bias = None

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int | None = None, padding_idx: int | None = None,
                 scale: float = 1.0, device=None, dtype=None):
        super().__init__()
        rank = rank or min(num_embeddings, embedding_dim)
        if not 0 < rank <= min(num_embeddings, embedding_dim):
            raise ValueError(f"rank must be in [1, {min(num_embeddings, embedding_dim)}], got {rank}")
        kw = dict(device=device, dtype=dtype)
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.in_features, self.out_features = num_embeddings, embedding_dim
        self.padding_idx, self.scale = padding_idx, float(scale)
        self.A = nn.Parameter(torch.empty(num_embeddings, rank, **kw))
        self.B = nn.Parameter(torch.empty(rank, embedding_dim, **kw))
        with torch.no_grad():                 # A B has nn.Embedding's N(0, 1) entries in expectation
            nn.init.normal_(self.A)
            nn.init.normal_(self.B, std=rank ** -0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.A, self.padding_idx) @ self.B
        return out if self.scale == 1.0 else out * torch.tensor(self.scale).to(out.dtype)

    # r·(vocab + dim) numbers and the ranks 1..min(vocab, dim): those of a rank-r linear map of the same shape
    num_params = staticmethod(LowRankLinear.num_params)
    candidates = classmethod(LowRankLinear.candidates.__func__)

    def flops(self) -> int:
        """Per token: the row of A is read, then r×dim multiply-adds."""
        return 2 * self.rank * self.embedding_dim

    def table(self) -> torch.Tensor:
        """E ≈ A B (vocab×dim), the scale left out (as in nn.Embedding.weight)."""
        return self.A @ self.B

    def dense_weight(self) -> torch.Tensor:
        return self.table().T

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, padding_idx: int | None = None, scale: float = 1.0,
                     dtype=None, device=None) -> "LowRankEmbedding":
        """From A (vocab×r) and B (r×dim), cast to `dtype` (default: A's)."""
        assert A.shape[1] == B.shape[0], (A.shape, B.shape)
        layer = cls(A.shape[0], B.shape[1], A.shape[1], padding_idx, scale, device=device or A.device,
                    dtype=dtype or A.dtype)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
        return layer

    @classmethod
    @torch.no_grad()
    def from_dense(cls, W: torch.Tensor, bias: torch.Tensor | None = None, rank: int | None = None,
                   padding_idx: int | None = None, scale: float = 1.0) -> "LowRankEmbedding":
        """Rank-r truncated SVD of the table Wᵀ (W: dim×vocab, the linear view), in float64, cast to W's dtype."""
        assert bias is None, "an embedding has no bias"
        rank = rank or min(W.shape)
        A, B = truncated_factors(W.detach().double().T, rank)
        return cls.from_factors(A, B, padding_idx, scale, dtype=W.dtype, device=W.device)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, rank: int | None = None) -> "LowRankEmbedding":
        """Truncated SVD of an nn.Embedding's table (keeps its padding index and, like Gemma's, its scale)."""
        return cls.from_dense(emb.weight.T, rank=rank, padding_idx=emb.padding_idx, scale=embedding_scale(emb))

    def to_dense(self) -> nn.Embedding:
        """An nn.Embedding with table A B (a `ScaledEmbedding` when scale ≠ 1)."""
        E = self.table().detach()
        kw = dict(padding_idx=self.padding_idx, device=E.device, dtype=E.dtype)
        emb = (nn.Embedding(*E.shape, **kw) if self.scale == 1.0
               else ScaledEmbedding(*E.shape, scale=self.scale, **kw))
        with torch.no_grad():
            emb.weight.copy_(E)
        return emb

    def spec(self) -> dict:
        return {"type": "lowrank_embedding", "in": self.num_embeddings, "out": self.embedding_dim,
                "rank": self.rank, "padding_idx": self.padding_idx, "scale": self.scale}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "LowRankEmbedding | LowBitLowRankEmbedding":
        if spec.get("bits", 16) != 16:                 # low-bit factors on disk
            return LowBitLowRankEmbedding.from_spec(spec, dtype=dtype, device=device)
        return cls(spec["in"], spec["out"], spec["rank"], spec.get("padding_idx"), spec.get("scale", 1.0),
                   device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"
                + (f", scale={self.scale:g}" if self.scale != 1.0 else ""))


@register_layer("lowrank_tied_head")
class TiedLowRankHead(LowRankLinear):
    """The LM head of a tied model: logits = (h Bᵀ) Aᵀ with the A and B of the embedding named `tied_to`."""

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, tied_to: str = "",
                 device=None, dtype=None):
        super().__init__(in_features, out_features, rank, bias=False, device=device, dtype=dtype)
        self.tied_to = tied_to

    @classmethod
    def of(cls, emb: LowRankEmbedding, tied_to: str) -> "TiedLowRankHead":
        head = cls(emb.embedding_dim, emb.num_embeddings, emb.rank, tied_to, device="meta")
        head.tie_(emb)
        return head

    def tie_(self, emb: LowRankEmbedding) -> None:
        """Share the embedding's A and B (the same Parameter objects: one copy in memory and on disk)."""
        if (emb.num_embeddings, emb.embedding_dim, emb.rank) != (self.out_features, self.in_features, self.rank):
            raise ValueError(f"head {self.out_features}×{self.in_features} rank {self.rank} cannot tie to embedding "
                             f"{emb.num_embeddings}×{emb.embedding_dim} rank {emb.rank}")
        self.A, self.B = emb.A, emb.B

    def to_dense(self) -> nn.Linear:
        """An nn.Linear with weight A B (untied: `merge_` ties it again to the merged embedding)."""
        return super().to_dense()

    def spec(self) -> dict:
        return {**super().spec(), "type": "lowrank_tied_head", "tied_to": self.tied_to}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "TiedLowRankHead | LowBitTiedHead":
        if not isinstance(spec.get("tied_to"), str):
            raise ValueError("tied_to must name the embedding module")
        if spec.get("bits", 16) != 16:
            return LowBitTiedHead.from_spec(spec, dtype=dtype, device=device)
        return cls(spec["in"], spec["out"], spec["rank"], spec["tied_to"], device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tied_to={self.tied_to}"


class LowBitLowRankEmbedding(FactorizedLayer):
    """A `LowRankEmbedding` whose A (vocab×r, groups along r) and B (r×dim, groups along dim) are stored with `bits`
    (8 or 4) and float32 scales per group (lowbit.py), as `LowBitLowRank` stores a head of the same shape: its
    storage form (`save(..., bits=8|4)`); a loaded model holds the `LowRankEmbedding` (`to_lowrank`). The forward
    dequantizes only the rows of A it looks up.

    >>> lr = LowRankEmbedding.from_embedding(nn.Embedding(300, 16), rank=8)
    >>> q = LowBitLowRankEmbedding.from_lowrank(lr, bits=8)
    >>> ids = torch.tensor([[1, 2, 299]])
    >>> bool(torch.allclose(q(ids), lr(ids), atol=0.05)), q.spec()["bits"], type(q.to_lowrank()).__name__
    (True, 8, 'LowRankEmbedding')
    """

    layer_type = "lowrank_embedding"
    bias = None
    num_params = staticmethod(LowRankLinear.num_params)

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None,
                 scale: float = 1.0, bits: int = 8, group_size: int = GROUP_SIZE, device=None, dtype=None):
        super().__init__()
        if not 0 < rank <= min(num_embeddings, embedding_dim):
            raise ValueError(f"rank must be in [1, {min(num_embeddings, embedding_dim)}], got {rank}")
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.in_features, self.out_features = num_embeddings, embedding_dim
        self.padding_idx, self.scale, self.bits, self.group_size = padding_idx, float(scale), bits, group_size
        self.dtype = dtype or torch.get_default_dtype()
        for name, (rows, cols) in (("A", (num_embeddings, rank)), ("B", (rank, embedding_dim))):
            add_lowbit_buffers(self, name, rows, cols, bits, group_size, device)

    @classmethod
    @torch.no_grad()
    def from_lowrank(cls, emb: LowRankEmbedding, bits: int, group_size: int = GROUP_SIZE) -> "LowBitLowRankEmbedding":
        new = cls(emb.num_embeddings, emb.embedding_dim, emb.rank, emb.padding_idx, emb.scale, bits, group_size,
                  device=emb.A.device, dtype=emb.A.dtype)
        for name in ("A", "B"):
            store_lowbit_(new, name, getattr(emb, name))
        return new

    def factor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        cols = self.rank if name == "A" else self.embedding_dim
        return read_lowbit(self, name, cols, dtype or self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize_groups(self.A_q[flat], self.A_scale[flat], self.bits, self.rank, self.group_size, self.dtype)
        out = (rows @ self.factor("B")).view(*ids.shape, self.embedding_dim)
        return out if self.scale == 1.0 else out * torch.tensor(self.scale).to(out.dtype)

    def to_lowrank(self) -> LowRankEmbedding:
        return LowRankEmbedding.from_factors(self.factor("A"), self.factor("B"), self.padding_idx, self.scale,
                                             dtype=self.dtype)

    dequantized = to_lowrank          # what loading turns every low-bit storage form into (nn/quantize.py)

    def dense_weight(self) -> torch.Tensor:
        return (self.factor("A") @ self.factor("B")).T

    def flops(self) -> int:
        return 2 * self.rank * self.embedding_dim

    def spec(self) -> dict:
        return {"type": "lowrank_embedding", "in": self.num_embeddings, "out": self.embedding_dim, "rank": self.rank,
                "padding_idx": self.padding_idx, "scale": self.scale, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "LowBitLowRankEmbedding":
        return cls(spec["in"], spec["out"], spec["rank"], spec.get("padding_idx"), spec.get("scale", 1.0),
                   spec["bits"], spec["group_size"], device=device, dtype=dtype)


class LowBitTiedHead(FactorizedLayer):
    """The storage form of a `TiedLowRankHead` beside a `LowBitLowRankEmbedding`: it holds no tensors (the
    embedding's low-bit factors are the one copy on disk), only its spec; dequantizing gives the TiedLowRankHead,
    which `tie_heads_` ties to the dequantized embedding. It has no forward of its own."""

    layer_type = "lowrank_tied_head"
    bias = None

    def __init__(self, in_features: int, out_features: int, rank: int, tied_to: str = "", bits: int = 8,
                 group_size: int = GROUP_SIZE, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.tied_to = in_features, out_features, rank, tied_to
        self.bits, self.group_size, self.dtype = bits, group_size, dtype or torch.get_default_dtype()

    @classmethod
    def of(cls, emb: LowBitLowRankEmbedding, tied_to: str) -> "LowBitTiedHead":
        head = cls(emb.embedding_dim, emb.num_embeddings, emb.rank, tied_to, emb.bits, emb.group_size, dtype=emb.dtype)
        head.tie_(emb)
        return head

    def tie_(self, emb: LowBitLowRankEmbedding) -> None:
        if ((emb.num_embeddings, emb.embedding_dim, emb.rank, emb.bits, emb.group_size)
                != (self.out_features, self.in_features, self.rank, self.bits, self.group_size)):
            raise ValueError(f"low-bit head {self.out_features}×{self.in_features} rank {self.rank} cannot tie to "
                             f"embedding {emb.num_embeddings}×{emb.embedding_dim} rank {emb.rank}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a low-bit tied head is a storage form; layerzip.nn.dequantize_factors_(model) first")

    def dense_weight(self) -> torch.Tensor:
        raise RuntimeError("a low-bit tied head is a storage form; layerzip.nn.dequantize_factors_(model) first")

    def to_lowrank(self) -> TiedLowRankHead:
        """An untied TiedLowRankHead (on meta): `tie_heads_` gives it the dequantized embedding's factors."""
        return TiedLowRankHead(self.in_features, self.out_features, self.rank, self.tied_to, device="meta",
                               dtype=self.dtype)

    dequantized = to_lowrank

    def spec(self) -> dict:
        return {"type": "lowrank_tied_head", "in": self.in_features, "out": self.out_features, "rank": self.rank,
                "bias": False, "tied_to": self.tied_to, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_spec(cls, spec: dict, dtype=None, device=None) -> "LowBitTiedHead":
        return cls(spec["in"], spec["out"], spec["rank"], spec["tied_to"], spec["bits"], spec["group_size"],
                   dtype=dtype)


def embedding_scale(emb: nn.Module) -> float:
    """The constant an embedding multiplies its lookup by (Gemma: `scalar_embed_scale`, √dim), else 1."""
    for attr in ("scalar_embed_scale", "scale"):
        v = getattr(emb, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    v = getattr(emb, "embed_scale", None)
    return float(v) if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1 and not v.is_meta) \
        else 1.0


def tie_heads_(model: nn.Module) -> list[tuple[str, str]]:
    """Every TiedLowRankHead of `model` shares its embedding's factors again; returns [(head, embedding)]."""
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, (TiedLowRankHead, LowBitTiedHead)):
            emb = model.get_submodule(mod.tied_to)
            kind = LowBitLowRankEmbedding if isinstance(mod, LowBitTiedHead) else LowRankEmbedding
            if not isinstance(emb, kind):
                raise ValueError(f"{name} is tied to {mod.tied_to}, which is not a {kind.__name__}")
            mod.tie_(emb)
            pairs.append((name, mod.tied_to))
    return pairs
