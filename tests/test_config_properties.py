"""Property tests for the prompt, training and experiment configs (the compression configs' are in
tests/compress/test_config.py): any value of any JSON type in any field either builds a valid config
that survives a JSON round trip, or is refused with a one-line CTPError; never another exception."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ctp.errors import CTPError
from ctp.experiments.config import ExperimentConfig
from ctp.prompt.soft import MAX_PROMPT_TOKENS, PromptConfig
from ctp.prompt.train import TrainConfig

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# anything a YAML/JSON file can hold
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _builds_or_refuses(build):
    """``build()`` returns a config or raises a one-line CTPError (returned as None)."""
    try:
        return build()
    except CTPError as e:
        assert "\n" not in str(e), str(e)
        assert e.problem and e.fix
        return None


def _field(cls) -> st.SearchStrategy[str]:
    return st.sampled_from([f.name for f in dataclasses.fields(cls)])


# --------------------------------------------------------------------------- TrainConfig


@SETTINGS
@given(fields=st.dictionaries(_field(TrainConfig), json_values, max_size=4))
def test_train_config_any_values_build_or_fail_in_one_line(fields):
    cfg = _builds_or_refuses(lambda: TrainConfig(**fields))
    if cfg is not None:
        assert cfg.lr > 0 and math.isfinite(cfg.lr) and cfg.batch_size >= 1 and cfg.steps >= 1
        assert 0 <= cfg.warmup <= cfg.steps
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@SETTINGS
@given(
    lr=st.floats(1e-6, 10.0), weight_decay=st.floats(0.0, 1.0), batch_size=st.integers(1, 64),
    seqlen=st.integers(2, 4096), steps=st.integers(1, 10**5), warmup=st.none() | st.integers(0, 10**5),
    schedule=st.sampled_from(["cosine", "linear", "constant"]), min_lr_ratio=st.floats(0.0, 1.0),
    grad_clip=st.floats(0.0, 10.0), data=st.sampled_from(["c4", "wikitext2", "ptb", "wiki", "PTB"]),
    max_minutes=st.none() | st.floats(0.01, 1e4),
)
def test_train_config_valid_space_round_trips(lr, weight_decay, batch_size, seqlen, steps, warmup, schedule,
                                              min_lr_ratio, grad_clip, data, max_minutes):
    cfg = TrainConfig(lr=lr, weight_decay=weight_decay, batch_size=batch_size, seqlen=seqlen, steps=steps,
                      warmup_steps=warmup, schedule=schedule, min_lr_ratio=min_lr_ratio, grad_clip=grad_clip,
                      data=data, max_minutes=max_minutes)
    assert cfg.data in ("c4", "wikitext2", "ptb")  # aliases are canonicalised
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@SETTINGS
@given(lr=st.one_of(st.floats(max_value=0.0), st.just(math.inf), st.just(math.nan)),
       batch_size=st.integers(max_value=0), steps=st.integers(max_value=0),
       number_as_text=st.floats(allow_nan=False).map(str))
def test_train_config_out_of_range_or_mistyped_is_refused(lr, batch_size, steps, number_as_text):
    with pytest.raises(CTPError, match="learning rate"):
        TrainConfig(lr=lr)
    with pytest.raises(CTPError, match="batch size"):
        TrainConfig(batch_size=batch_size)
    with pytest.raises(CTPError, match="steps"):
        TrainConfig(steps=steps)
    with pytest.raises(CTPError, match="lr must be a number.*without quotes"):
        TrainConfig(lr=number_as_text)  # what YAML makes of 1e-3


# --------------------------------------------------------------------------- PromptConfig


@SETTINGS
@given(fields=st.dictionaries(_field(PromptConfig), json_values, max_size=4))
def test_prompt_config_any_values_build_or_fail_in_one_line(fields):
    cfg = _builds_or_refuses(lambda: PromptConfig(**fields))
    if cfg is not None:
        assert 1 <= cfg.num_tokens <= MAX_PROMPT_TOKENS and cfg.seed >= 0
        assert PromptConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@SETTINGS
@given(k=st.integers(), init=st.sampled_from(["vocab", "text", "random", "VOCAB"]),
       text=st.none() | st.text(max_size=10), seed=st.integers())
def test_prompt_config_ranges(k, init, text, seed):
    ok = 1 <= k <= MAX_PROMPT_TOKENS and seed >= 0 and (init.lower() != "text" or bool(text and text.strip()))
    cfg = _builds_or_refuses(lambda: PromptConfig(num_tokens=k, init=init, init_text=text, seed=seed))
    assert (cfg is not None) == ok


# --------------------------------------------------------------------------- ExperimentConfig

SECTIONS = {
    "calibration": ["nsamples", "seqlen", "dataset", "seed"],
    "prompt": ["tokens", "data", "init", "train", "models"],
    "perplexity": ["datasets", "split", "seqlen", "max_windows", "batch_size", "hard_prompt"],
    "zeroshot": ["tasks", "limit", "batch_size", "models", "hard_prompt"],
    "transfer": ["compression", "datasets"],
    "length_ablation": ["model", "tokens", "dataset"],
    "latency": ["models", "prompt_tokens", "context_len", "new_tokens", "repeats"],
}
plausible = st.one_of(
    json_values,
    st.sampled_from(["c4", "ptb", "wikitext2", "piqa", "full", "q4", "test", "vocab"]),
    st.lists(st.sampled_from(["c4", "ptb", "piqa", "full", "q4", 0, 25]), max_size=3),
    st.integers(0, 64),
)
compression_specs = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"prune": st.fixed_dictionaries({}, optional={
        "sparsity": st.floats(-0.5, 1.5), "prune_n": st.integers(0, 5), "prune_m": st.integers(0, 5),
        "method": st.sampled_from(["sparsegpt", "magnitude", "bogus"])}),
        "quant": st.fixed_dictionaries({}, optional={"bits": st.integers(0, 9), "group_size": st.integers(-2, 256)})}),
)


@st.composite
def experiment_dicts(draw) -> dict:
    d: dict = {"name": draw(st.sampled_from(["t", "", "a/b"]) | st.text(max_size=5))}
    if draw(st.booleans()):
        d["compressions"] = draw(st.dictionaries(st.sampled_from(["q4", "sp50", "full"]), compression_specs,
                                                 max_size=2))
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=3, unique=True)):
        keys = draw(st.lists(st.sampled_from(SECTIONS[section]), max_size=3, unique=True))
        d[section] = {k: draw(plausible) for k in keys} if draw(st.integers(0, 9)) else draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        d[draw(st.sampled_from(["seed", "device", "models", "bogus_key"]))] = draw(json_values)
    return d


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=experiment_dicts())
def test_experiment_config_any_file_builds_or_fails_in_one_line(data):
    cfg = _builds_or_refuses(lambda: ExperimentConfig.from_dict(data))
    if cfg is not None:
        for label in cfg.compressions:  # everything the grid would build is valid already
            cfg.compress_config(label)
        if cfg.prompt is not None:
            cfg.prompt.configs(cfg.seed)
        again = ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg


@SETTINGS
@given(spec=compression_specs)
def test_experiment_refuses_exactly_the_compressions_compress_refuses(spec):
    from ctp.compress.config import CompressConfig

    assume(isinstance(spec, dict))
    direct = _builds_or_refuses(lambda: CompressConfig.from_dict({"nsamples": 4, "seqlen": 32, **spec}))
    try:
        cfg = ExperimentConfig.from_dict({"name": "t", "calibration": {"nsamples": 4, "seqlen": 32},
                                          "compressions": {"c": spec}})
    except CTPError as e:
        assert direct is None and str(e).startswith("compression 'c': ")
    else:
        assert cfg.compress_config("c") == direct
