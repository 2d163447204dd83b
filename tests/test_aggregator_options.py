"""Typed method options: ``pollinate aggregators`` lists them, and a bad one fails in one line.

Through the real console script (``pollinate`` from test_first_hour); the parsing itself
through the real methods, built-in and custom (docs/examples/clipped_fedavg.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_first_hour import error_lines, pollinate

from pollinate.aggregators import available, resolve
from pollinate.config import ConfigError, RunConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def listed(stdout: str) -> dict[tuple[str, str], tuple[str, str, str]]:
    """``(method, option) -> (type, default, help)`` from the rows of the rich table."""
    rows, method = {}, ""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) != 5 or cells[0] == "method":
            continue
        method = cells[0] or method
        rows[(method, cells[1])] = (cells[2], cells[3], cells[4])
    return rows


def installed(site: Path, name: str, methods: dict[str, str]) -> Path:
    """``site`` holding distribution ``name`` whose ``pollinate.aggregators`` entry points are ``methods``."""
    files = {"METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             "entry_points.txt": "\n".join(["[pollinate.aggregators]",
                                            *(f"{k} = {v}" for k, v in methods.items())]) + "\n"}
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    for file, text in files.items():
        (info / file).write_text(text)
    return site


def test_aggregators_lists_built_ins_entry_points_and_paths_with_their_options(tmp_path, monkeypatch):
    site = installed(tmp_path / "site", "pollinate-listing-demo",
                     {"clipped-demo": "clipped_fedavg:ClippedFedAvg"})
    monkeypatch.setenv("PYTHONPATH", f"{site}:{EXAMPLES}")
    result = pollinate("aggregators", "--path", "clipped_fedavg:ClippedFedAvg", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = listed(result.stdout)
    methods = {method for method, _ in rows}
    assert methods == {*available(), "clipped-demo", "clipped_fedavg:ClippedFedAvg"}
    assert all((method, "seed") in rows for method in methods)  # every method receives the run seed
    assert rows[("expert-routing", "client-experts")][:2] == ("int", "2")
    assert rows[("expert-routing", "anchors")][:2] == ("tuple[int, ...]", "[]")
    assert rows[("selective-layer", "budgets")][:2] == ("tuple[int | None, ...]", "[]")
    assert "2:2:6" in rows[("selective-layer", "budgets")][2]
    assert rows[("selective-layer", "lambda")][:2] == ("float", "0.1")
    weighting = rows[("hetlora", "weighting")]
    assert weighting[:2] == ("str", '"norm"') and weighting[2].startswith("per-client weight of each layer")
    assert "free-form" in rows[("clipped-demo", "(any)")][2]


def test_aggregators_with_a_path_that_does_not_import_fails_in_one_line(tmp_path):
    result = pollinate("aggregators", "--path", "nosuchpkg.mod:Agg", cwd=tmp_path)
    assert result.returncode == 2
    assert len(error_lines(result)) == 1 and "cannot import 'nosuchpkg.mod'" in error_lines(result)[0]


@pytest.mark.parametrize("method, options, needle", [
    ("hetlora", "weighting=nope", "hetlora: weighting must be one of norm, examples, got 'nope'"),
    ("hetlora", "weightng=norm", "hetlora: unknown option 'weightng'; did you mean 'weighting'?"),
    ("expert-routing", "experts=2.5", "expert-routing: experts must be an integer, got 2.5"),
    ("selective-layer", 'budgets=[2,"x"]', "selective-layer: budgets: expected a number of layers"),
    ("flora", "rank=4", "flora: unknown option 'rank' (known: seed)"),
])
def test_a_bad_method_option_fails_before_round_1_in_one_line(tmp_path, method, options, needle):
    result = pollinate("simulate", "--aggregator", method, "--set", f"aggregator-options={options}",
                       cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(error_lines(result)) == 1 and needle in error_lines(result)[0], result.stdout
    assert not (tmp_path / "runs").exists()


def options_of(method: str, text: str):
    config = RunConfig(aggregator=method, aggregator_options=text, seed=7)
    return resolve(method)(**config.aggregator_option_map).config


@pytest.mark.parametrize("text", ["budgets=2:6", "budgets=[2,6]", 'budgets="2/6"', '{"budgets": [2, 6]}'])
def test_budgets_as_text_or_as_a_list_parse_alike(text):
    assert options_of("selective-layer", text).budgets == (2, 6)


def test_options_are_typed_and_carry_the_run_seed():
    config = options_of("expert-routing", "anchors=0:5,top-k=1,expert_heads=false,balance-rate=2")
    assert (config.anchors, config.top_k, config.expert_heads, config.balance_rate) == ((0, 5), 1, False, 2.0)
    assert config.seed == 7 and options_of("fedit", "").seed == 7
    assert options_of("expert-routing", "anchors=[0,5]").anchors == (0, 5)
    with pytest.raises(ConfigError, match=r"expert-routing: anchors must be an integer, got 1\.5"):
        options_of("expert-routing", "anchors=[0,1.5]")


def test_a_method_without_an_options_dataclass_keeps_its_raw_options(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    try:
        clipped = resolve("clipped_fedavg:ClippedFedAvg")(max_norm=0.5, anything="goes", seed=3)
    finally:
        sys.modules.pop("clipped_fedavg", None)
    assert clipped.options == {"max_norm": 0.5, "anything": "goes", "seed": 3}
    assert clipped.config.seed == 3
