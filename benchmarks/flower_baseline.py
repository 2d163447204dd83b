"""A plain-Flower FedAvg-LoRA baseline, written the way FlowerTune's template is.

This is what Pollinate is measured against in the foundation benchmark. The
ServerApp runs Flower's built-in ``flwr.serverapp.strategy.FedAvg`` (or, for the
config's ``server-optimizer``, Flower's own FedAvgM / FedAdam / FedYogi / FedAdagrad
with the same hyperparameters: :func:`strategy_for`) over the full
fp32 adapter state (LoRA factors and classification head) sent as one ArrayRecord,
with centralised evaluation every round through ``strategy.start(evaluate_fn=...)``.
The ClientApp does what the FlowerTune (``flwr new``) LLM template's client does:
inside every train call it builds the tokenizer and the peft model, loads the
received weights with ``set_peft_model_state_dict``, tokenizes its partition padded
to a fixed max length, trains with a standard loop and replies with
``get_peft_model_state_dict``. Like the template's global ``FederatedDataset``, the
raw partition is loaded once per process.

Model, data, learning rate, batch size, clipping and epochs come from the same
:class:`RunConfig` as the Pollinate run, and partitions from :mod:`pollinate.data`,
so both systems train on identical examples.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from functools import lru_cache
from typing import Any

import torch
from datasets import Dataset
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from benchmarks.harness import console
from pollinate import data as datalib
from pollinate.config import ConfigError, RunConfig
from pollinate.modeling import ModelSpec, _base_model, default_model_path, load_tokenizer, resolve_targets
from pollinate.server.optimizers import server_optimizer

HEAD = "classifier"
EVAL_BATCH_SIZE = 64  # the same as pollinate.evaluation.evaluate's default

app = ClientApp()


def model_path(config: RunConfig) -> str:
    if config.task != "classification":
        raise ConfigError("the Flower baseline runs text classification only")
    return config.model or default_model_path()


def get_model(config: RunConfig, num_labels: int) -> PeftModel:
    """Base model + LoRA on the target modules + a trainable head (peft ``modules_to_save``).

    Seeded as Pollinate seeds its model, so both systems start from the same weights; a
    ``random:`` model (``random:bert-tiny``, for the throughput benchmark) is built as
    Pollinate builds it.
    """
    path = model_path(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if path.startswith("random:"):
            base = _base_model(ModelSpec.from_config(config, num_labels), len(get_tokenizer(config)))
        else:
            base = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, local_files_only=True)
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=resolve_targets(base, tuple(config.target_module_list)),
                          modules_to_save=[HEAD])
        return get_peft_model(base, lora)


def get_tokenizer(config: RunConfig) -> PreTrainedTokenizerBase:
    return load_tokenizer(model_path(config))


def tokenize(table: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> TensorDataset:
    """Every example padded to ``max_length`` (the template's fixed ``seq-length``)."""
    enc = tokenizer(list(table["text"]), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(table["label"]))


@lru_cache(maxsize=2)
def _train_table(config_json: str) -> Dataset:
    return datalib.train_table(RunConfig.from_json(config_json))


@lru_cache(maxsize=64)
def load_partition(config_json: str, partition_id: int, num_partitions: int) -> Dataset:
    """This node's raw partition (the template keeps its FederatedDataset in a global)."""
    config = RunConfig.from_json(config_json)
    return datalib.client_table(config, _train_table(config_json), partition_id, num_partitions)


def fit(model: PeftModel, data: TensorDataset, config: RunConfig, seed: int) -> float:
    """A standard loop: AdamW, gradient clipping, ``local-steps`` steps if set, else ``local-epochs``
    shuffled epochs. Mean loss."""
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    model.train()
    total, steps = 0.0, 0
    limit = config.local_steps or config.local_epochs * len(loader)
    while steps < limit:
        for input_ids, attention_mask, labels in itertools.islice(loader, limit - steps):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item()
            steps += 1
    return total / max(steps, 1)


@torch.no_grad()
def test(model: PeftModel, data: TensorDataset) -> dict[str, float]:
    model.eval()
    correct, loss_sum = 0, 0.0
    for input_ids, attention_mask, labels in DataLoader(data, batch_size=EVAL_BATCH_SIZE):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        correct += int((out.logits.argmax(-1) == labels).sum())
        loss_sum += float(out.loss) * len(labels)
    return {"accuracy": correct / len(data), "loss": loss_sum / len(data)}


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = msg.content["config"]
    config = RunConfig.from_json(str(settings["run-config"]))
    server_round = int(settings["server-round"])
    partition_id = int(context.node_config["partition-id"])
    trainset = load_partition(config.to_json(), partition_id, int(context.node_config["num-partitions"]))

    tokenizer = get_tokenizer(config)
    model = get_model(config, int(settings["num-labels"]))
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    data = tokenize(trainset, tokenizer, config.max_length)
    loss = fit(model, data, config, seed=config.seed + 1000 * server_round + partition_id)

    arrays = ArrayRecord(get_peft_model_state_dict(model))
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(trainset),
                            "bytes-down": msg.content["arrays"].count_bytes(),
                            "bytes-up": arrays.count_bytes()})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def strategy_for(config: RunConfig) -> FedAvg:
    """Flower's strategy for the config's ``server-optimizer``, with Pollinate's hyperparameters.

    none: FedAvg; avgm: FedAvgM; adam: FedAdam; yogi: FedYogi; adagrad: FedAdagrad, which
    has no first-moment decay (Pollinate's adagrad is the same with ``server-momentum=0``).
    """
    common: dict[str, Any] = dict(fraction_train=config.fraction_train, fraction_evaluate=0.0,
                                  min_train_nodes=config.min_train_nodes,
                                  min_available_nodes=config.num_clients)
    rate = server_optimizer(config).learning_rate
    adaptive = dict(eta=rate, eta_l=config.learning_rate, tau=config.server_tau)
    moments = dict(beta_1=config.server_momentum, beta_2=config.server_beta2)
    return {"none": lambda: FedAvg(**common),
            "avgm": lambda: FedAvgM(**common, server_learning_rate=rate,
                                    server_momentum=config.server_momentum),
            "adam": lambda: FedAdam(**common, **adaptive, **moments),
            "yogi": lambda: FedYogi(**common, **adaptive, **moments),
            "adagrad": lambda: FedAdagrad(**common, **adaptive)}[config.server_optimizer]()


