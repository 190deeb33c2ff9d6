"""Configuration of one compression run: what to prune, what to quantize, on what data.

Three frozen dataclasses, each validated on construction (``__post_init__``) so a
bad setting fails at the CLI / YAML boundary with a :class:`~ctp.errors.CTPError`
that names the problem and its fix, never deep inside a kernel.

Conventions decided here (the kernels and the driver rely on them):

* **N:M sparsity.** ``prune_n`` is the number of weights *kept* in every group of
  ``prune_m`` consecutive input channels of a row (NVIDIA's convention: 2:4 keeps 2
  of 4, 1:4 keeps 1 of 4). When both are > 0 the pattern wins and ``sparsity`` is
  overwritten with the fraction it actually prunes, ``(m - n) / m``, so the
  recorded config always states the achieved sparsity.
* **Unstructured sparsity** is exact per output row: every row loses
  ``round(sparsity * in_features)`` weights (halves round up).
* **Pruning + quantization.** When the pruner is ``sparsegpt`` and the quantizer is
  ``gptq`` the two run *jointly* in one OBS pass (SparseGPT's joint mode: each
  column is masked, then quantized, and the error of both is propagated). That
  pass uses the prune config's ``blocksize`` and ``percdamp``; the quant config
  must agree on them. Every other combination runs *sequentially*: prune first,
  then quantize with the mask held fixed (GPTQ keeps pruned weights at zero and
  compensates for them; RTN quantizes the pruned matrix).
* ``QuantConfig.true_sequential`` is carried out by the driver (quantize a block's
  sub-layers in execution order, re-collecting inputs in between; the kernels ignore
  it) but lives in the recipe: it changes the weights a recipe produces, so every
  artifact and cache key must record it, as GPTQ's reference records it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ctp.compress import methods
from ctp.errors import CTPError

# The version of the compression arithmetic: bumped whenever a change alters the weights a recipe produces
# (Hessian batching, dampening, rounding). Recorded in every artifact and part of every cache key, so
# `ctp run` and `ctp compress` resume never mix results of two versions.
ALGORITHM_VERSION = 2

MIN_SPARSITY = 1 / 32  # below it, fp32 values of the kept weights + a 1-bit mask take more than dense fp32
QUANT_BITS = (2, 3, 4, 8)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_int(name: str, value: Any, *, low: int, fix: str) -> None:
    """Require an integer ``value >= low``."""
    if not _is_int(value) or value < low:
        raise CTPError(f"{name} {value!r} must be an integer >= {low}", fix)


def _check_percdamp(percdamp: Any) -> None:
    if not _is_number(percdamp) or not 0 <= percdamp < 1:
        raise CTPError(
            f"percdamp {percdamp!r} is outside [0, 1)",
            "pass a small fraction of the mean Hessian diagonal such as 0.01",
        )


def _pct(fraction: float) -> str:
    """0.5 -> '50', 0.625 -> '62.5' (for labels)."""
    return f"{fraction * 100:.4g}"


def _from_dict(cls: type, d: Any, what: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting keys it does not have."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise CTPError(f"{what} must be a mapping, got {type(d).__name__}", "write it as key: value pairs")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            raise CTPError(f"unknown key {key!r} in {what}", f"valid keys are: {', '.join(names)}")
    return cls(**d)


@dataclass(frozen=True)
class PruneConfig:
    """How to prune: the method, the amount (unstructured or N:M) and the OBS settings.

    ``blocksize`` and ``percdamp`` are used by ``sparsegpt`` only (the baselines have
    no Hessian inverse). With N:M, ``sparsity`` is set to ``(m - n) / m``.
    """

    method: str = "sparsegpt"  # sparsegpt | magnitude | wanda
    sparsity: float = 0.5  # fraction of weights removed per row, in (0, 1)
    prune_n: int = 0  # N:M: keep prune_n of every prune_m consecutive inputs (both > 0)
    prune_m: int = 0
    blocksize: int = 128  # columns per lazy OBS block (sparsegpt)
    percdamp: float = 0.01  # Hessian dampening, fraction of mean(diag H)

    def __post_init__(self) -> None:
        if self.method not in methods.PRUNERS:
            raise CTPError(f"unknown prune method {self.method!r}", f"use one of: {', '.join(methods.PRUNERS)}")
        if not _is_number(self.sparsity) or not 0 < self.sparsity < 1:
            raise CTPError(f"sparsity {self.sparsity!r} is outside (0, 1)", "pass a fraction such as 0.5")

        _check_int("prune_n", self.prune_n, low=0, fix="use 0 for unstructured pruning or e.g. 2 for 2:4")
        _check_int("prune_m", self.prune_m, low=0, fix="use 0 for unstructured pruning or e.g. 4 for 2:4")
        _check_int("blocksize", self.blocksize, low=1, fix="use a positive column count such as 128")
        _check_percdamp(self.percdamp)
        if (self.prune_n > 0) != (self.prune_m > 0):
            raise CTPError(
                f"N:M sparsity needs both prune_n and prune_m, got {self.prune_n}:{self.prune_m}",
                "set both (e.g. 2 and 4 for 2:4) or both to 0 for unstructured pruning",
            )
        if self.nm:
            if not self.prune_n < self.prune_m:
                raise CTPError(
                    f"N:M pattern {self.prune_n}:{self.prune_m} needs 0 < N < M",
                    "N is the number of weights kept per group of M, e.g. 2:4",
                )
            if self.blocksize % self.prune_m != 0:
                raise CTPError(
                    f"blocksize {self.blocksize} is not a multiple of M={self.prune_m}",
                    f"use a blocksize divisible by {self.prune_m}, such as 128",
                )
            # The pattern decides the sparsity; record what it achieves.
            object.__setattr__(self, "sparsity", (self.prune_m - self.prune_n) / self.prune_m)
        object.__setattr__(self, "sparsity", float(self.sparsity))
        object.__setattr__(self, "percdamp", float(self.percdamp))

    @property
    def nm(self) -> bool:
        """True for an N:M semi-structured pattern."""
        return self.prune_n > 0 and self.prune_m > 0

    def check_width(self, in_features: int) -> None:
        """Raise CTPError if an N:M pattern cannot tile a layer ``in_features`` wide."""
        if self.nm and in_features % self.prune_m != 0:
            raise CTPError(
                f"N:M pattern {self.prune_n}:{self.prune_m} does not tile a layer with {in_features} inputs",
                f"pick an M that divides {in_features}",
            )

    def label(self) -> str:
        """'sparsegpt50', '2:4-wanda'."""
        if self.nm:
            return f"{self.prune_n}:{self.prune_m}-{self.method}"
        return f"{self.method}{_pct(self.sparsity)}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneConfig:
        return _from_dict(cls, d, "prune config")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: method, bit width, grouping, grid symmetry and GPTQ settings.

    ``group_size=-1`` gives one (scale, zero) per output row; otherwise one per row
    and per ``group_size`` input channels (must divide the layer width, see
    :meth:`check_width`). ``act_order``, ``blocksize`` and ``percdamp`` are GPTQ's.
    """

    method: str = "gptq"  # gptq | rtn
    bits: int = 4  # one of 2, 3, 4, 8
    group_size: int = -1  # -1: per output channel; else input channels per group
    sym: bool = False  # symmetric grid (zero point fixed at 2**(bits-1))
    act_order: bool = False  # GPTQ: quantize columns by descending Hessian diagonal
    true_sequential: bool = True  # driver: quantize sub-layers in execution order
    blocksize: int = 128  # columns per lazy GPTQ block
    percdamp: float = 0.01  # Hessian dampening, fraction of mean(diag H)

    def __post_init__(self) -> None:
        if self.method not in methods.QUANTIZERS:
            raise CTPError(f"unknown quant method {self.method!r}", f"use one of: {', '.join(methods.QUANTIZERS)}")
        if not _is_int(self.bits) or self.bits not in QUANT_BITS:
            raise CTPError(f"bits {self.bits!r} is not supported", f"use one of: {', '.join(map(str, QUANT_BITS))}")
        if not _is_int(self.group_size) or not (self.group_size == -1 or self.group_size > 0):
            raise CTPError(
                f"group_size {self.group_size!r} must be -1 or a positive integer",
                "use -1 for per-channel quantization or e.g. 128",
            )
        for name in ("sym", "act_order", "true_sequential"):
            if not isinstance(getattr(self, name), bool):
                raise CTPError(f"{name} {getattr(self, name)!r} must be true or false", f"set {name} to a boolean")
        _check_int("blocksize", self.blocksize, low=1, fix="use a positive column count such as 128")
        _check_percdamp(self.percdamp)
        if self.method == "rtn" and self.act_order:
            raise CTPError("act_order has no meaning for rtn quantization", "set act_order false or use gptq")
        object.__setattr__(self, "percdamp", float(self.percdamp))

    def check_width(self, in_features: int) -> None:
        """Raise CTPError unless ``group_size`` divides a layer ``in_features`` wide."""
        if self.group_size > 0 and in_features % self.group_size != 0:
            raise CTPError(
                f"group_size {self.group_size} does not divide a layer with {in_features} inputs",
                f"pick a group size that divides {in_features} or use -1",
            )

    def label(self) -> str:
        """'gptq4', 'gptq3g128', 'rtn4g64-sym', 'gptq4-act'."""
        s = f"{self.method}{self.bits}"
        if self.group_size > 0:
            s += f"g{self.group_size}"
        if self.sym:
            s += "-sym"
        if self.act_order:
            s += "-act"
        return s

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        return _from_dict(cls, d, "quant config")


ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")  # CompressConfig.activations: names of torch dtypes


