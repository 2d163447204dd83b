"""Real Flower simulations (Ray backend) on the generated task and a tiny causal LM."""

from __future__ import annotations

import json

import pytest
import torch

from pollinate import data as datalib
from pollinate.aggregators import resolve
from pollinate.config import RunConfig
from pollinate.modeling import ModelSpec, build_model, load_exported
from pollinate.server.rundir import RunDirectory
from pollinate.simulations.launch import simulate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = RunConfig(num_clients=3, num_server_rounds=2, max_train_examples=200,
                       test_examples=200, out=str(out), resume=False, learning_rate=5e-3,
                       target_accuracy=0.4)
    return config, simulate(config)


def test_accuracy_rises_and_outputs_are_written(classification_run):
    config, summary = classification_run
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["accuracy"] > rounds[0]["accuracy"] + 0.1
    for r in rounds[1:]:
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["clients"] == 3
    out = RunDirectory(config.out)
    assert json.loads((out.path / "summary.json").read_text())["rounds"] == rounds
    assert len(out.read_metrics()) == 3
    for png in ("quality.png", "bytes.png"):
        assert (out.path / png).stat().st_size > 1000


def test_summary_reports_cumulative_cost_and_time_to_target(classification_run):
    config, summary = classification_run
    rounds = summary["rounds"]
    assert [r["cum_bytes_up_per_client"] for r in rounds] == [
        round(sum(q["bytes_up"] / 3 for q in rounds[:i + 1])) for i in range(3)]
    assert rounds[0]["cum_seconds"] == 0.0 < rounds[1]["cum_seconds"] < rounds[2]["cum_seconds"]
    reached = next(r for r in rounds if r["accuracy"] >= 0.4)  # round 2 is > round 0 + 0.1 >= 0.4
    assert summary["to_target"] == {
        "target_accuracy": 0.4, "rounds": reached["round"], "seconds": reached["cum_seconds"],
        "bytes_up_per_client": reached["cum_bytes_up_per_client"],
        "bytes_down_per_client": reached["cum_bytes_down_per_client"]}


def test_exported_adapter_reproduces_the_global_model(classification_run):
    config, summary = classification_run
    ckpt = RunDirectory(config.out).load_checkpoint()
    state = ckpt.states[max(ckpt.states)]
    spec = ModelSpec(num_labels=summary["num_labels"], rank=config.lora_rank,
                     alpha=config.lora_alpha, seed=config.seed)
    model = build_model(spec)
    resolve(config.aggregator).client_part({}, {}).load_global(model, state)
    loaded = load_exported(config.out + "/adapter", spec)
    texts = list(datalib.test_table(config)["text"][:16])
    batch = model.tokenizer(texts, return_tensors="pt", padding=True)
    model.model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model.model(**batch).logits, loaded(**batch).logits, atol=1e-5)


def test_causal_lm_federation_loss_falls(tmp_path):
    config = RunConfig(task="causal-lm", model="random:llama-tiny", partition="iid",
                       num_clients=3, num_server_rounds=2, max_train_examples=150,
                       test_examples=100, learning_rate=1e-2, out=str(tmp_path), resume=False)
    rounds = simulate(config)["rounds"]
    assert rounds[2]["loss"] < rounds[0]["loss"]
    assert "perplexity" in rounds[2]
