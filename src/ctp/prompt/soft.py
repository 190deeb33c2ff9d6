"""A learned prompt's shape and start: soft (k input embeddings) or prefix (k keys/values per layer).

A soft prompt lives in the output space of the model's input-embedding module
(``model.get_input_embeddings()(ids)``), so families that scale their
embeddings (Gemma) get prompts of the right scale from every initialisation.
Following Lester et al. and the paper (section 4.2), the default start is k
rows sampled from the vocabulary embedding; a text's embedding and Gaussian
noise with the embedding's spread are the alternatives. The prompt is always
an fp32 tensor of shape (k, hidden), whatever the model's dtype.

A prefix (see :mod:`ctp.lm`) starts from the model's own keys and values of
the same k tokens (vocabulary sample or text), so at step 0 it equals that
hard prompt; a random prefix draws each layer's keys and values from a normal
distribution with that layer's spread. Random starts are far worse for
prefixes (PEFT's default starts worse than no prompt at all), so ``vocab``
stays the default for both kinds.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ctp.errors import CTPError, check_field_types, require
from ctp.lm import KINDS, PREFIX, cache_of_tokens

MAX_PROMPT_TOKENS = 4096


class PromptInit(str, enum.Enum):
    """How a soft prompt starts."""

    VOCAB = "vocab"  # rows of the vocabulary embedding, sampled uniformly (the paper's default)
    TEXT = "text"  # the embedding of a text, repeated or cropped to k tokens
    RANDOM = "random"  # normal noise with the embedding output's standard deviation


@dataclass
class PromptConfig:
    """Kind, shape and initialisation of a prompt."""

    num_tokens: int = 100  # k, the paper's default
    kind: str = "soft"  # soft (the paper: input embeddings) | prefix (keys and values of every layer)
    init: PromptInit = PromptInit.VOCAB
    init_text: str | None = None  # needed by init=TEXT
    seed: int = 0  # seeds the vocabulary sample and the random init

    def __post_init__(self):
        check_field_types(self)
        try:
            self.init = PromptInit(self.init.value if isinstance(self.init, PromptInit) else str(self.init).lower())
        except ValueError:
            raise CTPError(f"unknown prompt init '{self.init}'",
                           f"use one of {', '.join(i.value for i in PromptInit)}") from None
        self.kind = str(self.kind).lower()
        require(self.kind in KINDS, f"unknown prompt kind '{self.kind}'", f"use one of {', '.join(KINDS)}")
        require(isinstance(self.num_tokens, int) and 1 <= self.num_tokens <= MAX_PROMPT_TOKENS,
                f"prompt length {self.num_tokens} is out of range",
                f"use between 1 and {MAX_PROMPT_TOKENS} tokens (the paper uses 100)")
        require(isinstance(self.seed, int) and self.seed >= 0, f"seed {self.seed} must be a non-negative integer",
                "pass --seed 0 or another non-negative integer")
        if self.init is PromptInit.TEXT:
            require(bool(self.init_text and self.init_text.strip()), "init 'text' needs a text to start from",
                    "pass --init-text 'some words' or use --init vocab")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["init"] = self.init.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PromptConfig:
        return cls(**{k: d[k] for k in ("num_tokens", "kind", "init", "init_text", "seed") if k in d})


def _sampleable_ids(tokenizer, vocab_rows: int) -> torch.Tensor:
    """Token ids worth sampling: ids the tokenizer can produce, minus special tokens (no padding rows)."""
    n = min(vocab_rows, len(tokenizer)) if tokenizer is not None else vocab_rows
    keep = torch.ones(n, dtype=torch.bool)
    if tokenizer is not None:
        special = [i for i in (tokenizer.all_special_ids or []) if 0 <= i < n]
        keep[special] = False
    ids = torch.nonzero(keep).flatten()
    require(ids.numel() > 0, "the vocabulary has no ordinary tokens to sample", "use --init random")
    return ids


def _start_ids(tokenizer, cfg: PromptConfig, vocab_rows: int, gen: torch.Generator) -> torch.Tensor:
    """The k token ids a vocab or text start uses, shape (k,)."""
    k = cfg.num_tokens
    if cfg.init is PromptInit.TEXT:
        ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
        require(len(ids) > 0, f"init text {cfg.init_text!r} has no tokens", "pass a non-empty --init-text")
        reps = -(-k // len(ids))  # ceil(k / len)
        return torch.tensor(ids * reps, dtype=torch.long)[:k]  # (k,)
    pool = _sampleable_ids(tokenizer, vocab_rows)
    return pool[torch.randint(0, pool.numel(), (k,), generator=gen)]  # (k,)


@torch.no_grad()
def init_prompt(model: nn.Module, tokenizer, cfg: PromptConfig, lead: list[int] | None = None) -> torch.Tensor:
    """The starting prompt, fp32, on the embedding's device: (k, hidden) soft, (2, L, H, k, D) prefix.

    With ``lead`` (the tokenizer's BOS, :func:`ctp.data.corpora.leading_ids`) the
    prompt takes the BOS's place (see :mod:`ctp.lm`): its first ``len(lead)``
    positions start as the BOS's own embedding or keys and values, whatever the
    init, and the other k - len(lead) start as ``cfg.init`` says.
    """
    emb = model.get_input_embeddings()
    device = emb.weight.device
    lead = torch.tensor(list(lead or []), dtype=torch.long)
    n = lead.numel()
    require(cfg.num_tokens > n, f"a prompt of {cfg.num_tokens} tokens has no room after the model's {n} leading "
            f"token(s), whose place it takes", f"use at least {n + 1} tokens")
    k = cfg.num_tokens - n
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.init is not PromptInit.RANDOM:
        ids = torch.cat([lead, _start_ids(tokenizer, dataclasses.replace(cfg, num_tokens=k),
                                          emb.weight.shape[0], gen)])  # (n + k,)
        if cfg.kind == PREFIX:
            return cache_of_tokens(model, ids).clone()
        return emb(ids.to(device)).float().clone()
    pool = _sampleable_ids(tokenizer, emb.weight.shape[0])
    probe = pool[torch.randint(0, pool.numel(), (min(4096, pool.numel()),), generator=gen)]
    if cfg.kind == PREFIX:
        # each layer's keys and values: N(0, std of that layer's keys/values over 256 sampled tokens)
        real = cache_of_tokens(model, probe[:256])  # (2, L, H, 256, D)
        std = real.std(dim=(2, 3, 4), keepdim=True).cpu()  # (2, L, 1, 1, 1)
        shape = (2, real.shape[1], real.shape[2], k, real.shape[4])
        noise = (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(device)
        return torch.cat([cache_of_tokens(model, lead), noise], dim=3) if n else noise
    # RANDOM soft: N(0, std) where std is the spread of embedding outputs over a sample of the vocabulary
    std = float(emb(probe.to(device)).float().std())
    noise = (torch.randn(k, emb.weight.shape[1], generator=gen, dtype=torch.float32) * std).to(device)  # (k, hidden)
    return torch.cat([emb(lead.to(device)).float(), noise]) if n else noise
