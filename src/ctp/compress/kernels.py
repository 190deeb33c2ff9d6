"""Pure compression kernels for one linear layer: tensors in, tensors out.

Every kernel takes a weight ``W`` of shape (out_features, in_features), computes in
fp32 on W's device and returns a :class:`~ctp.compress.weight.CompressedWeight` whose ``weight`` has W's dtype.
``H`` is the layer-input Hessian proxy ``2/n * sum x x^T`` of shape (in, in) built by
:func:`accumulate_hessian`. Nothing here loads models, hooks modules or does I/O.

* :func:`magnitude_prune`, :func:`wanda_prune`: one-shot masks by a score
  (|w|, or |w| * ||x_j|| for Wanda), compared within each output row.
* :func:`rtn_quantize`: round-to-nearest on GPTQ's min/max grid.
* :func:`sparsegpt` (Frantar & Alistarh 2023) and :func:`gptq` (Frantar et al. 2022):
  the blocked optimal-brain-surgeon update. Both are the same column loop,
  :func:`_obs_compress`: for each column, choose what it becomes (0 if pruned,
  its grid point if quantized), then spread the resulting error over the columns
  not yet processed through the upper Cholesky factor of H^-1. SparseGPT picks the
  mask per block (or per M columns for N:M) by ``w^2 / diag(H^-1)^2``; GPTQ keeps
  every weight (or a given mask) and quantizes; SparseGPT's joint mode does both.

Sparsity convention: unstructured pruning removes exactly
``n_pruned(in_features, sparsity)`` weights from every row; N:M keeps ``prune_n``
of every ``prune_m`` consecutive inputs of a row. Masks are bool, True = kept.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ctp.compress.quant import dequantize, max_code, quant_params, quantize_int
from ctp.compress.weight import CompressedWeight
from ctp.errors import CTPError

# Cholesky attempts before giving up; dampening grows 10x per retry.
_CHOLESKY_TRIES = 5


class PreparedHessian(NamedTuple):
    """Output of :func:`prepare_hessian`."""

    hinv: Tensor  # (in, in) upper Cholesky factor of (H + damp I)^-1, in processing order
    dead: Tensor  # (in,) bool: inputs never active (H[i, i] == 0), original order
    perm: Tensor | None  # (in,) processing order (act-order), or None for identity
    percdamp: float  # dampening actually used (after retries)


# --------------------------------------------------------------------------- Hessian


# The in-place Hessian update computes X X^T by bands of rows once it is wider than one band: at most this many
# elements per band, whole multiples of 256 rows and never fewer than 512. Up to 2048 inputs it is one product, as
# before; at 2304-14336 inputs and 512 or 4096 tokens each band came out bit for bit the rows of the whole product
# on an AVX-512 Xeon with the MKL in torch 2.13 (a BLAS is free to round a narrower product differently elsewhere).
_PRODUCT_ELEMENTS = 4 << 20
_PRODUCT_MIN_ROWS = 512


def accumulate_hessian(
    H: Tensor | None, nsamples_seen: int, x: Tensor, inplace: bool = False, consume: bool = False
) -> tuple[Tensor, int]:
    """Fold a batch of layer inputs into the running ``H = 2/n * sum x x^T`` (fp32).

    Exactly GPTQ/SparseGPT's ``add_batch``: ``x`` is (in,) or (tokens, in) for one
    sample, or (batch, ..., tokens, in) for ``batch * ...`` samples; ``n`` counts
    samples (sequences), not tokens. The old sum is rescaled by n_old / n_new.
    Pass ``H=None`` for the first batch. Returns the new ``(H, n)``; the input H is
    left untouched unless ``inplace``: then the result is written into it, the same values
    bit for bit, and a batch holds H and one band of X X^T instead of four (in, in) matrices (a driver's saving).
    With ``consume`` the caller gives up ``x``: it is scaled in place (an fp32 ``x`` is overwritten) instead of
    copied, the same values bit for bit, one (tokens, in) matrix less at the update.
    """
    if x.dim() == 1:
        x = x[None]  # (1, in)
    batch = 1 if x.dim() == 2 else math.prod(x.shape[:-2])
    xt = x.reshape(-1, x.shape[-1]).t().float()  # (in, tokens)
    if H is None:
        H = torch.zeros(xt.shape[0], xt.shape[0], dtype=torch.float32, device=x.device)
    n = nsamples_seen + batch
    xt = xt.mul_(math.sqrt(2 / n)) if consume else math.sqrt(2 / n) * xt  # same layout and values either way
    if not inplace:
        return H * (nsamples_seen / n) + xt @ xt.t(), n
    # (H * a) + X X^T in the same two roundings as above, not one fused addmm; a wide X X^T goes a band of rows
    # at a time through one buffer instead of beside H whole (at 5632 inputs 12 MB instead of 127 MB).
    a, d = nsamples_seen / n, xt.shape[0]
    rows = max(_PRODUCT_MIN_ROWS, (_PRODUCT_ELEMENTS // d) // 256 * 256)
    if rows >= d:
        return H.mul_(a).add_(xt @ xt.t()), n
    band = torch.empty(rows, d, dtype=H.dtype, device=H.device)
    for r0 in range(0, d, rows):
        r1 = min(d, r0 + rows)
        torch.mm(xt[r0:r1], xt.t(), out=band[: r1 - r0])
        H[r0:r1].mul_(a).add_(band[: r1 - r0])
    return H, n


def accumulate_sq_norms(d: Tensor | None, nsamples_seen: int, x: Tensor) -> tuple[Tensor, int]:
    """The diagonal of :func:`accumulate_hessian`'s ``H`` alone, ``2/n * sum x_j^2`` (in,) fp32, for methods that
    read only the inputs' norms (Wanda): O(in) memory and work per token instead of O(in^2)."""
    if x.dim() == 1:
        x = x[None]
    batch = 1 if x.dim() == 2 else math.prod(x.shape[:-2])
    sq = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)  # (in,)
    n = nsamples_seen + batch
    if d is None:
        return sq * (2 / n), n
    return d * (nsamples_seen / n) + sq * (2 / n), n


