"""``ctp compress`` end to end on a tiny model directory, the flag-to-config mapping and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctp.cli import build_parser, main
from ctp.commands.compress import build_config
from ctp.compress.config import CompressConfig, PruneConfig, QuantConfig
from ctp.errors import CTPError

FAST = ["--nsamples", "4", "--seqlen", "32", "--calib", "c4"]


def parse(*argv: str):
    return build_parser().parse_args(["compress", "--out", "x", *argv])


def test_cli_end_to_end_then_eval_loads_the_artifact(tiny_dir, tmp_path, capsys):
    out = tmp_path / "tiny-50-4"
    rc = main(["-q", "compress", "--model", tiny_dir, "--out", str(out), "--sparsity", "0.5", "--bits", "4",
               "--group-size", "32", *FAST])
    assert rc == 0
    table = capsys.readouterr().out
    for row in ("sparsegpt50+gptq4g32", "achieved sparsity", "0.5000", "bits per compressed weight", "dense fp16 size",
                "mean layer recon error"):
        assert row in table
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "ctp_compression.json", "dense.safetensors", "compressed.safetensors",
            "compression_report.json", "tokenizer.json"} <= names
    meta = json.loads((out / "ctp_compression.json").read_text())
    assert meta["source"]["path"] == tiny_dir and meta["config"]["nsamples"] == 4
    rc = main(["-q", "eval", "--model", str(out), "--datasets", "wikitext2", "--seqlen", "32", "--max-windows", "2",
               "--out", str(tmp_path / "ppl.json")])
    assert rc == 0
    result = json.loads((tmp_path / "ppl.json").read_text())
    assert result["model"]["compression"]["label"] == "sparsegpt50+gptq4g32"


def test_flags_map_onto_the_config():
    cfg = build_config(parse("--sparsity", "0.6", "--prune-method", "wanda", "--bits", "3", "--quant-method", "rtn",
                             "--group-size", "64", "--sym", "--no-true-sequential", "--nsamples", "16",
                             "--seqlen", "256", "--calib", "wikitext2", "--seed", "3"))
    assert cfg == CompressConfig(prune=PruneConfig(method="wanda", sparsity=0.6),
                                 quant=QuantConfig(method="rtn", bits=3, group_size=64, sym=True,
                                                   true_sequential=False),
                                 nsamples=16, seqlen=256, calib_dataset="wikitext2", seed=3)
    cfg = build_config(parse("--nm", "2:4", "--bits", "4", "--percdamp", "0.1", "--blocksize", "64"))
    assert (cfg.prune.prune_n, cfg.prune.prune_m, cfg.prune.sparsity) == (2, 4, 0.5)
    assert cfg.joint and cfg.prune.percdamp == cfg.quant.percdamp == 0.1 and cfg.prune.blocksize == 64
    cfg = build_config(parse("--bits", "4", "--act-order", "--percdamp", "0.1", "--blocksize", "64"))
    assert cfg.prune is None and cfg.quant.act_order and cfg.quant.percdamp == 0.1 and cfg.quant.blocksize == 64


def test_config_file_then_flags_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("prune: {sparsity: 0.5, method: magnitude}\nquant: {bits: 4, group_size: 32}\nnsamples: 8\n")
    cfg = build_config(parse("--config", str(f), "--bits", "3"))
    assert cfg.prune.method == "magnitude" and cfg.quant.bits == 3 and cfg.quant.group_size == 32 and cfg.nsamples == 8
    j = tmp_path / "c.json"
    j.write_text(json.dumps(cfg.to_dict()))
    assert build_config(parse("--config", str(j))) == cfg


@pytest.mark.parametrize("content, match", [
    ("prune: {sparsity: 0.5, amount: 3}\n", "unknown key 'amount'"),
    ("quant: {bits: 4}\ncalibration: c4\n", "unknown key 'calibration'"),
    ("- 1\n- 2\n", "mapping"),
])
def test_config_file_unknown_keys_rejected(tmp_path, content, match):
    f = tmp_path / "c.yaml"
    f.write_text(content)
    with pytest.raises(CTPError, match=match):
        build_config(parse("--config", str(f)))


@pytest.mark.parametrize("argv, match", [
    (["--sparsity", "1.5"], "sparsity 1.5 is outside"),
    (["--bits", "5"], "bits 5 is not supported"),
    (["--nm", "4:2"], "4:2 needs 0 < N < M"),
    (["--nm", "2-4"], "not of the form N:M"),
    (["--sparsity", "0.5", "--nm", "2:4"], "both given"),
    (["--group-size", "32"], "needs --bits"),
    ([], "nothing to compress"),
    (["--bits", "4", "--group-size", "48"], "group_size 48 does not divide"),
    (["--bits", "4", "--quant-method", "rtn", "--act-order"], "act_order has no meaning"),
    (["--nm", "2:4", "--bits", "4", "--act-order"], "scramble the N:M groups"),
])
def test_bad_flags_exit_2_with_one_line(tiny_dir, tmp_path, capsys, argv, match):
    rc = main(["-q", "compress", "--model", tiny_dir, "--out", str(tmp_path / "o"), *argv, *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("ctp compress: error:") and match in err
    assert not (tmp_path / "o").exists()


def test_missing_out_exits_2(tiny_dir, capsys):
    assert main(["-q", "compress", "--model", tiny_dir, "--bits", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the following arguments are required: --out" in err


def test_out_must_not_clobber_an_unrelated_directory(tiny_dir, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["-q", "compress", "--model", tiny_dir, "--out", str(tmp_path), "--bits", "4", *FAST]) == 2
    assert Path(tmp_path / "keep.txt").read_text() == "mine"


def test_too_little_disk_space_is_one_line_before_any_work(tiny_dir, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "o"
    assert main(["-q", "compress", "--model", tiny_dir, "--out", str(out), "--bits", "4", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs about" in err and "MB free" in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "o.partial").exists()
