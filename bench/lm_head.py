"""The LM head's share of a prompt-training step, and what the fused chunked loss saves.

For each model, one prompt-training step (forward and backward into a prefix of
``--tokens`` positions, ``--batch-size`` x ``--seqlen`` tokens) is timed with the
next-token loss computed two ways, alternating step by step in one process:

* ``unfused``: the model's own logits (B, T, V), then cross-entropy, as ctp did
  before (``ctp.lm.text_logits``);
* ``fused (chunk C)``: ``ctp.lm.token_nll``, which runs the LM head and the loss
  over C / V positions at a time and never holds the (B, T, V) logits, for each
  ``--chunks`` value of ``ctp.lm.HEAD_CHUNK_ELEMENTS``.

It also times the LM head and loss alone on the same number of hidden states
(forward and backward), which gives the head's share of the unfused step, and
checks that both losses agree. Peak memory: each configuration runs one step
again in a fresh subprocess, and the highest resident set size during the step,
minus the size before it, is reported (CPU only).

    OMP_NUM_THREADS=1 python -m bench.lm_head --threads 1 --json bench/results/lm_head.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench._common import PeakRSS, base_parser, finish, headline, interleaved, machine, median, setup, table

UNFUSED = "unfused"


def _load(spec: str, device: torch.device) -> nn.Module:
    from ctp.models.load import load_model

    model = load_model(spec, device=str(device))[0]
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _inputs(model: nn.Module, args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from ctp.lm import cache_of_tokens

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(model.config.vocab_size, 32000), (args.batch_size, args.seqlen), generator=g)
    init = cache_of_tokens(model, torch.randint(0, 32000, (args.tokens,), generator=g).to(device))
    return ids.to(device), init


def _loss(name: str, model: nn.Module, ids: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    from ctp import lm

    if name == UNFUSED:
        logits = lm.text_logits(model, ids, prompt)[:, :-1, :].float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    lm.HEAD_CHUNK_ELEMENTS = int(name)
    return lm.token_nll(model, ids, prompt).mean()


def _step(name: str, model: nn.Module, ids: torch.Tensor, prompt: nn.Parameter) -> float:
    prompt.grad = None
    loss = _loss(name, model, ids, prompt)
    loss.backward()
    return float(loss.detach())


def _head_alone(model: nn.Module, ids: torch.Tensor, device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds of the LM head + loss, forward and backward, on (B, T-1) random hidden states, both ways."""
    from ctp.lm import head_nll
    from ctp.models.adapter import head_parts

    _, head, cap = head_parts(model)
    h = nn.Parameter(torch.randn(ids.shape[0], ids.shape[1] - 1, head.weight.shape[1], device=device))
    tgt = ids[:, 1:]

    def unfused():
        z = head(h).float()
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), tgt.reshape(-1)).backward()

    def fused():
        head_nll(h, tgt, head, cap).mean().backward()

    times, _ = interleaved({"unfused": unfused, "fused": fused}, repeats, device, warmup=1)
    return {k: median(v) for k, v in times.items()}


def worker(args) -> dict:
    """One step of configuration ``args.worker`` in this fresh process: peak RSS above the start."""
    device = setup(args)
    model = _load(args.worker_model, device)
    ids, init = _inputs(model, args, device)
    prompt = nn.Parameter(init.clone())
    _step(args.worker, model, ids, prompt)  # first step: allocator warm
    with PeakRSS() as peak:
        _step(args.worker, model, ids, prompt)
    return {"peak_rss_delta_mb": peak.delta / 2**20}


def _memory(name: str, spec: str, args) -> float | None:
    cmd = [sys.executable, "-m", "bench.lm_head", "--worker", name, "--worker-model", spec, "--seqlen",
           str(args.seqlen), "--batch-size", str(args.batch_size), "--tokens", str(args.tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=Path(__file__).parent.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        print(f"memory subprocess for {name} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])["peak_rss_delta_mb"]


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--chunks", nargs="+", type=int, default=[1 << 24, 1 << 26],
                   help="values of ctp.lm.HEAD_CHUNK_ELEMENTS to time")
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    p.add_argument("--tokens", type=int, default=25)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--worker", help=argparse_hidden())
    p.add_argument("--worker-model", help=argparse_hidden())
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    device = setup(args)
    t_start = time.perf_counter()
    rows = []
    for spec in args.models:
        model = _load(spec, device)
        ids, init = _inputs(model, args, device)
        names = [UNFUSED] + [str(c) for c in args.chunks]
        prompts = {n: nn.Parameter(init.clone()) for n in names}
        losses: dict[str, float] = {}
        fns = {n: (lambda n=n: losses.setdefault(n, _step(n, model, ids, prompts[n]))) for n in names}
        cpu: dict[str, list[float]] = {}
        interleaved(fns, args.steps, device, warmup=1, cpu=cpu)
        alone = _head_alone(model, ids, device, args.steps)
        base = median(cpu[UNFUSED])
        for n in names:
            mem = None if args.no_memory or device.type != "cpu" else _memory(n, spec, args)
            rows.append({
                "model": spec, "vocab": model.config.vocab_size,
                "loss": "unfused" if n == UNFUSED else f"fused (chunk {int(n) // model.config.vocab_size} positions)",
                "chunk_elements": None if n == UNFUSED else int(n),
                "cpu_s_per_step": median(cpu[n]), "speedup": base / median(cpu[n]),
                "first_loss": losses[n], "peak_rss_delta_mb": mem,
                "head_loss_alone_s": alone["unfused" if n == UNFUSED else "fused"],
                "head_share_of_unfused_step": alone["unfused"] / base,
            })
    result = {"machine": machine(), "device": str(device), "args": vars(args), "rows": rows}
    return finish(result, args, t_start, _report)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def _report(r: dict) -> str:
    cols = ["model", "vocab", "loss", "cpu_s_per_step", "speedup", "peak_rss_delta_mb", "head_loss_alone_s",
            "head_share_of_unfused_step", "first_loss"]
    return "\n".join([headline("LM head and loss in a prompt-training step", r),
                      table(r["rows"], cols, "CPU seconds per step (median), peak RSS of one step")])


if __name__ == "__main__":
    main()
