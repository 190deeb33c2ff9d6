"""Reliability, round two: weights of another model, code in model directories, pickles, outputs that would
overwrite inputs, unsafe experiment names, edited recipes, and out-of-range values, each ending in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_tiny
from ctp.cli import main
from ctp.errors import CTPError
from test_cli_validation import argv_for, fails


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("cmd", ["eval", "train-prompt"])
def test_weights_of_another_model_are_an_error_not_random_init(cmd, tiny_dir, tmp_path, capsys):
    model = _copy(tiny_dir, tmp_path / "model")
    other = tmp_path / "gpt2"
    make_tiny("gpt2").save_pretrained(other)
    shutil.copy(other / "model.safetensors", model / "model.safetensors")
    out = tmp_path / "out"
    capsys.readouterr()  # the set-up's own output
    fails(argv_for(cmd, str(model), out), capsys, r"weights of .* lack tensors .*another model or are incomplete",
          out)


def test_no_code_from_a_model_directory_runs(tiny_dir, tmp_path, capsys):
    model = _copy(tiny_dir, tmp_path / "model")
    ran = tmp_path / "code-ran"
    (model / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('yes')\nclass EvilConfig: pass\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    # a known architecture loads with transformers' own code; the directory's code never runs
    assert main(["-q", *argv_for("eval", str(model), out)]) == 0
    assert not ran.exists()
    # an architecture only the directory's code defines is refused, naming the flag
    cfg["model_type"] = "evil-arch"
    (model / "config.json").write_text(json.dumps(cfg))
    shutil.rmtree(out)
    fails(argv_for("eval", str(model), out), capsys, r"needs to run its own Python code .*--trust-remote-code", out)
    assert not ran.exists()


def test_pickle_weights_need_allow_pickle(tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    model = _copy(tiny_dir, tmp_path / "model")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    out = tmp_path / "out"
    fails(argv_for("eval", str(model), out), capsys, r"only pickle weights \(pytorch_model.bin\).*--allow-pickle",
          out)
    assert main(["-q", *argv_for("eval", str(model), out), "--allow-pickle"]) == 0


def test_outputs_never_overwrite_inputs(tiny_dir, tmp_path, capsys):
    model = _copy(tiny_dir, tmp_path / "model")
    weights = (model / "model.safetensors").read_bytes()
    out = tmp_path / "unused"
    # a prompt written into the model's own weights file
    line = fails(["train-prompt", "--model", str(model), "--steps", "1", "--out", str(model / "model.safetensors")],
                 capsys, r"--out .*model.safetensors would overwrite the input", out)
    assert "write to a path outside" in line
    # an output directory that is the input
    fails(["compress", "--model", str(model), "--sparsity", "0.5", "--out", str(model)], capsys,
          r"would overwrite the input", out)
    # a JSON report written over the prompt file or into the model directory
    fails(["eval", "--model", str(model), "--out", str(model / "config.json")], capsys, r"would overwrite", out)
    assert (model / "model.safetensors").read_bytes() == weights


def test_run_refuses_a_directory_that_is_not_its_run(tiny_dir, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    argv = argv_for("run", tiny_dir, user)
    rc = main(["-q", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "non-empty directory that is not a ctp run" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in user.iterdir()) == ["thesis.tex"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "experiment.json").write_text(json.dumps({"name": "someone-else"}))
    rc = main(["-q", *argv_for("run", tiny_dir, other)])
    assert rc == 2 and "holds a run of experiment 'someone-else'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["..", "/etc", "a/b", ".hidden", "x" * 101, "a b"])
def test_unsafe_names_in_experiment_files(name, tmp_path, capsys):
    from ctp.experiments.config import ExperimentConfig

    with pytest.raises(CTPError, match="not a safe name"):
        ExperimentConfig.from_dict({"name": name})
    with pytest.raises(CTPError, match="compression label"):
        ExperimentConfig.from_dict({"name": "ok", "compressions": {name: {"prune": {"sparsity": 0.5}}}})


def test_edited_recipe_or_config_of_a_compressed_model_is_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["-q", "compress", "--model", tiny_dir, "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "32",
                 "--out", str(out)]) == 0
    clean = tmp_path / "clean"
    shutil.copytree(out, clean)
    capsys.readouterr()
    index = json.loads((out / "ctp_compression.json").read_text())
    assert index["algorithm_version"] >= 2 and "config.json" in index["files_sha256"]
    index["config"]["prune"]["sparsity"] = 0.25  # a relabelled recipe
    (out / "ctp_compression.json").write_text(json.dumps(index))
    probe = tmp_path / "probe"
    fails(["eval", "--model", str(out), "--max-windows", "1", "--seqlen", "32", "--out", str(probe / "r.json")],
          capsys, r"ctp_compression.json was modified after it was written", probe)
    cfg = json.loads((clean / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.5
    (clean / "config.json").write_text(json.dumps(cfg))
    fails(["eval", "--model", str(clean), "--max-windows", "1", "--seqlen", "32", "--out", str(probe / "r.json")],
          capsys, r"config.json was modified", probe)


def test_out_of_range_values_are_refused():
    from ctp.prompt.train import TrainConfig

    for bad in (dict(weight_decay=float("inf")), dict(weight_decay=float("nan")), dict(kd_weight=-0.1)):
        with pytest.raises(CTPError):
            TrainConfig(**bad)
