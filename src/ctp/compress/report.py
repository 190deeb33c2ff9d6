"""What a compression run did: the report the driver returns and the artifact records."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctp.compress.weight import CompressedWeight


@dataclass
class CompressionReport:
    """What a compression run did: config, per-layer / per-linear statistics and totals.

    ``compressed`` maps each compressed module's full name to its
    :class:`~ctp.compress.weight.CompressedWeight` (codes, masks, scales: what the
    artifact stores); it is not part of :meth:`to_dict`.
    """

    config: dict
    label: str
    model_type: str
    calibration: dict
    layers: list[dict] = field(default_factory=list)  # per block: index, seconds, linears {name: stats}
    seconds: float = 0.0
    sparsity: float = 0.0  # achieved pruned fraction (by mask) over all compressed linears
    zero_fraction: float = 0.0  # exact zeros in the compressed linears (pruned or rounded to 0)
    bits: int | None = None
    n_params: int = 0  # weights in the compressed linears
    mean_recon_error: float = float("nan")  # mean of trace((W-W')H(W-W')^T) over linears
    mean_rel_error: float = float("nan")  # mean of recon_error / trace(W H W^T)
    compressed: dict[str, CompressedWeight] = field(default_factory=dict, repr=False)

    def linear_stats(self) -> dict[str, dict]:
        """Flat ``{module name: stats}`` over all blocks."""
        return {name: s for layer in self.layers for name, s in layer["linears"].items()}

    def summary(self) -> dict:
        """The headline numbers (no per-linear detail)."""
        return {
            "label": self.label,
            "model_type": self.model_type,
            "seconds": self.seconds,
            "sparsity": self.sparsity,
            "zero_fraction": self.zero_fraction,
            "bits": self.bits,
            "n_params": self.n_params,
            "n_linears": len(self.linear_stats()),
            "mean_recon_error": self.mean_recon_error,
            "mean_rel_error": self.mean_rel_error,
        }

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "calibration": self.calibration,
            **self.summary(),
            "layers": self.layers,
        }
