"""Experiment files: one YAML/JSON document describing a whole grid of the paper's experiments.

The file maps one-to-one onto :class:`ExperimentConfig`; unknown keys are an
error that names the key. Each section can be left out to skip it.

.. code-block:: yaml

    name: demo
    model: smollm2-135m
    calibration: {nsamples: 32, seqlen: 512, dataset: c4}
    compressions:                       # label -> CompressConfig fields (prune/quant)
      sp50: {prune: {method: sparsegpt, sparsity: 0.5}}
      q3:   {quant: {method: gptq, bits: 3}}
    prompt:                             # one learned prompt per compressed model
      tokens: 25
      data: c4
      kind: prefix                      # soft (the paper's) | prefix (keys/values of every layer)
      train: {steps: 150, seqlen: 256, batch_size: 2, eval_every: 25, eval_windows: 8, objective: kd}
      compare: {paper: {kind: soft, train: {objective: nll}}}   # other recipes, shown beside it
    perplexity: {datasets: [c4, wikitext2, ptb], seqlen: 512, max_windows: 8, hard_prompt: true}
    zeroshot: {tasks: [piqa, hellaswag], limit: 50, models: [full, sp50]}
    transfer:
      compression: true                 # source x target matrix over the learned prompts
      datasets: {model: q3, train_on: [wikitext2, ptb]}   # direct vs transferred (Table 4)
    length_ablation: {model: q3, tokens: [0, 10, 25, 50]}
    latency: {models: [full, sp50], prompt_tokens: [0, 25, 50, 100], context_len: 256, new_tokens: 16}
    case_study: {model: sp50, questions: ["Where is Long Beach?"], max_new_tokens: 40}
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctp.errors import CTPError, check_types, require

FULL = "full"  # label of the uncompressed model


def _build(cls, data: Any, where: str):
    """Construct dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise CTPError(f"'{where}' must be a mapping, got {type(data).__name__}", "see the example experiment files")
    _check_fields(cls, data, where)
    return cls(**data)