@dataclass(frozen=True)
class CompressConfig:
    """A whole compression recipe: pruning and/or quantization plus calibration data.

    ``joint`` is True when the pruning and quantization run in one SparseGPT pass
    (sparsegpt + gptq); otherwise they run in sequence (see the module docstring).
    """

    prune: PruneConfig | None = None
    quant: QuantConfig | None = None
    nsamples: int = 128  # calibration sequences
    seqlen: int = 2048  # tokens per calibration sequence
    calib_dataset: str = "c4"
    seed: int = 0  # calibration sampling seed
    # the dtype the calibration activations are kept in between blocks (each block computes in the model's dtype);
    # float16/bfloat16 halve their memory (measured effect: bench/README.md, "Calibration activations in 16 bits")
    activations: str = "float32"

    def __post_init__(self) -> None:
        # Accept nested mappings so that YAML/JSON maps one-to-one onto the config.
        if isinstance(self.prune, dict):
            object.__setattr__(self, "prune", PruneConfig.from_dict(self.prune))
        if isinstance(self.quant, dict):
            object.__setattr__(self, "quant", QuantConfig.from_dict(self.quant))
        if self.prune is not None and not isinstance(self.prune, PruneConfig):
            raise CTPError(f"prune must be a prune config, got {type(self.prune).__name__}", "pass a mapping or null")
        if self.quant is not None and not isinstance(self.quant, QuantConfig):
            raise CTPError(f"quant must be a quant config, got {type(self.quant).__name__}", "pass a mapping or null")
        if self.prune is None and self.quant is None:
            raise CTPError("nothing to compress: neither prune nor quant is set", "give a prune and/or a quant config")
        if self.prune is not None and self.quant is None and self.prune.sparsity < MIN_SPARSITY:
            raise CTPError(f"sparsity {self.prune.sparsity} removes almost nothing, and the 1-bit mask then costs more "
                           f"than it saves (below {MIN_SPARSITY:.4f}, 32-bit kept values + mask exceed dense fp32)",
                           "pass a sparsity of 0.05 or more, or quantize instead")
        _check_int("nsamples", self.nsamples, low=1, fix="use e.g. 128 calibration sequences")
        _check_int("seqlen", self.seqlen, low=1, fix="use e.g. 2048 tokens")
        _check_int("seed", self.seed, low=0, fix="use a non-negative integer")
        if not isinstance(self.calib_dataset, str) or not self.calib_dataset:
            raise CTPError(f"calib_dataset {self.calib_dataset!r} must be a dataset name", "use e.g. c4")
        if self.activations not in ACTIVATION_DTYPES:
            raise CTPError(f"activations {self.activations!r} is not a storage dtype",
                           f"use one of {', '.join(ACTIVATION_DTYPES)}")
        if self.joint:
            p, q = self.prune, self.quant
            assert p is not None and q is not None
            if (p.blocksize, p.percdamp) != (q.blocksize, q.percdamp):
                raise CTPError(
                    "the joint sparsegpt+gptq pass needs one blocksize and percdamp, "
                    f"but prune has {p.blocksize}/{p.percdamp} and quant has {q.blocksize}/{q.percdamp}",
                    "set the same blocksize and percdamp in both",
                )
            if p.nm and q.act_order:
                raise CTPError(
                    "act_order would scramble the N:M groups in the joint sparsegpt+gptq pass",
                    "set quant.act_order false or prune unstructured",
                )

    @property
    def joint(self) -> bool:
        """Prune and quantize in one pass: the pair has a registered joint recipe (sparsegpt + gptq)."""
        return (self.prune is not None and self.quant is not None
                and (self.prune.method, self.quant.method) in methods.JOINT)

    def check_width(self, in_features: int) -> None:
        """Raise CTPError if this recipe cannot be applied to a layer ``in_features`` wide."""
        if self.prune is not None:
            self.prune.check_width(in_features)
        if self.quant is not None:
            self.quant.check_width(in_features)

    def label(self) -> str:
        """'sparsegpt50+gptq4', 'gptq3g128', '2:4-wanda'."""
        parts = [c.label() for c in (self.prune, self.quant) if c is not None]
        return "+".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # nested configs become dicts, None stays None
        if d["activations"] == "float32":  # the default is left out: recipes recorded before it keep their keys
            del d["activations"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressConfig:
        return _from_dict(cls, d, "compress config")
