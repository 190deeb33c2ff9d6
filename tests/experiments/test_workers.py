"""``ctp run --workers N``: processes sharing one grid, shared perplexity measurements, and ablation windows."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest

from ctp.experiments.config import ExperimentConfig
from ctp.experiments.runner import Busy, Runner, run_experiment

from experiments.test_run import tiny_experiment


def _spec(tiny_dir):
    spec = tiny_experiment(tiny_dir)
    spec["perplexity"] = {"datasets": ["c4", "ptb"], "seqlen": 64, "max_windows": 4, "ablation_windows": 2}
    return spec


def _ppl(root):
    recs = json.loads((root / "results.json").read_text())["records"]
    return {(r["model"], r["role"], r["prompt"], r["dataset"]): r for r in recs if r["kind"] == "ppl"}


@pytest.mark.slow
def test_two_workers_reach_the_sequential_results(tiny_dir, tmp_path):
    cfg = ExperimentConfig.from_dict(_spec(tiny_dir))
    seq = _ppl(run_experiment(cfg, tmp_path / "seq", progress=False))
    root = run_experiment(cfg, tmp_path / "par", progress=False, workers=2)
    par = _ppl(root)
    assert par.keys() == seq.keys()
    for k in seq:
        assert par[k]["window_nll"] == pytest.approx(seq[k]["window_nll"], rel=1e-6, abs=1e-6), k
    assert not list(root.rglob("*.lock"))
    recs = json.loads((root / "results.json").read_text())["records"]
    assert json.loads((root / "results.json").read_text())["complete"]
    assert {r["kind"] for r in recs} >= {"model", "ppl", "zeroshot", "latency"}  # latency: the parent's, alone
    assert "Latency" in (root / "report.md").read_text()

    # the ablation cells score the first 2 windows; their reference values are the main cells' first 2
    for (model, role, prompt, d), r in par.items():
        assert r["n_windows"] == (2 if role.startswith(("transfer", "length", "direct")) else 4), (model, role)
    for model in ("sp50", "q4"):
        for d in ("c4", "ptb"):
            main, ablation = par[(model, "none", "none", d)], par[(model, "transfer:none", "none", d)]
            assert ablation["window_nll"] == main["window_nll"][:2]
            assert ablation["ppl"] == pytest.approx(math.exp(sum(main["window_nll"][:2]) / 2), rel=1e-12)
    # one measurement per (model, prompt, dataset): the role copies (length0 = none, length4 = learned) share it
    n_measured = len(list((root / "measurements").glob("ppl-*.json")))
    assert n_measured < len(par)
    report = (root / "report.md").read_text()
    assert "first 2 windows of 64 tokens" in report


def test_locks_between_workers(tiny_dir, tmp_path):
    runner = Runner(ExperimentConfig.from_dict(_spec(tiny_dir)), tmp_path, progress=False, worker=True)
    target = tmp_path / "cells" / "x.json"
    with runner.claim(target):
        assert (tmp_path / "cells" / "x.json.lock").read_text().split() == [str(os.getpid()), socket.gethostname()]
    assert not (tmp_path / "cells" / "x.json.lock").exists()

    # held by a live process: busy; held by one that has ended: taken over
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "cells" / "x.json.lock").write_text(f"{live.pid} {socket.gethostname()}\n")
        with pytest.raises(Busy):
            with runner.claim(target):
                pass
        assert runner.attempt(lambda: runner.claim(target).__enter__()) is None and runner.deferred == 1
    finally:
        live.kill()
        live.wait()
    with runner.claim(target):
        pass
    assert not (tmp_path / "cells" / "x.json.lock").exists()

    # a process that is not a worker takes no locks
    plain = Runner(ExperimentConfig.from_dict(_spec(tiny_dir)), tmp_path, progress=False)
    (tmp_path / "cells" / "x.json.lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    with plain.claim(target):
        pass


def test_workers_must_be_positive(tiny_dir, tmp_path, capsys):
    from ctp.cli import main

    exp = tmp_path / "e.json"
    exp.write_text(json.dumps(_spec(tiny_dir)))
    assert main(["run", str(exp), "--out", str(tmp_path / "r"), "--workers", "0"]) == 2
    assert "workers 0 must be at least 1" in capsys.readouterr().err
    with pytest.raises(Exception, match="ablation_windows"):
        ExperimentConfig.from_dict({**_spec(tiny_dir), "perplexity": {"ablation_windows": 0}})
