"""A client's resident resources: the built model and its tokenized local data.

Building a model and tokenizing data cost seconds; a round of local training on a
few hundred examples costs about as much. They are built once per process and
reused across rounds (and across the virtual clients a simulation actor serves),
keyed by everything that determines them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from datasets import Dataset

from pollinate import data as datalib
from pollinate.aggregators import Aggregator
from pollinate.config import ConfigError, RunConfig
from pollinate.modeling import AdapterModel, ModelSpec, load_tokenizer, pick_device
from pollinate.spec import Tensors


@dataclass(frozen=True)
class NodeSettings:
    """Per-node settings from Flower's node config (``--node-config`` or the simulation)."""

    partition_id: int | None
    num_partitions: int | None
    data_path: str
    rank: int
    device: str

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any], config: RunConfig) -> NodeSettings:
        pid = node_config.get("partition-id")
        num = node_config.get("num-partitions")
        data_path = str(node_config.get("data-path", ""))
        if pid is None and not data_path and not config.train_data:
            raise ConfigError("node config needs data-path (deployment) or partition-id (simulation)")
        default_rank = config.rank_for(int(pid)) if pid is not None else config.lora_rank
        rank = int(node_config.get("lora-rank", default_rank))
        if rank <= 0:
            raise ConfigError(f"node config lora-rank must be > 0, got {rank}")
        return cls(None if pid is None else int(pid), None if num is None else int(num),
                   data_path, rank, str(node_config.get("device", config.device)))


@lru_cache(maxsize=8)
def model_for(aggregator_cls: type[Aggregator], spec: ModelSpec, device: str) -> AdapterModel:
    """The model the run's method works on, built once per (method, spec, device)."""
    return aggregator_cls.build_model(spec, pick_device(device))


@lru_cache(maxsize=64)
def local_data(config_json: str, data_path: str, partition_id: int | None,
               num_partitions: int | None, labels: tuple[str, ...] = ()) -> datalib.Encoded:
    """This node's tokenized training data: its own file, or its simulated partition.

    ``labels`` is the run's label map (names in id order) that the server sent: a node's
    own file is read through it, so every node and the server agree on what id 3 means.
    """
    config = RunConfig.from_json(config_json)
    tokenizer = tokenizer_for(config.model)
    if data_path:
        table = datalib.cap_examples(datalib.load_table(data_path, config, labels or None), config)
    else:
        if partition_id is None or num_partitions is None:
            raise ConfigError("simulated client without partition-id/num-partitions")
        table = datalib.client_table(config, shared_table(config_json), partition_id,
                                     num_partitions)
    return datalib.encode(table, tokenizer, config.task, config.max_length)


@lru_cache(maxsize=2)
def shared_table(config_json: str) -> Dataset:
    """The table simulated clients partition, read once per process, not once per virtual client
    (and, being one object, split once: :func:`pollinate.partitions.split` caches per table)."""
    return datalib.train_table(RunConfig.from_json(config_json))


tokenizer_for = lru_cache(maxsize=4)(load_tokenizer)


def data_key(config: RunConfig) -> str:
    """The config fields that determine local data (so unrelated changes reuse the cache)."""
    keep = ("task", "model", "train-data", "test-data", "test-fraction",
            "text-column", "label-column", "prompt-column",
            "response-column", "data-format", "partition", "dirichlet-alpha", "classes-per-client",
            "max-train-examples", "max-length", "seed", "num-clients")
    full = config.to_mapping()
    return RunConfig.from_mapping({k: full[k] for k in keep}).to_json()


@lru_cache(maxsize=8)
def seeded_initial(aggregator_cls: type[Aggregator], options_json: str, spec: ModelSpec,
                   device: str) -> Tensors:
    """The method's version-1 global state as this node builds it from the run seed.

    Computed on the first call, before the cached model is ever trained, so a new node
    can start from it instead of downloading it (the server's digest confirms it).
    """
    aggregator = aggregator_cls(**json.loads(options_json))
    return aggregator.initial_state(model_for(aggregator_cls, spec, device))
