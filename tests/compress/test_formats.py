"""Exports other tools read back with equal weights and logits; their checkpoints load into ctp; bad exports refused."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny

from ctp.cli import main
from ctp.compress.artifact import load_compressed, save_compressed
from ctp.compress.config import CompressConfig, PruneConfig, QuantConfig
from ctp.compress.driver import compress_model
from ctp.compress.formats import export_model
from ctp.compress.packed import packed_modules
from ctp.errors import CTPError
from ctp.models.load import load_model

RECIPES = {
    "rtn4g32": CompressConfig(quant=QuantConfig(method="rtn", bits=4, group_size=32)),  # asymmetric groups
    "sp50-gptq4-sym": CompressConfig(prune=PruneConfig(sparsity=0.5), quant=QuantConfig(bits=4, sym=True)),
    "rtn8-sym": CompressConfig(quant=QuantConfig(method="rtn", bits=8, sym=True)),
    "gptq4g32-act": CompressConfig(quant=QuantConfig(bits=4, group_size=32, act_order=True)),
    "rtn3g32": CompressConfig(quant=QuantConfig(method="rtn", bits=3, group_size=32)),
    "rtn8g32-asym": CompressConfig(quant=QuantConfig(method="rtn", bits=8, group_size=32)),
    "magnitude50": CompressConfig(prune=PruneConfig(method="magnitude", sparsity=0.5)),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("formats")


@functools.lru_cache(maxsize=None)
def _artifact(recipe: str, root: str, tok_dir: str) -> str:
    from transformers import AutoTokenizer

    model = make_tiny("llama")
    ids = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))
    report = compress_model(model, None, RECIPES[recipe], device="cpu", calib_ids=ids, progress=False, chunk=2)
    out = f"{root}/{recipe}"
    save_compressed(model, AutoTokenizer.from_pretrained(tok_dir), report, out)
    return out


@pytest.fixture
def artifact(root, smol_dir):
    return lambda recipe: _artifact(recipe, str(root), smol_dir)


IDS = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(3))


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("recipe", ["rtn4g32", "sp50-gptq4-sym", "rtn8-sym"])
def test_compressed_tensors_export_loads_in_transformers_with_equal_logits(recipe, artifact, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = artifact(recipe)
    export_model(src, tmp_path / "ct", "compressed-tensors")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["ignore"] == ["lm_head"]
    ref = logits(load_compressed(src)[0])
    sym = RECIPES[recipe].quant.sym
    # transformers 5.23 + compressed-tensors 0.20.1 build asymmetric modules expecting an unpacked zero point, while
    # the format (and the package's own compressor) packs it: such checkpoints load through the dequantize path
    kwargs = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, **kwargs)
    assert rel(logits(hf), ref) < 1e-4
    # and ctp reads it back into its own codes: dense exactly, packed within the bf16 activations' rounding
    dense, _, info = load_model(str(tmp_path / "ct"))
    assert info.compression["label"].startswith("compressed-tensors:int")
    assert torch.equal(logits(dense), ref)
    packed, _, info = load_model(str(tmp_path / "ct"), runtime="packed")
    assert info.runtime == "packed" and len(packed_modules(packed)) == 14
    assert rel(logits(packed), ref) < 3e-2


def _gptq_dequantize(d) -> dict[str, torch.Tensor]:
    """The GPTQ v1 layout read from its description, independently of ctp: qweight (in/8, out) int32 with 8 codes
    per word along the input, low bits first; qzeros (groups, out/8) likewise along the output, holding zero - 1;
    scales (groups, out); g_idx (in,)."""
    from safetensors.torch import load_file

    t = load_file(str(d / "model.safetensors"))
    bits = json.loads((d / "quantize_config.json").read_text())["bits"]
    per, mask = 32 // bits, 2**bits - 1
    out = {}
    for key in [k for k in t if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        qw = t[key].numpy().view(np.uint32)
        q = np.stack([(qw >> (bits * i)) & mask for i in range(per)], axis=1).reshape(-1, qw.shape[1])  # (in, out)
        qz = t[f"{name}.qzeros"].numpy().view(np.uint32)
        z = np.stack([(qz >> (bits * i)) & mask for i in range(per)], axis=2).reshape(qz.shape[0], -1) + 1
        s = t[f"{name}.scales"].float().numpy()  # (groups, out)
        g = t[f"{name}.g_idx"].numpy().astype(np.int64)
        out[name] = torch.from_numpy((s[g] * (q.astype(np.float32) - z[g])).T.copy())  # (out, in)
    return out


@pytest.mark.parametrize("recipe", ["rtn4g32", "gptq4g32-act", "rtn8-sym"])
def test_gptq_export_unpacks_to_ctp_weights(recipe, artifact, tmp_path):
    src = artifact(recipe)
    summary = export_model(src, tmp_path / "gptq", "gptq")
    assert summary["desc_act"] == RECIPES[recipe].quant.act_order
    ref_model = load_compressed(src)[0]
    weights = _gptq_dequantize(tmp_path / "gptq")
    assert len(weights) == 14
    for name, w in weights.items():
        ref = ref_model.get_submodule(name).weight.detach()
        assert rel(w, ref) < 2e-3  # fp16 scales: the format's own rounding
    dense, _, info = load_model(str(tmp_path / "gptq"))  # and ctp imports it
    assert rel(logits(dense), logits(ref_model)) < 5e-3
    assert len(packed_modules(load_model(str(tmp_path / "gptq"), runtime="packed")[0])) == 14


@pytest.mark.parametrize("recipe", ["rtn4g32", "sp50-gptq4-sym", "rtn8-sym"])
def test_gguf_export_reads_back_with_gguf_and_transformers(recipe, artifact, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = artifact(recipe)
    summary = export_model(src, tmp_path / "m.gguf", "gguf")
    assert summary["block_types"] == (["Q8_0"] if "8" in recipe else ["Q4_1"])
    ref_model = load_compressed(src)[0]
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    up = tensors["blk.1.ffn_up.weight"]
    w = torch.from_numpy(gguf.quants.dequantize(up.data, up.tensor_type).copy()).float()
    ref = ref_model.model.layers[1].mlp.up_proj.weight.detach()
    assert w.shape == ref.shape and rel(w, ref) < 2e-3  # fp16 block scales
    tied = ref_model.config.tie_word_embeddings
    assert ("output.weight" in tensors) != tied  # a tied head is not written: llama.cpp reads token_embd
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert rel(logits(hf), logits(ref_model)) < 5e-3  # q/k rows permuted for llama.cpp and back by the reader
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "Where is Long Beach? It lies south of Los Angeles."
    assert tok(text).input_ids == AutoTokenizer.from_pretrained(src)(text).input_ids


@pytest.mark.parametrize("recipe,fmt,match", [
    ("gptq4g32-act", "compressed-tensors", "act-order"),
    ("gptq4g32-act", "gguf", "act-order"),
    ("rtn3g32", "gptq", "3-bit codes do not tile"),
    ("rtn8g32-asym", "gguf", "8-bit asymmetric"),
    ("magnitude50", "compressed-tensors", "pruned but not quantized"),
    ("magnitude50", "gguf", "pruned but not quantized"),
])
def test_formats_that_cannot_hold_the_model_are_refused_before_writing(recipe, fmt, match, artifact, tmp_path):
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "out")
    with pytest.raises(CTPError, match=match):
        export_model(artifact(recipe), out, fmt)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written


def test_export_cli(artifact, tmp_path, capsys):
    src = artifact("rtn4g32")
    assert main(["-q", "export", "--model", src, "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM

    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")), logits(load_compressed(src)[0]))
    capsys.readouterr()
    assert main(["-q", "export", "--model", src, "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["-q", "export", "--model", src, "--format", "gguf", "--out", str(tmp_path / "m.bin")]) == 2
    assert "must end in .gguf" in capsys.readouterr().err
    assert main(["-q", "export", "--model", src, "--format", "gptq", "--out", f"{src}/inside"]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert main(["-q", "export", "--model", str(tmp_path / "hf"), "--format", "gptq", "--out", str(tmp_path / "g")]) == 2
    assert "not a model written by ctp compress" in capsys.readouterr().err


def test_unknown_foreign_checkpoints_are_one_line(tmp_path, artifact):
    import shutil

    d = tmp_path / "ct"
    export_model(artifact("rtn8-sym"), d, "compressed-tensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format"] = "float-quantized"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CTPError, match="float-quantized"):
        load_model(str(d))
    g = tmp_path / "gptq"
    export_model(artifact("rtn4g32"), g, "gptq")
    shutil.copy(g / "model.safetensors", tmp_path / "keep.safetensors")
    (g / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CTPError, match="cannot read"):
        load_model(str(g))
