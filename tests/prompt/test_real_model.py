"""The real embedded model: a short prompt training lowers validation perplexity; cached generation is exact."""

import pytest
import torch

from ctp.prompt.generate import PrefixCachedGenerator, SamplingConfig, generate_uncached
from ctp.prompt.soft import PromptConfig
from ctp.prompt.train import TrainConfig, train_prompt


@pytest.mark.slow
def test_short_training_beats_no_prompt_on_the_real_model(smol_dir):
    from ctp.models.load import load_model

    model, tok, info = load_model(smol_dir)
    cfg = TrainConfig(lr=1e-2, steps=12, seqlen=96, batch_size=2, warmup_steps=0, eval_every=6, eval_windows=4)
    art, hist = train_prompt(model, tok, info, PromptConfig(num_tokens=10), cfg, progress=False)
    assert hist.best_val_ppl < hist.val_ppl_no_prompt, (hist.val_ppl_no_prompt, hist.evals)
    assert hist.best_step > 0

    gen = PrefixCachedGenerator(model, tok, art.embeddings)
    ids = gen.encode("The capital of France is")
    cached, stats = gen.generate_ids(ids, SamplingConfig(max_new_tokens=5, stop_at_eos=False))
    assert cached == generate_uncached(model, ids, art.embeddings, 5)
    assert stats.prompt_tokens == 10 and torch.isfinite(art.embeddings).all()
