"""The convergence benchmark's derivation (issue 24): gaps and rounds to target per seed.

Pure functions on synthetic curves, no federation: a row is compared with centralised
training on its own seeds, so rows built from different numbers of finished runs
(``--cached-only``) never borrow another seed's ceiling.
"""

from __future__ import annotations

import pytest

from benchmarks import convergence


def row(system: str, seeds: dict[int, list[float]]) -> dict:
    curves = list(seeds.values())
    mean = [sum(r) / len(r) for r in zip(*curves, strict=True)]
    return {"dataset": "banking77", "system": system, "seeds": list(seeds), "seed_count": len(seeds),
            "accuracy_per_seed": [c[-1] for c in curves], "accuracy": mean[-1], "curve": mean,
            "curve_per_seed": curves}


def test_gap_and_rounds_to_target_use_centralised_on_the_rows_own_seeds():
    rows = [row("centralised", {0: [0.0, 0.8, 0.8], 1: [0.0, 0.6, 0.6]}),
            row("default", {0: [0.0, 0.5, 0.78]}),  # one seed finished: compared with seed 0's 0.8
            row("pollinate-before", {0: [0.0, 0.2, 0.3], 1: [0.0, 0.2, 0.3]}),
            row("elsewhere", {2: [0.0, 0.9, 0.9]})]  # no centralised run on seed 2: no comparison
    convergence.compare(rows)
    by = {r["system"]: r for r in rows}
    assert by["default"]["gap_to_centralised"] == pytest.approx(0.78 - 0.8)
    assert by["default"]["rounds_to_target"] == 2  # 0.78 >= 0.95 x 0.8 first at round 2
    assert by["pollinate-before"]["gap_to_centralised"] == pytest.approx(0.3 - 0.7)
    assert by["pollinate-before"]["rounds_to_target"] is None
    assert by["centralised"]["rounds_to_target"] == 1
    assert by["elsewhere"]["gap_to_centralised"] is None and by["elsewhere"]["rounds_to_target"] is None


def test_the_defaults_targets_compare_with_flower_fedavg_on_the_seeds_both_ran():
    centralised = row("centralised", {0: [0.0, 0.8, 0.8, 0.8, 0.8], 1: [0.0, 0.6, 0.6, 0.6, 0.6]})
    # seed 0: the default reaches 0.76 at round 2, Flower FedAvg at round 3; seed 1 is the default's alone
    default = row("default", {0: [0.0, 0.5, 0.77, 0.78, 0.79], 1: [0.0, 0.1, 0.1, 0.1, 0.58]})
    flower = row("flower-fedavg", {0: [0.0, 0.3, 0.5, 0.77, 0.8]})
    convergence.compare([centralised, default, flower])
    # gap on both seeds: (0.79 + 0.58) / 2 - 0.7 = -1.5 points (met); rounds on seed 0 only: 2 / 3 = 0.67x
    assert default["targets"] == "gap -1.5 points (met); rounds 2 vs flower-fedavg 3 on seed 0: 0.67x (met)"
    assert default["rounds_to_target"] == 4  # the two-seed mean curve reaches 0.665 only at round 4
    assert flower["targets"] == ""

    slow = row("flower-fedavg", {0: [0.0, 0.3, 0.5, 0.6, 0.7]})  # never at 0.76 in 4 rounds
    behind = row("default", {0: [0.0, 0.1, 0.2, 0.3, 0.7]})  # never either, and 10 points under
    convergence.compare([centralised, behind, slow])
    assert behind["targets"] == "gap -10.0 points (missed); rounds: not at target on seed 0 (missed)"
    convergence.compare([centralised, default, slow])
    assert default["targets"].endswith("rounds 2 vs flower-fedavg never in 4 on seed 0 (met)")
    convergence.compare([centralised, default])
    assert default["targets"].endswith("rounds: no flower-fedavg and centralised run on its seeds")


def test_the_default_system_trains_with_the_defaults_local_epochs_and_before_stays_pinned():
    from argparse import Namespace

    from pollinate.config import RunConfig

    args = Namespace(warmup_rounds=1)
    assert convergence.system_options("default", args) == {"local-epochs": RunConfig().local_epochs}
    before = convergence.system_options("pollinate-before", args)
    assert before["restricted-softmax"] == 1.0 and before["server-optimizer"] == "none"
    assert convergence.system_options("pollinate-before+local-epochs=3", args)["local-epochs"] == "3"
