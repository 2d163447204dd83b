"""Which training rows each simulated client holds: the flwr-datasets split, computed once.

The split is drawn by flwr-datasets' partitioners (IID, Dirichlet(alpha) label skew, k
classes per client) on a table of row numbers and labels, so that it is the same split
the partitioners give on the table itself, and it is cached per table object: a process
that serves a thousand virtual clients computes it once, not once per client.

With many clients a Dirichlet draw leaves some clients without examples (flwr-datasets
gives up after 11 draws). Then the last draw is kept and repaired, seeded: each client
below :data:`MIN_EXAMPLES` gets random examples of the largest partitions, and
:attr:`Split.note` says how many clients that was and which settings avoid it. A
``classes`` split that cannot give every client its labels is refused with a
:class:`ConfigError` naming the settings.
"""

from __future__ import annotations

import heapq
import random
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from pollinate.config import ConfigError, RunConfig

MIN_EXAMPLES = 1  # the fewest examples a simulated client holds
_FIELDS = ("task", "partition", "dirichlet_alpha", "classes_per_client", "seed")  # what a split depends on
_CACHE: weakref.WeakKeyDictionary[Dataset, dict[tuple, Split]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Split:
    """The row numbers of each client's partition, and what was done to make every one non-empty."""

    rows: tuple[tuple[int, ...], ...]
    partition: str
    topped_up: int = 0  # clients the Dirichlet repair gave examples to
    note: str = ""  # the one-line statement of the repair, "" when there was none

    def describe(self) -> dict[str, Any]:
        """What ``summary.json`` records of the split."""
        sizes = [len(r) for r in self.rows]
        return {"partition": self.partition, "clients": len(sizes), "min_examples": min(sizes),
                "max_examples": max(sizes), "topped_up": self.topped_up, "note": self.note}


def partitioner(config: RunConfig, num_partitions: int,
                min_partition_size: int = MIN_EXAMPLES) -> Partitioner:
    """The flwr-datasets partitioner named by ``partition``."""
    if config.partition == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if config.task != "classification":
        raise ConfigError(f"partition {config.partition!r} needs labels; use 'iid' for causal-lm")
    if config.partition == "dirichlet":
        return DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                    alpha=config.dirichlet_alpha, min_partition_size=min_partition_size,
                                    self_balancing=False, seed=config.seed)
    return PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                   num_classes_per_partition=config.classes_per_client,
                                   class_assignment_mode="first-deterministic", seed=config.seed)


def split(config: RunConfig, table: Dataset, num_partitions: int) -> Split:
    """The partitions of ``table`` over ``num_partitions`` clients (cached for this table object)."""
    key = (tuple(getattr(config, f) for f in _FIELDS), num_partitions)
    cached = _CACHE.setdefault(table, {})
    if key not in cached:
        cached[key] = _compute(config, table, num_partitions)
    return cached[key]


def _compute(config: RunConfig, table: Dataset, num_partitions: int) -> Split:
    if num_partitions > len(table):
        raise ConfigError(f"more clients ({num_partitions}) than training examples ({len(table)})")
    columns: dict[str, Any] = {"row": np.arange(len(table))}
    if config.partition != "iid" and config.task == "classification":
        columns["label"] = table.with_format("arrow")["label"].to_numpy()
        labels = len(np.unique(columns["label"]))
        if config.partition == "classes" and config.classes_per_client > labels:
            raise ConfigError(f"classes-per-client={config.classes_per_client} but the data "
                              f"has only {labels} labels")
    rows = Dataset.from_dict(columns)
    try:
        return _draw(config, rows, num_partitions)
    except ConfigError:
        raise
    except ValueError as err:  # what flwr-datasets raises when a split cannot be drawn
        if config.partition == "dirichlet":
            return _repaired(config, rows, num_partitions)
        reason = str(err).split(". ")[0]
        raise ConfigError(f"partition={config.partition} cannot give {num_partitions} clients "
                          f"{config.classes_per_client} labels each: {reason}; lower classes-per-client "
                          "or num-clients, or use partition=iid") from err


def _draw(config: RunConfig, rows: Dataset, num_partitions: int, minimum: int = MIN_EXAMPLES) -> Split:
    parts = partitioner(config, num_partitions, minimum)
    parts.dataset = rows
    with warnings.catch_warnings():  # flwr-datasets warns on each Dirichlet redraw; _repaired says it once
        warnings.simplefilter("ignore")
        found = tuple(tuple(parts.load_partition(i)["row"]) for i in range(num_partitions))
    if min(len(r) for r in found) < minimum:  # a partitioner that does not promise a minimum
        raise ConfigError(f"partition={config.partition} leaves a client without examples; "
                          "use fewer num-clients or partition=iid")
    return Split(found, config.partition)


def _repaired(config: RunConfig, rows: Dataset, num_partitions: int) -> Split:
    """The first Dirichlet draw, with every client below the minimum topped up from the largest."""
    parts = [list(r) for r in _draw(config, rows, num_partitions, minimum=0).rows]
    topped = top_up(parts, MIN_EXAMPLES, config.seed)
    note = (f"partition=dirichlet: the Dirichlet(alpha={config.dirichlet_alpha}) split of {len(rows)} "
            f"examples left {topped} of {num_partitions} clients below the minimum of {MIN_EXAMPLES} "
            "example per client; they were topped up with random examples of the largest partitions "
            "(raise dirichlet-alpha, lower num-clients or use partition=iid to avoid it)")
    return Split(tuple(tuple(p) for p in parts), config.partition, topped, note)


def top_up(parts: list[list[int]], minimum: int, seed: int) -> int:
    """Move random rows of the largest partitions into those below ``minimum``; how many were short.

    In place and seeded: the same partitions and seed give the same result in any process.
    """
    rng = random.Random(seed)
    short = [i for i, rows in enumerate(parts) if len(rows) < minimum]
    largest = [(-len(rows), i) for i, rows in enumerate(parts)]
    heapq.heapify(largest)
    for i in short:
        while len(parts[i]) < minimum:
            size, donor = heapq.heappop(largest)
            if -size <= minimum:
                raise ConfigError(f"{sum(map(len, parts))} examples cannot give {len(parts)} clients "
                                  f"{minimum} each; lower num-clients")
            parts[i].append(parts[donor].pop(rng.randrange(-size)))
            heapq.heappush(largest, (size + 1, donor))
    return len(short)