def _check_fields(cls, data: dict, where: str) -> None:
    """Unknown keys and values of the wrong type in ``data`` for dataclass ``cls``, named by ``where``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CTPError(f"unknown key '{unknown[0]}' in '{where}'", f"known keys: {', '.join(sorted(names))}")
    check_types(cls, data, "" if where == "experiment" else f"{where}.")


def _datasets(names: list[str], where: str) -> None:
    from ctp.data.corpora import canonical

    for n in names:
        try:
            canonical(n)
        except CTPError as e:
            raise CTPError(f"{where}: {e.problem}", e.fix) from None


_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def safe_name(name, where: str) -> None:
    """Names that become parts of paths: letters, digits, '.', '_' and '-', not starting with '.' or '-'."""
    require(isinstance(name, str) and _SAFE.fullmatch(name) is not None,
            f"{where} {_short(name)!r} is not a safe name for a file",
            "use letters, digits, '.', '_' and '-' (starting with a letter or digit), at most 100 characters")


def _short(value, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _positive(where: str, **values) -> None:
    for name, v in values.items():
        require(v is None or v >= 1, f"{where}.{name} {v} must be at least 1", f"give {where}.{name} a positive value")


@dataclass
class CalibrationSpec:
    nsamples: int = 128
    seqlen: int = 2048
    dataset: str = "c4"
    seed: int = 0

    def __post_init__(self):
        require(self.nsamples >= 1, f"calibration nsamples {self.nsamples} must be >= 1", "use e.g. 32 or 128")
        require(self.seqlen >= 8, f"calibration seqlen {self.seqlen} is too short", "use e.g. 512 or 2048")
        _datasets([self.dataset], "calibration.dataset")


_RECIPE_KEYS = ("kind", "init", "tokens", "train")


@dataclass
class PromptSpec:
    tokens: int = 100
    data: str = "c4"
    kind: str = "soft"  # soft (the paper) | prefix
    init: str = "vocab"
    train: dict = field(default_factory=dict)  # TrainConfig fields (objective: nll | kd | mix among them)
    models: list[str] | None = None  # labels that get a learned prompt (default: every compressed model)
    compare: dict[str, dict] | None = None  # name -> other recipes (kind/init/tokens/train overrides) shown beside it

    def __post_init__(self):
        require(self.tokens >= 1, f"prompt tokens {self.tokens} must be >= 1", "use e.g. 100 (the paper's)")
        _datasets([self.data], "prompt.data")
        for name, over in (self.compare or {}).items():
            require(isinstance(over, dict), f"prompt.compare.{name} must be a mapping",
                    "write e.g. {paper: {kind: soft, train: {objective: nll}}}")
            safe_name(name, "prompt.compare name")
            unknown = sorted(set(over) - set(_RECIPE_KEYS))
            require(not unknown, f"unknown key '{unknown[0] if unknown else ''}' in 'prompt.compare.{name}'",
                    f"known keys: {', '.join(_RECIPE_KEYS)}")
            self.configs(0, recipe=name)

    def recipe(self, name: str | None = None) -> dict:
        """The settings of the main recipe (None) or of a named ``compare`` recipe (its overrides applied)."""
        base = {"kind": self.kind, "init": self.init, "tokens": self.tokens, "train": dict(self.train)}
        if name is None:
            return base
        over = (self.compare or {}).get(name)
        require(over is not None, f"unknown prompt recipe '{name}'", "name one listed under prompt.compare")
        return {**base, **{k: v for k, v in over.items() if k != "train"},
                "train": {**base["train"], **over.get("train", {})}}

    def configs(self, seed: int, tokens: int | None = None, data: str | None = None, recipe: str | None = None):
        """The (PromptConfig, TrainConfig) this section describes (validated; errors name prompt.train).

        ``tokens`` and ``data`` replace the recipe's own (a length ablation, a prompt for another dataset);
        ``recipe`` picks a ``compare`` entry instead of the main recipe.
        """
        from ctp.prompt.soft import PromptConfig
        from ctp.prompt.train import TrainConfig

        r = self.recipe(recipe)
        where = "prompt.train" if recipe is None else f"prompt.compare.{recipe}.train"
        _check_fields(TrainConfig, r["train"], where)
        try:
            pcfg = PromptConfig(num_tokens=r["tokens"] if tokens is None else tokens, kind=r["kind"],
                                init=r["init"], seed=seed)
            tcfg = TrainConfig(**{"data": data or self.data, "seed": seed, **r["train"]})
        except CTPError as e:
            raise CTPError(f"prompt: {e.problem}", e.fix) from None
        return pcfg, tcfg


@dataclass
class PerplexitySpec:
    datasets: list[str] = field(default_factory=lambda: ["c4", "wikitext2", "ptb"])
    split: str = "test"
    seqlen: int = 1024
    max_windows: int | None = None  # None: the whole split
    batch_size: int = 1
    hard_prompt: bool = True
    # windows of the transfer and length-ablation cells (None: max_windows); the values they are compared with
    # come from the first windows of the main cells, so each comparison is on the same windows
    ablation_windows: int | None = None

    def __post_init__(self):
        _datasets(self.datasets, "perplexity.datasets")
        require(self.split in ("train", "validation", "test"), f"perplexity.split '{self.split}' is unknown",
                "use train, validation or test")
        require(self.seqlen >= 2, f"perplexity.seqlen {self.seqlen} is too short", "use e.g. 512 or 1024")
        _positive("perplexity", max_windows=self.max_windows, batch_size=self.batch_size,
                  ablation_windows=self.ablation_windows)


@dataclass
class ZeroShotSpec:
    tasks: list[str] = field(default_factory=lambda: ["openbookqa", "hellaswag", "piqa", "mmlu_hs_european_history"])
    limit: int | None = None
    batch_size: int = 8
    models: list[str] | None = None  # default: every model
    hard_prompt: bool = True

    def __post_init__(self):
        from ctp.eval.tasks import get_task

        for t in self.tasks:
            try:
                get_task(t)
            except CTPError as e:
                raise CTPError(f"zeroshot.tasks: {e.problem}", e.fix) from None
        _positive("zeroshot", limit=self.limit, batch_size=self.batch_size)


@dataclass
class DatasetTransferSpec:
    model: str = ""  # label of the compressed model
    train_on: list[str] = field(default_factory=lambda: ["wikitext2", "ptb"])

    def __post_init__(self):
        _datasets(self.train_on, "transfer.datasets.train_on")


@dataclass
class TransferSpec:
    compression: bool = True
    datasets: DatasetTransferSpec | None = None

    def __post_init__(self):
        if isinstance(self.datasets, dict):
            self.datasets = _build(DatasetTransferSpec, self.datasets, "transfer.datasets")


@dataclass
class LengthAblationSpec:
    model: str = ""
    tokens: list[int] = field(default_factory=lambda: [0, 25, 50, 75, 100])
    dataset: str | None = None  # default: the prompt's training data; evaluated on every perplexity dataset

    def __post_init__(self):
        require(all(k >= 0 for k in self.tokens), f"length_ablation.tokens {self.tokens} must be >= 0",
                "use prompt lengths such as [0, 25, 50]")
        if self.dataset is not None:
            _datasets([self.dataset], "length_ablation.dataset")


@dataclass
class LatencySpec:
    models: list[str] | None = None
    prompt_tokens: list[int] = field(default_factory=lambda: [0, 25, 50, 100])
    context_len: int = 1024
    new_tokens: int = 32
    repeats: int = 3

    def __post_init__(self):
        require(all(k >= 0 for k in self.prompt_tokens), f"latency.prompt_tokens {self.prompt_tokens} must be >= 0",
                "use prompt lengths such as [0, 25, 50]")
        _positive("latency", context_len=self.context_len, new_tokens=self.new_tokens, repeats=self.repeats)


@dataclass
class CaseStudySpec:
    """The paper's case study (its Figures 1, 7, 8): greedy answers to fixed questions, side by side."""

    model: str = ""  # the compressed model (default: the first prompted one); the full model answers too
    questions: list[str] = field(default_factory=lambda: ["Where is Long Beach?", "Where is Tulsa, Oklahoma?",
                                                          "What is asparagus?"])
    max_new_tokens: int = 40

    def __post_init__(self):
        require(bool(self.questions) and all(isinstance(q, str) and q.strip() for q in self.questions),
                "case_study.questions must be a list of non-empty questions", "write e.g. ['Where is Long Beach?']")
        require(1 <= self.max_new_tokens <= 512, f"case_study.max_new_tokens {self.max_new_tokens} is out of range",
                "use between 1 and 512")


