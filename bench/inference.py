"""What a compressed model gives at run time: weight memory, and speed with real low-bit kernels.

Sections:

``memory``  bytes of ctp's packed artifact (``save_compressed``: codes at ``bits`` bits,
            1-bit masks, fp32 scales) per recipe, against the dense model in fp32 / fp16,
            and the in-memory bytes of each run-time format.
``linear``  one linear layer ``y = x W^T`` per shape and token count, every format timed
            alternately with dense fp32 (the baseline):

            - ``fp32``: dense fp32 (the baseline);
            - ``fake4``: what ctp runs today, a dense fp32 matrix holding 4-bit values:
              the same matmul, so no speedup by construction;
            - ``bf16``: dense bf16 weights and activations;
            - ``int8-bf16`` / ``int4-bf16``: ``torch._weight_int8pack_mm`` (8-bit symmetric per-row
              codes) / ``torch._weight_int4pack_mm_for_cpu`` (4-bit, groups of 64) with bf16
              activations, the path these kernels are vectorised for;
            - ``int8`` / ``int4``: the same kernels with fp32 activations, a scalar fallback
              3-100x slower than dense fp32, timed only at ``--fp32-int-max-tokens`` (1) tokens or fewer;
            - ``csr50``: 50% unstructured sparsity as a torch CSR matrix (``torch.sparse``);
              stored dense, unstructured sparsity is just fp32 zeros: no speedup;
            - ``2:4``: ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS),
              which exists only on CUDA.

            Each low-bit result is checked against the dense matmul of its dequantized
            weight (``max_rel_err`` = max abs difference / max abs reference).
``model``   a whole model's forward (prefill tokens/s, no cache) and greedy decoding
            (tokens/s with the KV cache) with every decoder linear swapped for the int8 /
            int4 kernels (bf16 activations inside each linear, fp32 elsewhere), against the
            dense fp32 model, the fake-quantized one and a dense bf16 model; the logits of
            each kernel model are compared with those of its fake-quantized twin, with fp32
            activations (exactness of the format) and with bf16 ones (what the fast path costs).
            Embeddings, norms and the (tied) LM head stay dense fp32, as in ctp's artifacts.
``dequant`` a packed layer's path for long inputs (prefill, scoring, training: ``--tokens`` tokens, 128 by
            default): its weight dequantized to fp32 for a dense matmul, per shape of ``--dequant-shapes`` and
            per kind (int4 g64, int8 per row), timed alternately with the dense fp32 matmul of the same weight:
            ``torch ops`` (the dequantization in torch ops, the whole matrix at once: ctp before the compiled
            loop), ``compiled`` (ctp.compress.dequant_jit, the whole matrix), ``compiled, tiles`` (ctp's
            default: ``TILE_BYTES`` of weight at a time), and the dequantization alone both ways.
``runtime`` what a user gets from ``ctp``: each artifact of ``--artifacts`` loaded with
            ``load_model(runtime="dense")`` (fp32 rebuild, the baseline) and ``runtime="packed"``
            (int4/int8 kernels, bf16 activations) with the rest of the model in fp32 and in bf16
            (``--dtype bfloat16``): prefill (no cache) and greedy decoding with ctp's own loop
            (``ctp generate``: ms per token after the first, over ``--decode`` tokens after a
            32-token context; ``generate_speedup_cpu`` is the CPU-time ratio of the whole call) timed alternately,
            the weight bytes held in memory (parameters + buffers) against the dense fp16
            model's, the resident set size of a fresh process after loading, and the logits'
            difference. With ``--ppl-windows N``, the perplexity of each on N c4 test windows
            (paired per-window interval of the relative change), and of the dense model whose
            uncompressed parts went through fp16 / bf16 (what ``--save-dtype`` stores).

    python -m bench.inference                        # default model smollm2-135m
    python -m bench.inference --sections runtime --artifacts runs/art/gptq4g64,runs/sp50q4 --ppl-windows 40
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench._common import base_parser, finish, headline, interleaved, machine, median, setup, table
from bench._kernels import (Int4Linear, Int8Linear, buffer_bytes, int4_mm, int4_weight, int8_weight,
                            set_act_dtype)
from bench.compress_speed import parse_shapes
from ctp.compress import kernels as K

log = logging.getLogger(__name__)

INT4_GROUP = 64  # divides every SmolLM2 width (576, 1536, 192); 128 does not divide 576


def _quant4(W: Tensor, group: int = INT4_GROUP) -> K.KernelResult:
    return K.rtn_quantize(W, 4, group, sym=False)


def _quant8(W: Tensor) -> K.KernelResult:
    return K.rtn_quantize(W, 8, -1, sym=True)


def _loop(fn, n: int):
    """A closure running ``fn`` ``n`` times (per-call times are the total / n)."""

    def run():
        out = None
        for _ in range(n):
            out = fn()
        return out

    return run


def _rel_err(y: Tensor, ref: Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------- linear


def linear_formats(W: Tensor, x: Tensor, device: torch.device,
                   fp32_int_max_tokens: int = 1) -> tuple[dict[str, Any], dict[str, Any], dict]:
    """({format: callable}, {format: (reference output, weight bytes)}, {format: why unavailable})."""
    fns: dict[str, Any] = {"fp32": lambda: F.linear(x, W)}
    ref: dict[str, Any] = {"fp32": (None, W.numel() * 4)}
    skipped: dict[str, str] = {}

    q4 = _quant4(W.cpu())
    W4 = q4.weight.to(device)  # fp32 dense holding 4-bit values
    fns["fake4"] = lambda: F.linear(x, W4)
    ref["fake4"] = (None, W.numel() * 4)

    Wb, xb = W.to(torch.bfloat16), x.to(torch.bfloat16)
    fns["bf16"] = lambda: F.linear(xb, Wb)
    ref["bf16"] = (None, W.numel() * 2)

    # torch's weight-only kernels are vectorised for bf16 activations; with fp32 (or fp16) ones
    # they take a scalar fallback that is 10-100x slower, timed only up to fp32_int_max_tokens.
    acts = [("-bf16", torch.bfloat16)]
    if x.shape[0] <= fp32_int_max_tokens:
        acts.insert(0, ("", torch.float32))
    q8 = _quant8(W.cpu())
    for suffix, act in acts:
        name = "int8" + suffix
        try:
            w8, s8 = int8_weight(q8.codes, q8.scale, q8.zero)
            w8, s8, xa = w8.to(device), s8.to(device=device, dtype=act), x.to(act)
            torch._weight_int8pack_mm(xa, w8, s8)  # raises here if the op is missing for this device
            fns[name] = lambda xa=xa, w8=w8, s8=s8: torch._weight_int8pack_mm(xa, w8, s8)
            ref[name] = (F.linear(xa.float(), q8.weight.to(device)), w8.numel() + s8.numel() * s8.element_size())
        except (RuntimeError, NotImplementedError, ValueError) as e:
            skipped[name] = str(e).splitlines()[0]
    for suffix, act in acts:
        name = "int4" + suffix
        try:
            packed, sz, G = int4_weight(q4.codes, q4.scale, q4.zero, q4.g_idx, device, act)
            xa = x.to(act)
            int4_mm(xa, packed, G, sz)
            fns[name] = lambda xa=xa, packed=packed, G=G, sz=sz: int4_mm(xa, packed, G, sz)
            nbytes = packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
            ref[name] = (F.linear(xa.float(), W4), nbytes)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            skipped[name] = str(e).splitlines()[0]

    W50 = K.magnitude_prune(W.cpu(), 0.5).weight.to(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            csr = W50.to_sparse_csr()
        xt = x.t().contiguous()  # (in, tokens)
        fns["csr50"] = lambda: (csr @ xt).t()
        nbytes = csr.values().numel() * 4 + csr.col_indices().numel() * 8 + csr.crow_indices().numel() * 8
        ref["csr50"] = (F.linear(x, W50), nbytes)
    except (RuntimeError, NotImplementedError) as e:
        skipped["csr50"] = str(e).splitlines()[0]

    try:
        from torch.sparse import to_sparse_semi_structured

        W24 = K.magnitude_prune(W.cpu(), 0.5, prune_n=2, prune_m=4).weight.to(device=device, dtype=torch.float16)
        s24 = to_sparse_semi_structured(W24)
        xh = x.to(torch.float16)
        fns["2:4"] = lambda: F.linear(xh, s24)
        ref["2:4"] = (F.linear(xh.float(), W24.float()), W24.numel())  # ~ half the fp16 values + metadata
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"; report why
        skipped["2:4"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return fns, ref, skipped


def bench_linear(shapes, tokens_list, repeats, min_time, device,
                 fp32_int_max_tokens: int = 1) -> tuple[list[dict], dict[str, str]]:
    """Per (shape, tokens, format): median seconds per call, speedup vs fp32, tokens/s, error."""
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    for si, (o, i) in enumerate(shapes):
        g = torch.Generator().manual_seed(si)
        W = (0.02 * torch.randn(o, i, generator=g)).to(device)
        for T in tokens_list:
            x = torch.randn(T, i, generator=g).to(device)
            fns, ref, skip = linear_formats(W, x, device, fp32_int_max_tokens)
            skipped.update(skip)
            # calls per timed run: enough for ~min_time seconds of the baseline
            t0 = time.perf_counter()
            fns["fp32"]()
            n = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
            cpu: dict[str, list[float]] = {}
            times, first = interleaved({k: _loop(f, n) for k, f in fns.items()}, repeats, device, warmup=1, cpu=cpu)
            base = median(times["fp32"]) / n
            for k in fns:
                t = median(times[k]) / n
                r_out, nbytes = ref[k]
                rows.append({"shape": [o, i], "tokens": T, "format": k, "us_per_call": t * 1e6,
                             "us_per_call_cpu": median(cpu[k]) / n * 1e6,
                             "speedup_vs_fp32": base / t, "speedup_cpu": median(cpu["fp32"]) / median(cpu[k]),
                             "tokens_per_s": T / t, "weight_bytes": nbytes,
                             "max_rel_err": None if r_out is None else _rel_err(first[k], r_out)})
        del W
    return rows, skipped


# --------------------------------------------------------------------------- dequant


def bench_dequant(shapes, tokens: int, repeats: int, min_time: float) -> list[dict[str, Any]]:
    """Per (shape, kind): median ms per call of the long-input path each way, and its speed against dense fp32."""
    from ctp.compress import packed as P

    def configured(fn, jit, tile_bytes):  # run fn with the module's compiled loop and tile size set as given
        def run():
            saved = P._JIT, P.TILE_BYTES
            P._JIT, P.TILE_BYTES = jit, tile_bytes
            try:
                return fn()
            finally:
                P._JIT, P.TILE_BYTES = saved

        return run

    bad = [f"{o}x{i}" for o, i in shapes if o % 16 or i % INT4_GROUP]
    if bad:
        raise SystemExit(f"--dequant-shapes {', '.join(bad)}: the int4 kernel takes OUT a multiple of 16 and IN a "
                         f"multiple of the group ({INT4_GROUP}), e.g. 576x576")
    jit, whole = P._jit(), 1 << 62
    rows: list[dict[str, Any]] = []
    for si, (o, i) in enumerate(shapes):
        g = torch.Generator().manual_seed(si)
        x = torch.randn(tokens, i, generator=g)
        for kind in ("int4", "int8"):
            if kind == "int4":
                codes = torch.randint(0, 16, (o, i), generator=g).to(torch.uint8)
                scale = torch.rand(o, i // INT4_GROUP, generator=g) * 0.01
                zero = torch.randint(0, 16, (o, i // INT4_GROUP), generator=g).float()
                lin = P.Int4Linear(codes, scale, zero, torch.arange(i) // INT4_GROUP)
                deq_torch = lin._weight_t_torch
            else:
                codes = torch.randint(0, 256, (o, i), generator=g).to(torch.uint8)
                scale, zero = torch.rand(o, 1, generator=g) * 0.01, torch.full((o, 1), 128.0)
                lin = P.Int8Linear(codes, scale, zero)
                deq_torch = configured(lin.weight_t, None, whole)
            lin.dense_from = 1
            W = lin.dequantized()
            fns = {"dense fp32": lambda: x @ W.T,
                   "torch ops": configured(lambda: lin(x), None, whole),
                   "compiled": configured(lambda: lin(x), jit, whole),
                   "compiled, tiles": configured(lambda: lin(x), jit, P.TILE_BYTES),
                   "dequantize, torch ops": deq_torch,
                   "dequantize, compiled": configured(lin.weight_t, jit, whole)}
            if jit is None:
                fns = {k: f for k, f in fns.items() if "compiled" not in k}
            t0 = time.perf_counter()
            fns["dense fp32"]()
            n = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
            times, first = interleaved({k: _loop(f, n) for k, f in fns.items()}, repeats, torch.device("cpu"),
                                       warmup=1)
            base = median(times["dense fp32"]) / n
            for k in fns:
                t = median(times[k]) / n
                row = {"shape": [o, i], "kind": kind, "tokens": tokens, "path": k, "ms_per_call": t * 1e3,
                       "vs_dense_matmul": t / base, "tiles": len(lin.tiles()) if k == "compiled, tiles" else 1}
                if not k.startswith("dequantize") and k != "dense fp32":
                    row["speed_vs_dense"] = base / t
                    row["max_rel_err"] = _rel_err(first[k], first["dense fp32"])
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- memory


RECIPES = {  # id -> (label, CompressConfig keyword arguments); RTN / magnitude store what GPTQ / SparseGPT do
    "q4": ("4-bit per-row", dict(quant=dict(method="rtn", bits=4))),
    "q4g64": ("4-bit g64", dict(quant=dict(method="rtn", bits=4, group_size=64))),
    "q3": ("3-bit per-row", dict(quant=dict(method="rtn", bits=3))),
    "q8": ("8-bit per-row", dict(quant=dict(method="rtn", bits=8))),
    "s50": ("50% sparse", dict(prune=dict(method="magnitude", sparsity=0.5))),
    "2:4": ("2:4 sparse", dict(prune=dict(method="magnitude", prune_n=2, prune_m=4))),
    "s50q4": ("50% sparse + 4-bit", dict(prune=dict(method="magnitude", sparsity=0.5),
                                          quant=dict(method="rtn", bits=4))),
}


def bench_memory(model: nn.Module, tok, recipes: list[str] | None = None) -> list[dict[str, Any]]:
    """Artifact bytes of several recipes (written with ``save_compressed``) vs dense fp32 / fp16."""
    from ctp.compress import CompressConfig, compress_weight, save_compressed
    from ctp.models.adapter import decoder_layers, get_arch, linear_layers, set_weight_matrix, weight_matrix

    arch = get_arch(model)
    mods = {f"{arch.layers}.{i}.{n}": m for i, layer in enumerate(decoder_layers(model))
            for n, m in linear_layers(layer).items()}
    original = {n: weight_matrix(m).detach().clone() for n, m in mods.items()}
    n_params = sum(p.numel() for p in model.parameters())
    linear_params = sum(w.numel() for w in original.values())
    rows = [{"format": "dense fp32", "weights_bytes": 4 * n_params, "linear_bytes": 4 * linear_params,
             "linear_bits_per_weight": 32.0},
            {"format": "dense fp16", "weights_bytes": 2 * n_params, "linear_bytes": 2 * linear_params,
             "linear_bits_per_weight": 16.0}]
    # RTN / magnitude give the same stored format as GPTQ / SparseGPT (codes, masks, grids); only values differ.
    try:
        for rid in recipes or list(RECIPES):
            label, kw = RECIPES[rid]
            cfg = CompressConfig(**kw)
            compressed = {}
            for n, m in mods.items():
                cw = compress_weight(original[n], None, 0, cfg)
                set_weight_matrix(m, cw.weight)
                compressed[n] = cw
            with tempfile.TemporaryDirectory() as d:
                st = save_compressed(model, tok, cfg, compressed, f"{d}/art")
            dense_fp16 = st["dense_bytes"] // 2  # the uncompressed rest (embeddings, norms) in fp16
            rows.append({"format": label, "recipe": rid, "weights_bytes": st["weights_file_bytes"],
                         "linear_bytes": st["compressed_linear_bytes"],
                         "linear_bits_per_weight": st["linear_bits_per_weight"],
                         "weights_bytes_dense_fp16": st["compressed_linear_bytes"] + dense_fp16})
    finally:
        for n, m in mods.items():
            set_weight_matrix(m, original[n])
    for r in rows:
        r["vs_fp32"] = (4 * n_params) / r["weights_bytes"]
        r["linear_vs_fp16"] = (2 * linear_params) / r["linear_bytes"]
    return rows


# --------------------------------------------------------------------------- model


def _swap_linears(model: nn.Module, fmt: str, act_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A copy of ``model`` whose decoder linears run ``fmt`` ('fake4', 'fake8', 'int4', 'int8')."""
    from ctp.models.adapter import decoder_layers, linear_layers, set_weight_matrix, weight_matrix

    m = copy.deepcopy(model)
    for layer in decoder_layers(m):
        for name, mod in linear_layers(layer).items():
            W = weight_matrix(mod).detach().float().cpu()
            res = _quant4(W) if fmt in ("fake4", "int4") else _quant8(W)
            bias = getattr(mod, "bias", None)
            if fmt.startswith("fake"):
                set_weight_matrix(mod, res.weight.to(device))
                continue
            if fmt == "int4":
                new = Int4Linear(res.codes, res.scale, res.zero, res.g_idx, bias, act_dtype, device)
            else:
                new = Int8Linear(res.codes, res.scale, res.zero, bias, act_dtype, device)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, new)
    return m


