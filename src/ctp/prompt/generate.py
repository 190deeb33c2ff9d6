"""Text generation with a soft or hard prompt, keeping the KV cache.

The paper's released code feeds the prompt through ``inputs_embeds`` and so
drops the KV cache, recomputing the whole sequence for every new token. Here
the prompt's keys and values are computed once (one forward over the k prompt
embeddings with ``use_cache=True``); every request starts from a copy of that
cache and only prefills its own tokens, then decodes one token per forward.
The result is the same token sequence a full recomputation gives (tested).

:class:`GenerationStats` records the one-time prefix cost, the prefill time
and the per-token decode time, for latency measurements.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ctp.data.corpora import leading_ids
from ctp.errors import require
from ctp.models.adapter import check_positions, forward_accepts
from ctp.lm import check_prompt, prefix_cache, prompt_inputs, prompt_length


@dataclass
class SamplingConfig:
    """How to pick tokens. ``temperature`` 0 is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self):
        require(self.max_new_tokens >= 1, f"max_new_tokens {self.max_new_tokens} must be at least 1",
                "pass --max-new-tokens 1 or more")
        require(self.temperature >= 0 and math.isfinite(self.temperature),
                f"temperature {self.temperature} must be >= 0", "pass 0 for greedy decoding")
        require(0 < self.top_p <= 1, f"top_p {self.top_p} must be in (0, 1]", "pass --top-p 0.9 or 1")
        require(self.top_k >= 0, f"top_k {self.top_k} must be >= 0", "pass 0 to disable it")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationStats:
    """Timings and sizes of one generation (seconds, wall clock)."""

    prompt_tokens: int  # k (0 without a prompt)
    input_tokens: int  # tokens of the request
    new_tokens: int
    prefix_seconds: float  # computing the prompt's KV cache (paid once per generator)
    prefix_cached: bool  # True: the request reused the prompt's cache instead of recomputing it
    prefill_seconds: float  # the request's own tokens, first new token included
    decode_seconds: float  # the remaining new tokens

    @property
    def per_token_seconds(self) -> float:
        """Mean decode time per token after the first."""
        return self.decode_seconds / max(1, self.new_tokens - 1)

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_token_seconds"] = self.per_token_seconds
        d["total_seconds"] = self.total_seconds
        return d


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: GenerationStats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


