"""``ctp train-prompt`` and ``ctp generate`` end to end on a tiny model directory."""

import json

from ctp.cli import main
from ctp.models.load import load_model
from ctp.prompt.artifact import import_peft, load_prompt


def test_train_prompt_then_generate_compare(tiny_dir, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    rc = main(["-q", "train-prompt", "--model", tiny_dir, "--tokens", "4", "--steps", "3", "--seqlen", "32",
               "--batch-size", "2", "--eval-every", "2", "--eval-windows", "2", "--lr", "0.01", "--out", str(out),
               "--peft-dir", str(tmp_path / "peft"), "--json", str(tmp_path / "train.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "steps: 3/3" in printed and "best" in printed and "validation PPL" in printed
    _, _, info = load_model(tiny_dir)
    art = load_prompt(out, info)
    assert art.k == 4 and art.steps == 3 and art.train_config["lr"] == 0.01 and art.tokenizer_hash == info.tokenizer_hash
    assert import_peft(tmp_path / "peft").embeddings.equal(art.embeddings)
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["history"]["steps_done"] == 3 and [e["step"] for e in summary["history"]["evals"]] == [0, 2, 3]

    rc = main(["-q", "generate", "--model", tiny_dir, "--prompt", str(out), "--compare", "--max-new-tokens", "4",
               "--stats", "--out", str(tmp_path / "gen.json"), "Where is Long Beach?", "What is asparagus?"])
    assert rc == 0
    printed = capsys.readouterr().out
    for label in ("[no prompt]", "[hard prompt]", "[learned prompt]"):
        assert printed.count(label) == 2
    assert printed.count("Q: ") == 2 and "ms/tok" in printed
    res = json.loads((tmp_path / "gen.json").read_text())
    assert [sorted(r["answers"]) for r in res["results"]] == [["hard prompt", "learned prompt", "no prompt"]] * 2


def test_generate_single_prompt_and_errors(tiny_dir, tmp_path, capsys):
    assert main(["-q", "generate", "--model", tiny_dir, "--prompt", "hard", "--max-new-tokens", "3", "Hi"]) == 0
    assert "[hard prompt]" in capsys.readouterr().out
    assert main(["-q", "generate", "--model", tiny_dir, "--compare", "Hi"]) == 2
    assert "--compare needs a learned prompt" in capsys.readouterr().err
    assert main(["-q", "generate", "--model", tiny_dir, "--prompt", str(tmp_path / "none.safetensors"), "Hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["-q", "train-prompt", "--model", tiny_dir, "--out", str(tmp_path / "p.pt"), "--steps", "1"]) == 2
    assert "should end in .safetensors" in capsys.readouterr().err


def test_cpu_demo_preset_and_overrides():
    from ctp.cli import build_parser
    from ctp.commands.train_prompt import build_configs
    from ctp.prompt.train import TrainConfig

    args = build_parser().parse_args(["train-prompt", "--out", "p.safetensors", "--cpu-demo", "--steps", "7",
                                      "--tokens", "20", "--init", "text", "--init-text", "hello", "--lr", "0.5"])
    pcfg, tcfg = build_configs(args)
    assert tcfg == TrainConfig.cpu_demo(steps=7, lr=0.5)
    assert (pcfg.num_tokens, pcfg.init.value, pcfg.init_text) == (20, "text", "hello")
    args = build_parser().parse_args(["train-prompt", "--out", "p.safetensors", "--grad-checkpointing",
                                      "--precision", "bf16", "--no-resume"])
    pcfg, tcfg = build_configs(args)
    assert tcfg == TrainConfig(gradient_checkpointing=True, precision="bf16") and pcfg.num_tokens == 100
