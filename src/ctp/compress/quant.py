"""Quantizer math (GPTQ's min/max affine grid) and bit packing for artifacts.

The grid for a row (or group) of weights ``x`` with ``maxq = 2**bits - 1``:

* asymmetric: ``xmin = min(x, 0)``, ``xmax = max(x, 0)``,
  ``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)`` in ``[0, maxq]``;
* symmetric: ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax``, ``zero = (maxq + 1) / 2``
  (so the grid spans ``[-xmax * (1 + 1/maxq), xmax * (1 - 1/maxq)]``, as in GPTQ).

Codes are ``q = clamp(round(x / scale) + zero, 0, maxq)`` and the dequantized value
is ``scale * (q - zero)``. Because ``zero`` is an integer inside the grid, a weight of
exactly 0 always maps to the code ``zero`` and back to exactly ``+0.0``, so pruned
weights stay pruned after quantization.

The kernels and the artifact reader both go through ``dequantize(quantize_int(...))``,
so a weight in memory and its rebuild from the stored codes are bit-identical fp32 values.
"""

from __future__ import annotations

import torch
from torch import Tensor


def max_code(bits: int) -> int:
    """Largest integer code of a ``bits``-bit grid."""
    return 2**bits - 1


def quant_params(w: Tensor, bits: int, sym: bool, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Per-row grid (scale, zero) of ``w`` reduced over ``dim`` (kept as size 1).

    Returns fp32 tensors shaped like ``w`` with ``dim`` of size 1, ready to broadcast.
    All-zero rows get the grid of [-1, 1]; ``scale`` is never 0.
    """
    maxq = max_code(bits)
    x = w.float()
    zeros = torch.zeros((), dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.amin(dim=dim, keepdim=True), zeros)  # grid always contains 0
    xmax = torch.maximum(x.amax(dim=dim, keepdim=True), zeros)
    if sym:
        # Unlike the reference, also mirror rows with no negative value: keeping
        # xmin = 0 there would put the top half of the range above the grid.
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    # A range of a few subnormals would make scale underflow to 0; keep it finite.
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_int(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes ``clamp(round(w / scale) + zero, 0, maxq)`` as uint8 (bits <= 8)."""
    q = torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)
    return q.to(torch.uint8)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """fp32 values ``scale * (q - zero)`` of integer codes ``q``."""
    return scale * (q.float() - zero)


# --------------------------------------------------------------------------- packing
#
# A bit stream, least significant bit first: value j occupies stream bits
# [j*bits, (j+1)*bits) and byte k holds stream bits [8k, 8k+8). Eight values of
# `bits` bits fill exactly `bits` bytes, so we pack eight at a time through an
# int64 accumulator (8 * 7 = 56 bits fit; 8-bit codes are stored as they are).


_PACK_GROUPS = 1 << 17  # groups of 8 values packed or unpacked per step (1M values: 8-16 MB of int64)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed to store ``numel`` values of ``bits`` bits: ceil(numel*bits/8)."""
    return (numel * bits + 7) // 8


def pack_int(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 ``codes`` (any shape, values < 2**bits) into a 1-D uint8 bit stream."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    numel = flat.numel()
    if numel and int(flat.max()) > max_code(bits):
        raise ValueError(f"a code exceeds {max_code(bits)}, the largest {bits}-bit value")
    if bits == 8:
        return flat.clone()
    pad = (-numel) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits  # (8,)
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8  # (bits,)
    out = torch.empty(flat.numel() // 8 * bits, dtype=torch.uint8, device=flat.device)
    for g0 in range(0, flat.numel() // 8, _PACK_GROUPS):  # by groups of 8 values: int64 temporaries stay small
        v = flat[g0 * 8 : (g0 + _PACK_GROUPS) * 8].to(torch.int64).view(-1, 8)  # (G, 8) values
        acc = (v << shifts).sum(dim=1)  # (G,) 8*bits-bit words; fields do not overlap
        out[g0 * bits : g0 * bits + acc.numel() * bits] = ((acc[:, None] >> byte_shifts) & 0xFF).reshape(-1)
    return out[: packed_nbytes(numel, bits)]  # drop bytes holding only padding


def unpack_int(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_int`: the first ``numel`` codes as a 1-D uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed must be a 1-D uint8 tensor")
    if packed.numel() < packed_nbytes(numel, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} values of {bits} bits")
    if bits == 8:
        return packed[:numel].clone()
    pad = (-packed.numel()) % bits
    if pad:
        packed = torch.cat([packed, packed.new_zeros(pad)])
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8  # (bits,)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits  # (8,)
    groups = packed.numel() // bits
    out = torch.empty(groups * 8, dtype=torch.uint8, device=packed.device)
    for g0 in range(0, groups, _PACK_GROUPS):  # by groups of 8 values: int64 temporaries stay small
        b = packed[g0 * bits : (g0 + _PACK_GROUPS) * bits].to(torch.int64).view(-1, bits)  # (G, bits) bytes
        acc = (b << byte_shifts).sum(dim=1)  # (G,) words of 8 values
        out[g0 * 8 : g0 * 8 + acc.numel() * 8] = ((acc[:, None] >> shifts) & max_code(bits)).reshape(-1)
    return out[:numel]


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool tensor (any shape) into 1 bit per element, LSB first."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    return pack_int(mask.to(torch.uint8), 1)


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_mask`: the first ``numel`` entries as a 1-D bool tensor."""
    return unpack_int(packed, 1, numel).bool()
