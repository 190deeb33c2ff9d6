"""Straightforward baselines the benchmarks measure the library against.

* :func:`obs_unblocked`: SparseGPT / GPTQ without lazy batching. Each column's error is
  applied at once to *all* remaining columns of the full matrix (a rank-1 update over
  ``W[:, i:]``, done in place by BLAS ``ger`` through ``addr_``), the textbook OBS loop. It is the same math as
  :func:`ctp.compress.kernels.sparsegpt` / :func:`~ctp.compress.kernels.gptq`:

  - the unstructured mask is still chosen every ``blocksize`` columns (that is part of
    SparseGPT's algorithm, not of its batching), from the then-current weights with the
    same per-row quota; with every earlier update already applied, these weights equal
    the blocked kernel's ``W1`` at the start of its block;
  - a quantization group's grid is fitted when its first column comes up, to the
    current weights. The blocked kernel fits it to the weights *at the start of the
    block*, so the two agree exactly when groups start on block boundaries
    (``group_size == -1`` or a multiple of ``blocksize``), the settings benchmarked.

  Dead inputs, dampening and the upper Cholesky factor of ``H^-1`` are computed here
  independently of :func:`ctp.compress.kernels.prepare_hessian` (no retries, no act-order).
  The quantization grid itself (min/max, rounding) is the library's definition,
  imported from :mod:`ctp.compress.quant`.
* :func:`rtn_nearest`: round-to-nearest written as the GPTQ reference code's ``--nearest`` path does
  it: a loop over the linears of every block, each row (or group) quantized on its min/max grid
  (zero included), with no calibration data.
* :func:`hessian_per_sample`: GPTQ's ``add_batch`` called once per calibration sequence.
* :func:`hessian_per_token`: the definition ``H = 2/n sum_t x_t x_t^T``, one rank-1 update
  per token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ctp.compress.quant import dequantize, max_code, quant_params, quantize_int


def _n_pruned(width: int, sparsity: float) -> int:
    return int(math.floor(width * sparsity + 0.5))


def hinv_upper(H: Tensor, percdamp: float) -> tuple[Tensor, Tensor]:
    """(upper Cholesky factor of (H + damp I)^-1, dead-input mask) for H (in, in)."""
    H = H.float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += percdamp * torch.diagonal(H).mean()
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    return U, dead


def obs_unblocked(
    W: Tensor,
    H: Tensor,
    *,
    sparsity: float = 0.0,
    bits: int | None = None,
    group_size: int = -1,
    sym: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Prune (``sparsity > 0``, unstructured) and/or quantize (``bits``) column by column.

    Returns (weight fp32 (out, in), keep mask bool (out, in), codes uint8 or None).
    """
    rows, cols = W.shape
    U, dead = hinv_upper(H, percdamp)
    W = W.float().clone()
    W[:, dead] = 0
    Q = torch.zeros_like(W)
    keep = torch.ones_like(W, dtype=torch.bool)
    codes = None if bits is None else torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    d = torch.diagonal(U)  # (cols,)
    scale = zero = None
    if bits is not None and group_size == -1:
        scale, zero = quant_params(W, bits, sym)  # (rows, 1) per-row grid of the initial weights
    for i in range(cols):
        if sparsity > 0 and i % blocksize == 0:
            j = min(i + blocksize, cols)
            k = _n_pruned(j, sparsity) - _n_pruned(i, sparsity)
            score = W[:, i:j] ** 2 / d[None, i:j] ** 2  # (rows, j - i)
            drop = torch.topk(score, k, dim=1, largest=False).indices  # (rows, k)
            keep[:, i:j].scatter_(1, drop, False)
        w = W[:, i]  # (rows,)
        q = torch.where(keep[:, i], w, torch.zeros((), device=W.device))
        if bits is not None:
            if group_size > 0 and i % group_size == 0:
                vals = W[:, i : i + group_size] * keep[:, i : i + group_size]  # (rows, group_size)
                scale, zero = quant_params(vals, bits, sym)
            assert scale is not None and zero is not None
            code = quantize_int(q[:, None], scale, zero, max_code(bits))  # (rows, 1)
            codes[:, i] = code[:, 0]  # type: ignore[index]
            q = dequantize(code, scale, zero)[:, 0]
        Q[:, i] = q
        err = (w - q) / d[i]  # (rows,)
        W[:, i:].addr_(err, U[i, i:], alpha=-1)  # rank-1 update (BLAS ger) of every remaining column
    return Q, keep, codes


def hessian_per_sample(X: Tensor) -> Tensor:
    """``2/n sum x x^T`` of X (n, T, in) by GPTQ's ``add_batch``, one sequence per call (fp32)."""
    d = X.shape[-1]
    H = torch.zeros(d, d, dtype=torch.float32, device=X.device)
    n = 0
    for x in X:  # (T, in)
        H *= n / (n + 1)
        n += 1
        xt = math.sqrt(2 / n) * x.t().float()  # (in, T)
        H += xt @ xt.t()
    return H


def hessian_per_token(X: Tensor) -> Tensor:
    """``2/n sum_t x_t x_t^T`` of X (n, T, in), one rank-1 update per token (fp32)."""
    d = X.shape[-1]
    H = torch.zeros(d, d, dtype=torch.float32, device=X.device)
    for x in X.reshape(-1, d).float():  # (in,)
        H.addr_(x, x)
    return H.mul_(2 / X.shape[0])


@torch.no_grad()
def rtn_nearest(weights: list[Tensor], bits: int, group_size: int) -> list[Tensor]:
    """Round-to-nearest of each (out, in) weight, groups of ``group_size`` columns (-1: per row), as the
    GPTQ reference's ``--nearest`` does: grid from each group's min/max widened to include 0."""
    maxq = 2**bits - 1
    out = []
    for W in weights:
        W = W.float()
        Q = torch.empty_like(W)
        g = W.shape[1] if group_size == -1 else group_size
        for c in range(0, W.shape[1], g):
            w = W[:, c:c + g]
            xmin = torch.minimum(w.min(1).values, torch.zeros(w.shape[0]))
            xmax = torch.maximum(w.max(1).values, torch.zeros(w.shape[0]))
            same = (xmin == 0) & (xmax == 0)
            xmin[same], xmax[same] = -1, 1
            scale = ((xmax - xmin) / maxq).unsqueeze(1)
            zero = torch.round(-xmin / scale.squeeze(1)).unsqueeze(1)
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            Q[:, c:c + g] = scale * (q - zero)
        out.append(Q)
    return out

