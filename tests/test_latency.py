import copy

import torch

from conftest import make_tiny
from ctp.eval.latency import measure_latency
from ctp.lm import embed_inputs


def test_prefix_cache_gives_the_same_logits_as_recomputing_the_prompt():
    model = make_tiny("llama")
    prompt = torch.randn(6, 64) * 0.05
    ctx = torch.randint(0, 3000, (1, 20))
    with torch.no_grad():
        full = model(**embed_inputs(model, ctx, prompt), use_cache=True).logits[:, 6:]
        prefix = model(inputs_embeds=prompt.unsqueeze(0), use_cache=True).past_key_values
        mask = torch.ones(1, 26, dtype=torch.long)
        cached = model(input_ids=ctx, attention_mask=mask, past_key_values=copy.deepcopy(prefix)).logits
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_latency_fields():
    model = make_tiny("llama")
    r = measure_latency(model, torch.randn(4, 64) * 0.05, context_len=16, new_tokens=3, repeats=1, warmup=0)
    assert r.prompt_tokens == 4 and r.context_len == 16 and r.new_tokens == 3
    assert r.prefill_s > 0 and r.prefill_cached_s > 0 and r.per_token_s > 0
