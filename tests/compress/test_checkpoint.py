"""Resumable compression: a run killed after block k and started again restores blocks < k, compresses
the rest, and ends with the same weights, report and artifact files as an uninterrupted run."""

from __future__ import annotations

import copy
import json
import functools
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS

import ctp.compress.driver as D
from ctp.compress.artifact import COMPRESSED_FILE, DENSE_FILE, save_compressed
from ctp.compress.checkpoint import PARKED_DIR, STATE_FILE, discard_checkpoint
from ctp.compress.config import CompressConfig, PruneConfig, QuantConfig
from ctp.errors import CTPError
from ctp.io import load_tensors
from ctp.models.adapter import decoder_layers

VOCAB = 512
JOINT = CompressConfig(prune=PruneConfig(sparsity=0.5), quant=QuantConfig(bits=4, group_size=32))


@functools.lru_cache(maxsize=None)
def _tiny(family: str):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[family])
    spec["n_layer" if family == "gpt2" else "num_hidden_layers"] = 3
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIG_MAPPING[family](vocab_size=VOCAB, **spec),
                                            dtype=torch.float32).eval()


def tiny(family: str = "llama"):
    return copy.deepcopy(_tiny(family))


IDS = torch.randint(0, VOCAB, (7, 24), generator=torch.Generator().manual_seed(0))


def compress(model, ckpt=None, cfg=JOINT, ids=IDS, **kw):
    return D.compress_model(model, None, cfg, device="cpu", calib_ids=ids, progress=False, chunk=3,
                            checkpoint_dir=ckpt, **kw)


def _no_seconds(obj):
    if isinstance(obj, dict):
        return {k: _no_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_no_seconds(v) for v in obj]
    return obj


_REAL_COMPRESS_GROUP = D._compress_group


class Killed(BaseException):
    """Stands for SIGKILL / Ctrl-C in the middle of a block."""


def _count_blocks(monkeypatch, model, kill_at: int | None = None) -> list[int]:
    """Record which block each Hessian pass runs on; raise Killed when block ``kill_at`` starts."""
    index = {id(layer): i for i, layer in enumerate(decoder_layers(model))}
    seen: list[int] = []

    def spy(layer, *a, **k):
        i = index[id(layer)]
        if i == kill_at:
            raise Killed
        seen.append(i)
        return _REAL_COMPRESS_GROUP(layer, *a, **k)

    monkeypatch.setattr(D, "_compress_group", spy)
    return seen


@pytest.mark.parametrize("family, kill_at", [("llama", 2), ("llama", 1), ("gpt2", 2)])
def test_killed_run_resumes_to_the_same_result(family, kill_at, tmp_path, monkeypatch):
    ref_model = tiny(family)
    ref = compress(ref_model)
    save_compressed(ref_model, None, ref, out_dir=tmp_path / "ref")

    ckpt = tmp_path / "out.partial"
    model = tiny(family)
    _count_blocks(monkeypatch, model, kill_at=kill_at)
    with pytest.raises(Killed):
        compress(model, ckpt)
    assert (ckpt / STATE_FILE).is_file()
    assert sorted(p.name for p in ckpt.glob("block-*")) == [f"block-{i:04d}.safetensors" for i in range(kill_at)]
    assert [p.name for p in ckpt.glob("inputs-*")] == [f"inputs-{kill_at:04d}.safetensors"]  # only the newest

    model = tiny(family)  # a fresh process: the original weights again
    seen = _count_blocks(monkeypatch, model)
    report = compress(model, ckpt)
    assert set(seen) == set(range(kill_at, 3))  # blocks before the kill were restored, not recompressed

    assert report.layers[0]["index"] == 0 and len(report.layers) == 3
    assert _no_seconds(report.to_dict()) == _no_seconds(ref.to_dict())
    assert set(report.compressed) == set(ref.compressed)
    for name, cw in ref.compressed.items():
        got = report.compressed[name]
        for attr in ("weight", "mask", "codes", "scale", "zero", "g_idx"):
            a, b = getattr(cw, attr), getattr(got, attr)
            assert (a is None and b is None) or torch.equal(a, b), (name, attr)
        assert (got.bits, got.sym, got.stats) == (cw.bits, cw.sym, cw.stats)
    for (n, p), (_, q) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(p, q), n
    save_compressed(model, None, report, out_dir=tmp_path / "resumed")
    for f in (COMPRESSED_FILE, DENSE_FILE):  # the artifact files hold identical tensors and metadata
        (a, meta_a), (b, meta_b) = load_tensors(tmp_path / "resumed" / f), load_tensors(tmp_path / "ref" / f)
        assert meta_a == meta_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a finished checkpoint restores everything: a rerun (killed while saving, say) compresses nothing
    seen = _count_blocks(monkeypatch, model := tiny(family))
    again = compress(model, ckpt)
    assert seen == [] and _no_seconds(again.to_dict()) == _no_seconds(ref.to_dict())
    discard_checkpoint(ckpt)
    assert not ckpt.exists()


