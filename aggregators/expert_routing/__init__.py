"""Expert routing (FedJETs-style): a federated mixture of LoRA experts with a gate.

``method``: both halves (:class:`ExpertRouting`, :class:`ExpertClient`); ``config``:
the options; ``mixture``: the model (``tensors``: its names, ``layers``: its modules,
``routing``: per-example routing); ``choice``: which experts a client trains;
``kmeans``: the label-free gate start; ``personalize``: just-in-time personalisation
of a client that never trained. docs/expert_routing.md.
"""

from pollinate.aggregators.expert_routing.choice import assign_experts, client_choice
from pollinate.aggregators.expert_routing.config import ExpertConfig
from pollinate.aggregators.expert_routing.kmeans import kmeans_gate_state
from pollinate.aggregators.expert_routing.method import ExpertClient, ExpertRouting
from pollinate.aggregators.expert_routing.mixture import MixtureModel, build_mixture
from pollinate.aggregators.expert_routing.personalize import Personalization, download_size, personalize
from pollinate.aggregators.expert_routing.routing import RoutingPolicy
from pollinate.aggregators.expert_routing.tensors import expert_of, single_expert_state

__all__ = ["ExpertClient", "ExpertConfig", "ExpertRouting", "MixtureModel", "Personalization",
           "RoutingPolicy", "assign_experts", "build_mixture", "client_choice", "download_size",
           "expert_of", "kmeans_gate_state", "personalize", "single_expert_state"]
