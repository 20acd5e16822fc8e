"""Basis Sharing (Wang et al. 2024): one input basis for the same projection in n consecutive blocks.

`compress --method svd-llm --share N|auto`. A group is one projection type (a target's name without its block
index, e.g. `self_attn.q_proj`) in n consecutive blocks, all of one shape. With D_i each member's output weights
(the output Fisher's √ diagonal; I without it) and Ḡ = L̄ L̄ᵀ the mean of the members' input Grams:

    M = [D_1 W_1; …; D_n W_n] L̄ = U Σ Vᵀ,    B = Σ_r^½ V_rᵀ L̄⁻¹ (shared),    A_i = D_i⁻¹ U_{i,r} Σ_r^½

the SVD-LLM solution for the stacked weights: the rank-r minimum of Σ_i ‖D_i (W_i − A_i B) L̄‖². The group stores
r·(n·out + in) numbers instead of n·r·(out + in): one allocation unit of shape (n·out, in), so `--alloc global`
(and uniform) hand out its rank like any module's. A member's loss on its own inputs (what an unshared module's
spectrum measures) is, with Z_i = U_i Σ and Q = Vᵀ L̄⁻¹,

    E_i(r) = ‖D_i (W_i − A_i B) L_i‖² = ‖Z_i[:, r:] Q[r:] L_i‖² = Σ_{j,k ≥ r} (Z_iᵀ Z_i)_{jk} (Q G_i Qᵀ)_{jk}

for every r at once from two k×k matrices (`group_losses`); the group's spectrum given to the allocation is the
square root of its loss drops Σ_i E_i(r−1) − E_i(r), so shared and unshared units are compared on the same loss.
`--share auto` chooses n ∈ AUTO_SIZES per projection type (one sweep over the types, each keeping the size whose
global allocation at `--keep` leaves the least loss). Modules outside the blocks, and the last blocks when n does
not divide their number, stay in smaller groups (a group of one is the plain method).

The file stores each shared basis once (nn.SharedBasisLinear: the group's lexicographically first member owns B,
which is the name safetensors keeps for a shared tensor); `lz.load` and native loading tie the members again.
"""
from __future__ import annotations

import re

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LayerzipError
from .models import find_blocks, linear_shape, set_module
from .methods.svdllm import _unweigh, _weigh
from .nn import SharedBasisLinear, SplitExperts, dense_weight_and_bias
from .stats import whiten

AUTO_SIZES = (1, 2, 4)


def projection_types(targets: dict[str, nn.Module], model: nn.Module) -> dict[str, list[str]]:
    """{type: [names in block order]} for the targets inside the repeated blocks, a type per name-without-block-
    index and shape; an expert's projection (nn.SplitExperts) is typed by its name without the expert index, so
    its group is experts of one layer (in expert order); each other target outside the blocks is a type of its
    own."""
    found = find_blocks(model)
    pat = re.compile(rf"^{re.escape(found[0])}\.(\d+)\.(.+)$") if found else None
    types: dict[str, list[tuple[int, str]]] = {}
    for name, mod in targets.items():
        if is_expert(model, name):
            experts, _, index = name.rpartition(".")
            types.setdefault(f"{experts} {linear_shape(mod)}", []).append((int(index), name))
            continue
        m = pat.match(name) if pat else None
        key = f"{m.group(2)} {linear_shape(mod)}" if m else name
        types.setdefault(key, []).append((int(m.group(1)) if m else 0, name))
    return {k: [n for _, n in sorted(v)] for k, v in types.items()}


def is_expert(model: nn.Module, name: str) -> bool:
    """`name` is one expert's projection of a SplitExperts (`<experts>.gate_up.<e>` or `<experts>.down.<e>`)."""
    parts = name.rsplit(".", 2)
    return len(parts) == 3 and isinstance(model.get_submodule(parts[0]), SplitExperts)


def auto_sizes(members: list[str], model: nn.Module) -> tuple[int, ...]:
    """Group sizes `--share auto` tries for a type: AUTO_SIZES of blocks; for the experts of a layer, every power of
    two below their number, and all of them."""
    if not is_expert(model, members[0]):
        return AUTO_SIZES
    return tuple(2 ** i for i in range(len(members).bit_length()) if 2 ** i < len(members)) + (len(members),)


def chunk(names: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(names[i:i + n]) for i in range(0, len(names), n)]


def unit_shape(shapes: dict[str, tuple[int, int]], group: tuple[str, ...]) -> tuple[int, int]:
    out, inp = shapes[group[0]]
    return len(group) * out, inp


