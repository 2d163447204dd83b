import tomllib
from pathlib import Path

import pytest

from pollinate.config import ConfigError, RunConfig, option_names


def test_pyproject_run_config_defaults_match_runconfig():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    config = RunConfig.from_mapping(app_config, allow_extra=False)
    assert config.to_mapping() == RunConfig().to_mapping()
    assert set(app_config) == set(option_names())


@pytest.mark.parametrize("key,value,needle", [
    ("lora-rank", 0, "lora-rank must be > 0"),
    ("lora-rank", -3, "lora-rank must be > 0"),
    ("density", 1.5, "density must be in (0, 1]"),
    ("partition", "zipf", "partition must be one of"),
    ("optimizer", "adam", "optimizer must be one of"),
    ("batch-size", "many", "batch-size must be of type int"),
    ("error-feedback", "maybe", "error-feedback must be a boolean"),
    ("rank-profile", "8,0", "rank-profile ranks must all be > 0"),
    ("aggregator-options", "novalue", "expected key=value"),
    ("batch-size", 3.5, "batch-size must be an integer"),
    ("batch-size", "3.5", "batch-size must be an integer"),
    ("codec", "nonsense", "codec must be one of"),
    ("downlink-codec", "topk-int9", "downlink-codec must be one of .*did you mean 'topk-int8'"),
    ("head-codec", "topk-int8", "head-codec must be one of"),
    ("aggregator-options", "{not json", "aggregator-options: not a JSON object"),
    ("ray-address", "localhost", "ray-address must be HOST:PORT"),
    ("ray-address", "ray://head:10001", "ray-address must be HOST:PORT"),
    ("ray-address", "head:70000", "ray-address must be HOST:PORT"),
])
def test_bad_values_name_the_option(key, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("]", r"\]")):
        RunConfig.from_mapping({key: value})


def test_unknown_option_rejected_when_strict():
    with pytest.raises(ConfigError, match="unknown option 'lora-rnak'; did you mean 'lora-rank'"):
        RunConfig.from_mapping({"lora-rnak": 4}, allow_extra=False)


def test_json_round_trip_and_rank_profile():
    config = RunConfig.from_mapping({"rank-profile": "64,32,16", "plugin-knob": 3})
    again = RunConfig.from_json(config.to_json())
    assert again == config and again.extra == {"plugin-knob": 3}
    assert [config.rank_for(i) for i in range(4)] == [64, 32, 16, 64]


def test_structured_aggregator_options_keep_their_commas():
    expected = {"seed": 0, "budgets": [2, 6], "policy": "regulated"}
    for text in ("budgets=[2,6],policy=regulated", '{"budgets": [2, 6], "policy": "regulated"}'):
        assert RunConfig(aggregator_options=text).aggregator_option_map == expected


def test_every_option_has_help():
    from pollinate.config import option_help

    rows = option_help()
    assert [r[0] for r in rows] == option_names()
    assert all(len(help_text) > 10 for *_, help_text in rows)
