"""lm-eval's registered model ``ctp``: the same log-likelihoods as HFLM, and lm-eval's own piqa task on the local
data gives the accuracy ``ctp zeroshot`` gives, with no prompt, a soft prompt and a prefix prompt."""

import copy
import functools

import pytest
import torch

pytest.importorskip("lm_eval")
datasets = pytest.importorskip("datasets")

from ctp.eval.tasks import TASKS, data_root, load_items  # noqa: E402
from ctp.eval.zeroshot import evaluate_tasks  # noqa: E402


def _instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]


def test_loglikelihoods_equal_hflm(tiny_dir):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ctp.integrations.lm_eval_model as harness

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    pairs = [(it.context, c) for it in load_items("piqa", 4) for c in it.continuations()]
    ref = HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=4).loglikelihood(_instances(pairs),
                                                                                         disable_tqdm=True)
    ours = harness.CTPLM(pretrained=model, tokenizer=tok, batch_size=3).loglikelihood(_instances(pairs),
                                                                                      disable_tqdm=True)
    assert [g for _, g in ours] == [g for _, g in ref]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in ref], abs=1e-4)


@functools.lru_cache(maxsize=1)
def _piqa_config() -> dict:
    from lm_eval.tasks import TaskManager

    tm = TaskManager()  # indexing every task config is the slow part: once per session
    return tm._factory._load_full_config(tm._index[TASKS["piqa"].lm_eval_task], None)


def _piqa_task(limit_docs: int):
    from lm_eval.api.task import ConfigurableTask

    spec = TASKS["piqa"]
    cfg = copy.deepcopy(_piqa_config())
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    path = str(data_root() / spec.path / spec.split)
    splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")} - {None}
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {s: datasets.load_from_disk(path).select(range(limit_docs)) for s in splits})
    return ConfigurableTask(config=cfg)


@pytest.mark.parametrize("kind", [None, "soft", "prefix"])
def test_lm_eval_runs_ctp_models_with_prompts_as_ctp_zeroshot(kind, tiny_dir, tokenizer, tmp_path):
    import lm_eval

    import ctp.integrations.lm_eval_model  # noqa: F401 - registers "ctp"
    from ctp.models.load import load_model
    from ctp.prompt.artifact import artifact_for, save_prompt
    from ctp.prompt.soft import PromptConfig, init_prompt

    model, tok, info = load_model(tiny_dir)
    args = f"model={tiny_dir},batch_size=4"
    prompt = None
    if kind:
        prompt = init_prompt(model, tok, PromptConfig(num_tokens=3, kind=kind, seed=1)) * 1.05
        save_prompt(tmp_path / "p.safetensors", artifact_for(model, info, prompt))
        args += f",prompt={tmp_path / 'p.safetensors'}"
    n = 6
    res = lm_eval.simple_evaluate(model="ctp", model_args=args, tasks=[_piqa_task(n)], num_fewshot=0,
                                  bootstrap_iters=0, log_samples=False)
    got = next(iter(res["results"].values()))
    (ours,) = evaluate_tasks(model, tok, ["piqa"], prompt=prompt, limit=n, progress=False)
    assert got["acc,none"] == pytest.approx(ours.acc) and got["acc_norm,none"] == pytest.approx(ours.acc_norm)


def test_harness_with_a_dense_tiny_model_rolls_and_generates(tiny_dir):
    from lm_eval.api.instance import Instance

    import ctp.integrations.lm_eval_model as harness

    lm = harness.CTPLM(model=tiny_dir, max_length=32)
    text = "The quick brown fox jumps over the lazy dog. " * 5
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    assert rolling < 0 and len(ids) > 32  # several windows were scored
    (out,) = lm.generate_until([Instance("generate_until", {}, ("Hello", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    assert isinstance(out, str) and "\n" not in out
