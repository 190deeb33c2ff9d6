"""A prompt takes the place of the tokenizer's BOS (ctp.lm): what the model reads, what is scored, how it starts.

The tiny models use SmolLM2's vocabulary loaded with ``add_bos_token=True``, so windows start with a real BOS.
"""

import logging

import pytest
import torch

from conftest import TINY_CONFIGS, make_tiny
from ctp.data.corpora import leading_ids
from ctp.eval.zeroshot import loglikelihoods, score_token_requests
from ctp.lm import cache_of_tokens, text_logits, token_kl, token_nll, window_nll
from ctp.prompt.artifact import PromptArtifact, check_lead
from ctp.prompt.embed import hard_prompt, hard_prompt_ids
from ctp.prompt.generate import PrefixCachedGenerator, SamplingConfig, generate_uncached
from ctp.prompt.soft import PromptConfig, init_prompt


@pytest.fixture(scope="module")
def bos_tok(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir, add_bos_token=True)


def _windows(bos: int, n: int = 2, T: int = 9) -> torch.Tensor:
    text = torch.randint(5, 1000, (n, T - 1), generator=torch.Generator().manual_seed(7))
    return torch.cat([torch.full((n, 1), bos), text], dim=1)  # (n, T): [<bos>, text]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("kind", ["soft", "prefix"])
def test_a_prompt_started_from_bos_and_tokens_reads_as_that_hard_prompt_in_the_bos_place(family, kind, bos_tok):
    """At step 0 a vocab-initialised prompt is exactly ``[<bos>, sampled tokens]``: the model reading
    ``[<bos>, h_1..h_k-1, t_1..]`` scores t_2.. as the prompted call does; without a prompt the same tokens
    t_2.. are scored, from ``[<bos>, t_1..]``."""
    model = make_tiny(family)
    lead = leading_ids(bos_tok)
    cfg = PromptConfig(num_tokens=5, kind=kind, seed=2)
    p = init_prompt(model, bos_tok, cfg, lead)
    assert p.shape[-2 if kind == "prefix" else 0] == 5  # k positions in all, the first the BOS's
    emb = model.get_input_embeddings()
    w = _windows(lead[0])
    with torch.no_grad():
        if kind == "soft":
            torch.testing.assert_close(p[0], emb(torch.tensor(lead)).float()[0])
            hard = torch.cat([torch.tensor(lead), _sampled(bos_tok, cfg, emb.weight.shape[0])])
            torch.testing.assert_close(p, emb(hard).float())
        else:
            torch.testing.assert_close(p[:, :, :, :1], cache_of_tokens(model, torch.tensor(lead)))
            hard = torch.cat([torch.tensor(lead), _sampled(bos_tok, cfg, emb.weight.shape[0])])
            torch.testing.assert_close(p, cache_of_tokens(model, hard))
        ours = token_nll(model, w, p, lead=1)  # (2, T-2)
        seq = torch.cat([hard.expand(2, -1), w[:, 1:]], dim=1)  # [<bos>, h.., t_1..]
        ref = torch.nn.functional.cross_entropy(model(input_ids=seq).logits[:, 5:-1].transpose(1, 2), w[:, 2:],
                                                reduction="none")
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        plain = token_nll(model, w, None, lead=1)
        assert plain.shape == ours.shape == (2, w.shape[1] - 2)
        torch.testing.assert_close(plain, token_nll(model, w)[:, 1:])  # the same tokens, t_2..
        total, count = window_nll(model, w, p, lead=1)
        assert count == 2 * (w.shape[1] - 2) and abs(total - float(ours.double().sum())) < 1e-3
        assert text_logits(model, w, p, lead=1).shape[1] == w.shape[1] - 1  # the positions of t_1..


def _sampled(tok, cfg, rows):
    from dataclasses import replace

    from ctp.prompt.soft import _start_ids

    return _start_ids(tok, replace(cfg, num_tokens=cfg.num_tokens - 1), rows,
                      torch.Generator().manual_seed(cfg.seed))


def test_every_init_keeps_the_bos_first_and_the_prompt_learns_it(bos_tok):
    model = make_tiny("llama")
    lead = leading_ids(bos_tok)
    emb = model.get_input_embeddings()
    for init in ("vocab", "text", "random"):
        cfg = PromptConfig(num_tokens=4, init=init, init_text="hello world" if init == "text" else None)
        p = init_prompt(model, bos_tok, cfg, lead)
        assert p.shape == (4, 64) and torch.equal(p[0], emb(torch.tensor(lead))[0].float())
        kv = init_prompt(model, bos_tok, PromptConfig(num_tokens=4, kind="prefix", init=init,
                                                      init_text=cfg.init_text), lead)
        torch.testing.assert_close(kv[:, :, :, :1], cache_of_tokens(model, torch.tensor(lead)))
    # without a BOS nothing changes: the same start as before prompts took its place
    assert torch.equal(init_prompt(model, bos_tok, PromptConfig(num_tokens=4)),
                       init_prompt(model, bos_tok, PromptConfig(num_tokens=4), []))
    from ctp.errors import CTPError

    with pytest.raises(CTPError, match="no room after"):
        init_prompt(model, bos_tok, PromptConfig(num_tokens=1), lead)
    # the BOS position learns like the others
    model.requires_grad_(False)
    p = init_prompt(model, bos_tok, PromptConfig(num_tokens=4), lead).requires_grad_(True)
    token_nll(model, _windows(lead[0]), p, lead=1).mean().backward()
    assert float(p.grad[0].abs().sum()) > 0


