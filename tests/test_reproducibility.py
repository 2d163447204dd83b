"""One seed, one result: two simulations of the same run end with bitwise-identical adapters.

Flower's simulation gives nodes random ids and replies arrive in any order; the server
aggregates updates in the order of their content (``server/replies.py``, ``order_key``),
clients seed their training by round and partition, so neither shows in the result.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pollinate.config import RunConfig
from pollinate.server.rundir import RunDirectory
from pollinate.simulations.launch import simulate


@pytest.mark.slow
def test_two_simulations_with_one_seed_give_identical_adapters(tmp_path):
    runs = [RunConfig(num_clients=4, num_server_rounds=2, max_train_examples=50, test_examples=50, seed=3,
                      out=str(tmp_path / name), resume=False) for name in ("first", "second")]
    for config in runs:
        simulate(config)
    first, second = (RunDirectory(c.out).load_checkpoint().states for c in runs)
    assert sorted(first) == sorted(second) == [1, 2, 3]
    for version in first:
        for name, tensor in first[version].items():
            assert torch.equal(tensor, second[version][name]), (version, name)
    adapters = [load_file(f"{c.out}/adapter/adapter_model.safetensors") for c in runs]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])
    assert not all(torch.equal(first[1][n], first[3][n]) for n in first[1])  # the runs did train
