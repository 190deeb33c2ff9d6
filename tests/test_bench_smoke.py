"""Smoke tests of the benchmarks in bench/: each main runs at a toy size, returns the expected
fields, and its fast path gives the same numbers as the baseline it is timed against."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import compress_speed, inference, prompt_train  # noqa: E402
from bench._kernels import int4_weight, int4_mm, int8_weight  # noqa: E402
from bench._reference import hessian_per_sample, hessian_per_token, obs_unblocked  # noqa: E402
from ctp.compress import kernels as K  # noqa: E402


def _layer(out_f=24, in_f=64, seed=0):
    return compress_speed.synthetic_layer(out_f, in_f, 256, seed, torch.device("cpu"))


def test_unblocked_reference_matches_kernels():
    W, H = _layer()
    sg = K.sparsegpt(W, H, 0.5, blocksize=16)
    Q, keep, _ = obs_unblocked(W, H, sparsity=0.5, blocksize=16)
    assert torch.equal(sg.mask, keep)
    assert torch.allclose(sg.weight, Q, atol=1e-5)
    gq = K.gptq(W, H, 4, blocksize=16)
    Q, _, codes = obs_unblocked(W, H, bits=4, blocksize=16)
    assert float((gq.codes == codes).float().mean()) > 0.99
    assert abs(K.reconstruction_error(W, gq.weight, H) / K.reconstruction_error(W, Q, H) - 1) < 1e-2


def test_hessian_baselines_match_accumulate():
    X = torch.randn(3, 10, 16)
    H, _ = K.accumulate_hessian(None, 0, X)
    assert torch.allclose(hessian_per_sample(X), H, rtol=1e-5, atol=1e-5)
    assert torch.allclose(hessian_per_token(X), H, rtol=1e-5, atol=1e-5)


def test_compress_speed_smoke(capsys):
    r = compress_speed.main(["--shapes", "24x64,64x32", "--big", "48x128", "--big-rows", "16", "--tokens", "256",
                             "--blocksize", "16", "--repeats", "1", "--hessian", "3x16x32",
                             "--per-token-samples", "1"])
    assert "speedup" in capsys.readouterr().out
    assert {(k["algo"], tuple(k["shape"])) for k in r["kernels"]} == {
        (a, s) for a in ("sparsegpt", "gptq") for s in ((24, 64), (64, 32), (48, 128))}
    for k in r["kernels"]:
        for f in ("fast_s", "baseline_s", "speedup", "max_abs_diff", "agree", "recon_fast", "recon_base"):
            assert k[f] is not None and k[f] >= 0, (k, f)
        if k["algo"] == "sparsegpt":  # deterministic masks: the same weights
            assert k["agree"] == 1.0 and k["max_abs_diff"] < 1e-4 * k["weight_scale"] + 1e-6, k
        else:  # codes may flip at exact rounding ties, never more than a few
            assert k["agree"] > 0.99 and k["recon_rel_diff"] < 1e-2, k
    big = [k for k in r["kernels"] if k["shape"] == [48, 128]]
    assert all(k["rows_run"] == 16 and k["fast_full_s"] > 0 for k in big)
    h = r["hessian"]
    assert h["max_rel_diff_per_sample"] < 1e-5 and h["max_rel_diff_per_token"] < 1e-5
    assert h["speedup_vs_per_sample"] > 0 and h["batched_gflops"] > 0
    assert set(r["llama7b"]) == {"cpu", "wall"}
    e = r["llama7b"]["cpu"]
    assert e["sparsegpt"]["simple_s"] > 0 and len(e["calibrations"]) == 2
    assert all(c["gptq_total_simple_s"] > e["gptq"]["simple_s"] for c in e["calibrations"])
    assert e["assumptions"]


def test_compress_speed_model_section(tiny_dir):
    r = compress_speed.main(["--shapes", "none", "--big", "none", "--hessian", "none", "--model", tiny_dir,
                             "--nsamples", "2", "--seqlen", "16"])
    assert [m["recipe"] for m in r["model"]] == ["reference rtn4g64 (--nearest loop)", "sparsegpt50", "gptq4",
                                                 "rtn4g64", "magnitude50"]
    for m in r["model"][1:]:
        assert m["blocks"] == 2 and m["linears"] == 14 and 0 < m["kernel_seconds"] <= m["seconds"]


def test_reference_rtn_loop_gives_ctps_rtn_weights():
    from bench._reference import rtn_nearest

    W = 0.02 * torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    for group in (-1, 64):
        assert torch.equal(rtn_nearest([W], 4, group)[0], K.rtn_quantize(W, 4, group, sym=False).weight)


def test_int_kernels_match_dequantized_matmul():
    W = 0.02 * torch.randn(48, 128)
    x = torch.randn(5, 128)
    q8 = K.rtn_quantize(W, 8, -1, sym=True)
    w8, s8 = int8_weight(q8.codes, q8.scale, q8.zero)
    ref = x @ q8.weight.t()
    assert torch.allclose(torch._weight_int8pack_mm(x, w8, s8), ref, atol=1e-5 * float(ref.abs().max()))
    for group in (-1, 32, 64):  # per-row grids are replicated over kernel groups
        q4 = K.rtn_quantize(W, 4, group)
        packed, sz, G = int4_weight(q4.codes, q4.scale, q4.zero, q4.g_idx)
        ref = x @ q4.weight.t()
        assert torch.allclose(int4_mm(x, packed, G, sz), ref, atol=1e-5 * float(ref.abs().max()))


def test_inference_smoke(tiny_dir):
    r = inference.main(["--model", tiny_dir, "--shapes", "32x64", "--tokens", "1,4", "--repeats", "1",
                        "--min-time", "0.001", "--prefill", "8", "--decode", "2", "--model-repeats", "1",
                        "--recipes", "q4,s50q4"])
    formats = {row["format"] for row in r["linear"]}
    assert {"fp32", "fake4", "bf16", "int8", "int4", "int8-bf16", "int4-bf16", "csr50"} <= formats
    assert "2:4" in formats or "2:4" in r["linear_unavailable"]
    assert not any(row["format"] in ("int8", "int4") and row["tokens"] > 1 for row in r["linear"])
    for row in r["linear"]:
        assert row["us_per_call"] > 0 and row["speedup_vs_fp32"] > 0
        if row["format"] in ("int8", "int4", "csr50"):
            assert row["max_rel_err"] < 1e-4, row
        if row["format"].endswith("-bf16"):
            assert row["max_rel_err"] < 3e-2, row
    mem = {row["format"]: row for row in r["memory"]}
    assert 4 <= mem["4-bit per-row"]["linear_bits_per_weight"] < 5
    assert 3 <= mem["50% sparse + 4-bit"]["linear_bits_per_weight"] < 4
    assert mem["dense fp32"]["linear_bits_per_weight"] == 32
    m = r["model"]
    assert {row["format"] for row in m["rows"]} == {"fp32", "fake4", "int4-bf16", "int8-bf16", "bf16"}
    assert len(m["checks"]) == 4
    for k, v in m["checks"].items():
        assert v < (1e-4 if "fp32act" in k else 0.1), (k, v)


def test_prompt_train_smoke(tiny_dir):
    r = prompt_train.main(["--model", tiny_dir, "--seqlen", "16", "--prompt-tokens", "4", "--steps", "2",
                           "--warmup", "0", "--configs", "fp32,fp32+ckpt,bf16", "--memory-steps", "0",
                           "--trainer-steps", "3"])
    rows = {row["config"]: row for row in r["steps"]}
    assert set(rows) == {"fp32", "fp32+ckpt", "bf16"}
    assert all(row["tokens_per_s"] > 0 and row["step_s"] > 0 for row in rows.values())
    # gradient checkpointing recomputes exactly: same losses step by step
    assert r["checks"]["fp32_ckpt_max_loss_diff"] < 1e-5
    assert r["checks"]["bf16_vs_fp32_first_loss_diff"] < 0.1
    assert r["trainer"]["step_s"] > 0 and len(r["trainer"]["losses"]) == 3


def test_prompt_train_memory_subprocess(tiny_dir):
    args = argparse.Namespace(model=tiny_dir, batch_size=1, seqlen=16, prompt_tokens=4, memory_steps=1, threads=1)
    out = prompt_train._memory_subprocess("fp32+ckpt", args)
    assert out["config"] == "fp32+ckpt" and out["peak_rss_delta_bytes"] >= 0 and out["rss_before_bytes"] > 0


@pytest.mark.parametrize("bad", [["--configs", "fp64"]])
def test_prompt_train_rejects_unknown_config(bad):
    with pytest.raises(SystemExit):
        prompt_train.main(bad)


def test_recovery_bench_at_toy_size(tiny_dir, tmp_path):
    """bench.recovery end to end on a tiny model: baselines, two recipes, shares with intervals, a plot."""
    import math

    from bench import recovery
    from ctp.cli import main as ctp_main

    comp = tmp_path / "c"
    assert ctp_main(["-q", "compress", "--model", tiny_dir, "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "32",
                     "--out", str(comp)]) == 0
    out = tmp_path / "r" / "rec.json"
    r = recovery.main(["--compressed", str(comp), "--recipes", "soft-nll,prefix-kd-k3", "--minutes", "0.05",
                       "--seqlen", "32", "--eval-every", "2", "--eval-windows", "1", "--test-windows", "3",
                       "--datasets", "c4", "--json", str(out)])
    assert [row["recipe"] for row in r["rows"]] == ["soft-nll", "prefix-kd-k3"] and r["rows"][1]["k"] == 3
    for row in r["rows"]:
        c4 = row["c4"]
        assert c4["n_tokens"] == 3 * 31 and c4["ppl_low"] <= c4["ppl"] <= c4["ppl_high"]
        assert math.isfinite(c4["share"]) and c4["share_low"] <= c4["share"] <= c4["share_high"]
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 1000
    assert (out.parent / "recovery-c-prefix-kd-k3.safetensors").is_file()
    cached = list(out.parent.glob("baselines-*.json"))
    assert len(cached) == 1  # a second run on the same models and windows reuses the baselines
    import json

    saved = json.loads(cached[0].read_text())
    saved["base"]["c4"]["full"]["ppl"] = 123.0  # a mark only a reuse can carry over
    cached[0].write_text(json.dumps(saved))
    again = recovery.main(["--compressed", str(comp), "--recipes", "prefix-nll", "--cpu-minutes", "1e-6",
                           "--seqlen", "32", "--eval-every", "2", "--eval-windows", "1", "--test-windows", "3",
                           "--datasets", "c4", "--json", str(out.parent / "again.json")])
    assert again["baselines"]["c4"]["full"]["ppl"] == 123.0 and list(out.parent.glob("baselines-*.json")) == cached
    row = again["rows"][0]  # a CPU-time budget spent at once: one step, validated there
    assert row["steps"] == 1 and row["cpu_minutes"] > 0 and again["args"]["minutes"] is None


def test_inference_runtime_section_smoke():
    """Loaded artifacts dense vs packed: the same weights, less memory, perplexity within rounding."""
    r = inference.main(["--sections", "runtime", "--random-llama", "128:2", "--prefill", "8", "--decode", "2",
                        "--model-repeats", "1"])
    rows = {row["runtime"]: row for row in r["runtime"]}
    assert set(rows) == {"dense fp32", "packed, fp32 rest", "packed, bf16 rest", "packed, int8 embeddings"}
    assert rows["dense fp32"]["packed_linears"] == 0 and rows["packed, fp32 rest"]["packed_linears"] == 14
    assert rows["packed, int8 embeddings"]["packed_linears"] == 15  # the LM head too
    assert rows["packed, fp32 rest"]["weight_bytes"] < rows["dense fp32"]["weight_bytes"]
    assert rows["packed, bf16 rest"]["weight_bytes"] < rows["packed, fp32 rest"]["weight_bytes"]
    assert rows["packed, int8 embeddings"]["weight_bytes"] < rows["packed, bf16 rest"]["weight_bytes"]
    assert rows["packed, fp32 rest"]["logits_max_rel_err"] < 3e-2
    assert all(row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 for row in rows.values())
    assert rows["dense fp32"]["prefill_last_speedup"] == 1 and all(r["prefill_last_speedup"] > 0 for r in rows.values())


def test_teacher_cache_bench_at_toy_size(tiny_dir, tmp_path):
    """bench.teacher_cache on a tiny model: four runs, the cache read reaching the fill's loss exactly."""
    from bench import teacher_cache
    from ctp.cli import main as ctp_main

    comp = tmp_path / "c"
    assert ctp_main(["-q", "compress", "--model", tiny_dir, "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "32",
                     "--out", str(comp)]) == 0
    r = teacher_cache.main(["--compressed", str(comp), "--steps", "2", "--topk", "8", "--tokens", "2",
                            "--seqlen", "32", "--batch-size", "1"])
    rows = {row["run"]: row for row in r["rows"]}
    assert len(rows) == 4 and all(row["cpu_s_per_step"] > 0 for row in rows.values())
    assert rows["kd, top-8 cache read"]["final_loss"] == rows["kd, top-8 cache filling"]["final_loss"]


