"""Data parallelism: two CPU processes (gloo, started by ``accelerate launch``) learn and score like one."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctp.cli import build_parser, main
from ctp.commands.train_prompt import build_configs
from ctp.models.load import load_model
from ctp.prompt.artifact import load_prompt
from ctp.prompt.soft import PromptConfig, init_prompt
from ctp.prompt.train import checkpoint_path_for, train_prompt

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(tiny_dir: str, out: Path, name: str) -> list[str]:
    # a global batch of 3 and 3 validation windows: uneven shares (2 + 1) on two processes
    return ["-q", "train-prompt", "--model", tiny_dir, "--device", "cpu", "--tokens", "4", "--steps", "4",
            "--warmup", "0", "--seqlen", "32", "--batch-size", "3", "--eval-every", "2", "--eval-windows", "3",
            "--lr", "0.03", "--checkpoint-every", "1", "--out", str(out / f"{name}.safetensors"),
            "--json", str(out / f"{name}.json")]


def eval_args(tiny_dir: str, out: Path) -> list[str]:
    return ["-q", "eval", "--model", tiny_dir, "--device", "cpu", "--prompt", "hard", "--datasets", "wikitext2",
            "--seqlen", "32", "--max-windows", "5", "--batch-size", "2", "--out", str(out / "eval.json")]


def interrupted_at_step_2(tiny_dir: str, out: Path, name: str) -> None:
    """One process trains 2 of the 4 steps and leaves its checkpoint, as after a crash."""
    pcfg, tcfg = build_configs(build_parser().parse_args(train_args(tiny_dir, out, name)[1:]))
    model, tok, info = load_model(tiny_dir, device="cpu")

    def crash(step, hist, prompt):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_prompt(model, tok, info, pcfg, tcfg, out_path=out / f"{name}.safetensors", progress=False,
                     callback=crash)
    assert checkpoint_path_for(out / f"{name}.safetensors").exists()


@pytest.mark.slow
def test_two_processes_learn_and_score_like_one(tiny_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    interrupted_at_step_2(tiny_dir, two, "resumed")
    # two processes: train from scratch, evaluate, then finish the interrupted run from its checkpoint
    commands = [train_args(tiny_dir, two, "p"), eval_args(tiny_dir, two), train_args(tiny_dir, two, "resumed")]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(WORKER), str(two), json.dumps(commands)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # the single-process reference runs here meanwhile
        for argv in (train_args(tiny_dir, one, "p"), eval_args(tiny_dir, one)):
            assert main(argv) == 0
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert output.count("saved:") == 2 and output.count("dataset") == 1  # only the main process prints

    # the same prompt as one process with the same global batch and seed, up to float summation order
    model, tok, info = load_model(tiny_dir)
    p1, p2 = load_prompt(one / "p.safetensors", info), load_prompt(two / "p.safetensors", info)
    assert not torch.allclose(p2.embeddings, init_prompt(model, tok, PromptConfig(num_tokens=4)), atol=1e-3)
    torch.testing.assert_close(p2.embeddings, p1.embeddings, rtol=1e-5, atol=1e-6)
    h1 = json.loads((one / "p.json").read_text())["history"]
    h2 = json.loads((two / "p.json").read_text())["history"]
    assert h2["steps_done"] == 4 and h2["best_step"] == h1["best_step"] and h2["stopped"] is None
    assert h2["val_ppl_no_prompt"] == pytest.approx(h1["val_ppl_no_prompt"], rel=1e-12)
    assert [e["step"] for e in h2["evals"]] == [0, 2, 4]
    assert h2["evals"][0]["val_ppl"] == pytest.approx(h1["evals"][0]["val_ppl"], rel=1e-12)  # same start
    assert [e["val_ppl"] for e in h2["evals"]] == pytest.approx([e["val_ppl"] for e in h1["evals"]], rel=1e-5)
    assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)

    # a one-process checkpoint, read by the main process and sent to the other, resumes to the same prompt
    hr = json.loads((two / "resumed.json").read_text())["history"]
    assert hr["resumed_from"] == [2] and hr["steps_done"] == 4
    torch.testing.assert_close(load_prompt(two / "resumed.safetensors", info).embeddings, p1.embeddings,
                               rtol=1e-5, atol=1e-6)

    # only the main process wrote: each checkpoint, prompt and JSON file once; no checkpoint is left
    assert not (two / "writes.1").exists()
    writes = (two / "writes.0").read_text().split()
    assert sorted(writes) == sorted(["p.ckpt.safetensors"] * 3 + ["p.safetensors", "p.json", "eval.json"]
                                    + ["resumed.ckpt.safetensors", "resumed.safetensors", "resumed.json"])
    assert sorted(f.name for f in two.iterdir()) == sorted(["p.safetensors", "p.json", "eval.json",
                                                             "resumed.safetensors", "resumed.json", "writes.0"])

    # perplexity: each window scored in the batch one process would use, sums added in float64
    r1 = json.loads((one / "eval.json").read_text())["results"][0]
    r2 = json.loads((two / "eval.json").read_text())["results"][0]
    assert (r2["n_windows"], r2["n_tokens"]) == (r1["n_windows"], r1["n_tokens"]) == (5, 5 * 31)
    assert r2["ppl"] == pytest.approx(r1["ppl"], rel=1e-12)


@pytest.mark.slow
def test_two_processes_learn_a_distilled_prefix_like_one(tiny_dir, tmp_path):
    """A prefix prompt with the mix objective (teacher forward in every process) is data parallel too."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    extra = ["--kind", "prefix", "--objective", "mix", "--teacher", tiny_dir]
    commands = [train_args(tiny_dir, two, "p") + extra]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(WORKER), str(two), json.dumps(commands)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert main(train_args(tiny_dir, one, "p") + extra) == 0
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    _, _, info = load_model(tiny_dir)
    p1, p2 = load_prompt(one / "p.safetensors", info), load_prompt(two / "p.safetensors", info)
    assert p1.kind == p2.kind == "prefix" and p2.train_config["objective"] == "mix"
    torch.testing.assert_close(p2.embeddings, p1.embeddings, rtol=1e-5, atol=1e-6)
    h1 = json.loads((one / "p.json").read_text())["history"]
    h2 = json.loads((two / "p.json").read_text())["history"]
    assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
