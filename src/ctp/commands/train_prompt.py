"""``ctp train-prompt``: learn a prompt (soft or prefix) on a frozen (typically compressed) model.

Flags map one-to-one onto :class:`~ctp.prompt.soft.PromptConfig` and
:class:`~ctp.prompt.train.TrainConfig` fields. ``--cpu-demo`` starts from the
small CPU preset instead of the paper's settings; explicit flags override
either. Rerunning the same command after an interruption resumes from the
checkpoint next to ``--out``. Under ``accelerate launch`` or ``torchrun`` the
processes train one prompt data-parallel (``--batch-size`` is the global
batch); the main process writes the files and prints the summary.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import fields

from ctp.commands.common import add_model_args, join_launch, load_options, write_json
from ctp.errors import require

# flag dest -> TrainConfig field
_TRAIN_FLAGS = {
    "lr": "lr", "weight_decay": "weight_decay", "batch_size": "batch_size", "seqlen": "seqlen", "steps": "steps",
    "warmup": "warmup_steps", "schedule": "schedule", "min_lr_ratio": "min_lr_ratio", "grad_clip": "grad_clip",
    "eval_every": "eval_every", "eval_windows": "eval_windows", "data": "data", "data_source": "data_source",
    "seed": "seed", "precision": "precision", "grad_checkpointing": "gradient_checkpointing",
    "checkpoint_every": "checkpoint_every", "max_minutes": "max_minutes", "objective": "objective",
    "kd_weight": "kd_weight", "teacher_topk": "teacher_topk",
}


def register(sub) -> None:
    p = sub.add_parser(
        "train-prompt",
        help="learn a prompt on a frozen model (the paper's section 4)",
        description="Learn k prompt vectors (soft: input embeddings, the paper's; prefix: keys and values of "
                    "every layer) that minimise next-token loss (or the KL to the uncompressed teacher) on --data "
                    "(train split) with the model frozen; keep the prompt with the best validation perplexity. "
                    "Defaults are the paper's (AdamW lr 1e-3, wd 1e-5, batch 4, seqlen 1024, 100 tokens); "
                    "--cpu-demo is a small preset for a CPU.",
    )
    add_model_args(p)
    p.add_argument("--out", required=True, metavar="P.safetensors", help="where to write the prompt")
    p.add_argument("--peft-dir", default=None, metavar="DIR", help="also export the prompt as a PEFT adapter here")
    p.add_argument("--json", default=None, metavar="FILE", help="write the summary and history as JSON here")
    g = p.add_argument_group("prompt")
    g.add_argument("--tokens", type=int, default=100, help="prompt length k (default 100, the paper's)")
    g.add_argument("--kind", default="soft", choices=["soft", "prefix"],
                   help="soft: k input embeddings (default, the paper's); prefix: k keys and values in every "
                        "layer (prefix tuning; the same serving cost as a cached soft prompt)")
    g.add_argument("--init", default="vocab", choices=["vocab", "text", "random"],
                   help="start from sampled vocabulary tokens (default), a text, or noise; a prefix starts from "
                        "the model's own keys and values of those tokens")
    g.add_argument("--init-text", default=None, help="the text for --init text")
    g = p.add_argument_group("training (defaults: the paper's, or the --cpu-demo preset)")
    g.add_argument("--cpu-demo", action="store_true",
                   help="small preset for a CPU: seqlen 256, batch 2, 300 steps, lr 1e-2, eval every 25, "
                        "at most 25 minutes")
    g.add_argument("--data", default=None, help="training corpus (train split; validation split picks the best): "
                                                 "c4 (default) | wikitext2 | ptb")
    g.add_argument("--data-source", default=None, choices=["local", "hub"])
    g.add_argument("--objective", default=None, choices=["nll", "kd", "mix"],
                   help="nll: next-token loss (default, the paper's); kd: KL to the uncompressed teacher's "
                        "next-token distribution; mix: (1-w) nll + w kd")
    g.add_argument("--kd-weight", type=float, default=None, help="w of --objective mix (default 0.5)")
    g.add_argument("--teacher", default=None, metavar="MODEL",
                   help="the teacher for kd/mix (default: the uncompressed model the compressed one was made from)")
    g.add_argument("--teacher-topk", type=int, default=None, metavar="K",
                   help="kd/mix: 0 runs the teacher on every window and matches its whole distribution (default); "
                        "K keeps its top K tokens per position in a cache on disk that every later prompt on the "
                        "same data reuses, so the teacher runs once per window")
    g.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="where --teacher-topk keeps the teacher's targets (default ~/.cache/ctp/teacher)")
    g.add_argument("--teacher-device", default=None, metavar="DEV",
                   help="run the teacher here (e.g. cpu, to keep a GPU's memory for the student; default: "
                        "the student's device)")
    g.add_argument("--steps", type=int, default=None, help="optimisation steps (default 1000)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 1e-5)")
    g.add_argument("--batch-size", type=int, default=None, help="windows per step (default 4)")
    g.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 1024)")
    g.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default 5%% of steps, max 100)")
    g.add_argument("--schedule", default=None, choices=["cosine", "linear", "constant"],
                   help="decay after warmup (default cosine)")
    g.add_argument("--min-lr-ratio", type=float, default=None, help="decay floor as a fraction of lr (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=None, help="max gradient norm, 0 disables (default 1.0)")
    g.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default 100)")
    g.add_argument("--eval-windows", type=int, default=None, help="validation windows (default 16)")
    g.add_argument("--seed", type=int, default=None, help="seeds the init and the batches (default 0)")
    g.add_argument("--precision", default=None, choices=["auto", "no", "bf16", "fp16"],
                   help="autocast mode (default auto: bf16 on GPUs that support it, none on CPU); "
                        "the prompt itself is always fp32")
    g.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass (less memory, ~30%% slower)")
    g.add_argument("--checkpoint-every", type=int, default=None,
                   help="write a resumable checkpoint every N steps, 0 never (default 100)")
    g.add_argument("--max-minutes", type=float, default=None, help="stop after this long, keeping the best prompt")
    g.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    p.set_defaults(func=run)


def build_configs(args):
    """(PromptConfig, TrainConfig) from parsed arguments."""
    from ctp.prompt.soft import PromptConfig
    from ctp.prompt.train import TrainConfig

    given = {field: getattr(args, dest) for dest, field in _TRAIN_FLAGS.items() if getattr(args, dest) is not None}
    names = {f.name for f in fields(TrainConfig)}
    assert set(given) <= names  # the flag table names real fields
    tcfg = TrainConfig.cpu_demo(**given) if args.cpu_demo else TrainConfig(**given)
    pcfg = PromptConfig(num_tokens=args.tokens, kind=args.kind, init=args.init, init_text=args.init_text,
                        seed=args.seed if args.seed is not None else 0)
    return pcfg, tcfg


def teacher_spec(given: str | None, info) -> str | None:
    """The teacher for distillation: ``given``, else the source recorded by the compressed artifact, else None."""
    if given:
        return given
    source = (info.compression or {}).get("source") or {}
    return source.get("spec") or source.get("path")


def load_teacher(given: str | None, info, tcfg, device=None, cache=None, **load_options):
    """The uncompressed teacher for objectives kd/mix (a :class:`~ctp.prompt.teacher.Teacher` with the config's
    top-k and ``cache`` directory), or None (with a one-line note) when none is known."""
    if tcfg.objective == "nll":
        return None
    spec = teacher_spec(given, info)
    if spec is None:
        why = "is not compressed" if not info.compression else "records no uncompressed source"
        logging.getLogger("ctp").warning("model '%s' %s and no --teacher was given: training with objective nll "
                                         "instead of %s", info.spec, why, tcfg.objective)
        return None
    from ctp.models.load import load_model

    teacher, _, tinfo = load_model(spec, device=device, **load_options)
    require(tinfo.tokenizer_hash == info.tokenizer_hash,
            f"teacher '{spec}' uses another tokenizer than model '{info.spec}'",
            "pass --teacher the uncompressed model this one was made from")
    from ctp.prompt.teacher import Teacher

    return Teacher(teacher, topk=tcfg.teacher_topk, cache_dir=cache)


# Measured: one training step of 2 x 256 tokens of the 135M default model takes 3-4 s on one CPU core.
_CPU_TOKENS_PER_S_135M = 150.0


def _warn_if_long(model, tcfg, device: str, cpu_demo: bool) -> None:
    """On a CPU, say how long the requested training will take when it is more than about an hour."""
    if str(device).startswith("cuda") or cpu_demo:
        return
    params = sum(p.numel() for p in model.parameters())
    tokens = tcfg.steps * tcfg.batch_size * tcfg.seqlen
    hours = tokens / _CPU_TOKENS_PER_S_135M * (params / 135e6) / 3600
    if hours > 1 and tcfg.max_minutes is None:
        logging.getLogger("ctp").warning(
            "%d steps of %d x %d tokens on a CPU take roughly %.0f hours for this model (from a measured 3-4 s per "
            "2 x 256-token step at 135M parameters); --cpu-demo is a preset that takes about 25 minutes, and "
            "--max-minutes bounds any run", tcfg.steps, tcfg.batch_size, tcfg.seqlen, hours)


def _already_trained(out: str, model_spec: str, pcfg, tcfg) -> bool:
    """True (with a message) when ``out`` holds a finished prompt of these settings on this model."""
    from pathlib import Path

    from ctp.errors import CTPError
    from ctp.prompt.artifact import load_prompt
    from ctp.prompt.train import comparable_config

    if not Path(out).is_file():
        return False
    try:
        art = load_prompt(out)
    except CTPError:
        return False  # damaged: trained again and replaced
    same = (art.model_spec == model_spec and art.prompt_config == pcfg.to_dict()
            and comparable_config(art.train_config or {}) == comparable_config(tcfg.to_dict()))
    if same:
        print(f"{out} already holds this prompt ({art.shape_text()}, {art.steps} steps, best validation PPL "
              f"{_fmt(art.best_val_ppl)}): nothing to do (pass --no-resume to train again)")
    else:
        logging.getLogger(__name__).warning("%s holds a prompt of other settings; it will be replaced", out)
    return same


def _fmt(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def run(args) -> int:
    from ctp.distributed import is_main, main_first
    from ctp.models.load import load_model
    from ctp.prompt.artifact import export_peft
    from ctp.io import check_output
    from ctp.prompt.train import train_prompt

    require(args.out.endswith(".safetensors"), f"--out {args.out} should end in .safetensors",
            "pass e.g. --out prompt.safetensors")
    check_output(args.out, args.model, args.teacher)
    if args.peft_dir:
        check_output(args.peft_dir, args.model, args.teacher, args.out, flag="--peft-dir", directory=True)
    if args.json:
        check_output(args.json, args.model, args.teacher, args.out, flag="--json")
    if args.teacher_cache:
        check_output(args.teacher_cache, args.model, args.teacher, args.out, flag="--teacher-cache", directory=True)
    if args.teacher_device:
        from ctp.devices import check_device

        args.teacher_device = check_device(args.teacher_device, "--teacher-device")
    pcfg, tcfg = build_configs(args)
    if not args.no_resume and _already_trained(args.out, args.model, pcfg, tcfg):
        return 0
    device = join_launch(args)
    with main_first():  # a named model is converted into the cache once
        model, tok, info = load_model(args.model, **load_options(args), device=device)
        teacher = load_teacher(args.teacher, info, tcfg, device=args.teacher_device or device,
                               cache=args.teacher_cache, **load_options(args))
    _warn_if_long(model, tcfg, device, args.cpu_demo)
    if teacher is None and tcfg.objective != "nll":
        tcfg = dataclasses.replace(tcfg, objective="nll")
    art, hist = train_prompt(model, tok, info, pcfg, tcfg, out_path=args.out, resume=not args.no_resume,
                             progress=not args.quiet, teacher=teacher)
    if not is_main():
        return 0
    if args.peft_dir:
        export_peft(art, args.peft_dir)
        if art.lead:
            print(f"PEFT adapter: its first {len(art.lead)} virtual token(s) take the place of the tokenizer's "
                  f"leading token {art.lead}: encode text for it with add_special_tokens=False")
    comp = "dense" if not info.compression else "compressed"
    print(f"prompt: {art.shape_text()} on {info.spec} ({comp}), objective {tcfg.objective}")
    print(f"steps: {hist.steps_done}/{tcfg.steps}" + (f" (stopped: {hist.stopped})" if hist.stopped else ""))
    print(f"validation PPL ({tcfg.data}, {art.validation['windows']} x {tcfg.seqlen} tokens): "
          f"no prompt {_fmt(hist.val_ppl_no_prompt)}, initial prompt {_fmt(hist.evals[0]['val_ppl'])}, "
          f"best {_fmt(hist.best_val_ppl)} at step {hist.best_step}")
    print(f"time: {hist.seconds:.0f}s")
    print(f"saved: {args.out}" + (f" and PEFT adapter {args.peft_dir}" if args.peft_dir else ""))
    write_json(args.json, {"model": info.to_dict(), "prompt": art.metadata(), "history": hist.to_dict(),
                           "out": args.out, "peft_dir": args.peft_dir})
    return 0
