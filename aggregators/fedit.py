"""FedIT: weighted FedAvg of the LoRA factors A and B (and the head) over clients.

Each tensor is averaged over the clients that sent it, weighted by their example
counts: ``global += sum_k n_k delta_k / sum_k n_k``. That equals FedAvg of the
clients' adapter states because every client starts the round from the same global
state. It is not exact for the LoRA product (mean(B) mean(A) != mean(B A)); see
:mod:`pollinate.aggregators.flora` for the exact method.

All clients need the global rank: a client of another rank refuses before training
(:func:`~pollinate.aggregators.lora_math.check_same_rank`) and the server rejects any
update of another rank (``Aggregator.check``); both errors name the ranks.
"""

from __future__ import annotations

from pollinate.aggregators.base import Aggregator, ClientPart
from pollinate.aggregators.lora_math import check_same_rank
from pollinate.aggregators.options import MethodOptions
from pollinate.modeling import AdapterModel
from pollinate.spec import Tensors


class FedITClient(ClientPart):
    """The default client half, after checking that this client has the global rank."""

    def load_global(self, model: AdapterModel, state: Tensors) -> None:
        check_same_rank(model, state, "fedit")
        super().load_global(model, state)


class FedIT(Aggregator):
    """Example-weighted averaging of every adapter tensor; needs one rank for all clients."""

    name = "fedit"
    Options = MethodOptions  # seed only
    client_part = FedITClient
