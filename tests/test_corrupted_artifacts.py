"""Damaged files of the artifact types not covered elsewhere: the prompt-training checkpoint, ``ctp run``'s
cells and results, and PEFT adapter directories.

(Compressed models: tests/test_cli_validation.py and tests/compress/test_artifact.py; compression
checkpoints: tests/compress/test_checkpoint.py; prompt files: tests/prompt/test_artifact.py and
tests/test_cli_validation.py; the safetensors container itself: tests/test_io.py.)
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from ctp.cli import main
from ctp.errors import CTPError
from ctp.prompt.train import checkpoint_path_for

TRAIN = ["--tokens", "2", "--steps", "4", "--seqlen", "32", "--batch-size", "1", "--eval-every", "2",
         "--eval-windows", "1", "--checkpoint-every", "2"]


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _flip_last_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.fixture()
def interrupted_training(tiny_dir, tmp_path, monkeypatch) -> Path:
    """``ctp train-prompt`` killed after step 2: its checkpoint is on disk, the prompt is not."""
    import ctp.prompt.train as T

    out = tmp_path / "p.safetensors"
    real = T.train_prompt

    def killed_after_step_2(*a, **k):
        def cb(step, hist, p):
            if step == 2:
                raise KeyboardInterrupt
        return real(*a, **k, callback=cb)

    monkeypatch.setattr(T, "train_prompt", killed_after_step_2)
    assert main(["-q", "train-prompt", "--model", tiny_dir, *TRAIN, "--out", str(out)]) == 130
    monkeypatch.undo()
    assert checkpoint_path_for(out).is_file() and not out.exists()
    return out


@pytest.mark.parametrize("damage, match", [
    ("truncate", r"prompt training checkpoint .* is not a readable safetensors file"),
    ("flip", r"prompt training checkpoint .* fails its checksum"),
    ("kind", r"is a 'ctp-prompt' file, not a ctp-prompt-checkpoint"),
])
def test_damaged_training_checkpoint_is_one_line_then_no_resume_starts_over(
        damage, match, interrupted_training, tiny_dir, capsys):
    out = interrupted_training
    ckpt = checkpoint_path_for(out)
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[:-64])
    elif damage == "flip":
        _flip_last_byte(ckpt)
    else:  # another artifact type saved under the checkpoint's name
        from ctp.io import save_tensors

        save_tensors(ckpt, {"prompt": torch.zeros(2, 64)}, kind="ctp-prompt")
    capsys.readouterr()
    argv = ["-q", "train-prompt", "--model", tiny_dir, *TRAIN, "--out", str(out)]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith("ctp train-prompt: error: ") and "--no-resume" in line
    assert re.search(match, line), line
    assert not out.exists()
    assert main([*argv, "--no-resume"]) == 0  # the fix the message names works
    assert out.is_file() and not ckpt.exists()


@pytest.fixture()
def finished_run(tiny_dir, tmp_path) -> tuple[object, Path]:
    from ctp.experiments.config import ExperimentConfig
    from ctp.experiments.runner import run_experiment

    cfg = ExperimentConfig.from_dict({"name": "t", "model": tiny_dir, "device": "cpu",
                                      "perplexity": {"datasets": ["c4", "ptb"], "seqlen": 32, "max_windows": 1,
                                                     "hard_prompt": False}})
    root = run_experiment(cfg, tmp_path / "run", progress=False)
    return cfg, root


def _ppl(root: Path) -> list[tuple]:
    recs = json.loads((root / "results.json").read_text())["records"]
    return sorted((r["dataset"], r["ppl"]) for r in recs if r["kind"] == "ppl")


@pytest.mark.parametrize("damage", ["truncated", "not-a-record", "other-kind"])
def test_damaged_cell_is_measured_again(damage, finished_run, caplog):
    from ctp.experiments.runner import run_experiment

    cfg, root = finished_run
    want = _ppl(root)
    cell = sorted((root / "cells").glob("ppl-*.json"))[0]
    text = cell.read_text()
    cell.write_text({"truncated": text[: len(text) // 2], "not-a-record": "[1, 2]",
                     "other-kind": json.dumps({**json.loads(text), "kind": "latency"})}[damage])
    with caplog.at_level(logging.WARNING, logger="ctp.experiments.runner"):
        run_experiment(cfg, root, progress=False)
    assert "measuring again" in caplog.text
    assert json.loads(cell.read_text())["kind"] == "ppl"  # rewritten whole
    assert _ppl(root) == want  # and the same measurement as before


def test_report_only_survives_a_damaged_results_file(finished_run, tmp_path, capsys, caplog):
    cfg, root = finished_run
    spec = tmp_path / "t.json"
    spec.write_text(json.dumps(cfg.to_dict()))
    (root / "results.json").write_text('{"records": [')
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "run", str(spec), "--out", str(root), "--report-only"]) == 0
    assert "reporting from the finished cells" in caplog.text
    report = (root / "report.md").read_text()
    assert "Perplexity" in report and "ptb" in report
    # a damaged cell is left out of the report instead of stopping it
    cell = sorted((root / "cells").glob("*.json"))[0]
    cell.write_text("{")
    assert main(["-q", "run", str(spec), "--out", str(root), "--report-only"]) == 0
    assert "left out of the report" in caplog.text


def test_damaged_peft_adapter_directory(tmp_path):
    from ctp.prompt.artifact import PromptArtifact, export_peft, import_peft, load_prompt

    d = export_peft(PromptArtifact(embeddings=torch.randn(3, 8), hidden_size=8), tmp_path / "peft")
    assert import_peft(d).embeddings.shape == (3, 8)
    weights, config = d / "adapter_model.safetensors", d / "adapter_config.json"
    good_w, good_c = weights.read_bytes(), config.read_text()

    weights.write_bytes(good_w[:-20])
    with pytest.raises(CTPError, match="is not a readable safetensors file .*truncated or damaged"):
        load_prompt(d)
    weights.write_bytes(good_w)
    for text, match in [("{", "not valid JSON"), ("[1]", "does not hold a mapping"),
                        (good_c.replace('"num_virtual_tokens": 3', '"num_virtual_tokens": 4'),
                         "declares 4 virtual tokens but holds 3")]:
        config.write_text(text)
        with pytest.raises(CTPError, match=match):
            load_prompt(d)
    config.unlink()
    with pytest.raises(CTPError, match="does not exist"):
        load_prompt(d)
