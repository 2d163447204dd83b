"""Custom aggregators from outside the package, and clear errors for names and updates that do not fit.

The custom aggregator is exactly the example in docs/aggregators.md
(``docs/examples/clipped_fedavg.py``); it runs in real simulations, once loaded by
dotted path and once through a real ``pollinate.aggregators`` entry point.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pollinate.aggregators import AggregationError, ClientUpdate, UnknownAggregator, available, resolve
from pollinate.cli import app
from pollinate.config import RunConfig
from pollinate.server.rundir import RunDirectory
from pollinate.simulations.launch import simulate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
EXAMPLE = EXAMPLES / "clipped_fedavg.py"
MAX_NORM = 0.05


@pytest.fixture
def examples_importable(monkeypatch):
    """``docs/examples`` importable here and in the Ray workers (Flower hands them sys.path)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))  # restored after the test
    yield
    sys.modules.pop("clipped_fedavg", None)


def test_the_doc_shows_the_example_file_verbatim():
    doc = (ROOT / "docs" / "aggregators.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert EXAMPLE.read_text() in blocks
    assert len(EXAMPLE.read_text().splitlines()) <= 30


def run_clipped(tmp_path: Path, aggregator: str) -> tuple[RunConfig, dict]:
    config = RunConfig(aggregator=aggregator, aggregator_options=f"max_norm={MAX_NORM}",
                       num_clients=3, num_server_rounds=2, max_train_examples=60, test_examples=60,
                       downlink_codec="fp32", out=str(tmp_path / "run"), resume=False)
    return config, simulate(config, num_cpus=2)


def check_clipped_run(config: RunConfig) -> None:
    """Every client was clipped, and every global step is at most max_norm long."""
    out = RunDirectory(config.out)
    rounds = out.read_metrics()[1:]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["clients"] == 3 and not r["dropped"]
        assert r["aggregator"] == {"clipped_clients": 3.0}
    states = out.load_checkpoint().states
    assert sorted(states) == [1, 2, 3]
    for old, new in zip(sorted(states)[:-1], sorted(states)[1:], strict=True):
        step = torch.sqrt(sum(((states[new][n] - states[old][n]) ** 2).sum() for n in states[new]))
        assert 0 < float(step) <= MAX_NORM * (1 + 1e-5)


def test_custom_aggregator_by_dotted_path_runs_a_federation(tmp_path, examples_importable):
    config, summary = run_clipped(tmp_path, "clipped_fedavg:ClippedFedAvg")
    assert summary["config"]["aggregator"] == "clipped_fedavg:ClippedFedAvg"
    check_clipped_run(config)


def test_custom_aggregator_by_entry_point_runs_a_federation(tmp_path, examples_importable, monkeypatch):
    site = tmp_path / "site"
    info = site / "pollinate_clipped_demo-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pollinate-clipped-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[pollinate.aggregators]\nclipped-demo = clipped_fedavg:ClippedFedAvg\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert "clipped-demo" in available()
    assert resolve("clipped-demo").__name__ == "ClippedFedAvg"

    config, _ = run_clipped(tmp_path, "clipped-demo")
    check_clipped_run(config)


@pytest.mark.parametrize(("name", "messages"), [
    ("fedavgg", ["unknown aggregator 'fedavgg'; known:", " fedit, ffa, flexlora, flora, hetlora",
                 "mypkg.module:MyAggregator"]),
    ("nosuchpkg.mod:Agg", ["cannot import 'nosuchpkg.mod'"]),
    ("pollinate.config:RunConfig", ["is not a subclass of pollinate.aggregators.Aggregator"]),
])
def test_cli_rejects_unknown_aggregators_before_starting(tmp_path, name, messages):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["simulate", "--aggregator", name, "--out", str(out)])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert output.startswith("error: aggregator") or output.startswith("error: unknown aggregator")
    assert all(m in output for m in messages)
    assert not out.exists()  # nothing was started
    with pytest.raises(UnknownAggregator):
        resolve(name)


def test_updates_with_unknown_names_or_other_ranks_are_rejected_with_the_reason(examples_importable):
    cls = resolve("clipped_fedavg:ClippedFedAvg")
    agg = cls()
    state = {"q.lora_A.weight": torch.zeros(8, 6), "q.lora_B.weight": torch.zeros(5, 8)}
    agg.begin(1, state)
    renamed = ClientUpdate(7, {"k.lora_A.weight": torch.ones(8, 6)}, 10, rank=8, alpha=16.0)
    with pytest.raises(AggregationError, match=r"client 7: unknown tensor 'k.lora_A.weight'"):
        agg.check(renamed)
    lower = ClientUpdate(3, {"q.lora_A.weight": torch.ones(4, 6)}, 10, rank=4, alpha=16.0)
    with pytest.raises(AggregationError, match=r"shape \(4, 6\), global is \(8, 6\) \(rank 4"):
        agg.check(lower)


def test_fedit_drops_a_client_of_another_rank_with_the_reason_and_completes(tmp_path):
    config = RunConfig(aggregator="fedit", rank_profile="8,4", num_clients=2, num_server_rounds=2,
                       max_train_examples=60, test_examples=60, out=str(tmp_path), resume=False)
    summary = simulate(config, num_cpus=2)
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    records = RunDirectory(config.out).read_metrics()[1:]
    for record in records:  # the rank-8 client is used every round, the rank-4 one never
        assert [c["rank"] for c in record["client_metrics"] if c["used"]] == [8.0]
        assert len(record["dropped"]) == 1
    # the rank-4 client rebuilds the rank-8 version 1 from the seed, then refuses to load it,
    # naming both ranks, in every round
    for record in records:
        reason = record["dropped"][0]["reason"]
        assert ("AggregationError: fedit: this client's LoRA rank is 4, "
                "the global adapter's rank is 8") in reason
        assert "use flora, hetlora or flexlora" in reason
