"""Every ``ctp`` subcommand turns bad input into one line on stderr and exit status 2, and leaves no output.

One test per item of the reliability list, across the entry points it applies to: missing or
unreadable model paths, unknown names, hub ids without a network, damaged model and
compressed-model directories, corpora too short for the requested windows, windows longer
than the model's positions, prompts for another model, damaged prompt files, and experiment
files whose settings are out of range. (Flag ranges of ``ctp compress`` and config files
with unknown keys are covered in tests/compress/test_cli_compress.py and
tests/experiments/.)
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import ctp.data.corpora as corpora
from ctp.cli import main

COMMANDS = ("eval", "compress", "train-prompt", "generate", "zeroshot", "run")
HUB_ID = "ctp-test-org/no-such-model"


def argv_for(cmd: str, model: str, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """A small, valid invocation of ``cmd`` on ``model`` writing under ``out`` (which must not exist)."""
    if cmd == "eval":
        return ["eval", "--model", model, "--datasets", "c4", "--seqlen", "32", "--max-windows", "1",
                "--out", str(out / "r.json"), *extra]
    if cmd == "compress":
        return ["compress", "--model", model, "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "32",
                "--out", str(out / "m"), *extra]
    if cmd == "train-prompt":
        return ["train-prompt", "--model", model, "--tokens", "2", "--steps", "1", "--seqlen", "32",
                "--batch-size", "1", "--eval-windows", "1", "--out", str(out / "p.safetensors"), *extra]
    if cmd == "generate":
        return ["generate", "--model", model, "--max-new-tokens", "2", "--out", str(out / "g.json"), *extra, "Hi"]
    if cmd == "zeroshot":
        return ["zeroshot", "--model", model, "--tasks", "piqa", "--limit", "2", "--out", str(out / "z.json"),
                *extra]
    if cmd == "run":
        spec = out.with_name(out.name + ".yaml")
        spec.write_text(f"name: t\nmodel: {model}\ndevice: cpu\ncalibration: {{nsamples: 2, seqlen: 32}}\n"
                        "compressions: {sp50: {prune: {sparsity: 0.5}}}\n"
                        "perplexity: {datasets: [c4], seqlen: 32, max_windows: 1}\n")
        return ["run", str(spec), "--out", str(out), *extra]
    raise ValueError(cmd)


def fails(argv: list[str], capsys, match: str, out: Path) -> str:
    """Run the CLI in-process; assert exit 2, one ``ctp CMD: error:`` line matching ``match``, nothing under ``out``."""
    rc = main(["-q", *argv])
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"ctp {argv[0]}: error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") or ".partial" in p.name]
    assert not leftovers, leftovers
    return lines[0]


# --------------------------------------------------------------------------- the model argument


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("model, match", [
    ("./no/such/model", r"no model at './no/such/model' \(pass an existing directory"),
    ("llama-7b", r"no model at 'llama-7b' .*one of: smollm2-135m"),
    (HUB_ID, rf"hub model '{HUB_ID}' is not in the local cache and HF_HUB_OFFLINE is set \(no network\)"),
], ids=["missing-path", "unknown-name", "hub-offline"])
def test_bad_model_argument(cmd, model, match, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    fails(argv_for(cmd, model, out), capsys, match, out)


def test_hub_id_with_an_unreachable_hub_fails_at_once(tmp_path, capsys, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    out = tmp_path / "out"
    for cmd in ("eval", "compress"):
        line = fails(argv_for(cmd, HUB_ID, out), capsys, "cannot be reached", out)
        assert "http://127.0.0.1:9" in line and "connect to the network" in line


def _damaged_copy(src: str, dst: Path, damage: str) -> Path:
    shutil.copytree(src, dst)
    if damage == "no-weights":
        (dst / "model.safetensors").unlink()
    elif damage == "truncated-weights":
        f = dst / "model.safetensors"
        f.write_bytes(f.read_bytes()[: 100_000])
    elif damage == "no-tokenizer":
        for f in dst.glob("tokenizer*"):
            f.unlink()
    elif damage == "bad-config":
        (dst / "config.json").write_text("{not json")
    return dst


@pytest.mark.parametrize("cmd", ["eval", "compress"])
@pytest.mark.parametrize("damage, match", [
    ("no-weights", r"cannot load the model of .*no file named model.safetensors.*missing or damaged"),
    ("truncated-weights", r"cannot load the model of .*(incomplete metadata|deserializ).*missing or damaged"),
    ("no-tokenizer", r"cannot load the tokenizer of .*needs the tokenizer files"),
    ("bad-config", r"cannot load the model of .*not a valid JSON file"),
])
def test_unreadable_model_directory(cmd, damage, match, tiny_dir, tmp_path, capsys):
    model = _damaged_copy(tiny_dir, tmp_path / "model", damage)
    out = tmp_path / "out"
    fails(argv_for(cmd, str(model), out), capsys, match, out)


# --------------------------------------------------------------------------- compressed-model directories


@pytest.fixture(scope="module")
def compressed_dir(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compressed") / "m"
    assert main(["-q", "compress", "--model", tiny_dir, "--sparsity", "0.5", "--bits", "4", "--group-size", "32",
                 "--nsamples", "2", "--seqlen", "32", "--out", str(out)]) == 0
    return out


def _flip_last_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("cmd", ["eval", "generate"])
@pytest.mark.parametrize("damage, match", [
    ("missing-dense", r"dense weights .*dense.safetensors does not exist \(the compressed model in .* is incomplete"),
    ("truncated-compressed", r"compressed weights .* is not a readable safetensors file .*incomplete or damaged"),
    ("tampered-compressed", r"compressed weights .* fails its checksum .*recreate it with ctp compress"),
    ("bad-index", r"compression index .*ctp_compression.json is not valid JSON"),
    ("missing-index", r"cannot load the model of .*holds compressed weights but no ctp_compression.json"),
])
def test_damaged_compressed_model(cmd, damage, match, compressed_dir, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(compressed_dir, d)
    if damage == "missing-dense":
        (d / "dense.safetensors").unlink()
    elif damage == "truncated-compressed":
        f = d / "compressed.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "tampered-compressed":
        _flip_last_byte(d / "compressed.safetensors")
    elif damage == "bad-index":
        (d / "ctp_compression.json").write_text('{"format_version": 1,')
    elif damage == "missing-index":
        (d / "ctp_compression.json").unlink()
    out = tmp_path / "out"
    fails(argv_for(cmd, str(d), out), capsys, match, out)


# --------------------------------------------------------------------------- corpora and window lengths


@pytest.mark.parametrize("cmd, text, match", [
    ("eval", "", r"dataset 'c4' split 'test' is empty"),
    ("compress", "", r"dataset 'c4' split 'train' is empty"),
    ("train-prompt", "", r"dataset 'c4' split '(train|validation)' is empty"),
    ("eval", "word " * 20, r"the text has \d+ tokens, fewer than one window of 32 .*shorter --seqlen or a larger"),
    ("compress", "word " * 20, r"the text has \d+ tokens, not more than one window of 32"),
    ("train-prompt", "word " * 20, r"the text has \d+ tokens, (fewer|not more) than one window of 32"),
])
def test_empty_or_too_short_corpus(cmd, text, match, tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(corpora, "_local_text", lambda name, split: text)
    out = tmp_path / "out"
    fails(argv_for(cmd, tiny_dir, out), capsys, match, out)


def test_corpus_too_short_for_the_number_of_samples(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(corpora, "_local_text", lambda name, split: "word " * 40)  # ~40 tokens: 8 start positions
    out = tmp_path / "out"
    argv = ["compress", "--model", tiny_dir, "--sparsity", "0.5", "--nsamples", "16", "--seqlen", "32",
            "--out", str(out / "m")]
    fails(argv, capsys, r"too few for 16 distinct windows of 32 \(needs at least 48\).*fewer samples", out)


@pytest.mark.parametrize("cmd", ["eval", "compress", "train-prompt"])
def test_windows_longer_than_the_model_positions(cmd, tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a if a != "32" else "600" for a in argv_for(cmd, tiny_dir, out)]  # the tiny models have 512 positions
    fails(argv, capsys, r"\b600\b.*exceeds the model's 512 positions", out)


# --------------------------------------------------------------------------- prompt files


@pytest.fixture(scope="module")
def prompt_files(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    from ctp.models.load import load_model
    from ctp.prompt.artifact import artifact_for, save_prompt

    d = tmp_path_factory.mktemp("prompts")
    model, _, info = load_model(tiny_dir)
    good = save_prompt(d / "good.safetensors", artifact_for(model, info, torch.randn(3, info.hidden_size) * 0.02))
    wide = artifact_for(model, info, torch.randn(3, 2 * info.hidden_size))
    other_tok = artifact_for(model, info, torch.randn(3, info.hidden_size))
    other_tok.tokenizer_hash = "0123456789abcdef"
    files = {"good": good, "hidden": save_prompt(d / "wide.safetensors", wide),
             "tokenizer": save_prompt(d / "other-tok.safetensors", other_tok)}
    data = good.read_bytes()
    files["truncated"] = d / "truncated.safetensors"
    files["truncated"].write_bytes(data[: len(data) - 20])
    files["tampered"] = d / "tampered.safetensors"
    files["tampered"].write_bytes(data)
    _flip_last_byte(files["tampered"])
    files["missing"] = d / "missing.safetensors"
    return files


@pytest.mark.parametrize("cmd", ["eval", "generate", "zeroshot"])
@pytest.mark.parametrize("which, match", [
    ("hidden", r"has hidden size 128 .* but model .* has hidden size 64 \(use a prompt learned on a model"),
    ("tokenizer", r"was learned with tokenizer 0123456789abcdef .*uses tokenizer .*sharing a vocabulary"),
    ("truncated", r"prompt file .* is not a readable safetensors file .*truncated or damaged"),
    ("tampered", r"prompt file .* fails its checksum"),
    ("missing", r"prompt file .* does not exist"),
])
def test_unusable_prompt_file(cmd, which, match, prompt_files, tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    fails(argv_for(cmd, tiny_dir, out, ("--prompt", str(prompt_files[which]))), capsys, match, out)


def test_good_prompt_file_passes_the_same_checks(prompt_files, tiny_dir, tmp_path, capsys):
    """The fixture's valid prompt works, so the failures above come from the damage, not the setup."""
    out = tmp_path / "out"
    assert main(["-q", *argv_for("generate", tiny_dir, out, ("--prompt", str(prompt_files["good"])))]) == 0
    assert (out / "g.json").is_file()


