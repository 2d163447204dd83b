"""Local data: load tables, generate the built-in task, partition across clients, tokenize.

Data never leaves a client; only its size and metrics do. Tables are CSV, JSONL or a
``datasets`` dataset saved to disk, with ``text,label`` (classification) or
``prompt,response`` (causal LM) columns (names configurable). Partitioning uses the
flwr-datasets partitioners on the local table so that simulated clients get the same
label skews as the literature (IID, Dirichlet(alpha), k classes per client), computed once
per table (:mod:`pollinate.partitions`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset, disable_progress_bars
from transformers import PreTrainedTokenizerBase

from pollinate import partitions, tables
from pollinate.config import ConfigError, RunConfig

disable_progress_bars()  # splits and shuffles of a large file would print bars in every client actor
GENERATED = ""  # an empty data path selects the built-in generated task
_TOPICS = {
    0: "goal match team coach season league player score win stadium",
    1: "market stock profit bank shares trade economy price growth invest",
    2: "software chip data network computer internet robot science space code",
    3: "election minister war government president treaty vote border policy army",
}
_FILLER = "the a of and in to on for with today new report says after over about".split()


def generated_classification(n: int, seed: int, num_classes: int = 4) -> Dataset:
    """A deterministic topic-classification task: class words mixed with filler words.

    Hard enough that an untrained head is at chance and easy enough that a few LoRA
    rounds reach high accuracy on two CPU cores; needs no files.
    """
    rng = random.Random(seed)
    words = {c: _TOPICS[c % len(_TOPICS)].split() for c in range(num_classes)}
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(num_classes)
        other = rng.randrange(num_classes)
        tokens = rng.sample(words[label], 3) + rng.sample(words[other], 1) + rng.sample(_FILLER, 6)
        rng.shuffle(tokens)
        texts.append(" ".join(tokens))
        labels.append(label)
    return Dataset.from_dict({"text": texts, "label": labels})


def generated_causal(n: int, seed: int) -> Dataset:
    """Alpaca-style instructions with learnable rules (``instructions.generated_instructions``)."""
    from pollinate import instructions  # it imports this module

    return instructions.generated_instructions(n, seed)


def load_table(path: str, config: RunConfig, names: Sequence[str] | None = None) -> Dataset:
    """Read a CSV / JSON(L) / saved dataset, check it, and rename its columns to the standard ones.

    Classification labels become integer ids: integers as they are, names through
    ``names`` (the run's label map) or, without it, this file's sorted names, kept as a
    ``ClassLabel`` column (see :mod:`pollinate.tables`). Every error names file, line, column.
    """
    table, where = tables.read_rows(path)
    wanted = _columns(config, table.column_names)
    tables.check_columns(table, path, list(wanted.values()))
    if config.task == "classification":
        tables.check_text(table, path, config.text_column, where)
        table = tables.label_ids(table, path, config.label_column, where, names or None)
    table = table.select_columns(list(wanted.values()))
    return table.rename_columns({c: s for s, c in wanted.items() if c != s})


def _columns(config: RunConfig, available: Sequence[str]) -> dict[str, str]:
    """Standard name -> the file's column; causal-lm tables by their format (``data-format``)."""
    if config.task == "classification":
        return {"text": config.text_column, "label": config.label_column}
    from pollinate import instructions  # it imports this module

    return instructions.columns(config, available)


def train_table(config: RunConfig) -> Dataset:
    """What clients train on: ``train-data`` less the server's held-out share, or the generated task."""
    if config.train_data:
        table = load_table(config.train_data, config)
        return table if config.test_data else _held_out_split(table, config)["train"]
    if config.task == "classification":
        return generated_classification(2000, config.seed)
    return generated_causal(2000, config.seed)


def test_table(config: RunConfig, names: Sequence[str] | None = None) -> Dataset:
    """The server's held-out split, capped at ``test-examples`` (a fixed, seeded sample).

    ``test-data`` (its labels mapped through the training file's names), else the
    ``test-fraction`` of ``train-data`` that :func:`train_table` leaves out; the
    generated task's test set only for the generated task.
    """
    if config.test_data:
        if names is None and config.train_data and config.task == "classification":
            names = label_names(load_table(config.train_data, config))
        table = load_table(config.test_data, config, names)
    elif config.train_data:
        table = _held_out_split(load_table(config.train_data, config), config)["test"]
    elif config.task == "classification":
        table = generated_classification(max(config.test_examples, 1), config.seed + 10_000)
    else:
        table = generated_causal(max(config.test_examples, 1), config.seed + 10_000)
    if config.test_examples and len(table) > config.test_examples:
        table = table.shuffle(seed=config.seed).select(range(config.test_examples))
    if config.task == "causal-lm":
        from pollinate import instructions  # it imports this module

        table = instructions.mark_generation(table, config)
    return table


def _held_out_split(table: Dataset, config: RunConfig) -> dict[str, Dataset]:
    if len(table) < 2:
        raise ConfigError(f"{config.train_data}: {len(table)} row(s) cannot be split into training and "
                          "held-out data; give --test-data")
    return table.train_test_split(test_size=config.test_fraction, seed=config.seed)


def label_names(*tables_: Dataset) -> tuple[str, ...]:
    """The run's label names (``ClassLabel`` names of the first table that has them), or ``()``."""
    return next((names for t in tables_ if (names := tables.label_names(t))), ())


def num_labels(*tables_: Dataset) -> int:
    names = label_names(*tables_)
    return len(names) if names else max(max(t["label"]) for t in tables_ if len(t)) + 1


def client_table(config: RunConfig, table: Dataset, partition_id: int, num_partitions: int) -> Dataset:
    """Partition ``partition_id`` of ``table`` (see :mod:`.partitions`), capped at ``max-train-examples``."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    rows = partitions.split(config, table, num_partitions).rows[partition_id]
    return cap_examples(table.select(rows), config, partition_id)


def cap_examples(table: Dataset, config: RunConfig, salt: int = 0) -> Dataset:
    """``table`` cut to ``max-train-examples`` rows (a seeded sample) when it has more."""
    if config.max_train_examples and len(table) > config.max_train_examples:
        return table.shuffle(seed=config.seed + salt).select(range(config.max_train_examples))
    return table


@dataclass
class Encoded:
    """Tokenized examples kept resident on a client across rounds (no re-tokenizing)."""

    input_ids: list[list[int]]
    labels: list[int] | list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(table: Dataset, tokenizer: PreTrainedTokenizerBase, task: str, max_length: int) -> Encoded:
    if task == "classification":
        ids = tokenizer(list(table["text"]), truncation=True, max_length=max_length)["input_ids"]
        return Encoded(ids, [int(x) for x in table["label"]])
    from pollinate import instructions  # it imports this module

    return instructions.encode(table, tokenizer, max_length)


BUCKET_WINDOW = 8  # batches per length-sorted window of a shuffled, bucketed pass


def batches(data: Encoded, batch_size: int, pad_id: int, *, shuffle: bool, seed: int = 0,
            device: torch.device | str = "cpu", bucket: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Dynamically padded batches (each padded to its own longest sequence).

    ``bucket`` groups sequences of similar length so that padding (and the compute
    spent on it) nearly vanishes; see :func:`batch_indices`.
    """
    lengths = [len(s) for s in data.input_ids]
    for idx in batch_indices(lengths, batch_size, shuffle=shuffle, seed=seed, bucket=bucket):
        yield collate([data.input_ids[i] for i in idx], [data.labels[i] for i in idx], pad_id, device)


def batch_indices(lengths: Sequence[int], batch_size: int, *, shuffle: bool, seed: int = 0,
                  bucket: bool = False) -> list[list[int]]:
    """The example indices of each batch of one pass over examples of ``lengths``.

    Without ``bucket``: consecutive (or shuffled) slices. With ``bucket`` and
    ``shuffle`` (training): shuffle, sort each window of ``BUCKET_WINDOW`` batches by
    length, slice, then shuffle the batches (like ``group_by_length`` in transformers),
    so every epoch still mixes examples differently. With ``bucket`` alone
    (evaluation): sort everything by length.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    if bucket:
        window = batch_size * BUCKET_WINDOW if shuffle else max(len(order), 1)
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lengths.__getitem__)]
    groups = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if bucket and shuffle:
        rng.shuffle(groups)
    return groups


def collate(seqs: Sequence[list[int]], labels: Sequence, pad_id: int,
            device: torch.device | str) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    if isinstance(labels[0], list):
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        for row, seq in enumerate(labels):
            lab[row, :len(seq)] = torch.tensor(seq)
    else:
        lab = torch.tensor(labels, dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": lab.to(device)}
