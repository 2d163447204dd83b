"""Selective layer fine-tuning (Sun et al., 2024): each client trains a few transformer blocks.

Client (:class:`SelectiveLayerClient`): before local training, ``prepare`` groups the
LoRA tensors by transformer block (:mod:`.layers`), resolves the node's budget
(node config ``max-layers``, else the ``budgets`` option by ``partition-id``), scores
the blocks by the squared norm of their LoRA gradient on the probe batches when the
policy needs it, chooses at most ``budget`` blocks with the run's ``policy`` and freezes
every other block (the head always trains). The base :meth:`ClientPart.update` then
sends only the tensors that trained: the chosen blocks and the head. ``report`` tells
the server the budget, the blocks chosen, the policy actually used and the scores.

Server (:class:`SelectiveLayer`): FedIT's per-tensor rule, which is exactly "each block
averaged over the clients that updated it, weighted by examples; a block nobody
updated stays unchanged" because a client only sends what it trained. For the
``regulated`` policy the server keeps every node's latest scores and budget and, in
:meth:`instructions`, assigns this round's clients their blocks with
:func:`.regulate.regulate`. The scores come from a node's previous
participation (one round stale, which saves a second round trip per round); in round 1,
for a node not seen yet, or after a resume (scores are not checkpointed), the client
falls back to ``gradient`` and reports that it did.

Metrics per round: ``selected_layer_{i}`` (clients that sent block i),
``layers_per_client`` and ``selection_disagreement`` (sum over blocks of the variance of
the 0/1 selections across clients); :meth:`SelectiveLayer.plots` draws them as a
rounds x layers heatmap, ``layer_selection.png``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pollinate.aggregators.base import AggregationError, Aggregator, ClientPart, ClientUpdate
from pollinate.aggregators.lora_math import derive_seed
from pollinate.aggregators.selective_layer.config import SelectionOptions, check_budget, client_budget
from pollinate.aggregators.selective_layer.heatmap import selection_heatmap
from pollinate.aggregators.selective_layer.layers import block_of, layer_importance, transformer_layers
from pollinate.aggregators.selective_layer.policies import POLICIES, SelectionInput
from pollinate.aggregators.selective_layer.regulate import disagreement, regulate
from pollinate.data import Encoded
from pollinate.modeling import AdapterModel
from pollinate.spec import Tensors

METRIC_PREFIX = "selected_layer_"
HEATMAP = "layer_selection.png"


def _join(values: Sequence[Any]) -> str:
    return ",".join(map(str, values))


def _ints(text: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in str(text).split(",") if v.strip())


class SelectiveLayerClient(ClientPart):
    """Chooses this round's blocks, freezes the others; sends the chosen blocks and the head."""

    def __init__(self, options: Mapping[str, Any], instructions: Mapping[str, Any],
                 node: Mapping[str, Any] | None = None):
        super().__init__(options, instructions, node)
        self.selection = SelectionOptions.from_options(self.options, SelectiveLayer.name)
        self._report: dict[str, bool | int | float | str] = {}

    def prepare(self, model: AdapterModel, data: Encoded,
                probe: Sequence[Mapping[str, torch.Tensor]]) -> None:
        layers = transformer_layers(model)
        budget = client_budget(self.node, self.selection, len(layers))
        policy = POLICIES[self.selection.policy]
        importance = layer_importance(model, layers, probe) if policy.needs_importance else None
        assigned = self.instructions.get("layers")
        chosen, used = policy.choose(SelectionInput(
            blocks=tuple(layers), budget=budget, importance=importance,
            seed=int(self.instructions.get("selection_seed", self.selection.seed)),
            assigned=None if assigned is None else _ints(assigned)))
        model.set_trainable({n for block in chosen for n in layers[block]} | set(model.head_names()))
        self._report = {"max-layers": budget, "layers": _join(chosen), "selection": used}
        if importance is not None:
            self._report["importance"] = _join(f"{importance[b]:.6g}" for b in layers)

    def report(self) -> dict[str, bool | int | float | str]:
        return dict(self._report)


