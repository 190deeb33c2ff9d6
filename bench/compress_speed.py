"""How fast ctp compresses: per-layer SparseGPT / GPTQ, Hessian accumulation, a whole model, and 7B.

Sections (each a ratio against a baseline timed alternately with it in the same run):

``kernels``  :func:`ctp.compress.kernels.sparsegpt` (50% unstructured) and
             :func:`~ctp.compress.kernels.gptq` (4-bit, one asymmetric grid per row, the
             library default) against :func:`bench._reference.obs_unblocked`, the same
             algorithm without lazy batching, on the default model's shapes and on a
             7B-like 4096x4096 layer. Both must give the same weights: printed are the max
             abs difference, the fraction of equal masks / codes and both reconstruction
             errors ``trace((W-W')H(W-W')^T)``. (GPTQ's rounding can flip a code where a
             value sits within fp32 noise of a rounding boundary; the flipped error then
             propagates along its row, so a handful of codes differ although the math is
             the same. The reconstruction errors show whether that matters.)
             The 4096-wide baseline runs on a slice of ``--big-rows`` rows (the fast path
             on the same slice, for the ratio); the fast path also runs once on the full
             layer for the absolute time.
``hessian``  :func:`~ctp.compress.kernels.accumulate_hessian` on chunks of 8 windows (what
             the driver does) against GPTQ's ``add_batch`` called per sequence, and (on
             fewer tokens) against one rank-1 update per token.
``model``    (opt-in, minutes) :func:`ctp.compress.compress_model` on a real model with
             50% SparseGPT and 4-bit GPTQ, ``--nsamples`` x ``--seqlen`` calibration tokens.
``7b``       an extrapolation to LLaMA-7B from the figures above (assumptions printed).

Inputs are synthetic: W ~ N(0, 0.02^2), H from activations with log-normal channel scales
plus a low-rank shared component (timings do not depend on the values).

    python -m bench.compress_speed                       # kernels + hessian + 7b, a few minutes
    python -m bench.compress_speed --model smollm2-135m  # + whole-model compression
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import Tensor

from bench._common import base_parser, finish, headline, interleaved, machine, median, setup, table, timed_cpu
from bench._reference import hessian_per_sample, hessian_per_token, obs_unblocked
from ctp.compress import kernels as K

log = logging.getLogger(__name__)

DEFAULT_SHAPES = "576x576,1536x576,576x1536"  # SmolLM2-135M: q/o (k/v are 192x576), gate/up, down
SPARSITY = 0.5
BITS = 4

# LLaMA-7B: 32 blocks of q, k, v, o (4096x4096), gate, up (11008x4096), down (4096x11008)
LLAMA7B = {"layers": 32, "hidden": 4096, "intermediate": 11008, "nsamples": 128, "seqlen": 2048,
           "shapes": [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]}


def parse_shapes(s: str) -> list[tuple[int, int]]:
    """'576x576,1536x576' -> [(576, 576), (1536, 576)] as (out, in); '' or 'none' -> []."""
    if not s or s.lower() == "none":
        return []
    out = []
    for part in s.split(","):
        try:
            o, i = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"shape {part!r} is not OUTxIN: write e.g. 576x1536 (comma separated)") from None
        if o < 1 or i < 1:
            raise SystemExit(f"shape {part!r} has an empty side: both OUT and IN must be at least 1")
        out.append((o, i))
    return out


def synthetic_inputs(d: int, tokens: int, seed: int, device: torch.device) -> Tensor:
    """(tokens, d) activations: log-normal channel scales plus a shared rank-16 component."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.7 * torch.randn(d, generator=g))  # (d,)
    X = torch.randn(tokens, d, generator=g) * scale  # (tokens, d)
    X += 0.5 * torch.randn(tokens, 16, generator=g) @ torch.randn(16, d, generator=g)
    return X.to(device)


