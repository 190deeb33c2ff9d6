import pytest

from ctp.errors import CTPError
from ctp.experiments.config import ExperimentConfig, load_experiment, packaged_experiments


def test_packaged_experiments_load():
    assert "demo" in packaged_experiments()
    for name in packaged_experiments():
        cfg = load_experiment(name)
        assert cfg.labels()[0] == "full"
        # every compression entry is a valid CompressConfig
        from ctp.compress.config import CompressConfig

        for spec in cfg.compressions.values():
            CompressConfig.from_dict(spec)


def test_unknown_keys_are_named():
    with pytest.raises(CTPError, match="unknown key 'perplexty'"):
        ExperimentConfig.from_dict({"name": "x", "perplexty": {}})
    with pytest.raises(CTPError, match="unknown key 'max_window' in 'perplexity'"):
        ExperimentConfig.from_dict({"name": "x", "perplexity": {"max_window": 3}})


def test_references_to_unknown_models_are_rejected():
    with pytest.raises(CTPError, match="names unknown model 'q5'"):
        ExperimentConfig.from_dict({"name": "x", "compressions": {"q4": {"quant": {"bits": 4}}},
                                    "latency": {"models": ["q5"]}})


def test_bad_files(tmp_path):
    with pytest.raises(CTPError, match="does not exist"):
        load_experiment(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(CTPError, match="does not parse"):
        load_experiment(bad)
