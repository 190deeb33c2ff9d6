"""Prompt learning: frozen base, decreasing loss, weight decay, fp32 master, exact resume, checkpointing, NaN stop."""

import hashlib
import logging
import math

import pytest
import torch

from conftest import make_tiny
from ctp.data.corpora import corpus_ids, sample_windows
from ctp.errors import CTPError
from ctp.models.load import ModelInfo, tokenizer_fingerprint
from ctp.prompt.artifact import load_prompt
from ctp.lm import token_nll
from ctp.prompt.soft import PromptConfig, init_prompt
from ctp.prompt.train import (TrainConfig, checkpoint_path_for, checkpointed_layers, lr_at, make_optimizer,
                              train_prompt)

# small and fast: a tiny Llama on real C4 text
FAST = dict(seqlen=32, batch_size=2, eval_windows=2, warmup_steps=0)


@pytest.fixture(scope="module")
def info(tokenizer):
    return ModelInfo(spec="tiny-llama", path="memory", model_type="llama", hidden_size=64, vocab_size=49152,
                     num_layers=2, tokenizer_hash=tokenizer_fingerprint(tokenizer))


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_config_validation_and_presets():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.seqlen) == (1e-3, 1e-5, 4, 1024)  # the paper's
    demo = TrainConfig.cpu_demo()
    assert demo.seqlen == 256 and demo.batch_size == 2 and demo.steps == 300 and demo.max_minutes == 25
    assert TrainConfig.from_dict(demo.to_dict()) == demo
    assert TrainConfig.cpu_demo(steps=3).warmup == 3
    for bad in (dict(lr=0), dict(weight_decay=-1), dict(batch_size=0), dict(seqlen=1), dict(steps=0),
                dict(schedule="step"), dict(precision="fp8"), dict(train_split="validation"), dict(data="nope")):
        with pytest.raises(CTPError):
            TrainConfig(**bad)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1.0, steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    lin = TrainConfig(lr=1.0, steps=100, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_at(50, lin) == pytest.approx(0.5)
    assert lr_at(77, TrainConfig(lr=2.0, steps=100, schedule="constant", warmup_steps=0)) == 2.0


def test_weight_decay_is_applied(tokenizer, info):
    prompt = torch.nn.Parameter(torch.ones(3, 4))
    opt = make_optimizer(prompt, TrainConfig(weight_decay=1e-5))
    assert opt.param_groups[0]["weight_decay"] == 1e-5 and opt.param_groups[0]["params"] == [prompt]
    # inside train_prompt: one step with decay wd differs from one without by exactly lr * wd * p0 (AdamW)
    model = make_tiny("llama")
    pcfg = PromptConfig(num_tokens=4)
    p0 = init_prompt(model, tokenizer, pcfg)
    after = {}
    for wd in (0.0, 0.25):
        cfg = TrainConfig(lr=0.1, weight_decay=wd, steps=1, eval_every=1, **FAST)
        train_prompt(model, tokenizer, info, pcfg, cfg, progress=False,
                     callback=lambda s, h, p, wd=wd: after.__setitem__(wd, p.detach().clone()))
    torch.testing.assert_close(after[0.0] - after[0.25], 0.1 * 0.25 * p0, rtol=1e-4, atol=1e-7)


def test_learning_lowers_loss_and_leaves_the_model_untouched(tokenizer, info):
    model = make_tiny("llama")
    with torch.no_grad():
        # A random init (std 0.02) predicts a near-uniform distribution that no context can move;
        # a sharper head makes the prediction depend on the hidden state, as in a trained model.
        model.lm_head.weight.mul_(4)
    before = weights_hash(model)
    pcfg = PromptConfig(num_tokens=4)
    cfg = TrainConfig(lr=3e-2, steps=20, eval_every=10, **FAST)
    art, hist = train_prompt(model, tokenizer, info, pcfg, cfg, progress=False)
    assert weights_hash(model) == before
    assert all(p.grad is None for p in model.parameters()) and not model.training  # no gradient reached it
    assert hist.steps_done == 20 and len(hist.train_loss) == 20 and [e["step"] for e in hist.evals] == [0, 10, 20]
    # the loss on the same training windows is lower with the learned prompt than with the initial one
    ids, _ = corpus_ids("c4", "train", tokenizer)
    batch = sample_windows(ids, 8, 32, seed=123)
    with torch.no_grad():
        start = float(token_nll(model, batch, init_prompt(model, tokenizer, pcfg)).mean())
        end = float(token_nll(model, batch, art.embeddings).mean())
    assert end < start - 0.02, (start, end)
    # selection on validation: the kept prompt is better than the initial one and than no prompt
    assert hist.best_step > 0 and hist.best_val_ppl < hist.evals[0]["val_ppl"]
    assert art.best_val_ppl == hist.best_val_ppl < hist.val_ppl_no_prompt
    assert art.validation["split"] == "validation" and art.data["split"] == "train"
    assert art.embeddings.dtype == torch.float32 and art.k == 4


def test_prompt_is_an_fp32_master_under_bf16(tokenizer, info):
    """bf16 autocast and a bf16 model: the prompt stays fp32 and keeps updates below bf16 resolution."""
    model = make_tiny("llama").to(torch.bfloat16)
    pcfg = PromptConfig(num_tokens=4)
    p0 = init_prompt(model, tokenizer, pcfg)
    seen = []

    def check(step, hist, p):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        seen.append(p.detach().clone())

    cfg = TrainConfig(lr=1e-6, steps=2, eval_every=2, precision="bf16", **FAST)
    art, _ = train_prompt(model, tokenizer, info, pcfg, cfg, progress=False, callback=check)
    assert art.embeddings.dtype == torch.float32 and len(seen) == 2
    delta = seen[-1] - p0
    assert float((delta != 0).float().mean()) > 0.9  # the fp32 master moved almost everywhere ...
    same_in_bf16 = (seen[-1].bfloat16() == p0.bfloat16()).float().mean()
    assert float(same_in_bf16) > 0.9  # ... by less than a bf16 master could have stored


def test_resume_reaches_the_same_prompt(tokenizer, info, tmp_path):
    model = make_tiny("llama")
    pcfg = PromptConfig(num_tokens=4)
    cfg = TrainConfig(lr=3e-2, steps=6, eval_every=2, checkpoint_every=3, **FAST)
    full, full_hist = train_prompt(model, tokenizer, info, pcfg, cfg, out_path=tmp_path / "a.safetensors",
                                   progress=False)
    assert not checkpoint_path_for(tmp_path / "a.safetensors").exists()  # removed once the prompt is saved

    out = tmp_path / "b.safetensors"

    def interrupt(step, hist, p):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_prompt(model, tokenizer, info, pcfg, cfg, out_path=out, progress=False, callback=interrupt)
    ckpt = checkpoint_path_for(out)
    assert ckpt.exists() and not out.exists()
    # other settings refuse to resume from it
    with pytest.raises(CTPError, match="other training settings.*lr"):
        train_prompt(model, tokenizer, info, pcfg, TrainConfig(lr=1e-2, steps=6, eval_every=2, checkpoint_every=3,
                                                               **FAST), out_path=out, progress=False)
    resumed, hist = train_prompt(model, tokenizer, info, pcfg, cfg, out_path=out, progress=False)
    assert hist.resumed_from == [3] and hist.steps_done == 6
    assert torch.equal(resumed.embeddings, full.embeddings)
    timeless = lambda evals: [{k: v for k, v in e.items() if k != "seconds"} for e in evals]  # noqa: E731
    assert hist.train_loss == full_hist.train_loss and timeless(hist.evals) == timeless(full_hist.evals)
    assert torch.equal(load_prompt(out, info).embeddings, full.embeddings)


def test_activation_checkpointing_gives_the_same_gradient(tokenizer):
    for family in ("llama", "opt"):
        model = make_tiny(family)
        ids = torch.randint(0, 5000, (2, 16))
        grads, calls = [], []
        layer_attn = [m for n, m in model.named_modules() if n.endswith("self_attn")][0]
        layer_attn.register_forward_hook(lambda *a: calls.append(1))
        p0 = torch.randn(3, 64) * 0.05
        for enabled in (False, True):
            calls.clear()
            p = torch.nn.Parameter(p0.clone())
            with checkpointed_layers(model, enabled):
                token_nll(model, ids, p).mean().backward()
            grads.append(p.grad)
            assert len(calls) == (2 if enabled else 1)  # recomputed in the backward pass
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
        assert "forward" not in vars(model.get_decoder().layers[0] if family == "llama" else
                                     model.model.decoder.layers[0])


def test_non_finite_loss_stops_and_keeps_the_best_prompt(tokenizer, info, caplog):
    model = make_tiny("llama")

    def break_model(step, hist, p):
        if step == 2:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))

    cfg = TrainConfig(lr=3e-2, steps=6, eval_every=1, **FAST)
    with caplog.at_level(logging.WARNING):
        art, hist = train_prompt(model, tokenizer, info, PromptConfig(num_tokens=4), cfg, progress=False,
                                 callback=break_model)
    assert hist.stopped is not None and "non-finite" in hist.stopped
    assert "stopped early" in caplog.text
    assert torch.isfinite(art.embeddings).all() and math.isfinite(art.best_val_ppl) and art.best_step <= 2


