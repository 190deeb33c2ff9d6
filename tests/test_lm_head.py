"""The fused LM head + loss (ctp.lm.head_nll, used by token_nll) equals cross-entropy on the full logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny
from ctp import lm
from ctp.lm import cache_of_tokens, head_nll, text_logits, token_nll
from ctp.models.adapter import head_parts


def _reference(model, ids, prompt, mask):
    """NLL from the model's own logits, the path ctp took before the fused loss: (B, T-1)."""
    logits = text_logits(model, ids, prompt, mask)[:, :-1, :].float()
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1) * mask[:, 1:]


def _prompt(model, kind):
    if kind == "soft":
        return nn.Parameter(torch.randn(3, model.config.hidden_size if hasattr(model.config, "hidden_size")
                                        else model.config.n_embd) * 0.1)
    return nn.Parameter(cache_of_tokens(model, torch.tensor([5, 17, 99])))


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "opt", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("kind", ["soft", "prefix"])
def test_fused_loss_and_prompt_gradient_equal_full_logits(model_type, kind, monkeypatch):
    monkeypatch.setattr(lm, "HEAD_CHUNK_ELEMENTS", 7 * 49152)  # 7 positions a chunk: several chunks, a short last one
    model = make_tiny(model_type)
    for p in model.parameters():
        p.requires_grad_(False)
    assert head_parts(model) is not None
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :4] = 0
    prompt = _prompt(model, kind)
    got, want = token_nll(model, ids, prompt, mask), _reference(model, ids, prompt, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), prompt)
    (g_want,) = torch.autograd.grad(want.sum(), prompt)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6 * g_want.abs().max().item())
    assert g_got.abs().sum() > 0


def test_soft_capped_logits(monkeypatch):
    """Gemma 2-style final soft-capping (c * tanh(z / c)) is applied, in the loss and in its gradient."""
    monkeypatch.setattr(lm, "HEAD_CHUNK_ELEMENTS", 5 * 49152)
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    from conftest import TINY_CONFIGS

    cfg = CONFIG_MAPPING["gemma3_text"](vocab_size=49152, final_logit_softcapping=2.0, **TINY_CONFIGS["gemma3_text"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # logits large enough for the cap to matter
        model.get_output_embeddings().weight.mul_(50)
    for p in model.parameters():
        p.requires_grad_(False)
    assert head_parts(model)[2] == 2.0
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(1, 16, dtype=torch.long)
    prompt = _prompt(model, "soft")
    got, want = token_nll(model, ids, prompt, mask), _reference(model, ids, prompt, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), prompt)
    (g_want,) = torch.autograd.grad(want.sum(), prompt)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6 * g_want.abs().max().item())
    # without the cap the loss would differ: the check above is not vacuous
    z = model.get_output_embeddings()(torch.randn(4, cfg.hidden_size))
    assert z.abs().max() > 4


def test_head_nll_alone_matches_cross_entropy_and_leaves_the_head_without_gradient():
    head = nn.Linear(8, 50, bias=True)
    head.requires_grad_(False)
    h = nn.Parameter(torch.randn(3, 11, 8))
    tgt = torch.randint(0, 50, (3, 11))
    got = head_nll(h, tgt, head)
    want = nn.functional.cross_entropy(head(h).reshape(-1, 50), tgt.reshape(-1), reduction="none").view(3, 11)
    torch.testing.assert_close(got, want)
    w = torch.rand(3, 11)  # a non-uniform upstream gradient reaches every position with its own weight
    (g_got,) = torch.autograd.grad((got * w).sum(), h)
    (g_want,) = torch.autograd.grad((want * w).sum(), h)
    torch.testing.assert_close(g_got, g_want)
    assert head.weight.grad is None
    with torch.no_grad():  # evaluation: no gradient work, same values
        torch.testing.assert_close(head_nll(h, tgt, head), want)


def test_a_head_that_is_not_linear_falls_back_to_the_models_logits():
    model = make_tiny("llama")
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(3))
    want = token_nll(model, ids)
    model.lm_head = nn.Sequential(model.lm_head)  # e.g. a wrapped or packed head
    assert head_parts(model) is None
    torch.testing.assert_close(token_nll(model, ids), want, rtol=1e-5, atol=1e-5)