def input_norms_from_hessian(H: Tensor, n: int) -> Tensor:
    """Per-input-channel ``sum x_j^2`` over all calibration tokens: ``diag(H) * n / 2`` (``H`` (in, in), or its
    diagonal (in,) from :func:`accumulate_sq_norms`)."""
    return (H if H.dim() == 1 else torch.diagonal(H)).float() * (n / 2)


def reconstruction_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """``trace((W - W') H (W - W')^T)``: equals ``2/n ||W X - W' X||^2`` for H of X. With only H's diagonal (in,)
    it is the part of that error the diagonal holds (exact when the input channels are uncorrelated)."""
    return output_energy(W, H, W_new)


def output_energy(W: Tensor, H: Tensor, W_new: Tensor | None = None) -> float:
    """``trace(D H D^T)`` for ``D = W - W_new`` (``D = W`` without ``W_new``), in fp32: for H of inputs X, the
    energy ``2/n ||D X||^2`` of D's outputs (H's diagonal (in,) gives the part the diagonal holds).

    A band of rows at a time (about ``_PRODUCT_ELEMENTS`` values), so it holds two band-sized matrices instead of
    two the size of W beside W and W_new; each band's sum is added in double precision."""
    rows = max(1, _PRODUCT_ELEMENTS // max(1, W.shape[1]))
    Hf = H.float()
    total = 0.0
    for r0 in range(0, W.shape[0], rows):
        D = W[r0:r0 + rows].float()
        if W_new is not None:
            D = D - W_new[r0:r0 + rows].float()
        total += float((D * D * Hf).sum()) if H.dim() == 1 else float((D @ Hf).mul_(D).sum())
    return total


def _chol_inv_upper_(H: Tensor) -> Tensor | None:
    """Upper Cholesky factor of H^-1, computed in H's own memory (H is overwritten), or None if H is not
    (numerically) positive definite. LAPACK factors in place anyway: the results are those of the out-of-place
    calls. Given a row-major H, torch's calls would each work in a column-major copy of it; for an H equal to its
    transpose bit for bit, ``H.mT`` already is that column-major matrix, so the three calls run in H's memory (the
    same LAPACK calls on the same values: the same bits) and one blockwise transpose (copies only) gives the
    row-major factor. An (in, in) matrix then costs itself plus a band of rows at the peak, not two of its size."""
    info = torch.empty((), dtype=torch.int32, device=H.device)
    col = H.mT if H.is_contiguous() and _symmetric(H) else H  # column-major view, or torch's own copies
    torch.linalg.cholesky_ex(col, out=(col, info))  # L
    if int(info) != 0:
        return None
    torch.cholesky_inverse(col, out=col)  # (L L^T)^-1
    torch.linalg.cholesky_ex(col, upper=True, out=(col, info))  # U
    if int(info) != 0:
        return None
    if col is not H:
        _transpose_(H)  # H held U^T
    if not all(bool(torch.isfinite(H[r0:r1]).all()) for r0, r1 in _row_spans(H.shape[0])):
        return None
    return H


_SPAN_ROWS = 256  # rows per band where a square matrix is checked, copied or transposed by bands


def _row_spans(n: int) -> list[tuple[int, int]]:
    return [(r0, min(r0 + _SPAN_ROWS, n)) for r0 in range(0, n, _SPAN_ROWS)]


def _symmetric(H: Tensor) -> bool:
    """Whether a square H equals its transpose bit for bit, checked a band of rows at a time (no full copy)."""
    return all(same_bits(H[r0:r1, r0:], H[r0:, r0:r1].mT) for r0, r1 in _row_spans(H.shape[0]))


def _transpose_(H: Tensor) -> Tensor:
    """Transpose a square H in its own memory, by bands of rows (copies only: the values are exact)."""
    for r0, r1 in _row_spans(H.shape[0]):
        diag = H[r0:r1, r0:r1]
        diag.copy_(diag.mT.clone())
        right, below = H[r0:r1, r1:], H[r1:, r0:r1]
        band = right.clone()
        right.copy_(below.mT)
        below.copy_(band.mT)
    return H


def prepare_hessian(H: Tensor, percdamp: float, act_order: bool = False,
                    restore: Callable[[], None] | None = None) -> PreparedHessian:
    """Shared set-up of SparseGPT and GPTQ: dead inputs, act-order, dampening, H^-1.

    Dead inputs (``H[i, i] == 0``) get ``H[i, i] = 1`` (the caller zeroes ``W[:, i]``).
    With ``act_order`` the columns are processed by descending ``diag(H)``. Then
    ``percdamp * mean(diag H)`` is added to the diagonal and the upper Cholesky factor
    of the inverse is taken; if that fails, the dampening is raised 10x (with a
    warning) up to a few times before raising CTPError. ``H`` is left as it was; each
    attempt works on one fresh copy of it. With ``restore`` the caller lends H (see :class:`LentHessian`):
    the first attempt works in H's own memory instead of a copy (fp32, no act-order), and ``restore()`` puts
    H's values back before a retry.
    """
    dead = torch.diagonal(H) == 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H).float().masked_fill(dead, 1), descending=True)
    damp = percdamp
    in_place = restore is not None and perm is None and H.dtype == torch.float32 and H.is_contiguous()
    for attempt in range(_CHOLESKY_TRIES):
        if in_place and attempt > 0:
            restore()  # the first attempt factored H itself
        Hd = H if in_place and attempt == 0 else H.to(torch.float32, copy=True)
        Hd.diagonal()[dead] = 1
        if perm is not None:
            Hd = Hd[perm]
            Hd = Hd[:, perm]  # (in, in) in processing order
        diag = torch.diagonal(Hd)  # a strided view: a contiguous copy would sum the mean in another order
        mean_diag = float(diag.mean())
        diag.copy_(diag + damp * mean_diag)
        U = _chol_inv_upper_(Hd)
        if U is not None:
            if attempt > 0:
                warnings.warn(
                    f"Hessian was not positive definite with percdamp={percdamp}; "
                    f"succeeded with percdamp={damp:g} (use more calibration data or a larger percdamp)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return PreparedHessian(U, dead, perm, damp)
        del Hd, U
        damp = damp * 10 if damp > 0 else 0.01
    raise CTPError(
        f"the Hessian is not positive definite even with percdamp={damp / 10:g}",
        "check the calibration inputs for NaN/inf and use more calibration samples or a larger percdamp",
    )


class LentHessian:
    """A Hessian lent to one kernel call, which may then factor in its memory instead of a copy of it (one
    (in, in) matrix less at the peak); :meth:`restore` puts the values back from an exact copy of the lower
    triangle (a little over half a matrix, kept by blocks of rows). Only for an H equal to its transpose bit for
    bit (:meth:`of` gives None otherwise). Every step copies values, none computes them."""

    def __init__(self, H: Tensor, blocks: list[Tensor]):
        self.H = H
        self._blocks = blocks  # block k: H[r0:r1, :r1], the rows' lower triangle and their diagonal block

    @classmethod
    def of(cls, H: Tensor) -> LentHessian | None:
        if H.dim() != 2 or H.shape[0] != H.shape[1] or not H.is_contiguous():
            return None
        if not _symmetric(H):
            return None
        return cls(H, [H[r0:r1, :r1].clone() for r0, r1 in _row_spans(H.shape[0])])

    def restore(self) -> None:
        """Write H's original values back into its memory."""
        spans = _row_spans(self.H.shape[0])
        for (r0, r1), block in zip(spans, self._blocks):
            self.H[r0:r1, :r1] = block
        for r0, r1 in spans:  # the upper triangle right of each diagonal block, from the lower one below it
            self.H[r0:r1, r1:] = self.H[r1:, r0:r1].mT


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two float tensors of one dtype hold the same bit patterns, not just equal values: -0.0 is not 0.0,
    a NaN equals the same NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(as_int), b.view(as_int))


