"""Packed run time: quantized linears that stay low-bit in memory and run through weight-only kernels.

``ctp`` stores integer codes; :func:`ctp.compress.artifact.load_compressed` can rebuild them
as dense matrices (``runtime="dense"``, exact) or keep them packed (``runtime="packed"``) as
the modules below, which call torch's built-in weight-only matmuls:

* :class:`Int4Linear`, for every grid of at most 4 bits (2-, 3- and 4-bit codes fit the
  4-bit kernel): ``torch._weight_int4pack_mm_for_cpu`` on CPU, ``torch._weight_int4pack_mm``
  on CUDA. The kernel computes ``(q - 8) * s + z'`` per group of 32/64/128/256 input columns;
  ctp's ``s * (q - z)`` is that with ``z' = s * (8 - z)``. Per-row grids are replicated over
  such groups; act-order groupings (``g_idx``) are made contiguous by permuting the input
  columns once at load time and the activations at every call (as exllama does).
* :class:`Int8Linear`, for 8-bit per-row grids: ``torch._weight_int8pack_mm`` (int8
  weight, per-row scale); an asymmetric zero point adds ``s * (128 - z) * sum(x)``.

Pruned weights hold their group's zero-point code, so sparsity needs nothing extra: a
50% + 4-bit model packs exactly like a 4-bit one (unstructured sparsity has no fast CPU
kernel: ``bench/README.md``). Pruned-only layers and other grids (8-bit groups, 5-7 bits,
widths the kernels do not take) stay dense; :func:`packable` says why.

The kernels are fast only for bf16 activations on CPU (fp32 activations take a scalar
fallback 3-28x slower than a dense fp32 matmul; measured in ``bench/README.md``), so
``act_dtype`` defaults to bf16: inputs are cast to it inside each linear and outputs cast
back, the rest of the model keeps its own dtype. With ``act_dtype=float32`` the result
equals the dense rebuild's to fp32 rounding. From ``DENSE_FROM`` tokens per call (prefill,
scoring, training) a layer is instead dequantized into one fp32 matmul: faster there, and exact.

Backpropagation reaches the input (a prompt) but never the weights: the backward pass
dequantizes the weight it needs from the packed codes, one layer at a time.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ctp.errors import CTPError

log = logging.getLogger(__name__)

INT4_GROUPS = (256, 128, 64, 32)  # group sizes the int4 kernels accept, largest first
DENSE_FROM = 48  # tokens per call from which dequantizing + a dense fp32 matmul beats the int4 kernel (bench/README.md)
TILE_BYTES = 4 << 20  # fp32 weight dequantized at a time for a long input (_PackedLinear.tiles)


def default_act_dtype(device: torch.device | str) -> torch.dtype:
    """Activation dtype of the kernels: bf16 (the only fast one on CPU, the only one on CUDA)."""
    return torch.bfloat16


# --------------------------------------------------------------------------- what packs


def packable(entry: dict) -> str | None:
    """Why a stored linear (an artifact index entry) cannot run packed, or None when it can."""
    if entry["kind"] == "sparse":
        return "pruned only (unstructured sparsity has no fast CPU kernel)"
    rows, cols = entry["shape"]
    bits, n_groups = entry["bits"], entry["n_groups"]
    if bits == 8:
        return None if n_groups == 1 else "8-bit with groups (the int8 kernel takes one scale per row)"
    if bits > 4:
        return f"{bits}-bit (kernels exist for at most 4 bits and for 8 bits)"
    if rows % 16:
        return f"{rows} output rows (the int4 kernel needs a multiple of 16)"
    group = cols if n_groups == 1 else cols // n_groups
    if cols % n_groups or not any(group % g == 0 for g in INT4_GROUPS):
        return f"groups of {cols / n_groups:g} columns (the int4 kernel needs multiples of 32)"
    return None


def _kernel_group(cols: int, n_groups: int) -> int:
    """The largest kernel group size that divides ctp's group (a whole row for per-row grids)."""
    group = cols if n_groups == 1 else cols // n_groups
    return next(g for g in INT4_GROUPS if group % g == 0)


