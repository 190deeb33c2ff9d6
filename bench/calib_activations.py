"""Calibration activations kept in 16 bits between blocks: what it changes in the compressed model.

Compresses one model with one recipe twice, with the calibration activations kept in fp32 (the default) and
in ``--activations`` (``CompressConfig.activations``), on the same calibration windows, one thread each; then
scores both on the same ``--windows`` test windows of ``--seqlen`` tokens of each dataset and reports the
perplexity change with a paired 95% t-interval over windows, the share of quantization codes / pruning-mask
entries that differ, the compression times and the activations' bytes.

    OMP_NUM_THREADS=1 python -m bench.calib_activations --threads 1 --json bench/results/calib_activations.json
"""

from __future__ import annotations

import math
import time

import torch

from bench._common import base_parser, finish, headline, machine, setup, table


def _paired(a: torch.Tensor, b: torch.Tensor, tokens: int) -> dict:
    """Perplexity of each side and the change of b against a in %, with a paired 95% t-interval over windows."""
    from ctp.eval.stats import t95

    d = (b - a) / tokens  # per-window change of the mean NLL
    n = d.numel()
    mean, se = float(d.mean()), float(d.std(unbiased=True)) / math.sqrt(n)
    pct = lambda x: 100 * (math.exp(x) - 1)  # noqa: E731
    return {"ppl_fp32": math.exp(float(a.sum()) / (n * tokens)), "ppl_low": math.exp(float(b.sum()) / (n * tokens)),
            "change_pct": pct(mean), "ci_pct": [pct(mean - t95(n - 1) * se), pct(mean + t95(n - 1) * se)]}


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default='{"prune": {"sparsity": 0.5}, "quant": {"bits": 4, "group_size": 64}}',
                   help="a CompressConfig as JSON (prune / quant)")
    p.add_argument("--activations", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--datasets", default="c4,wikitext2")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args(argv)
    device = setup(args)
    t_start = time.perf_counter()

    import json

    from ctp.compress.config import CompressConfig
    from ctp.compress.driver import compress_model
    from ctp.data.corpora import corpus_ids, eval_windows, leading_ids
    from ctp.lm import window_nlls
    from ctp.models.load import load_model

    recipe = json.loads(args.recipe)
    models, runs = {}, []
    for store in ("float32", args.activations):
        model, tok, _ = load_model(args.model, device=str(device))
        cfg = CompressConfig.from_dict({**recipe, "nsamples": args.nsamples, "seqlen": args.calib_seqlen,
                                        "activations": store})
        t0 = time.process_time()
        report = compress_model(model, tok, cfg, device=device, progress=False)
        hidden = model.get_input_embeddings().weight.shape[1]
        runs.append({"activations": store, "compress_cpu_s": time.process_time() - t0,
                     "mean_rel_error": report.mean_rel_error,
                     "activation_mb": 2 * args.nsamples * args.calib_seqlen * hidden
                     * torch.finfo(getattr(torch, store)).bits / 8 / 2**20})
        models[store] = (model, report)
    (ref, r_ref), (low, r_low) = models["float32"], models[args.activations]
    differ, total = 0, 0
    for name, cw in r_ref.compressed.items():
        other = r_low.compressed[name]
        a, b = cw.weight, other.weight
        differ += int((a != b).sum())
        total += a.numel()
    rows = []
    for ds in args.datasets.split(","):
        ids, _ = corpus_ids(ds, "test", tok)
        w = eval_windows(ids, args.seqlen, args.windows, lead=leading_ids(tok))
        a, b = window_nlls(ref, w), window_nlls(low, w)
        rows.append({"dataset": ds, "windows": w.shape[0], "tokens": w.shape[0] * (args.seqlen - 1),
                     **_paired(a, b, args.seqlen - 1)})
    result = {"machine": machine(), "device": str(device), "args": vars(args), "runs": runs, "rows": rows,
              "weights_differing": differ / total}
    return finish(result, args, t_start, _report)


def _report(r: dict) -> str:
    return "\n".join([
        headline("Calibration activations in 16 bits", r),
        table(r["runs"], ["activations", "compress_cpu_s", "activation_mb", "mean_rel_error"], "compression"),
        f"compressed weights that differ: {100 * r['weights_differing']:.2f}%",
        table(r["rows"], ["dataset", "windows", "tokens", "ppl_fp32", "ppl_low", "change_pct", "ci_pct"],
              "perplexity, paired over windows"),
    ])


if __name__ == "__main__":
    main()
