"""Round-1 codec probe (issue 23): what each side's compression costs, in minutes instead of runs.

A compressed run's lag shows in its first round (the curves of ``benchmarks/codec.py`` run
behind fp32 from round 1 on, by the gap round 1 opens). Round 1 needs no error feedback
(every residual starts at zero), so it can be replayed exactly once and scored under many
codecs: the probe trains the clients of the codec benchmark's run (same config, seeds, learning
rate and restricted softmax as :func:`pollinate.client.app.run_round`) from the seeded initial
adapter, then for each setting encodes and decodes every client's update with the uplink codec,
aggregates the decoded updates with the run's aggregator and server optimizer, encodes and
decodes that increment with the downlink codec, and scores the resulting global model on the
run's test set. A setting's ``fp32`` row is the round-1 accuracy of the fp32 run; a test checks
that the probe's round-1 state is the simulation's.

Settings are the codec benchmark's (``fp32``, ``default``, ``UP/DOWN[/HEAD]``; ``flower`` is not
a codec). Rows: the round-1 accuracy, mean and sd over seeds, ``vs_fp32`` in points, and the
bytes per client up and down of that round.

    python benchmarks/codec_probe.py --recipe defaults --datasets sst2,banking77 --seeds 0 \\
        --settings default,sign/fp32/int4-row,fp32/sign/int4-row,sign2/sign2/int4-row
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pollinate import data as datalib
from pollinate.aggregators import ClientUpdate, resolve
from pollinate.client.trainer import make_optimizer, round_learning_rate, train
from pollinate.codec import Delta, DeltaHeader, decode, encode
from pollinate.config import RunConfig
from pollinate.deltas import add
from pollinate.evaluation import evaluate
from pollinate.modeling import AdapterModel, ModelSpec
from pollinate.protocol import downlink_codec, uplink_codec
from pollinate.server.optimizers import server_optimizer
from pollinate.spec import Tensors

if __package__ in (None, ""):  # run as a file: import ``benchmarks`` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import codec, harness  # noqa: E402

NAME = "codec-probe"
COLUMNS = ("dataset", "setting", "seed_count", "accuracy", "accuracy_sd", "vs_fp32", "bytes_up", "bytes_down")


@dataclass
class RoundOne:
    """The clients' round-1 updates of one run, trained once and shared by every setting."""

    model: AdapterModel
    initial: Tensors
    updates: list[tuple[int, Tensors, int]]  # (partition id, update, examples)
    test: datalib.Encoded


def train_round_one(config: RunConfig) -> RoundOne:
    """Every client's round-1 update from the seeded initial adapter, as the simulation trains it."""
    aggregator_cls = resolve(config.aggregator)
    options = config.aggregator_option_map
    table = datalib.train_table(config)
    names = datalib.label_names(table)  # the label map as the server builds it
    test_table = datalib.test_table(config, names or None)
    num_labels = len(names) or config.num_labels or datalib.num_labels(test_table, table)
    model = aggregator_cls.build_model(ModelSpec.from_config(config, num_labels, config.global_rank), "cpu")
    initial = {k: v.clone() for k, v in aggregator_cls(**options).initial_state(model).items()}
    part = aggregator_cls.client_part(options, {}, {})
    training = config.replace(learning_rate=round_learning_rate(config, 1))
    updates = []
    for pid in range(config.num_clients):
        data = datalib.encode(datalib.client_table(config, table, pid, config.num_clients), model.tokenizer,
                              config.task, config.max_length)
        seed = config.seed + 1000 * 1 + pid  # as run_round seeds round 1
        torch.manual_seed(seed)
        part.load_global(model, initial)
        start = model.adapter_state()
        train(model, data, training, seed, make_optimizer(model, training))
        updates.append((pid, part.update(model, start), len(data)))
    return RoundOne(model, initial, updates,
                    datalib.encode(test_table, model.tokenizer, config.task, config.max_length))


def replay(round_one: RoundOne, config: RunConfig) -> dict[str, Any]:
    """Round 1 under ``config``'s codecs: the global state after it, its test accuracy and the
    bytes per client each way."""
    aggregator_cls = resolve(config.aggregator)
    aggregator = aggregator_cls(**config.aggregator_option_map)
    part = aggregator_cls.client_part(config.aggregator_option_map, {}, {})
    model = round_one.model
    aggregator.begin(1, round_one.initial)
    uplink, received = uplink_codec(config), aggregator.uplink_spec(model)
    sizes = []
    for pid, update, examples in round_one.updates:
        payload = encode(Delta(DeltaHeader(round=1), update), uplink)
        sizes.append(len(payload))
        decoded = decode(payload, received).tensors
        aggregator.accumulate(ClientUpdate(pid, decoded, examples, config.global_rank, config.lora_alpha))
    increment = server_optimizer(config).step(aggregator.finalize())
    down = encode(Delta(DeltaHeader(round=1), aggregator.pack_downlink(increment, latest_round=True)),
                  downlink_codec(config))
    sent = decode(down, aggregator.downlink_spec(model)).tensors
    state = add(round_one.initial, part.unpack_downlink(sent))
    part.load_global(model, state)
    return {"state": state, "accuracy": evaluate(model, round_one.test)["accuracy"],
            "bytes_up": round(statistics.fmean(sizes)), "bytes_down": len(down)}


