"""Zero-shot accuracy of clients that never trained: expert routing vs the FedAvg-LoRA global model.

FedJETs' claim, on adapters: with label-skewed clients, a client that joins after
training can pick the experts its (unlabelled) data prefers and be more accurate on its
own data at once than the one global model. Per dataset:

* the training CSV (BANKING77: its first 20 intents, so that each intent is held by a few
  clients; AG News: all 4 topics) minus a small unlabelled "public" sample is split 20
  ways with Pollinate's own label-skewed partitioner (``partition="classes"``: 3 intents
  per client on BANKING77, 2 topics on AG News);
* 4 of the 20 partitions are held out entirely; the other 16 are written to one training
  file that a real 16-node Flower simulation partitions again with the same partitioner;
* both systems run on the same file, rounds and learning rate: ``expert-routing`` (E
  rank-r experts, 2 per client, label-free defaults) and ``fedit`` (FedAvg-LoRA)
  with rank 2r, i.e. the LoRA size a client trains in expert routing, and its top-k density
  scaled so that both send the same number of values per update: equal uplink bytes
  (measured, in the table);
* held-out clients: expert routing chooses the experts that best cover the client's data
  under the global gate (labels unused), downloads those and predicts with the run's
  top-k routing among them, i.e. the model as the clients trained it (``heldout_accuracy``;
  ``heldout_top1_accuracy``: each example by its highest-scoring downloaded expert alone);
  FedAvg predicts with the global model; accuracy on the client's own data, mean over clients;
* participants: the same, on test examples of the participant's classes (experts
  chosen from its training data);
* ``--seeds N``: N independent repetitions (split, partitions, initialisation), each with
  its own 4 held-out clients; a row's accuracies are means over all of them.

Run: ``python benchmarks/experts.py`` (``--smoke`` for a tiny check; ``--rounds``,
``--datasets``, ``--seeds``). Writes ``benchmarks/results/experts.json`` and ``experts.png``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from rich.progress import track

from pollinate import data as datalib
from pollinate.aggregators import ClientPart
from pollinate.aggregators.expert_routing import ExpertConfig, ExpertRouting, download_size, personalize
from pollinate.client.trainer import train
from pollinate.codec import Delta, DeltaHeader, encode
from pollinate.config import RunConfig
from pollinate.evaluation import evaluate
from pollinate.modeling import AdapterModel, ModelSpec, build_model
from pollinate.protocol import uplink_codec
from pollinate.server.rundir import RunDirectory
from pollinate.simulations.launch import simulate

if __package__ in (None, ""):  # run as a file: import ``benchmarks`` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402

ROOT = harness.ROOT
SHARED = harness.DATA
DATASETS = {"banking77": {"classes": 20, "per_client": 3, "experts": 8},
            "ag_news": {"classes": 4, "per_client": 2, "experts": 4}}
PARTITIONS, HELD_OUT = 20, (2, 7, 12, 17)
PUBLIC = 500  # unlabelled texts set aside (reported; used only by start=kmeans)
console = harness.console


@dataclass(frozen=True)
class Setup:
    rounds: int
    examples: int  # max-train-examples per participant
    rank: int
    test_examples: int
    held_out_cap: int  # examples evaluated per held-out client
    participant_cap: int  # test examples evaluated per participant


FULL = Setup(rounds=8, examples=64, rank=8, test_examples=200, held_out_cap=150, participant_cap=60)
SMOKE = Setup(rounds=1, examples=16, rank=4, test_examples=32, held_out_cap=16, participant_cap=8)


@dataclass
class Split:
    """The federation's files and the clients evaluated outside it."""

    train: Path
    test: Path
    held_out: list[Dataset]
    per_client: int


def make_split(name: str, work: Path, setup: Setup, seed: int = 0) -> Split:
    spec = DATASETS[name]
    base = RunConfig(train_data=str(SHARED / name / "train.csv"), test_data=str(SHARED / name / "test.csv"))
    keep = set(range(spec["classes"]))
    train = datalib.train_table(base).filter(lambda r: r["label"] in keep).shuffle(seed=seed)
    test = datalib.load_table(base.test_data, base).filter(lambda r: r["label"] in keep)
    public, pool = train.select(range(PUBLIC)), train.select(range(PUBLIC, len(train)))
    split20 = base.replace(partition="classes", classes_per_client=spec["per_client"], seed=seed)
    parts = [datalib.client_table(split20, pool, p, PARTITIONS) for p in range(PARTITIONS)]
    work.mkdir(parents=True, exist_ok=True)
    files = Split(work / "train.csv", work / "test.csv", [], spec["per_client"])
    concatenate_datasets([p for i, p in enumerate(parts) if i not in HELD_OUT]).to_csv(str(files.train))
    test.to_csv(str(files.test))
    public.select_columns(["text"]).to_csv(str(work / "public.csv"))
    files.held_out.extend(_cap(parts[i], setup.held_out_cap, seed) for i in HELD_OUT)
    return files


