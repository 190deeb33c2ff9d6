"""Compression larger than memory: blocks read from safetensors shards when compressed, encoded payloads spilled to
disk, the artifact streamed; the result is the whole-model run's, bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from ctp.compress.artifact import load_compressed, save_compressed
from ctp.compress.config import CompressConfig, PruneConfig, QuantConfig
from ctp.compress.driver import compress_model
from ctp.compress.checkpoint import PARKED_DIR
from ctp.compress.kernels import same_bits
from ctp.compress.spill import EncodedBlocks, ParkedTensors
from ctp.errors import CTPError
from ctp.models.adapter import decoder_layers, linear_layers
from ctp.models.fingerprint import embedding_fingerprint
from ctp.models.load import load_by_blocks

RECIPES = {
    "sparsegpt50+gptq4g32": CompressConfig(prune=PruneConfig(sparsity=0.5), quant=QuantConfig(bits=4, group_size=32)),
    "sparsegpt50": CompressConfig(prune=PruneConfig(sparsity=0.5)),
    "gptq3-act": CompressConfig(quant=QuantConfig(bits=3, act_order=True)),
    "rtn4g32": CompressConfig(quant=QuantConfig(method="rtn", bits=4, group_size=32)),
}
IDS = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer) -> str:
    """A tiny Llama saved in several safetensors shards with an index, and the real tokenizer."""
    d = tmp_path_factory.mktemp("sharded")
    make_tiny("llama").save_pretrained(d, max_shard_size="100KB")
    tokenizer.save_pretrained(d)
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 2
    return str(d)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_by_blocks_equals_the_whole_model_run(recipe, sharded, tmp_path, monkeypatch):
    import ctp.compress.driver as D

    cfg = RECIPES[recipe]
    whole = make_tiny("llama")
    report = compress_model(whole, None, cfg, device="cpu", calib_ids=IDS, progress=False, chunk=2)
    save_compressed(whole, None, report, tmp_path / "whole")

    from ctp.compress.registry import needs_calibration

    model, _, info, source = load_by_blocks(sharded, embeddings=False)  # as ctp compress loads it
    assert source is not None and info.model_type == "llama"
    assert info.embedding_hash == embedding_fingerprint(whole)  # read from disk where the embedding stays there
    assert model.get_input_embeddings().weight.is_meta  # a calibration reads the rows of its tokens alone
    real_rows = source.rows
    asked = []
    source.rows = lambda name, index, dtype: asked.append(len(index)) or real_rows(name, index, dtype)
    layers = decoder_layers(model)
    assert all(p.is_meta for layer in layers for p in layer.parameters())  # nothing of a block is read yet
    seen = []
    real_load = source.load_module

    def load_module(module, prefix, device, dtype, **kw):  # at most one block holds its linears at any time
        seen.append(sum(not m.weight.is_meta for layer in layers for m in linear_layers(layer).values()))
        real_load(module, prefix, device, dtype, **kw)

    source.load_module = load_module
    held, reads = [], []  # linears of a Hessian pass that hold a weight when it starts; weights read
    real_collect, real_read = D._collect_hessians, D._OnDisk._read
    monkeypatch.setattr(D, "_collect_hessians", lambda layer, names, *a: held.extend(
        n for n in names if not linear_layers(layer)[n].weight.is_meta) or real_collect(layer, names, *a))
    monkeypatch.setattr(D._OnDisk, "_read", lambda self, n: reads.append(n) or real_read(self, n))
    parked, unparked = [], []  # finished linears written to disk while their block is at work; read back
    real_put, real_get = ParkedTensors.put, ParkedTensors.get
    monkeypatch.setattr(ParkedTensors, "put", lambda self, k, t: parked.append(k) or real_put(self, k, t))
    monkeypatch.setattr(ParkedTensors, "get", lambda self, k: unparked.append(k) or real_get(self, k))
    spill = EncodedBlocks(tmp_path / "spill", torch.float32, source)
    report2 = compress_model(model, None, cfg, device="cpu", calib_ids=IDS, progress=False, chunk=2, source=source,
                             spill=spill)
    # a calibrated recipe reads a block at a time; one from the weights alone a linear at a time, and then no
    # linear is in memory when the next is read
    assert seen == [0] * (len(layers) if needs_calibration(cfg) else sum(len(linear_layers(x)) for x in layers))
    assert all(m.weight.is_meta for layer in layers for m in linear_layers(layer).values())  # all released
    assert asked == ([len(IDS.unique())] if needs_calibration(cfg) else [])  # each token's row, once
    # a linear not compressed yet waits in the checkpoint: read for each forward (two chunks of windows here) and
    # once more to be compressed
    assert held == []
    n_linears = sum(len(linear_layers(x)) for x in layers)
    assert len(reads) > n_linears * 2 if needs_calibration(cfg) else reads == []
    assert model.get_input_embeddings().weight.is_meta  # and the embedding is left on disk again
    # every finished linear of a calibrated block waits on disk (codes or mask and kept values), read back for the
    # block's forwards and once more at its end; nothing is left there
    if needs_calibration(cfg):
        big = {"codes"} if cfg.prune is None else {"mask", "kept"} if cfg.quant is None else {"mask", "codes"}
        assert sorted(parked) == sorted([f"{n}.{a}" for n in linear_layers(layers[0]) for a in big] * len(layers))
        assert set(unparked) == set(parked) and len(unparked) > 2 * len(parked)
    else:
        assert parked == []
    assert not (tmp_path / PARKED_DIR).exists()
    save_compressed(model, None, report2, tmp_path / "blocks", encoded=spill)

    a, _, ca = load_compressed(tmp_path / "whole")
    b, _, cb = load_compressed(tmp_path / "blocks")
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ca["storage"]["compressed_linear_bytes"] == cb["storage"]["compressed_linear_bytes"]


def test_missing_and_truncated_shards_are_one_line_errors(sharded, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(sharded, d)
    import json

    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    outside = {f for n, f in weight_map.items() if not n.startswith("model.layers.")}
    shards = sorted(d.glob("model-*.safetensors"))
    inner = next(p for p in reversed(shards) if p.name not in outside)  # holds block tensors only
    data = inner.read_bytes()
    inner.write_bytes(data[: len(data) // 2])  # cut off mid-tensor
    model, _, _, source = load_by_blocks(str(d))  # loads: the blocks are read later
    with pytest.raises(CTPError, match="truncated or damaged|cannot read") as e:
        compress_model(model, None, RECIPES["rtn4g32"], device="cpu", progress=False, source=source,
                       spill=EncodedBlocks(tmp_path / "spill", torch.float32, source))
    assert "\n" not in str(e.value)
    shards[0].unlink()  # before any work: the same message as any command loading the model
    with pytest.raises(CTPError, match=r"cannot load the model .*model-00001-of-.*missing or damaged") as e:
        load_by_blocks(str(d))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("offload", [False, True], ids=["activations-in-memory", "activations-on-disk"])
def test_cli_compress_of_a_sharded_model_matches_the_api(offload, sharded, tmp_path, monkeypatch):
    import ctp.compress.driver as driver
    from ctp.cli import main

    stores = []
    real = driver._run_block
    monkeypatch.setattr(driver, "_run_block", lambda layer, call, inps, compute, out=None: stores.append(
        type(out).__name__) or real(layer, call, inps, compute, out))
    out = tmp_path / "cli"
    assert main(["-q", "compress", "--model", sharded, "--bits", "4", "--group-size", "32", "--nsamples", "4",
                 "--seqlen", "32", "--calib-batch", "2", "--save-dtype", "float32", "--out", str(out),
                 *(["--offload-activations"] if offload else [])]) == 0
    assert set(stores) == {"SpilledActivations" if offload else "list"}
    assert not (tmp_path / "cli.partial").exists()
    model, _, comp = load_compressed(out)
    assert comp["storage"]["dense_dtype"] == "float32"
    whole = make_tiny("llama")
    from ctp.models.load import load_tokenizer

    report = compress_model(whole, load_tokenizer(sharded), CompressConfig.from_dict(comp["config"]), device="cpu",
                            progress=False, chunk=2)
    ref = {k: v for k, v in whole.state_dict().items()}
    got = model.state_dict()
    assert report.label == comp["label"] and all(torch.equal(ref[k], got[k]) for k in got)


def test_offloading_a_recipe_without_calibration_says_there_is_nothing_to_offload(sharded, tmp_path, caplog):
    from ctp.cli import main

    out = tmp_path / "rtn"
    assert main(["-q", "compress", "--model", sharded, "--bits", "4", "--group-size", "32", "--quant-method", "rtn",
                 "--offload-activations", "--out", str(out)]) == 0
    assert "runs no calibration: --offload-activations has nothing to keep on disk" in caplog.text
    assert load_compressed(out)[2]["label"] and not (tmp_path / "rtn.partial").exists()


def test_a_calibration_larger_than_memory_is_refused_before_any_work(monkeypatch):
    import ctp.compress.driver as driver
    import ctp.devices

    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(ctp.devices, "available_memory", lambda device: 1 << 20)  # 1 MiB left
    monkeypatch.setattr(driver, "_capture_inputs", lambda *a, **k: pytest.fail("the calibration pass ran"))
    with pytest.raises(CTPError, match=r"calibration needs about .* GiB .* free.*--nsamples") as e:
        compress_model(model, None, RECIPES["sparsegpt50"], device="cpu", calib_ids=torch.zeros(64, 512).long(),
                       progress=False)
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # memory for it: the same call runs
    monkeypatch.undo()
    compress_model(model, None, RECIPES["rtn4g32"], device="cpu", progress=False)


def test_the_checkpoint_beside_the_output_never_lands_on_the_input(sharded, tmp_path):
    """``--out X`` checkpoints into ``X.partial``: a model directory of that name is refused before any work."""
    import shutil

    from ctp.cli import main

    model = tmp_path / "m.partial"
    shutil.copytree(sharded, model)
    before = sorted(p.name for p in model.iterdir())
    assert main(["-q", "compress", "--model", str(model), "--bits", "4", "--group-size", "32", "--nsamples", "2",
                 "--seqlen", "32", "--out", str(tmp_path / "m")]) == 2
    assert sorted(p.name for p in model.iterdir()) == before and not (tmp_path / "m").exists()


def test_one_pass_over_the_checkpoint_gives_the_storage_dtype_and_the_cache_key(sharded, tmp_path, monkeypatch):
    """Before compressing, a by-blocks run reads each tensor once (not once for the dtype and again for the key),
    and both equal the whole-model run's."""
    from collections import Counter

    from ctp.cli import main
    from ctp.compress.artifact import default_dense_dtype
    from ctp.compress.checkpoint import checkpoint_key
    from ctp.models.shards import BlockSource

    from ctp.models.load import load_model

    model, _, _, source = load_by_blocks(sharded)
    whole = load_model(sharded)[0]
    args = ({"cfg": 1}, IDS, 2, torch.device("cpu"))
    assert checkpoint_key(model, *args, source) == checkpoint_key(whole, *args)
    assert default_dense_dtype(model, source) == default_dense_dtype(whole) == torch.float16
    with torch.no_grad():  # a value float16 cannot hold: bfloat16, and a new key (the scan saw the change)
        model.get_input_embeddings().weight[0, 0] = 1e6
    assert default_dense_dtype(model, source) == torch.bfloat16
    assert checkpoint_key(model, *args, source) != checkpoint_key(whole, *args)

    reads = Counter()
    real_chunks = BlockSource.chunks  # every pass over a tensor, whole (read) or streamed (the scan)
    monkeypatch.setattr(BlockSource, "chunks", lambda self, name, *a, **k: reads.update([name]) or real_chunks(
        self, name, *a, **k))
    assert main(["-q", "compress", "--model", sharded, "--bits", "4", "--group-size", "32", "--nsamples", "4",
                 "--seqlen", "32", "--calib-batch", "2", "--out", str(tmp_path / "out")]) == 0
    linear = "model.layers.1.mlp.down_proj.weight"
    # the scan; then, waiting in the checkpoint, once for each of the two forwards (chunks of windows) of its
    # Hessian pass, the only pass that reaches it before it is compressed, and once to be compressed
    assert reads[linear] == 4


