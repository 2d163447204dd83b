"""The round profile: components of every round in metrics.jsonl that add up to its wall time,
`pollinate simulate --profile`, and a run stopped between its checkpoint and its metrics line."""

from __future__ import annotations

import json
import shutil

import pytest
from test_first_hour import pollinate

from pollinate.config import RunConfig
from pollinate.server.profile import COMPONENTS, RoundClock, summarize
from pollinate.server.rundir import RunDirectory
from pollinate.simulations.launch import simulate

TINY = ["--clients", "2", "--rounds", "2", "--set", "model=random:bert-tiny",
        "--set", "max-train-examples=40", "--set", "test-examples=40", "--set", "batch-size=8"]


def test_client_time_is_split_by_the_clients_reports():
    """Busy = the union of client intervals inside the wait; train / other by summed times."""
    clock = RoundClock()
    clock.seconds["transport"], clock.window = 10.0, (100.0, 110.0)
    clock.split_clients([
        {"client-started": 101.0, "client-seconds": 2.0, "train-seconds": 1.0},
        {"client-started": 102.0, "client-seconds": 2.0, "train-seconds": 1.0},  # overlaps the first
        {"client-started": 109.5, "client-seconds": 4.0, "train-seconds": 4.0},  # clipped to the wait
        {"train-loss": 0.5},  # reports no times: counts nothing
    ])
    busy = 3.0 + 0.5
    assert clock.seconds["train"] == pytest.approx(busy * 6 / 8)
    assert clock.seconds["client_other"] == pytest.approx(busy * 2 / 8)
    assert clock.seconds["transport"] == pytest.approx(10.0 - busy)


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profiled") / "run"
    result = pollinate("simulate", *TINY, "--profile", "--out", str(out), cwd=out.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


@pytest.mark.slow
def test_every_round_records_components_that_add_up_to_its_seconds(profiled_run):
    out, _ = profiled_run
    records = RunDirectory(out).read_metrics()
    assert [r["round"] for r in records] == [0, 1, 2] and "profile" not in records[0]
    for record in records[1:]:
        profile = record["profile"]
        assert tuple(profile) == COMPONENTS
        assert all(seconds >= 0 for seconds in profile.values()), profile
        assert sum(profile.values()) == pytest.approx(record["seconds"], rel=1e-9)
        assert profile["train"] > 0 and profile["evaluate"] > 0 and profile["checkpoint"] > 0
        for client in record["client_metrics"]:
            assert 0 < client["train-seconds"] < client["client-seconds"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["seconds"] for r in summary["rounds"][1:]] == [r["seconds"] for r in records[1:]]


@pytest.mark.slow
def test_simulate_profile_prints_the_table_of_the_runs_metrics(profiled_run):
    out, stdout = profiled_run
    rows = summarize(RunDirectory(out).read_metrics())
    assert "Round profile" in stdout
    for row in rows:  # every component with the share metrics.jsonl gives it
        line = next(line for line in stdout.splitlines() if f" {row['component']} " in line)
        assert f"{row['share']:.1%}" in line, line
    assert sum(r["share"] for r in rows if r["component"] != "overhead") == pytest.approx(1.0)


@pytest.mark.slow
def test_resume_recovers_a_round_checkpointed_before_its_metrics_line(profiled_run, tmp_path):
    """The metrics line is written after the checkpoint (it records the checkpoint's time): a
    server stopped between the two resumes with that round's record from the checkpoint."""
    out, _ = profiled_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    lines = (copy / "metrics.jsonl").read_text().splitlines(keepends=True)
    (copy / "metrics.jsonl").write_text("".join(lines[:-1]))  # stopped before round 2's line
    saved = RunDirectory(out).load_checkpoint().config
    config = RunConfig.from_mapping({**saved, "out": str(copy), "resume": True, "num-server-rounds": 3})
    simulate(config)
    records = RunDirectory(copy).read_metrics()
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    before = json.loads(lines[-1])
    for key in ("accuracy", "loss", "bytes_up", "bytes_down", "version", "client_metrics"):
        assert records[2][key] == before[key], key
