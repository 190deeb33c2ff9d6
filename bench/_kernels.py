"""Run-time formats for ctp's quantized weights, built on torch's weight-only kernels.

The library stores integer codes but runs "fake-quantized" dense weights (fp32 matrices
holding the dequantized values). These helpers turn ctp's ``(codes, scale, zero, g_idx)``
into what torch 2.13's weight-only matmuls take, so a benchmark can measure what a real
low-bit kernel would give. Nothing here is used by the library.

* 8-bit, symmetric, one grid per row: ctp's codes ``q`` in [0, 255] with zero point 128
  become int8 ``q - 128``; ``torch._weight_int8pack_mm(x, w_int8 (out, in), scale (out,))``
  computes ``x @ (w_int8 * scale)^T`` (CPU and CUDA).
* 4-bit, asymmetric, groups of 32/64/128/256 input columns (or one grid per row,
  replicated over such groups): ``torch._weight_int4pack_mm_for_cpu(x, packed, G,
  scale_and_zero)`` dequantizes ``(q - 8) * scale + zero'`` per group. ctp's
  ``scale * (q - z)`` is the same with ``zero' = scale * (8 - z)``. The packed weight comes
  from ``torch._convert_weight_to_int4pack_for_cpu(codes int32 (out, in), inner_k_tiles)``
  and holds two codes per byte, ``(out, in/2)`` uint8. On CUDA the codes are first packed
  two per byte (high nibble first) for ``torch._convert_weight_to_int4pack`` and the
  activations must be bf16.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

INT4_GROUPS = (256, 128, 64, 32)  # group sizes the int4 kernels accept


def int8_weight(codes: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 weight (out, in), per-row scale (out,)) from ctp's 8-bit symmetric per-row codes."""
    if scale.dim() == 2 and scale.shape[1] != 1:
        raise ValueError("the int8 kernel takes one scale per row (group_size -1)")
    z = zero.reshape(-1)
    if not bool((z == 128).all()):
        raise ValueError("the int8 kernel has no zero point: quantize with 8 bits and sym=True (zero 128)")
    w = (codes.to(torch.int16) - 128).to(torch.int8)  # (out, in) in [-128, 127]
    return w.contiguous(), scale.reshape(-1).float().contiguous()


def int4_group(cols: int, g_idx: Tensor) -> int:
    """The largest kernel group size over which ctp's grouping ``g_idx`` (in,) is constant."""
    for G in INT4_GROUPS:
        if cols % G == 0 and bool((g_idx.view(-1, G) == g_idx.view(-1, G)[:, :1]).all()):
            return G
    raise ValueError("the int4 kernels need contiguous groups of 32/64/128/256 columns (no act-order)")


def int4_weight(codes: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor, device: torch.device | str = "cpu",
                act_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, int]:
    """(packed weight, scale_and_zero (n_groups, out, 2), group size) for the int4 kernel."""
    rows, cols = codes.shape
    G = int4_group(cols, g_idx.long().cpu())
    gk = g_idx.long().cpu()[::G]  # (cols/G,) ctp group of each kernel group
    s = scale.float().cpu()[:, gk]  # (out, cols/G)
    z = zero.float().cpu()[:, gk]
    sz = torch.stack([s, s * (8 - z)], dim=-1).transpose(0, 1).contiguous()  # (cols/G, out, 2)
    device = torch.device(device)
    if device.type == "cuda":
        c = codes.to(torch.uint8)
        nib = (c[:, ::2] << 4 | c[:, 1::2]).contiguous().to(device)  # (out, in/2), high nibble first
        packed = torch._convert_weight_to_int4pack(nib, 2)
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
    return packed, sz.to(device=device, dtype=act_dtype), G


def int4_mm(x: Tensor, packed: Tensor, G: int, sz: Tensor) -> Tensor:
    """``x (M, in) @ W^T`` for an int4-packed W; x must have sz's dtype."""
    if x.is_cuda:
        return torch._weight_int4pack_mm(x, packed, G, sz)
    return torch._weight_int4pack_mm_for_cpu(x, packed, G, sz)


class _WeightOnlyLinear(nn.Module):
    """Shared part of the kernel Linears: activation dtype switching, bias, reshapes."""

    def __init__(self, scales: Tensor, bias: Tensor | None, act_dtype: torch.dtype):
        super().__init__()
        self.scales_fp32 = scales.float()  # master copy (not a buffer: not counted as weight memory twice)
        self.register_buffer("scales", scales.to(act_dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(act_dtype))
        self.act_dtype = act_dtype

    def set_act_dtype(self, dtype: torch.dtype) -> None:
        """Run the kernel on ``dtype`` activations from now on (the scales follow)."""
        self.act_dtype = dtype
        self.scales = self.scales_fp32.to(device=self.scales.device, dtype=dtype)
        if self.bias is not None:
            self.bias = self.bias.to(dtype)

    def _mm(self, x2: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.act_dtype).contiguous()  # (tokens, in)
        y = self._mm(x2)  # (tokens, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], -1).to(x.dtype)


class Int8Linear(_WeightOnlyLinear):
    """A Linear whose weight is int8 with a per-row scale (weight-only quantization)."""

    def __init__(self, codes: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None, act_dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        w, s = int8_weight(codes, scale, zero)
        super().__init__(s.to(device), None if bias is None else bias.to(device), act_dtype)
        self.register_buffer("weight_int8", w.to(device))

    def _mm(self, x2: Tensor) -> Tensor:
        return torch._weight_int8pack_mm(x2, self.weight_int8, self.scales)


class Int4Linear(_WeightOnlyLinear):
    """A Linear whose weight is int4 packed two per byte with per-group scale and zero."""

    def __init__(self, codes: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor, bias: Tensor | None,
                 act_dtype: torch.dtype, device: torch.device | str = "cpu"):
        packed, sz, G = int4_weight(codes, scale, zero, g_idx, device, torch.float32)
        super().__init__(sz, None if bias is None else bias.to(device), act_dtype)
        self.register_buffer("packed", packed)
        self.group = G

    def _mm(self, x2: Tensor) -> Tensor:
        return int4_mm(x2, self.packed, self.group, self.scales)


def set_act_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Switch every kernel Linear of ``model`` to ``dtype`` activations."""
    for m in model.modules():
        if isinstance(m, _WeightOnlyLinear):
            m.set_act_dtype(dtype)


def buffer_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
