"""Prefix prompts (keys/values in every layer) and the distillation objective, on tiny models of every family."""

import pytest
import torch

from conftest import TINY_CONFIGS, make_tiny
from ctp.errors import CTPError
from ctp.eval.zeroshot import score_token_requests
from ctp.lm import cache_of_tokens, check_prompt, prompt_kind, prompt_length, text_logits, token_kl, token_nll
from ctp.models.load import ModelInfo, tokenizer_fingerprint
from ctp.prompt.artifact import artifact_for, export_peft, import_peft, load_prompt, save_prompt
from ctp.prompt.generate import PrefixCachedGenerator, SamplingConfig, generate_uncached
from ctp.prompt.soft import PromptConfig, init_prompt
from ctp.prompt.train import TrainConfig, train_prompt

FAST = dict(seqlen=32, batch_size=2, eval_windows=2, warmup_steps=0)


def _info(tokenizer, layers=2):
    return ModelInfo(spec="tiny-llama", path="memory", model_type="llama", hidden_size=64, vocab_size=49152,
                     num_layers=layers, tokenizer_hash=tokenizer_fingerprint(tokenizer))


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_prefix_from_tokens_equals_the_hard_prompt_and_takes_gradients(family):
    """A prefix made of the model's own cache of k tokens gives the logits of those k tokens put in front."""
    model = make_tiny(family)
    hard = torch.randint(0, 1000, (5,), generator=torch.Generator().manual_seed(1))
    text = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(2))
    kv = cache_of_tokens(model, hard)
    assert prompt_kind(kv) == "prefix" and prompt_length(kv) == 5 and kv.dtype == torch.float32
    check_prompt(model, kv)
    with torch.no_grad():
        ours = text_logits(model, text, kv)  # (2, 7, V)
        ref = model(input_ids=torch.cat([hard.expand(2, -1), text], 1)).logits[:, 5:]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    model.requires_grad_(False)
    p = kv.clone().requires_grad_(True)
    token_nll(model, text, p).mean().backward()
    assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_prefix_of_another_shape_is_refused():
    model = make_tiny("llama")
    kv = cache_of_tokens(make_tiny("gpt2"), torch.arange(3))  # 4 kv heads, llama has 2
    with pytest.raises(CTPError, match="kv heads"):
        check_prompt(model, kv)


def test_prefix_init_modes(tokenizer):
    model = make_tiny("llama")
    vocab = init_prompt(model, tokenizer, PromptConfig(num_tokens=6, kind="prefix", seed=3))
    assert vocab.shape == (2, 2, 2, 6, 16)
    assert torch.equal(vocab, init_prompt(model, tokenizer, PromptConfig(num_tokens=6, kind="prefix", seed=3)))
    text = init_prompt(model, tokenizer, PromptConfig(num_tokens=4, kind="prefix", init="text", init_text="hello world"))
    ids = torch.tensor(tokenizer("hello world", add_special_tokens=False)["input_ids"] * 4)[:4]
    torch.testing.assert_close(text, cache_of_tokens(model, ids))
    rand = init_prompt(model, tokenizer, PromptConfig(num_tokens=6, kind="prefix", init="random"))
    assert rand.shape == vocab.shape and torch.isfinite(rand).all()
    ratio = rand[1].std() / vocab[1].std()  # values of random start have the spread of real values
    assert 0.3 < float(ratio) < 3
    with pytest.raises(CTPError, match="kind"):
        PromptConfig(kind="lora")