# --------------------------------------------------------------------------- masks


def n_pruned(width: int, sparsity: float) -> int:
    """Weights removed from a row of ``width`` at ``sparsity``: nearest integer, halves up."""
    return int(math.floor(width * sparsity + 0.5))


def _check_nm(in_features: int, prune_n: int, prune_m: int) -> bool:
    """Validate an N:M request against the width; True when N:M is active."""
    if prune_n == 0 and prune_m == 0:
        return False
    if not 0 < prune_n < prune_m:
        raise CTPError(f"N:M pattern {prune_n}:{prune_m} needs 0 < N < M", "use e.g. 2:4")
    if in_features % prune_m != 0:
        raise CTPError(
            f"N:M pattern {prune_n}:{prune_m} does not tile a layer with {in_features} inputs",
            f"pick an M that divides {in_features}",
        )
    return True


def _check_sparsity(sparsity: float) -> None:
    if not 0 < sparsity < 1:
        raise CTPError(f"sparsity {sparsity} is outside (0, 1)", "pass a fraction such as 0.5")


def _keep_mask(score: Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0) -> Tensor:
    """Bool keep-mask removing the lowest scores of each row (or of each N:M group)."""
    rows, cols = score.shape
    keep = torch.ones_like(score, dtype=torch.bool)
    if _check_nm(cols, prune_n, prune_m):
        g = score.reshape(rows, cols // prune_m, prune_m)  # (rows, groups, M)
        idx = torch.topk(g, prune_m - prune_n, dim=-1, largest=False).indices  # (rows, groups, M-N)
        keep.view(rows, cols // prune_m, prune_m).scatter_(-1, idx, False)
        return keep
    _check_sparsity(sparsity)
    k = n_pruned(cols, sparsity)
    idx = torch.topk(score, k, dim=1, largest=False).indices  # (rows, k)
    keep.scatter_(1, idx, False)
    return keep


def _check_w(W: Tensor, H: Tensor | None = None) -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {tuple(W.shape)}")
    if H is not None and tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"H must be ({W.shape[1]}, {W.shape[1]}), got {tuple(H.shape)}")


def _apply_mask(W: Tensor, keep: Tensor) -> Tensor:
    """W with pruned entries set to +0.0 (``W * keep`` would leave -0.0 behind)."""
    return torch.where(keep, W, torch.zeros((), dtype=W.dtype, device=W.device))


def _prune_stats(keep: Tensor) -> dict:
    return {"sparsity": 1.0 - float(keep.float().mean())}


def magnitude_prune(W: Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0) -> CompressedWeight:
    """Zero the smallest ``|w|`` of every output row (or of every N:M group)."""
    _check_w(W)
    keep = _keep_mask(W.float().abs(), sparsity, prune_n, prune_m)
    return CompressedWeight(weight=_apply_mask(W, keep), mask=keep, stats=_prune_stats(keep))


def wanda_prune(
    W: Tensor, act_norm_sq: Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0
) -> CompressedWeight:
    """Wanda: zero the smallest ``|w_ij| * sqrt(sum_t x_tj^2)`` per output row / N:M group.

    ``act_norm_sq`` (in,) is the per-input sum of squares, e.g.
    :func:`input_norms_from_hessian`.
    """
    _check_w(W)
    score = W.float().abs() * act_norm_sq.float().clamp_min(0).sqrt()[None, :]  # (out, in)
    keep = _keep_mask(score, sparsity, prune_n, prune_m)
    return CompressedWeight(weight=_apply_mask(W, keep), mask=keep, stats=_prune_stats(keep))


# --------------------------------------------------------------------------- RTN


def _group_index(cols: int, group_size: int, device: torch.device) -> Tensor:
    """(cols,) int32 group of each column for contiguous groups (-1: one group)."""
    g = cols if group_size == -1 else group_size
    return (torch.arange(cols, device=device) // g).to(torch.int32)


def _check_group(cols: int, group_size: int) -> None:
    if group_size != -1 and (group_size <= 0 or cols % group_size != 0):
        raise CTPError(
            f"group_size {group_size} does not divide a layer with {cols} inputs",
            f"pick a group size that divides {cols} or use -1",
        )


def rtn_quantize(
    W: Tensor, bits: int, group_size: int = -1, sym: bool = False, mask: Tensor | None = None
) -> CompressedWeight:
    """Round-to-nearest onto a per-row (or per-group) min/max grid.

    With ``mask`` the pruned weights are zeroed first (they then sit exactly on the
    grid's zero) and the grid is fitted to the kept ones.
    """
    _check_w(W)
    rows, cols = W.shape
    _check_group(cols, group_size)
    g = cols if group_size == -1 else group_size
    Wf = W.float() if mask is None else _apply_mask(W.float(), mask)
    Wg = Wf.reshape(rows, cols // g, g)  # (rows, groups, g)
    scale, zero = quant_params(Wg, bits, sym)  # (rows, groups, 1)
    codes = quantize_int(Wg, scale, zero, max_code(bits))  # (rows, groups, g)
    deq = dequantize(codes, scale, zero).reshape(rows, cols)  # (rows, cols)
    if mask is not None:
        deq = deq * mask
    return CompressedWeight(
        weight=deq.to(W.dtype),
        mask=mask,
        codes=codes.reshape(rows, cols),
        scale=scale.squeeze(-1),  # (rows, groups)
        zero=zero.squeeze(-1),
        g_idx=_group_index(cols, group_size, W.device),
        bits=bits,
        sym=sym,
        stats={} if mask is None else _prune_stats(mask),
    )


# --------------------------------------------------------------------------- OBS loop


class _Grid(NamedTuple):
    bits: int
    group_size: int  # -1 or > 0
    sym: bool


def _obs_compress(
    W: Tensor,
    hinv: Tensor,
    blocksize: int,
    *,
    sparsity: float = 0.0,
    prune_n: int = 0,
    prune_m: int = 0,
    fixed_mask: Tensor | None = None,
    grid: _Grid | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, float]:
    """The blocked OBS column loop shared by SparseGPT and GPTQ.

    ``W`` (rows, cols) fp32 and ``hinv`` (cols, cols) are in processing order; ``W`` is updated in place and
    ends as Q, each finished block of columns overwritten by its result (the caller passes its own copy: two
    fewer weight-sized matrices). Masks:
    ``fixed_mask`` if given, else N:M (chosen every M columns), else unstructured with
    ``sparsity > 0`` (chosen per block, an exact per-row quota so every row ends at
    ``n_pruned(cols, sparsity)``), else none. With ``grid`` each column is also
    quantized after masking; a group's grid is fitted when its first column comes up,
    to W as it stood at the start of the current block, pruned weights left out.

    Returns (Q, keep, codes, scale, zero, obs_loss) in processing order, with
    scale/zero (rows, n_groups) and codes (rows, cols) uint8 (None without grid).
    """
    rows, cols = W.shape
    keep = torch.ones_like(W, dtype=torch.bool)
    loss = torch.zeros(rows, dtype=torch.float32, device=W.device)
    nm = prune_n > 0 and fixed_mask is None
    unstructured = sparsity > 0 and not nm and fixed_mask is None

    codes = scales = zeros = None
    scale = zero = None
    maxq = 0
    if grid is not None:
        maxq = max_code(grid.bits)
        codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
        scales, zeros = [], []
        if grid.group_size == -1:  # one grid per row, fitted once up front
            base = W if fixed_mask is None else _apply_mask(W, fixed_mask)
            scale, zero = quant_params(base, grid.bits, grid.sym)  # (rows, 1)
            scales.append(scale)
            zeros.append(zero)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # (rows, count) block being processed
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)  # scaled errors, for the lazy update of later blocks
        Hinv1 = hinv[i1:i2, i1:i2]  # (count, count)
        d1 = torch.diagonal(Hinv1)  # (count,)

        if fixed_mask is not None:
            keep1 = fixed_mask[:, i1:i2].clone()
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
            if unstructured:
                # Adaptive mask selection: prune this block's quota of each row by the
                # OBS saliency w^2 / [H^-1]_jj^2 (quota keeps per-row totals exact).
                k = n_pruned(i2, sparsity) - n_pruned(i1, sparsity)
                score = W1**2 / d1[None, :] ** 2  # (rows, count)
                idx = torch.topk(score, k, dim=1, largest=False).indices  # (rows, k)
                keep1.scatter_(1, idx, False)

        for i in range(count):
            c = i1 + i  # column index in processing order
            if nm and i % prune_m == 0:
                score = W1[:, i : i + prune_m] ** 2 / d1[None, i : i + prune_m] ** 2  # (rows, M)
                idx = torch.topk(score, prune_m - prune_n, dim=1, largest=False).indices
                keep1[:, i : i + prune_m].scatter_(1, idx, False)  # in-place on a view of keep1

            w = W1[:, i]  # (rows,)
            q = torch.where(keep1[:, i], w, torch.zeros((), device=w.device))
            if grid is not None:
                if grid.group_size > 0 and c % grid.group_size == 0:
                    # Fit the group's grid as the reference does: to W as it stood at
                    # the start of this block (not to W1, which carries this block's
                    # updates; that measured worse, notably at 2-3 bits), with the
                    # pruned weights known so far left out.
                    end = c + grid.group_size
                    vals = W[:, c:end].clone()  # (rows, group_size)
                    in_block = min(i2, end) - c
                    vals[:, :in_block] *= keep1[:, i : i + in_block]
                    if fixed_mask is not None and end > i2:
                        vals[:, in_block:] *= fixed_mask[:, i2:end]
                    scale, zero = quant_params(vals, grid.bits, grid.sym)  # (rows, 1)
                    scales.append(scale)
                    zeros.append(zero)
                code = quantize_int(q[:, None], scale, zero, maxq)  # (rows, 1); pruned 0 -> zero
                codes[:, c] = code[:, 0]
                q = dequantize(code, scale, zero)[:, 0]

            Q1[:, i] = q
            d = Hinv1[i, i]
            err = (w - q) / d  # (rows,)
            loss += (w - q) ** 2 / d**2
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]  # OBS update within the block
            Err1[:, i] = err

        W[:, i1:i2] = Q1  # a finished block's columns are never read again: W becomes Q, no second matrix
        keep[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]  # lazy update of all later columns

    if grid is not None:
        scale = torch.cat(scales, dim=1)  # (rows, n_groups)
        zero = torch.cat(zeros, dim=1)
    return W, keep, codes, scale, zero, float(loss.sum()) / 2


def _unpermute(x: Tensor | None, invperm: Tensor | None) -> Tensor | None:
    if x is None or invperm is None:
        return x
    return x[:, invperm]


def _obs_kernel(
    W: Tensor,
    H: Tensor,
    *,
    blocksize: int,
    percdamp: float,
    act_order: bool,
    sparsity: float = 0.0,
    prune_n: int = 0,
    prune_m: int = 0,
    fixed_mask: Tensor | None = None,
    grid: _Grid | None = None,
    lent: LentHessian | None = None,
) -> CompressedWeight:
    """Prepare H, permute, run the OBS loop, un-permute and package the result. With ``lent`` (H's
    :class:`LentHessian`), H may be factored in its own memory: the caller restores it afterwards."""
    _check_w(W, H)
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    rows, cols = W.shape
    Hk = H.to(W.device)
    restore = lent.restore if lent is not None and Hk is H and lent.H is H else None  # a copy is the kernel's own
    prep = prepare_hessian(Hk, percdamp, act_order, restore)
    del Hk
    Wf = W.to(torch.float32, copy=True)  # updated in place by _obs_compress
    Wf[:, prep.dead] = 0  # inputs never seen: nothing to reconstruct, drop them
    mask = fixed_mask
    invperm = None
    if prep.perm is not None:
        Wf = Wf[:, prep.perm]  # (rows, cols) in processing order
        mask = None if mask is None else mask[:, prep.perm]
        invperm = torch.argsort(prep.perm)

    Q, keep, codes, scale, zero, loss = _obs_compress(
        Wf, prep.hinv, blocksize, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m,
        fixed_mask=mask, grid=grid,
    )  # fmt: skip
    Q, keep, codes = (_unpermute(t, invperm) for t in (Q, keep, codes))

    pruning = fixed_mask is not None or sparsity > 0 or prune_n > 0
    g_idx = None
    if grid is not None:
        g = cols if grid.group_size == -1 else grid.group_size
        pos = torch.arange(cols, device=W.device) if invperm is None else invperm  # processing position
        g_idx = (pos // g).to(torch.int32)  # (cols,) group of each original column
    stats = {"obs_loss": loss, "damp": prep.percdamp, "dead_inputs": int(prep.dead.sum())}
    if pruning:
        stats.update(_prune_stats(keep))
    return CompressedWeight(
        weight=Q.to(W.dtype),
        mask=keep if pruning else None,
        codes=codes,
        scale=scale,
        zero=zero,
        g_idx=g_idx,
        bits=None if grid is None else grid.bits,
        sym=None if grid is None else grid.sym,
        perm=prep.perm,
        stats=stats,
    )


def sparsegpt(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    quant: tuple[int, int, bool] | None = None,
    act_order: bool = False,
    lent: LentHessian | None = None,
) -> CompressedWeight:
    """SparseGPT: prune (unstructured or N:M) with blocked OBS weight reconstruction.

    Unstructured masks are chosen per block of ``blocksize`` columns, N:M masks every
    M columns, both by ``w^2 / diag(H^-1)^2``. Unlike the reference (one threshold per
    block over all rows), each row prunes its own quota in each block, so every row
    ends with exactly ``n_pruned(in_features, sparsity)`` zeros. With ``quant=(bits, group_size, sym)``
    every column is quantized right after masking in the same pass (joint mode); the
    result then carries codes/scale/zero/g_idx. ``act_order`` (unstructured only)
    processes columns by descending ``diag(H)``. Stats: ``obs_loss`` (the reference's
    summed "Losses"), ``sparsity``, ``damp``, ``dead_inputs``.
    """
    _check_w(W, H)
    cols = W.shape[1]
    nm = _check_nm(cols, prune_n, prune_m)
    if nm and blocksize % prune_m != 0:
        raise CTPError(f"blocksize {blocksize} is not a multiple of M={prune_m}", "use e.g. 128")
    if nm and act_order:
        raise CTPError("act_order would scramble the N:M groups", "set act_order false for N:M pruning")
    if not nm:
        _check_sparsity(sparsity)
    grid = None
    if quant is not None:
        grid = _Grid(*quant)
        _check_group(cols, grid.group_size)
    return _obs_kernel(
        W, H, blocksize=blocksize, percdamp=percdamp, act_order=act_order,
        sparsity=0.0 if nm else sparsity, prune_n=prune_n, prune_m=prune_m, grid=grid, lent=lent,
    )  # fmt: skip


def gptq(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = False,
    act_order: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask: Tensor | None = None,
    lent: LentHessian | None = None,
) -> CompressedWeight:
    """GPTQ: quantize column by column with lazy-batch OBS error compensation.

    With ``act_order`` columns are processed by descending ``diag(H)`` (``perm``) and
    groups are formed in that order (the reference's ``g_idx`` scheme): original
    column j belongs to group ``g_idx[j] = position_of_j_in_perm // group_size`` and
    ``scale``/``zero`` columns are indexed by group, so
    ``dequantize(codes, scale[:, g_idx], zero[:, g_idx])`` rebuilds ``weight``
    exactly without any permutation. With ``mask`` (bool, True = kept) pruned weights
    are held at zero and their error compensated (prune-then-quantize).
    """
    _check_w(W, H)
    _check_group(W.shape[1], group_size)
    if mask is not None and mask.shape != W.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != W shape {tuple(W.shape)}")
    return _obs_kernel(
        W, H, blocksize=blocksize, percdamp=percdamp, act_order=act_order,
        fixed_mask=None if mask is None else mask.bool(), grid=_Grid(bits, group_size, sym), lent=lent,
    )  # fmt: skip
