"""Norm-clipped FedAvg: no client moves the global adapter by more than ``max_norm``."""

import torch

from pollinate.aggregators import Aggregator, ClientUpdate
from pollinate.spec import Tensors


class ClippedFedAvg(Aggregator):
    """Example-weighted mean of client deltas, each scaled down to L2 norm <= ``max_norm``.

    The client half is the default one (train every adapter tensor, send the change);
    ``Aggregator.check`` already rejects unknown names and mismatched shapes or ranks.
    """

    name = "clipped-fedavg"

    def begin(self, rnd: int, state: Tensors) -> None:
        super().begin(rnd, state)
        self.clipped = 0

    def accumulate(self, update: ClientUpdate) -> None:
        norm = float(torch.sqrt(sum(t.float().square().sum() for t in update.delta.values())))
        factor = min(1.0, float(self.options.get("max_norm", 1.0)) / max(norm, 1e-12))
        self.clipped += factor < 1.0
        for name, tensor in update.delta.items():
            self._fold(name, tensor * factor, float(update.num_examples))

    def metrics(self) -> dict[str, float]:
        return {"clipped_clients": float(self.clipped)}
