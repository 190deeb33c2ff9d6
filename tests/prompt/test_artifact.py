"""Prompt artifacts: identity on save/load, checks against the model, damage detection, the PEFT format."""

import dataclasses
import json
import logging

import pytest
import torch

from conftest import make_tiny
from ctp.errors import CTPError
from ctp.models.load import ModelInfo
from ctp.prompt.artifact import (PromptArtifact, artifact_for, embedding_fingerprint, export_peft, import_peft,
                                 load_prompt, save_prompt)
from ctp.lm import embed_inputs

INFO = ModelInfo(spec="tiny", path="/x/tiny", model_type="llama", hidden_size=64, vocab_size=49152, num_layers=2,
                 tokenizer_hash="abc123", compression=None)


def _art(model=None, **kw):
    model = model or make_tiny("llama")
    torch.manual_seed(0)
    emb = torch.randn(6, 64)
    return artifact_for(model, INFO, emb, data={"name": "c4", "split": "train"}, steps=12, best_step=10,
                        best_val_ppl=31.5, val_ppl_no_prompt=40.25, train_config={"lr": 1e-3, "weight_decay": 1e-5},
                        prompt_config={"num_tokens": 6, "init": "vocab", "init_text": None, "seed": 0}, **kw)


def test_save_load_is_bit_identical(tmp_path):
    art = _art()
    path = save_prompt(tmp_path / "p.safetensors", art)
    back = load_prompt(path, INFO)
    assert back.embeddings.dtype == torch.float32
    assert torch.equal(back.embeddings, art.embeddings)
    assert back.metadata() == art.metadata()
    assert back.k == 6 and back.embedding_hash == embedding_fingerprint(make_tiny("llama"))


def test_hidden_size_and_tokenizer_mismatch_are_errors(tmp_path):
    path = save_prompt(tmp_path / "p.safetensors", _art())
    with pytest.raises(CTPError, match="hidden size 64.*hidden size 576"):
        load_prompt(path, dataclasses.replace(INFO, hidden_size=576, spec="other"))
    with pytest.raises(CTPError, match="tokenizer abc123.*tokenizer fff"):
        load_prompt(path, dataclasses.replace(INFO, tokenizer_hash="fff"))


def test_other_compression_is_a_transfer_warning(tmp_path, caplog):
    path = save_prompt(tmp_path / "p.safetensors", _art())
    with caplog.at_level(logging.WARNING):
        load_prompt(path, INFO)
    assert "transfer" not in caplog.text
    with caplog.at_level(logging.WARNING):
        art = load_prompt(path, dataclasses.replace(INFO, compression={"sparsity": 0.5, "bits": 4}))
    assert "transfer across compression" in caplog.text and art.k == 6


def test_damaged_files_are_errors(tmp_path):
    path = save_prompt(tmp_path / "p.safetensors", _art())
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(CTPError, match="truncated or damaged|checksum"):
        load_prompt(tmp_path / "short.safetensors")
    tampered = bytearray(data)
    tampered[-5] ^= 0xFF  # flip bits inside the tensor data
    (tmp_path / "bad.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(CTPError, match="checksum"):
        load_prompt(tmp_path / "bad.safetensors")
    with pytest.raises(CTPError, match="does not exist"):
        load_prompt(tmp_path / "missing.safetensors")
    with pytest.raises(CTPError, match="non-finite"):
        save_prompt(tmp_path / "nan.safetensors", PromptArtifact(embeddings=torch.full((2, 4), float("nan"))))


def test_peft_round_trip(tmp_path):
    art = _art()
    d = export_peft(art, tmp_path / "peft")
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["num_virtual_tokens"] == 6 and cfg["token_dim"] == 64 and cfg["num_transformer_submodules"] == 1
    from safetensors.torch import load_file

    assert list(load_file(d / "adapter_model.safetensors")) == ["prompt_embeddings"]
    back = import_peft(d)
    assert torch.equal(back.embeddings, art.embeddings) and back.metadata() == art.metadata()
    # a directory is accepted wherever a prompt file is, with the same checks
    assert torch.equal(load_prompt(d, INFO).embeddings, art.embeddings)
    with pytest.raises(CTPError, match="hidden size"):
        load_prompt(d, dataclasses.replace(INFO, hidden_size=32))


def test_peft_loads_our_export_with_identical_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = make_tiny("llama")
    art = _art(model)
    export_peft(art, tmp_path / "peft")
    ids = torch.randint(0, 5000, (2, 9))
    with torch.no_grad():
        ours = model(**embed_inputs(model, ids, art.embeddings)).logits  # (2, 6+9, V)
        pm = peft.PeftModel.from_pretrained(make_tiny("llama"), str(tmp_path / "peft"))
        theirs = pm(input_ids=ids).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours)
    # and PEFT's own save comes back through import_peft unchanged
    pm.save_pretrained(str(tmp_path / "resaved"))
    assert torch.equal(import_peft(tmp_path / "resaved").embeddings, art.embeddings)