def rows_of(args: argparse.Namespace, wires: dict[str, codec.Wire]) -> list[dict[str, Any]]:
    """One row per dataset and setting, over the seeds (round 1 trained once per dataset and seed)."""
    scores: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for dataset in args.dataset_list:
        for seed in args.seed_list:
            harness.console.rule(f"[bold]{dataset}, seed {seed}: training round 1")
            round_one = train_round_one(codec.run_config(args, dataset, seed, wires[codec.REFERENCE]))
            for name, wire in wires.items():
                result = replay(round_one, codec.run_config(args, dataset, seed, wire))
                harness.console.print(f"{dataset} s{seed} {name}: round-1 accuracy {result['accuracy']:.3f}")
                scores.setdefault((dataset, name), []).append(result)
    rows = []
    for (dataset, name), results in scores.items():
        accuracy = [r["accuracy"] for r in results]
        fp32 = statistics.fmean(r["accuracy"] for r in scores[(dataset, codec.REFERENCE)])
        rows.append({"dataset": dataset, "setting": name, "seed_count": len(results),
                     "accuracy": statistics.fmean(accuracy),
                     "accuracy_sd": statistics.stdev(accuracy) if len(accuracy) > 1 else None,
                     "vs_fp32": 100 * (statistics.fmean(accuracy) - fp32),
                     "bytes_up": round(statistics.fmean(r["bytes_up"] for r in results)),
                     "bytes_down": round(statistics.fmean(r["bytes_down"] for r in results))})
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Round-1 points lost against fp32 per setting, one panel per dataset."""
    fig, panels = harness.dataset_panels(rows, height=0.4 * len({r["setting"] for r in rows}) + 1.5)
    for ax, dataset in panels:
        mine = [r for r in rows if r["dataset"] == dataset]
        ax.barh([r["setting"] for r in mine], [r["vs_fp32"] for r in mine], color="tab:blue")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_title(f"{dataset}: round-1 accuracy vs fp32")
        ax.set_xlabel("points")
    return harness.save_figure(fig, path)


def notes(args: argparse.Namespace, rows: list[dict[str, Any]], png: Path) -> str:
    return (f"Round 1 of the codec benchmark's runs ({args.clients} "
            f"clients x {args.max_train_examples}, Dirichlet 0.5, recipe `{args.recipe}`: "
            f"{codec.RECIPES[args.recipe]}), "
            "replayed under each setting (`UP/DOWN/HEAD`): accuracy after round 1 on the run's "
            f"{args.test_examples} test examples, mean over seeds; vs_fp32 in points; bytes_up = a client's "
            "round-1 update, bytes_down = the round-1 increment the server sends next (a run's round-1 "
            "downlink is the seeded start). No error feedback is involved (round 1 starts every "
            f"residual at zero). Plot: `benchmarks/results/{png.name}`.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.dataset_arguments(parser, ("sst2", "banking77"), seeds="0")
    parser.add_argument("--settings", default="default",
                        help=f"{codec.DEFAULT} or UP/DOWN[/HEAD] codec settings; "
                             f"{codec.REFERENCE} always runs")
    harness.federation_arguments(parser, runs="runs/bench/codec")
    parser.add_argument("--recipe", choices=tuple(codec.RECIPES), default="defaults",
                        help="the codec benchmark's training recipe (see benchmarks/codec.py)")
    parser.set_defaults(rounds=12)
    args = harness.parse_arguments(parser)
    wires = {w.name: w for w in map(codec.Wire.parse, [codec.REFERENCE, *args.settings.split(",")])}
    if codec.FLOWER in wires:
        raise SystemExit(f"{codec.FLOWER} is not a codec setting")
    rows = rows_of(args, wires)
    harness.finish(args, NAME, rows, title="Round-1 codec probe", columns=COLUMNS,
                   table_title="round 1 under each codec", left=("dataset", "setting"), plot=plot,
                   notes=lambda png: notes(args, rows, png))


if __name__ == "__main__":
    main()
