import math

import pytest
import torch

from conftest import make_tiny
from ctp.eval.perplexity import perplexity
from ctp.lm import window_nll
from ctp.lm import token_nll
from ctp.prompt.embed import HARD_PROMPT_TEXT, hard_prompt, hard_prompt_ids


def test_nll_matches_hf_loss():
    model = make_tiny("llama")
    ids = torch.randint(0, 2000, (2, 32))
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss
        total, count = window_nll(model, ids)
    assert count == 2 * 31
    assert math.isclose(total / count, float(ref), rel_tol=1e-5)


def test_prompt_changes_scores_but_not_the_scored_tokens():
    model = make_tiny("llama")
    ids = torch.randint(0, 2000, (3, 16))
    prompt = torch.randn(5, 64) * 0.02
    with torch.no_grad():
        a = token_nll(model, ids)
        b = token_nll(model, ids, prompt)
    assert a.shape == b.shape == (3, 15)
    assert not torch.allclose(a, b)


def test_hard_prompt_is_the_embedding_of_its_text(tokenizer):
    model = make_tiny("llama")
    ids = hard_prompt_ids(tokenizer)
    assert tokenizer.decode(ids).strip() == HARD_PROMPT_TEXT
    p = hard_prompt(model, tokenizer)
    assert p.shape == (len(ids), 64)
    torch.testing.assert_close(p, model.get_input_embeddings().weight[ids])


@pytest.mark.slow
def test_real_model_perplexity_is_sane(smol_dir, tokenizer):
    """The embedded default model predicts real text far better than chance, and the hard prompt is scored fairly."""
    from ctp.models.load import load_model

    model, tok, info = load_model(smol_dir)
    assert info.model_type == "llama" and info.hidden_size == 576 and info.num_layers == 30
    r = perplexity(model, tok, "wikitext2", "test", seqlen=256, max_windows=2, progress=False)
    assert r.n_windows == 2 and r.n_tokens == 2 * 255 and r.seqlen == 256
    assert 3 < r.ppl < 100, r.ppl  # chance would be ~49152
    rp = perplexity(model, tok, "wikitext2", "test", seqlen=256, max_windows=2, progress=False,
                    prompt=hard_prompt(model, tok))
    assert rp.n_tokens == r.n_tokens and rp.prompt_tokens > 10
    assert 3 < rp.ppl < 100 and rp.ppl != r.ppl
