"""``ctp run``: a whole experiment grid from one file, cached, resumable, ending in a report."""

from __future__ import annotations

import logging
from pathlib import Path

from ctp.errors import CTPError, require

log = logging.getLogger(__name__)


def register(sub) -> None:
    from ctp.experiments.config import packaged_experiments

    names = ", ".join(packaged_experiments())
    p = sub.add_parser(
        "run", help="run an experiment file (compress, learn prompts, evaluate, report)",
        description="Run every experiment an experiment file describes (models x compressions x prompt settings "
                    "x evaluations). Finished work is cached by content hash under the run directory, so a rerun "
                    "skips it and an interrupted run resumes. Ends with report.md, plots and results.json. "
                    f"Shipped experiment files: {names}.")
    p.add_argument("experiment", nargs="?", default=None,
                   help=f"an experiment file (.yaml/.json) or a shipped name ({names}); default: demo")
    p.add_argument("--out", default=None, help="run directory (default: runs/<experiment name>)")
    p.add_argument("--device", default=None, help="override the experiment's device")
    p.add_argument("--runtime", default=None, choices=["dense", "packed"],
                   help="override the experiment's runtime: how compressed models run (dense float matrices, "
                        "or packed int4/int8 kernels); measured results are cached per runtime")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that share the grid (default 1); on a CPU about one per core with "
                        "OMP_NUM_THREADS=1 each. Latency is measured afterwards, alone")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the run's results.json")
    p.set_defaults(func=run)


def run(args) -> int:
    from ctp.experiments.config import load_experiment
    from ctp.experiments.report import write_report
    from ctp.experiments.runner import run_experiment
    from ctp.io import read_json

    if args.experiment is None:
        args.experiment = "demo"
        if not args.report_only:
            log.warning("no experiment file given: running the shipped demo (73 minutes measured with --workers 2 on a shared 2-core CPU; "
                        "results in runs/demo). Ctrl-C stops it; a rerun resumes.")
    cfg = load_experiment(args.experiment)
    if args.device:
        cfg.device = args.device
    if args.runtime:
        cfg.runtime = args.runtime
    root = Path(args.out) if args.out else Path("runs") / cfg.name
    if args.report_only:
        from ctp.experiments.report import write_index
        from ctp.experiments.runner import Runner, model_slug

        require(root.is_dir(), f"no run directory {root} to make a report from",
                f"run `ctp run {args.experiment}` first, or pass the run's directory with --out")

        configs = cfg.per_model()
        for sub in configs:
            sub_root = root if len(configs) == 1 else root / model_slug(sub.model)
            results = sub_root / "results.json"
            saved = None
            if results.is_file():
                try:
                    saved = read_json(results, "results file")
                    require(isinstance(saved, dict) and isinstance(saved.get("records"), list),
                            f"results file {results} holds no records", "it is rebuilt from the cells")
                except CTPError as e:  # results.json is derived from the cells: rebuild from them
                    log.warning("%s; reporting from the finished cells instead", e.problem)
                    saved = None
            if saved is not None and saved.get("complete", True):
                records = saved["records"]
            else:  # an unfinished run (or a damaged results.json): report what its cells hold
                records = Runner(sub, sub_root, progress=False).finished_records()
            path = write_report(sub, records, sub_root)
        if len(configs) > 1:
            path = write_index(cfg, [model_slug(c.model) for c in configs], root)
    else:
        root = run_experiment(cfg, root, progress=not args.quiet, workers=args.workers)
        path = root / "report.md"
    print(f"report: {path}")
    return 0
