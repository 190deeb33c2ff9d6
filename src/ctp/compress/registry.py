"""One entry point for the layer-by-layer driver: ``compress_weight(W, H, n, cfg)``.

Method names (``PruneConfig.method`` / ``QuantConfig.method``) map to small
adapters over the pure kernels in :mod:`ctp.compress.kernels`, registered in the
table of :mod:`ctp.compress.methods`. A new method is one decorated function (here or
in user code); the configs accept every registered name.

Recipe semantics (see :mod:`ctp.compress.config`):

* prune only / quantize only: the one kernel;
* a registered joint recipe (sparsegpt + gptq): one pass (mask, quantize, compensate per column);
* any other pair: prune, then quantize the pruned weights with the mask held fixed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ctp.compress import kernels as K
from ctp.compress.config import CompressConfig, PruneConfig, QuantConfig
from ctp.compress import methods
from ctp.compress.methods import register_joint, register_pruner, register_quantizer, registered_methods
from ctp.compress.weight import CompressedWeight

# registered_methods and register_* are re-exported from ctp.compress.methods for callers
# (W fp32, H or None, n_samples, config) -> CompressedWeight
Pruner = Callable[[Tensor, Tensor | None, int, PruneConfig], CompressedWeight]
# (W fp32, H or None, n_samples, config, keep-mask or None) -> CompressedWeight
Quantizer = Callable[[Tensor, Tensor | None, int, QuantConfig, Tensor | None], CompressedWeight]


def needs_calibration(cfg: CompressConfig) -> bool:
    """Whether the recipe reads calibration data (a Hessian or input norms); magnitude and rtn alone do not."""
    if cfg.joint:
        return True
    return ((cfg.prune is not None and f"prune:{cfg.prune.method}" not in methods.DATA_FREE)
            or (cfg.quant is not None and f"quant:{cfg.quant.method}" not in methods.DATA_FREE))


def needs_norms_only(cfg: CompressConfig) -> bool:
    """Whether the recipe reads only the inputs' norms (H's diagonal): Wanda alone, or with a data-free method."""
    if cfg.joint:
        return False
    needs = [f"prune:{cfg.prune.method}" for _ in [cfg.prune] if cfg.prune is not None]
    needs += [f"quant:{cfg.quant.method}" for _ in [cfg.quant] if cfg.quant is not None]
    data = [m for m in needs if m not in methods.DATA_FREE]
    return bool(data) and all(m in methods.NORMS_ONLY for m in data)


def _need_h(H: Tensor | None, method: str) -> Tensor:
    if H is None:
        raise ValueError(f"{method} needs the layer-input Hessian H")
    return H


@register_pruner("sparsegpt")
def _sparsegpt(W: Tensor, H: Tensor | None, n: int, cfg: PruneConfig, lent=None) -> CompressedWeight:
    return K.sparsegpt(
        W, _need_h(H, "sparsegpt"), cfg.sparsity, cfg.prune_n, cfg.prune_m, cfg.blocksize, cfg.percdamp, lent=lent
    )


@register_pruner("magnitude", data_free=True)
def _magnitude(W: Tensor, H: Tensor | None, n: int, cfg: PruneConfig) -> CompressedWeight:
    return K.magnitude_prune(W, cfg.sparsity, cfg.prune_n, cfg.prune_m)


@register_pruner("wanda", norms_only=True)
def _wanda(W: Tensor, H: Tensor | None, n: int, cfg: PruneConfig) -> CompressedWeight:
    norms = K.input_norms_from_hessian(_need_h(H, "wanda"), n)
    return K.wanda_prune(W, norms, cfg.sparsity, cfg.prune_n, cfg.prune_m)


@register_quantizer("gptq")
def _gptq(W: Tensor, H: Tensor | None, n: int, cfg: QuantConfig, mask: Tensor | None, lent=None) -> CompressedWeight:
    return K.gptq(
        W, _need_h(H, "gptq"), cfg.bits, cfg.group_size, cfg.sym, cfg.act_order, cfg.blocksize, cfg.percdamp,
        mask=mask, lent=lent,
    )  # fmt: skip


@register_quantizer("rtn", data_free=True)
def _rtn(W: Tensor, H: Tensor | None, n: int, cfg: QuantConfig, mask: Tensor | None) -> CompressedWeight:
    return K.rtn_quantize(W, cfg.bits, cfg.group_size, cfg.sym, mask=mask)


@register_joint("sparsegpt", "gptq")
def _sparsegpt_gptq(W: Tensor, H: Tensor | None, n: int, cfg: CompressConfig, lent=None) -> CompressedWeight:
    """SparseGPT's joint mode: each column is masked, then quantized, and the error of both is propagated."""
    p, q = cfg.prune, cfg.quant
    return K.sparsegpt(
        W, _need_h(H, "sparsegpt"), p.sparsity, p.prune_n, p.prune_m, p.blocksize, p.percdamp,
        quant=(q.bits, q.group_size, q.sym), act_order=q.act_order, lent=lent,
    )  # fmt: skip


