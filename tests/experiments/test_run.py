"""End to end: ``ctp run`` on a tiny model, caching, resuming after an interruption, and the report."""

import json

import pytest

from ctp.cli import main
from ctp.errors import CTPError
from ctp.experiments.config import ExperimentConfig
from ctp.experiments.runner import run_experiment


def tiny_experiment(model_dir: str, name: str = "tiny") -> dict:
    return {
        "name": name,
        "model": model_dir,
        "device": "cpu",
        "calibration": {"nsamples": 4, "seqlen": 64, "dataset": "c4"},
        "compressions": {"sp50": {"prune": {"method": "sparsegpt", "sparsity": 0.5}},
                         "q4": {"quant": {"method": "gptq", "bits": 4, "group_size": 32}}},
        "prompt": {"tokens": 4, "data": "c4",
                   "train": {"steps": 4, "seqlen": 32, "batch_size": 2, "eval_every": 2, "eval_windows": 2}},
        "perplexity": {"datasets": ["c4", "ptb"], "seqlen": 64, "max_windows": 2},
        "zeroshot": {"tasks": ["piqa"], "limit": 4, "models": ["full", "q4"]},
        "transfer": {"compression": True, "datasets": {"model": "q4", "train_on": ["ptb"]}},
        "length_ablation": {"model": "q4", "tokens": [0, 2]},
        "latency": {"models": ["full"], "prompt_tokens": [0, 4], "context_len": 16, "new_tokens": 2, "repeats": 1},
    }


def _cells(root):
    return sorted(p.name for p in (root / "cells").glob("*.json"))


def _ppl_records(root):
    recs = json.loads((root / "results.json").read_text())["records"]
    return sorted((r["model"], r["role"], r["prompt"], r["dataset"], round(r["ppl"], 6))
                  for r in recs if r["kind"] == "ppl")


@pytest.mark.slow
def test_run_report_cache_and_resume(tiny_dir, tmp_path, monkeypatch):
    cfg = ExperimentConfig.from_dict(tiny_experiment(tiny_dir))
    root = run_experiment(cfg, tmp_path / "a", progress=False)

    report = (root / "report.md").read_text()
    for section in ("Compressed models", "Perplexity", "Cross-compression transfer", "Cross-dataset transfer",
                    "Prompt length ablation", "Zero-shot accuracy", "Latency"):
        assert section in report, section
    assert "| model | compression | c4 none | c4 hard | c4 learned | ptb none |" in report
    for png in ("ppl_vs_compression.png", "transfer_heatmap.png", "length_ablation.png", "latency.png"):
        assert (root / png).stat().st_size > 1000
    recs = json.loads((root / "results.json").read_text())["records"]
    ppl = [r for r in recs if r["kind"] == "ppl"]
    # 3 models x {none, hard} + 2 learned + 2 transferred, on 2 datasets; plus Table 4 and the ablation
    assert {r["role"] for r in ppl} >= {"none", "hard", "learned", "transfer", "direct", "transferred", "length2"}
    assert all(r["ppl"] > 1 for r in ppl)
    # the transfer matrix is prompted level x prompted level: the full model gets no transferred prompts
    assert {r["model"] for r in ppl if r["role"] == "transfer"} == {"sp50", "q4"}

    # a rerun recomputes nothing: every measurement comes from its cached cell
    import ctp.eval.perplexity as P

    def boom(*a, **k):
        raise AssertionError("a cached cell was recomputed")

    monkeypatch.setattr(P, "perplexity", boom)
    before = _cells(root)
    run_experiment(cfg, root, progress=False)
    assert _cells(root) == before
    monkeypatch.undo()

    # an interrupted run resumes and reaches the same results as the uninterrupted one
    import ctp.experiments.runner as R

    calls = {"n": 0}
    real_cell = R.Runner.cell

    def dying_cell(self, kind, spec, compute):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt  # killed in the middle of the grid
        return real_cell(self, kind, spec, compute)

    monkeypatch.setattr(R.Runner, "cell", dying_cell)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "b", progress=False)
    monkeypatch.undo()
    partial = tmp_path / "b" / "results.json"
    assert not partial.exists() or json.loads(partial.read_text())["complete"] is False
    run_experiment(cfg, tmp_path / "b", progress=False)
    assert _ppl_records(tmp_path / "b") == _ppl_records(root)


