"""Prompt-training throughput: tokens/s and peak memory, with and without checkpointing, fp32 vs bf16.

One training step is exactly what :func:`ctp.prompt.train.train_prompt` does per step
(same functions: :func:`ctp.lm.token_nll` under
:func:`~ctp.prompt.train.autocast_context`, inside
:func:`~ctp.prompt.train.checkpointed_layers`, backward into the fp32 prompt, gradient
clipping, AdamW), on batches drawn as the trainer draws them
(:func:`ctp.data.corpora.sample_windows` with :func:`~ctp.prompt.train.step_seed`).
The configurations are timed alternately, step by step, in one process: each has its
own prompt and optimizer, started from the same initial prompt, so ``fp32`` and
``fp32+ckpt`` see the same batches and must produce the same losses (checked: gradient
checkpointing recomputes, it does not approximate).

Peak memory: on CPU each configuration runs again in a fresh subprocess (a process's
heap only grows, so peaks cannot be compared within one), and the highest resident set
size seen during its steps, minus the size before the first step, is reported. On CUDA,
``torch.cuda.max_memory_allocated`` over a step, minus the allocation before it.

A short run of the real trainer (``train_prompt``, fp32, no checkpointing) cross-checks the
replicated step's time (``--trainer-steps 0`` skips it).

``--processes N`` measures data parallelism instead: the real trainer with the same global
batch on 1 process and on N (``accelerate launch``; gloo on CPU), launches alternating
1, N, N, 1, each process with ``--threads`` threads. It reports wall and summed CPU seconds
per step and checks that both give the same losses.

    python -m bench.prompt_train          # smollm2-135m, seqlen 256, batch 2
    python -m bench.prompt_train --threads 1 --processes 2
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench._common import PeakRSS, base_parser, finish, headline, machine, median, setup, sync, table

log = logging.getLogger(__name__)

CONFIGS = {  # name -> (precision, gradient checkpointing)
    "fp32": ("no", False),
    "fp32+ckpt": ("no", True),
    "bf16": ("bf16", False),
    "bf16+ckpt": ("bf16", True),
}


@dataclass
class _Run:
    """One configuration's training state."""

    name: str
    mode: str
    ckpt: bool
    prompt: nn.Parameter
    opt: torch.optim.Optimizer


def _make_run(name: str, init: torch.Tensor, device: torch.device, lr: float = 1e-2) -> _Run:
    from ctp.prompt.train import resolve_precision

    precision, ckpt = CONFIGS[name]
    prompt = nn.Parameter(init.clone().to(device=device, dtype=torch.float32))
    opt = torch.optim.AdamW([{"params": [prompt], "weight_decay": 1e-5}], lr=lr)
    return _Run(name, resolve_precision(precision, device), ckpt, prompt, opt)


def train_step(model: nn.Module, run: _Run, batch: torch.Tensor, grad_clip: float = 1.0) -> float:
    """One prompt-training step as ``train_prompt`` takes it; returns the loss."""
    from ctp.lm import token_nll
    from ctp.prompt.train import autocast_context, checkpointed_layers

    with checkpointed_layers(model, run.ckpt):
        with autocast_context(run.mode, batch.device):
            loss = token_nll(model, batch, run.prompt).mean()
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
    torch.nn.utils.clip_grad_norm_([run.prompt], grad_clip)
    run.opt.step()
    return float(loss.detach())


def _setup(spec: str, seqlen: int, prompt_tokens: int, device: torch.device):
    """(model, tokenizer, info, train token ids, initial prompt) as the trainer builds them."""
    from ctp.data.corpora import corpus_ids
    from ctp.models.load import load_model
    from ctp.prompt.soft import PromptConfig, init_prompt

    model, tok, info = load_model(spec, device=str(device))
    model.eval()
    model.requires_grad_(False)
    ids, _ = corpus_ids("c4", "train", tok)
    init = init_prompt(model, tok, PromptConfig(num_tokens=prompt_tokens)).float()
    return model, tok, info, ids, init


def _batch(ids: torch.Tensor, batch_size: int, seqlen: int, step: int, device: torch.device) -> torch.Tensor:
    from ctp.data.corpora import sample_windows
    from ctp.prompt.train import step_seed

    return sample_windows(ids, batch_size, seqlen, seed=step_seed(0, step)).to(device)  # (batch_size, seqlen)