def _cap(table: Dataset, cap: int, seed: int) -> Dataset:
    return table.shuffle(seed=seed).select(range(min(cap, len(table))))


def federation(split: Split, setup: Setup, out: Path, seed: int) -> RunConfig:
    return RunConfig(seed=seed, num_clients=16, num_server_rounds=setup.rounds, train_data=str(split.train),
                     test_data=str(split.test), partition="classes", classes_per_client=split.per_client,
                     max_train_examples=setup.examples, test_examples=setup.test_examples, max_length=32,
                     batch_size=16, learning_rate=1e-2, local_epochs=2, lora_rank=setup.rank, out=str(out),
                     overwrite=True)


@dataclass(frozen=True)
class Method:
    """Expert routing's choices that the benchmark varies (``docs/expert_routing.md``)."""

    start: str
    choice: str
    top_k: int  # experts mixed per example, of the client's 2


def expert_config(base: RunConfig, experts: int, method: Method, public: Path) -> RunConfig:
    """E experts, 2 per client; ``start=kmeans`` clusters the unlabelled public texts."""
    options = (f"experts={experts},client-experts=2,top-k={method.top_k},start={method.start},"
               f"choice={method.choice}")
    if method.start == "kmeans":
        options += f",kmeans-data={public}"
    return base.replace(aggregator="expert-routing", aggregator_options=options,
                        out=base.out + "-experts")


def fedavg_config(base: RunConfig, num_labels: int, target_bytes: float) -> RunConfig:
    """fedit at rank 2r (the LoRA a client trains in expert routing) sending ``target_bytes`` per update.

    The top-k density is calibrated on a real FedAvg update (one local epoch of participant
    0 from version 0): the density whose encoded update has ``target_bytes`` bytes.
    """
    config = base.replace(aggregator="fedit", lora_rank=2 * base.lora_rank, out=base.out + "-fedavg")
    model = build_model(ModelSpec.from_config(config, num_labels))
    data = encoded(datalib.client_table(config, datalib.train_table(config), 0, config.num_clients), model,
                   config)
    start = model.adapter_state()
    torch.manual_seed(config.seed)
    train(model, data, config, config.seed)
    update = ClientPart({}, {}).update(model, start)

    def size(density: float) -> int:
        return len(encode(Delta(DeltaHeader(), update), uplink_codec(config.replace(density=density))))

    low, high = 1e-3, 1.0
    for _ in range(16):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if size(middle) < target_bytes else (low, middle)
    return config.replace(density=round(math.sqrt(low * high), 5))


def final_state(config: RunConfig) -> dict[str, torch.Tensor]:
    ckpt = RunDirectory(config.out).load_checkpoint()
    return ckpt.states[max(ckpt.states)]


def encoded(table: Dataset, model: AdapterModel, config: RunConfig) -> datalib.Encoded:
    return datalib.encode(table, model.tokenizer, config.task, config.max_length)


def participants(config: RunConfig, test: Dataset, cap: int) -> list[tuple[Dataset, Dataset]]:
    """``(local training data, test examples of its classes)`` for each of the 16 partitions."""
    table = datalib.train_table(config)
    out = []
    for p in range(config.num_clients):
        local = datalib.client_table(config, table, p, config.num_clients)
        labels = set(local["label"])
        out.append((local, _cap(test.filter(lambda r, labels=labels: r["label"] in labels), cap, p)))
    return out


def _simulate(name: str, config: RunConfig) -> dict:
    console.rule(f"{name}: {config.aggregator} (rank {config.lora_rank}, density {config.density})")
    started = time.perf_counter()
    summary = simulate(config, num_cpus=2)
    return {**summary, "wall": time.perf_counter() - started}


