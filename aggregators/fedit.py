"""FedIT: weighted FedAvg of the LoRA factors A and B (and the head) over clients.

Each tensor is averaged over the clients that sent it, weighted by their example
counts: ``global += sum_k n_k delta_k / sum_k n_k``. That equals FedAvg of the
clients' adapter states because every client starts the round from the same global
state. It is not exact for the LoRA product (mean(B) mean(A) != mean(B A)); see
:mod:`pollinate.aggregators.flora` for the exact method.
"""

from __future__ import annotations

from pollinate.aggregators.base import Aggregator


class FedIT(Aggregator):
    """Example-weighted averaging of every adapter tensor; needs one rank for all clients."""

    name = "fedit"