def make_server_app(config: RunConfig, rounds: list[dict[str, Any]]) -> ServerApp:
    """Flower's strategy (:func:`strategy_for`) for ``num-server-rounds``; appends one record per
    evaluated round to ``rounds``.

    A record's ``seconds`` is the wall time since the previous evaluation ended (the
    round's training, aggregation and evaluation); ``t_end`` is ``time.monotonic()``
    when it ended.
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        test_table = datalib.test_table(config)
        num_labels = config.num_labels or datalib.num_labels(_train_table(config.to_json()), test_table)
        testset = tokenize(test_table, get_tokenizer(config), config.max_length)
        initial = ArrayRecord(get_peft_model_state_dict(get_model(config, num_labels)))
        last = [time.monotonic()]

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model = get_model(config, num_labels)  # as the template's server-side evaluate does
            set_peft_model_state_dict(model, arrays.to_torch_state_dict())
            metrics = test(model, testset)
            now = time.monotonic()
            seconds = now - last[0] if server_round else 0.0
            rounds.append({"round": server_round, **metrics, "seconds": seconds, "t_end": now})
            console.print(f"flower round {server_round}/{config.num_server_rounds}: "
                          f"accuracy {metrics['accuracy']:.3f}, {seconds:.0f} s")  # progress of a long run
            last[0] = now
            return MetricRecord(metrics)

        strategy = strategy_for(config)
        settings = ConfigRecord({"run-config": config.to_json(), "num-labels": num_labels})
        result = strategy.start(grid, initial, num_rounds=config.num_server_rounds,
                                timeout=config.round_timeout, train_config=settings, evaluate_fn=evaluate)
        for record in rounds:
            client = result.train_metrics_clientapp.get(record["round"], {})
            record.update(train_loss=client.get("train-loss"), bytes_up=int(client.get("bytes-up", 0)),
                          bytes_down=int(client.get("bytes-down", 0)))

    return server


def run(config: RunConfig, num_cpus: int | None = None) -> list[dict[str, Any]]:
    """Run the baseline on Flower's simulation engine with the Ray resources ``simulate`` uses.

    Returns one record per round (round 0 = the initial model): accuracy, loss, seconds,
    and the mean bytes per client sent up and down.
    """
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)  # as simulate() does when not verbose
    cores = os.cpu_count() or 1
    backend = {  # as in pollinate.simulations.launch.simulate
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": min(num_cpus or cores, cores), "num_gpus": 0, "include_dashboard": False},
    }
    rounds: list[dict[str, Any]] = []
    run_simulation(server_app=make_server_app(config, rounds), client_app=app,
                   num_supernodes=config.num_clients, backend_config=backend)
    if len(rounds) != config.num_server_rounds + 1:
        raise RuntimeError(f"the baseline evaluated {len(rounds)} rounds, expected "
                           f"{config.num_server_rounds + 1}; see the log above")
    return rounds
