"""Low-bit storage of low-rank factors: int8, or int4 packed two to a byte, with one scale per group.

Symmetric round-to-nearest, per row of a factor, in groups of `group_size` consecutive columns (the factor's input
dimension: r for A (out×r), in for B (r×in); `min(group_size, cols)` when the row is shorter):

    s = max|w| / qmax over the group (qmax = 127 for int8, 7 for int4; stored as float32, rounded up)
    q = round(w / s) ∈ [−qmax, qmax]          w ≈ q·s, |w − q·s| ≤ s/2

int4 values are stored as q + 8 ∈ [1, 15], column 2j in the low nibble and 2j+1 in the high nibble of a uint8.

The layer that stores its factors this way is lowrank.LowBitLowRank. This file imports only torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BITS = (16, 8, 4)              # 16: factors in the model's dtype (no quantization)
GROUP_SIZE = 128


def _qmax(bits: int) -> int:
    assert bits in (8, 4), bits
    return 2 ** (bits - 1) - 1


def group_of(cols: int, group_size: int) -> int:
    """The group actually used along a row of `cols` values."""
    return min(group_size, cols)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [−8, 7] (rows×cols) -> uint8 (rows×⌈cols/2⌉), two per byte (low nibble first)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = F.pad(u, (0, 1), value=8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 (rows×cols)."""
    lo, hi = packed & 15, packed >> 4
    u = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :cols]
    return u.to(torch.int8) - 8


@torch.no_grad()
def quantize_groups(W: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of W (rows×cols): q int8 (bits 8) or packed uint8 (bits 4), scale float32 (rows×groups)."""
    qmax = _qmax(bits)
    rows, cols = W.shape
    g = group_of(cols, group_size)
    n = math.ceil(cols / g)
    Wg = F.pad(W.detach().double(), (0, n * g - cols)).view(rows, n, g)
    s = (Wg.abs().amax(-1) / qmax).float()
    # rounded up so that max|w| / s ≤ qmax: no value is clipped, every error ≤ s/2
    s = torch.where(s.double() * qmax < Wg.abs().amax(-1), torch.nextafter(s, torch.full_like(s, math.inf)), s)
    q = (Wg / s.double().clamp_min(1e-300)[..., None]).round().clamp(-qmax, qmax).view(rows, n * g)[:, :cols]
    q = q.to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), s


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, bits: int, cols: int, group_size: int = GROUP_SIZE,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W ≈ q·s (rows×cols) in `dtype` (computed in float32)."""
    q = unpack_int4(q, cols) if bits == 4 else q
    rows = q.shape[0]
    g = group_of(cols, group_size)
    n = scale.shape[-1]
    assert n == math.ceil(cols / g), (scale.shape, cols, g)
    W = F.pad(q.float(), (0, n * g - cols)).view(rows, n, g) * scale.float()[..., None]
    return W.view(rows, n * g)[:, :cols].to(dtype)


def storage_shapes(rows: int, cols: int, bits: int, group_size: int):
    qcols = math.ceil(cols / 2) if bits == 4 else cols
    return (rows, qcols), torch.uint8 if bits == 4 else torch.int8, (rows, math.ceil(cols / group_of(cols, group_size)))


def stored_bytes(rows: int, cols: int, bits: int, group_size: int = GROUP_SIZE, elem_bytes: int = 2) -> int:
    """Bytes a rows×cols matrix takes on disk: `elem_bytes` per value at 16 bits (the model's dtype), else the
    quantized values and their float32 scales.

    >>> stored_bytes(4, 256, 16), stored_bytes(4, 256, 8), stored_bytes(4, 256, 4)
    (2048, 1056, 544)
    """
    if bits == 16:
        return rows * cols * elem_bytes
    (r, qc), _, (sr, sc) = storage_shapes(rows, cols, bits, group_size)
    return r * qc + 4 * sr * sc


@torch.no_grad()
def rounding_error(W: torch.Tensor, bits: int, group_size: int = GROUP_SIZE,
                   col_weight: torch.Tensor | None = None) -> float:
    """Relative squared error of storing W at `bits` (0 at 16): Σ w_j ‖ΔW_:j‖² / Σ w_j ‖W_:j‖², columns weighted
    by `col_weight` (e.g. the input Gram's diagonal: an error on a large input feature costs more)."""
    if bits == 16:
        return 0.0
    q, s = quantize_groups(W, bits, group_size)
    d = (dequantize_groups(q, s, bits, W.shape[1], group_size, torch.float64) - W.double()).square().sum(0)
    e = W.double().square().sum(0)
    w = torch.ones_like(e) if col_weight is None else col_weight.to(e).clamp_min(0)
    return float((d * w).sum() / (e * w).sum().clamp_min(1e-300))


# --- a module's matrices in this storage: buffers `{name}_q` and `{name}_scale`; the module has .bits, .group_size
def add_lowbit_buffers(module, name: str, rows: int, cols: int, bits: int, group_size: int, device=None) -> None:
    """Register empty storage for a rows×cols matrix `name` on `module` (checks bits and group_size)."""
    if bits not in (8, 4) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"bits must be 8 or 4 and group_size ≥ 1, got {bits} and {group_size}")
    qshape, qdtype, sshape = storage_shapes(rows, cols, bits, group_size)
    module.register_buffer(f"{name}_q", torch.zeros(qshape, dtype=qdtype, device=device))
    module.register_buffer(f"{name}_scale", torch.zeros(sshape, dtype=torch.float32, device=device))


@torch.no_grad()
def store_lowbit_(module, name: str, W: torch.Tensor) -> None:
    """Quantize W into `module`'s storage for `name`."""
    q, s = quantize_groups(W.detach(), module.bits, module.group_size)
    getattr(module, f"{name}_q").copy_(q)
    getattr(module, f"{name}_scale").copy_(s)


def read_lowbit(module, name: str, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The matrix `name` of `module` dequantized to `dtype` (`cols`: its width before packing)."""
    return dequantize_groups(getattr(module, f"{name}_q"), getattr(module, f"{name}_scale"), module.bits, cols,
                             module.group_size, dtype)