def test_prefix_training_lowers_loss_saves_and_loads(tokenizer, tmp_path):
    model = make_tiny("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    pcfg = PromptConfig(num_tokens=4, kind="prefix")
    out = tmp_path / "prefix.safetensors"
    art, hist = train_prompt(model, tokenizer, _info(tokenizer), pcfg, TrainConfig(steps=12, lr=3e-2, eval_every=6,
                             **FAST), out_path=out, progress=False)
    assert art.kind == "prefix" and art.embeddings.shape == (2, 2, 2, 4, 16)
    assert hist.train_loss[-1] < hist.train_loss[0]
    assert hist.best_val_ppl <= hist.evals[0]["val_ppl"]
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the base stays frozen
    back = load_prompt(out, _info(tokenizer))
    assert back.kind == "prefix" and torch.equal(back.embeddings, art.embeddings)
    with pytest.raises(CTPError, match="prefix for 2 layers"):
        load_prompt(out, _info(tokenizer, layers=3))


def test_prefix_peft_round_trip_gives_identical_logits(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    model = make_tiny("llama")
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    kv = init_prompt(model, tokenizer, PromptConfig(num_tokens=3, kind="prefix")) + 0.01  # not any real cache
    art = artifact_for(model, _info(tokenizer), kv)
    export_peft(art, tmp_path / "peft")
    back = import_peft(tmp_path / "peft")
    assert back.kind == "prefix" and torch.equal(back.embeddings, art.embeddings)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (2, 9, V)
        ours = text_logits(model, ids, kv)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    pm.save_pretrained(tmp_path / "resaved")  # PEFT's own file, without ctp's metadata, reads back the same
    assert torch.equal(import_peft(tmp_path / "resaved").embeddings, kv)


def test_prefix_in_zero_shot_and_generation_matches_recomputation(tokenizer):
    model = make_tiny("llama")
    kv = cache_of_tokens(model, torch.arange(10, 14)) * 1.1
    reqs = [([5, 6, 7], [8, 9]), ([5, 6], [11]), ([1, 2, 3, 4], [3])]
    cached = score_token_requests(model, reqs, kv, batch_size=2, max_length=64, prefix_cache=True)
    plain = score_token_requests(model, reqs, kv, batch_size=2, max_length=64, prefix_cache=False)
    assert cached == pytest.approx(plain, abs=1e-4)
    ids = torch.tensor(tokenizer("The capital of France", add_special_tokens=False)["input_ids"])
    gen = PrefixCachedGenerator(model, tokenizer, kv)
    new, stats = gen.generate_ids(ids, SamplingConfig(max_new_tokens=6, stop_at_eos=False))
    assert new == generate_uncached(model, ids, kv, 6) and stats.prompt_tokens == 4


def test_kd_objective(tokenizer):
    model = make_tiny("llama")
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    from ctp.lm import teacher_logprobs

    kl, nll = token_kl(model, ids, teacher_logprobs(model, ids))  # the model is its own teacher: KL 0
    assert kl.shape == (2, 11) and float(kl.abs().max()) < 1e-5
    torch.testing.assert_close(nll, token_nll(model, ids), rtol=1e-5, atol=1e-5)
    teacher = make_tiny("llama", seed=1)
    with pytest.raises(CTPError, match="teacher"):
        train_prompt(model, tokenizer, _info(tokenizer), PromptConfig(num_tokens=4),
                     TrainConfig(steps=1, objective="kd", **FAST), progress=False)
    art, hist = train_prompt(model, tokenizer, _info(tokenizer), PromptConfig(num_tokens=4, kind="prefix"),
                             TrainConfig(steps=12, lr=3e-2, eval_every=12, objective="kd", **FAST),
                             progress=False, teacher=teacher)
    assert hist.train_loss[-1] < hist.train_loss[0]  # the KL to the other model falls
    assert art.train_config["objective"] == "kd"
    with pytest.raises(CTPError, match="objective"):
        TrainConfig(objective="mse")
    with pytest.raises(CTPError, match="kd_weight"):
        TrainConfig(objective="mix", kd_weight=1.5)


def test_soft_prompt_file_loads_as_before(tokenizer, tmp_path):
    """Files without a 'kind' (written before prefixes existed) load as soft prompts."""
    model = make_tiny("llama")
    art = artifact_for(model, _info(tokenizer), torch.randn(3, 64))
    save_prompt(tmp_path / "p.safetensors", art)
    back = load_prompt(tmp_path / "p.safetensors", _info(tokenizer))
    assert back.kind == "soft" and back.num_tokens == 3


def test_prefix_kd_training_resumes_exactly(tokenizer, tmp_path):
    from ctp.prompt.train import checkpoint_path_for

    model, teacher = make_tiny("llama"), make_tiny("llama", seed=1)
    pcfg = PromptConfig(num_tokens=3, kind="prefix")
    cfg = TrainConfig(lr=3e-2, steps=6, eval_every=3, checkpoint_every=3, objective="mix", **FAST)
    full, _ = train_prompt(model, tokenizer, _info(tokenizer), pcfg, cfg, out_path=tmp_path / "a.safetensors",
                           progress=False, teacher=teacher)

    def interrupt(step, hist, p):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train_prompt(model, tokenizer, _info(tokenizer), pcfg, cfg, out_path=out, progress=False, teacher=teacher,
                     callback=interrupt)
    assert checkpoint_path_for(out).exists()
    with pytest.raises(CTPError, match="prompt settings"):  # a soft prompt cannot resume a prefix's checkpoint
        train_prompt(model, tokenizer, _info(tokenizer), PromptConfig(num_tokens=3), cfg, out_path=out,
                     progress=False, teacher=teacher)
    resumed, hist = train_prompt(model, tokenizer, _info(tokenizer), pcfg, cfg, out_path=out, progress=False,
                                 teacher=teacher)
    assert hist.resumed_from == [3] and torch.equal(resumed.embeddings, full.embeddings)