@pytest.mark.parametrize("cfg", [JOINT, CompressConfig.from_dict({**JOINT.to_dict(), "activations": "bfloat16"})],
                         ids=["fp32", "bf16"])
def test_activations_on_disk_give_the_same_result_and_resume(cfg, tmp_path, monkeypatch):
    """With ``activations_dir`` each block's inputs and outputs are files, one chunk read at a time; the weights and
    report equal the in-memory run's, a killed run resumes from its checkpoint into files, and nothing is left."""
    from ctp.compress.spill import SpilledActivations

    ref_model = tiny()
    ref = compress(ref_model, cfg=cfg)
    ckpt = tmp_path / "out.partial"
    acts = ckpt / "activations"
    blocks_seen: list[tuple] = []
    real_run = D._run_block

    def spy_run(layer, call, inps, compute, out=None):
        assert isinstance(inps, SpilledActivations) and isinstance(out, SpilledActivations)
        assert len(inps) == 3 and all(h.dtype == getattr(torch, cfg.activations) for h in inps)  # 7 windows in 3s
        blocks_seen.append((inps.root.name, out.root.name, sorted(p.name for p in acts.iterdir())))
        return real_run(layer, call, inps, compute, out)

    monkeypatch.setattr(D, "_run_block", spy_run)
    model = tiny()
    _count_blocks(monkeypatch, model, kill_at=2)
    with pytest.raises(Killed):
        compress(model, ckpt, cfg=cfg, activations_dir=acts)
    # block i reads block-i's files and writes block-(i+1)'s; the inputs it read are gone once it is done
    assert blocks_seen == [("block-0000", "block-0001", ["block-0000", "block-0001"]),
                           ("block-0001", "block-0002", ["block-0001", "block-0002"])]

    model = tiny()
    seen = _count_blocks(monkeypatch, model)
    report = compress(model, ckpt, cfg=cfg, activations_dir=acts)
    assert seen and set(seen) == {2}
    assert _no_seconds(report.to_dict()) == _no_seconds(ref.to_dict())
    for (n, p), (_, q) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(p, q), n
    assert not any(acts.rglob("*.bin"))  # the run removed its activations
    discard_checkpoint(ckpt)
    assert not ckpt.exists()


def test_activations_on_a_full_disk_are_refused_before_any_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CTPError, match="calibration activations kept on disk needs about"):
        compress(tiny(), tmp_path / "ckpt", activations_dir=tmp_path / "ckpt" / "activations")


def test_other_settings_do_not_match_the_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "c"
    model = tiny()
    _count_blocks(monkeypatch, model, kill_at=2)
    with pytest.raises(Killed):
        compress(model, ckpt)
    keys = {json.loads((ckpt / STATE_FILE).read_text())["key"]}
    for other in (dict(cfg=CompressConfig(prune=PruneConfig(sparsity=0.6))),  # another config
                  dict(resume=False)):  # or asked not to resume
        model = tiny()
        seen = _count_blocks(monkeypatch, model, kill_at=1)
        with pytest.raises(Killed):
            compress(model, ckpt, **other)
        assert set(seen) == {0}  # started over from block 0
        assert [p.name for p in ckpt.glob("block-*")] == ["block-0000.safetensors"]  # the old block 1 is gone
        keys.add(json.loads((ckpt / STATE_FILE).read_text())["key"])
    assert len(keys) == 2  # resume=False made the same key as the first run
    # other weights (a model fine-tuned since, say) do not match either
    model = tiny()
    model.model.layers[0].mlp.up_proj.weight.data[0, 0] += 1
    seen = _count_blocks(monkeypatch, model)
    compress(model, ckpt)
    assert set(seen) == {0, 1, 2}
    # nor does other calibration data (that finished checkpoint is not reused)
    seen = _count_blocks(monkeypatch, model := tiny())
    compress(model, ckpt, ids=IDS[:, :-1])
    assert set(seen) == {0, 1, 2}
    seen = _count_blocks(monkeypatch, model := tiny())
    compress(model, ckpt, ids=IDS[:, :-1])
    assert seen == []  # ... while the same data again is


def test_damaged_checkpoint_is_a_one_line_error(tmp_path, monkeypatch):
    ckpt = tmp_path / "c"
    model = tiny()
    _count_blocks(monkeypatch, model, kill_at=2)
    with pytest.raises(Killed):
        compress(model, ckpt)
    monkeypatch.undo()
    f = ckpt / "block-0001.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CTPError, match="checksum.*delete") as e:
        compress(tiny(), ckpt)
    assert "\n" not in str(e.value)
    (ckpt / STATE_FILE).write_text("{not json")
    with pytest.raises(CTPError, match="not valid JSON"):
        compress(tiny(), ckpt)


