"""FLoRA: exact aggregation of heterogeneous-rank LoRA updates by stacking the factors.

Global state: the head tensors plus one dense ``<layer>.delta_weight`` (out x in, zeros
at version 0) per LoRA layer: the sum of all merged rounds.

Client (:class:`FLoRAClient`): ``load_global`` merges ``delta_weight`` into the frozen base
weight (``model.set_base_delta``), re-initialises the LoRA factors fresh with peft's
initialiser (A random, B zero) from a seed derived from the run seed, the round and the
node id (instruction ``lora_seed``), and loads the head. After training the client sends
its *full* factors ``lora_A`` (r_k x in) and ``lora_B`` (out x r_k), not their change, plus
the change of the head. The factors are fresh every round, so an uplink error-feedback
residual is meaningless in the next round (``uses_error_feedback`` is False).

Server: with scaling ``s_k = alpha_k / r_k`` and weight ``p_k = n_k / N`` (``N``: examples
of the clients that sent the layer this round) the stacked factors

    B_stack = [B_1 | B_2 | ... ]            (out x R),
    A_stack = [p_1 s_1 A_1; p_2 s_2 A_2; ...]  (R x in),   R = sum of received ranks,

give ``B_stack A_stack = sum_k p_k s_k B_k A_k`` exactly. ``N`` is only known at
``finalize``, so ``accumulate`` keeps the raw factors of the round (memory: the sum of
the received ranks times ``out + in`` per layer, i.e. the uplink payload of the round)
and ``finalize`` normalises, stacks and returns ``delta_weight = B_stack A_stack`` per
layer and the example-weighted mean change of each head tensor.

Downlink: for the latest round (``latest_round=True``) a layer is sent as the stacked
factors ``<layer>.stack_B`` (out x R) and ``<layer>.stack_A`` (R x in) when that is
smaller (``R (out + in) < out in``) and the delta given is that round's product;
otherwise, and for older versions, as the dense ``delta_weight``.
:meth:`FLoRAClient.unpack_downlink` turns stacks back into ``delta_weight = B A``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pollinate.aggregators.base import AggregationError, Aggregator, ClientPart, ClientUpdate
from pollinate.aggregators.lora_math import (
    DENSE_SUFFIX,
    STACK_A_SUFFIX,
    STACK_B_SUFFIX,
    check_update,
    dense_initial_state,
    dense_name,
    dense_shapes,
    factor_pairs,
    full_factor_update,
    head_shapes,
    head_state,
    lora_seed,
    reinit_lora,
)
from pollinate.aggregators.options import MethodOptions
from pollinate.modeling import AdapterModel
from pollinate.spec import AdapterSpec, Tensors, TensorSpec

#: relative Frobenius tolerance for "the delta to pack is the latest round's product".
STACK_TOLERANCE = 1e-3


def unstack(wire: Tensors) -> Tensors:
    """Replace every ``<layer>.stack_B`` / ``<layer>.stack_A`` pair by ``<layer>.delta_weight``."""
    delta: Tensors = {}
    for name, tensor in wire.items():
        if name.endswith(STACK_B_SUFFIX):
            layer = name[: -len(STACK_B_SUFFIX)]
            other = layer + STACK_A_SUFFIX
            if other not in wire:
                raise ValueError(f"downlink has {name!r} without {other!r}")
            delta[dense_name(layer)] = tensor.to(torch.float32) @ wire[other].to(torch.float32)
        elif name.endswith(STACK_A_SUFFIX):
            if name[: -len(STACK_A_SUFFIX)] + STACK_B_SUFFIX not in wire:
                raise ValueError(f"downlink has {name!r} without its stack_B")
        else:
            delta[name] = tensor
    return delta


class FLoRAClient(ClientPart):
    """Merges the global dense delta into the base, trains fresh LoRA factors, sends them whole."""

    def load_global(self, model: AdapterModel, state: Tensors) -> None:
        for layer in model.lora_layers():
            model.set_base_delta(layer, state.get(dense_name(layer)))
        seed = self.instructions.get("lora_seed", lora_seed(self.options, 0, 0))
        reinit_lora(model, int(seed))
        model.load_adapter_state(head_state(model, state))

    def update(self, model: AdapterModel, start: Tensors) -> Tensors:
        return full_factor_update(model, start)

    def unpack_downlink(self, wire: Tensors) -> Tensors:
        return unstack(wire)

    @property
    def uses_error_feedback(self) -> bool:
        return False


class FLoRA(Aggregator):
    """Stacking aggregation: exact sum of the clients' scaled, example-weighted LoRA products."""

    name = "flora"
    Options = MethodOptions  # seed only
    sparse_wire = False
    client_part = FLoRAClient

    def __init__(self, **options):
        super().__init__(**options)
        self._factors: dict[str, list[tuple[float, float, torch.Tensor, torch.Tensor]]] = {}
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._products: Tensors = {}

    def initial_state(self, model: AdapterModel) -> Tensors:
        return dense_initial_state(model)

    def downlink_spec(self, model: AdapterModel) -> AdapterSpec:
        state = self.initial_state(model)
        tensors = dict(AdapterSpec.of(state).tensors)
        for layer, (out_dim, in_dim, _) in dense_shapes(state).items():
            tensors[layer + STACK_B_SUFFIX] = TensorSpec((out_dim, None))
            tensors[layer + STACK_A_SUFFIX] = TensorSpec((None, in_dim))
        return AdapterSpec(tensors)

    def instructions(self, rnd: int, node_ids: Sequence[int]) -> dict[int, dict]:
        return {node: {"lora_seed": lora_seed(self.options, rnd, node)} for node in node_ids}

    def begin(self, rnd: int, state: Tensors) -> None:
        super().begin(rnd, state)
        self._layers = dense_shapes(state)
        self._heads = head_shapes(state)
        self._factors = {}

    def check(self, update: ClientUpdate) -> None:
        check_update(update, self.name, layers=self._layers, heads=self._heads, need_pairs=True)

    def accumulate(self, update: ClientUpdate) -> None:
        n, s = float(update.num_examples), update.scaling
        for layer, f in factor_pairs(update.delta).items():
            self._factors.setdefault(layer, []).append(
                (n, s, f["B"].to(torch.float32), f["A"].to(torch.float32)))
        for name, tensor in update.delta.items():
            if name in self._heads:
                self._fold(name, tensor, n)

    def finalize(self) -> Tensors:
        delta = super().finalize()
        self._stacks, self._products = {}, {}
        for layer, items in self._factors.items():
            total = sum(n for n, _, _, _ in items)
            b_stack = torch.cat([b for _, _, b, _ in items], dim=1)
            a_stack = torch.cat([(n / total) * s * a for n, s, _, a in items], dim=0)
            self._stacks[layer] = (b_stack, a_stack)
            self._products[layer] = delta[dense_name(layer)] = b_stack @ a_stack
        self._factors = {}
        return delta

    def metrics(self) -> dict[str, float]:
        ranks = [a.shape[0] for _, a in self._stacks.values()]
        return {"stacked_rank": float(max(ranks, default=0))}

    def pack_downlink(self, delta: Tensors, *, latest_round: bool) -> Tensors:
        wire: Tensors = {}
        for name, tensor in delta.items():
            layer = name[: -len(DENSE_SUFFIX)] if name.endswith(DENSE_SUFFIX) else None
            if latest_round and layer in self._stacks and self._stack_pays(layer, tensor):
                wire[layer + STACK_B_SUFFIX], wire[layer + STACK_A_SUFFIX] = self._stacks[layer]
            else:
                wire[name] = tensor
        return wire

    def _stack_pays(self, layer: str, tensor: torch.Tensor) -> bool:
        b_stack, a_stack = self._stacks[layer]
        out_dim, rank, in_dim = b_stack.shape[0], b_stack.shape[1], a_stack.shape[1]
        if rank * (out_dim + in_dim) >= out_dim * in_dim:
            return False
        product = self._products[layer]
        if tuple(tensor.shape) != tuple(product.shape):
            raise AggregationError(f"flora: downlink tensor {dense_name(layer)!r} has shape "
                                   f"{tuple(tensor.shape)}, expected {tuple(product.shape)}")
        error = torch.linalg.norm(tensor.to(torch.float32) - product)
        return bool(error <= STACK_TOLERANCE * torch.linalg.norm(product))
