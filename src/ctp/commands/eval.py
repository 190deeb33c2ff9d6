"""``ctp eval``: perplexity on C4 / Wikitext-2 / PTB, with or without a prompt.

Under ``accelerate launch`` or ``torchrun`` the windows are split across the
processes; the main process prints and writes the (single-process) result.
"""

from __future__ import annotations

from ctp.commands.common import (add_model_args, add_prompt_args, check_json_out, join_launch, load_options,
                                 load_prompt_arg, parse_list,
                                 print_table, write_json)


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model (optionally with a prompt) on text corpora",
                       description="Perplexity following the GPTQ protocol: non-overlapping windows of --seqlen "
                                   "tokens, exp of the mean NLL of every token but each window's first.")
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--datasets", default="c4,wikitext2,ptb", help="comma-separated: c4, wikitext2, ptb")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--seqlen", type=int, default=1024, help="window length in tokens (default 1024, the paper's)")
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many windows per dataset")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--data-source", default="local", choices=["local", "hub"],
                   help="local: corpora shipped by pip packages (offline); hub: standard HF datasets (network)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    from ctp.distributed import is_main, main_first
    from ctp.eval.perplexity import perplexity
    from ctp.models.load import load_model

    check_json_out(args)
    datasets = parse_list(args.datasets, "datasets")
    device = join_launch(args)
    with main_first():  # a named model is converted into the cache once
        model, tok, info = load_model(args.model, **load_options(args), device=device)
    prompt = load_prompt_arg(args.prompt, model, tok, info, args)
    results = [
        perplexity(model, tok, d, args.split, args.seqlen, prompt=prompt, batch_size=args.batch_size,
                   max_windows=args.max_windows, source=args.data_source, progress=not args.quiet)
        for d in datasets
    ]
    if not is_main():
        return 0
    rows = [r.to_dict() for r in results]
    print_table(rows, ["dataset", "split", "seqlen", "n_windows", "n_tokens", "prompt_tokens", "ppl", "ppl_low",
                       "ppl_high"])
    write_json(args.out, {"model": info.to_dict(), "prompt": args.prompt, "results": rows})
    return 0