@pytest.mark.parametrize("recipe,embeddings", [("rtn4g32", False), ("gptq3-act", False), ("gptq3-act", True)])
def test_a_tied_embedding_left_on_disk_is_written_once_and_identical(recipe, embeddings, tmp_path, tokenizer):
    """Gemma 3 ties its LM head to the embedding (and scales it in the embedding module): a run that leaves both
    on disk (a calibrated one reads its tokens' rows) and one that loads the embedding write the artifact of the
    whole-model run, the matrix stored once."""
    cfg = RECIPES[recipe]
    src = tmp_path / "g"
    tiny = make_tiny("gemma3_text")
    assert tiny.config.tie_word_embeddings
    tiny.save_pretrained(src)
    tokenizer.save_pretrained(src)
    whole = make_tiny("gemma3_text")
    save_compressed(whole, None, compress_model(whole, None, cfg, device="cpu", calib_ids=IDS, progress=False,
                                                chunk=2), tmp_path / "whole")
    from ctp.compress.artifact import default_dense_dtype
    from ctp.compress.checkpoint import checkpoint_key
    from ctp.models.load import load_model

    model, _, info, source = load_by_blocks(str(src), embeddings=embeddings)
    assert model.get_input_embeddings().weight.is_meta != embeddings
    assert info.embedding_hash == embedding_fingerprint(whole)
    # the checkpoint holds the tied head only as the embedding: the scan reads it under that name, as loaded whole
    loaded = load_model(str(src))[0]
    args = ({"cfg": 1}, IDS, 2, torch.device("cpu"))
    assert checkpoint_key(model, *args, source) == checkpoint_key(loaded, *args)
    assert default_dense_dtype(model, source) == default_dense_dtype(loaded)
    spill = EncodedBlocks(tmp_path / "spill", torch.float32, source)
    report = compress_model(model, None, cfg, device="cpu", calib_ids=IDS, progress=False, chunk=2, source=source,
                            spill=spill, checkpoint_dir=tmp_path / "ckpt")
    save_compressed(model, None, report, tmp_path / "blocks", encoded=spill)
    a, _, ca = load_compressed(tmp_path / "whole")
    b, _, cb = load_compressed(tmp_path / "blocks")
    # the head stays an alias of the embedding: the files are the same size, the matrix stored once in both
    assert ca["storage"]["file_bytes"]["dense.safetensors"] == cb["storage"]["file_bytes"]["dense.safetensors"]
    assert ca["storage"]["compressed_linear_bytes"] == cb["storage"]["compressed_linear_bytes"]
    assert b.get_output_embeddings().weight.data_ptr() == b.get_input_embeddings().weight.data_ptr()
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    if not embeddings:  # a calibration with the embedding on disk and no checkpoint to read it from: one line
        m2 = load_by_blocks(str(src), embeddings=False)[0]
        with pytest.raises(CTPError, match="left on disk.*source=") as e:
            compress_model(m2, None, RECIPES["gptq3-act"], device="cpu", calib_ids=IDS, progress=False)
        assert "\n" not in str(e.value)


