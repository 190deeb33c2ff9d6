"""The compressed-model artifact: bit-identical reload, real size savings, tied weights, integrity."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from conftest import make_tiny as _make_tiny

from ctp.compress.artifact import (COMPRESSED_FILE, DENSE_FILE, MARKER, REPORT_FILE, decode_weight, encode_weight,
                                   load_compressed, save_compressed)
from ctp.compress.config import CompressConfig, PruneConfig, QuantConfig
from ctp.compress.driver import compress_model
from ctp.compress.registry import compress_weight
from ctp.errors import CTPError
from ctp.io import load_tensors

RECIPES = {
    "sparsegpt50+gptq4": CompressConfig(prune=PruneConfig(sparsity=0.5), quant=QuantConfig(bits=4)),
    "gptq3g32-act": CompressConfig(quant=QuantConfig(bits=3, group_size=32, act_order=True)),
    "2:4": CompressConfig(prune=PruneConfig(prune_n=2, prune_m=4)),
    "magnitude50": CompressConfig(prune=PruneConfig(method="magnitude", sparsity=0.5)),
    "wanda50+rtn4g32": CompressConfig(prune=PruneConfig(method="wanda", sparsity=0.5),
                                      quant=QuantConfig(method="rtn", bits=4, group_size=32)),
}


@functools.lru_cache(maxsize=None)
def _cached_tiny(family: str):
    return _make_tiny(family)


def make_tiny(family: str):
    return copy.deepcopy(_cached_tiny(family))


def wide_llama(hidden: int = 128, vocab: int = 256):
    """A tiny Llama whose linears dominate its size and whose widths take group size 128."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def calib(n=6, seqlen=32, vocab=49152, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def compress(model, cfg, vocab=49152):
    return compress_model(model, None, cfg, device="cpu", calib_ids=calib(vocab=vocab), progress=False, chunk=3)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3_text"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_reload_gives_bit_identical_logits(family, recipe, tmp_path, tokenizer):
    model = make_tiny(family)
    report = compress(model, RECIPES[recipe])
    probe = calib(2, 24, seed=1)
    want = logits(model, probe)
    save_compressed(model, tokenizer, report, report.compressed, tmp_path / "m")
    loaded, tok, compression = load_compressed(tmp_path / "m")
    assert bitwise_equal(logits(loaded, probe), want)
    assert compression["label"] == RECIPES[recipe].label()
    assert compression["summary"]["sparsity"] == pytest.approx(report.sparsity)
    assert tok.get_vocab() == tokenizer.get_vocab()