def test_lm_head_bench_at_toy_size(tiny_dir):
    """bench.lm_head on a tiny model: the fused and unfused losses agree, one row per configuration, memory measured."""
    from bench import lm_head

    r = lm_head.main(["--models", tiny_dir, "--chunks", str(3 * 49152), "--steps", "1", "--tokens", "2",
                      "--seqlen", "16", "--batch-size", "2"])
    rows = r["rows"]
    assert [row["loss"] for row in rows] == ["unfused", "fused (chunk 3 positions)"]
    assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], rel=1e-5)
    assert all(row["cpu_s_per_step"] > 0 and row["peak_rss_delta_mb"] is not None for row in rows)
    assert 0 < rows[0]["head_share_of_unfused_step"]


def test_calib_activations_bench_at_toy_size(tiny_dir):
    """bench.calib_activations on a tiny model: both runs, the paired perplexity change, the differing share."""
    from bench import calib_activations

    r = calib_activations.main(["--model", tiny_dir, "--recipe", '{"quant": {"bits": 4, "group_size": 32}}',
                                "--nsamples", "2", "--calib-seqlen", "32", "--datasets", "c4", "--windows", "3",
                                "--seqlen", "32"])
    assert [x["activations"] for x in r["runs"]] == ["float32", "float16"]
    assert r["runs"][1]["activation_mb"] == pytest.approx(r["runs"][0]["activation_mb"] / 2)
    row = r["rows"][0]
    assert row["windows"] == 3 and row["ci_pct"][0] <= row["change_pct"] <= row["ci_pct"][1]
    assert 0 < r["weights_differing"] < 0.5


