"""The one type of a compressed weight: what every kernel returns, the driver records and the artifact stores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from ctp.compress.quant import dequantize


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
        """The fp32 weight recomputed from the stored payload (codes/mask, or weight)."""
        if self.codes is None:
            w = self.weight.float()
            return w if self.mask is None else w * self.mask
        assert self.scale is not None and self.zero is not None and self.g_idx is not None
        g = self.g_idx.long()
        w = dequantize(self.codes, self.scale[:, g], self.zero[:, g])  # (out, in)
        return w if self.mask is None else w * self.mask


__all__ = ["CompressedWeight"]