class SelectiveLayer(Aggregator):
    """Per-block averaging over the clients that trained each block; regulated selection."""

    name = "selective-layer"
    Options = SelectionOptions
    config: SelectionOptions
    client_part = SelectiveLayerClient

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.blocks: tuple[int, ...] = ()
        self._scores: dict[int, dict[int, float]] = {}  # node -> block -> latest importance
        self._budgets: dict[int, int] = {}  # node -> latest reported budget
        self._sent: list[set[int]] = []  # blocks of each used update this round

    def initial_state(self, model: AdapterModel) -> Tensors:
        """Also validates the adapter and the ``budgets`` option against the model's blocks."""
        self.blocks = tuple(transformer_layers(model))
        for budget in self.config.budgets:
            check_budget(budget, len(self.blocks), "aggregator-options budgets", self.config.policy)
        return super().initial_state(model)

    def instructions(self, rnd: int, node_ids: Sequence[int]) -> dict[int, dict]:
        out: dict[int, dict] = {
            node: {"selection_seed": derive_seed(self.name, self.config.seed, rnd, node)}
            for node in node_ids}
        known = [n for n in node_ids if n in self._scores and n in self._budgets]
        if self.config.policy == "regulated" and known:
            assigned = regulate({n: self._scores[n] for n in known},
                                {n: self._budgets[n] for n in known}, self.config.lambda_)
            for node, blocks in assigned.items():
                out[node]["layers"] = _join(blocks)
        return out

    def begin(self, rnd: int, state: Tensors) -> None:
        super().begin(rnd, state)
        self._sent = []

    def check(self, update: ClientUpdate) -> None:
        super().check(update)
        self._parse_report(update)

    def accumulate(self, update: ClientUpdate) -> None:
        super().accumulate(update)
        self._sent.append({b for b in map(block_of, update.delta) if b is not None})
        scores, budget = self._parse_report(update)
        if scores is not None and budget is not None:
            self._scores[update.node_id], self._budgets[update.node_id] = scores, budget

    def _parse_report(self, update: ClientUpdate) -> tuple[dict[int, float] | None, int | None]:
        """The node's reported scores and budget, checked against this model's blocks."""
        caps = update.capabilities
        who = f"{self.name}: client {update.node_id}"
        scores = None
        if "importance" in caps:
            try:
                values = [float(v) for v in str(caps["importance"]).split(",")]
            except ValueError as err:
                raise AggregationError(f"{who}: importance is not a list of numbers") from err
            if len(values) != len(self.blocks) or not all(math.isfinite(v) and v >= 0 for v in values):
                raise AggregationError(f"{who}: importance needs {len(self.blocks)} finite "
                                       f"non-negative scores, got {caps['importance']!r}")
            scores = dict(zip(self.blocks, values, strict=True))
        budget = None
        if "max-layers" in caps:
            budget = int(caps["max-layers"])
            if not 1 <= budget <= len(self.blocks):
                raise AggregationError(f"{who}: max-layers {budget} outside 1..{len(self.blocks)}")
        return scores, budget

    def metrics(self) -> dict[str, float]:
        counts = [sum(block in sent for sent in self._sent) for block in self.blocks]
        clients = len(self._sent)
        out = {f"{METRIC_PREFIX}{b}": float(n) for b, n in zip(self.blocks, counts, strict=True)}
        out["layers_per_client"] = sum(counts) / clients if clients else 0.0
        out["selection_disagreement"] = disagreement(counts, clients) / clients if clients else 0.0
        return out

    def plots(self, rounds: list[dict[str, Any]], directory: Path) -> list[Path]:
        """``layer_selection.png``: clients that trained each block (columns) in each round (rows)."""
        rows = [(r["round"], r["aggregator"]) for r in rounds
                if any(k.startswith(METRIC_PREFIX) for k in r.get("aggregator", {}))]
        if not rows:
            return []
        blocks = sorted({int(k.removeprefix(METRIC_PREFIX)) for _, m in rows for k in m
                         if k.startswith(METRIC_PREFIX)})
        grid = [[m.get(f"{METRIC_PREFIX}{b}", 0.0) for b in blocks] for _, m in rows]
        return [selection_heatmap(grid, [r for r, _ in rows], blocks, directory / HEATMAP)]