def bench_steps(model, ids, init, names, batch_size, seqlen, steps, warmup, device) -> dict[str, Any]:
    """Time ``steps`` steps per configuration, interleaved; losses of every step."""
    runs = [_make_run(n, init, device) for n in names]
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    peak_cuda: dict[str, int] = {n: 0 for n in names}
    for step in range(warmup + steps):
        batch = _batch(ids, batch_size, seqlen, step, device)
        order = runs if step % 2 == 0 else runs[::-1]
        for run in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = train_step(model, run, batch)
            sync(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            losses[run.name].append(loss)
            if device.type == "cuda":
                peak_cuda[run.name] = max(peak_cuda[run.name], torch.cuda.max_memory_allocated() - before)
            if step >= warmup:
                times[run.name].append(dt)
                cpu[run.name].append(dc)
            log.info("step %d %s: %.2fs loss %.4f", step, run.name, dt, loss)
    out = {"times": times, "cpu": cpu, "losses": losses}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = peak_cuda
    return out


def memory_worker(name: str, spec: str, batch_size: int, seqlen: int, prompt_tokens: int, steps: int) -> dict:
    """Peak RSS growth of ``steps`` training steps of configuration ``name`` (run in a fresh process)."""
    device = torch.device("cpu")
    model, _, _, ids, init = _setup(spec, seqlen, prompt_tokens, device)
    run = _make_run(name, init, device)
    batches = [_batch(ids, batch_size, seqlen, s, device) for s in range(steps)]
    with PeakRSS() as peak:
        for b in batches:
            train_step(model, run, b)
    return {"config": name, "peak_rss_delta_bytes": peak.delta, "rss_before_bytes": peak.start}


def _memory_subprocess(name: str, args) -> dict:
    cmd = [sys.executable, "-m", "bench.prompt_train", "--worker", name, "--model", args.model,
           "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen),
           "--prompt-tokens", str(args.prompt_tokens), "--memory-steps", str(args.memory_steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    root = Path(__file__).resolve().parents[1]  # the repository root, where `bench` is importable
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_trainer(model, tok, info, batch_size, seqlen, prompt_tokens, steps) -> dict[str, Any]:
    """Seconds per step of the real ``train_prompt`` (fp32), from its per-step callback."""
    from ctp.prompt.soft import PromptConfig
    from ctp.prompt.train import TrainConfig, train_prompt

    stamps: list[tuple[float, float]] = []  # (wall, process CPU) after each step
    cfg = TrainConfig(seqlen=seqlen, batch_size=batch_size, steps=steps, eval_every=steps, eval_windows=1,
                      checkpoint_every=0, precision="no", lr=1e-2)
    t0 = time.perf_counter()
    _, hist = train_prompt(model, tok, info, PromptConfig(num_tokens=prompt_tokens), cfg, progress=False,
                           callback=lambda *_: stamps.append((time.perf_counter(), time.process_time())))
    # callbacks come after each step; the last one also follows the final evaluation
    clean = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps[:-2], stamps[1:-1])]
    return {"steps": steps, "step_s": median([w for w, _ in clean]) if clean else None,
            "step_cpu_s": median([c for _, c in clean]) if clean else None, "total_s": time.perf_counter() - t0,
            "losses": hist.train_loss}


def dp_worker(args) -> dict[str, Any] | None:
    """The real trainer in one process of a launched group; the main process returns the group's figures."""
    from ctp import distributed

    device = torch.device(distributed.init_from_env(args.device))
    model, tok, info, _, _ = _setup(args.model, args.seqlen, args.prompt_tokens, device)
    tr = bench_trainer(model, tok, info, args.batch_size, args.seqlen, args.prompt_tokens, args.trainer_steps)
    cpu = distributed.gather(tr["step_cpu_s"])
    if not distributed.is_main():
        return None
    return {"processes": len(cpu), "step_s": tr["step_s"], "step_cpu_s": sum(cpu), "losses": tr["losses"]}


def _dp_subprocess(n: int, args) -> dict[str, Any]:
    worker = ["-m", "bench.prompt_train", "--dp-worker", "--model", args.model, "--device", args.device,
              "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen),
              "--prompt-tokens", str(args.prompt_tokens), "--trainer-steps", str(args.trainer_steps)]
    if args.threads:
        worker += ["--threads", str(args.threads)]
    cmd = [sys.executable] + worker
    if n > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port)] + worker
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"{n}-process trainer failed: {(proc.stderr or proc.stdout).strip().splitlines()[-3:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def bench_data_parallel(args) -> dict[str, Any]:
    """The real trainer on 1 and on ``args.processes`` processes, launches alternating 1, N, N, 1."""
    n = args.processes
    runs: dict[int, list[dict]] = {1: [], n: []}
    for k in (1, n, n, 1):
        runs[k].append(_dp_subprocess(k, args))
        log.info("%d process(es): %.2f s/step", k, runs[k][-1]["step_s"])
    text_tokens = args.batch_size * args.seqlen
    base = median([r["step_s"] for r in runs[1]])
    base_cpu = median([r["step_cpu_s"] for r in runs[1]])
    rows = []
    for k in (1, n):
        t, c = median([r["step_s"] for r in runs[k]]), median([r["step_cpu_s"] for r in runs[k]])
        rows.append({"processes": k, "step_s": t, "tokens_per_s": text_tokens / t, "step_cpu_s": c,
                     "tokens_per_cpu_s": text_tokens / c, "speedup": base / t, "cpu_time_ratio": c / base_cpu})
    losses = [r["losses"] for k in (1, n) for r in runs[k]]
    diff = max(abs(a - b) for other in losses[1:] for a, b in zip(losses[0], other))
    return {"rows": rows, "runs": runs, "checks": {"max_loss_diff_vs_1_process": diff}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first")
    p.add_argument("--configs", default="fp32,fp32+ckpt,bf16", help=f"comma separated, of {', '.join(CONFIGS)}")
    p.add_argument("--memory-steps", type=int, default=1, help="steps per memory subprocess (0: skip, CPU only)")
    p.add_argument("--trainer-steps", type=int, default=3, help="steps of the real train_prompt cross-check (0: skip)")
    p.add_argument("--processes", type=int, default=1,
                   help="N > 1: time the real trainer on N data-parallel processes against 1, instead of the configs")
    p.add_argument("--worker", default=None, help=argparse_hidden())
    p.add_argument("--dp-worker", action="store_true", help=argparse_hidden())
    args = p.parse_args(argv)
    device = setup(args)
    if args.worker:  # a memory subprocess: one JSON line on stdout
        out = memory_worker(args.worker, args.model, args.batch_size, args.seqlen, args.prompt_tokens,
                            args.memory_steps)
        print(json.dumps(out))
        return out
    if args.dp_worker:  # one process of a data-parallel group: the main one prints one JSON line
        out = dp_worker(args)
        if out is not None:
            print(json.dumps(out))
        return out or {}
    if args.processes > 1:
        if args.trainer_steps < 3:
            raise SystemExit("--processes needs --trainer-steps 3 or more (the first and last steps are not timed)")
        t_start = time.perf_counter()
        result = {"bench": "prompt_train_data_parallel", "machine": machine(), "device": str(device),
                  "args": vars(args), **bench_data_parallel(args)}
        return finish(result, args, t_start, report_data_parallel)

    names = args.configs.split(",")
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"unknown config {n!r}; use {', '.join(CONFIGS)}")
    t_start = time.perf_counter()
    result: dict[str, Any] = {"bench": "prompt_train", "machine": machine(), "device": str(device), "args": vars(args)}
    model, tok, info, ids, init = _setup(args.model, args.seqlen, args.prompt_tokens, device)
    steps = bench_steps(model, ids, init, names, args.batch_size, args.seqlen, args.steps, args.warmup, device)
    text_tokens = args.batch_size * args.seqlen
    base = median(steps["times"][names[0]])
    base_cpu = median(steps["cpu"][names[0]])
    rows = []
    for n in names:
        t = median(steps["times"][n])
        tc = median(steps["cpu"][n])
        row = {"config": n, "step_s": t, "tokens_per_s": text_tokens / t, "step_cpu_s": tc,
               "tokens_per_cpu_s": text_tokens / tc,
               "tokens_per_s_with_prompt": args.batch_size * (args.seqlen + args.prompt_tokens) / t,
               f"speedup_vs_{names[0]}": base / t, "speedup_cpu": base_cpu / median(steps["cpu"][n]),
               "first_loss": steps["losses"][n][0]}
        if "peak_cuda_bytes" in steps:
            row["peak_bytes"] = steps["peak_cuda_bytes"][n]
        rows.append(row)
    # checkpointing recomputes exactly: same batches and start -> same losses
    checks = {}
    for prec in ("fp32", "bf16"):
        if prec in names and f"{prec}+ckpt" in names:
            a, b = steps["losses"][prec], steps["losses"][f"{prec}+ckpt"]
            checks[f"{prec}_ckpt_max_loss_diff"] = max(abs(x - y) for x, y in zip(a, b))
    if "fp32" in names and "bf16" in names:
        checks["bf16_vs_fp32_first_loss_diff"] = abs(steps["losses"]["bf16"][0] - steps["losses"]["fp32"][0])
    result["steps"] = rows
    result["losses"] = steps["losses"]
    result["checks"] = checks

    if device.type == "cpu" and args.memory_steps > 0:
        del model
        mem = {n: _memory_subprocess(n, args) for n in names}
        for row in rows:
            row["peak_rss_delta_bytes"] = mem[row["config"]]["peak_rss_delta_bytes"]
        result["memory_method"] = "peak RSS growth during the steps, fresh process per config"
        model = None
    elif device.type == "cuda":
        result["memory_method"] = "torch.cuda.max_memory_allocated over a step minus the allocation before it"
    if args.trainer_steps > 0:
        if model is None:
            model, tok, info, _, _ = _setup(args.model, args.seqlen, args.prompt_tokens, device)
        tr = bench_trainer(model, tok, info, args.batch_size, args.seqlen, args.prompt_tokens, args.trainer_steps)
        if tr["step_s"]:
            tr["tokens_per_s"] = text_tokens / tr["step_s"]
            tr["replica_over_trainer"] = (median(steps["times"]["fp32"]) / tr["step_s"]) if "fp32" in names else None
        result["trainer"] = tr
    result["tokens_per_step"] = text_tokens
    return finish(result, args, t_start, report)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def report(r: dict[str, Any]) -> str:
    a = r["args"]
    parts = [headline("prompt_train", r),
             f"model {a['model']}, batch {a['batch_size']} x seqlen {a['seqlen']} (+{a['prompt_tokens']} prompt "
             f"tokens), medians of {a['steps']} steps after {a['warmup']} warmup, configs interleaved"]
    cols = ["config", "step_s", "tokens_per_s", "tokens_per_s_with_prompt", "step_cpu_s", "tokens_per_cpu_s"]
    cols += [k for k in r["steps"][0] if k.startswith("speedup_vs_")] + ["speedup_cpu"]
    cols += [k for k in ("peak_rss_delta_bytes", "peak_bytes") if k in r["steps"][0]]
    parts.append(table(r["steps"], cols + ["first_loss"]))
    if r.get("memory_method"):
        parts.append(f"memory: {r['memory_method']}")
    parts.append("checks: " + ", ".join(f"{k} {v:.2e}" for k, v in r["checks"].items()))
    tr = r.get("trainer")
    if tr and tr.get("step_s"):
        parts.append(f"real train_prompt (fp32): {tr['step_s']:.2f}s/step = {tr['tokens_per_s']:.0f} tokens/s"
                     + (f"; replicated step / trainer step = {tr['replica_over_trainer']:.2f}"
                        if tr.get("replica_over_trainer") else ""))
    parts.append(f"wall time {r['wall_s']:.0f}s")
    return "\n\n".join(parts)


def report_data_parallel(r: dict[str, Any]) -> str:
    a = r["args"]
    return "\n\n".join([
        headline("prompt_train data parallel", r, threads="torch threads per process"),
        f"model {a['model']}, global batch {a['batch_size']} x seqlen {a['seqlen']} (+{a['prompt_tokens']} prompt "
        f"tokens), real train_prompt, medians of {a['trainer_steps'] - 2} steps, launches 1, N, N, 1",
        table(r["rows"], ["processes", "step_s", "tokens_per_s", "step_cpu_s", "tokens_per_cpu_s", "speedup",
                          "cpu_time_ratio"]),
        "checks: " + ", ".join(f"{k} {v:.2e}" for k, v in r["checks"].items()),
        f"wall time {r['wall_s']:.0f}s",
    ])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
