"""Just-in-time personalisation: a client that never trained gets its own model at once.

FedJETs' promise: a new client downloads the gate (and the shared head), scores its
*unlabelled* local data with it, downloads only the experts its data prefers and
predicts right away, with no local fine-tuning. :func:`personalize` does exactly that
against a global state and reports, on the client's labelled data, the quality of

* ``top1``: each example predicted by its highest-scoring downloaded expert alone;
* ``mixture``: each example predicted by the gate's top-k mixture of the downloaded experts;
* ``full`` (optional): the global mixture over every expert (what the server evaluates;
  it needs the whole download);

and the bytes each download costs (lossless, as the server sends full states).
"""

from __future__ import annotations

from dataclasses import dataclass

from pollinate.aggregators.expert_routing.choice import client_choice
from pollinate.aggregators.expert_routing.mixture import MixtureModel
from pollinate.aggregators.expert_routing.routing import RoutingPolicy
from pollinate.aggregators.expert_routing.tensors import expert_tensors, router_tensors
from pollinate.codec import CodecSpec, Delta, DeltaHeader, encode
from pollinate.data import Encoded
from pollinate.evaluation import evaluate
from pollinate.spec import Tensors


@dataclass(frozen=True)
class Personalization:
    """One client's zero-shot result: chosen experts, metrics three ways, download sizes."""

    experts: tuple[int, ...]
    examples: int
    top1: dict[str, float]
    mixture: dict[str, float]
    full: dict[str, float] | None
    bytes_router: int  # gate + head, needed to choose
    bytes_experts: int  # the chosen experts only
    bytes_full: int  # the whole global state

    @property
    def bytes_downloaded(self) -> int:
        return self.bytes_router + self.bytes_experts


def download_size(tensors: Tensors) -> int:
    """Bytes of ``tensors`` as one lossless (fp32) downlink payload, as the server sends full
    states (``pollinate.protocol.LOSSLESS``, not imported: aggregators do not import Flower)."""
    return len(encode(Delta(DeltaHeader(), tensors), CodecSpec(encoding="fp32")))


def personalize(model: MixtureModel, state: Tensors, data: Encoded, *,
                route_data: Encoded | None = None, experts: int | None = None,
                compare_full: bool = True) -> Personalization:
    """Choose experts for ``route_data`` (default ``data``, labels unused) and evaluate on ``data``.

    ``model`` must already be configured with the run's options; ``experts`` overrides
    how many experts the client downloads (default: the run's ``client-experts``);
    ``compare_full`` also evaluates the mixture of all experts.
    Leaves ``model`` holding ``state`` with the unrestricted routing policy.
    """
    count = experts or model.config.client_experts
    router = router_tensors(state)
    model.set_policy(RoutingPolicy())
    model.load_adapter_state(router)
    chosen = client_choice(model.gate_probs(route_data or data), count)
    mine = expert_tensors(state, chosen)
    model.load_adapter_state(mine)
    try:
        model.set_policy(RoutingPolicy(allowed=chosen, top_k=1))
        top1 = evaluate(model, data)
        model.set_policy(RoutingPolicy(allowed=chosen))
        mixture = evaluate(model, data)
        model.set_policy(RoutingPolicy())
        model.load_adapter_state(state)
        full = evaluate(model, data) if compare_full else None
    finally:
        model.set_policy(RoutingPolicy())
    return Personalization(chosen, len(data), top1, mixture, full, download_size(router),
                           download_size(mine), download_size(state))