def test_kd_with_a_bos_compares_the_same_positions(bos_tok):
    """The teacher sees ``[<bos>, text]`` without a prompt; its first prediction (of t_1) is dropped."""
    from ctp.lm import teacher_logprobs

    model = make_tiny("llama")
    w = _windows(leading_ids(bos_tok)[0])
    logp = teacher_logprobs(model, w)  # (2, T-1, V)
    kl, nll = token_kl(model, w, logp, None, lead=1)
    assert kl.shape == nll.shape == (2, w.shape[1] - 2) and float(kl.abs().max()) < 1e-5
    torch.testing.assert_close(nll, token_nll(model, w, None, lead=1), rtol=1e-5, atol=1e-5)
    top, idx = logp.topk(8, dim=-1)
    kl8, _ = token_kl(model, w, top, None, idx, lead=1)
    assert kl8.shape == kl.shape and float(kl8.abs().max()) < 1e-5


@pytest.mark.parametrize("kind", ["soft", "prefix"])
def test_zero_shot_and_generation_put_the_prompt_in_the_bos_place(kind, bos_tok):
    model = make_tiny("llama")
    lead = leading_ids(bos_tok)
    p = init_prompt(model, bos_tok, PromptConfig(num_tokens=4, kind=kind), lead) * 1.01  # not a hard prompt
    ctx, cont = bos_tok("The cat sat on")["input_ids"], bos_tok(" the mat", add_special_tokens=False)["input_ids"]
    assert ctx[0] == lead[0]
    got = score_token_requests(model, [(ctx, cont)], p, max_length=64, lead=lead)[0]
    with torch.no_grad():
        ref = float(token_nll(model, torch.tensor([ctx + cont]), p, lead=1)[0, -len(cont):].sum())
    assert abs(got + ref) < 1e-4  # log-likelihood = -NLL of the continuation, the BOS replaced by the prompt
    assert abs(got - score_token_requests(model, [(ctx, cont)], p, max_length=64, lead=lead, prefix_cache=False)[0]) \
        < 1e-4
    assert abs(loglikelihoods(model, bos_tok, [("The cat sat on", " the mat")], p, max_length=64)[0] - got) < 1e-4
    # without a prompt the BOS stays
    plain = score_token_requests(model, [(ctx, cont)], None, max_length=64, lead=lead)[0]
    with torch.no_grad():
        assert abs(plain + float(token_nll(model, torch.tensor([ctx + cont]))[0, -len(cont):].sum())) < 1e-4
    gen = PrefixCachedGenerator(model, bos_tok, p)
    ids = gen.encode("The cat sat on")
    assert ids[0] != lead[0]  # the prompt holds the BOS's place
    assert PrefixCachedGenerator(model, bos_tok, None).encode("The cat sat on")[0] == lead[0]
    new, _ = gen.generate_ids(ids, SamplingConfig(max_new_tokens=5, stop_at_eos=False))
    assert new == generate_uncached(model, ids, p, max_new_tokens=5)


def test_hard_prompt_starts_with_the_bos_and_old_prompts_are_warned_about(bos_tok, caplog):
    model = make_tiny("llama")
    lead = leading_ids(bos_tok)
    h = hard_prompt(model, bos_tok)
    assert h.shape[0] == 1 + hard_prompt_ids(bos_tok).numel()
    assert torch.equal(h[0], model.get_input_embeddings()(torch.tensor(lead))[0].float())
    art = PromptArtifact(embeddings=torch.zeros(3, 64))  # records no placement: learned in front of everything
    with caplog.at_level(logging.WARNING):
        check_lead(art, [])
        assert not caplog.records
        check_lead(art, lead)
    assert "in front of the whole input" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_lead(PromptArtifact(embeddings=torch.zeros(3, 64), lead=lead), lead)
    assert not caplog.records


def test_training_with_a_bos_records_it_and_scores_the_same_tokens(bos_tok, tmp_path):
    from ctp.models.load import ModelInfo, tokenizer_fingerprint
    from ctp.prompt.artifact import load_prompt
    from ctp.prompt.train import TrainConfig, train_prompt

    model = make_tiny("llama")
    info = ModelInfo(spec="tiny-llama", path="memory", model_type="llama", hidden_size=64, vocab_size=49152,
                     num_layers=2, tokenizer_hash=tokenizer_fingerprint(bos_tok))
    lead = leading_ids(bos_tok)
    out = tmp_path / "p.safetensors"
    art, hist = train_prompt(model, bos_tok, info, PromptConfig(num_tokens=4, kind="prefix"),
                             TrainConfig(steps=2, seqlen=32, batch_size=2, eval_windows=2, warmup_steps=0,
                                         eval_every=2), out_path=out, progress=False)
    assert art.lead == lead and load_prompt(out).lead == lead
    torch.testing.assert_close(art.embeddings[:, :, :, :1], cache_of_tokens(model, torch.tensor(lead)), rtol=0.2,
                               atol=0.2)  # still near the BOS's own entry after two steps
    from ctp.data.corpora import corpus_ids, eval_windows

    w = eval_windows(corpus_ids("c4", "validation", bos_tok)[0], 32, 2, lead=lead)
    total, count = window_nll(model, w, None, lead=1)
    assert count == 2 * 30 and abs(torch.tensor(total / count).exp() - hist.val_ppl_no_prompt) < 1e-3 * \
        hist.val_ppl_no_prompt
