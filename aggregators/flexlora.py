"""FlexLoRA (Bai et al.): aggregate full-size LoRA products, hand each client an SVD truncation.

Global state: the head tensors plus one dense ``<layer>.delta_weight`` (out x in, zeros at
version 0) per LoRA layer: the global full-size adapter ``dW``.

Client of rank ``r`` and scaling ``s = alpha / r`` (:class:`FlexLoRAClient`): ``load_global``
leaves the base weights pretrained and sets the LoRA factors to the balanced rank-r
truncated SVD of ``dW`` divided by the scaling (:func:`client_factors`): with
``dW = U S V^T``, ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``, so the client's
effective model is ``W0 + s B A = W0 + T_r(dW)`` (``T_r``: best rank-r approximation).
Rank directions without signal (``dW`` of rank < r, e.g. zeros at version 0) get peft's
fresh initialisation instead (A random from the instruction seed ``lora_seed``, B zero),
which leaves ``s B A`` unchanged but keeps them trainable. After training the client sends
its *full* factors ``lora_A``/``lora_B`` (not their change) and the change of the head;
like FLoRA it has no use for uplink error feedback.

Server: the new global adapter is the example-weighted mean of the clients' full-size
products over the clients that sent each layer,

    dW_new = sum_k p_k s_k B_k A_k,   p_k = n_k / sum n,

accumulated densely (one out x in sum per layer, however many clients), so ``finalize``
returns ``delta_weight = dW_new - dW`` and the example-weighted mean head change. As in
the paper a client's truncation of ``dW`` replaces ``dW`` in its model, so whatever a
low-rank client cannot represent is not carried over by that client. Downlink: the dense
delta as it is (SVD truncation happens on the client, for its own rank).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pollinate.aggregators.base import Aggregator, ClientPart, ClientUpdate
from pollinate.aggregators.lora_math import (
    DENSE_SUFFIX,
    a_name,
    b_name,
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
    svd_truncate,
)
from pollinate.aggregators.options import MethodOptions
from pollinate.modeling import AdapterModel
from pollinate.spec import AdapterSpec, Tensors


def client_factors(delta_weight: torch.Tensor, rank: int,
                   scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)``, rank ``rank``: ``scaling * B @ A`` = the truncated SVD of ``delta_weight``."""
    b, a, _ = svd_truncate(delta_weight, rank, scaling)
    return b, a


class FlexLoRAClient(ClientPart):
    """Initialises its LoRA to the SVD truncation of the global update; sends full factors."""

    def load_global(self, model: AdapterModel, state: Tensors) -> None:
        seed = self.instructions.get("lora_seed", lora_seed(self.options, 0, 0, "flexlora"))
        model.reset_base()
        reinit_lora(model, int(seed))
        tensors = head_state(model, state)
        for layer in model.lora_layers():
            dense = state.get(dense_name(layer))
            if dense is None or not bool(dense.any()):
                continue
            fresh_a = model.parameter(a_name(layer)).detach().to("cpu", torch.float32)
            b, a, live = svd_truncate(dense.to(model.device), fresh_a.shape[0], model.scaling)
            live = live.cpu()
            tensors[b_name(layer)] = b.cpu()
            tensors[a_name(layer)] = torch.where(live[:, None], a.cpu(), fresh_a)
        model.load_adapter_state(tensors)

    def update(self, model: AdapterModel, start: Tensors) -> Tensors:
        return full_factor_update(model, start)

    @property
    def uses_error_feedback(self) -> bool:
        return False


class FlexLoRA(Aggregator):
    """Example-weighted mean of full-size LoRA products; clients truncate it to their rank."""

    name = "flexlora"
    Options = MethodOptions  # seed only
    sparse_wire = False
    server_optimizer_refusal = ("its global delta is the mean of the clients' products minus the global "
                                "adapter, which includes what each client's SVD truncation dropped: a "
                                "re-projection, not an average of client changes, that momentum or "
                                "adaptive scaling would amplify")
    client_part = FlexLoRAClient

    def initial_state(self, model: AdapterModel) -> Tensors:
        return dense_initial_state(model)

    def downlink_spec(self, model: AdapterModel) -> AdapterSpec:
        return AdapterSpec.of(self.initial_state(model))

    def instructions(self, rnd: int, node_ids: Sequence[int]) -> dict[int, dict]:
        return {node: {"lora_seed": lora_seed(self.options, rnd, node, "flexlora")}
                for node in node_ids}

    def begin(self, rnd: int, state: Tensors) -> None:
        super().begin(rnd, state)
        self._layers = dense_shapes(state)
        self._heads = head_shapes(state)

    def check(self, update: ClientUpdate) -> None:
        check_update(update, self.name, layers=self._layers, heads=self._heads, need_pairs=True)

    def accumulate(self, update: ClientUpdate) -> None:
        n = float(update.num_examples)
        for layer, f in factor_pairs(update.delta).items():
            product = update.scaling * (f["B"].to(torch.float32) @ f["A"].to(torch.float32))
            self._fold(dense_name(layer), product, n)
        for name, tensor in update.delta.items():
            if name in self._heads:
                self._fold(name, tensor, n)

    def finalize(self) -> Tensors:
        delta = super().finalize()
        for name in list(delta):
            if name.endswith(DENSE_SUFFIX):
                delta[name] = delta[name] - self.state[name].to(torch.float32)
        return delta
