"""The packed run time: quantized linears kept as int4/int8 codes compute what the dense rebuild computes."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import make_tiny as _make_tiny

from ctp.cli import main
from ctp.compress.artifact import load_compressed, save_compressed
from ctp.compress.config import CompressConfig, PruneConfig, QuantConfig
from ctp.compress.driver import compress_model
from ctp.compress.packed import Int4Linear, Int8Linear, _cpu_unpack, packable, packed_modules, set_act_dtype, weight_bytes
from ctp.errors import CTPError
from ctp.models.load import load_model

RECIPES = {
    "rtn4g32": CompressConfig(quant=QuantConfig(method="rtn", bits=4, group_size=32)),
    "sparsegpt50+gptq4": CompressConfig(prune=PruneConfig(sparsity=0.5), quant=QuantConfig(bits=4)),
    "gptq3g32-act": CompressConfig(quant=QuantConfig(bits=3, group_size=32, act_order=True)),
    "gptq8-asym": CompressConfig(quant=QuantConfig(bits=8)),
}


@functools.lru_cache(maxsize=None)
def _artifact(family: str, recipe: str, root: str) -> str:
    model = _make_tiny(family)
    ids = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))
    report = compress_model(model, None, RECIPES[recipe], device="cpu", calib_ids=ids, progress=False, chunk=2)
    out = f"{root}/{family}-{recipe}"
    save_compressed(model, None, report, out)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("packed"))


def _input_grad(model, emb: torch.Tensor) -> torch.Tensor:
    """The gradient of a log-probability with respect to the input embeddings (what prompt training needs)."""
    x = emb.clone().requires_grad_(True)
    model(inputs_embeds=x).logits.log_softmax(-1)[..., 0].sum().backward()
    return x.grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_packed_logits_and_input_gradients_equal_the_dense_rebuild(family, recipe, root):
    path = _artifact(family, recipe, root)
    dense, _, _ = load_compressed(path)
    packed, _, _ = load_compressed(path, runtime="packed")
    n_linears = sum(1 for m in dense.modules() if type(m).__name__ in ("Linear", "Conv1D")) - 1  # all but the head
    kernels = packed_modules(packed)
    assert len(kernels) == n_linears
    assert all(isinstance(m, Int8Linear if recipe == "gptq8-asym" else Int4Linear) for m in kernels.values())
    for name, m in kernels.items():  # the codes in memory hold exactly the rebuilt weight
        assert torch.equal(m.dequantized(), dense.get_submodule(name).weight.detach().T
                           if family == "gpt2" else dense.get_submodule(name).weight.detach())

    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        fast = packed(input_ids=ids).logits  # bf16 activations inside the kernels
        set_act_dtype(packed, torch.float32)
        exact = packed(input_ids=ids).logits
    assert rel(exact, ref) < 1e-5  # the same weights: fp32 summation order only
    assert 1e-6 < rel(fast, ref) < 3e-2  # bf16 activation rounding, no more

    # backpropagation reaches the input (a prompt) through the packed kernels, as through the dense weights
    emb = dense.get_input_embeddings()(ids).detach()
    grads = [_input_grad(m, emb) for m in (dense, packed)]
    assert rel(grads[1], grads[0]) < 1e-4
    assert not [p for m in kernels.values() for p in m.parameters()]  # nothing in a kernel linear can learn

    # long inputs take the other path: this layer's weight dequantized for one fp32 matmul, exact up to summation
    for m in kernels.values():
        m.dense_from = 1
    x = emb.clone().requires_grad_(True)
    out = packed(inputs_embeds=x).logits
    assert rel(out.detach(), ref) < 1e-5
    out.log_softmax(-1)[..., 0].sum().backward()
    assert rel(x.grad, grads[0]) < 1e-4


def test_cpu_layout_unpacks_to_the_codes():
    # whole blocks (32 rows on AVX2, 64 on AVX-512) and a shorter last block, on whatever CPU this runs
    g = torch.Generator().manual_seed(0)
    for rows, cols in [(32, 64), (64, 96), (96, 256), (48, 64), (16, 32), (112, 64), (160, 64)]:
        codes = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
        assert torch.equal(_cpu_unpack(packed, rows, cols), codes.to(torch.uint8))


def _pack_layout(codes: torch.Tensor, block: int, split: bool) -> torch.Tensor:
    """torch's CPU int4 layout as ``_cpu_unpack_t`` describes it, built from the codes (rows, cols) for any CPU."""
    rows, cols = codes.shape
    nfull, tail = divmod(rows, block)
    parts = []
    for nb in range(nfull):
        blk = codes[nb * block:(nb + 1) * block].T  # (cols, block)
        lo, hi = (blk[:, :block // 2], blk[:, block // 2:]) if split else (blk[:, 0::2], blk[:, 1::2])
        parts.append((lo | hi << 4).reshape(-1))
    if tail:
        blk = codes[nfull * block:].T
        parts.append((blk[:, 0::2] | blk[:, 1::2] << 4).reshape(-1))
    return torch.cat(parts)


@pytest.mark.parametrize("layout", [(64, True), (32, True), (32, False)], ids=["avx512", "avx2", "default"])
def test_compiled_dequantization_equals_the_torch_ops_on_every_layout(layout):
    from ctp.compress import dequant_jit
    from ctp.compress.packed import _cpu_unpack_t

    g = torch.Generator().manual_seed(0)
    for rows, cols, group in [(128, 64, 32), (96, 128, 64), (208, 64, 64), (16, 32, 32)]:
        codes = torch.randint(0, 16, (rows, cols), generator=g).to(torch.uint8)
        scale_t = torch.rand(cols // group, rows, generator=g) * 0.1  # (groups, rows), as Int4Linear holds them
        zero_t = torch.randint(0, 16, (cols // group, rows), generator=g).to(torch.uint8)
        flat = _pack_layout(codes, *layout)
        assert torch.equal(_cpu_unpack_t(flat, rows, cols, layout), codes.T)
        want = (codes.T.float() - zero_t.repeat_interleave(group, 0).float()) * scale_t.repeat_interleave(group, 0)
        out = torch.empty(cols, rows)
        dequant_jit.int4_weight_t(flat.numpy(), rows, cols, *layout, group, zero_t.numpy(), scale_t.numpy(),
                                  out.numpy())
        assert torch.equal(out, want)  # bit for bit: s * (q - z) in fp32, as the torch ops compute it
        block = layout[0]
        for r0, r1 in [(block, rows), (0, block), (rows // block * block - block, rows)]:  # tiles, the tail's too
            if 0 <= r0 < r1 <= rows:
                part = torch.empty(cols, r1 - r0)
                dequant_jit.int4_weight_t(flat.numpy(), rows, cols, *layout, group, zero_t.numpy(),
                                          scale_t.numpy(), part.numpy(), r0, r1)
                assert torch.equal(part, want[:, r0:r1])
        with pytest.raises(ValueError, match="do not fall on blocks"):
            dequant_jit.int4_weight_t(flat.numpy(), rows, cols, *layout, group, zero_t.numpy(), scale_t.numpy(),
                                      out.numpy(), 1, rows)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_long_inputs_by_tiles_and_without_numba_compute_the_same(kind, monkeypatch):
    """A long input dequantizes a tile of rows at a time (here 64-row tiles of a 208-row layer); the torch ops
    (no numba) give the same weights bit for bit; outputs and input gradients match the dense matmul's."""
    import ctp.compress.packed as packed_mod

    g = torch.Generator().manual_seed(0)
    rows, cols = 208, 128
    if kind == "int4":
        codes = torch.randint(0, 16, (rows, cols), generator=g).to(torch.uint8)
        scale, zero = torch.rand(rows, 2, generator=g) * 0.1, torch.randint(0, 16, (rows, 2), generator=g).float()
        lin = Int4Linear(codes, scale, zero, torch.arange(cols) // 64, act_dtype=torch.float32)
        w = (codes.float() - zero.repeat_interleave(64, 1)) * scale.repeat_interleave(64, 1)
    else:
        codes = torch.randint(0, 256, (rows, cols), generator=g).to(torch.uint8)
        scale, zero = torch.rand(rows, 1, generator=g) * 0.01, torch.randint(100, 156, (rows, 1), generator=g).float()
        lin = Int8Linear(codes, scale, zero, act_dtype=torch.float32)
        w = (codes.float() - 128 + (128 - zero)) * scale
    assert torch.equal(lin.dequantized(), w)
    monkeypatch.setattr(packed_mod, "TILE_BYTES", 64 * cols * 4)
    assert lin.tiles() == [(0, 64), (64, 128), (128, 192), (192, 208)]
    assert torch.equal(torch.cat([lin.weight_t(r0, r1) for r0, r1 in lin.tiles()], 1), w.T)
    lin.dense_from = 1
    x = torch.randn(5, cols, generator=g, requires_grad=True)
    y = lin(x)
    assert rel(y.detach(), x.detach() @ w.T) < 1e-6
    y.square().sum().backward()
    assert rel(x.grad, 2 * (x.detach() @ w.T) @ w) < 1e-5
    monkeypatch.setattr(packed_mod, "_JIT", None)  # as where numba cannot load
    # int4 in torch ops unpacks the whole matrix: one tile then; int8 rows still go by tiles
    assert len(lin.tiles()) == (1 if kind == "int4" else 4)
    assert torch.equal(torch.cat([lin.weight_t(r0, r1) for r0, r1 in lin.tiles()], 1), w.T)
    assert rel(lin(x.detach()), y.detach()) < 1e-6


@pytest.mark.parametrize("layout", ["this CPU's", "unknown"])
def test_partial_blocks_and_unknown_layouts_stay_exact(layout, monkeypatch):
    import ctp.compress.packed as packed_mod

    if layout == "unknown":  # a CPU whose layout ctp does not know: the check at packing keeps a copy of the codes
        monkeypatch.setattr(packed_mod, "_cpu_block_rows", lambda: (8, True))
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (48, 64), generator=g).to(torch.uint8)  # 48 rows: a partial block on any CPU
    scale, zero = torch.rand(48, 2, generator=g) * 0.1, torch.randint(0, 16, (48, 2), generator=g).float()
    lin = Int4Linear(codes, scale, zero, torch.arange(64) // 32, act_dtype=torch.float32)
    assert (lin.codes_copy is not None) == (layout == "unknown")
    w = (codes.float() - zero.repeat_interleave(32, 1)) * scale.repeat_interleave(32, 1)
    assert torch.equal(lin.dequantized(), w)
    x = torch.randn(3, 64, generator=g)
    assert rel(lin(x), x @ w.T) < 1e-5


def test_unpackable_grids_stay_dense_and_exact(root):
    model = _make_tiny("llama")
    cfg = CompressConfig(quant=QuantConfig(method="rtn", bits=8, group_size=32))  # 8-bit in groups: no kernel
    report = compress_model(model, None, cfg, device="cpu", progress=False)
    save_compressed(model, None, report, f"{root}/q8g32")
    entry = json.loads(open(f"{root}/q8g32/ctp_compression.json").read())["tensors"]["model.layers.0.mlp.up_proj"]
    assert "8-bit with groups" in packable(entry)
    packed, _, _ = load_compressed(f"{root}/q8g32", runtime="packed")
    assert not packed_modules(packed)
    ids = torch.randint(0, 49152, (1, 8))
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).logits, model(input_ids=ids).logits)


def test_packed_model_is_small_and_keeps_its_buffers_through_moves(root):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    report = compress_model(model, None, CompressConfig(quant=QuantConfig(method="rtn", bits=4, group_size=64)),
                            device="cpu", progress=False)
    save_compressed(model, None, report, f"{root}/wide")
    dense, _, _ = load_compressed(f"{root}/wide")
    packed, _, _ = load_compressed(f"{root}/wide", runtime="packed")
    lin_dense = sum(m.weight.numel() * 4 for m in dense.model.layers.modules() if isinstance(m, torch.nn.Linear))
    lin_packed = sum(m.weight_nbytes for m in packed_modules(packed).values())
    assert lin_packed < lin_dense / 6  # 4-bit codes + bf16/fp32 grids against fp32 weights
    assert weight_bytes(packed) < 0.5 * weight_bytes(dense)

    kinds = {k: b.dtype for k, b in packed.model.layers[0].mlp.up_proj.named_buffers()}
    packed.to(torch.float16)  # casts the dense parts, never the codes or grids
    assert {k: b.dtype for k, b in packed.model.layers[0].mlp.up_proj.named_buffers()} == kinds
    assert packed.model.norm.weight.dtype == torch.float16
    with pytest.raises(CTPError, match="cannot move"):
        packed.to("meta")


def test_commands_run_packed(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["-q", "compress", "--model", tiny_dir, "--out", str(out), "--bits", "4", "--group-size", "32",
                 "--quant-method", "rtn"]) == 0
    capsys.readouterr()
    ppl = {}
    for runtime in ("dense", "packed"):
        assert main(["-q", "eval", "--model", str(out), "--runtime", runtime, "--datasets", "wikitext2", "--seqlen",
                     "32", "--max-windows", "2", "--out", str(tmp_path / f"{runtime}.json")]) == 0
        res = json.loads((tmp_path / f"{runtime}.json").read_text())
        assert res["model"]["runtime"] == runtime
        ppl[runtime] = res["results"][0]["ppl"]
    assert abs(ppl["packed"] / ppl["dense"] - 1) < 0.01
    assert main(["-q", "generate", "--model", str(out), "--max-new-tokens", "3", "Hi"]) == 0  # auto: packed
    prompt = tmp_path / "p.safetensors"
    assert main(["-q", "train-prompt", "--model", str(out), "--runtime", "packed", "--tokens", "4", "--steps", "2",
                 "--seqlen", "32", "--batch-size", "2", "--eval-every", "2", "--eval-windows", "2",
                 "--out", str(prompt)]) == 0
    _, _, info = load_model(str(out), runtime="packed")
    assert info.runtime == "packed"
    assert main(["-q", "eval", "--model", str(out), "--runtime", "packed", "--prompt", str(prompt), "--datasets",
                 "wikitext2", "--seqlen", "32", "--max-windows", "2"]) == 0


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # untied head; tied and scaled embeddings
def test_int8_embeddings_compute_what_their_dequantized_matrices_compute(family, root, tmp_path):
    from ctp.compress.packed import Int8Embedding
    from ctp.lm import token_nll
    from ctp.models.fingerprint import embedding_fingerprint

    path = _artifact(family, "rtn4g32", root)
    packed, _, _ = load_compressed(path, runtime="packed", act_dtype=torch.float32)
    small, _, _ = load_compressed(path, runtime="packed", act_dtype=torch.float32, embeddings="int8")
    emb, head = small.get_input_embeddings(), small.get_output_embeddings()
    assert isinstance(emb, Int8Embedding) and isinstance(head, Int8Linear) and emb.weight_int8.dtype == torch.int8
    tied = bool(packed.config.tie_word_embeddings)
    assert (emb.weight_int8.data_ptr() == head.weight_int8.data_ptr()) == tied  # one copy of tied codes
    assert embedding_fingerprint(small) == embedding_fingerprint(packed)  # prompts of the dense model still fit
    assert emb.weight.shape == packed.get_input_embeddings().weight.shape and emb.weight.dtype == torch.float32
    assert weight_bytes(small) < weight_bytes(packed)
    # the reference: the same model with the embedding and head replaced by what the int8 codes stand for
    ref, _, _ = load_compressed(path, runtime="packed", act_dtype=torch.float32)
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(emb.dequantized())
        ref.get_output_embeddings().weight.copy_(head.dequantized())
    w = packed.get_input_embeddings().weight
    assert 0 < rel(emb.dequantized(), w) < 1e-2  # rounding to int8 changed the matrix, a little
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(4))
    prompt = torch.nn.Parameter(torch.randn(3, w.shape[1]) * 0.1)
    for tokens in (ids[:, :5], ids):  # the int8 kernel (few tokens) and the dequantized matmul
        with torch.no_grad():
            assert rel(small(tokens).logits, ref(tokens).logits) < 1e-5
    a, b = token_nll(small, ids, prompt), token_nll(ref, ids, prompt)  # prompt training reaches through the head
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ga, = torch.autograd.grad(a.sum(), prompt)
    gb, = torch.autograd.grad(b.sum(), prompt)
    assert rel(ga, gb) < 1e-4
    small.to(torch.bfloat16)  # codes stay int8, lookups follow the model's dtype
    assert emb.weight_int8.dtype == torch.int8 and emb(ids).dtype == torch.bfloat16


def test_int8_embeddings_from_the_cli(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["-q", "compress", "--model", tiny_dir, "--out", str(out), "--bits", "4", "--group-size", "32",
                 "--quant-method", "rtn"]) == 0
    res = {}
    for extra in ([], ["--packed-embeddings", "int8"]):
        f = tmp_path / f"{len(extra)}.json"
        assert main(["-q", "eval", "--model", str(out), "--runtime", "packed", *extra, "--datasets", "wikitext2",
                     "--seqlen", "32", "--max-windows", "2", "--out", str(f)]) == 0
        res[len(extra)] = json.loads(f.read_text())["results"][0]["ppl"]
    assert res[2] != res[0] and abs(res[2] / res[0] - 1) < 0.01
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--runtime", "dense", "--packed-embeddings", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--packed-embeddings int8 needs the packed runtime" in err and "\n" not in err


def test_choose_runtime():
    from ctp.models.names import choose_runtime

    assert choose_runtime("auto", "decode") == "packed" and choose_runtime("auto", "score") == "dense"
    assert choose_runtime("packed", "score") == "packed"
    with pytest.raises(ValueError):
        choose_runtime("fast", "score")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("recipe", ["rtn4g32", "sparsegpt50+gptq4", "gptq3g32-act", "gptq8-asym"])
def test_packed_on_cuda_equals_the_dense_rebuild(recipe, root):
    """The CUDA kernels (int4 tinygemm, int8) hold the same codes and give the dense rebuild's logits within bf16
    rounding; long inputs and backpropagation take the exact dequantized path, as on CPU."""
    path = _artifact("llama", recipe, root)
    dense, _, _ = load_compressed(path, device="cuda")
    dense.to("cuda")
    packed, _, _ = load_compressed(path, runtime="packed", device="cuda")
    packed.to("cuda")
    kernels = packed_modules(packed)
    assert kernels and all(b.is_cuda for m in kernels.values() for b in m.buffers())
    for name, m in kernels.items():
        assert torch.equal(m.dequantized(), dense.get_submodule(name).weight.detach())
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        fast = packed(input_ids=ids).logits
    assert rel(fast, ref) < 3e-2
    emb = dense.get_input_embeddings()(ids).detach()
    grads = [_input_grad(m, emb) for m in (dense, packed)]
    assert rel(grads[1], grads[0]) < 1e-2  # the forward pass ran the bf16 kernels
    for m in kernels.values():  # the dequantized fp32 path: the same weights, summation order only
        m.dense_from = 1
    with torch.no_grad():
        assert rel(packed(input_ids=ids).logits, ref) < 1e-4
    with pytest.raises(CTPError, match="cannot move"):
        packed.to("cpu")
