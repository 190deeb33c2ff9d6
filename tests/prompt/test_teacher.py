"""Distillation targets: the exact online teacher and the top-k cache on disk."""

import pytest
import torch

from conftest import make_tiny
from ctp.cli import main
from ctp.errors import CTPError
from ctp.lm import teacher_logprobs, token_kl
from ctp.models.load import ModelInfo, tokenizer_fingerprint
from ctp.prompt.soft import PromptConfig
from ctp.prompt.teacher import Teacher, as_teacher, weights_fingerprint
from ctp.prompt.train import TrainConfig, train_prompt

FAST = dict(seqlen=32, batch_size=2, eval_windows=2, warmup_steps=0)


def _info(tokenizer):
    return ModelInfo(spec="tiny-llama", path="memory", model_type="llama", hidden_size=64, vocab_size=49152,
                     num_layers=2, tokenizer_hash=tokenizer_fingerprint(tokenizer))


def _ids(seed=0, shape=(2, 12)):
    return torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(seed))


def test_topk_kl_is_a_lower_bound_that_reaches_the_exact_kl():
    student, teacher = make_tiny("llama"), make_tiny("llama", seed=1)
    ids = _ids()
    full = teacher_logprobs(teacher, ids)
    exact, nll = token_kl(student, ids, full)
    everything = full.topk(full.shape[-1], dim=-1)
    torch.testing.assert_close(token_kl(student, ids, everything.values, None, everything.indices)[0], exact,
                               rtol=1e-4, atol=1e-4)
    previous = torch.zeros_like(exact)
    for k in (1, 8, 64, 4096):
        top = full.topk(k, dim=-1)
        kl, nll_k = token_kl(student, ids, top.values, None, top.indices)
        assert bool((kl >= previous - 1e-5).all()) and bool((kl <= exact + 1e-4).all())  # grows towards the exact KL
        assert torch.equal(nll_k, nll)
        previous = kl
    own = teacher_logprobs(student, ids).topk(16, dim=-1)
    assert float(token_kl(student, ids, own.values, None, own.indices)[0].detach().abs().max()) < 1e-5  # its own teacher


def test_cache_is_filled_once_and_then_needs_no_teacher(tokenizer, tmp_path):
    model, teacher_model = make_tiny("llama"), make_tiny("llama", seed=1)
    pcfg = PromptConfig(num_tokens=3, kind="prefix")
    cfg = TrainConfig(lr=3e-2, steps=5, eval_every=5, objective="kd", teacher_topk=16, **FAST)
    first = Teacher(teacher_model, topk=16, cache_dir=tmp_path / "cache")
    art, hist = train_prompt(model, tokenizer, _info(tokenizer), pcfg, cfg, progress=False, teacher=first)
    assert first.misses == 10 and first.hits == 0  # 5 steps x 2 windows, all new
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 10
    assert hist.train_loss[-1] < hist.train_loss[0]
    assert art.train_config["teacher_topk"] == 16

    def no_teacher():
        raise AssertionError("the teacher was loaded although every window is cached")

    cached = Teacher(load=no_teacher, topk=16, cache_dir=tmp_path / "cache",
                     fingerprint=weights_fingerprint(teacher_model))
    again, _ = train_prompt(model, tokenizer, _info(tokenizer), pcfg, cfg, progress=False, teacher=cached)
    assert cached.hits == 10 and cached.misses == 0
    assert torch.equal(again.embeddings, art.embeddings)  # the same targets give the same prompt


def test_cache_entries_match_the_teacher_and_damage_is_recomputed(tmp_path):
    teacher_model = make_tiny("llama", seed=1)
    teacher = Teacher(teacher_model, topk=8, cache_dir=tmp_path)
    ids = _ids(1)
    logp, idx = teacher.targets(ids)
    top = teacher_logprobs(teacher_model, ids).topk(8, dim=-1)
    torch.testing.assert_close(logp, top.values)
    assert torch.equal(idx, top.indices)
    entry = sorted(tmp_path.rglob("*.safetensors"))[0]
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    again = Teacher(teacher_model, topk=8, cache_dir=tmp_path)
    logp2, idx2 = again.targets(ids)
    assert again.misses == 1 and again.hits == 1
    assert torch.equal(logp2, logp) and torch.equal(idx2, idx)


def test_cache_is_keyed_by_the_teacher_weights_and_k(tmp_path):
    a, b = make_tiny("llama", seed=1), make_tiny("llama", seed=2)
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(a) == weights_fingerprint(make_tiny("llama", seed=1))
    assert Teacher(a, topk=8, cache_dir=tmp_path).root != Teacher(b, topk=8, cache_dir=tmp_path).root
    assert Teacher(a, topk=8, cache_dir=tmp_path).root != Teacher(a, topk=4, cache_dir=tmp_path).root
    with pytest.raises(CTPError, match="top 8"):
        as_teacher(Teacher(a, topk=8, cache_dir=tmp_path), 4)
    with pytest.raises(CTPError, match="teacher_topk"):
        TrainConfig(teacher_topk=-1)


def test_cli_teacher_cache_and_device(tiny_dir, tmp_path, capsys):
    out, cache = tmp_path / "p.safetensors", tmp_path / "cache"
    args = ["-q", "train-prompt", "--model", tiny_dir, "--tokens", "2", "--kind", "prefix", "--steps", "2",
            "--seqlen", "32", "--batch-size", "1", "--eval-windows", "1", "--eval-every", "2",
            "--objective", "kd", "--teacher", tiny_dir, "--teacher-topk", "4", "--teacher-cache", str(cache),
            "--teacher-device", "cpu", "--out", str(out)]
    assert main(args) == 0
    assert len(list(cache.rglob("*.safetensors"))) == 2
    assert main(args[:-1] + [str(tmp_path / "q.safetensors"), "--teacher-cache", tiny_dir]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(args[:-1] + [str(tmp_path / "r.safetensors"), "--teacher-device", "cuda"]) == 2
        assert "--teacher-device cuda: no CUDA GPU" in capsys.readouterr().err


def test_token_loss_takes_a_bare_teacher_model():
    from ctp.prompt.train import token_loss

    student, teacher_model = make_tiny("llama"), make_tiny("llama", seed=1)
    ids = _ids(2)
    cfg = TrainConfig(objective="kd", **FAST)
    bare = token_loss(student, ids, None, teacher_model, cfg)
    wrapped = token_loss(student, ids, None, Teacher(teacher_model), cfg)
    assert bare.shape == (2, 11) and torch.equal(bare, wrapped) and float(bare.mean()) > 0
