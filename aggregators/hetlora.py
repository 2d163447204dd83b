"""HetLoRA (Cho et al.): heterogeneous ranks by truncation, zero-padding and norm weights.

Global state: the adapter at the maximum client rank ``R`` (``<layer>.lora_A.weight``
R x in, ``<layer>.lora_B.weight`` out x R, head tensors), read with the server model's
scaling ``s_g = alpha / R``: the global adapter is ``s_g B A``.

Client of rank ``r`` and scaling ``s_k = alpha_k / r`` (:class:`HetLoRAClient`):
``load_global`` takes the first ``r`` rows of A and the first ``r`` columns of B, and
multiplies B by ``s_g / s_k`` (instruction ``global_scaling``; 1 without it) so that its
adapter ``s_k B_k A_k`` equals the global one truncated to rank r, ``s_g B[:, :r] A[:r]``.
It then trains and sends the change of its rank-r factors and of the head.

Server: each client's B change is brought back to global units (times ``s_k / s_g``),
both factor changes are zero-padded to rank R, and each layer is averaged with
HetLoRA's sparsity weights:

    w_{k,l} = n_k * ||dW_{k,l}||_F,  dW_{k,l} = s_k (B_k' A_k' - B_k A_k)  (the product's change),
    delta_l = sum_k w_{k,l} pad(dX_{k,l}) / sum_k w_{k,l}           for X in {A, B},

over the clients that sent layer l (per layer, i.e. per LoRA module). A client whose
update leaves a layer's product unchanged gets weight 0 there; if every client of the
round does, the layer falls back to example weights ``n_k``. Head tensors use example
weights. Rows/columns above a client's rank receive zeros from it (they are diluted,
as with zero-padding in the paper). Returned deltas are in the padded (rank-R) space;
each client truncates again when loading. Downlink: the delta as it is.

Option ``weighting`` (``aggregator-options``): ``norm`` (default, the rule above) or
``examples`` (``w_{k,l} = n_k``): plain zero-padding FedAvg of the factors, which is how
the FLoRA paper runs FedIT with heterogeneous ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pollinate.aggregators.base import Aggregator, ClientPart, ClientUpdate
from pollinate.aggregators.lora_math import (
    a_name,
    b_name,
    check_update,
    factor_pairs,
    factor_shapes,
    head_shapes,
    head_state,
    pad_rank,
    product_change_norm,
    truncate_rank,
)
from pollinate.aggregators.options import MethodOptions
from pollinate.modeling import AdapterModel
from pollinate.spec import AdapterSpec, Tensors

WEIGHTINGS = ("norm", "examples")


def client_factors(state: Mapping[str, torch.Tensor], layer: str, rank: int,
                   scale_b: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of a rank-``rank`` client: the first columns of B (times ``scale_b``) and
    the first rows of A."""
    return (truncate_rank(state[b_name(layer)], rank, "B") * scale_b,
            truncate_rank(state[a_name(layer)], rank, "A"))


class HetLoRAClient(ClientPart):
    """Loads the global adapter truncated to the client's own rank."""

    def load_global(self, model: AdapterModel, state: Tensors) -> None:
        scale_b = float(self.instructions.get("global_scaling", model.scaling)) / model.scaling
        tensors = head_state(model, state)
        for layer in model.lora_layers():
            if a_name(layer) not in state:
                continue
            rank = model.parameter(a_name(layer)).shape[0]
            if rank > state[a_name(layer)].shape[0]:
                raise ValueError(f"hetlora: client rank {rank} exceeds the global rank "
                                 f"{state[a_name(layer)].shape[0]} of layer {layer!r}")
            tensors[b_name(layer)], tensors[a_name(layer)] = client_factors(
                state, layer, rank, scale_b)
        model.load_adapter_state(tensors)


@dataclass(frozen=True)
class HetLoRAOptions(MethodOptions):
    """HetLoRA's ``aggregator-options``."""

    weighting: str = field(default="norm", metadata={
        "help": "per-client weight of each layer: norm = the update's Frobenius norm, "
                "examples = example counts only", "choices": WEIGHTINGS})


class HetLoRA(Aggregator):
    """Zero-padding, norm-weighted aggregation of heterogeneous-rank LoRA changes."""

    name = "hetlora"
    Options = HetLoRAOptions
    config: HetLoRAOptions
    client_part = HetLoRAClient

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.global_scaling: float | None = None
        self._by_examples: Tensors = {}
        self._example_weights: dict[str, float] = {}

    def _note(self, model: AdapterModel) -> None:
        self.global_scaling = model.scaling

    def initial_state(self, model: AdapterModel) -> Tensors:
        self._note(model)
        return model.adapter_state()

    def uplink_spec(self, model: AdapterModel) -> AdapterSpec:
        self._note(model)
        return super().uplink_spec(model)

    def downlink_spec(self, model: AdapterModel) -> AdapterSpec:
        self._note(model)
        return super().downlink_spec(model)

    def instructions(self, rnd: int, node_ids: Sequence[int]) -> dict[int, dict]:
        extra = {} if self.global_scaling is None else {"global_scaling": self.global_scaling}
        return {node: dict(extra) for node in node_ids}

    def begin(self, rnd: int, state: Tensors) -> None:
        super().begin(rnd, state)
        self._layers = factor_shapes(state)
        self._heads = head_shapes(state)
        self._by_examples, self._example_weights = {}, {}

    def check(self, update: ClientUpdate) -> None:
        check_update(update, self.name, layers=self._layers, heads=self._heads,
                     rank_rule="at-most")

    def accumulate(self, update: ClientUpdate) -> None:
        n, r = float(update.num_examples), update.rank
        to_global = 1.0 if self.global_scaling is None else update.scaling / self.global_scaling
        scaling = update.scaling
        for layer, f in factor_pairs(update.delta).items():
            _, _, rank = self._layers[layer]
            b0, a0 = client_factors(self.state, layer, r)  # global units
            d_a = f["A"].to(torch.float32) if "A" in f else torch.zeros_like(a0)
            d_b = f["B"].to(torch.float32) * to_global if "B" in f else torch.zeros_like(b0)
            # s_k ||B_k' A_k' - B_k A_k|| computed in global units: s_g = s_k / to_global
            norm = ((scaling / to_global) * product_change_norm(b0, a0, b0 + d_b, a0 + d_a)
                    if self.config.weighting == "norm" else 1.0)
            for kind, change in (("A", d_a), ("B", d_b)):
                if kind in f:
                    name = a_name(layer) if kind == "A" else b_name(layer)
                    padded = pad_rank(change, rank, kind)
                    self._fold(name, padded, n * norm)
                    self._fold_examples(name, padded, n)
        for name, tensor in update.delta.items():
            if name in self._heads:
                self._fold(name, tensor, n)

    def finalize(self) -> Tensors:
        delta: Tensors = {}
        for name, total in self._sums.items():
            if self._weights[name] > 0:
                delta[name] = total / self._weights[name]
            else:  # nobody changed this layer's product: fall back to example weights
                delta[name] = self._by_examples[name] / self._example_weights[name]
        return delta

    def _fold_examples(self, name: str, tensor: torch.Tensor, weight: float) -> None:
        term = tensor * weight
        if name in self._by_examples:
            self._by_examples[name] += term
        else:
            self._by_examples[name] = term.clone()
        self._example_weights[name] = self._example_weights.get(name, 0.0) + weight
