"""The layer-by-layer driver on tiny models of every family: exact sparsity, working models,
baselines beaten, true-sequential modes, the block-input replay, and the calibration path."""

from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch
from conftest import TINY_CONFIGS
from conftest import make_tiny as _make_tiny

from ctp.compress.config import CompressConfig, PruneConfig, QuantConfig
from ctp.compress.driver import _BlockCall, _capture_inputs, compress_model
from ctp.compress.kernels import n_pruned
from ctp.errors import CTPError
from ctp.models.adapter import decoder_layers, get_arch, linear_layers, weight_matrix

FAMILIES = list(TINY_CONFIGS)
SPARSE50 = CompressConfig(prune=PruneConfig(sparsity=0.5))
GPTQ4 = CompressConfig(quant=QuantConfig(bits=4))


@functools.lru_cache(maxsize=None)
def _cached_tiny(family: str):
    return _make_tiny(family)


def make_tiny(family: str):
    """A fresh copy of the tiny model of ``family`` (built once per session: random init is slow)."""
    return copy.deepcopy(_cached_tiny(family))


def calib(n: int = 8, seqlen: int = 40, seed: int = 0) -> torch.Tensor:
    """Random token windows (n, seqlen): the driver only needs ids, and these are fast."""
    return torch.randint(0, 49152, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def run(model, cfg, ids=None, chunk=3):
    ids = calib() if ids is None else ids
    return compress_model(model, None, cfg, device="cpu", calib_ids=ids, progress=False, chunk=chunk)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


def all_linears(model) -> dict[str, torch.nn.Module]:
    arch = get_arch(model)
    return {f"{arch.layers}.{i}.{n}": m for i, layer in enumerate(decoder_layers(model))
            for n, m in linear_layers(layer).items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", [SPARSE50, GPTQ4], ids=["sparsegpt50", "gptq4"])
def test_every_family_compresses_every_linear(family, cfg):
    model = make_tiny(family)
    probe = calib(2, 24, seed=1)
    dense = logits(model, probe)
    report = run(model, cfg)
    linears = all_linears(model)
    assert set(report.compressed) == set(linears)  # nothing missed, nothing extra
    for name, mod in linears.items():
        W = weight_matrix(mod)
        cw = report.compressed[name]
        assert torch.equal(cw.weight, W)  # the report holds the live weight
        if cfg.prune is not None:  # exact per-row sparsity, pruned weights exactly zero
            rows, cols = W.shape
            assert torch.all(cw.mask.sum(1) == cols - n_pruned(cols, 0.5)), name
            assert torch.all(W[~cw.mask] == 0)
        else:  # per-row grid: at most 2**bits distinct values in a row
            assert max(len(torch.unique(r)) for r in W) <= 16, name
    out = logits(model, probe)
    assert torch.isfinite(out).all()
    rel = float((out - dense).norm() / dense.norm())
    assert 1e-4 < rel < 1.0  # changed, but not destroyed
    if cfg.prune is not None:
        assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    stats = report.linear_stats()
    assert all(s["recon_error"] >= 0 and s["seconds"] >= 0 for s in stats.values())
    assert math.isfinite(report.mean_recon_error) and 0 < report.mean_rel_error < 1
    json.dumps(report.to_dict())  # serialisable


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_replayed_block_calls_reproduce_the_model_forward(family):
    """Captured block inputs/arguments, replayed block by block, give the model's own block outputs.

    seqlen 40 exceeds Gemma 3's sliding window (32), so a per-block mask matters; 5 windows in
    chunks of 2 exercise the shorter last chunk."""
    model = make_tiny(family)
    ids = calib(5, 40)
    layers = decoder_layers(model)
    want: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_hook(
        lambda m, a, o, i=i: want[i].append(o[0] if isinstance(o, tuple) else o)) for i, layer in enumerate(layers)]
    for s in range(0, 5, 2):
        model(input_ids=ids[s : s + 2], use_cache=False)
    for h in hooks:
        h.remove()
    inps, calls = _capture_inputs(model, ids, chunk=2)
    assert [h.shape[0] for h in inps] == [2, 2, 1]
    for i, layer in enumerate(layers):
        inps = [calls[i](layer, h) for h in inps]
        for got, ref in zip(inps, want[i]):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert all("forward" not in layer.__dict__ for layer in layers)  # catchers removed


def test_block_call_accepts_tuple_outputs_and_slices_batch_arguments():
    class Block(torch.nn.Module):
        def forward(self, h, bias=None, scale=None):
            return (h + bias + scale, "extra")

    call = _BlockCall(args=(), kwargs={"bias": torch.ones(4, 3, 2), "scale": torch.ones(1, 3, 2)}, batch=4)
    out = call(Block(), torch.zeros(2, 3, 2))  # a chunk of 2 from a recorded batch of 4
    assert out.shape == (2, 3, 2) and torch.all(out == 2)


def layer0_errors(model, cfg):
    report = compress_model(model, None, cfg, device="cpu", calib_ids=calib(), progress=False, chunk=3,
                            output_error=True)
    return {n.split(".", 3)[-1]: s["recon_error"] for n, s in report.layers[0]["linears"].items()}


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_sparsegpt_beats_magnitude_layerwise(family):
    """Block 0 sees identical inputs in each run (all-at-once mode), so errors compare linear by linear.

    (Wanda is not compared here: on a random model with near-uniform input norms it is
    magnitude pruning up to noise; the kernel tests compare it on structured inputs.)"""
    errs = {m: layer0_errors(make_tiny(family), CompressConfig(prune=PruneConfig(method=m)))
            for m in ("sparsegpt", "magnitude")}
    for name, mag in errs["magnitude"].items():
        assert errs["sparsegpt"][name] < mag, name


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_layerwise(bits):
    q = dict(bits=bits, true_sequential=False)
    gptq = layer0_errors(make_tiny("llama"), CompressConfig(quant=QuantConfig(method="gptq", **q)))
    rtn = layer0_errors(make_tiny("llama"), CompressConfig(quant=QuantConfig(method="rtn", **q)))
    for name in rtn:
        assert gptq[name] < rtn[name], name


def test_true_sequential_on_and_off():
    on = run(make_tiny("llama"), CompressConfig(quant=QuantConfig(bits=4, true_sequential=True)))
    off = run(make_tiny("llama"), CompressConfig(quant=QuantConfig(bits=4, true_sequential=False)))
    first = "model.layers.0.self_attn.q_proj"
    # The first group sees the dense block input in both modes; later groups see compressed inputs with it on.
    assert torch.equal(on.compressed[first].weight, off.compressed[first].weight)
    later = "model.layers.0.mlp.down_proj"
    assert not torch.equal(on.compressed[later].weight, off.compressed[later].weight)
    for r in (on, off):
        assert len(r.compressed) == 14 and math.isfinite(r.mean_recon_error)


def test_joint_sparse_and_quantized():
    model = make_tiny("qwen2")
    report = run(model, CompressConfig(prune=PruneConfig(sparsity=0.5), quant=QuantConfig(bits=4, group_size=32)))
    assert report.sparsity == pytest.approx(0.5, abs=1e-3) and report.bits == 4
    for name, cw in report.compressed.items():
        W = cw.weight
        assert torch.all(W[~cw.mask] == 0)
        groups = W.reshape(W.shape[0], -1, 32)  # (rows, groups, 32)
        levels = max(len(torch.unique(g)) for row in groups for g in row)
        assert levels <= 16 + 1, name  # 16 grid points, plus the zero of pruned weights
        assert cw.codes is not None and cw.scale.shape == (W.shape[0], W.shape[1] // 32)


def test_nm_and_baselines_run_through_the_driver():
    model = make_tiny("gpt2")
    report = run(model, CompressConfig(prune=PruneConfig(method="wanda", prune_n=2, prune_m=4),
                                       quant=QuantConfig(method="rtn", bits=8)))
    for cw in report.compressed.values():
        groups = cw.mask.reshape(cw.mask.shape[0], -1, 4)  # (rows, groups, 4)
        assert torch.all(groups.sum(-1) == 2)


def test_bad_width_fails_before_any_work():
    model = make_tiny("llama")
    before = {n: weight_matrix(m).clone() for n, m in all_linears(model).items()}
    with pytest.raises(CTPError, match="group_size 48"):
        run(model, CompressConfig(quant=QuantConfig(bits=4, group_size=48)))
    assert all(torch.equal(weight_matrix(m), before[n]) for n, m in all_linears(model).items())


def test_calibration_from_the_corpus(tokenizer):
    model = make_tiny("llama")
    cfg = CompressConfig(prune=PruneConfig(sparsity=0.5), nsamples=3, seqlen=32, calib_dataset="c4", seed=1)
    report = compress_model(model, tokenizer, cfg, device="cpu", progress=False)
    assert report.calibration["name"] == "c4" and report.calibration["split"] == "train"
    assert report.calibration["nsamples"] == 3 and report.calibration["seqlen"] == 32
    assert report.linear_stats()["model.layers.0.self_attn.q_proj"]["n_samples"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_offload_to_cuda_matches_cpu():
    """Blocks move to the GPU one at a time and back; the result matches a CPU run closely."""
    cfg = CompressConfig(prune=PruneConfig(sparsity=0.5), quant=QuantConfig(bits=4))
    cpu = make_tiny("llama")
    gpu = make_tiny("llama")
    run(cpu, cfg)
    compress_model(gpu, None, cfg, device="cuda", calib_ids=calib(), progress=False, chunk=3)
    assert all(p.device.type == "cpu" for p in gpu.parameters())
    probe = calib(2, 24, seed=1)
    a, b = logits(cpu, probe), logits(gpu, probe)
    assert float((a - b).norm() / a.norm()) < 0.05


@pytest.mark.parametrize("recipe", [{"quant": {"method": "rtn", "bits": 4, "group_size": 32}},
                                    {"prune": {"method": "magnitude", "sparsity": 0.5}},
                                    {"prune": {"method": "magnitude", "prune_n": 2, "prune_m": 4},
                                     "quant": {"method": "rtn", "bits": 3, "group_size": 32}}])
def test_data_free_methods_skip_calibration_with_the_same_weights(recipe, tokenizer, monkeypatch):
    """RTN and magnitude pruning read the weights alone: no calibration pass, the weights calibration gave."""
    import ctp.compress.driver as driver
    from ctp.compress.registry import compress_weight, needs_calibration
    from ctp.models.adapter import decoder_layers, linear_layers, weight_matrix

    cfg = CompressConfig.from_dict({**recipe, "nsamples": 2, "seqlen": 32})
    assert not needs_calibration(cfg)
    model = make_tiny("llama")
    expected = {}
    for i, layer in enumerate(decoder_layers(model)):
        for n, mod in linear_layers(layer).items():
            expected[f"{i}.{n}"] = compress_weight(weight_matrix(mod).clone(), None, 0, cfg).weight

    def no_data(*a, **k):
        raise AssertionError("a data-free method ran the calibration pass")

    monkeypatch.setattr(driver, "_calibration", no_data)
    monkeypatch.setattr(driver, "_capture_inputs", no_data)
    report = driver.compress_model(model, tokenizer, cfg, device="cpu", progress=False)
    for i, layer in enumerate(decoder_layers(model)):
        for n, mod in linear_layers(layer).items():
            assert torch.equal(weight_matrix(mod), expected[f"{i}.{n}"]), n
    stats = report.linear_stats()
    assert all("weight_rel_error" in s and "recon_error" not in s for s in stats.values())
    assert report.calibration["data"] is None
    # the calibrated path (a Hessian the methods ignore) gives the very same weights
    monkeypatch.undo()
    again = make_tiny("llama")
    for i, layer in enumerate(decoder_layers(again)):
        for n, mod in linear_layers(layer).items():
            W = weight_matrix(mod)
            H = torch.eye(W.shape[1])
            assert torch.equal(compress_weight(W.clone(), H, 4, cfg).weight, expected[f"{i}.{n}"])


def test_wanda_reads_only_the_input_norms(monkeypatch):
    """Wanda (alone or with a data-free quantizer) gets H's diagonal: the same masks, no (in, in) Hessian."""
    import ctp.compress.driver as D
    from ctp.compress.registry import needs_norms_only

    assert needs_norms_only(CompressConfig(prune=PruneConfig(method="wanda")))
    assert needs_norms_only(CompressConfig(prune=PruneConfig(method="wanda"), quant=QuantConfig(method="rtn")))
    assert not needs_norms_only(CompressConfig(prune=PruneConfig(method="wanda"), quant=QuantConfig()))  # gptq: H
    assert not needs_norms_only(SPARSE50)
    assert not needs_norms_only(CompressConfig(prune=PruneConfig(method="magnitude")))

    cfg = CompressConfig(prune=PruneConfig(method="wanda", sparsity=0.5))
    model = make_tiny("llama")
    with_h = make_tiny("llama")
    monkeypatch.setattr(D, "needs_norms_only", lambda c: False)  # the full-Hessian path, as before
    full = run(with_h, cfg)
    monkeypatch.undo()

    def no_hessian(*a, **k):
        raise AssertionError("Wanda built an (in, in) Hessian")

    monkeypatch.setattr(D, "accumulate_hessian", no_hessian)
    diag = run(model, cfg)
    for name, cw in diag.compressed.items():
        agree = (cw.mask == full.compressed[name].mask).float().mean()
        assert agree > 0.999, name  # the same scores up to float rounding of near ties
        s = diag.linear_stats()[name]
        assert 0 < s["rel_error"] < 1, name


@pytest.mark.parametrize("store", ["float16", "bfloat16"])
def test_activations_kept_in_16_bits_between_blocks(store, tmp_path, monkeypatch):
    """``activations`` stores the calibration activations in 16 bits (checkpointed that way), each block still runs
    in fp32, and the result stays near the fp32 run's; the fp32 default is left out of the recorded recipe."""
    import ctp.compress.driver as driver
    from ctp.compress.checkpoint import BlockCheckpoint

    assert "activations" not in GPTQ4.to_dict()  # recipes recorded before the option keep their keys
    cfg = CompressConfig.from_dict({**GPTQ4.to_dict(), "activations": store})
    assert cfg.to_dict()["activations"] == store and cfg.label() == GPTQ4.label()
    dtypes = []
    real = driver._run_block
    monkeypatch.setattr(driver, "_run_block", lambda layer, call, inps, compute, out=None: dtypes.append(
        ({h.dtype for h in inps}, compute)) or real(layer, call, inps, compute, out))
    saved = []
    real_save = BlockCheckpoint.save_block
    monkeypatch.setattr(BlockCheckpoint, "save_block", lambda self, i, rec, entry, nxt, sec, **kw: saved.append(
        {h.dtype for h in nxt}) or real_save(self, i, rec, entry, nxt, sec, **kw))
    ref, low = make_tiny("llama"), make_tiny("llama")
    r_ref = run(ref, GPTQ4)
    r_low = compress_model(low, None, cfg, device="cpu", calib_ids=calib(), progress=False, chunk=3,
                           checkpoint_dir=tmp_path / "ckpt")
    assert dtypes[-1] == ({getattr(torch, store)}, torch.float32)
    assert saved and all(d == {getattr(torch, store)} for d in saved)  # checkpointed in 16 bits too
    assert r_low.mean_recon_error == pytest.approx(r_ref.mean_recon_error, rel=0.05)
    ids = calib(2, 16, seed=5)
    a, b = logits(ref, ids), logits(low, ids)
    assert not torch.equal(a, b)  # the option did something
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_unknown_activation_dtype_is_a_one_line_error():
    with pytest.raises(CTPError, match="activations 'int8' is not a storage dtype.*float16"):
        CompressConfig.from_dict({**GPTQ4.to_dict(), "activations": "int8"})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("cfg", [GPTQ4, SPARSE50, CompressConfig(prune=PruneConfig(sparsity=0.5),
                                                                  quant=QuantConfig(bits=3, group_size=16))],
                         ids=["gptq4", "sparsegpt50", "joint"])
def test_compressed_linears_wait_as_codes_with_the_same_result(family, cfg, monkeypatch):
    """While a block is at work its compressed linears hold no fp32 weight (codes, or kept values beside the mask)
    and are rebuilt for each forward; every weight and statistic equals a run that keeps the weights."""
    import ctp.compress.driver as D

    ids = calib()
    plain = make_tiny(family)
    with monkeypatch.context() as m:
        m.setattr(D._AsCodes, "add", lambda self, results: None)  # the weights stay in the modules
        want = run(plain, cfg, ids)
    model = make_tiny(family)
    waited = []
    real_add = D._AsCodes.add

    def add(self, results):
        real_add(self, results)
        waited.extend(n for n in results if self.mods[n].weight.is_meta)

    monkeypatch.setattr(D._AsCodes, "add", add)
    got = run(model, cfg, ids)
    n_linears = len(linear_layers(decoder_layers(model)[0]))
    assert len(waited) == n_linears * len(decoder_layers(model))  # every compressed linear waited without weights
    for (name, a), b in zip(all_linears(plain).items(), all_linears(model).values()):
        assert not b.weight.is_meta, name
        assert torch.equal(a.weight, b.weight) and torch.equal(torch.signbit(a.weight), torch.signbit(b.weight)), name
        assert torch.equal(got.compressed[name].weight, weight_matrix(b)), name
    assert [lay["recon_error"] for lay in got.layers] == [lay["recon_error"] for lay in want.layers]
    assert torch.equal(logits(model, ids[:2]), logits(plain, ids[:2]))


def test_default_calibration_batch_is_a_token_budget(monkeypatch):
    """Unless told, a block forward takes CHUNK_TOKENS tokens of windows (at least one window); the run equals one
    given that many windows per forward."""
    import ctp.compress.driver as D

    assert (D.default_chunk(512), D.default_chunk(2048), D.default_chunk(2 * D.CHUNK_TOKENS)) == (8, 2, 1)
    chunks = []
    real = D._capture_inputs
    monkeypatch.setattr(D, "_capture_inputs", lambda model, windows, chunk, *a: chunks.append(chunk) or
                        real(model, windows, chunk, *a))
    ids = calib(n=20, seqlen=D.CHUNK_TOKENS // 16)  # 16 windows per forward by default: chunks of 16 and 4
    a, b = make_tiny("llama"), make_tiny("llama")
    run(a, GPTQ4, ids, chunk=None)
    run(b, GPTQ4, ids, chunk=16)
    assert chunks == [16, 16]
    assert all(torch.equal(x.weight, y.weight) for x, y in zip(all_linears(a).values(), all_linears(b).values()))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])  # shared q/k/v input, Conv1D, the block input itself
def test_hessian_inputs_scaled_in_place_give_the_same_result(family, monkeypatch):
    """The input that completes a group's Hessians is scaled in place (no copy) unless it is the block's own input
    or one of its arguments; Llama, GPT-2 and OPT without the leading layer norm, whose q/k/v read the block
    input itself, compress exactly as with a copy every time (every family runs the in-place path in the other
    driver tests)."""
    import ctp.compress.driver as D
    from ctp.compress import kernels as K

    def build():
        model = make_tiny(family)
        if family == "opt":
            model.config.do_layer_norm_before = False
            for layer in decoder_layers(model):
                layer.do_layer_norm_before = False
        return model

    ids = calib()
    consumed = []
    real = K.accumulate_hessian

    def spy(H, n, x, inplace=False, consume=False):
        consumed.append(consume)
        return real(H, n, x, inplace=inplace, consume=consume)

    with monkeypatch.context() as m:
        m.setattr(D, "accumulate_hessian", lambda H, n, x, inplace=False, consume=False: real(H, n, x, inplace))
        want = build()
        run(want, GPTQ4, ids)
    monkeypatch.setattr(D, "accumulate_hessian", spy)
    got = build()
    run(got, GPTQ4, ids)
    assert any(consumed)
    if family == "opt":  # q/k/v read the block input: never scaled in place
        assert not all(consumed)
    for (name, a), b in zip(all_linears(want).items(), all_linears(got).values()):
        assert torch.equal(a.weight, b.weight), name