def test_block_source_reads_every_shape_and_dtype_in_chunks(tmp_path):
    """Rows come a chunk at a time straight into the result: empty, 0-d, integer and multi-chunk tensors."""
    from safetensors.torch import save_file

    from ctp.models.shards import BlockSource

    ts = {"a": torch.randn(7, 5).half(), "empty": torch.zeros(3, 0), "scalar": torch.tensor(2.5),
          "ints": torch.arange(6, dtype=torch.int64).view(2, 3), "big": torch.randn(3000, 2000).bfloat16()}
    save_file(ts, str(tmp_path / "model.safetensors"))
    source = BlockSource(tmp_path)
    for k, v in ts.items():
        got = source.read(k, torch.float32)
        assert got.shape == v.shape and torch.equal(got, v.float() if v.is_floating_point() else v), k
    assert len(list(source.chunks("big", torch.float32))) > 1  # 6M values: more than one chunk
    # chosen rows, in any order and repeated, across chunk boundaries: the rows of the whole tensor
    index = torch.tensor([2999, 0, 1500, 0, 2097, 2098, 7])
    assert torch.equal(source.rows("big", index, torch.float32), ts["big"].float()[index])
    assert torch.equal(source.rows("a", torch.tensor([6, 1]), torch.float16), ts["a"][[6, 1]])
    with pytest.raises(CTPError, match="token id 3000 is outside big's 3000 rows"):
        source.rows("big", torch.tensor([1, 3000]), torch.float32)


