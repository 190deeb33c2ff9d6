"""Compression configs: validation on construction, serialisation, labels."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctp.compress.config import CompressConfig, PruneConfig, QuantConfig
from ctp.errors import CTPError


def test_defaults_are_valid_and_labelled():
    assert PruneConfig().label() == "sparsegpt50"
    assert QuantConfig().label() == "gptq4"
    assert CompressConfig(prune=PruneConfig(), quant=QuantConfig()).label() == "sparsegpt50+gptq4"


@pytest.mark.parametrize(
    ("cfg", "label"),
    [
        (CompressConfig(quant=QuantConfig(bits=3, group_size=128)), "gptq3g128"),
        (CompressConfig(prune=PruneConfig(method="wanda", prune_n=2, prune_m=4)), "2:4-wanda"),
        (CompressConfig(prune=PruneConfig(sparsity=0.625)), "sparsegpt62.5"),
        (CompressConfig(quant=QuantConfig(method="rtn", bits=8, sym=True)), "rtn8-sym"),
        (CompressConfig(quant=QuantConfig(act_order=True, group_size=64)), "gptq4g64-act"),
        (
            CompressConfig(prune=PruneConfig(method="magnitude", sparsity=0.3), quant=QuantConfig(method="rtn")),
            "magnitude30+rtn4",
        ),
    ],
)
def test_labels(cfg, label):
    assert cfg.label() == label


def test_nm_sets_sparsity_to_what_the_pattern_prunes():
    assert PruneConfig(prune_n=2, prune_m=4).sparsity == 0.5
    assert PruneConfig(prune_n=1, prune_m=4, sparsity=0.3).sparsity == 0.75
    assert PruneConfig(prune_n=2, prune_m=4).nm and not PruneConfig().nm


@pytest.mark.parametrize(
    "cfg",
    [
        CompressConfig(prune=PruneConfig(method="wanda", prune_n=4, prune_m=8), quant=QuantConfig(bits=3)),
        CompressConfig(quant=QuantConfig(method="rtn", group_size=32, sym=True), nsamples=16, seqlen=256),
        CompressConfig(prune=PruneConfig(sparsity=0.7, percdamp=0.1), calib_dataset="wikitext2", seed=3),
    ],
    ids=lambda c: c.label(),
)
def test_dict_round_trip_through_json(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert CompressConfig.from_dict(d) == cfg
    assert CompressConfig.from_dict(d).to_dict() == cfg.to_dict()


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(CTPError, match="unknown key 'bogus' in compress config"):
        CompressConfig.from_dict({"quant": {"bits": 4}, "bogus": 1})
    with pytest.raises(CTPError, match="unknown key 'bitz' in quant config"):
        CompressConfig.from_dict({"quant": {"bitz": 4}})
    with pytest.raises(CTPError, match="unknown key 'spars' in prune config"):
        CompressConfig.from_dict({"prune": {"spars": 0.5}})
    with pytest.raises(CTPError, match="prune must be a prune config"):
        CompressConfig.from_dict({"prune": 0.5})
    with pytest.raises(CTPError, match="quant config must be a mapping"):
        QuantConfig.from_dict([4])


def test_joint_mode_rules():
    joint = CompressConfig(prune=PruneConfig(), quant=QuantConfig())
    assert joint.joint
    assert not CompressConfig(prune=PruneConfig(method="wanda"), quant=QuantConfig()).joint
    assert not CompressConfig(prune=PruneConfig(), quant=QuantConfig(method="rtn")).joint
    with pytest.raises(CTPError, match="same blocksize and percdamp"):
        CompressConfig(prune=PruneConfig(), quant=QuantConfig(blocksize=64))
    with pytest.raises(CTPError, match="N:M"):
        CompressConfig(prune=PruneConfig(prune_n=2, prune_m=4), quant=QuantConfig(act_order=True))
    # Unstructured joint with act-order and sequential N:M + act-order are fine.
    CompressConfig(prune=PruneConfig(), quant=QuantConfig(act_order=True))
    CompressConfig(prune=PruneConfig(method="wanda", prune_n=2, prune_m=4), quant=QuantConfig(act_order=True))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PruneConfig(method="obs"), "unknown prune method"),
        (lambda: PruneConfig(sparsity=1.2), r"sparsity 1.2 is outside \(0, 1\)"),
        (lambda: PruneConfig(sparsity=0), "outside"),
        (lambda: PruneConfig(prune_n=2), "needs both"),
        (lambda: PruneConfig(prune_n=4, prune_m=4), "0 < N < M"),
        (lambda: PruneConfig(prune_n=2, prune_m=4, blocksize=126), "not a multiple of M=4"),
        (lambda: PruneConfig(blocksize=0), "blocksize 0"),
        (lambda: PruneConfig(percdamp=1.0), "percdamp"),
        (lambda: QuantConfig(method="awq"), "unknown quant method"),
        (lambda: QuantConfig(bits=5), "bits 5 is not supported"),
        (lambda: QuantConfig(bits=True), "not supported"),
        (lambda: QuantConfig(group_size=0), "group_size 0"),
        (lambda: QuantConfig(sym="yes"), "sym 'yes' must be true or false"),
        (lambda: QuantConfig(method="rtn", act_order=True), "act_order has no meaning"),
        (lambda: CompressConfig(), "nothing to compress"),
        (lambda: CompressConfig(quant=QuantConfig(), nsamples=0), "nsamples 0"),
        (lambda: CompressConfig(quant=QuantConfig(), calib_dataset=""), "calib_dataset"),
    ],
)
def test_invalid_settings_raise_ctperror(make, match):
    with pytest.raises(CTPError, match=match) as exc:
        make()
    assert exc.value.fix  # every error tells the user what to do


def test_check_width():
    QuantConfig(group_size=128).check_width(4096)
    with pytest.raises(CTPError, match="group_size 128 does not divide a layer with 100 inputs"):
        QuantConfig(group_size=128).check_width(100)
    QuantConfig().check_width(100)
    with pytest.raises(CTPError, match="does not tile"):
        CompressConfig(prune=PruneConfig(prune_n=2, prune_m=8)).check_width(100)


@settings(max_examples=25, deadline=None)
@given(sparsity=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(float("nan"))))
def test_property_sparsity_outside_unit_interval_rejected(sparsity):
    with pytest.raises(CTPError, match="sparsity"):
        PruneConfig(sparsity=sparsity)


@settings(max_examples=25, deadline=None)
@given(
    bits=st.integers(-5, 20).filter(lambda b: b not in (2, 3, 4, 8)),
    group_size=st.integers(-50, 0).filter(lambda g: g != -1),
    percdamp=st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0)),
)
def test_property_quant_out_of_range_rejected(bits, group_size, percdamp):
    with pytest.raises(CTPError, match="bits"):
        QuantConfig(bits=bits)
    with pytest.raises(CTPError, match="group_size"):
        QuantConfig(group_size=group_size)
    with pytest.raises(CTPError, match="percdamp"):
        QuantConfig(percdamp=percdamp)


@settings(max_examples=25, deadline=None)
@given(
    sparsity=st.floats(0.01, 0.99),
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([-1, 32, 128]),
    method=st.sampled_from(["magnitude", "wanda", "sparsegpt"]),
)
def test_property_valid_configs_round_trip(sparsity, bits, group_size, method):
    cfg = CompressConfig(
        prune=PruneConfig(method=method, sparsity=sparsity), quant=QuantConfig(bits=bits, group_size=group_size)
    )
    assert CompressConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.label().startswith(method)