@torch.no_grad()
def bench_model(spec: str, prefill: int, decode: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """Prefill and decode tokens/s of the dense, fake-quantized and kernel models; logits checks."""
    from ctp.models.load import load_model

    model, tok, info = load_model(spec, device=str(device))
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prefill), generator=g).to(device)  # (1, prefill)
    ctx = ids[:, : max(1, min(32, prefill))]  # decoding context

    models: dict[str, nn.Module] = {"fp32": model}
    skipped: dict[str, str] = {}
    for fmt in ("fake4", "fake8", "int4", "int8"):
        try:
            models[fmt] = _swap_linears(model, fmt, torch.float32, device)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            skipped[fmt] = str(e).splitlines()[0]
    models["bf16"] = copy.deepcopy(model).to(torch.bfloat16)

    # Exactness of the format mapping (fp32 activations, slow path, a few tokens), then the error the
    # fast bf16-activation path adds; the kernel models are timed with bf16 activations.
    short = ids[:, :8]
    checks = {}
    for fmt, twin in (("int4", "fake4"), ("int8", "fake8")):
        if fmt not in models:
            continue
        try:
            ref = models[twin](short).logits
            if not (fmt == "int4" and device.type == "cuda"):  # the CUDA int4 kernel takes bf16 only
                checks[f"{fmt}_fp32act_vs_{twin}_logits_max_rel_err"] = _rel_err(models[fmt](short).logits, ref)
            set_act_dtype(models[fmt], torch.bfloat16)
            checks[f"{fmt}_bf16act_vs_{twin}_logits_max_rel_err"] = _rel_err(models[fmt](short).logits, ref)
        except (RuntimeError, NotImplementedError) as e:
            skipped[fmt] = str(e).splitlines()[0]
            del models[fmt]
    models.pop("fake8", None)  # same dense fp32 matmuls as fake4: timed once
    models = {("int4-bf16" if k == "int4" else "int8-bf16" if k == "int8" else k): m for k, m in models.items()}

    def prefill_fn(m):
        return lambda: m(ids, use_cache=False).logits

    def decode_fn(m):
        return lambda: m.generate(ctx, max_new_tokens=decode, min_new_tokens=decode, do_sample=False,
                                  pad_token_id=tok.pad_token_id or 0)

    c_pre: dict[str, list[float]] = {}
    c_dec: dict[str, list[float]] = {}
    t_pre, _ = interleaved({k: prefill_fn(m) for k, m in models.items()}, repeats, device, warmup=1, cpu=c_pre)
    t_dec, _ = interleaved({k: decode_fn(m) for k, m in models.items()}, repeats, device, warmup=1, cpu=c_dec)
    rows = []
    from ctp.models.adapter import decoder_layers

    for k, m in models.items():
        pre, dec = median(t_pre[k]), median(t_dec[k])
        rows.append({"format": k, "prefill_tokens_per_s": prefill / pre, "decode_tokens_per_s": decode / dec,
                     "prefill_speedup": median(t_pre["fp32"]) / pre, "decode_speedup": median(t_dec["fp32"]) / dec,
                     "prefill_speedup_cpu": median(c_pre["fp32"]) / median(c_pre[k]),
                     "decode_speedup_cpu": median(c_dec["fp32"]) / median(c_dec[k]),
                     "decoder_weight_bytes": sum(buffer_bytes(layer) for layer in decoder_layers(m))})
    return {"model": spec, "prefill_tokens": prefill, "decode_tokens": decode, "decode_context": ctx.shape[1],
            "repeats": repeats, "rows": rows, "checks": checks, "skipped": skipped}