# the built-in kernels that can take a lent Hessian (compress_weight(..., lend_h=True))
_TAKE_LENT_H = (_sparsegpt, _gptq, _sparsegpt_gptq)
# lent only from this size (2048 inputs in fp32): the copy it saves below is at most 8 MB, and lending and
# restoring cost about 1-3% of a small layer's compression time
LEND_MIN_BYTES = 16 << 20


@contextmanager
def _cpu_threads(device, n: int = 1) -> Iterator[None]:
    """Run the column-by-column OBS loops on one CPU thread.

    Their per-column operations are tiny; with several OpenMP threads the
    synchronisation costs more than the work (measured: 0.18 s on one thread vs
    20 s on two for a 576x576 GPTQ on a loaded 2-core machine, see bench/).
    """
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compress_weight(W: Tensor, H: Tensor | None, n_samples: int, cfg: CompressConfig,
                    lend_h: bool = False) -> CompressedWeight:
    """See :func:`_compress_weight`. With ``lend_h`` the caller lends H's memory for the call: a recipe of one
    built-in OBS kernel (GPTQ, SparseGPT, or both jointly) then factors H where it lies instead of in a copy,
    and H holds its own values again when this returns (an exactly symmetric H only; the result is the same
    bit for bit). At the 5632-wide down projection of a 2,048-wide Llama that is 63 MB less at the peak."""
    with _cpu_threads(W.device):
        return _compress_weight(W, H, n_samples, cfg, lend_h)


def _one_kernel(cfg: CompressConfig) -> Callable | None:
    """The one registered method a recipe runs, or None when it runs two (prune, then quantize)."""
    p, q = cfg.prune, cfg.quant
    if cfg.joint:
        return methods.JOINT[(p.method, q.method)]
    if q is None:
        return methods.PRUNERS[p.method]
    return methods.QUANTIZERS[q.method] if p is None else None


def _compress_weight(W: Tensor, H: Tensor | None, n_samples: int, cfg: CompressConfig,
                     lend_h: bool = False) -> CompressedWeight:
    """Compress one (out, in) weight by ``cfg`` given its input Hessian ``H`` (in, in).

    ``H``/``n_samples`` come from :func:`ctp.compress.kernels.accumulate_hessian`;
    magnitude and rtn ignore them (H may then be None, and ``recon_error`` is
    omitted). Work happens in fp32 on W's device; ``weight`` comes back in W's dtype.
    Stats: ``recon_error`` = trace((W-W') H (W-W')^T), ``sparsity`` (pruned
    fraction by mask, 0 when dense), ``zero_fraction`` (exact zeros in the result),
    plus kernel stats such as ``obs_loss``.
    """
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {tuple(W.shape)}")
    cfg.check_width(W.shape[1])
    Wf = W.float()
    p, q = cfg.prune, cfg.quant
    # act-order factors a permuted copy anyway: nothing to lend; nor for a small H, whose copy costs little
    lend_h = (lend_h and H is not None and H.numel() * H.element_size() >= LEND_MIN_BYTES
              and _one_kernel(cfg) in _TAKE_LENT_H and not (q is not None and q.act_order))
    lent = K.LentHessian.of(H) if lend_h else None
    kw = {} if lent is None else {"lent": lent}
    if cfg.joint:
        res = methods.JOINT[(p.method, q.method)](Wf, H, n_samples, cfg, **kw)
    else:
        res = None
        mask = None
        if p is not None:
            res = methods.PRUNERS[p.method](Wf, H, n_samples, p, **kw)
            Wf, mask = res.weight, res.mask  # quantize what the pruner left (fp32)
        if q is not None:
            prune_stats = {} if res is None else res.stats or {}
            res = methods.QUANTIZERS[q.method](Wf, H, n_samples, q, mask, **kw)
            res.stats = {**{f"prune_{k}": v for k, v in prune_stats.items()}, **(res.stats or {})}
    assert res is not None
    if lent is not None:
        lent.restore()  # the kernel may have factored H where it lies
        kw.clear()
        del lent  # its copy of the lower triangle

    weight = res.weight.to(W.dtype)
    stats = dict(res.stats or {})
    stats.setdefault("sparsity", 0.0)
    stats["zero_fraction"] = float((weight == 0).float().mean())
    if H is not None:
        stats["recon_error"] = K.reconstruction_error(W, weight, H.to(W.device))
    else:  # data-free: the weight's own relative error ||W - W'||^2 / ||W||^2
        ref = W.float()
        stats["weight_rel_error"] = float(((ref - weight.float()) ** 2).sum() / (ref ** 2).sum().clamp_min(1e-30))
    return dataclasses.replace(res, weight=weight, perm=None, stats=stats)


__all__ = [
    "Pruner",
    "Quantizer",
    "compress_weight",
    "needs_calibration",
    "register_joint",
    "register_pruner",
    "register_quantizer",
    "registered_methods",
]
