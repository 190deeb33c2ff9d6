"""Cost of a distillation step: next-token loss, the exact KL with the teacher online, and the top-k cache.

Trains the same prefix for ``--steps`` steps four times on a compressed model and
reports the process CPU time per step: ``nll``; ``kd`` with the teacher run
online (exact KL over the vocabulary); ``kd`` with ``--teacher-topk K`` while the
cache fills (the teacher runs once per window); and ``kd`` again reading the
filled cache (no teacher forward). The last two reach the same loss (the same
targets), which the report shows.

    OMP_NUM_THREADS=1 python -m bench.teacher_cache --compressed runs/sp50q4 --threads 1 \\
        --json bench/results/teacher_cache.json
"""

from __future__ import annotations

import tempfile
import time

from bench._common import base_parser, finish, headline, machine, setup, table


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--compressed", required=True, help="a ctp compress directory that records its source")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--tokens", type=int, default=25)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args(argv)
    device = setup(args)
    t_start = time.perf_counter()

    from ctp.commands.train_prompt import teacher_spec
    from ctp.models.load import load_model
    from ctp.prompt.soft import PromptConfig
    from ctp.prompt.teacher import Teacher
    from ctp.prompt.train import TrainConfig, train_prompt

    model, tok, info = load_model(args.compressed, device=str(device))
    spec = teacher_spec(None, info)
    if spec is None:
        raise SystemExit(f"{args.compressed} records no uncompressed source")
    full, _, _ = load_model(spec, device=str(device))
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        runs = [("nll", "nll", None, 0), ("kd, teacher online (exact)", "kd", full, 0),
                (f"kd, top-{args.topk} cache filling", "kd", Teacher(full, topk=args.topk, cache_dir=cache), args.topk),
                (f"kd, top-{args.topk} cache read", "kd", Teacher(full, topk=args.topk, cache_dir=cache), args.topk)]
        for name, objective, teacher, topk in runs:
            cfg = TrainConfig(lr=1e-2, seqlen=args.seqlen, batch_size=args.batch_size, steps=args.steps,
                              warmup_steps=2, eval_every=10**6, eval_windows=1, checkpoint_every=0,
                              objective=objective, teacher_topk=topk)
            t0, c0 = time.perf_counter(), time.process_time()
            _, h = train_prompt(model, tok, info, PromptConfig(num_tokens=args.tokens, kind="prefix"), cfg,
                                progress=False, teacher=teacher)
            rows.append({"run": name, "cpu_s_per_step": (time.process_time() - c0) / args.steps,
                         "wall_s_per_step": (time.perf_counter() - t0) / args.steps, "final_loss": h.train_loss[-1]})
    result = {"machine": machine(), "device": str(device), "args": vars(args), "rows": rows}
    return finish(result, args, t_start, _report)


def _report(r: dict) -> str:
    return "\n".join([headline("teacher_cache", r),
                      table(r["rows"], ["run", "cpu_s_per_step", "wall_s_per_step", "final_loss"],
                            f"{r['args']['steps']} steps of {r['args']['batch_size']} x {r['args']['seqlen']} tokens")])


if __name__ == "__main__":
    main()
