"""Paired statistics for the closed-form correction (methods/correct.py): the compressed stream X' and the
original stream X of the same tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .activations import ModuleStats


@dataclass
class PairedStats(ModuleStats):
    """ModuleStats of the compressed stream X' (`.gram` = X'ᵀX'), plus the cross Gram C = XᵀX' with the original
    stream X and the original Gram XᵀX, accumulated from the same tokens."""
    cross: torch.Tensor = field(init=False)
    gram_ref: torch.Tensor = field(init=False)

    def __post_init__(self):
        super().__post_init__()
        self.cross = torch.zeros(self.n, self.n, dtype=torch.float64)
        self.gram_ref = torch.zeros(self.n, self.n, dtype=torch.float64)

    @torch.no_grad()
    def add_pair(self, x_ref: torch.Tensor, x: torch.Tensor) -> None:
        if self.cross.device != x.device:
            self._move(x.device)
        x_ref = x_ref.reshape(-1, self.n).to(torch.float64)
        x = x.reshape(-1, self.n).to(torch.float64)
        assert x_ref.shape == x.shape, (x_ref.shape, x.shape)
        self.add(x)
        self.cross.addmm_(x_ref.T, x)
        self.gram_ref.addmm_(x_ref.T, x_ref)


def grams(stats):
    """(G', C, G_ref); a plain ModuleStats means X' = X."""
    G = stats.gram
    return G, getattr(stats, "cross", G), getattr(stats, "gram_ref", G)