def test_parked_tensors_come_back_bit_for_bit(tmp_path):
    """A parked tensor reads back with its bits, shape, dtype and device, as often as asked; discard leaves nothing."""
    park = ParkedTensors(tmp_path / "parked")
    values = torch.tensor([[-0.0, 0.0, float("nan"), float("inf")], [1e-45, -3.5, 2.0, 1 / 3]])
    tensors = {"w.kept": values, "w.mask": values.isfinite(), "w.codes": torch.arange(12, dtype=torch.uint8),
               "w.t": values.t(), "empty": torch.zeros(0, 3)}
    for k, t in tensors.items():
        park.put(k, t)
    del values
    for _ in range(2):
        for k, t in tensors.items():
            got = park.get(k)
            assert got.shape == t.shape and got.dtype == t.dtype and got.device == t.device, k
            assert got.is_contiguous() and same_bits(got, t.contiguous()), k
    park.discard()
    assert not (tmp_path / "parked").exists()


def test_parking_on_a_full_disk_is_a_one_line_error(tmp_path, monkeypatch):
    import builtins

    park = ParkedTensors(tmp_path / "parked")
    real_open = builtins.open

    def full(path, mode="r", *a, **k):
        if "w" in mode and str(path).endswith(".bin"):
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(CTPError) as e:
        park.put("self_attn.q_proj.codes", torch.zeros(4, 4, dtype=torch.uint8))
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "free disk space" in msg
