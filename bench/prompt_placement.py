"""Where a prefix prompt goes on a model whose tokenizer adds a BOS: in front of ``[<bos>, text]`` or in its place.

ctp puts a learned prompt in the BOS's place, ``[prompt][text]`` with the prompt's first position starting as
the BOS's own (see ``ctp.lm``). This benchmark trains such a prefix with ctp (``--steps`` steps on C4 train with
the demo's recipe: 2 x 256 tokens, lr 1e-2, 6 warm-up steps, next-token loss) and compares it, on the same test
windows and the same scored tokens (text tokens 2.. of each ``[<bos>] + text`` window of ``--seqlen``), with the
compressed model without a prompt, with ``--prompt`` placed in front of the whole window (PEFT's placement, and
ctp's before it placed prompts in the BOS's place: ``[prompt][<bos>][text]``) and with the full model.

    OMP_NUM_THREADS=1 python -m bench.prompt_placement --threads 1 \\
        --compressed runs/gemma/models/q3-<key> --prompt <a prefix learned in front of <bos>> \\
        --json bench/results/prompt_placement_gemma_q3.json
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from bench._common import base_parser, finish, headline, machine, setup, table


def _per_window(model, windows: torch.Tensor, prompt, lead: int, skip: int = 0) -> list[float]:
    """Mean NLL of each window over its scored tokens from position ``skip`` of ``token_nll``'s output."""
    from ctp.lm import token_nll

    with torch.no_grad():
        return [float(token_nll(model, windows[i : i + 1], prompt, lead=lead)[0, skip:].mean())
                for i in range(windows.shape[0])]


def run(args) -> dict:
    t_start = time.perf_counter()
    device = setup(args)
    import ctp.prompt.train as train_mod
    from ctp.commands.train_prompt import teacher_spec
    from ctp.data.corpora import corpus_ids, eval_windows, leading_ids
    from ctp.eval.stats import recovered_share
    from ctp.models.load import load_model
    from ctp.prompt.artifact import load_prompt
    from ctp.prompt.soft import PromptConfig

    model, tok, info = load_model(args.compressed, device=str(device))
    lead = leading_ids(tok)
    if not lead:
        raise SystemExit(f"{args.compressed}'s tokenizer adds no BOS: nothing to place the prompt after")
    pcfg = PromptConfig(num_tokens=args.tokens, kind="prefix")
    tcfg = train_mod.TrainConfig(steps=args.steps, seqlen=args.train_seqlen, batch_size=2, lr=0.01, warmup_steps=6,
                                 eval_every=20, eval_windows=4, objective="nll", checkpoint_every=0)
    out_path = Path(args.json).with_suffix(".safetensors") if args.json else Path("prompt_placement.safetensors")
    if out_path.resolve() == Path(args.prompt).resolve():
        raise SystemExit(f"the trained prefix would be written to {out_path}, which is --prompt: pass another --json")
    t0 = time.process_time()
    _, hist = train_mod.train_prompt(model, tok, info, pcfg, tcfg, out_path=out_path, progress=False)
    train_cpu = time.process_time() - t0
    after = load_prompt(out_path, info).embeddings
    before = load_prompt(args.prompt, info).embeddings
    full, _, _ = load_model(teacher_spec(None, info), device=str(device))

    rows = []
    for ds in args.datasets.split(","):
        w = eval_windows(corpus_ids(ds, "test", tok)[0], args.seqlen, args.windows, lead=lead)  # [<bos>] + text
        f, n = _per_window(full, w, None, 1), _per_window(model, w, None, 1)
        a = _per_window(model, w, before, 0, skip=1)  # [prefix][<bos>][text], the same scored tokens
        b = _per_window(model, w, after, 1)  # [prefix starting as <bos>][text]
        ppl = lambda v: math.exp(sum(v) / len(v))  # noqa: E731
        sa, sb = recovered_share(n, a, f), recovered_share(n, b, f)
        rows.append({"dataset": ds, "windows": w.shape[0], "tokens": w.shape[0] * (args.seqlen - 2),
                     "full": ppl(f), "none": ppl(n), "before_bos": ppl(a), "after_bos": ppl(b),
                     "share_before": f"{100 * sa[0]:.0f}% [{100 * sa[1]:.0f}, {100 * sa[2]:.0f}]",
                     "share_after": f"{100 * sb[0]:.0f}% [{100 * sb[1]:.0f}, {100 * sb[2]:.0f}]",
                     "share_before_raw": sa, "share_after_raw": sb})
    result = {"machine": machine(), "device": str(device), "args": vars(args), "train_cpu_s": train_cpu,
              "best_val_ppl": hist.best_val_ppl, "rows": rows}
    return finish(result, args, t_start, _report)


def _report(r: dict) -> str:
    return "\n".join([
        headline("Prefix placement on a model with a BOS", r),
        f"training: {r['train_cpu_s']:.0f} CPU-s, best validation PPL {r['best_val_ppl']:.2f}",
        table(r["rows"], ["dataset", "windows", "tokens", "full", "none", "before_bos", "after_bos", "share_before",
                          "share_after"], "test perplexity and recovered share of the gap (paired bootstrap 95%)"),
    ])


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--compressed", required=True, help="a ctp-compressed model whose tokenizer adds a BOS")
    p.add_argument("--prompt", required=True, help="a prefix learned on that model in front of <bos> (PEFT's placement)")
    p.add_argument("--tokens", type=int, default=25)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--windows", type=int, default=60, help="test windows per dataset")
    p.add_argument("--seqlen", type=int, default=512, help="test window length, <bos> included")
    p.add_argument("--train-seqlen", type=int, default=256)
    p.add_argument("--datasets", default="c4,wikitext2")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
