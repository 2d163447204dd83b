"""Hostile clients: every reply check holds against a node that tampers with its real reply.

One federation holds ten hostile partitions that play a different attack each round
(``simulations/faults.py`` tampers with the reply of the real ``handle_train`` at the
Flower message level) and three honest ones. The reference run is the same federation
with the hostile partitions crashing instead. Every round must complete, every attack
must be dropped with its named check in metrics.jsonl, and the global adapter must be
bitwise that of the reference: the honest clients' updates are aggregated in an order
that does not depend on the dropped ones (``server/replies.py``, ``order_key``).
"""

from __future__ import annotations

import pytest
import torch

from pollinate.config import RunConfig
from pollinate.server.replies import norm_outliers
from pollinate.server.rundir import RunDirectory
from pollinate.simulations.faults import fault_nodes
from pollinate.simulations.launch import simulate

# attack -> (the check that must drop it, a word of its reason)
EXPECTED = {
    "examples-inf": ("num-examples", "inf"),
    "examples-nan": ("num-examples", "nan"),
    "examples-huge": ("num-examples", "1e+30"),
    "examples-negative": ("num-examples", "-7 is outside"),
    "examples-zero": ("num-examples", "0 is outside"),
    "metric-collides": ("server-keys", "'used'"),
    "report-collides": ("server-keys", "'node'"),
    "rank-zero": ("rank", "0 is not a positive integer"),
    "rank-mismatch": ("rank", "not rank 16"),
    "alpha-inf": ("metrics", "'alpha' is inf"),
    "held-negative": ("held-version", "-1 is not a version"),
    "held-future": ("held-version", str(2**62)),
    "status-unknown": ("status", "'excellent'"),
    "report-not-dict": ("report", "not an object"),
    "payload-empty": ("payload", "empty"),
    "foreign-run": ("header", "run id"),
    "wrong-base": ("header", "base version"),
    "replay": ("header", "round is 1, the server sent 2"),  # round 1's real payload, sent in round 2
}
# partition -> its attack in rounds 1 and 2; partitions 10-12 are honest
PLANS = {
    0: ("examples-inf", "examples-nan"),
    1: ("examples-huge", "examples-negative"),
    2: ("examples-zero", "metric-collides"),
    3: ("report-collides", "rank-zero"),
    4: ("rank-mismatch", "alpha-inf"),
    5: ("held-negative", "held-future"),
    6: ("status-unknown", "report-not-dict"),
    7: ("payload-empty", "foreign-run"),
    8: ("wrong-base", "wrong-base"),
    9: ("payload-empty", "replay"),
}
HONEST = 3
SMALL = dict(num_clients=len(PLANS) + HONEST, num_server_rounds=2, partition="iid", max_train_examples=16,
             batch_size=16, test_examples=50, resume=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    hostile = RunConfig(**SMALL, out=str(root / "hostile"))
    reference = RunConfig(**SMALL, out=str(root / "reference"))
    summary = simulate(hostile, faults=PLANS)
    simulate(reference, faults={pid: "crash" for pid in PLANS})
    return hostile, reference, summary


@pytest.mark.slow
def test_every_attack_is_dropped_with_its_named_check(runs):
    hostile, _, summary = runs
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    nodes = fault_nodes(hostile.out)
    assert sorted(nodes) == sorted(PLANS)
    for record in RunDirectory(hostile.out).read_metrics()[1:]:
        rnd = record["round"]
        assert record["clients"] == HONEST
        dropped = {d["node"]: d for d in record["dropped"]}
        assert len(dropped) == len(record["dropped"]) == len(PLANS)
        for pid, plan in PLANS.items():
            check, word = EXPECTED[plan[rnd - 1]]
            entry = dropped[nodes[pid]]
            assert entry["check"] == check, (plan[rnd - 1], entry)
            assert word in entry["reason"], (plan[rnd - 1], entry)
        used = [c for c in record["client_metrics"] if c["used"]]
        assert len(used) == HONEST and not set(dropped) & {c["node"] for c in used}
        for client in record["client_metrics"]:  # server keys are the server's: a node is what sent it
            assert client["node"] not in dropped or not client["used"]
            assert client["num_examples"] <= hostile.max_train_examples


@pytest.mark.slow
def test_global_adapter_is_bitwise_that_of_the_honest_clients_alone(runs):
    hostile, reference, _ = runs
    got = RunDirectory(hostile.out).load_checkpoint().states
    want = RunDirectory(reference.out).load_checkpoint().states
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for version in want:
        for name in want[version]:
            assert torch.equal(got[version][name], want[version][name]), (version, name)


def test_norm_screen_drops_only_updates_far_outside_the_robust_spread():
    honest = {1: 1.0, 2: 1.1, 3: 0.9, 4: 1.05}
    assert norm_outliers(honest, 3.0) == {}
    assert set(norm_outliers({**honest, 5: 50.0}, 3.0)) == {5}
    assert set(norm_outliers({**honest, 5: 1.3}, 3.0)) == {5}  # MAD 0.05: 1.3 > 1.05 + 3 x 0.05
    assert norm_outliers({**honest, 5: 1.3}, 6.0) == {}
    assert norm_outliers({1: 1.0, 2: 50.0}, 3.0) == {}  # two updates have no spread to judge by
    assert norm_outliers({**honest, 5: 50.0}, 0.0) == {}  # off
    assert norm_outliers({1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0005}, 3.0) == {}  # MAD floored at 1e-3 x median


@pytest.mark.slow
def test_norm_screen_drops_an_amplified_update_in_a_federation(tmp_path):
    """A well-formed update scaled by 1000 passes every reply check; the norm screen drops it."""
    config = RunConfig(**{**SMALL, "num_clients": 4, "num_server_rounds": 1}, norm_screen=5.0,
                       out=str(tmp_path))
    simulate(config, faults={0: "amplify"})
    record = RunDirectory(config.out).read_metrics()[1]
    amplified = fault_nodes(config.out)[0]
    assert [(d["node"], d["check"]) for d in record["dropped"]] == [(amplified, "norm-screen")]
    assert "exceeds median" in record["dropped"][0]["reason"]
    assert record["clients"] == 3