def run_dataset(name: str, setup: Setup, work: Path, method: Method, seed: int) -> list[dict]:
    """Both systems' rows for one repetition of ``name`` (its split, partitions and seeds)."""
    work = work / name / f"seed-{seed}"
    split = make_split(name, work, setup, seed)
    base = federation(split, setup, work / "run", seed)
    num_labels = DATASETS[name]["classes"]
    experts_cfg = expert_config(base, DATASETS[name]["experts"], method, work / "public.csv")
    summaries = {"expert_routing": _simulate(name, experts_cfg)}
    trained = summaries["expert_routing"]["rounds"][1:]
    per_update = sum(r["bytes_up"] for r in trained) / sum(r["clients"] for r in trained)
    fedavg_cfg = fedavg_config(base, num_labels, per_update)
    summaries["fedavg"] = _simulate(name, fedavg_cfg)
    test = datalib.test_table(base.replace(test_examples=0))
    clients = participants(base, test, setup.participant_cap)
    mixture = ExpertRouting.build_model(ModelSpec.from_config(experts_cfg, num_labels), "cpu")
    mixture.configure(ExpertConfig.from_options(experts_cfg.aggregator_option_map))
    state = final_state(experts_cfg)
    plain = build_model(ModelSpec.from_config(fedavg_cfg, num_labels))
    plain.load_adapter_state(final_state(fedavg_cfg))
    held = [personalize(mixture, state, encoded(t, mixture, base))
            for t in track(split.held_out, description=f"{name}: held-out clients")]
    mine = [personalize(mixture, state, encoded(t, mixture, base), route_data=encoded(local, mixture, base),
                        compare_full=False)
            for local, t in track(clients, description=f"{name}: participants (experts)")]
    held_fedavg = [evaluate(plain, encoded(t, plain, base))["accuracy"] for t in split.held_out]
    mine_fedavg = [evaluate(plain, encoded(t, plain, base))["accuracy"]
                   for _, t in track(clients, description=f"{name}: participants (fedavg)")]
    common = {"dataset": name, "rounds": setup.rounds, "examples_per_client": setup.examples,
              "held_out_clients": len(split.held_out), "participants": len(clients), "seed": seed}
    return [
        {**common, "system": "expert_routing",
         "heldout_accuracy": _mean(r.mixture["accuracy"] for r in held),
         "heldout_top1_accuracy": _mean(r.top1["accuracy"] for r in held),
         "heldout_all_experts_accuracy": _mean(r.full["accuracy"] for r in held),
         "participant_accuracy": _mean(r.mixture["accuracy"] for r in mine),
         "server_accuracy": summaries["expert_routing"]["final"]["accuracy"],
         "bytes_up": _bytes_up(summaries["expert_routing"]),
         "jit_bytes_down": round(_mean(r.bytes_downloaded for r in held)),
         "heldout_per_client": [round(r.mixture["accuracy"], 4) for r in held],
         "heldout_experts": [list(r.experts) for r in held],
         "start": method.start, "choice": method.choice, "top_k": method.top_k,
         "density": experts_cfg.density, "wall_seconds": round(summaries["expert_routing"]["wall"])},
        {**common, "system": "fedavg", "heldout_accuracy": _mean(held_fedavg),
         "participant_accuracy": _mean(mine_fedavg),
         "server_accuracy": summaries["fedavg"]["final"]["accuracy"],
         "bytes_up": _bytes_up(summaries["fedavg"]),
         "jit_bytes_down": download_size(final_state(fedavg_cfg)),
         "heldout_per_client": [round(a, 4) for a in held_fedavg],
         "density": fedavg_cfg.density, "wall_seconds": round(summaries["fedavg"]["wall"])},
    ]


SUMMED = ("held_out_clients", "participants")


def over_seeds(runs: list[list[dict]]) -> list[dict]:
    """One row per dataset x system from its rows on every seed (``runs``: per seed, the
    rows in the same order). Every seed has as many held-out clients and participants, so
    the mean of the seeds' accuracies is the mean over all clients; bytes and times are
    means per run, per-client lists are joined, client counts summed."""
    rows = []
    for same in zip(*runs, strict=True):
        row: dict = {"seeds": [r["seed"] for r in same]}
        for key, value in same[0].items():
            if key == "seed":
                continue
            values = [r[key] for r in same]
            if isinstance(value, list):
                row[key] = [item for v in values for item in v]
            elif key in SUMMED:
                row[key] = sum(values)
            elif isinstance(value, bool | str):
                row[key] = value
            else:
                row[key] = _mean(values) if isinstance(value, float) else round(_mean(values))
        row["heldout_accuracy_per_seed"] = [round(r["heldout_accuracy"], 4) for r in same]
        rows.append(row)
    return rows


def _mean(values) -> float:
    return float(statistics.fmean(values))


