"""Recovery per CPU-minute: how much of the compression gap a learned prompt wins back, and how fast.

For one compressed model (a ``ctp compress`` directory) and its uncompressed base,
each recipe {kind} x {objective} x {k} is trained with a wall-clock budget
(``--minutes``) or a budget of process CPU time (``--cpu-minutes``: the same
work however loaded the machine is; with ``--threads 1``, minutes of one
core), validating every ``--eval-every`` steps. It reports

* the curve: the recovered share of the c4 *validation* gap against training
  minutes (validation included), for the plot;
* the result: perplexity of the best-on-validation prompt on whole *test* splits
  (``--test-windows`` windows of ``--seqlen``, at most the split), with the
  95% interval over windows, next to the full and the unprompted compressed
  model on the same windows, and the recovered share of the log-perplexity gap
  with its paired-bootstrap 95% interval (:mod:`ctp.eval.stats`).

    OMP_NUM_THREADS=1 python -m bench.recovery --compressed runs/sp50q4 --threads 1 \\
        --recipes soft-nll,prefix-nll,prefix-kd --minutes 10 --json bench/results/recovery_sp50q4.json

Each recipe's prompt is saved next to the JSON file, and a rerun skips the
recipes whose prompt is there (delete it to train again).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from bench._common import base_parser, finish, headline, machine, setup, table

log = logging.getLogger(__name__)


def _ppl(model, tok, dataset, args, prompt=None) -> dict:
    from ctp.eval.perplexity import perplexity

    r = perplexity(model, tok, dataset, "test", args.seqlen, prompt=prompt, max_windows=args.test_windows,
                   progress=False)
    return {"ppl": r.ppl, "ppl_low": r.ppl_low, "ppl_high": r.ppl_high, "nll": r.nll, "n_tokens": r.n_tokens,
            "n_windows": r.n_windows, "window_nll": r.window_nll}


def _share(none: dict, prompt: dict, full: dict) -> dict:
    from ctp.eval.stats import recovered_share

    s, lo, hi = recovered_share(none["window_nll"], prompt["window_nll"], full["window_nll"])
    return {"share": s, "share_low": lo, "share_high": hi}


def _val_nll(model, windows, lead: int) -> float:
    from ctp.lm import window_nll

    total, count = window_nll(model, windows, lead=lead)  # the tokens prompt training validates on
    return total / count


def _baselines(model, teacher, tok, info, tspec, datasets, val, args, out_dir: Path, lead: int):
    """Full and unprompted perplexities on the test windows and NLLs on validation: cached by what determines them."""
    import hashlib
    import json

    from ctp.compress.artifact import read_index
    from ctp.experiments.runner import EVAL_VERSION
    from ctp.io import atomic_write_json, read_json

    key = {"compressed": read_index(args.compressed).get("index_sha256") or str(Path(args.compressed).resolve()),
           "teacher": tspec, "teacher_embedding": info.base_hash, "datasets": datasets, "seqlen": args.seqlen,
           "test_windows": args.test_windows, "eval_windows": args.eval_windows, "eval_version": EVAL_VERSION}
    if lead:  # windows start with a BOS, and the first text token after it is not scored (ctp.lm)
        key["lead"] = lead
    path = out_dir / f"baselines-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    if path.is_file():
        saved = read_json(path, "cached baselines")
        if saved.get("key") == key:
            log.warning("reusing the baselines in %s", path)
            return saved["base"], saved["val_full"], saved["val_none"]
    base = {d: {"full": _ppl(teacher, tok, d, args), "none": _ppl(model, tok, d, args)} for d in datasets}
    val_full, val_none = _val_nll(teacher, val, lead), _val_nll(model, val, lead)
    atomic_write_json(path, {"key": key, "base": base, "val_full": val_full, "val_none": val_none})
    return base, val_full, val_none


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--compressed", required=True, help="a ctp compress directory")
    p.add_argument("--teacher", default=None, help="the uncompressed model (default: the one it was made from)")
    p.add_argument("--recipes", default="soft-nll,prefix-nll,prefix-kd",
                   help="comma-separated KIND-OBJECTIVE[-kK] (e.g. prefix-kd-k100); k defaults to --tokens")
    p.add_argument("--tokens", type=int, default=25)
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock training budget per recipe (validation included; default 10 unless "
                        "--cpu-minutes is given); the process CPU time is recorded beside it (on a shared machine "
                        "it is the smaller, the time one free core takes)")
    p.add_argument("--cpu-minutes", type=float, default=None,
                   help="training budget per recipe in process CPU time (validation included): the same work "
                        "whatever else shares the machine; with --threads 1, minutes of one core")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine", "linear"),
                   help="learning-rate schedule after 10 warmup steps; cosine/linear decay over --steps")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per recipe (needed by a decaying schedule; size it to fit --minutes); "
                        "default: as many as --minutes allows")
    p.add_argument("--seqlen", type=int, default=256, help="training and test window length")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-windows", type=int, default=8, help="validation windows (pick the best prompt; the curve)")
    p.add_argument("--test-windows", type=int, default=120, help="test windows per dataset (at most the split)")
    p.add_argument("--datasets", default="c4,wikitext2,ptb")
    p.add_argument("--teacher-topk", type=int, default=0,
                   help="kd/mix recipes: 0 runs the teacher online (exact KL); K reads its top K from the cache "
                        "(~/.cache/ctp/teacher), filling it on first use")
    args = p.parse_args(argv)
    if args.minutes is None and args.cpu_minutes is None:
        args.minutes = 10.0
    if args.schedule != "constant" and not args.steps:
        p.error(f"--schedule {args.schedule} decays over --steps: pass --steps N (about the steps --minutes allows)")
    device = setup(args)
    t_start = time.perf_counter()
    logging.basicConfig(level=logging.WARNING)

    from ctp.commands.train_prompt import teacher_spec
    from ctp.data.corpora import corpus_ids, eval_windows, leading_ids
    from ctp.models.load import load_model
    from ctp.prompt.artifact import load_prompt
    from ctp.prompt.soft import PromptConfig
    from ctp.prompt.train import TrainConfig, train_prompt

    model, tok, info = load_model(args.compressed, device=str(device))
    tspec = teacher_spec(args.teacher, info)
    if tspec is None:
        raise SystemExit(f"{args.compressed} records no uncompressed source: pass --teacher")
    teacher, _, _ = load_model(tspec, device=str(device))
    datasets = args.datasets.split(",")
    out_dir = Path(args.json).parent if args.json else Path(".")

    # baselines on the same test windows, and the validation gap the curves are measured against; they depend on
    # the two models and the windows only, so they are kept beside the JSON and reused by later runs
    val_ids, _ = corpus_ids("c4", "validation", tok)
    lead = leading_ids(tok)
    val = eval_windows(val_ids, args.seqlen, args.eval_windows, lead=lead)
    base, val_full, val_none = _baselines(model, teacher, tok, info, tspec, datasets, val, args, out_dir, len(lead))

    rows, curves = [], {}
    for recipe in args.recipes.split(","):
        parts = recipe.split("-")
        kind, objective = parts[0], parts[1]
        k = int(parts[2][1:]) if len(parts) > 2 else args.tokens
        pcfg = PromptConfig(num_tokens=k, kind=kind)
        tcfg = TrainConfig(lr=args.lr, seqlen=args.seqlen, batch_size=args.batch_size, steps=args.steps or 100_000,
                           warmup_steps=10, schedule=args.schedule, min_lr_ratio=0.0, eval_every=args.eval_every,
                           eval_windows=args.eval_windows, max_minutes=args.minutes, checkpoint_every=0,
                           objective=objective, teacher_topk=args.teacher_topk if objective != "nll" else 0)
        path = out_dir / f"recovery-{Path(args.compressed).name}-{recipe}.safetensors"
        hist_path = path.with_suffix(".history.json")
        if path.is_file() and hist_path.is_file():
            art, hist = load_prompt(path, info), json.loads(hist_path.read_text())
        else:
            cpu: dict[int, float] = {}
            cpu0 = time.process_time()

            def clock(step, _h, _p, cpu=cpu, cpu0=cpu0):  # records CPU time; true (stop) once the budget is spent
                cpu[step] = time.process_time() - cpu0
                return args.cpu_minutes is not None and cpu[step] >= args.cpu_minutes * 60

            art, h = train_prompt(model, tok, info, pcfg, tcfg, out_path=path, progress=False,
                                  teacher=teacher if objective != "nll" else None, callback=clock)
            hist = {**h.to_dict(), "cpu_seconds": {str(s): c for s, c in cpu.items()}}
            hist_path.write_text(json.dumps(hist) + "\n")
        cpu_at = {int(s): c for s, c in (hist.get("cpu_seconds") or {}).items()}
        curves[recipe] = [{"minutes": e["seconds"] / 60, "cpu_minutes": cpu_at.get(e["step"], 0.0) / 60,
                           "val_ppl": e["val_ppl"], "share": (val_none - e["val_nll"]) / (val_none - val_full)}
                          for e in hist["evals"]]
        row = {"recipe": recipe, "kind": kind, "objective": objective, "k": k, "steps": hist["steps_done"],
               "minutes": hist["seconds"] / 60, "best_step": hist["best_step"],
               "cpu_minutes": max(cpu_at.values(), default=float("nan")) / 60}
        for d in datasets:
            r = _ppl(model, tok, d, args, art.embeddings.to(device))
            row[d] = {**{key: v for key, v in r.items() if key != "window_nll"}, **_share(base[d]["none"], r,
                                                                                          base[d]["full"])}
        rows.append(row)
        log.warning("%s: c4 share %.3f", recipe, row[datasets[0]]["share"])

    result = {"machine": machine(), "device": str(device), "args": vars(args), "compressed": args.compressed,
              "teacher": tspec, "val_gap": {"full_nll": val_full, "none_nll": val_none},
              "baselines": {d: {m: {key: v for key, v in r.items() if key != "window_nll"} for m, r in b.items()}
                            for d, b in base.items()},
              "rows": rows, "curves": curves}
    if args.json:
        _plot(result, Path(args.json).with_suffix(".png"))
    return finish(result, args, t_start, _report)


def _report(r: dict) -> str:
    ds = list(r["baselines"])
    lines = [headline("recovery", r), f"compressed model {r['compressed']}, teacher {r['teacher']}"]
    base_rows = [{"model": m, **{d: f"{r['baselines'][d][m]['ppl']:.2f} [{r['baselines'][d][m]['ppl_low']:.2f}, "
                                   f"{r['baselines'][d][m]['ppl_high']:.2f}]" for d in ds}} for m in ("full", "none")]
    lines.append(table(base_rows, ["model", *ds], "test perplexity [95% CI]"))
    rows = []
    for row in r["rows"]:
        out = {"recipe": row["recipe"], "minutes": row["minutes"], "cpu_minutes": row.get("cpu_minutes"),
               "steps": row["steps"]}
        for d in ds:
            x = row[d]
            out[d] = (f"{x['ppl']:.2f}, share {x['share']:.2f} [{x['share_low']:.2f}, {x['share_high']:.2f}]"
                      if not math.isnan(x["share"]) else f"{x['ppl']:.2f}")
        rows.append(out)
    lines.append(table(rows, ["recipe", "minutes", "cpu_minutes", "steps", *ds],
                       "learned prompts: test perplexity, recovered share "
                                                                   "of the log-perplexity gap [95% CI]"))
    return "\n".join(lines)


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for recipe, pts in r["curves"].items():
        cpu = all(p.get("cpu_minutes") for p in pts[1:])
        x = [p["cpu_minutes"] if cpu else p["minutes"] for p in pts]
        ax.plot(x, [p["share"] for p in pts], "o-", ms=3, label=recipe + ("" if cpu else " (wall minutes)"))
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(1, color="green", lw=0.8, label="full model")
    ax.set_xlabel("training CPU-minutes on one core (validation included)")
    ax.set_ylabel("recovered share of the c4 validation gap")
    ax.set_title(f"recovery per CPU-minute: {Path(r['compressed']).name}")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