@torch.no_grad()
def _stacked_svd(Ws: list[torch.Tensor], grams: list[torch.Tensor], rows: list):
    """(each member's row block of U, Σ, Vᵀ, the whitening of the mean Gram) of M = [D_i W_i] L̄."""
    wt = whiten(sum(grams) / len(grams))
    M = torch.cat([_weigh(W, d) for W, d in zip(Ws, rows)]) @ wt.L
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U.split([W.shape[0] for W in Ws]), S, Vh, wt


@torch.no_grad()
def group_losses(Ws: list[torch.Tensor], grams: list[torch.Tensor], rows: list) -> torch.Tensor:
    """E(r) = Σ_i ‖D_i (W_i − A_i B) L_i‖² for r = 0 … k (k = min(n·out, in)): the members' summed layer loss on
    their own inputs when they share the rank-r basis (module doc)."""
    Us, S, Vh, wt = _stacked_svd(Ws, grams, rows)
    Q = wt.right_solve(Vh)                              # Vᵀ L̄⁻¹, k × in
    total = torch.zeros(S.numel() + 1, dtype=S.dtype)
    for U, G in zip(Us, grams):
        Z = U * S
        P = (Z.T @ Z) * (Q @ G.to(Q) @ Q.T)             # symmetric, k × k
        row = 2 * P.triu().sum(1) - P.diagonal()        # Σ_{k ≥ j} counted from the smaller index j
        total[:-1] += row.flip(0).cumsum(0).flip(0)
    return total


def group_spectrum(Ws, grams, rows) -> torch.Tensor:
    """Singular values whose squared tail sums are `group_losses` (its drops, negative ones — which a basis fitted
    on the mean Gram can give a member — floored at 0), for the allocation."""
    E = group_losses(Ws, grams, rows)
    return (E[:-1] - E[1:]).clamp_min(0).sqrt()


