"""Centralised LoRA fine-tuning on the pooled client data: the ceiling for federated runs.

It uses the federation's own pieces (the same partitions capped the same way, the same
model, trainer and evaluation), so the one difference from a federated run is that a
single process sees every client's examples: ``epochs`` passes over the pool match
``num-server-rounds`` rounds of ``local-epochs`` on every client in examples processed.
"""

from __future__ import annotations

from datasets import concatenate_datasets

from pollinate import data as datalib
from pollinate.client.trainer import make_optimizer, train
from pollinate.config import RunConfig
from pollinate.evaluation import evaluate
from pollinate.modeling import ModelSpec, build_model, pick_device


def train_centralised(config: RunConfig, rank: int | None = None,
                      epochs: int | None = None) -> list[dict[str, float]]:
    """Train one LoRA of ``rank`` (default ``lora-rank``) on the union of the clients' data.

    Returns the held-out metrics after every epoch, index 0 being the untrained model;
    ``epochs`` defaults to ``num-server-rounds * local-epochs``.
    """
    epochs = epochs or config.num_server_rounds * config.local_epochs
    table = datalib.train_table(config)
    pooled = concatenate_datasets([datalib.client_table(config, table, i, config.num_clients)
                                   for i in range(config.num_clients)])
    test = datalib.test_table(config)
    num_labels = (config.num_labels or datalib.num_labels(table, test)
                  if config.task == "classification" else 2)
    model = build_model(ModelSpec.from_config(config, num_labels, rank or config.lora_rank),
                        pick_device(config.device))
    train_data = datalib.encode(pooled, model.tokenizer, config.task, config.max_length)
    test_data = datalib.encode(test, model.tokenizer, config.task, config.max_length)
    one_epoch = config.replace(local_epochs=1, local_steps=0)
    optimizer = make_optimizer(model, one_epoch)
    history = [evaluate(model, test_data)]
    for epoch in range(epochs):
        train(model, train_data, one_epoch, config.seed + epoch, optimizer)
        history.append(evaluate(model, test_data))
    return history
