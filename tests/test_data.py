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
