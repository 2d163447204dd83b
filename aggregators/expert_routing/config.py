"""Expert routing's options (``aggregator-options``), validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pollinate.aggregators.options import MethodOptions, option_key
from pollinate.config import ConfigError, option

STARTS = ("assign", "kmeans")
CHOICES = ("balanced", "gate")


@dataclass(frozen=True)
class ExpertConfig(MethodOptions):
    """The method's options (docs/expert_routing.md); the seed also seeds experts and gate."""

    experts: int = option(4, "E, the number of LoRA experts")
    top_k: int = option(2, "experts mixed per example, <= client-experts")
    client_experts: int = option(2, "experts each client trains (and a new client downloads)")
    balance_weight: float = option(0.01, "weight of the Switch load-balance loss")
    balance_rate: float = option(1.0, "server's loss-free balancing step on the gate bias (0 = off)")
    route_weight: float = option(1.0, "weight of the loss teaching the gate the client's experts")
    gate_hidden: int = option(64, "hidden units of the gate")
    start: str = option("assign", "round 1 and unknown clients: assign = dealt experts, "
                                   "kmeans = k-means gate on kmeans-data", STARTS)
    choice: str = option("balanced", "who picks a client's experts: balanced = the server, by "
                                      "scores under equal capacity; gate = the client", CHOICES)
    kmeans_data: str = option("", "unlabelled public texts (CSV/JSONL, 'text' column) for start=kmeans")
    anchors: tuple[int, ...] = option((), "partition ids pinned to experts 0, 1, ... (e.g. 0:5:10)")
    expert_heads: bool = option(True, "each expert owns a correction of the classification head")

    def __post_init__(self) -> None:
        for name in ("experts", "top_k", "client_experts", "gate_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"expert-routing: {option_key(name)} must be >= 1, "
                                  f"got {getattr(self, name)}")
        if self.top_k > self.experts:
            raise ConfigError(f"expert-routing: top-k ({self.top_k}) must be <= experts ({self.experts})")
        if self.client_experts > self.experts:
            raise ConfigError(f"expert-routing: client-experts ({self.client_experts}) must be "
                              f"<= experts ({self.experts})")
        if self.top_k > self.client_experts:
            raise ConfigError(f"expert-routing: top-k ({self.top_k}) must be <= client-experts "
                              f"({self.client_experts}): a client routes each example among the "
                              "experts it trains")
        for name in ("balance_weight", "balance_rate", "route_weight"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"expert-routing: {option_key(name)} must be >= 0, "
                                  f"got {getattr(self, name)}")
        if self.start == "kmeans" and not self.kmeans_data:
            raise ConfigError("expert-routing: start=kmeans needs kmeans-data "
                              "(a CSV/JSONL of unlabelled public texts with a 'text' column)")
        if len(self.anchors) > self.experts:
            raise ConfigError(f"expert-routing: {len(self.anchors)} anchors for {self.experts} "
                              "experts (anchor i is pinned to expert i)")
        if len(set(self.anchors)) != len(self.anchors) or any(a < 0 for a in self.anchors):
            raise ConfigError(f"expert-routing: anchors must be distinct partition ids >= 0, "
                              f"got {list(self.anchors)}")

    @property
    def structure(self) -> tuple[int, int, bool]:
        """What the model's tensors depend on (the rest only changes how it runs)."""
        return self.experts, self.gate_hidden, self.expert_heads
