"""The plain-Flower baseline of the foundation benchmark: same start as Pollinate, real FedAvg rounds."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model_state_dict

from benchmarks import flower_baseline
from pollinate.config import RunConfig
from pollinate.modeling import ModelSpec, build_model

CONFIG = RunConfig(num_clients=2, num_server_rounds=1, max_train_examples=24, test_examples=40,
                   target_modules="query,value", min_train_nodes=2, partition="iid", learning_rate=5e-3)


@pytest.mark.parametrize("model", ["", "random:bert-tiny"])
def test_baseline_model_starts_from_pollinates_initial_adapter(model):
    """Same seed, same weights: the benchmark compares training, not initialisations."""
    config = RunConfig.from_mapping({**CONFIG.to_mapping(), "model": model})
    peft_state = get_peft_model_state_dict(flower_baseline.get_model(config, num_labels=4))
    ours = build_model(ModelSpec(name=model, num_labels=4, rank=CONFIG.lora_rank, alpha=CONFIG.lora_alpha,
                                 target_modules=("query", "value"), seed=CONFIG.seed)).adapter_state()
    theirs = {name.removeprefix("base_model.model."): t for name, t in peft_state.items()}
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name


@pytest.mark.slow
def test_baseline_federation_trains_and_counts_fp32_bytes():
    rounds = flower_baseline.run(CONFIG)
    assert [r["round"] for r in rounds] == [0, 1]
    model = flower_baseline.get_model(CONFIG, num_labels=4)
    fp32_bytes = 4 * sum(t.numel() for t in get_peft_model_state_dict(model).values())
    first = rounds[1]
    # the full fp32 adapter travels both ways (plus a few bytes of array headers per tensor)
    assert fp32_bytes <= first["bytes_up"] == first["bytes_down"] < fp32_bytes * 1.05
    assert first["loss"] != rounds[0]["loss"] and 0.0 <= first["accuracy"] <= 1.0
    assert first["seconds"] > 0 and first["t_end"] > rounds[0]["t_end"]