def test_tied_embeddings_are_stored_once_and_retied(tmp_path, tokenizer):
    model = make_tiny("gpt2")  # ties lm_head to wte
    assert model.lm_head.weight is model.get_input_embeddings().weight
    report = compress(model, RECIPES["sparsegpt50+gptq4"])
    save_compressed(model, tokenizer, report, tmp_path / "m")  # the report's compressed weights by default
    dense, _ = load_tensors(tmp_path / "m" / DENSE_FILE)
    assert "transformer.wte.weight" in dense and "lm_head.weight" not in dense
    meta = json.loads((tmp_path / "m" / MARKER).read_text())
    assert meta["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded, _, _ = load_compressed(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert not any(k.endswith("c_attn.weight") for k in dense)  # compressed linears are not stored dense


def compressed_fraction(tmp_path, recipe: CompressConfig) -> tuple[float, dict]:
    model = wide_llama()
    report = compress(model, recipe, vocab=256)
    storage = save_compressed(model, None, report, report.compressed, tmp_path / recipe.label(),
                              dense_dtype=torch.float16)
    comp, _ = load_tensors(tmp_path / recipe.label() / COMPRESSED_FILE)
    payload = sum(t.numel() * t.element_size() for t in comp.values())
    assert payload == storage["compressed_linear_bytes"]
    return payload / storage["linear_fp16_bytes"], storage


@pytest.mark.parametrize("recipe, bound", [
    (CompressConfig(prune=PruneConfig(sparsity=0.5), quant=QuantConfig(bits=4)), 0.22),  # 3 bits + row grids
    (CompressConfig(quant=QuantConfig(bits=4, group_size=128)), 0.30),  # 4 bits + fp32 scale/4-bit zero per 128
    (CompressConfig(quant=QuantConfig(bits=3, group_size=128, act_order=True)), 0.25),  # g_idx stored (int16)
    (CompressConfig(prune=PruneConfig(prune_n=2, prune_m=4), quant=QuantConfig(bits=4)), 0.22),
], ids=["50%+4bit", "4bit-g128", "3bit-g128-act", "2:4+4bit"])
def test_compressed_linears_really_are_smaller(tmp_path, recipe, bound):
    """Compressed-linear bytes on disk vs the same weights in fp16 (16 bits each)."""
    frac, storage = compressed_fraction(tmp_path, recipe)
    assert frac <= bound, frac
    # The whole weight payload, dense part in fp16 included, is well below the fp16 model.
    assert storage["weights_file_bytes"] < 0.5 * storage["fp16_bytes"]


def test_half_precision_dense_part_matches_the_half_model(tmp_path, tokenizer):
    """--save-dtype float16: the reloaded fp16 model equals the in-memory model cast to fp16."""
    model = make_tiny("llama")
    report = compress(model, RECIPES["sparsegpt50+gptq4"])
    save_compressed(model, tokenizer, report, report.compressed, tmp_path / "m", dense_dtype=torch.float16)
    dense, meta = load_tensors(tmp_path / "m" / DENSE_FILE)
    assert {t.dtype for t in dense.values() if t.is_floating_point()} == {torch.float16}
    loaded, _, _ = load_compressed(tmp_path / "m", dtype=torch.float16)
    half = model.half()
    for (name, a), (_, b) in zip(half.state_dict().items(), loaded.state_dict().items()):
        assert bitwise_equal(a, b), name


def test_encode_decode_round_trip_of_one_weight():
    torch.manual_seed(0)
    W = torch.randn(24, 64)
    X = torch.randn(256, 64)
    H = 2 / 256 * X.t() @ X
    for cfg in [*RECIPES.values(), CompressConfig(quant=QuantConfig(bits=2, group_size=16, sym=True)),
                CompressConfig(prune=PruneConfig(method="wanda", sparsity=0.7),
                               quant=QuantConfig(method="rtn", bits=8))]:
        cw = compress_weight(W, H, 256, cfg)
        tensors, entry = encode_weight("w", cw, torch.float32)
        assert torch.equal(decode_weight("w", entry, tensors), cw.weight), cfg.label()
        if cw.quantized and cw.mask is not None:  # codes of kept weights only
            assert tensors["w.codes"].numel() == (entry["n_kept"] * cw.bits + 7) // 8


def test_report_and_index_are_written(tmp_path, tokenizer):
    model = make_tiny("llama")
    report = compress(model, RECIPES["gptq3g32-act"])
    save_compressed(model, tokenizer, report, report.compressed, tmp_path / "m", source={"spec": "tiny"})
    meta = json.loads((tmp_path / "m" / MARKER).read_text())
    assert CompressConfig.from_dict(meta["config"]) == RECIPES["gptq3g32-act"]
    assert meta["source"] == {"spec": "tiny"} and meta["storage"]["total_bytes"] > 0
    assert set(meta["tensors"]) == set(report.compressed)
    assert all(e["kind"] == "quant" and e["g_idx"] for e in meta["tensors"].values())
    full = json.loads((tmp_path / "m" / REPORT_FILE).read_text())
    assert len(full["layers"]) == 2 and full["label"] == "gptq3g32-act"


def test_load_model_dispatches_to_the_artifact(tmp_path, tokenizer):
    from ctp.models.load import load_model

    model = make_tiny("llama")
    report = compress(model, RECIPES["magnitude50"])
    save_compressed(model, tokenizer, report, report.compressed, tmp_path / "m")
    loaded, tok, info = load_model(str(tmp_path / "m"))
    assert info.compression["label"] == "magnitude50" and info.model_type == "llama"
    probe = calib(1, 16, seed=2)
    assert bitwise_equal(logits(loaded, probe), logits(model, probe))


def test_damaged_artifact_is_refused(tmp_path, tokenizer):
    model = make_tiny("llama")
    report = compress(model, RECIPES["sparsegpt50+gptq4"])
    save_compressed(model, tokenizer, report, report.compressed, tmp_path / "m")
    f = tmp_path / "m" / COMPRESSED_FILE
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor's payload
    f.write_bytes(bytes(data))
    with pytest.raises(CTPError, match="checksum"):
        load_compressed(tmp_path / "m")


def test_wrong_payload_is_caught_before_anything_is_written(tmp_path, tokenizer):
    model = make_tiny("llama")
    report = compress(model, RECIPES["sparsegpt50+gptq4"])
    name = next(iter(report.compressed))
    model.get_submodule(name).weight.data[0, 0] += 1.0  # the live weight no longer matches its codes
    with pytest.raises(RuntimeError, match="does not rebuild"):
        save_compressed(model, tokenizer, report, report.compressed, tmp_path / "m")
    assert not (tmp_path / "m").exists()