def synthetic_layer(out_f: int, in_f: int, tokens: int, seed: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(W (out, in), H (in, in)) for one layer."""
    g = torch.Generator().manual_seed(seed + 1)
    W = (0.02 * torch.randn(out_f, in_f, generator=g)).to(device)
    H, _ = K.accumulate_hessian(None, 0, synthetic_inputs(in_f, tokens, seed, device)[None])
    return W, H


def _compare(algo: str, fast: K.KernelResult, base: tuple, W: Tensor, H: Tensor) -> dict[str, Any]:
    """How far the blocked kernel's result is from the unblocked baseline's."""
    Qb, keep_b, codes_b = base
    out: dict[str, Any] = {
        "max_abs_diff": float((fast.weight.float() - Qb).abs().max()),
        "weight_scale": float(W.abs().max()),
        "recon_fast": K.reconstruction_error(W, fast.weight, H),
        "recon_base": K.reconstruction_error(W, Qb, H),
    }
    same = fast.mask == keep_b if algo == "sparsegpt" else fast.codes == codes_b  # masks / codes
    out["agree"] = float(same.float().mean())
    out["mismatches"] = int((~same).sum())
    out["recon_rel_diff"] = abs(out["recon_fast"] - out["recon_base"]) / max(out["recon_base"], 1e-30)
    return out


def _runners(algo: str, W: Tensor, H: Tensor, blocksize: int):
    if algo == "sparsegpt":
        return (lambda: K.sparsegpt(W, H, SPARSITY, blocksize=blocksize),
                lambda: obs_unblocked(W, H, sparsity=SPARSITY, blocksize=blocksize))
    return (lambda: K.gptq(W, H, BITS, blocksize=blocksize),
            lambda: obs_unblocked(W, H, bits=BITS, blocksize=blocksize))


def bench_kernels(shapes, repeats, tokens, blocksize, device, big_rows=None) -> list[dict[str, Any]]:
    """Blocked kernel vs unblocked baseline per (algorithm, shape), interleaved; medians."""
    rows_out = []
    for si, (o, i) in enumerate(shapes):
        W, H = synthetic_layer(o, i, tokens, seed=si, device=device)
        n_rows = o if big_rows is None else min(big_rows, o)
        Ws = W[:n_rows].contiguous()  # (n_rows, in): the rows both paths run on
        for algo in ("sparsegpt", "gptq"):
            fast, base = _runners(algo, Ws, H, blocksize)
            cpu: dict[str, list[float]] = {}
            times, first = interleaved({"fast": fast, "baseline": base}, repeats, device, cpu=cpu)
            row = {"algo": algo, "shape": [o, i], "rows_run": n_rows, "repeats": repeats,
                   "fast_s": median(times["fast"]), "baseline_s": median(times["baseline"])}
            row["speedup"] = row["baseline_s"] / row["fast_s"]
            row["fast_cpu_s"], row["baseline_cpu_s"] = median(cpu["fast"]), median(cpu["baseline"])
            row["speedup_cpu"] = row["baseline_cpu_s"] / row["fast_cpu_s"]  # process CPU time ratio
            row.update(_compare(algo, first["fast"], first["baseline"], Ws, H))
            if n_rows < o:  # the full layer, fast path only, for the absolute per-layer time
                full = _runners(algo, W, H, blocksize)[0]
                row["fast_full_s"], row["fast_full_cpu_s"] = timed_cpu(full, device)
            rows_out.append(row)
            log.info("%s %dx%d: fast %.3fs baseline %.3fs", algo, o, i, row["fast_s"], row["baseline_s"])
        del W, H
    return rows_out


def bench_prepare(d: int, tokens: int, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds of :func:`ctp.compress.kernels.prepare_hessian` (dampening + H^-1 factor) at width d."""
    _, H = synthetic_layer(1, d, tokens, seed=99, device=device)
    return timed_cpu(lambda: K.prepare_hessian(H, 0.01), device)


def bench_hessian(nsamples, seqlen, d, repeats, per_token_samples, device, chunk=8) -> dict[str, Any]:
    """Hessian accumulation: driver-style chunks vs per-sequence add_batch vs per-token rank-1."""
    X = synthetic_inputs(d, nsamples * seqlen, seed=7, device=device).view(nsamples, seqlen, d)  # (n, T, d)

    def batched(X=X):
        H, n = None, 0
        for s in range(0, X.shape[0], chunk):
            H, n = K.accumulate_hessian(H, n, X[s : s + chunk], inplace=H is not None)
        return H

    cpu: dict[str, list[float]] = {}
    times, first = interleaved({"batched": batched, "per_sample": lambda: hessian_per_sample(X)}, repeats, device,
                               cpu=cpu)
    tokens = nsamples * seqlen
    t_fast = median(times["batched"])
    out: dict[str, Any] = {
        "nsamples": nsamples, "seqlen": seqlen, "d": d, "chunk": chunk, "repeats": repeats,
        "batched_s": t_fast, "per_sample_s": median(times["per_sample"]),
        "max_rel_diff_per_sample": float((first["batched"] - first["per_sample"]).abs().max()
                                         / first["per_sample"].abs().max()),
        "batched_tokens_per_s": tokens / t_fast,
        "batched_gflops": 2 * tokens * d * d / t_fast / 1e9,  # the (d, tokens) @ (tokens, d) product
        "s_per_token_d2": t_fast / (tokens * d * d),
    }
    out["speedup_vs_per_sample"] = out["per_sample_s"] / out["batched_s"]
    out["batched_cpu_s"], out["per_sample_cpu_s"] = median(cpu["batched"]), median(cpu["per_sample"])
    out["speedup_vs_per_sample_cpu"] = out["per_sample_cpu_s"] / out["batched_cpu_s"]
    out["batched_gflops_per_cpu_s"] = 2 * tokens * d * d / out["batched_cpu_s"] / 1e9
    out["cpu_s_per_token_d2"] = out["batched_cpu_s"] / (tokens * d * d)
    if per_token_samples:
        Xs = X[:per_token_samples]
        times, first = interleaved({"batched": lambda: batched(Xs), "per_token": lambda: hessian_per_token(Xs)},
                                   max(1, repeats - 1), device)
        out["per_token_tokens"] = per_token_samples * seqlen
        out["per_token_s"] = median(times["per_token"])
        out["batched_small_s"] = median(times["batched"])
        out["speedup_vs_per_token"] = out["per_token_s"] / out["batched_small_s"]
        out["max_rel_diff_per_token"] = float((first["batched"] - first["per_token"]).abs().max()
                                              / first["per_token"].abs().max())
    return out


def bench_model(spec: str, nsamples: int, seqlen: int, device: torch.device,
                which: str = "sparsegpt,gptq,rtn,magnitude") -> list[dict[str, Any]]:
    """Time :func:`ctp.compress.compress_model` on ``spec``: 50% SparseGPT and 4-bit GPTQ (calibrated), RTN 4-bit
    in groups of 64 and 50% magnitude (data-free), and the reference's RTN loop on the same weights."""
    from ctp.compress import CompressConfig, PruneConfig, QuantConfig, compress_model
    from ctp.models.load import load_model

    model, tok, info = load_model(spec)
    recipes = {
        f"sparsegpt{int(SPARSITY * 100)}": CompressConfig(prune=PruneConfig(sparsity=SPARSITY), nsamples=nsamples,
                                                         seqlen=seqlen),
        f"gptq{BITS}": CompressConfig(quant=QuantConfig(bits=BITS), nsamples=nsamples, seqlen=seqlen),
    }
    # data-free methods: no calibration pass (nsamples/seqlen unused)
    recipes[f"rtn{BITS}g64"] = CompressConfig(quant=QuantConfig(method="rtn", bits=BITS, group_size=64))
    recipes[f"magnitude{int(SPARSITY * 100)}"] = CompressConfig(prune=PruneConfig(method="magnitude",
                                                                                  sparsity=SPARSITY))
    recipes = {k: v for k, v in recipes.items() if any(k.startswith(w) for w in which.split(","))}
    out = []
    from bench._reference import rtn_nearest
    from ctp.models.adapter import decoder_layers, linear_layers, weight_matrix

    weights = [weight_matrix(mod) for layer in decoder_layers(model) for mod in linear_layers(layer).values()]
    t0 = time.perf_counter()
    rtn_nearest(weights, BITS, 64)
    out.append({"model": spec, "recipe": f"reference rtn{BITS}g64 (--nearest loop)", "blocks": len(decoder_layers(model)),
                "linears": len(weights), "seconds": time.perf_counter() - t0})
    for label, cfg in recipes.items():
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        rep = compress_model(m, tok, cfg, device=device, progress=False)
        total = time.perf_counter() - t0
        kernel_s = sum(s.get("seconds", 0.0) for s in rep.linear_stats().values())
        out.append({"model": spec, "recipe": label, "nsamples": nsamples, "seqlen": seqlen,
                    "blocks": len(rep.layers), "linears": len(rep.compressed), "seconds": total,
                    "kernel_seconds": kernel_s, "other_seconds": total - kernel_s,
                    "per_block_s": median([la["seconds"] for la in rep.layers]),
                    "mean_rel_error": rep.mean_rel_error})
        del m, rep
    return out


def extrapolate_7b(kernels: list[dict], prep: tuple[float, float] | None, big: tuple[int, int] | None,
                   hessian: dict | None, calibrations: tuple[tuple[int, int], ...] = ((128, 2048),),
                   clock: str = "cpu") -> dict[str, Any]:
    """Time to compress LLaMA-7B, from this run's figures. Assumptions are returned with the numbers.

    ``clock`` 'wall' uses wall seconds; 'cpu' uses process CPU seconds (core-seconds: with one
    thread, the time on one core nobody else uses; the shared machine's waiting is left out).
    ``calibrations``: (nsamples, seqlen) settings for which the Hessian and forward costs are added.
    """
    L = LLAMA7B
    cpu = clock == "cpu"
    out: dict[str, Any] = {"clock": clock, "assumptions": [], "calibrations": []}
    by = {(r["algo"], tuple(r["shape"])): r for r in kernels}
    prep_s = None if prep is None else prep[1 if cpu else 0]
    if big is not None:
        for algo in ("sparsegpt", "gptq"):
            r = by.get((algo, big))
            if r is None:
                continue
            if "fast_full_s" in r:
                t_layer = r["fast_full_cpu_s" if cpu else "fast_full_s"]
            else:
                t_layer = r["fast_cpu_s" if cpu else "fast_s"]
            n = big[1]
            est: dict[str, Any] = {"measured_layer_s": t_layer, "simple_s": t_layer * 7 * L["layers"]}
            if prep_s is not None and big == (4096, 4096):
                # t(rows, cols) = prep * (cols/n)^3 + loop * rows * cols^2 / (rows0 * n^2)
                loop = max(t_layer - prep_s, 0.0)
                est["shape_aware_s"] = sum(prep_s * (c / n) ** 3 + loop * (ro * c * c) / (big[0] * n * n)
                                           for ro, c in L["shapes"]) * L["layers"]
            out[algo] = est
        out["assumptions"] += [
            "simple: the measured 4096x4096 per-layer time x 7 linears x 32 blocks",
            "shape_aware: per-linear time = H-inverse prep (measured at 4096, scaled by cols^3) + OBS loop "
            "(measured at 4096x4096 minus prep, scaled by rows*cols^2), summed over q,k,v,o 4096x4096, "
            "gate,up 11008x4096, down 4096x11008, x 32 blocks",
        ]
    if hessian is not None:
        s = hessian["cpu_s_per_token_d2" if cpu else "s_per_token_d2"]
        gflops = hessian["batched_gflops_per_cpu_s" if cpu else "batched_gflops"] * 1e9
        d2 = sum(c * c for _, c in L["shapes"])  # one Hessian per linear, as the driver hooks each one
        params = sum(r * c for r, c in L["shapes"])  # per block
        passes = {"sparsegpt": 2, "gptq": 5}
        for ns, T in calibrations:
            tokens = ns * T
            c: dict[str, Any] = {"nsamples": ns, "seqlen": T, "hessian_s": s * tokens * d2 * L["layers"],
                                 "forward_pass_s": (2 * params * tokens + 4 * ns * T * T * L["hidden"])
                                 * L["layers"] / gflops}
            for algo in ("sparsegpt", "gptq"):
                if algo in out:
                    extra = c["hessian_s"] + passes[algo] * c["forward_pass_s"]
                    c[f"{algo}_total_simple_s"] = out[algo]["simple_s"] + extra
                    if "shape_aware_s" in out[algo]:
                        c[f"{algo}_total_shape_aware_s"] = out[algo]["shape_aware_s"] + extra
            out["calibrations"].append(c)
        out["assumptions"] += [
            "hessian: this run's batched seconds per token*d^2 x tokens x sum of d^2 over the 7 linears x 32",
            "forward passes at this run's batched-matmul GFLOP/s: 2*params*tokens + 4*T^2*d per sequence per block; "
            "sparsegpt runs each block twice (Hessians, outputs), gptq with true_sequential 5 times "
            "(4 groups + outputs)",
        ]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="out x in shapes, comma separated ('none' to skip)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path at the small shapes")
    p.add_argument("--big", default="4096x4096", help="7B-like shape ('none' to skip)")
    p.add_argument("--big-rows", type=int, default=256, help="rows of the big layer both paths run on for the ratio")
    p.add_argument("--big-repeats", type=int, default=1)
    p.add_argument("--tokens", type=int, default=4096, help="synthetic calibration tokens per Hessian")
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--hessian", default="32x512x576", help="nsamples x seqlen x width ('none' to skip)")
    p.add_argument("--per-token-samples", type=int, default=2, help="sequences in the per-token Hessian baseline")
    p.add_argument("--model", default=None, help="also time compress_model on this model (e.g. smollm2-135m)")
    p.add_argument("--model-recipes", default="sparsegpt,gptq,rtn,magnitude",
                   help="which whole-model recipes to time (comma separated)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args(argv)
    device = setup(args)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"bench": "compress_speed", "machine": machine(), "device": str(device),
                              "args": vars(args)}

    shapes = parse_shapes(args.shapes)
    kernels = bench_kernels(shapes, args.repeats, args.tokens, args.blocksize, device) if shapes else []
    big = parse_shapes(args.big)
    big_shape = big[0] if big else None
    prep = None
    if big_shape is not None:
        kernels += bench_kernels([big_shape], args.big_repeats, max(args.tokens, 2 * big_shape[1]), args.blocksize,
                                 device, big_rows=args.big_rows)
        prep = bench_prepare(big_shape[1], max(args.tokens, 2 * big_shape[1]), device)
    result["kernels"] = kernels
    result["prepare_hessian_s"], result["prepare_hessian_cpu_s"] = prep if prep else (None, None)

    hessian = None
    if args.hessian and args.hessian.lower() != "none":
        n, T, d = (int(x) for x in args.hessian.lower().split("x"))
        hessian = bench_hessian(n, T, d, args.repeats, args.per_token_samples, device)
    result["hessian"] = hessian
    result["model"] = (bench_model(args.model, args.nsamples, args.seqlen, device, args.model_recipes)
                       if args.model else None)
    calibs = tuple(dict.fromkeys([(128, 2048), (args.nsamples, args.seqlen)]))  # the paper's, and this run's
    result["llama7b"] = {clock: extrapolate_7b(kernels, prep, big_shape, hessian, calibs, clock)
                         for clock in ("cpu", "wall")}
    return finish(result, args, t_start, report)