def test_discard_only_removes_checkpoint_files(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    compress(tiny(), tmp_path)
    (tmp_path / PARKED_DIR).mkdir()  # as a run killed mid-block leaves it
    (tmp_path / PARKED_DIR / "mlp.up_proj.codes.bin").write_bytes(b"\0" * 16)
    assert (tmp_path / STATE_FILE).is_file()
    discard_checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_cli_compress_killed_then_rerun_resumes_and_cleans_up(tiny_dir, tmp_path, monkeypatch, capsys):
    from ctp.cli import main
    from ctp.compress.artifact import load_compressed

    argv = ["-q", "compress", "--model", tiny_dir, "--sparsity", "0.5", "--bits", "4", "--group-size", "32",
            "--nsamples", "4", "--seqlen", "32", "--calib-batch", "2"]
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    assert not (tmp_path / "ref.partial").exists()  # removed once the artifact is written

    out, partial = tmp_path / "m", tmp_path / "m.partial"
    calls = {"n": 0}

    def dying(layer, *a, **k):  # a kill while block 1 is being compressed
        calls["n"] += 1
        if calls["n"] > 4:  # 4 true-sequential groups per llama block
            raise KeyboardInterrupt
        return _REAL_COMPRESS_GROUP(layer, *a, **k)

    monkeypatch.setattr(D, "_compress_group", dying)
    assert main([*argv, "--out", str(out)]) == 130
    assert not out.exists() and (partial / "block-0000.safetensors").is_file()
    assert not (partial / PARKED_DIR).exists()  # the interrupted block's finished linears left no files

    calls["n"] = -10**9  # no more kills; count what the rerun compresses
    assert main([*argv, "--out", str(out)]) == 0
    assert calls["n"] == -10**9 + 4  # only block 1 was compressed again
    assert not partial.exists()
    a, _, _ = load_compressed(tmp_path / "ref")
    b, _, _ = load_compressed(out)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_a_killed_weights_only_compression_resumes_from_its_encoded_blocks(tiny_dir, tmp_path, monkeypatch):
    """RTN on a checkpoint read by blocks encodes each linear as it goes; a rerun after a kill takes the finished
    block's encoded file back (no weights are kept twice in the checkpoint) and ends bit-identical."""
    from ctp.cli import main
    from ctp.compress.artifact import load_compressed
    from ctp.compress.checkpoint import ENCODED_DIR

    argv = ["-q", "compress", "--model", tiny_dir, "--quant-method", "rtn", "--bits", "4", "--group-size", "32"]
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    out, partial = tmp_path / "m", tmp_path / "m.partial"
    real, calls = D.compress_weight, {"n": 0}

    def dying(*a, **k):  # a kill at the first linear of block 1 (7 linears per llama block)
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(D, "compress_weight", dying)
    assert main([*argv, "--out", str(out)]) == 130
    block0, _ = load_tensors(partial / "block-0000.safetensors", kind="ctp-compress-block")
    assert block0 == {}  # the checkpoint names the encoded file, it holds no weights
    assert (partial / ENCODED_DIR / "block-00000.safetensors").is_file()
    calls["n"] = -10**9
    assert main([*argv, "--out", str(out)]) == 0
    assert calls["n"] == -10**9 + 7  # only block 1 was compressed again
    a, _, _ = load_compressed(tmp_path / "ref")
    b, _, _ = load_compressed(out)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_experiment_runner_resumes_a_killed_compression(tiny_dir, tmp_path, monkeypatch):
    from ctp.experiments.config import ExperimentConfig
    from ctp.experiments.runner import Runner

    cfg = ExperimentConfig.from_dict({"name": "t", "model": tiny_dir, "device": "cpu",
                                      "calibration": {"nsamples": 4, "seqlen": 32, "dataset": "c4"},
                                      "compressions": {"sp50": {"prune": {"sparsity": 0.5}}}})
    seen: list[int] = []

    def dying(layer, *a, **k):
        seen.append(layer)
        if len(seen) == 2:  # the one group of block 1
            raise KeyboardInterrupt
        return _REAL_COMPRESS_GROUP(layer, *a, **k)

    monkeypatch.setattr(D, "_compress_group", dying)
    runner = Runner(cfg, tmp_path / "run", progress=False)
    with pytest.raises(KeyboardInterrupt):
        runner.ensure_model("sp50")
    path = Path(runner.model_path("sp50"))
    assert not path.exists() and (Path(f"{path}.partial") / "block-0000.safetensors").is_file()
    seen.clear()
    assert runner.ensure_model("sp50") == str(path)
    assert len(seen) == 1  # block 0 came from the checkpoint
    assert (path / "ctp_compression.json").is_file() and not Path(f"{path}.partial").exists()
