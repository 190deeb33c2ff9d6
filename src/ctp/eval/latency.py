"""Latency cost of prompt tokens (the paper's appendix A.4), with and without prefix caching.

For a context of ``context_len`` tokens and a prompt of k embeddings we time:

* ``prefill``: one forward over prompt + context (no prefix cache: the prompt is
  recomputed for every request);
* ``prefill_cached``: one forward over the context alone, starting from a copy of
  the prompt's keys and values computed once (prefix caching);
* ``per_token``: the mean time of one greedy decoding step with the KV cache
  (prompt + context + generated tokens already cached).

Each number is the median over ``repeats`` runs after ``warmup`` runs.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ctp.lm import prefix_cache as build_prefix_cache, prompt_inputs, prompt_length


@dataclass
class LatencyResult:
    prompt_tokens: int
    context_len: int
    new_tokens: int
    prefill_s: float
    prefill_cached_s: float
    per_token_s: float
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    prompt: torch.Tensor | None,
    context_len: int = 256,
    new_tokens: int = 16,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> LatencyResult:
    """Time prefill (with and without a cached prompt prefix) and per-token decoding."""
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, vocab, (1, context_len), generator=gen).to(device)  # (1, L)
    k = prompt_length(prompt)

    def prefill_full():  # a soft prompt's k positions computed with the context (a prefix has none to compute)
        return model(**prompt_inputs(model, ctx, prompt)[0], use_cache=True)

    prefix_cache = build_prefix_cache(model, prompt)

    def prefill_cached():
        if prefix_cache is None:
            return model(input_ids=ctx, use_cache=True)
        cache = copy.deepcopy(prefix_cache)
        mask = torch.ones(1, k + context_len, dtype=torch.long, device=device)
        return model(input_ids=ctx, attention_mask=mask, past_key_values=cache, use_cache=True)

    prefill_s = _timed(prefill_full, device, repeats, warmup)
    prefill_cached_s = _timed(prefill_cached, device, repeats, warmup)

    def decode():
        out = prefill_cached()
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)  # (1, 1)
        length = k + context_len
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            length += 1
            mask = torch.ones(1, length, dtype=torch.long, device=device)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        return (time.perf_counter() - t0) / new_tokens

    per_token = statistics.median(decode() for _ in range(max(1, repeats)))
    return LatencyResult(k, context_len, new_tokens, prefill_s, prefill_cached_s, per_token, str(device))
