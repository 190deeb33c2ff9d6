"""The paper's hard prompt: a fixed text, given to the model as its embeddings.

A hard prompt is a tensor of shape (k, hidden) in the space of the model's
input-embedding module output (what ``model.get_input_embeddings()(ids)``
returns, scale included for families that scale embeddings), so everything
that accepts a soft prompt accepts it (see :mod:`ctp.lm`).
"""

from __future__ import annotations

import torch
from torch import nn

# The hand-written prompt of the paper (Figure 1), shipped as a built-in alternative.
HARD_PROMPT_TEXT = (
    "Please carefully examine the weight matrix within the model, as it may contain errors. "
    "It is crucial to verify its accuracy and make any necessary adjustments to ensure optimal performance."
)


def hard_prompt_ids(tokenizer, text: str = HARD_PROMPT_TEXT) -> torch.Tensor:
    """Token ids of a hard prompt (no special tokens), shape (k,)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def hard_prompt(model: nn.Module, tokenizer, text: str = HARD_PROMPT_TEXT) -> torch.Tensor:
    """The hard prompt as an embedding tensor of shape (k, hidden), fp32.

    Where the tokenizer starts texts with a BOS the prompt begins with it, as every
    prompt takes the BOS's place (see :mod:`ctp.lm`): the model reads ``<bos>``, the
    prompt's text, then the text without its own ``<bos>``.
    """
    from ctp.data.corpora import leading_ids

    emb = model.get_input_embeddings()
    ids = torch.cat([torch.tensor(leading_ids(tokenizer), dtype=torch.long), hard_prompt_ids(tokenizer, text)])
    return emb(ids.to(emb.weight.device)).float()


@torch.no_grad()
def prompt_embeds(model: nn.Module, tokenizer, prompt: torch.Tensor, text: str) -> torch.Tensor:
    """What a serving engine's ``prompt_embeds`` input takes: a soft ``prompt`` (k, hidden) followed by the
    embeddings of ``text``, shape (k + T, hidden), in the model's dtype, on the CPU.

    vLLM (``LLM(..., enable_prompt_embeds=True).generate({"prompt_embeds": e})``) and transformers
    (``model.generate(inputs_embeds=e[None])``) then continue the text as ctp does with the prompt.
    A prefix prompt enters through the KV cache, not the input: serve it as a PEFT adapter.
    """
    from ctp.errors import require
    from ctp.lm import embed_inputs, prompt_kind

    require(prompt_kind(prompt) == "soft", "a prefix prompt has no input embeddings",
            "serve a prefix as a PEFT adapter (train-prompt --peft-dir)")
    device = model.get_input_embeddings().weight.device
    ids = hard_prompt_ids(tokenizer, text).to(device).unsqueeze(0)  # (1, T), no special tokens as in training
    return embed_inputs(model, ids, prompt)["inputs_embeds"][0].cpu()  # (k + T, hidden)
