"""How one compressed linear is stored: codes, masks and grids as safetensors payload, and back.

Shared by ctp's artifact (:mod:`ctp.compress.artifact`) and the readers and writers of other
tools' formats (:mod:`ctp.compress.foreign`, :mod:`ctp.compress.formats`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ctp.compress.quant import dequantize, max_code, pack_int, pack_mask, unpack_int, unpack_mask
from ctp.compress.weight import CompressedWeight
from ctp.errors import CTPError


def _kind(cw: CompressedWeight) -> str:
    if cw.quantized:
        return "sparse_quant" if cw.mask is not None else "quant"
    if cw.mask is None:
        raise ValueError("a compressed weight with neither codes nor mask has nothing to store")
    return "sparse"


def _trivial_g_idx(g_idx: Tensor, n_groups: int) -> bool:
    """True when ``g_idx`` is the contiguous grouping ``arange(in) // (in / n_groups)``."""
    cols = g_idx.numel()
    if cols % n_groups:
        return False
    return bool(torch.equal(g_idx.long().cpu(), torch.arange(cols) // (cols // n_groups)))


def encode_weight(name: str, cw: CompressedWeight, value_dtype: torch.dtype) -> tuple[dict[str, Tensor], dict]:
    """The stored tensors of one compressed linear and its index entry."""
    kind = _kind(cw)
    rows, cols = cw.weight.shape
    tensors: dict[str, Tensor] = {}
    entry: dict[str, Any] = {"kind": kind, "shape": [rows, cols]}
    mask = None if cw.mask is None else cw.mask.cpu().bool()
    if mask is not None:
        tensors[f"{name}.mask"] = pack_mask(mask)
        entry["n_kept"] = int(mask.sum())
    if kind == "sparse":
        tensors[f"{name}.values"] = cw.weight.detach().cpu()[mask].to(value_dtype)  # (n_kept,) row-major
        return tensors, entry

    assert cw.codes is not None and cw.scale is not None and cw.zero is not None and cw.bits is not None
    bits = cw.bits
    codes = cw.codes.cpu()
    kept_codes = codes[mask] if mask is not None else codes.reshape(-1)  # row-major order
    tensors[f"{name}.codes"] = pack_int(kept_codes.contiguous(), bits)
    zero = cw.zero.cpu().float()
    if not (torch.equal(zero, zero.round()) and float(zero.min()) >= 0 and float(zero.max()) <= max_code(bits)):
        raise ValueError(f"{name}: zero points are not integers in [0, {max_code(bits)}]")
    tensors[f"{name}.scale"] = cw.scale.cpu().float().contiguous()  # (rows, n_groups) fp32: exact
    tensors[f"{name}.zero"] = pack_int(zero.to(torch.uint8).contiguous(), bits)
    n_groups = cw.scale.shape[1]
    g_idx = cw.g_idx.cpu() if cw.g_idx is not None else None
    if g_idx is not None and not _trivial_g_idx(g_idx, n_groups):
        small = cols <= torch.iinfo(torch.int16).max and n_groups <= torch.iinfo(torch.int16).max
        tensors[f"{name}.g_idx"] = g_idx.to(torch.int16 if small else torch.int32)
    entry.update(bits=bits, sym=bool(cw.sym), n_groups=n_groups, g_idx=f"{name}.g_idx" in tensors)
    return tensors, entry


def decode_mask(name: str, entry: dict, tensors: dict[str, Tensor]) -> Tensor | None:
    """The (out, in) bool keep-mask of one stored linear, or None for an unpruned one."""
    if entry["kind"] not in ("sparse", "sparse_quant"):
        return None
    rows, cols = entry["shape"]
    mask = unpack_mask(tensors[f"{name}.mask"], rows * cols).view(rows, cols)
    if int(mask.sum()) != entry["n_kept"]:
        raise CTPError(f"{name}: the mask keeps {int(mask.sum())} weights, the index says {entry['n_kept']}",
                       "the artifact is damaged: recreate it")
    return mask


def decode_codes(name: str, entry: dict, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(codes (out, in) uint8, scale (out, n_groups) fp32, zero (out, n_groups) fp32, g_idx (in,) int64)`` of one
    stored quantized linear; pruned positions hold their group's zero-point code (so they dequantize to exactly 0)."""
    rows, cols = entry["shape"]
    bits, n_groups = entry["bits"], entry["n_groups"]
    mask = decode_mask(name, entry, tensors)
    zero = unpack_int(tensors[f"{name}.zero"], bits, rows * n_groups).view(rows, n_groups).float()
    scale = tensors[f"{name}.scale"].float()  # (rows, n_groups)
    if entry["g_idx"]:
        g = tensors[f"{name}.g_idx"].long()
    else:
        g = torch.arange(cols) // (cols // n_groups)  # (cols,) contiguous groups
    if mask is None:
        codes = unpack_int(tensors[f"{name}.codes"], bits, rows * cols).view(rows, cols)
    else:
        codes = zero[:, g].to(torch.uint8)  # (rows, cols)
        codes[mask] = unpack_int(tensors[f"{name}.codes"], bits, entry["n_kept"])
    return codes, scale, zero, g


def decode_weight(name: str, entry: dict, tensors: dict[str, Tensor]) -> Tensor:
    """The fp32 (out, in) matrix of one stored linear (inverse of :func:`encode_weight`)."""
    rows, cols = entry["shape"]
    if entry["kind"] == "sparse":
        mask = decode_mask(name, entry, tensors)
        values = tensors[f"{name}.values"]
        w = torch.zeros(rows, cols, dtype=values.dtype)
        w[mask] = values
        return w.float()
    codes, scale, zero, g = decode_codes(name, entry, tensors)
    w = dequantize(codes, scale[:, g], zero[:, g])  # (rows, cols) fp32
    mask = decode_mask(name, entry, tensors) if entry["kind"] == "sparse_quant" else None
    return w if mask is None else w * mask


def pack_rows(q: Tensor, bits: int) -> Tensor:
    """Pack (n, m) codes along dim 0, 32/bits per int32, low bits first: (n / (32/bits), m) int32."""
    per = 32 // bits
    n, m = q.shape
    q = q.to(torch.int64).view(n // per, per, m)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    packed = (q << shifts).sum(dim=1)  # (n/per, m) in [0, 2^32)
    return (packed - (packed >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def unpack_rows(p: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_rows`: (n / (32/bits), m) int32 -> (n, m) int64 codes."""
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    q = (p.to(torch.int64).unsqueeze(1) >> shifts) & (2**bits - 1)  # (n/per, per, m)
    return q.reshape(-1, p.shape[1])


def pack_cols(q: Tensor, bits: int) -> Tensor:
    """Pack (n, m) codes along dim 1, 32/bits per int32, low bits first: (n, m / (32/bits)) int32."""
    return pack_rows(q.T.contiguous(), bits).T.contiguous()


def unpack_cols(p: Tensor, bits: int) -> Tensor:
    return unpack_rows(p.T.contiguous(), bits).T.contiguous()