# --------------------------------------------------------------------------- runtime (ctp's loaded models)

RUNTIMES = {  # row name: load_model keywords
    "dense fp32": {"runtime": "dense", "dtype": "float32"},
    "packed, fp32 rest": {"runtime": "packed", "dtype": "float32"},
    "packed, bf16 rest": {"runtime": "packed", "dtype": "bfloat16"},
    "packed, int8 embeddings": {"runtime": "packed", "dtype": "float32", "embeddings": "int8"},
}

_RSS_PROBE = """
import gc, json, sys, torch
torch.set_num_threads(1)
from bench._common import rss_bytes
before = rss_bytes()
from ctp.models.load import load_model
import transformers  # imported by load_model anyway: count it in the baseline
base = rss_bytes()
model, tok, info = load_model(sys.argv[1], runtime=sys.argv[2], dtype=sys.argv[3], embeddings=sys.argv[4])
gc.collect()
print(json.dumps({"rss_after_load": rss_bytes(), "rss_baseline": base}))
"""


def _rss_after_load(spec: str, runtime: str, dtype: str, embeddings: str = "dense") -> dict[str, int]:
    """Resident set size of a fresh process after loading (minus the same process before loading)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, spec, runtime, dtype, embeddings], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ppl_windows(model, tok, n: int, seqlen: int) -> Tensor:
    """Per-window summed NLL (n,) on c4 test."""
    from ctp.data.corpora import corpus_ids, eval_windows, leading_ids
    from ctp.lm import window_nlls

    ids, _ = corpus_ids("c4", "test", tok)
    return window_nlls(model, eval_windows(ids, seqlen, n, lead=leading_ids(tok)), None, 1, progress=False)


def _rel_change(nll: Tensor, ref: Tensor, tokens: int) -> dict[str, float]:
    """Relative perplexity change exp(mean diff per token) - 1, with a paired 95% t-interval over windows."""
    from ctp.eval.stats import mean_ci

    d = (nll - ref).double() / tokens  # per-token NLL difference of each window
    mean = float(d.mean())
    _, lo, hi = mean_ci(d.tolist())
    return {"ppl_rel_change": math.expm1(mean), "ppl_rel_low": math.expm1(lo), "ppl_rel_high": math.expm1(hi)}


@torch.no_grad()
def _round_dense_parts(model: nn.Module, index: dict, dtype: torch.dtype) -> None:
    """Send every tensor the artifact stores uncompressed (all but the compressed linears) through ``dtype``."""
    skip = {f"{n}.weight" for n in index}
    for name, t in model.state_dict(keep_vars=True).items():
        if name not in skip and t.is_floating_point():
            t.data.copy_(t.data.to(dtype).to(t.dtype))


def random_llama_artifact(spec: str, out_dir: str, tokenizer: str = "smollm2-135m") -> str:
    """A random-weight Llama of ``HIDDEN:LAYERS`` (intermediate 2.75x hidden, 32000-token vocab, untied head),
    RTN 4-bit groups of 64 (data-free, seconds), saved as a ctp artifact with ``tokenizer``'s tokenizer (the default model's):
    a model whose linears dominate as in 1B-7B models, for the runtime section."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ctp.compress.artifact import save_compressed
    from ctp.compress.config import CompressConfig, QuantConfig
    from ctp.compress.driver import compress_model
    from ctp.models.load import load_tokenizer

    hidden, layers = (int(v) for v in spec.split(":"))
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=max(1, hidden // 256),
                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    report = compress_model(model, None, CompressConfig(quant=QuantConfig(method="rtn", bits=4, group_size=64)),
                            device="cpu", progress=False)
    path = f"{out_dir}/random-llama-{hidden}x{layers}-rtn4g64"
    save_compressed(model, load_tokenizer(tokenizer), report, path)
    return path


@torch.no_grad()
def bench_runtime(artifacts: list[str], prefill: int, decode: int, repeats: int, ppl_windows: int,
                  device: torch.device, runtimes: list[str] | None = None,
                  stored_dtypes: bool = True) -> list[dict[str, Any]]:
    from ctp.compress.artifact import read_index
    from ctp.compress.packed import packed_modules, weight_bytes
    from ctp.models.load import load_model

    out = []
    for spec in artifacts:
        index = read_index(spec)
        n_params = index["storage"]["n_params"]
        models, toks = {}, {}
        for name, kw in RUNTIMES.items():
            if name == "dense fp32" or runtimes is None or name in runtimes:
                models[name], toks[name], _ = load_model(spec, device=str(device), **kw)
        tok = toks["dense fp32"]
        vocab = models["dense fp32"].get_input_embeddings().weight.shape[0]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, prefill), generator=g).to(device)
        ctx = ids[:, : max(1, min(32, prefill))]
        ref = models["dense fp32"](ids[:, :32]).logits.float()

        def prefill_fn(m):  # every position's logits, as scoring and training need them
            return lambda: m(ids, use_cache=False).logits

        def prefill_last_fn(m):  # the next token's logits only, as `ctp generate` prefills
            from ctp.models.adapter import forward_accepts

            last = {"logits_to_keep": 1} if forward_accepts(m, "logits_to_keep") else {}
            return lambda: m(ids, use_cache=False, **last).logits

        from ctp.prompt.generate import PrefixCachedGenerator, SamplingConfig

        sampling = SamplingConfig(max_new_tokens=decode + 1, stop_at_eos=False)
        per_token: dict[str, list[float]] = {k: [] for k in models}

        def decode_fn(name, m):  # ctp's own decoding loop (ctp generate); the decode steps alone are kept
            gen = PrefixCachedGenerator(m, tok)

            def run():
                _, stats = gen.generate_ids(ctx[0], sampling)
                per_token[name].append(stats.per_token_seconds)
            return run

        c_pre: dict[str, list[float]] = {}
        c_dec: dict[str, list[float]] = {}
        t_pre, _ = interleaved({k: prefill_fn(m) for k, m in models.items()}, repeats, device, warmup=1, cpu=c_pre)
        t_last, _ = interleaved({k: prefill_last_fn(m) for k, m in models.items()}, repeats, device, warmup=1)
        interleaved({k: decode_fn(k, m) for k, m in models.items()}, repeats, device, warmup=1, cpu=c_dec)
        t_dec = {k: v[1:] for k, v in per_token.items()}  # without the warm-up call
        nll = {}
        if ppl_windows:
            seqlen = 512
            for name, m in models.items():
                nll[name] = _ppl_windows(m, tok, ppl_windows, seqlen)
            for dt in (torch.float16, torch.bfloat16) if stored_dtypes else ():
                m = models["dense fp32"]
                saved = {k: v.detach().clone() for k, v in m.state_dict().items()}
                _round_dense_parts(m, index["tensors"], dt)
                nll[f"dense, rest stored {str(dt).removeprefix('torch.')}"] = _ppl_windows(m, tok, ppl_windows, seqlen)
                m.load_state_dict(saved)
        fp16_bytes = 2 * n_params
        for name, m in models.items():
            wb = weight_bytes(m)
            kw = RUNTIMES[name]
            rss = _rss_after_load(spec, kw["runtime"], kw["dtype"], kw.get("embeddings", "dense")) \
                if device.type == "cpu" else {}
            pre, dec = median(t_pre[name]), median(t_dec[name])
            row = {"artifact": spec, "label": index["label"], "runtime": name,
                   "packed_linears": len(packed_modules(m)), "linears": len(index["tensors"]),
                   "prefill_tokens_per_s": prefill / pre, "decode_tokens_per_s": 1 / dec,
                   "prefill_speedup": median(t_pre["dense fp32"]) / pre,
                   "decode_speedup": median(t_dec["dense fp32"]) / dec,
                   "prefill_speedup_cpu": median(c_pre["dense fp32"]) / median(c_pre[name]),
                   "prefill_last_speedup": median(t_last["dense fp32"]) / median(t_last[name]),
                   "generate_speedup_cpu": median(c_dec["dense fp32"]) / median(c_dec[name]),
                   "weight_bytes": wb, "weight_vs_dense_fp16": wb / fp16_bytes,
                   "rss_load_bytes": rss.get("rss_after_load", 0) - rss.get("rss_baseline", 0) if rss else None,
                   "logits_max_rel_err": _rel_err(m(ids[:, :32]).logits.float(), ref)}
            out.append(row)
        for name, v in nll.items():
            if name == "dense fp32":
                continue
            row = next((r for r in out if r["artifact"] == spec and r["runtime"] == name), None)
            change = {"ppl": math.exp(float(v.sum()) / (ppl_windows * (seqlen - 1))),
                      **_rel_change(v, nll["dense fp32"], seqlen - 1)}
            if row is None:
                out.append({"artifact": spec, "label": index["label"], "runtime": name, **change})
            else:
                row.update(change)
        if nll:
            base = next(r for r in out if r["artifact"] == spec and r["runtime"] == "dense fp32")
            base["ppl"] = math.exp(float(nll["dense fp32"].sum()) / (ppl_windows * (seqlen - 1)))
            base["ppl_windows"] = ppl_windows
        del models
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model for the memory and model sections ('none' to skip)")
    p.add_argument("--shapes", default="576x576,1536x576,576x1536,4096x4096", help="linear shapes out x in")
    p.add_argument("--tokens", default="1,128", help="tokens per linear call (1 = decoding)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.05, help="seconds per timed run of the fp32 baseline")
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--model-repeats", type=int, default=3)
    p.add_argument("--sections", default="memory,linear,model",
                   help="comma separated, of memory, linear, model, dequant, runtime")
    p.add_argument("--dequant-shapes", default="576x576,192x576,1536x576,576x1536,5632x2048,2048x5632,49152x576",
                   help="dequant section: shapes out x in (SmolLM2's, a 2048-wide Llama's MLP, SmolLM2's head)")
    p.add_argument("--fp32-int-max-tokens", type=int, default=1,
                   help="time the int8/int4 kernels' slow fp32-activation path only up to this many tokens")
    p.add_argument("--recipes", default=",".join(RECIPES), help="memory-section recipes, of " + ", ".join(RECIPES))
    p.add_argument("--artifacts", default="", help="runtime section: ctp-compressed model directories, comma-separated")
    p.add_argument("--ppl-windows", type=int, default=0, help="runtime section: c4 test windows of 512 for perplexity")
    p.add_argument("--runtimes", default=None,
                   help="runtime section: the rows beside 'dense fp32', ';'-separated, of " + "; ".join(RUNTIMES))
    p.add_argument("--no-stored-dtypes", action="store_true",
                   help="runtime section: skip the perplexity of the dense parts stored in fp16/bf16")
    p.add_argument("--random-llama", default="", metavar="HIDDEN:LAYERS",
                   help="runtime section: also a random-weight Llama of this size, RTN 4-bit g64 (e.g. 2048:8)")
    args = p.parse_args(argv)
    device = setup(args)
    t_start = time.perf_counter()
    sections = set(args.sections.split(","))
    result: dict[str, Any] = {"bench": "inference", "machine": machine(), "device": str(device), "args": vars(args)}

    if "linear" in sections:
        tokens = [int(t) for t in args.tokens.split(",")]
        result["linear"], result["linear_unavailable"] = bench_linear(parse_shapes(args.shapes), tokens, args.repeats,
                                                                      args.min_time, device, args.fp32_int_max_tokens)
    if "dequant" in sections:
        tokens = int(args.tokens.split(",")[-1])
        result["dequant"] = bench_dequant(parse_shapes(args.dequant_shapes), tokens, args.repeats, args.min_time)
    use_model = args.model and args.model.lower() != "none"
    if "memory" in sections and use_model:
        from ctp.models.load import load_model

        model, tok, _ = load_model(args.model)
        result["memory"] = bench_memory(model, tok, args.recipes.split(","))
        del model
    if "model" in sections and use_model:
        result["model"] = bench_model(args.model, args.prefill, args.decode, args.model_repeats, device)
    if "runtime" in sections and (args.artifacts or args.random_llama):
        with tempfile.TemporaryDirectory() as tmp:
            arts = [a for a in args.artifacts.split(",") if a]
            tok = args.model if use_model else "smollm2-135m"
            rand = [random_llama_artifact(args.random_llama, tmp, tok)] if args.random_llama else []
            runtimes = None if args.runtimes is None else [r.strip() for r in args.runtimes.split(";") if r.strip()]
            unknown = sorted(set(runtimes or ()) - set(RUNTIMES))
            if unknown:
                raise SystemExit(f"unknown --runtimes {unknown}: use {'; '.join(RUNTIMES)}")
            result["runtime"] = bench_runtime(arts, args.prefill, args.decode, args.model_repeats, args.ppl_windows,
                                              device, runtimes, not args.no_stored_dtypes)
            if rand:  # no perplexity for random weights
                result["runtime"] += bench_runtime(rand, args.prefill, args.decode, args.model_repeats, 0, device,
                                                   runtimes)
    return finish(result, args, t_start, report)


def report(r: dict[str, Any]) -> str:
    parts = [headline("inference", r)]
    if r.get("memory"):
        parts.append(table(r["memory"], ["format", "weights_bytes", "vs_fp32", "weights_bytes_dense_fp16",
                                         "linear_bytes", "linear_bits_per_weight", "linear_vs_fp16"],
                           "weight memory (artifact written by save_compressed; dense part fp32 unless noted)"))
    if r.get("linear"):
        parts.append(table(r["linear"], ["shape", "tokens", "format", "us_per_call", "speedup_vs_fp32",
                                         "speedup_cpu", "tokens_per_s", "weight_bytes", "max_rel_err"],
                           "one linear layer, medians (speedup: dense fp32 time / format time, same run)"))
        if r.get("linear_unavailable"):
            parts.append("unavailable here:\n" + "\n".join(f"  {k}: {v}" for k, v in r["linear_unavailable"].items()))
    if r.get("dequant"):
        parts.append(table(r["dequant"], ["shape", "kind", "tokens", "path", "ms_per_call", "vs_dense_matmul",
                                          "speed_vs_dense", "tiles", "max_rel_err"],
                           "a packed layer's long-input path against the dense fp32 matmul, medians"))
    mo = r.get("model")
    if mo:
        parts.append(table(mo["rows"], ["format", "prefill_tokens_per_s", "prefill_speedup", "prefill_speedup_cpu",
                                        "decode_tokens_per_s", "decode_speedup", "decode_speedup_cpu",
                                        "decoder_weight_bytes"],
                           f"whole model {mo['model']}: prefill {mo['prefill_tokens']} tokens, greedy decode "
                           f"{mo['decode_tokens']} tokens after {mo['decode_context']}, medians of {mo['repeats']}"))
        parts.append("logits checks: " + ", ".join(f"{k} {v:.2e}" for k, v in mo["checks"].items()))
        if mo["skipped"]:
            parts.append("skipped: " + ", ".join(f"{k} ({v})" for k, v in mo["skipped"].items()))
    if r.get("runtime"):
        parts.append(table(r["runtime"], ["label", "runtime", "packed_linears", "prefill_tokens_per_s",
                                          "prefill_speedup", "prefill_speedup_cpu", "prefill_last_speedup",
                                          "decode_tokens_per_s", "decode_speedup", "generate_speedup_cpu",
                                          "weight_bytes",
                                          "weight_vs_dense_fp16", "rss_load_bytes", "logits_max_rel_err", "ppl",
                                          "ppl_rel_change", "ppl_rel_low", "ppl_rel_high"],
                           "loaded ctp artifacts (speedups against the dense fp32 rebuild of the same artifact)"))
    parts.append(f"wall time {r['wall_s']:.0f}s")
    return "\n\n".join(parts)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