def _bytes_up(summary: dict) -> int:
    return int(sum(r["bytes_up"] for r in summary["rounds"]))


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, name in zip(axes[0], datasets, strict=True):
        mine = [r for r in rows if r["dataset"] == name]
        for offset, (key, label) in enumerate((("heldout_accuracy", "held-out (zero-shot)"),
                                               ("participant_accuracy", "participants"))):
            xs = [i + (offset - 0.5) * 0.38 for i in range(len(mine))]
            bars = ax.bar(xs, [r[key] for r in mine], 0.36, label=label)
            ax.bar_label(bars, fmt="%.3f", fontsize=8, label_type="center", color="white")
        for i, r in enumerate(mine):
            ax.scatter([i - 0.19] * len(r["heldout_per_client"]), r["heldout_per_client"], color="k", s=10,
                       zorder=3)
        ax.set_xticks(range(len(mine)), [r["system"] for r in mine])
        ax.set_ylim(0, 1.18)
        ax.set_title(f"{name}: accuracy on each client's own data\n(dots: single held-out clients)",
                     fontsize=10)
        ax.legend(loc="upper center", ncol=2, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the pipeline")
    parser.add_argument("--rounds", type=int, default=0, help="override the number of rounds")
    parser.add_argument("--examples", type=int, default=0, help="override training examples per participant")
    parser.add_argument("--start", choices=("assign", "kmeans"), default="kmeans",
                        help="expert routing's symmetry breaking (kmeans: on the unlabelled public texts)")
    parser.add_argument("--choice", choices=("balanced", "gate"), default="balanced",
                        help="who trains which expert: server-balanced or each client's top experts")
    parser.add_argument("--top-k", type=int, choices=(1, 2), default=2,
                        help="experts mixed per example (FedJETs' mixture: 2 = both of the client's experts)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated")
    parser.add_argument("--seeds", type=int, default=3, help="independent repetitions per dataset (>= 1)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-experts")
    harness.publishing_arguments(parser)
    args = harness.parse_arguments(parser)
    args.no_publish = args.no_publish or args.smoke  # a smoke run is never published
    setup = SMOKE if args.smoke else FULL
    if args.rounds:
        setup = replace(setup, rounds=args.rounds)
    if args.examples:
        setup = replace(setup, examples=args.examples)
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    method = Method(args.start, args.choice, args.top_k)
    rows = []
    for name in args.datasets.split(","):
        rows += over_seeds([run_dataset(name, setup, args.work, method, seed) for seed in range(args.seeds)])
    columns = ("dataset", "system", "heldout_accuracy", "heldout_top1_accuracy", "participant_accuracy",
               "server_accuracy", "bytes_up", "jit_bytes_down", "rounds")
    harness.finish(args, "experts", rows, title="Expert routing: zero-shot accuracy of held-out clients",
                   columns=columns, left=("dataset", "system"),
                   table_title="Zero-shot accuracy of held-out clients: expert routing vs FedAvg-LoRA",
                   plot=plot, notes=lambda png: notes(args, setup, rows, png), private=())


def notes(args: argparse.Namespace, setup: Setup, rows: list[dict], png: Path) -> str:
    """The docs section's text under the table."""
    gaps = {name: _gap(rows, name) for name in dict.fromkeys(r["dataset"] for r in rows)}
    return (
        f"20 label-skewed clients (partition=classes), 4 held out entirely; 16 train for {setup.rounds} "
        f"rounds, {setup.examples} examples each (2 local epochs, lr 0.01); {args.seeds} independent "
        f"repetition(s) (split, partitions, initialisation: seeds 0-{args.seeds - 1}), accuracies are means "
        f"over all their held-out clients / participants. expert_routing: "
        + ", ".join(f"{k} {v['experts']}" for k, v in DATASETS.items()) + f" rank-{setup.rank} "
        f"experts, 2 per client (choice={args.choice}), top-{args.top_k} routing, label-free "
        f"start={args.start}"
        f"{' (on the ' + str(PUBLIC) + ' unlabelled public texts)' if args.start == 'kmeans' else ''}; "
        f"fedavg: fedit at rank "
        f"{2 * setup.rank} with top-k density calibrated to equal uplink bytes. heldout_accuracy: "
        f"zero-shot on the held-out client's own data (expert routing: it downloads the "
        "2 experts that best cover its data under the global gate and predicts with the run's "
        f"top-{args.top_k} routing among them, as it was trained; heldout_top1_accuracy: each example by "
        f"its highest-scoring downloaded expert alone); participant_accuracy: the same on test "
        f"examples of each participant's classes. Held-out gain of expert routing over fedavg (points): "
        + ", ".join(f"{k} {v}" for k, v in gaps.items()) + f". Plot: `benchmarks/results/{png.name}`.")


def _gap(rows: list[dict], name: str) -> str:
    """``+4.1`` or, over several seeds, ``+4.1 (per seed +5.3, +2.9)``."""
    mine = {r["system"]: r for r in rows if r["dataset"] == name}
    ours, theirs = mine["expert_routing"], mine["fedavg"]
    gap = f"{100 * (ours['heldout_accuracy'] - theirs['heldout_accuracy']):+.1f}"
    if len(ours["seeds"]) == 1:
        return gap
    per_seed = (f"{100 * (a - b):+.1f}" for a, b in zip(ours["heldout_accuracy_per_seed"],
                                                       theirs["heldout_accuracy_per_seed"], strict=True))
    return f"{gap} (per seed {', '.join(per_seed)})"


if __name__ == "__main__":
    main()
