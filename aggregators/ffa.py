"""FFA-LoRA: freeze every A at its shared initial value, train and average only B (and the head).

Global state: the adapter as built (``<layer>.lora_A.weight``, ``<layer>.lora_B.weight``,
head tensors), one rank for all clients. ``lora_A`` comes from version 0 of the global
state and never changes, so all clients hold the same A and averaging is exact for the
LoRA product: ``s * mean_k(B_k) A = mean_k(s * B_k A)``, weights ``p_k = n_k / sum n``
over the clients that sent each tensor (FedIT's rule, applied to B and the head only).

Client: :meth:`FFAClient.prepare` freezes ``lora_A``; the update carries the change of
``lora_B`` and of the head. The server rejects updates with ``lora_A``, with a rank other
than the global one, or with a scaling ``alpha / rank`` different from the other clients
of the round (the product would no longer be a plain mean).

Downlink: the global delta minus the ``lora_A`` tensors that are exactly zero (every
round after a client's first), so a lossy downlink codec never perturbs a client's A
after it joined: clients that decode the same version-0 A hold the same A.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pollinate.aggregators.base import AggregationError, Aggregator, ClientPart, ClientUpdate
from pollinate.aggregators.lora_math import (
    check_same_rank,
    check_update,
    factor_shapes,
    head_shapes,
    split_factor,
)
from pollinate.aggregators.options import MethodOptions
from pollinate.data import Encoded
from pollinate.modeling import AdapterModel
from pollinate.spec import AdapterSpec, Tensors


def _is_a(name: str) -> bool:
    parsed = split_factor(name)
    return parsed is not None and parsed[1] == "A"


class FFAClient(ClientPart):
    """Trains B and the head on top of the shared, frozen A."""

    def load_global(self, model: AdapterModel, state: Tensors) -> None:
        check_same_rank(model, state, "ffa")
        super().load_global(model, state)

    def prepare(self, model: AdapterModel, data: Encoded,
                probe: Sequence[Mapping[str, torch.Tensor]]) -> None:
        model.set_trainable({n for n in model.adapter_names if not _is_a(n)})

    def update(self, model: AdapterModel, start: Tensors) -> Tensors:
        trained = model.adapter_state()
        return {n: trained[n] - start[n] for n in model.adapter_names
                if not _is_a(n) and model.parameter(n).requires_grad}


class FFA(Aggregator):
    """Example-weighted mean of B and head deltas; A is frozen and shared."""

    name = "ffa"
    Options = MethodOptions  # seed only
    client_part = FFAClient

    def uplink_spec(self, model: AdapterModel) -> AdapterSpec:
        return AdapterSpec.of({n: t for n, t in model.adapter_state().items() if not _is_a(n)},
                              free_rank=True)

    def begin(self, rnd: int, state: Tensors) -> None:
        super().begin(rnd, state)
        self._layers = factor_shapes(state)
        self._heads = head_shapes(state)
        self._scaling: float | None = None

    def check(self, update: ClientUpdate) -> None:
        check_update(update, self.name, layers=self._layers, heads=self._heads,
                     rank_rule="equal", allow_a=False)
        if self._scaling is not None and abs(update.scaling - self._scaling) > 1e-9 * self._scaling:
            raise AggregationError(
                f"ffa: client {update.node_id}: LoRA scaling alpha/rank = {update.scaling:g}, "
                f"other clients of this round use {self._scaling:g}; FFA averages B against "
                "one shared A and needs one scaling")

    def accumulate(self, update: ClientUpdate) -> None:
        if self._scaling is None:
            self._scaling = update.scaling
        super().accumulate(update)

    def pack_downlink(self, delta: Tensors, *, latest_round: bool) -> Tensors:
        return {n: t for n, t in delta.items() if not (_is_a(n) and not bool(t.any()))}
