"""Compiled dequantization of packed weights on CPU, one pass over memory (numba).

A packed linear given a long input (prefill, scoring, training) dequantizes its weight for fp32 matmuls.
In torch ops that takes five or six passes (unpack nibbles, interleave, transpose, cast, subtract the zero point,
scale); this loop writes each fp32 weight once, 1.4-2.6x faster (``bench/README.md``, "Dequantization for long
inputs": on SmolLM2's four int4 shapes, 0.46-1.3x of the 128-token matmul's own time in torch ops, 0.25-0.59x
here). The values are bit for bit those of
:meth:`ctp.compress.packed.Int4Linear.weight_t`'s torch path, ``s * (q - z)`` in fp32: the tests compare both on
every CPU layout.

The layout of torch's CPU int4 pack is described in :func:`ctp.compress.packed._cpu_unpack_t`. numba compiles
these loops on first use (about a second) and caches them beside this file when it can write there.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _split_blocks(flat, start, nblocks, B, r_grid, r_out, cols, G, zero_t, scale_t, out):  # pragma: no cover
    """``nblocks`` full blocks of B rows from byte ``start`` on, whose byte j holds row j (low nibble) and row
    j + B/2 (high nibble); the first is row ``r_grid`` of the grid and row ``r_out`` of ``out``."""
    h = B // 2
    for k in range(cols):
        g = k // G
        for nb in range(nblocks):
            base = start + (nb * cols + k) * h
            rg = r_grid + nb * B
            ro = r_out + nb * B
            src = flat[base : base + h]
            o1 = out[k, ro : ro + h]
            o2 = out[k, ro + h : ro + B]
            z1 = zero_t[g, rg : rg + h]
            z2 = zero_t[g, rg + h : rg + B]
            s1 = scale_t[g, rg : rg + h]
            s2 = scale_t[g, rg + h : rg + B]
            for j in range(h):  # two simple loops vectorize; one loop writing both halves does not
                o1[j] = (np.float32(np.int32(src[j]) & 15) - np.float32(z1[j])) * s1[j]
            for j in range(h):
                o2[j] = (np.float32(np.int32(src[j]) >> 4) - np.float32(z2[j])) * s2[j]


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _pair_blocks(flat, start, nblocks, width, r_grid, r_out, cols, G, zero_t, scale_t, out):  # pragma: no cover
    """Blocks of ``width`` rows whose byte j holds rows 2j (low nibble) and 2j + 1 (high); as :func:`_split_blocks`."""
    h = width // 2
    for k in range(cols):
        g = k // G
        for nb in range(nblocks):
            base = start + (nb * cols + k) * h
            rg = r_grid + nb * width
            ro = r_out + nb * width
            src = flat[base : base + h]
            o = out[k, ro : ro + width]
            z = zero_t[g, rg : rg + width]
            s = scale_t[g, rg : rg + width]
            for j in range(h):
                b = np.int32(src[j])
                o[2 * j] = (np.float32(b & 15) - np.float32(z[2 * j])) * s[2 * j]
                o[2 * j + 1] = (np.float32(b >> 4) - np.float32(z[2 * j + 1])) * s[2 * j + 1]


def int4_weight_t(flat: np.ndarray, rows: int, cols: int, block: int, split: bool, group: int,
                  zero_t: np.ndarray, scale_t: np.ndarray, out: np.ndarray, r0: int = 0,
                  r1: int | None = None) -> np.ndarray:
    """Write output rows ``r0:r1`` of torch's CPU int4 pack ``flat`` (uint8), dequantized to fp32
    ``scale * (code - zero)`` and transposed, into ``out`` (cols, r1 - r0).

    ``block`` rows per block, ``split`` whether a full block holds rows j and j + block/2 in one byte (AVX2,
    AVX-512) or rows 2j and 2j + 1 (no AVX; every shorter last block); ``zero_t`` (uint8) and ``scale_t``
    (fp32) are (cols / group, rows). ``r0`` is a multiple of ``block``, ``r1`` one too or ``rows``."""
    r1 = rows if r1 is None else r1
    if r0 % block or (r1 % block and r1 != rows) or not 0 <= r0 < r1 <= rows:
        raise ValueError(f"rows {r0}:{r1} of {rows} do not fall on blocks of {block}")
    nfull, tail = divmod(rows, block)
    b0, b1 = r0 // block, min(r1 // block, nfull)
    full = _split_blocks if split else _pair_blocks
    if b1 > b0:
        full(flat, b0 * cols * block // 2, b1 - b0, block, b0 * block, 0, cols, group, zero_t, scale_t, out)
    if tail and r1 == rows:
        _pair_blocks(flat, nfull * cols * block // 2, 1, tail, nfull * block, nfull * block - r0, cols, group,
                     zero_t, scale_t, out)
    return out


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _int8_rows(codes, shift, scale, out):  # pragma: no cover - compiled
    for r in range(codes.shape[0]):
        c = shift[r]
        s = scale[r]
        src = codes[r]
        o = out[r]
        for j in range(codes.shape[1]):
            o[j] = (np.float32(src[j]) + c) * s


def int8_weight(codes: np.ndarray, shift: np.ndarray, scale: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Write the (rows, cols) fp32 ``(code + shift) * scale`` of int8 ``codes`` with one shift and scale per row
    (fp32, (rows,)) into ``out``."""
    _int8_rows(codes, shift, scale, out)
    return out
