"""A new user's first hour, through the real console script: data as people have it, every
mistake caught before round 1 in one line, loud failures, run directories that are never
silently overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pollinate import data as datalib
from pollinate.config import RunConfig
from pollinate.modeling import ModelSpec, load_exported

NAMES = {0: "sports", 1: "markets", 2: "tech", 3: "politics"}
TINY = ["--set", "max-train-examples=60", "--set", "test-examples=60", "--set", "batch-size=16"]


def pollinate(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed ``pollinate`` console script, no stdin, a wide terminal so lines stay whole."""
    env = {**os.environ, "COLUMNS": "200", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    script = Path(sys.executable).parent / "pollinate"
    return subprocess.run([str(script), *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def named_csv(path: Path, n: int, seed: int) -> Path:
    table = datalib.generated_classification(n, seed=seed)
    table = table.map(lambda row: {"label": NAMES[row["label"]]}, features=None)
    table.to_csv(str(path), index=False)
    return path


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_string_labels_train_and_the_exported_adapter_predicts_names(tmp_path):
    train = named_csv(tmp_path / "train.csv", 300, seed=1)
    result = pollinate("simulate", "--clients", "2", "--rounds", "1", "--train-data", str(train),
                       "--out", str(tmp_path / "run"), *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["labels"] == sorted(NAMES.values())
    assert [r["round"] for r in summary["rounds"]] == [0, 1] and summary["rounds"][1]["clients"] == 2
    exported = json.loads((tmp_path / "run" / "adapter" / "config.json").read_text())
    assert exported["id2label"] == {str(i): name for i, name in enumerate(sorted(NAMES.values()))}
    model = load_exported(tmp_path / "run" / "adapter", ModelSpec(num_labels=4))
    assert model.config.id2label[1] == "politics" and model.config.label2id["tech"] == 3


def test_without_test_data_the_server_scores_a_held_out_share_of_the_users_file(tmp_path):
    train = named_csv(tmp_path / "train.csv", 200, seed=2)
    config = RunConfig(train_data=str(train), test_fraction=0.25)
    clients, held_out = datalib.train_table(config), datalib.test_table(config)
    assert (len(clients), len(held_out)) == (150, 50)
    assert not set(clients["text"]) & set(held_out["text"])
    assert set(held_out["text"]) <= set(datalib.load_table(str(train), config)["text"])
    assert datalib.label_names(held_out) == tuple(sorted(NAMES.values()))


@pytest.mark.parametrize("name,content,needle", [
    ("empty.csv", "text,label\nhello there,World\nstocks rise,\n",
     "empty.csv: line 3, column 'label': empty label"),
    ("odd.csv", "text,label\na,0\nb,1\nc,2\nd,two\n",
     "odd.csv: line 5, column 'label': label 'two' is not an integer like the other labels"),
    ("broken.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n',
     "broken.jsonl: line 2: not valid JSON"),
    ("short.csv", "text,label\na,x\nb\n", "short.csv: line 3: 1 fields, the header has 2"),
])
def test_each_bad_data_file_is_one_line_naming_file_and_row(tmp_path, name, content, needle):
    (tmp_path / name).write_text(content)
    result = pollinate("simulate", "--clients", "1", "--train-data", str(tmp_path / name), cwd=tmp_path)
    assert result.returncode == 2
    assert len(error_lines(result)) == 1 and needle in error_lines(result)[0], result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_test_label_the_training_file_never_had_names_its_row(tmp_path):
    train = named_csv(tmp_path / "train.csv", 40, seed=3)
    (tmp_path / "test.csv").write_text("text,label\ngoal match,sports\nrain today,weather\n")
    result = pollinate("simulate", "--clients", "2", "--train-data", str(train), "--test-data",
                       str(tmp_path / "test.csv"), cwd=tmp_path)
    assert result.returncode == 2
    assert "test.csv: line 3, column 'label': label 'weather' is not one of the run's labels" in result.stdout


@pytest.mark.parametrize("args,needle", [
    (["--set", "codec=nonsense"], "codec must be one of"),
    (["--set", "batch-size=3.5"], "batch-size must be an integer, got 3.5"),
    (["--set", "lora-rnak=4"], "unknown option 'lora-rnak'; did you mean 'lora-rank'"),
    (["--aggregator", "flora", "--set", "codec=topk-ternary"],
     "aggregator=flora learns nothing through the coarse codec=topk-ternary"),
    (["--aggregator", "selective-layer", "--set", 'aggregator-options={"policy": "nope"}'],
     "unknown selection policy 'nope'"),
])
def test_bad_options_fail_before_round_1_in_one_line(tmp_path, args, needle):
    result = pollinate("simulate", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(error_lines(result)) == 1 and needle in error_lines(result)[0], result.stdout
    assert not (tmp_path / "runs").exists()


def test_deploy_run_dry_run_checks_the_merged_config(tmp_path):
    app = Path(__file__).resolve().parents[1]
    bad = pollinate("deploy", "run", str(app), "--dry-run", "--set", "codec=nonsense", cwd=tmp_path)
    assert bad.returncode == 2 and "codec must be one of" in bad.stdout
    unscored = pollinate("deploy", "run", str(app), "--dry-run", cwd=tmp_path)
    assert unscored.returncode == 2 and "needs test-data" in unscored.stdout
    ok = pollinate("deploy", "run", str(app), "--dry-run", "--set", "num-labels=2", cwd=tmp_path)
    assert ok.returncode == 0 and "flwr run" in ok.stdout


def test_an_earlier_run_is_not_overwritten_without_a_flag(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    result = pollinate("simulate", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2 and "holds an earlier run; pass --resume" in result.stdout
    assert (tmp_path / "run" / "summary.json").read_text() == "{}"


def test_options_lists_every_key_with_its_help(tmp_path):
    result = pollinate("options", cwd=tmp_path)
    assert result.returncode == 0
    for key in ("test-fraction", "aggregator-options", "overwrite", "codec"):
        assert key in result.stdout
    assert "share of train-data held out" in result.stdout


@pytest.mark.slow
def test_a_run_in_which_every_client_fails_exits_non_zero_with_their_reasons(tmp_path):
    result = pollinate("simulate", "--clients", "2", "--rounds", "1", "--out", str(tmp_path / "run"),
                       "--set", "max-payload-bytes=600", *TINY, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "round 1: no update could be aggregated" in output
    assert "no round aggregated an update" in error_lines(result)[0]
    assert "Traceback" not in output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds"][1]["clients"] == 0