# --------------------------------------------------------------------------- experiment files


@pytest.mark.parametrize("section, match", [
    ("compressions: {bad: {prune: {sparsity: 1.5}}}", r"compression 'bad': sparsity 1.5 is outside \(0, 1\)"),
    ("compressions: {bad: {quant: {bits: 5}}}", r"compression 'bad': bits 5 is not supported"),
    ("compressions: {bad: {prune: {prune_n: 4, prune_m: 4}}}", r"compression 'bad': .*4:4 needs 0 < N < M"),
    ("prompt: {tokens: 2, train: {lr: 1e-3}}", r"prompt.train.lr must be a number, got '1e-3' .*1.0e-3"),
    ("prompt: {tokens: 2, train: {stpes: 3}}", r"unknown key 'stpes' in 'prompt.train'"),
    ("perplexity: {datasets: [c5]}", r"perplexity.datasets: unknown dataset 'c5'"),
    ("zeroshot: {tasks: [piqa, nope]}", r"zeroshot.tasks: unknown zero-shot task 'nope'"),
    ("calibration: {nsamples: many}", r"calibration.nsamples must be an integer, got 'many'"),
])
def test_experiment_file_settings_fail_before_any_work(section, match, tiny_dir, tmp_path, capsys):
    spec = tmp_path / "x.yaml"
    spec.write_text(f"name: t\nmodel: {tiny_dir}\n{section}\n")
    out = tmp_path / "out"
    fails(["run", str(spec), "--out", str(out)], capsys, match, out)


def test_nothing_is_left_in_the_working_directory(tmp_path, capsys, monkeypatch):
    """The default run directory (runs/<name>) is not created for a run that fails validation."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = tmp_path / "x.yaml"
    spec.write_text(f"name: t\nmodel: {HUB_ID}\n")
    assert main(["-q", "run", str(spec)]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["x.yaml"]


def test_report_only_without_a_run_directory(tmp_path, capsys):
    out = tmp_path / "never-ran"
    fails(["run", "demo", "--out", str(out), "--report-only"], capsys, "no run directory .* to make a report", out)


def test_every_subcommand_prints_its_help(capsys):
    """--help of each subcommand prints (argparse formats help strings with %: a stray one breaks it)."""
    from ctp.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(getattr(a, "choices", None), dict))
    assert len(sub.choices) >= 7
    for name in sub.choices:
        try:
            code = main([name, "--help"])
        except SystemExit as e:
            code = e.code
        assert code == 0, name
        assert "usage: ctp " + name in capsys.readouterr().out
