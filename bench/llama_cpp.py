"""A GGUF export run in llama.cpp: its perplexity against ctp's on the same windows.

``ctp export --format gguf`` writes ctp's codes as Q4_1 / Q8_0 blocks; this runs the file in
llama.cpp (through ``llama-cpp-python``, which compiles llama.cpp when pip installs it: a
source-only package, ~15 minutes on one core, hence a benchmark and not a test) and scores
the same c4 test windows, token ids given directly (no tokenizer difference can enter), with
ctp's dense fp32 rebuild of the artifact. The difference should be the format's fp16 block
scales and llama.cpp's own arithmetic (it quantizes activations to 8 bits for Q4_1 / Q8_0
dot products), nothing more.

    pip install --no-deps llama-cpp-python==0.3.36        # compiles llama.cpp
    python -m bench.llama_cpp --artifact runs/art/gptq4g64 --windows 8 --json bench/results/llama_cpp.json
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import numpy as np
import torch

from bench._common import base_parser, finish, headline, machine, setup, table


def llama_cpp_window_nlls(gguf_path: str, windows: torch.Tensor, threads: int) -> torch.Tensor:
    """Summed NLL of tokens 2..T of each window (n, T) under llama.cpp."""
    from llama_cpp import Llama

    T = windows.shape[1]
    llm = Llama(model_path=gguf_path, n_ctx=T, n_batch=T, n_threads=threads, logits_all=True, verbose=False)
    out = []
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:T], dtype=np.float64)  # (T, vocab)
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        out.append(-sum(logp[t, w[t + 1]] for t in range(T - 1)))
    return torch.tensor(out, dtype=torch.float64)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True, help="a ctp-compressed model (4-bit or symmetric 8-bit grid)")
    p.add_argument("--windows", type=int, default=8, help="c4 test windows")
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args(argv)
    device = setup(args)
    t0 = time.perf_counter()
    from ctp.compress.formats import export_model
    from ctp.data.corpora import corpus_ids, eval_windows
    from ctp.eval.stats import mean_ci
    from ctp.lm import window_nlls
    from ctp.models.load import load_model

    model, tok, info = load_model(args.artifact)
    ids, _ = corpus_ids("c4", "test", tok)
    windows = eval_windows(ids, args.seqlen, args.windows)
    ours = window_nlls(model, windows)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/model.gguf"
        summary = export_model(args.artifact, path, "gguf")
        theirs = llama_cpp_window_nlls(path, windows, args.threads or 1)
    n = args.seqlen - 1
    d = ((theirs - ours) / n).tolist()
    _, lo, hi = mean_ci(d)
    mean = sum(d) / len(d)
    rows = [{"runner": "ctp (dense fp32 rebuild)", "ppl": math.exp(float(ours.sum()) / (len(d) * n))},
            {"runner": f"llama.cpp ({'/'.join(summary['block_types'])})",
             "ppl": math.exp(float(theirs.sum()) / (len(d) * n))}]
    result = {"bench": "llama_cpp", "machine": machine(), "device": str(device), "args": vars(args),
              "label": info.compression["label"], "windows": len(d), "tokens": len(d) * n, "rows": rows,
              "ppl_rel_change": math.expm1(mean), "ppl_rel_low": math.expm1(lo), "ppl_rel_high": math.expm1(hi),
              "gguf_bytes": summary["bytes"]}
    return finish(result, args, t0, report)


def report(r: dict[str, Any]) -> str:
    return "\n\n".join([headline("llama_cpp", r), table(r["rows"], ["runner", "ppl"],
                        f"{r['label']}: c4 test, {r['windows']} windows, {r['tokens']} tokens"),
                        f"llama.cpp vs ctp: {100 * r['ppl_rel_change']:+.3f}% "
                        f"[{100 * r['ppl_rel_low']:+.3f}, {100 * r['ppl_rel_high']:+.3f}] (paired 95% interval)"])


if __name__ == "__main__":
    main()
