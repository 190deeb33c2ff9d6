import pytest
import torch

from ctp.data import corpora
from ctp.errors import CTPError


@pytest.mark.parametrize("name", corpora.CORPORA)
def test_splits_are_disjoint_nonempty_documents(name):
    texts = {s: corpora.load_text(name, s)[0] for s in corpora.SPLITS}
    assert all(len(t) > 10_000 for t in texts.values())
    if name == "ptb":
        return  # official splits
    docs = {s: set(corpora._split_documents(corpora.documents(name), s)) for s in corpora.SPLITS}
    assert sum(len(d) for d in docs.values()) == len(corpora.documents(name))
    # no document appears in two splits (validation/test never leak into train)
    assert not (docs["train"] & docs["test"])
    assert not (docs["train"] & docs["validation"])
    assert not (docs["validation"] & docs["test"])


def test_split_is_deterministic_and_recorded():
    a, ref = corpora.load_text("c4", "validation")
    corpora._local_text.cache_clear()
    b, _ = corpora.load_text("c4", "val")
    assert a == b
    assert ref.split == "validation" and "seed" in ref.split_rule


def test_unknown_names_are_user_errors():
    with pytest.raises(CTPError, match="unknown dataset 'c5'"):
        corpora.load_text("c5", "test")
    with pytest.raises(CTPError, match="unknown split"):
        corpora.load_text("c4", "holdout")


def test_windows(tokenizer):
    ids, ref = corpora.corpus_ids("wikitext2", "test", tokenizer)
    assert ids.dtype == torch.long and ids.numel() > 20_000
    w = corpora.eval_windows(ids, 128, max_windows=5)
    assert w.shape == (5, 128)
    assert torch.equal(w[1], ids[128:256])  # non-overlapping, in order
    s1 = corpora.sample_windows(ids, 4, 64, seed=3)
    s2 = corpora.sample_windows(ids, 4, 64, seed=3)
    s3 = corpora.sample_windows(ids, 4, 64, seed=4)
    assert s1.shape == (4, 64) and torch.equal(s1, s2) and not torch.equal(s1, s3)
    with pytest.raises(CTPError, match="fewer than one window"):
        corpora.eval_windows(ids[:10], 128)
    with pytest.raises(CTPError, match="not more than one window"):
        corpora.sample_windows(ids[:10], 2, 128)
    assert corpora.sample_windows(ids[:68], 4, 64).shape == (4, 64)  # 4 start positions for 4 windows
    with pytest.raises(CTPError, match="too few for 5 distinct windows of 64 .needs at least 69"):
        corpora.sample_windows(ids[:68], 5, 64)


def test_windows_start_with_the_tokenizers_bos(smol_dir, tokenizer):
    from transformers import AutoTokenizer

    assert corpora.leading_ids(tokenizer) == []  # SmolLM2 adds nothing: plain windows, as before
    bos_tok = AutoTokenizer.from_pretrained(smol_dir, add_bos_token=True)  # the same vocabulary, with a BOS
    lead = corpora.leading_ids(bos_tok)
    assert lead == [bos_tok.bos_token_id]
    ids, _ = corpora.corpus_ids("wikitext2", "test", bos_tok)
    w = corpora.eval_windows(ids, 128, max_windows=3, lead=lead)
    assert w.shape == (3, 128) and (w[:, 0] == lead[0]).all()
    assert torch.equal(w[:, 1:].reshape(-1), ids[: 3 * 127])  # the text stays contiguous: 127 tokens per window
    s = corpora.sample_windows(ids, 4, 64, seed=3, lead=lead)
    assert s.shape == (4, 64) and (s[:, 0] == lead[0]).all()
    spans = ids.unfold(0, 63, 1)  # every run of 63 consecutive text tokens
    assert all((spans == row).all(dim=1).any() for row in s[:, 1:])  # each window's text is a span of the corpus
    with pytest.raises(CTPError, match="no room for text"):
        corpora.eval_windows(ids, 2, lead=lead * 2)