def test_cli_run_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "x.yaml"
    bad.write_text("name: x\nperplexity: {datasets: [c4], seqln: 3}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'seqln'" in err[0]


def test_report_shows_only_measured_columns(tiny_dir, tmp_path):
    # no prompt section and no hard prompt: the perplexity table has one column per dataset
    cfg = ExperimentConfig.from_dict({"name": "plain", "model": tiny_dir, "device": "cpu",
                                      "perplexity": {"datasets": ["c4", "ptb"], "seqlen": 32, "max_windows": 1,
                                                     "hard_prompt": False}})
    report = (run_experiment(cfg, tmp_path / "r", progress=False) / "report.md").read_text()
    assert "Without a prompt. In brackets" in report
    assert "| model | compression | c4 | ptb |" in report
    assert "learned" not in report and "hard" not in report


def test_prefix_kd_recipe_compare_recovered_share_and_case_study(tiny_dir, tmp_path):
    """A prefix prompt distilled from the full model, the paper's recipe beside it, shares and greedy answers."""
    exp = {"name": "recipes", "model": tiny_dir, "device": "cpu",
           "calibration": {"nsamples": 2, "seqlen": 32, "dataset": "c4"},
           "compressions": {"sp50": {"prune": {"method": "magnitude", "sparsity": 0.5}}},
           "prompt": {"tokens": 3, "kind": "prefix", "train": {"steps": 2, "seqlen": 32, "batch_size": 2,
                                                                 "eval_every": 2, "eval_windows": 2, "objective": "kd"},
                      "compare": {"paper": {"kind": "soft", "train": {"objective": "nll"}}}},
           "perplexity": {"datasets": ["c4"], "seqlen": 32, "max_windows": 3, "hard_prompt": False},
           "case_study": {"questions": ["Where is Long Beach?"], "max_new_tokens": 3}}
    root = run_experiment(ExperimentConfig.from_dict(exp), tmp_path / "r", progress=False)
    prompts = sorted(p.name for p in (root / "prompts").glob("*.safetensors"))
    assert len(prompts) == 2  # the main (prefix, kd) and the compared (soft, nll) recipes
    from ctp.prompt.artifact import load_prompt

    kinds = sorted(load_prompt(root / "prompts" / p).kind for p in prompts)
    assert kinds == ["prefix", "soft"]
    recs = json.loads((root / "results.json").read_text())["records"]
    roles = {r["role"] for r in recs if r["kind"] == "ppl"}
    assert roles == {"none", "learned", "learned:paper"}
    assert all(len(r["window_nll"]) == 3 and r["ppl_low"] <= r["ppl"] <= r["ppl_high"]
               for r in recs if r["kind"] == "ppl")
    report = (root / "report.md").read_text()
    assert "Recovered share of the compression gap" in report and "| sp50 | learned:paper |" in report
    assert "3-token prefix prompt, objective kd" in report
    assert "Case study" in report and "**Where is Long Beach?**" in report
    answers = [r for r in recs if r["kind"] == "generate"]
    assert [(r["model"], r["prompt"]) for r in answers][:2] == [("full", "none"), ("sp50", "none")]
    assert len(answers) == 5 and all(len(r["answers"]) == 1 for r in answers)  # full; none, hard, 2 learned


def test_packed_runtime_runs_the_grid_and_keeps_its_own_cells(tiny_dir, tmp_path):
    """runtime: packed loads quantized models as int4 kernels; its measurements are cached apart from dense ones."""
    exp = {"name": "packed", "model": tiny_dir, "device": "cpu",
           "calibration": {"nsamples": 2, "seqlen": 32, "dataset": "c4"},
           "compressions": {"q4": {"quant": {"method": "rtn", "bits": 4, "group_size": 32}}},
           "perplexity": {"datasets": ["c4"], "seqlen": 32, "max_windows": 2, "hard_prompt": False}}
    root = tmp_path / "r"
    run_experiment(ExperimentConfig.from_dict(exp), root, progress=False)
    dense_cells = set(p.name for p in (root / "cells").iterdir())
    run_experiment(ExperimentConfig.from_dict({**exp, "runtime": "packed"}), root, progress=False)
    cells = set(p.name for p in (root / "cells").iterdir())
    assert len(cells) == 2 * len(dense_cells)  # every measurement again, none reused across runtimes
    recs = {(r["model"], r.get("runtime", "dense")): r["ppl"] for r in
            (json.loads(p.read_text()) for p in (root / "cells").iterdir()) if r["kind"] == "ppl"}
    assert abs(recs[("q4", "packed")] / recs[("q4", "dense")] - 1) < 0.01
    with pytest.raises(CTPError, match="runtime"):
        ExperimentConfig.from_dict({**exp, "runtime": "fast"})


def test_run_keys_name_the_leading_bos_only_where_the_tokenizer_adds_one(tiny_dir, tmp_path):
    """Windows start with the tokenizer's BOS (when it adds one): results made without it must not be reused,
    while models whose tokenizer adds none keep the keys (and cached results) they had."""
    import shutil

    from transformers import AutoTokenizer

    from ctp.experiments.runner import Runner, content_hash

    plain = Runner(ExperimentConfig.from_dict(tiny_experiment(tiny_dir)), tmp_path / "a", progress=False)
    assert plain.leading_ids() == []
    assert plain.model_key("full") == content_hash({"model": tiny_dir})

    bos_dir = tmp_path / "tiny-bos"
    shutil.copytree(tiny_dir, bos_dir)
    AutoTokenizer.from_pretrained(tiny_dir, add_bos_token=True).save_pretrained(bos_dir)
    with_bos = Runner(ExperimentConfig.from_dict(tiny_experiment(str(bos_dir))), tmp_path / "b", progress=False)
    lead = with_bos.leading_ids()
    assert len(lead) == 1
    assert with_bos.model_key("full") == content_hash({"model": str(bos_dir), "lead": lead})
    assert with_bos.model_key("q4") != Runner(ExperimentConfig.from_dict(tiny_experiment(str(bos_dir))),
                                              tmp_path / "c", progress=False, _lead=[]).model_key("q4")
