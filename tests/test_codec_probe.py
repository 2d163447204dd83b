"""The round-1 codec probe replays round 1 as the simulation runs it.

The probe's numbers stand for the first round of the codec benchmark's runs only if its
training, codecs and aggregation are the simulation's: its global state after round 1 must be
the one a real federation checkpoints, for a lossless and a lossy (the default) wire.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import codec_probe
from pollinate.config import RunConfig
from pollinate.server.rundir import RunDirectory
from pollinate.simulations.launch import simulate


@pytest.mark.slow
@pytest.mark.parametrize("codecs", [{"codec": "fp32", "downlink_codec": "fp32", "head_codec": ""}, {}],
                         ids=["fp32", "default"])
def test_the_probe_replays_round_one_of_a_real_federation(tmp_path, codecs):
    config = RunConfig(num_clients=3, num_server_rounds=1, max_train_examples=40, test_examples=40, seed=5,
                       out=str(tmp_path / "run"), resume=False, **codecs)
    summary = simulate(config)
    simulated = RunDirectory(config.out).load_checkpoint().states[2]  # version 2: after round 1

    round_one = codec_probe.train_round_one(config)
    replayed = codec_probe.replay(round_one, config)

    assert sorted(replayed["state"]) == sorted(simulated)
    for name, tensor in simulated.items():
        torch.testing.assert_close(replayed["state"][name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    assert not all(torch.equal(simulated[n], t) for n, t in round_one.initial.items())  # round 1 moved it
    assert replayed["accuracy"] == pytest.approx(summary["rounds"][-1]["accuracy"], abs=1e-9)
