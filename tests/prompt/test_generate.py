"""Generation with a prompt's KV cache: the same tokens as recomputing everything, timings recorded."""

import pytest
import torch

from conftest import make_tiny
from ctp.errors import CTPError
from ctp.prompt.generate import (GenerationStats, PrefixCachedGenerator, SamplingConfig, generate, generate_uncached,
                                 pick_token)

QUESTION = "Please tell me where the city of Long Beach is located and what it is known for"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox", "opt", "gemma3_text"])
def test_cached_greedy_equals_full_recomputation(family, tokenizer):
    model = make_tiny(family)
    torch.manual_seed(1)
    k = 40  # longer than gemma's sliding window (32): the sliding cache layers are exercised too
    prompt = torch.randn(k, 64) * 0.5
    gen = PrefixCachedGenerator(model, tokenizer, prompt)
    ids = gen.encode(QUESTION)
    cfg = SamplingConfig(max_new_tokens=10, stop_at_eos=False)
    cached, stats = gen.generate_ids(ids, cfg)
    assert cached == generate_uncached(model, ids, prompt, 10)
    assert gen.generate_ids(ids, cfg)[0] == cached  # the stored prefix cache is not consumed by a request
    plain = PrefixCachedGenerator(model, tokenizer, None)
    assert plain.generate_ids(ids, cfg)[0] == generate_uncached(model, ids, None, 10)
    assert stats.prompt_tokens == k and stats.new_tokens == 10 and stats.prefix_cached
    assert stats.input_tokens == ids.numel() and stats.prefill_seconds > 0 and stats.per_token_seconds > 0


def test_cached_logits_match_full_recomputation(tokenizer):
    model = make_tiny("llama")
    prompt = torch.randn(6, 64) * 0.5
    gen = PrefixCachedGenerator(model, tokenizer, prompt)
    ids = gen.encode(QUESTION)
    import copy

    from ctp.lm import embed_inputs

    with torch.no_grad():
        out = model(input_ids=ids[None], attention_mask=torch.ones(1, 6 + ids.numel(), dtype=torch.long),
                    past_key_values=copy.deepcopy(gen._cache), use_cache=True)
        full = model(**embed_inputs(model, ids[None], prompt), use_cache=False)
    torch.testing.assert_close(out.logits[0], full.logits[0, 6:], rtol=1e-4, atol=1e-5)


def test_sampling_is_seeded_and_filters(tokenizer):
    model = make_tiny("llama")
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.5, top_p=0.9, top_k=50, seed=7, stop_at_eos=False)
    gen = PrefixCachedGenerator(model, tokenizer, torch.randn(3, 64))
    ids = gen.encode("hello")
    a, _ = gen.generate_ids(ids, cfg)
    assert gen.generate_ids(ids, cfg)[0] == a
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    picks = {pick_token(logits, SamplingConfig(temperature=1.0, top_p=0.5), g) for _ in range(50)}
    assert picks == {0}  # nucleus of mass 0.5 is the top token alone
    picks = {pick_token(logits, SamplingConfig(temperature=5.0, top_k=2), g) for _ in range(200)}
    assert picks == {0, 1}
    assert pick_token(logits, SamplingConfig(), None) == 0


def test_generate_returns_text_and_validates(tokenizer):
    model = make_tiny("llama")
    text = generate(model, tokenizer, "The sky is", prompt=torch.randn(4, 64), max_new_tokens=5)
    assert isinstance(text, str)
    with pytest.raises(CTPError, match="hidden size"):
        PrefixCachedGenerator(model, tokenizer, torch.randn(4, 32))
    with pytest.raises(CTPError, match="empty"):
        PrefixCachedGenerator(model, tokenizer).generate("")
    with pytest.raises(CTPError):
        SamplingConfig(top_p=0)
    d = GenerationStats(3, 4, 5, 0.1, True, 0.2, 0.4).to_dict()
    assert d["per_token_seconds"] == pytest.approx(0.1) and d["total_seconds"] == pytest.approx(0.6)


def test_prompt_embeds_for_serving_continue_like_ctp(tokenizer):
    """The (k + T, hidden) tensor a serving engine's prompt_embeds input takes gives ctp's own continuation."""
    from ctp.prompt.embed import prompt_embeds

    model = make_tiny("llama")
    prompt = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    text = "Where is Long Beach?"
    e = prompt_embeds(model, tokenizer, prompt, text)
    T = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert e.shape == (4 + T, 64) and torch.equal(e[:4], prompt)
    ours = PrefixCachedGenerator(model, tokenizer, prompt).generate(text, SamplingConfig(max_new_tokens=6,
                                                                                         stop_at_eos=False)).token_ids
    theirs = model.generate(inputs_embeds=e[None], attention_mask=torch.ones(1, 4 + T, dtype=torch.long),
                            max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist()
    assert theirs[-6:] == ours
    with pytest.raises(CTPError, match="prefix"):
        prompt_embeds(model, tokenizer, torch.zeros(2, 2, 2, 4, 16), text)
