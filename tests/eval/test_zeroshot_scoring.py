"""The log-likelihood scorer: lm-eval's tokenisation and metrics, batching, prompts, and lm-eval parity."""

import math

import pytest
import torch
from conftest import make_tiny

from ctp.errors import CTPError
from ctp.eval.tasks import Item, load_items
from ctp.eval.zeroshot import (encode_pair, evaluate_tasks, item_scores, loglikelihoods, mean_stderr,
                               score_items, score_token_requests, summarize)
from ctp.prompt.embed import hard_prompt


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llama", seed=1)


def reference_ll(model, ctx, cont, prompt=None, max_length=None):
    """One full forward per request, no padding, no mask: the sum of log-softmax of the continuation tokens."""
    k = 0 if prompt is None else prompt.shape[0]
    whole = list(ctx) + list(cont)
    if max_length is not None:
        whole = whole[-(max_length - k + 1):]
    ids = torch.tensor([whole])
    emb = model.get_input_embeddings()(ids)  # (1, T, hidden)
    if prompt is not None:
        emb = torch.cat([prompt[None].to(emb.dtype), emb], dim=1)  # (1, k+T, hidden)
    with torch.no_grad():
        logits = model(inputs_embeds=emb).logits[0, k:]  # (T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    T = len(whole)
    return sum(float(logp[t - 1, whole[t]]) for t in range(T - len(cont), T))