def _act_order_perm(g_idx: Tensor, n_groups: int, cols: int) -> Tensor | None:
    """The column order that makes ctp's groups contiguous, or None when they already are."""
    contiguous = torch.arange(cols) // (cols // n_groups)
    if torch.equal(g_idx, contiguous):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], contiguous):  # groups of unequal sizes cannot be made contiguous
        raise ValueError("act-order groups of unequal sizes")
    return perm


# --------------------------------------------------------------------------- the CPU int4 layout


def _cpu_block_rows() -> tuple[int, bool]:
    """(rows per block, whether a full block splits into halves) of torch's CPU int4 layout on this CPU."""
    cap = torch.backends.cpu.get_cpu_capability()
    return (64 if cap.startswith("AVX512") else 32), cap.startswith("AVX")


def _cpu_unpack_t(packed: Tensor, rows: int, cols: int, layout: tuple[int, bool] | None = None) -> Tensor:
    """Invert ``torch._convert_weight_to_int4pack_for_cpu``: the (cols, rows) uint8 codes, transposed.

    torch lays the codes out in blocks of B rows (64 on AVX-512, 32 otherwise), column-major inside a block:
    in a full block on AVX2 / AVX-512 byte ``k * B/2 + j`` holds row ``j`` in its low nibble and row
    ``j + B/2`` in its high nibble; in the last, shorter block (and in every block without AVX) it holds rows
    ``2j`` and ``2j + 1``. Checked against the codes when a layer is packed (:meth:`Int4Linear.__init__`);
    a CPU whose layout differs keeps a copy of the codes instead. ``layout`` is (B, split), this CPU's by default.
    """
    B, split = layout or _cpu_block_rows()
    nfull, tail = divmod(rows, B)
    flat = packed.reshape(-1)
    parts = []
    if nfull:
        p3 = flat[: nfull * cols * B // 2].view(nfull, cols, B // 2)
        both = (torch.cat([p3 & 15, p3 >> 4], dim=2) if split
                else torch.stack([p3 & 15, p3 >> 4], dim=3).reshape(nfull, cols, B))  # (blocks, cols, B)
        parts.append(both.transpose(0, 1).reshape(cols, nfull * B))
    if tail:
        t = flat[nfull * cols * B // 2 :].view(cols, tail // 2)
        parts.append(torch.stack([t & 15, t >> 4], dim=2).reshape(cols, tail))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _cpu_unpack(packed: Tensor, rows: int, cols: int) -> Tensor:
    """The (rows, cols) uint8 codes of torch's CPU int4 layout (see :func:`_cpu_unpack_t`)."""
    return _cpu_unpack_t(packed, rows, cols).T


def _jit():
    """:mod:`ctp.compress.dequant_jit` (one compiled pass per dequantization), or None where numba cannot load."""
    global _JIT
    if _JIT is False:
        try:
            from ctp.compress import dequant_jit as _JIT
        except (ImportError, RuntimeError, OSError) as e:  # numba is a dependency; a platform without its
            # wheels, or without a writable cache, keeps the torch ops
            log.info("numba unavailable (%s): packed layers dequantize with torch ops, 1.4-2.6x slower (bench/README.md)", e)
            _JIT = None
    return _JIT


_JIT = False  # not tried yet


# --------------------------------------------------------------------------- autograd


class _WeightOnlyMM(torch.autograd.Function):
    """``y = x W^T`` through a packed kernel; the backward pass gives ``dx = dy W`` (no weight gradient)."""

    @staticmethod
    def forward(ctx, x2: Tensor, module: "_PackedLinear") -> Tensor:  # type: ignore[override]
        ctx.module = module
        return module._matmul(x2)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        m, g = ctx.module, grad.float()
        dx = None
        for r0, r1 in m.tiles():  # dy W, a tile of W's rows (in fp32, dequantized from the codes) at a time
            part = g[:, r0:r1] @ m.weight_t(r0, r1).T
            dx = part if dx is None else dx.add_(part)
        return dx.to(grad.dtype), None


class _PackedLinear(nn.Module):
    """What both kernel linears share: dtype casts, act-order permutation, bias, autograd."""

    dense_from = DENSE_FROM

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, perm: Tensor | None,
                 act_dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_dtype = act_dtype
        self.register_buffer("bias", None if bias is None else bias.detach().to(device=device, dtype=torch.float32))
        self.register_buffer("perm", None if perm is None else perm.to(device))

    def _mm(self, x2: Tensor) -> Tensor:  # (tokens, in) act dtype, columns permuted -> (tokens, out)
        raise NotImplementedError

    def weight_t(self, r0: int = 0, r1: int | None = None) -> Tensor:
        """Output rows ``r0:r1`` (all by default; bounds from :meth:`tiles`) of the weight, transposed:
        (in, r1 - r0) fp32, in the kernel's column order (act-order permuted)."""
        raise NotImplementedError

    def tiles(self) -> list[tuple[int, int]]:
        """Row ranges to dequantize one at a time for a long input: about ``TILE_BYTES`` of fp32 weight each, in
        multiples of 64 rows (a whole number of the int4 layout's blocks on every CPU). One tile per layer of
        SmolLM2's blocks; its 49k-row head and wide layers get several, which spares a fresh allocation of the
        whole fp32 matrix (page faults) at every call (bench/README.md, "Dequantization"). On CPU only: on CUDA,
        and for int4 codes that only the torch ops can unpack (they unpack the whole matrix), one tile."""
        rows = self.out_features
        if not self._by_tiles():
            return [(0, rows)]
        step = max(64, TILE_BYTES // (4 * self.in_features) // 64 * 64)
        return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]

    def _by_tiles(self) -> bool:
        """Whether a tile can be dequantized alone (on CPU); otherwise :meth:`tiles` gives the whole matrix."""
        raise NotImplementedError

    def kernel_weight(self) -> Tensor:
        """The (out, in) fp32 weight in the kernel's column order (act-order permuted)."""
        return self.weight_t().T

    def _matmul(self, x2: Tensor) -> Tensor:
        """(tokens, in) -> (tokens, out) in x2's dtype. Up to ``dense_from`` tokens (decoding) the low-bit kernel
        runs; from there on (prefill, scoring, training) this layer's weight is dequantized, a tile at a time, for
        fp32 matmuls, which is faster on CPU once the matmul outweighs the dequantization (bench/README.md)."""
        if x2.shape[0] < self.dense_from:
            return self._mm(x2.to(self.act_dtype).contiguous()).to(x2.dtype)
        x = x2.float()
        tiles = self.tiles()
        if len(tiles) == 1:
            return (x @ self.weight_t()).to(x2.dtype)
        y = x.new_empty(x.shape[0], self.out_features)
        for r0, r1 in tiles:
            y[:, r0:r1] = x @ self.weight_t(r0, r1)
        return y.to(x2.dtype)

    def dequantized(self) -> Tensor:
        """The (out, in) fp32 weight in the model's column order: what the dense rebuild holds."""
        w = self.kernel_weight()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    @property
    def weight_nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _apply(self, fn, recurse=True):
        """Moves keep every buffer's dtype (``model.to(dtype)`` must not cast codes or grids); the kernel's
        layout is per device type, so a packed linear cannot move between CPU and GPU."""
        before = {k: (b.dtype, b.device.type) for k, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for k, (dtype, dev) in before.items():
            b = self._buffers[k]
            if b.device.type != dev:
                raise CTPError(f"a packed model cannot move from {dev} to {b.device.type}",
                               "load it on the device it runs on (--device), or with --runtime dense")
            if b.dtype != dtype:
                self._buffers[k] = b.to(dtype)
        return self

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, in)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = _WeightOnlyMM.apply(x2, self) if torch.is_grad_enabled() and x2.requires_grad else self._matmul(x2)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"act_dtype={self.act_dtype}")


class Int4Linear(_PackedLinear):
    """A linear whose weight is 4-bit codes (or fewer bits) packed two per byte, with a scale and zero per group."""

    def __init__(self, codes: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor, bias: Tensor | None = None, *,
                 act_dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        rows, cols = codes.shape
        n_groups = scale.shape[1]
        device = torch.device(device)
        perm = _act_order_perm(g_idx.long().cpu(), n_groups, cols)
        super().__init__(cols, rows, bias, perm, act_dtype, device)
        if perm is not None:
            codes, g_idx = codes[:, perm], g_idx[perm]
        G = _kernel_group(cols, n_groups)
        gk = g_idx.long().cpu()[::G]  # (cols/G,) ctp group of each kernel group
        s = scale.float().cpu()[:, gk]  # (out, cols/G)
        z = zero.float().cpu()[:, gk]
        self.group = G
        self.register_buffer("scale_zero", torch.stack([s, s * (8 - z)], dim=-1).transpose(0, 1).contiguous()
                             .to(device=device, dtype=act_dtype))  # (cols/G, out, 2)
        # the exact fp32 grid, laid out (cols/G, out) for dequantizing into (in, out): small next to the codes
        self.register_buffer("scale_t", s.T.contiguous().to(device))
        self.register_buffer("zero_t", z.T.to(torch.uint8).contiguous().to(device))  # integers in [0, 15]
        codes = codes.to(torch.uint8).contiguous()
        self.register_buffer("codes_copy", None)
        if device.type == "cuda":
            nib = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous().to(device)  # (out, in/2), high nibble first
            self.register_buffer("packed", torch._convert_weight_to_int4pack(nib, 2))
            self.register_buffer("codes_copy", nib)  # the CUDA layout is tiled: keep the codes for backward
        else:
            self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(
                codes.to(torch.int32), 2))
            if rows % 2 or not torch.equal(_cpu_unpack(self.packed, rows, cols), codes):
                self.register_buffer("codes_copy", (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous())

    def set_act_dtype(self, dtype: torch.dtype) -> None:
        self.act_dtype = dtype
        s, z = self.scale_t.T, self.zero_t.T.float()
        self.scale_zero = torch.stack([s, s * (8 - z)], dim=-1).transpose(0, 1).contiguous().to(dtype)

    def _mm(self, x2: Tensor) -> Tensor:
        if x2.is_cuda:
            return torch._weight_int4pack_mm(x2, self.packed, self.group, self.scale_zero)
        return torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scale_zero)

    def weight_t(self, r0: int = 0, r1: int | None = None) -> Tensor:
        rows, cols, G = self.out_features, self.in_features, self.group
        r1 = rows if r1 is None else r1
        if self._by_tiles():  # the CPU layout, in one compiled pass: the same values as the torch ops below
            B, split = _cpu_block_rows()
            out = torch.empty(cols, r1 - r0, dtype=torch.float32)
            _jit().int4_weight_t(self.packed.reshape(-1).numpy(), rows, cols, B, split, G, self.zero_t.numpy(),
                              self.scale_t.numpy(), out.numpy(), r0, r1)
            return out
        w = self._weight_t_torch()
        return w if (r0, r1) == (0, rows) else w[:, r0:r1]

    def _by_tiles(self) -> bool:  # the compiled pass reads the CPU layout, a tile alone
        return self.packed.device.type == "cpu" and self.codes_copy is None and _jit() is not None

    def _weight_t_torch(self) -> Tensor:
        """:meth:`weight_t` in torch ops (CUDA, a layout kept as a copy of the codes, or no numba)."""
        rows, cols, G = self.out_features, self.in_features, self.group
        if self.codes_copy is None:  # the CPU layout: dequantize straight into (in, out)
            ct = _cpu_unpack_t(self.packed, rows, cols)  # (in, out) uint8
        else:
            nib = self.codes_copy
            ct = torch.stack([nib >> 4, nib & 15], dim=-1).reshape(rows, cols).T
        w = ct.reshape(cols // G, G, rows).to(torch.float32)  # (groups, G, out)
        return w.sub_(self.zero_t[:, None, :]).mul_(self.scale_t[:, None, :]).view(cols, rows)  # s * (q - z)


class Int8Linear(_PackedLinear):
    """A linear whose weight is 8-bit codes with one scale and zero point per row."""

    def __init__(self, codes: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor | None = None,
                 bias: Tensor | None = None, *, act_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu"):
        rows, cols = codes.shape
        if scale.shape[-1] != 1:
            raise ValueError("the int8 kernel takes one scale per row")
        device = torch.device(device)
        super().__init__(cols, rows, bias, None, act_dtype, device)
        self.register_buffer("weight_int8", (codes.to(torch.int16) - 128).to(torch.int8).contiguous().to(device))
        s = scale.reshape(-1).float()
        z = zero.reshape(-1).float()
        self.register_buffer("scale_fp32", s.to(device))
        self.register_buffer("zero_fp32", z.to(device))
        self.register_buffer("scales", s.to(device=device, dtype=act_dtype))
        shift = s * (128 - z)  # (out,) the zero point's contribution per unit of sum(x)
        self.register_buffer("shift", None if bool((z == 128).all()) else shift.to(device))

    def set_act_dtype(self, dtype: torch.dtype) -> None:
        self.act_dtype = dtype
        self.scales = self.scale_fp32.to(dtype)

    def _mm(self, x2: Tensor) -> Tensor:
        y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scales)
        if self.shift is not None:
            y = (y.float() + x2.float().sum(1, keepdim=True) * self.shift).to(y.dtype)
        return y

    def _by_tiles(self) -> bool:
        return self.weight_int8.device.type == "cpu"

    def weight_t(self, r0: int = 0, r1: int | None = None) -> Tensor:
        r1 = self.out_features if r1 is None else r1
        codes, s = self.weight_int8[r0:r1], self.scale_fp32[r0:r1]  # (rows, in) int8, (rows,)
        shift = 128 - self.zero_fp32[r0:r1]
        jit = _jit() if codes.device.type == "cpu" else None
        if jit is not None:  # one compiled pass: the same values as the torch ops below
            w = torch.empty(codes.shape, dtype=torch.float32)
            jit.int8_weight(codes.numpy(), shift.numpy(), s.numpy(), w.numpy())
        else:
            w = codes.to(torch.float32).add_(shift[:, None]).mul_(s[:, None])
        return w.T  # (in, rows), a transposed view: the matmul reads it as it is


def quantize_rows_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest of each row of ``w`` (rows, cols) to int8: (codes uint8 with zero point 128,
    scales (rows, 1) fp32), ``w ~ scale * (codes - 128)``."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (rows, 1)
    codes = (w / scale).round_().clamp_(-127, 127).add_(128).to(torch.uint8)
    return codes, scale


class Int8Embedding(nn.Module):
    """An input embedding held as int8 codes with one fp32 scale per row, dequantized row by row on lookup.

    Tied to an :class:`Int8Linear` LM head, both hold one copy of the codes. ``weight`` gives the dense matrix's
    shape, dtype and device without its memory (what callers ask of an embedding's weight); its values are not
    there: :meth:`dequantized` rebuilds them. ``fingerprint`` is the dense matrix's
    (:func:`ctp.models.fingerprint.embedding_fingerprint`), so prompts learned on the dense model still match.
    """

    def __init__(self, weight_int8: Tensor, scale: Tensor, dtype: torch.dtype, embed_scale: Tensor | None = None,
                 padding_idx: int | None = None, fingerprint: str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.padding_idx, self.out_dtype, self.fingerprint = padding_idx, dtype, fingerprint
        self.register_buffer("weight_int8", weight_int8)  # (V, H) int8, codes - 128
        self.register_buffer("scale_fp32", scale.reshape(-1).float().to(weight_int8.device))  # (V,)
        self.register_buffer("embed_scale", None if embed_scale is None else embed_scale.float(), persistent=False)

    @property
    def weight(self) -> Tensor:
        return torch.empty((), dtype=self.out_dtype, device=self.weight_int8.device).expand(
            self.num_embeddings, self.embedding_dim)

    def dequantized(self) -> Tensor:
        """The (V, H) fp32 matrix the codes stand for (without a model's embedding scale)."""
        return self.weight_int8.float() * self.scale_fp32[:, None]

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.weight_int8[ids].float() * self.scale_fp32[ids].unsqueeze(-1)  # (..., H)
        if self.embed_scale is not None:  # Gemma multiplies its embeddings by sqrt(hidden)
            rows = rows * self.embed_scale
        return rows.to(self.out_dtype)

    def _apply(self, fn, recurse=True):
        """Codes and scales keep their dtypes through ``model.to(dtype)``; the output dtype follows the move."""
        before = {k: b.dtype for k, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for k, dtype in before.items():
            if self._buffers[k].dtype != dtype:
                self._buffers[k] = self._buffers[k].to(dtype)
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype)).dtype
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 codes, out_dtype={self.out_dtype}"


def pack_embeddings(model: nn.Module, act_dtype: torch.dtype, device: torch.device | str, fingerprint: str) -> None:
    """Hold ``model``'s input embedding and LM head as int8 (per-row symmetric round-to-nearest, one copy of the
    codes when they are tied): :class:`Int8Embedding` and an :class:`Int8Linear` head. Changes the model (the
    measured perplexity change is in bench/README.md); ``fingerprint`` is the dense embedding's."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = isinstance(head, nn.Linear) and head.weight.data_ptr() == emb.weight.data_ptr()
    codes, scale = quantize_rows_int8(emb.weight)
    dtype = emb.weight.dtype
    q_head = None
    if isinstance(head, nn.Linear):
        h_codes, h_scale = (codes, scale) if tied else quantize_rows_int8(head.weight)
        q_head = Int8Linear(h_codes, h_scale, torch.full_like(h_scale, 128), None, head.bias, act_dtype=act_dtype,
                            device=device)
    weight_int8 = q_head.weight_int8 if tied else (codes.to(torch.int16) - 128).to(torch.int8).to(device)
    model.set_input_embeddings(Int8Embedding(weight_int8, scale.to(device), dtype, getattr(emb, "embed_scale", None),
                                             getattr(emb, "padding_idx", None), fingerprint))
    if q_head is not None:
        model.set_output_embeddings(q_head)


def pack_linear(codes: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor, bits: int, bias: Tensor | None, *,
                act_dtype: torch.dtype, device: torch.device | str) -> _PackedLinear:
    """The kernel linear for one quantized matrix (callers check :func:`packable` first)."""
    cls = Int8Linear if bits == 8 else Int4Linear
    return cls(codes, scale, zero, g_idx, bias, act_dtype=act_dtype, device=device)


def packed_modules(model: nn.Module) -> dict[str, _PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _PackedLinear)}


def set_act_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Run every packed linear of ``model`` on ``dtype`` activations from now on."""
    for m in packed_modules(model).values():
        m.set_act_dtype(dtype)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, tied tensors once (what its weights hold in memory)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr())
        if key in seen or not t.numel():
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


__all__ = ["INT4_GROUPS", "Int4Linear", "Int8Embedding", "Int8Linear", "default_act_dtype", "pack_embeddings",
           "pack_linear", "quantize_rows_int8",
           "packable", "packed_modules", "set_act_dtype", "weight_bytes"]