@dataclass
class ExperimentConfig:
    name: str
    model: str = "smollm2-135m"
    models: list[str] | None = None  # several models: the same grid runs once per model
    seed: int = 0
    device: str | None = None
    runtime: str = "dense"  # how compressed models run: dense rebuild, or packed low-bit kernels (ctp.compress.packed)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    compressions: dict[str, dict] = field(default_factory=dict)
    prompt: PromptSpec | None = None
    perplexity: PerplexitySpec | None = None
    zeroshot: ZeroShotSpec | None = None
    transfer: TransferSpec | None = None
    length_ablation: LengthAblationSpec | None = None
    latency: LatencySpec | None = None
    case_study: CaseStudySpec | None = None

    def __post_init__(self):
        safe_name(self.name, "experiment name")
        require(self.runtime in ("dense", "packed"), f"runtime '{self.runtime}' is not one of dense, packed",
                "write runtime: dense (exact float matrices) or runtime: packed (int4/int8 kernels)")
        for label in self.compressions:
            safe_name(label, "compression label")
        require(FULL not in self.compressions, f"'{FULL}' is reserved for the uncompressed model",
                "rename that compression")
        labels = set(self.labels())
        for where, names in self._label_refs():
            for n in names:
                require(n in labels, f"'{where}' names unknown model '{n}'", f"use one of: {', '.join(self.labels())}")
        # everything the grid will build is validated now, not hours into the run
        for label in self.compressions:
            self.compress_config(label)
        if self.prompt is not None:
            self.prompt.configs(self.seed)

    def compress_config(self, label: str):
        """The :class:`~ctp.compress.config.CompressConfig` of compression ``label`` (calibration filled in)."""
        from ctp.compress.config import CompressConfig

        spec = self.compressions[label]
        require(isinstance(spec, dict), f"compression '{label}' must be a mapping, got {type(spec).__name__}",
                "write e.g. {prune: {sparsity: 0.5}}")
        cal = self.calibration
        spec = {"nsamples": cal.nsamples, "seqlen": cal.seqlen, "calib_dataset": cal.dataset, "seed": cal.seed,
                **spec}
        try:
            return CompressConfig.from_dict(spec)
        except CTPError as e:
            raise CTPError(f"compression '{label}': {e.problem}", e.fix) from None

    def per_model(self) -> list[ExperimentConfig]:
        """One config per model (``models`` expands into copies with ``model`` set)."""
        if not self.models:
            return [self]
        return [dataclasses.replace(self, model=m, models=None) for m in self.models]

    def labels(self) -> list[str]:
        return [FULL, *self.compressions]

    def prompted(self) -> list[str]:
        """Labels that get a learned prompt."""
        if self.prompt is None:
            return []
        return list(self.prompt.models) if self.prompt.models is not None else list(self.compressions)

    def _label_refs(self):
        if self.prompt and self.prompt.models:
            yield "prompt.models", self.prompt.models
        if self.zeroshot and self.zeroshot.models:
            yield "zeroshot.models", self.zeroshot.models
        if self.transfer and self.transfer.datasets and self.transfer.datasets.model:
            yield "transfer.datasets.model", [self.transfer.datasets.model]
        if self.length_ablation and self.length_ablation.model:
            yield "length_ablation.model", [self.length_ablation.model]
        if self.latency and self.latency.models:
            yield "latency.models", self.latency.models
        if self.case_study and self.case_study.model:
            yield "case_study.model", [self.case_study.model]

    @classmethod
    def from_dict(cls, data: dict) -> ExperimentConfig:
        if not isinstance(data, dict):
            raise CTPError("an experiment file must hold a mapping at the top level", "see configs/demo.yaml")
        data = dict(data)
        sections = {
            "calibration": CalibrationSpec, "prompt": PromptSpec, "perplexity": PerplexitySpec,
            "zeroshot": ZeroShotSpec, "transfer": TransferSpec, "length_ablation": LengthAblationSpec,
            "latency": LatencySpec, "case_study": CaseStudySpec,
        }
        for key, spec in sections.items():
            if key in data:
                data[key] = _build(spec, data[key], key)
        if "calibration" in data and data["calibration"] is None:
            data["calibration"] = CalibrationSpec()
        return _build(cls, data, "experiment")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PACKAGED = Path(__file__).parent / "configs"


def packaged_experiments() -> list[str]:
    """Names of the experiment files shipped with ctp."""
    return sorted(p.stem for p in PACKAGED.glob("*.yaml"))


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read an experiment file (.yaml, .yml or .json), or a shipped one by name."""
    path = Path(path)
    if not path.is_file() and str(path) in packaged_experiments():
        path = PACKAGED / f"{path}.yaml"
    if not path.is_file():
        raise CTPError(f"experiment file {path} does not exist",
                       f"pass a path or a shipped name: {', '.join(packaged_experiments())}")
    from ctp.io import read_config_file

    return ExperimentConfig.from_dict(read_config_file(path, "experiment file"))
