"""Selective layer's options and the budgets they give each client.

A client's *budget* is how many blocks it may train: node config ``max-layers`` in a
deployment, else its entry of the option ``budgets`` (``2:2:6`` or ``[2,2,6]``, indexed
by ``partition-id`` and cycled; ``:`` separates entries in text because
``aggregator-options`` itself is comma-separated), else every block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pollinate.aggregators.options import MethodOptions
from pollinate.aggregators.selective_layer.policies import POLICIES
from pollinate.config import LIST_SEPARATORS, ConfigError


def parse_budgets(value: Any, option: str = "aggregator-options budgets") -> tuple[int | None, ...]:
    """``"2:2:6"``, ``6``, ``"all"`` or a list -> per-partition budgets (``None`` = all layers)."""
    if isinstance(value, str):
        items: list[Any] = [v for v in LIST_SEPARATORS.split(value.strip()) if v]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        items = [value]
    return tuple(_budget(item, option) for item in items)


def _budget(item: Any, option: str) -> int | None:
    if isinstance(item, str) and item.strip().lower() == "all":
        return None
    try:
        number = float(item)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{option}: expected a number of layers or 'all', got {item!r} "
                          "(separate per-client budgets with ':', e.g. budgets=2:6)") from err
    if isinstance(item, bool) or not number.is_integer():
        raise ConfigError(f"{option}: expected a whole number of layers, got {item!r}")
    if number < 1:
        raise ConfigError(f"{option}: a client must train at least 1 layer, got {item!r}")
    return int(number)


@dataclass(frozen=True)
class SelectionOptions(MethodOptions):
    """Selective layer's ``aggregator-options`` (both halves parse the same mapping)."""

    policy: str = field(default="regulated", metadata={
        "help": f"how a client chooses its layers ({' | '.join(POLICIES)}; docs/selective_layer.md)"})
    budgets: tuple[int | None, ...] = field(default=(), metadata={
        "help": "layers each client trains, by partition-id, cycled: 2:2:6, [2,2,6], 6 or all "
                "(empty = all; node config max-layers wins)", "parse": parse_budgets})
    lambda_: float = field(default=0.1, metadata={
        "help": "regulated: weight of the disagreement between the clients' selections, >= 0"})

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"selective-layer: policy: unknown selection policy {self.policy!r}; "
                              f"known: {', '.join(sorted(POLICIES))}")
        if not math.isfinite(self.lambda_) or self.lambda_ < 0:
            raise ConfigError(f"selective-layer: lambda must be >= 0, got {self.lambda_}")


def client_budget(node: Mapping[str, Any], options: SelectionOptions, num_layers: int) -> int:
    """How many layers this node trains: node ``max-layers``, else ``budgets[partition-id]``."""
    if "max-layers" in node:
        option = "node config max-layers"
        budget = _budget(node["max-layers"], option)
    elif options.budgets:
        option = "aggregator-options budgets"
        if len(options.budgets) == 1:
            budget = options.budgets[0]
        elif "partition-id" in node:
            budget = options.budgets[int(node["partition-id"]) % len(options.budgets)]
        else:
            raise ConfigError(f"{option} has {len(options.budgets)} entries but this node has no "
                              "partition-id; set max-layers in its node config")
    else:
        return num_layers
    return check_budget(budget, num_layers, option, options.policy)


def check_budget(budget: int | None, num_layers: int, option: str, policy: str) -> int:
    """``budget`` resolved against the model (``None`` -> all); raises if it cannot be met."""
    if budget is None:
        return num_layers
    if budget > num_layers:
        raise ConfigError(f"{option}: max-layers={budget} but the model has only {num_layers} "
                          "transformer layers with LoRA")
    if policy == "all" and budget < num_layers:
        raise ConfigError(f"{option}: policy 'all' trains all {num_layers} layers, "
                          f"but the budget is {budget}; choose another policy")
    return budget