def report(r: dict[str, Any]) -> str:
    """The human-readable summary of a result dict."""
    parts = [headline("compress_speed", r)]
    if r["kernels"]:
        parts.append(table(r["kernels"], ["algo", "shape", "rows_run", "repeats", "fast_s", "baseline_s", "speedup",
                                          "fast_cpu_s", "baseline_cpu_s", "speedup_cpu", "max_abs_diff", "mismatches",
                                          "recon_rel_diff", "fast_full_s", "fast_full_cpu_s"],
                           "per-layer kernel (blocked) vs unblocked OBS baseline, medians"))
    if r.get("prepare_hessian_s") is not None:
        parts.append(f"prepare_hessian (dampening + Cholesky inverse) at the big width: {r['prepare_hessian_s']:.3f}s "
                     f"(CPU {r['prepare_hessian_cpu_s']:.3f}s)")
    h = r.get("hessian")
    if h:
        line = (f"Hessian {h['nsamples']}x{h['seqlen']}x{h['d']}: batched (chunks of {h['chunk']}) "
                f"{h['batched_s']:.3f}s "
                f"({h['batched_gflops']:.1f} GFLOP/s), per-sample loop {h['per_sample_s']:.3f}s -> "
                f"speedup {h['speedup_vs_per_sample']:.2f}x, CPU-time speedup {h['speedup_vs_per_sample_cpu']:.2f}x "
                f"(max rel diff {h['max_rel_diff_per_sample']:.1e}); {h['batched_gflops_per_cpu_s']:.1f} GFLOP per "
                f"CPU-second")
        if "per_token_s" in h:
            line += (f"\n  on {h['per_token_tokens']} tokens: per-token rank-1 loop {h['per_token_s']:.3f}s vs batched "
                     f"{h['batched_small_s']:.4f}s -> speedup {h['speedup_vs_per_token']:.0f}x "
                     f"(max rel diff {h['max_rel_diff_per_token']:.1e})")
        parts.append(line)
    if r.get("model"):
        parts.append(table(r["model"], ["model", "recipe", "nsamples", "seqlen", "blocks", "linears", "seconds",
                                        "kernel_seconds", "other_seconds", "per_block_s", "mean_rel_error"],
                           "whole-model compress_model"))
    for clock, e in (r.get("llama7b") or {}).items():
        lines = []
        for algo in ("sparsegpt", "gptq"):
            if algo in e:
                x = e[algo]
                line = f"  {algo} kernels alone: {x['simple_s'] / 3600:.2f} h (simple)"
                if "shape_aware_s" in x:
                    line += f", {x['shape_aware_s'] / 3600:.2f} h (shape-aware)"
                lines.append(line)
        for c in e.get("calibrations", []):
            line = (f"  calibration {c['nsamples']}x{c['seqlen']}: Hessians {c['hessian_s'] / 3600:.2f} h, one forward "
                    f"pass over all blocks {c['forward_pass_s'] / 3600:.2f} h")
            for algo in ("sparsegpt", "gptq"):
                if f"{algo}_total_simple_s" in c:
                    line += f"; {algo} total {c[f'{algo}_total_simple_s'] / 3600:.1f} h (simple)"
                    if f"{algo}_total_shape_aware_s" in c:
                        line += f" / {c[f'{algo}_total_shape_aware_s'] / 3600:.1f} h (shape-aware)"
            lines.append(line)
        if lines:
            what = "process CPU time (core-hours)" if clock == "cpu" else "wall time on this shared machine"
            parts.append(f"LLaMA-7B extrapolation from {what}:\n" + "\n".join(lines))
    if r.get("llama7b") and r["llama7b"]["cpu"]["assumptions"]:
        parts.append("  assumptions:\n" + "\n".join(f"   - {a}" for a in r["llama7b"]["cpu"]["assumptions"]))
    parts.append(f"wall time {r['wall_s']:.0f}s")
    return "\n\n".join(parts)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