def test_encode_pair_splits_the_joint_encoding(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Question: Which is heavier?\nAnswer:", " a feather")
    whole = tokenizer.encode("Question: Which is heavier?\nAnswer: a feather")
    assert ctx + cont == whole and cont and ctx == tokenizer.encode("Question: Which is heavier?\nAnswer:")
    # Trailing spaces of the context move to the continuation (lm-eval's word-boundary rule).
    assert encode_pair(tokenizer, "Answer: ", "yes") == encode_pair(tokenizer, "Answer:", " yes")


def _pairs():
    """Requests of three tasks: different lengths (padding in every batch) and shared MMLU contexts."""
    pairs = []
    for task, n in (("piqa", 2), ("arc_easy", 2), ("mmlu_hs_european_history", 1)):
        for it in load_items(task, n):
            pairs += [(it.context, c) for c in it.continuations()]
    return pairs


@pytest.mark.parametrize("with_prompt,prefix_cache", [(False, True), (True, True), (True, False)])
def test_batched_equals_unbatched_reference(tiny, tokenizer, with_prompt, prefix_cache):
    prompt = None
    if with_prompt:
        prompt = torch.randn(5, tiny.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pairs = _pairs()
    got = loglikelihoods(tiny, tokenizer, pairs, prompt=prompt, batch_size=3, prefix_cache=prefix_cache)
    for (c, x), g in zip(pairs, got):
        ctx, cont = encode_pair(tokenizer, c, x)
        assert g == pytest.approx(reference_ll(tiny, ctx, cont, prompt), abs=1e-4)
    # The batch size changes nothing.
    assert loglikelihoods(tiny, tokenizer, pairs, prompt=prompt, batch_size=1) == pytest.approx(got, abs=1e-4)


@pytest.mark.parametrize("family", ["gemma3_text", "opt", "gpt2"])
def test_other_families_match_reference(family):
    """Sliding-window attention (Gemma 3, window 32), learned positions (OPT, GPT-2), with a cached prompt."""
    model = make_tiny(family)
    g = torch.Generator().manual_seed(0)
    reqs = [(torch.randint(0, 49152, (n,), generator=g).tolist(), torch.randint(0, 49152, (c,), generator=g).tolist())
            for n, c in [(50, 5), (20, 3), (7, 1), (40, 10)]]
    prompt = torch.randn(12, model.get_input_embeddings().weight.shape[1], generator=g) * 0.05
    got = score_token_requests(model, reqs, prompt, batch_size=3, max_length=256)
    for (ctx, cont), v in zip(reqs, got):
        assert v == pytest.approx(reference_ll(model, ctx, cont, prompt), abs=1e-4)


def test_truncation_keeps_the_tail(tiny):
    reqs = [(list(range(100, 160)), [7, 8, 9]), (list(range(200, 210)), [5])]
    for k, prompt in ((0, None), (4, torch.randn(4, tiny.config.hidden_size) * 0.1)):
        got = score_token_requests(tiny, reqs, prompt, batch_size=2, max_length=32)
        assert score_token_requests(tiny, reqs, prompt, batch_size=2, max_length=32,
                                    prefix_cache=False) == pytest.approx(got, abs=1e-4)
        for (ctx, cont), g in zip(reqs, got):
            assert g == pytest.approx(reference_ll(tiny, ctx, cont, prompt, max_length=32), abs=1e-4)
    with pytest.raises(CTPError, match="hidden size"):
        score_token_requests(tiny, reqs, torch.zeros(3, tiny.config.hidden_size + 1))
    with pytest.raises(CTPError, match="window"):
        score_token_requests(tiny, [([1, 2], list(range(10, 40)))], max_length=16)


def test_prompt_changes_loglikelihoods(tiny, tokenizer):
    pairs = _pairs()[:4]
    plain = loglikelihoods(tiny, tokenizer, pairs)
    hard = loglikelihoods(tiny, tokenizer, pairs, prompt=hard_prompt(tiny, tokenizer))
    assert all(abs(a - b) > 1e-3 for a, b in zip(plain, hard))


def test_metrics_on_a_hand_made_case():
    items = [Item("q", ("a", "bbbb"), 1), Item("q", ("aa", "b", "cccc"), 0), Item("q", ("a", "bb"), 0),
             Item("q", ("a", "b"), 1)]
    lls = [[-1.0, -2.0],  # acc picks 0 (wrong); per char -1 vs -0.5 -> 1 (right)
           [-2.0, -3.0, -4.0],  # acc 0 (right); per char -1, -3, -1 -> tie, first wins: 0 (right)
           [-5.0, -4.0],  # acc 1 (wrong); per char -5 vs -2 -> 1 (wrong)
           [-1.0, -1.0]]  # tie -> first (wrong) for both
    acc, acc_norm = item_scores(items, lls)
    assert acc == [0.0, 1.0, 0.0, 0.0] and acc_norm == [1.0, 1.0, 0.0, 0.0]
    r = summarize("t", items, lls)
    assert r.n == 4 and r.acc == 0.25 and r.acc_norm == 0.5
    assert r.acc_stderr == pytest.approx(math.sqrt(0.25 * 0.75 / 3))  # sqrt(p(1-p)/(n-1))
    assert r.acc_norm_stderr == pytest.approx(math.sqrt(0.5 * 0.5 / 3))
    assert mean_stderr([1.0]) is None and mean_stderr([1.0, 1.0]) == 0.0
    assert set(r.to_dict()) >= {"task", "n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "prompt_tokens",
                                "seconds"}


def test_evaluate_tasks_limit_and_prompt(tiny, tokenizer):
    res = evaluate_tasks(tiny, tokenizer, ["piqa", "openbookqa"], limit=3, batch_size=4, progress=False)
    assert [(r.task, r.n, r.prompt_tokens) for r in res] == [("piqa", 3, 0), ("openbookqa", 3, 0)]
    assert all(0 <= r.acc <= 1 and 0 <= r.acc_norm <= 1 and r.seconds > 0 for r in res)
    p = hard_prompt(tiny, tokenizer)
    (rp,) = evaluate_tasks(tiny, tokenizer, ["piqa"], prompt=p, limit=3, progress=False)
    assert rp.prompt_tokens == p.shape[0] and rp.split == "validation"
    with pytest.raises(CTPError, match="known tasks"):
        evaluate_tasks(tiny, tokenizer, ["piqa", "nope"], limit=1, progress=False)


def test_matches_lm_eval_hflm(tiny_dir):
    """Per-request log-likelihoods equal lm-eval's HFLM on the same model and tokenizer."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    lm = HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=4)
    items = {t: load_items(t, 3) for t in ("piqa", "hellaswag", "mmlu_hs_european_history")}
    pairs = [(it.context, c) for its in items.values() for it in its for c in it.continuations()]
    ref = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                                            disable_tqdm=True)]
    ours = [ll for its in items.values() for lls in score_items(model, tok, its, batch_size=3) for ll in lls]
    assert ours == pytest.approx(ref, abs=1e-4)


@pytest.mark.slow
def test_real_model_beats_chance(smol_dir):
    """SmolLM2-135M on the first 40 items: PIQA and ARC-Easy well above chance (0.5 and about 0.25)."""
    from ctp.models.load import load_model

    model, tok, _ = load_model(smol_dir)
    piqa, arc = evaluate_tasks(model, tok, ["piqa", "arc_easy"], limit=40, batch_size=8, progress=False)
    # Measured: piqa acc 0.725, acc_norm 0.700; arc_easy acc 0.500, acc_norm 0.425. Chance: 0.5 and about 0.25.
    assert piqa.acc_norm >= 0.6 and arc.acc >= 0.4, (piqa, arc)
