"""``ctp generate``: continue questions with a model, optionally after a learned (soft or prefix) or hard prompt.

``--compare`` answers every question three ways, as the paper's Figure 1 does:
with no prompt, with the paper's hand-written hard prompt, and with the learned
prompt given by ``--prompt``. The prompt's KV cache is computed once and reused
for every question.
"""

from __future__ import annotations

import textwrap

from ctp.commands.common import (add_model_args, add_prompt_args, check_json_out, device_of, load_options,
                                 load_prompt_arg, write_json)
from ctp.errors import require


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text, optionally with a learned or hard prompt (KV-cached)",
                       description="Continue each QUESTION. --prompt P.safetensors prepends a learned prompt, "
                                   "--prompt hard the paper's hand-written one; --compare shows no prompt, the "
                                   "hard prompt and the learned prompt side by side.")
    add_model_args(p, runtime="decode")
    add_prompt_args(p)
    p.add_argument("questions", nargs="+", metavar="QUESTION", help="text(s) to continue")
    p.add_argument("--compare", action="store_true",
                   help="answer with no prompt, the hard prompt and the --prompt learned prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling filter, 0 off (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--stats", action="store_true", help="print prefill and per-token timings")
    p.add_argument("--out", default=None, help="write answers and timings as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    from ctp.models.load import load_model
    from ctp.prompt.embed import hard_prompt
    from ctp.prompt.generate import PrefixCachedGenerator, SamplingConfig
    check_json_out(args)

    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, seed=args.seed, stop_at_eos=not args.no_stop)
    model, tok, info = load_model(args.model, **load_options(args), device=device_of(args))
    if args.compare:
        require(args.prompt not in (None, "hard"), "--compare needs a learned prompt to compare",
                "pass --prompt P.safetensors (learned with ctp train-prompt)")
        variants = [("no prompt", None), ("hard prompt", hard_prompt(model, tok)),
                    ("learned prompt", load_prompt_arg(args.prompt, model, tok, info, args))]
    else:
        name = "no prompt" if args.prompt is None else ("hard prompt" if args.prompt == "hard" else "learned prompt")
        variants = [(name, load_prompt_arg(args.prompt, model, tok, info, args))]

    generators = [(name, PrefixCachedGenerator(model, tok, prompt)) for name, prompt in variants]
    results = []
    width = max(len(name) for name, _ in generators)
    for q in args.questions:
        print(f"Q: {q}")
        answers = {}
        for name, gen in generators:
            g = gen.generate(q, cfg)
            answers[name] = {"text": g.text, "stats": g.stats.to_dict()}
            body = textwrap.indent(textwrap.fill(" ".join(g.text.split()) or "(empty)", 100),
                                   " " * (width + 5)).lstrip()
            print(f"  [{name}]{' ' * (width - len(name))} {body}")
            if args.stats:
                s = g.stats
                print(f"  {' ' * (width + 3)}prompt {s.prompt_tokens} tok (cache {s.prefix_seconds * 1e3:.1f} ms, once), "
                      f"prefill {s.input_tokens} tok {s.prefill_seconds * 1e3:.1f} ms, "
                      f"{s.new_tokens} new tok at {s.per_token_seconds * 1e3:.1f} ms/tok")
        results.append({"question": q, "answers": answers})
        print()
    write_json(args.out, {"model": info.to_dict(), "prompt": args.prompt, "sampling": vars(cfg), "results": results})
    return 0
