"""Expert routing (FedJETs-style): E LoRA experts, a gate on a frozen embedding, per-client experts.

Model: :mod:`.mixture` (experts ``experts.{e}.*``, gate ``gate.*``, shared head).

Client (:class:`ExpertClient`): embeds its local data once with the common expert (the
frozen base model; memoised per example) and scores every expert with the current
global gate, per example. It trains the experts the round's instructions name, or else
the ``client-experts`` experts that best cover its examples (``client_choice``), plus
the gate and the head, routing every example among those experts (top-``top-k``). An
*anchor* client is pinned to one expert instead (node config ``anchor-expert`` in a
deployment; option ``anchors=p0:p1:...`` in a simulation: partition ``p_i`` is pinned to
expert ``i``) and trains the gate toward it. It sends the change of those experts, the
gate and the head, and reports which experts it trained, how many of its examples each
one received and its scores (``experts``, ``routed-{e}``, ``score-{e}``).

Server (:class:`ExpertRouting`): each expert tensor is averaged over the clients that
sent it, weighted by the examples they routed to that expert; the gate and head over
all clients, weighted by example counts. An expert nobody trained in a round is absent
from the round's delta and stays bit for bit unchanged. Then a loss-free balancing step
on the gate's output bias (see :meth:`ExpertRouting.finalize`). ``metrics()`` gives
per-round usage; ``plots()`` draws usage per round and the client-to-expert assignments.

Which experts a client trains (``choice``), from round 2 on:

* ``balanced`` (default): the server assigns them from each client's last reported
  scores, greedily by score under equal capacity ``ceil(clients * client-experts / E)``
  per expert, and sends them in the round's instructions. Letting every client take its
  own top experts lets a popular expert attract everyone (each client's routing loss
  makes it more popular still: in a BANKING77 run, one expert ended with 79% of the gate
  mass); capacity makes experts split the clients by affinity, like balanced k-means.
* ``gate``: each client takes its own top experts (FedJETs).

Round 1, and clients the server has no scores for (``start``):

* ``assign`` (default, label-free): random Gaussian gate; the server deals experts to
  them, least-used first with seeded ties, so every expert gets the same number.
* ``kmeans`` (label-free, needs ``kmeans-data``: unlabelled public texts, readable by the
  clients too since they rebuild version 1): the gate starts as nearest-centroid routing
  of their centred common-expert embeddings and such clients choose by it.

Options (``aggregator-options``, validated by :class:`.config.ExpertConfig`):
``experts`` (E, 4), ``top-k`` (2), ``client-experts`` (2), ``balance-weight`` (0.01),
``balance-rate`` (1.0), ``route-weight`` (1.0), ``gate-hidden`` (64), ``start``,
``choice``, ``kmeans-data``, ``anchors``, ``seed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pollinate.aggregators.base import AggregationError, Aggregator, ClientPart, ClientUpdate
from pollinate.aggregators.expert_routing.choice import assign_experts, client_choice
from pollinate.aggregators.expert_routing.config import ExpertConfig
from pollinate.aggregators.expert_routing.kmeans import kmeans_gate_state, public_texts
from pollinate.aggregators.expert_routing.layers import GATE_LOGIT_SCALE
from pollinate.aggregators.expert_routing.mixture import MixtureModel, build_mixture
from pollinate.aggregators.expert_routing.routing import RoutingPolicy, routed_counts
from pollinate.aggregators.expert_routing.tensors import expert_of
from pollinate.config import ConfigError
from pollinate.data import Encoded
from pollinate.modeling import AdapterModel, ModelSpec
from pollinate.spec import AdapterSpec, Tensors

BIAS = "gate.out.bias"


def _mixture(model: AdapterModel, config: ExpertConfig) -> MixtureModel:
    if not isinstance(model, MixtureModel):
        raise TypeError(f"expert-routing needs the model built by ExpertRouting.build_model, "
                        f"got {type(model).__name__}")
    model.configure(config)
    return model


def parse_experts(text: str) -> list[int]:
    """``"1,3"`` (the ``experts`` report field) -> ``[1, 3]``."""
    return [int(x) for x in str(text).split(",") if x.strip()]


class ExpertClient(ClientPart):
    """Scores experts on the local data, trains its top experts + gate + head, reports usage."""

    def __init__(self, options: Mapping[str, Any], instructions: Mapping[str, Any],
                 node: Mapping[str, Any] | None = None):
        super().__init__(options, instructions, node)
        self.config = ExpertConfig.from_options(self.options, ExpertRouting.name)
        self.chosen: tuple[int, ...] = ()
        self.counts: dict[int, int] = {}
        self.scores: list[float] = []

    @property
    def anchor(self) -> int | None:
        """The expert this node is pinned to, if it is an anchor."""
        if "anchor-expert" in self.node:
            expert = int(self.node["anchor-expert"])
            if not 0 <= expert < self.config.experts:
                raise ConfigError(f"node config anchor-expert={expert} outside 0..{self.config.experts - 1}")
            return expert
        partition = self.node.get("partition-id")
        if partition is not None and int(partition) in self.config.anchors:
            return self.config.anchors.index(int(partition))
        return None

    def load_global(self, model: AdapterModel, state: Tensors) -> None:
        mixture = _mixture(model, self.config)
        mixture.set_policy(RoutingPolicy())
        super().load_global(mixture, state)

    def prepare(self, model: AdapterModel, data: Encoded,
                probe: Sequence[Mapping[str, torch.Tensor]]) -> None:
        mixture = _mixture(model, self.config)
        probs = mixture.gate_probs(data)
        anchor, assigned = self.anchor, parse_experts(self.instructions.get("experts", ""))
        if anchor is not None:
            self.chosen = (anchor,)
        elif assigned:
            self.chosen = tuple(sorted(assigned))
        else:
            self.chosen = client_choice(probs, self.config.client_experts)
        self.counts = routed_counts(probs, self.chosen, self.config.top_k)
        self.scores = probs.mean(0).tolist()
        mixture.set_policy(RoutingPolicy(allowed=self.chosen))
        mixture.set_trainable(set(mixture.expert_names(self.chosen)) | set(mixture.gate_names())
                              | set(mixture.head_names()))

    def report(self) -> dict[str, bool | int | float | str]:
        anchor = self.anchor
        return {"experts": ",".join(map(str, self.chosen)), "anchor": -1 if anchor is None else anchor,
                **{f"routed-{e}": n for e, n in self.counts.items()},
                **{f"score-{e}": round(p, 6) for e, p in enumerate(self.scores)}}


class ExpertRouting(Aggregator):
    """Per-expert averaging over the clients that trained each expert; gate and head over all."""

    name = "expert-routing"
    Options = ExpertConfig
    config: ExpertConfig
    client_part = ExpertClient
    server_optimizer_refusal = ("its global delta adds a load-balancing step to the gate bias, a "
                                "control rule rather than an average of client changes, which momentum "
                                "or adaptive scaling would distort")

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._usage: dict[int, list[tuple[int, int]]] = {}  # expert -> [(node, routed)] this round
        self._scores = torch.zeros(self.config.experts, dtype=torch.float64)  # example-weighted sums
        self._scored = 0.0
        self._marginal: torch.Tensor | None = None
        self._affinity: dict[int, list[float]] = {}  # node -> its last reported scores (not checkpointed)

    @classmethod
    def build_model(cls, spec: ModelSpec, device: torch.device | str) -> AdapterModel:
        return build_mixture(spec, device)

    def initial_state(self, model: AdapterModel) -> Tensors:
        mixture = _mixture(model, self.config)
        state = mixture.initial_state()
        if self.config.start == "kmeans":
            state.update(kmeans_gate_state(mixture, public_texts(self.config.kmeans_data)))
        return state

    def instructions(self, rnd: int, node_ids: Sequence[int]) -> dict[int, dict]:
        """The experts each sampled client trains, where the server decides them."""
        nodes = sorted(node_ids)
        known = {n: self._affinity[n] for n in nodes if n in self._affinity} \
            if self.config.choice == "balanced" else {}
        dealt = [n for n in nodes if n not in known] \
            if self.config.start == "assign" and (rnd == 1 or self.config.choice == "balanced") else []
        hands = assign_experts(known, dealt, self.config.experts, self.config.client_experts,
                               self.config.seed + rnd)
        return {n: {"experts": ",".join(map(str, hands[n]))} if n in hands else {} for n in nodes}

    def uplink_spec(self, model: AdapterModel) -> AdapterSpec:
        return AdapterSpec.of(_mixture(model, self.config).adapter_state(), free_rank=True)

    def downlink_spec(self, model: AdapterModel) -> AdapterSpec:
        return self.uplink_spec(model)  # same names and shapes; no need to run a k-means init

    def begin(self, rnd: int, state: Tensors) -> None:
        super().begin(rnd, state)
        self._usage = {}
        self._scores.zero_()
        self._scored = 0.0
        self._marginal = None

    def check(self, update: ClientUpdate) -> None:
        super().check(update)
        who = f"expert-routing: client {update.node_id}"
        sent = sorted({e for e in map(expert_of, update.delta) if e is not None})
        try:
            declared = parse_experts(update.capabilities.get("experts", ""))
        except ValueError as err:
            raise AggregationError(
                f"{who}: bad 'experts' report {update.capabilities.get('experts')!r}") from err
        if not set(sent) <= set(declared):
            raise AggregationError(f"{who}: sent experts {sent} but reported training {declared}")
        if len(declared) > self.config.client_experts:
            raise AggregationError(f"{who}: trained {len(declared)} experts, "
                                   f"client-experts is {self.config.client_experts}")
        for e in declared:
            routed = update.capabilities.get(f"routed-{e}")
            if not isinstance(routed, int) or not 0 <= routed <= update.num_examples:
                raise AggregationError(f"{who}: routed-{e} must be an integer in 0..{update.num_examples}, "
                                       f"got {routed!r}")
        scores = [update.capabilities.get(f"score-{e}") for e in range(self.config.experts)]
        if any(s is not None for s in scores) and not all(
                isinstance(s, int | float) and 0 <= s <= 1 for s in scores):
            raise AggregationError(f"{who}: score-0..score-{self.config.experts - 1} must all be "
                                   f"probabilities, got {scores}")

    def accumulate(self, update: ClientUpdate) -> None:
        for e in parse_experts(update.capabilities.get("experts", "")):
            self._usage.setdefault(e, []).append((update.node_id, int(update.capabilities[f"routed-{e}"])))
        for name, tensor in update.delta.items():
            expert = expert_of(name)
            weight = update.num_examples if expert is None else int(update.capabilities[f"routed-{expert}"])
            if weight > 0:  # a client that routed nothing to an expert has no say on it
                self._fold(name, tensor, float(weight))
        if f"score-{self.config.experts - 1}" in update.capabilities:
            scores = [float(update.capabilities[f"score-{e}"]) for e in range(self.config.experts)]
            self._affinity[update.node_id] = scores
            self._scores += update.num_examples * torch.tensor(scores, dtype=torch.float64)
            self._scored += update.num_examples

    def finalize(self) -> Tensors:
        """Weighted means, plus the loss-free balancing step on the gate's output bias.

        With ``p_e`` the example-weighted mean gate probability the round's clients reported
        (before training), the bias moves by ``-balance-rate (log p_e - mean log p) / c``
        (``c`` = :data:`.layers.GATE_LOGIT_SCALE`): experts that attract more than
        their share lose logit, the others gain, so clients choose by what distinguishes
        their data rather than by what every client's embedding has in common.
        """
        delta = super().finalize()
        if self._scored and self.config.balance_rate > 0:
            self._marginal = (self._scores / self._scored).clamp_min(1e-4)
            log_p = self._marginal.log()
            step = (-self.config.balance_rate * (log_p - log_p.mean()) / GATE_LOGIT_SCALE).float()
            delta[BIAS] = delta[BIAS] + step if BIAS in delta else step
        return delta

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        total = sum(n for users in self._usage.values() for _, n in users) or 1
        for e in range(self.config.experts):
            users = self._usage.get(e, [])
            out[f"expert-{e}-clients"] = float(len(users))
            out[f"expert-{e}-share"] = sum(n for _, n in users) / total
            if self._marginal is not None:
                out[f"expert-{e}-gate"] = float(self._marginal[e])
        return out

    def plots(self, rounds: list[dict[str, Any]], directory: Path) -> list[Path]:
        """``experts.png``: routed share per expert and round, and who trained which expert."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        trained = [r for r in rounds if r.get("round", 0) > 0]
        experts = range(self.config.experts)
        nodes = sorted({c["node"] for r in trained for c in r.get("client_metrics", []) if "experts" in c})
        assignment = torch.zeros(len(nodes), self.config.experts)
        for r in trained:
            for c in r.get("client_metrics", []):
                for e in parse_experts(c.get("experts", "")):
                    assignment[nodes.index(c["node"]), e] += 1
        fig, (usage_ax, assign_ax) = plt.subplots(1, 2, figsize=(11, 4))
        bottom = [0.0] * len(trained)
        for e in experts:
            share = [r.get("aggregator", {}).get(f"expert-{e}-share", 0.0) for r in trained]
            usage_ax.bar([r["round"] for r in trained], share, bottom=bottom, label=f"expert {e}")
            bottom = [b + s for b, s in zip(bottom, share, strict=True)]
        usage_ax.set_xticks([r["round"] for r in trained])
        usage_ax.set_xlabel("round")
        usage_ax.set_ylabel("share of routed examples")
        usage_ax.set_title("expert usage per round")
        usage_ax.legend(fontsize="small", ncol=2)
        image = assign_ax.imshow(assignment.numpy(), aspect="auto", cmap="viridis")
        assign_ax.set_xlabel("expert")
        assign_ax.set_ylabel("client (by node id)")
        assign_ax.set_xticks(list(experts))
        assign_ax.set_yticks(range(len(nodes)))
        assign_ax.set_title("rounds each client trained each expert")
        fig.colorbar(image, ax=assign_ax)
        fig.tight_layout()
        path = directory / "experts.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]