def pick_token(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> int:
    """One token from next-token ``logits`` (V,): argmax when greedy, else temperature / top-k / top-p sampling."""
    if cfg.greedy:
        return int(torch.argmax(logits))
    logits = logits.float().cpu() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if cfg.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= cfg.top_p  # keep the smallest prefix reaching top_p
        logits[order[drop]] = -math.inf
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


class PrefixCachedGenerator:
    """Generates continuations after a fixed prompt whose KV cache is computed once and reused.

    ``prompt`` is a soft prompt (k, hidden) (or :func:`ctp.prompt.embed.hard_prompt`), a prefix
    (2, layers, kv_heads, k, head_dim) or None (see :mod:`ctp.lm`). Without a prompt, text starts with the
    tokenizer's leading token, if it adds one by default (:func:`ctp.data.corpora.leading_ids`: Gemma's
    ``<bos>``), as the windows perplexity is measured on do; a prompt takes that token's place, as in training,
    so the text follows it directly. ``add_special_tokens=False`` leaves the token out in any case.
    """

    def __init__(self, model: nn.Module, tokenizer, prompt: torch.Tensor | None = None,
                 add_special_tokens: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        self._lead = leading_ids(tokenizer) if add_special_tokens and prompt is None else []
        self._last_only = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
        emb = model.get_input_embeddings()
        self.device = emb.weight.device
        self.prompt_tokens = prompt_length(prompt)
        self.eos = eos_ids(model, tokenizer)
        check_prompt(model, prompt)
        _sync(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            self._cache = prefix_cache(model, prompt)  # soft: one forward over the k embeddings; prefix: itself
        _sync(self.device)
        self.prefix_seconds = time.perf_counter() - t0 if prompt is not None else 0.0

    def encode(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        require(len(ids) > 0, "the text to continue is empty", "pass a non-empty question")
        return torch.tensor(self._lead + list(ids), dtype=torch.long)

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, cfg: SamplingConfig | None = None) -> tuple[list[int], GenerationStats]:
        """New token ids after ``input_ids`` (T,), and timings."""
        cfg = cfg or SamplingConfig()
        require(input_ids.dim() == 1 and input_ids.numel() > 0, "the input must be a non-empty 1-D id tensor",
                "pass token ids of shape (T,)")
        model, dev = self.model, self.device
        total = self.prompt_tokens + int(input_ids.numel()) + cfg.max_new_tokens
        check_positions(model, total, f"prompt ({self.prompt_tokens}) + question ({input_ids.numel()}) + "
                        f"new tokens ({cfg.max_new_tokens})", "pass a smaller --max-new-tokens")
        gen = None if cfg.greedy else torch.Generator().manual_seed(cfg.seed)
        cache = copy.deepcopy(self._cache) if self._cache is not None else None
        ids = input_ids.to(dev).unsqueeze(0)  # (1, T)
        length = self.prompt_tokens + ids.shape[1]
        new: list[int] = []

        _sync(dev)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=torch.ones(1, length, dtype=torch.long, device=dev),
                    past_key_values=cache, use_cache=True, **self._last_only)  # only the next token's logits
        tok = pick_token(out.logits[0, -1], cfg, gen)
        new.append(tok)
        _sync(dev)
        t1 = time.perf_counter()
        cache = out.past_key_values
        while len(new) < cfg.max_new_tokens and not (cfg.stop_at_eos and tok in self.eos):
            length += 1
            out = model(input_ids=torch.tensor([[tok]], device=dev),
                        attention_mask=torch.ones(1, length, dtype=torch.long, device=dev),
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tok = pick_token(out.logits[0, -1], cfg, gen)
            new.append(tok)
        _sync(dev)
        t2 = time.perf_counter()
        stats = GenerationStats(prompt_tokens=self.prompt_tokens, input_tokens=int(input_ids.numel()),
                                new_tokens=len(new), prefix_seconds=self.prefix_seconds,
                                prefix_cached=self._cache is not None, prefill_seconds=t1 - t0,
                                decode_seconds=t2 - t1)
        return new, stats

    def generate(self, text: str, cfg: SamplingConfig | None = None) -> Generation:
        """The continuation of ``text`` as a string, its token ids and timings."""
        new, stats = self.generate_ids(self.encode(text), cfg)
        shown = [t for t in new if t not in self.eos]
        return Generation(self.tokenizer.decode(shown, skip_special_tokens=True), new, stats)


def generate(model: nn.Module, tokenizer, text: str, prompt: torch.Tensor | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int = 0, stop_at_eos: bool = True) -> str:
    """Continue ``text`` after ``prompt`` (soft, hard or None) with the KV cache; the new text."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         seed=seed, stop_at_eos=stop_at_eos)
    return PrefixCachedGenerator(model, tokenizer, prompt).generate(text, cfg).text


@torch.no_grad()
def generate_uncached(model: nn.Module, input_ids: torch.Tensor, prompt: torch.Tensor | None = None,
                      max_new_tokens: int = 16, eos: set[int] | None = None) -> list[int]:
    """Greedy reference: recompute the whole (prompt + text) sequence for every new token, no cache."""
    device = model.get_input_embeddings().weight.device
    ids = input_ids.to(device).unsqueeze(0)  # (1, T)
    new: list[int] = []
    for _ in range(max_new_tokens):
        kwargs, _ = prompt_inputs(model, ids, prompt)
        logits = model(**kwargs, use_cache="past_key_values" in kwargs).logits  # (1, k+T or T, V)
        tok = int(torch.argmax(logits[0, -1]))
        new.append(tok)
        if eos and tok in eos:
            break
        ids = torch.cat([ids, torch.tensor([[tok]], device=device)], dim=1)
    return new