def test_prompt_placement_bench_at_toy_size(tiny_dir, tmp_path):
    """bench.prompt_placement on a tiny model whose tokenizer adds a BOS: both placements scored on the same
    tokens, with shares; a model whose tokenizer adds none is refused."""
    import math
    import shutil

    from transformers import AutoTokenizer

    from bench import prompt_placement
    from ctp.cli import main as ctp_main

    src = tmp_path / "bos"
    shutil.copytree(tiny_dir, src)
    AutoTokenizer.from_pretrained(tiny_dir, add_bos_token=True).save_pretrained(src)
    comp, prompt = tmp_path / "c", tmp_path / "p.safetensors"
    assert ctp_main(["-q", "compress", "--model", str(src), "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "32",
                     "--out", str(comp)]) == 0
    assert ctp_main(["-q", "train-prompt", "--model", str(comp), "--kind", "prefix", "--tokens", "4", "--steps", "2",
                     "--seqlen", "32", "--batch-size", "1", "--eval-every", "2", "--eval-windows", "1",
                     "--out", str(prompt)]) == 0
    r = prompt_placement.main(["--compressed", str(comp), "--prompt", str(prompt), "--tokens", "4", "--steps", "2",
                               "--windows", "2", "--seqlen", "64", "--train-seqlen", "32", "--datasets", "c4",
                               "--json", str(tmp_path / "pp.json")])
    row = r["rows"][0]
    assert row["windows"] == 2 and row["tokens"] == 2 * 62
    assert all(math.isfinite(row[k]) for k in ("full", "none", "before_bos", "after_bos"))
    assert row["none"] != row["full"] and row["after_bos"] != row["before_bos"]
    plain = tmp_path / "c-plain"
    assert ctp_main(["-q", "compress", "--model", tiny_dir, "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "32",
                     "--out", str(plain)]) == 0
    with pytest.raises(SystemExit, match="which is --prompt"):  # the output never overwrites the input prompt
        prompt_placement.main(["--compressed", str(comp), "--prompt", str(prompt), "--steps", "1",
                               "--json", str(tmp_path / "p.json")])
    assert prompt.is_file()
    with pytest.raises(SystemExit, match="adds no BOS"):
        prompt_placement.main(["--compressed", str(plain), "--prompt", str(prompt), "--steps", "1"])
    import ctp.prompt.train as train_mod
    from ctp.data.corpora import leading_ids
    from ctp.prompt.soft import init_prompt

    assert train_mod.leading_ids is leading_ids and train_mod.init_prompt is init_prompt  # put back as they were


