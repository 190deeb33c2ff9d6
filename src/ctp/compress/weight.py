"""The one type of a compressed weight: what every kernel returns, the driver records and the artifact stores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ctp.compress.quant import dequantize


_REBUILD_ELEMENTS = 1 << 20  # weights rebuilt per step (4 MB of fp32)


@dataclass
class CompressedWeight:
    """A compressed weight and everything needed to store and rebuild it.

    ``weight`` is what the model uses (W's dtype). For quantized results,
    ``rebuild()`` recomputes it from the integer payload; in fp32 the two are
    bitwise identical: ``dequantize(codes, scale[:, g_idx], zero[:, g_idx]) * mask
    == weight`` (``* mask`` only when ``mask`` is not None). Quant fields are None
    for pure pruning, ``mask`` is None for a dense result.
    """

    weight: Tensor  # (out, in) dense compressed weight, W's dtype
    mask: Tensor | None = None  # (out, in) bool, True = kept; None when dense
    codes: Tensor | None = None  # (out, in) uint8 codes < 2**bits, original column order; None when not quantized
    scale: Tensor | None = None  # (out, n_groups) fp32
    zero: Tensor | None = None  # (out, n_groups) fp32 holding integers in [0, 2**bits - 1]
    g_idx: Tensor | None = None  # (in,) int32 group of each input column
    bits: int | None = None
    sym: bool | None = None
    perm: Tensor | None = None  # (in,) int64 act-order processing order (a kernel's record; not stored)
    stats: dict = field(default_factory=dict)  # recon_error, sparsity, zero_fraction, obs_loss, ...

    PAYLOAD: ClassVar[tuple[str, ...]] = ("mask", "codes", "scale", "zero", "g_idx")  # the stored tensors but weight

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    def rebuild(self) -> Tensor:
        """The fp32 weight recomputed from the stored payload (codes/mask, or weight). Quantized weights are
        rebuilt a few rows at a time into the result (the same values: every step is elementwise), so the
        temporaries stay small beside it."""
        if self.codes is None:
            w = self.weight.float()
            return w if self.mask is None else w * self.mask
        assert self.scale is not None and self.zero is not None and self.g_idx is not None
        g = self.g_idx.long()
        rows, cols = self.codes.shape
        out = torch.empty(rows, cols, dtype=torch.float32, device=self.codes.device)
        step = max(1, _REBUILD_ELEMENTS // max(cols, 1))
        for r in range(0, rows, step):
            s = slice(r, r + step)
            w = dequantize(self.codes[s], self.scale[s][:, g], self.zero[s][:, g])  # (step, in)
            out[s] = w if self.mask is None else w * self.mask[s]
        return out


__all__ = ["CompressedWeight"]