@torch.no_grad()
def shared_factors(Ws, grams, rows, rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([A_i], B) of the group at `rank` (module doc); exact (A_i B = W_i) at rank min(n·out, in) ≥ in."""
    Us, S, Vh, wt = _stacked_svd(Ws, grams, rows)
    s = S[:rank].sqrt()
    B = wt.right_solve(s[:, None] * Vh[:rank])
    return [_unweigh(U[:, :rank] * s, d) for U, d in zip(Us, rows)], B


class Sharing:
    """The groups of one compression and their math: `config` (svd-llm) gives each member's output weights
    (`config.rows`), `stats` each member's input statistics, `targets` the modules."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Module], config, stats: dict):
        self.model, self.targets, self.config, self.stats = model, targets, config, stats
        self.shapes = {n: linear_shape(m) for n, m in targets.items()}
        self.types = projection_types(targets, model)
        self._spectra: dict[tuple[str, ...], torch.Tensor] = {}
        self._similar: dict[tuple[str, int], list[tuple[str, ...]]] = {}

    def _inputs(self, group):
        Ws = [dense_weight_and_bias(self.targets[n])[0].detach().to(torch.float64) for n in group]
        sts = [self.stats[n] for n in group]
        return Ws, [s.gram for s in sts], [self.config.rows(s) for s in sts]

    def spectrum(self, group: tuple[str, ...]) -> torch.Tensor:
        if group not in self._spectra:
            if len(group) == 1:
                W = dense_weight_and_bias(self.targets[group[0]])[0].detach().to(torch.float64)
                self._spectra[group] = self.config.spectrum(W, self.stats[group[0]]).cpu()
            else:
                self._spectra[group] = group_spectrum(*self._inputs(group)).cpu()
        return self._spectra[group]

    def groups(self, sizes: dict[str, int]) -> list[tuple[str, ...]]:
        return [g for t, names in self.types.items() for g in
                (self.similar(t, sizes[t]) if 1 < sizes[t] < len(names) and is_expert(self.model, names[0])
                 else chunk(names, sizes[t]))]

    def similar(self, type_: str, n: int) -> list[tuple[str, ...]]:
        """The experts of one layer in groups of n that share the most input energy (experts have no order that
        means anything, unlike blocks): with S_e = M_eᵀ M_e / ‖M_e‖², M_e = D_e W_e L̄ (the whitened weight, L̄ of
        the layer's mean Gram), greedily the first unassigned expert, then the unassigned one with the largest
        tr(S_e S_group), until the group holds n."""
        key = (type_, n)
        if key not in self._similar:
            names = self.types[type_]
            Ws, grams, rows = self._inputs(tuple(names))
            L = whiten(sum(grams) / len(grams)).L
            S = []
            for W, d in zip(Ws, rows):
                M = _weigh(W, d) @ L
                S.append(M.T @ M / M.square().sum().clamp_min(1e-300))
            left, groups = list(range(len(names))), []
            while left:
                group = [left.pop(0)]
                together = S[group[0]].clone()           # Σ S over the group so far
                while len(group) < n and left:
                    best = max(left, key=lambda j: (S[j] * together).sum().item())
                    group.append(best)
                    left.remove(best)
                    together += S[best]
                groups.append(tuple(names[i] for i in sorted(group)))
            self._similar[key] = groups
        return self._similar[key]

    def ranks(self, groups, keep: float) -> dict[tuple[str, ...], int | None]:
        shapes = {g: unit_shape(self.shapes, g) for g in groups}
        return self.config.ranks(shapes, keep, self.spectrum)

    def loss(self, groups, keep: float) -> float:
        """The allocation's summed loss at `keep` (each unit's normalized when the spectra are not in loss units)."""
        total = 0.0
        for g, r in self.ranks(groups, keep).items():
            s2 = self.spectrum(g).double().square()
            tail = 0.0 if r is None else s2[r:].sum().item()
            total += tail if self.config.loss_units else tail / max(s2.sum().item(), 1e-300)
        return total

    def choose(self, share, keep: float, progress: bool = False) -> dict[str, int]:
        """{type: blocks per group}: `share` for every type of the blocks, or (auto) each type's best of
        AUTO_SIZES, one type at a time with the others as chosen so far."""
        inside = {t: len(v) > 1 for t, v in self.types.items()}
        sizes = {t: (share if share != "auto" and inside[t] else 1) for t in self.types}
        if share != "auto":
            return sizes
        tries = {t: auto_sizes(v, self.model)[1:] for t, v in self.types.items() if inside[t]}
        bar = tqdm(total=sum(map(len, tries.values())), desc="share auto", unit="try", disable=not progress)
        for t, trying in tries.items():
            best = (self.loss(self.groups(sizes), keep), sizes[t])
            for n in trying:
                trial = self.loss(self.groups({**sizes, t: n}), keep)
                best = min(best, (trial, n))
                bar.update(1)
            sizes[t] = best[1]
        bar.close()
        return sizes

    def build(self, group: tuple[str, ...], rank: int) -> dict[str, nn.Module]:
        """{name: new module} of a group at `rank` (float64; the caller casts)."""
        if len(group) == 1:
            W, bias = dense_weight_and_bias(self.targets[group[0]])
            return {group[0]: self.config.build_layer(W.detach().to(torch.float64), bias, self.stats[group[0]], rank)}
        As, B = shared_factors(*self._inputs(group), rank)
        owner, basis = min(group), nn.Parameter(B.contiguous())
        out = {}
        for name, A in zip(group, As):
            bias = dense_weight_and_bias(self.targets[name])[1]
            layer = SharedBasisLinear.from_factors(A, B, None if bias is None else bias.detach().double(),
                                                   basis_of=owner)
            layer.B = basis
            out[name] = layer
        return out


def decompose_shared_(model: nn.Module, targets: dict[str, nn.Module], config, stats: dict, keep: float,
                      progress: bool = True) -> tuple[dict[str, dict], dict[str, int | None], dict[str, int]]:
    """Every target replaced by its group's factors (a member of a group kept dense stays as it is).
    Returns ({name: spec}, {name: rank or None}, {projection type: blocks per group})."""
    if not all(getattr(stats.get(n), "gram", None) is not None for n in targets):
        raise LayerzipError("--share needs every target's input Gram; internal: they were not kept")
    sharing = Sharing(model, targets, config, stats)
    sizes = sharing.choose(config.share, keep, progress)
    groups = sharing.groups(sizes)
    ranks = sharing.ranks(groups, keep)
    modules, out_ranks = {}, {}
    for g in tqdm(groups, desc=f"decomposing ({config.name}, shared)", unit="group", disable=not progress):
        out_ranks.update(dict.fromkeys(g, ranks[g]))
        if ranks[g] is None:
            continue
        for name, new in sharing.build(g, ranks[g]).items():
            W = dense_weight_and_bias(targets[name])[0]
            set_module(model, name, new.to(device=W.device, dtype=W.dtype))
            modules[name] = new.spec()
    return modules, out_ranks, {t.split(" ")[0]: n for t, n in sizes.items()}