def test_precision_fp16_on_cpu_is_an_error(tokenizer, info):
    with pytest.raises(CTPError, match="fp16"):
        train_prompt(make_tiny("llama"), tokenizer, info, PromptConfig(num_tokens=2),
                     TrainConfig(steps=1, precision="fp16", **FAST), progress=False)


def test_time_limit_stops_with_a_final_validation(tokenizer, info):
    cfg = TrainConfig(lr=1e-2, steps=50, eval_every=100, max_minutes=1e-6, **FAST)
    art, hist = train_prompt(make_tiny("llama"), tokenizer, info, PromptConfig(num_tokens=2), cfg, progress=False)
    assert hist.steps_done == 1 and "time limit" in hist.stopped
    assert [e["step"] for e in hist.evals] == [0, 1] and art.steps == 1


def test_a_callback_can_stop_the_run_with_a_final_validation(tokenizer, info):
    """A true return from the callback ends the run after that step, validated there, and it may win."""
    cfg = TrainConfig(lr=1e-2, steps=50, eval_every=100, **FAST)
    seen = []

    def stop_at_3(step, hist, p):
        seen.append(step)
        return step == 3

    art, hist = train_prompt(make_tiny("llama"), tokenizer, info, PromptConfig(num_tokens=4), cfg, progress=False,
                             callback=stop_at_3)
    assert seen == [1, 2, 3] and hist.steps_done == 3 and "stopped by the caller at step 3" in hist.stopped
    assert [e["step"] for e in hist.evals] == [0, 3] and hist.best_step in (0, 3)


def test_training_with_activation_checkpointing_matches(tokenizer, info):
    model = make_tiny("llama")
    runs = []
    for flag in (False, True):
        cfg = TrainConfig(lr=3e-2, steps=3, eval_every=3, gradient_checkpointing=flag, **FAST)
        art, hist = train_prompt(model, tokenizer, info, PromptConfig(num_tokens=3), cfg, progress=False)
        runs.append((art.embeddings, hist.train_loss))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6)
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-6)