def test_compress_memory_bench_at_toy_size():
    """bench.compress_memory end to end: child runs by blocks and with the activations on disk, the same artifact."""
    from bench import compress_memory

    r = compress_memory.main(["--threads", "1", "--hidden", "128", "--layers", "1", "--recipes", "gptq",
                              "--modes", "blocks,offload", "--nsamples", "4", "--seqlen", "32", "--calib-batch", "2",
                              "--stages"])
    assert [row["mode"] for row in r["runs"]] == ["blocks", "offload"]
    assert all(row["peak_rss_bytes"] > row["rss_after_imports_bytes"] > 0 for row in r["runs"])
    assert r["bit_identical"] == {"gptq (blocks vs offload)": True}
    # --stages: each stage of the block's work was seen, never above the process's high-water mark; GPTQ's
    # kernel ran on the MLP's two weight shapes (hidden 128, intermediate 320)
    for row in r["runs"]:
        stages = {s["stage"]: s["peak_rss_bytes"] for s in row["stages"]}
        assert {"Hessian pass", "next block's inputs", "block at work", "kernel (320, 128)",
                "kernel (128, 320)"} <= set(stages)
        assert all(0 < v <= row["peak_rss_bytes"] for v in stages.values())


def test_inference_dequant_section_smoke():
    """Every long-input path of a packed layer computes the dense matmul of its weight; the compiled loop's rows
    are there (numba is a dependency)."""
    r = inference.main(["--sections", "dequant", "--dequant-shapes", "128x64", "--tokens", "8", "--repeats", "1",
                        "--min-time", "0.001"])
    paths = {(row["kind"], row["path"]) for row in r["dequant"]}
    for kind in ("int4", "int8"):
        assert {(kind, p) for p in ("dense fp32", "torch ops", "compiled", "compiled, tiles",
                                    "dequantize, torch ops", "dequantize, compiled")} <= paths
    for row in r["dequant"]:
        assert row["ms_per_call"] > 0
        if "max_rel_err" in row:
            assert row["max_rel_err"] < 1e-5, row


@pytest.mark.parametrize("shapes, message", [("12x", "is not OUTxIN"), ("0x64", "empty side"),
                                              ("100x64", "multiple of 16")])
def test_bad_dequant_shapes_are_one_line_errors(shapes, message):
    with pytest.raises(SystemExit, match=message) as e:
        inference.main(["--sections", "dequant", "--dequant-shapes", shapes, "--tokens", "8"])
    assert "\n" not in str(e.value)
