"""Soft-prompt configuration and initialisation."""

import pytest
import torch

from conftest import make_tiny
from ctp.errors import CTPError
from ctp.prompt.soft import PromptConfig, PromptInit, init_prompt


def test_config_validates_and_round_trips():
    cfg = PromptConfig(num_tokens=7, init="TEXT", init_text="hello")
    assert cfg.init is PromptInit.TEXT
    assert PromptConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(CTPError, match="prompt length"):
        PromptConfig(num_tokens=0)
    with pytest.raises(CTPError, match="unknown prompt init"):
        PromptConfig(init="zeros")
    with pytest.raises(CTPError, match="needs a text"):
        PromptConfig(init="text")
    with pytest.raises(CTPError, match="seed"):
        PromptConfig(seed=-1)


def test_vocab_init_uses_embedding_rows_deterministically(tokenizer):
    model = make_tiny("llama")
    cfg = PromptConfig(num_tokens=12, seed=3)
    p = init_prompt(model, tokenizer, cfg)
    assert p.shape == (12, 64) and p.dtype == torch.float32 and not p.requires_grad
    torch.testing.assert_close(p, init_prompt(model, tokenizer, cfg), rtol=0, atol=0)
    w = model.get_input_embeddings().weight
    # every row is an embedding row of an ordinary (non-special) token
    dist = torch.cdist(p, w)  # (12, V)
    rows = dist.argmin(1)
    assert torch.equal(p, w[rows].detach())
    assert not set(rows.tolist()) & set(tokenizer.all_special_ids)
    assert not torch.equal(p, init_prompt(model, tokenizer, PromptConfig(num_tokens=12, seed=4)))


def test_text_init_repeats_and_crops(tokenizer):
    model = make_tiny("llama")
    ids = tokenizer("one two three", add_special_tokens=False)["input_ids"]
    p = init_prompt(model, tokenizer, PromptConfig(num_tokens=len(ids) * 2 + 1, init="text", init_text="one two three"))
    w = model.get_input_embeddings().weight
    expect = w[torch.tensor((ids * 3)[: len(ids) * 2 + 1])]
    torch.testing.assert_close(p, expect)


def test_random_init_matches_embedding_spread(tokenizer):
    model = make_tiny("llama")
    p = init_prompt(model, tokenizer, PromptConfig(num_tokens=200, init="random"))
    std = float(model.get_input_embeddings().weight.detach().std())
    assert p.shape == (200, 64) and abs(float(p.std()) / std - 1) < 0.2


def test_scaled_embedding_families_get_scaled_prompts(tokenizer):
    """Gemma multiplies embeddings by sqrt(hidden): the prompt must live in that output space."""
    model = make_tiny("gemma3_text")
    emb = model.get_input_embeddings()
    p = init_prompt(model, tokenizer, PromptConfig(num_tokens=5, init="text", init_text="hello there friend"))
    ids = tokenizer("hello there friend", add_special_tokens=False)["input_ids"]
    ref = emb(torch.tensor((ids * 5)[:5]))
    torch.testing.assert_close(p, ref.float())
    assert not torch.allclose(p, emb.weight[torch.tensor((ids * 5)[:5])])  # the raw rows differ by the scale
