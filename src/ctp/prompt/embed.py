"""Feeding a prompt (soft or hard) to a model through ``inputs_embeds``.

A prompt here is always a tensor of shape (k, hidden) in the space of the
model's input-embedding module output (what ``model.get_input_embeddings()(ids)``
returns, scale included for families that scale embeddings). A soft prompt is a
learned such tensor; a hard prompt is the embedding of a fixed text. Everything
that accepts one accepts the other.
"""

from __future__ import annotations

import torch
from torch import nn

# The hand-written prompt of the paper (Figure 1), shipped as a built-in alternative.
HARD_PROMPT_TEXT = (
    "Please carefully examine the weight matrix within the model, as it may contain errors. "
    "It is crucial to verify its accuracy and make any necessary adjustments to ensure optimal performance."
)

IGNORE_INDEX = -100


def hard_prompt_ids(tokenizer, text: str = HARD_PROMPT_TEXT) -> torch.Tensor:
    """Token ids of a hard prompt (no special tokens), shape (k,)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def hard_prompt(model: nn.Module, tokenizer, text: str = HARD_PROMPT_TEXT) -> torch.Tensor:
    """The hard prompt as an embedding tensor of shape (k, hidden), fp32."""
    emb = model.get_input_embeddings()
    ids = hard_prompt_ids(tokenizer, text).to(emb.weight.device)
    return emb(ids).float()


def prompt_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Model keyword arguments for ``input_ids`` (B, T) with ``prompt`` (k, hidden) prepended.

    Returns ``inputs_embeds`` (B, k+T, hidden) in the model's dtype and an
    ``attention_mask`` (B, k+T) whose prompt columns are ones. Gradients flow into
    ``prompt`` (the prompt is cast, not detached), so the same function serves
    training and evaluation. Without a prompt the embeddings of ``input_ids``
    are returned alone.
    """
    emb = model.get_input_embeddings()
    tok = emb(input_ids)  # (B, T, hidden)
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
    if prompt is None:
        return {"inputs_embeds": tok, "attention_mask": attention_mask}
    k = prompt.shape[0]
    p = prompt.to(device=tok.device, dtype=tok.dtype).unsqueeze(0).expand(B, k, -1)  # (B, k, hidden)
    ones = torch.ones(B, k, dtype=attention_mask.dtype, device=attention_mask.device)
    return {
        "inputs_embeds": torch.cat([p, tok], dim=1),  # (B, k+T, hidden)
        "attention_mask": torch.cat([ones, attention_mask], dim=1),  # (B, k+T)
    }


def text_logits(logits: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Drop the prompt positions from (B, k+T, V) logits, giving (B, T, V)."""
    return logits[:, prompt_len:, :]


def token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token negative log-likelihood of ``input_ids[:, 1:]`` given the prefix (and prompt).

    Shape (B, T-1), fp32. The first text token is never scored, with or without
    a prompt, so both settings score exactly the same tokens. Positions where
    ``attention_mask`` is 0 get NLL 0.
    """
    k = 0 if prompt is None else prompt.shape[0]
    out = model(**prompt_inputs(model, input_ids, prompt, attention_mask), use_cache=False)
    logits = text_logits(out.logits, k)[:, :-1, :].float()  # (B, T-1, V): predictions of tokens 1..T-1
    targets = input_ids[:, 1:]  # (B, T-1)
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    nll = nll.view_as(targets)
    if attention_mask is not None:
        nll = nll * attention_mask[:, 1:].to(nll.dtype)
    return nll
