"""Aggregators side by side under heterogeneous LoRA ranks, with centralised LoRA as the ceiling.

10 clients (Dirichlet 0.5) on AG News and BANKING77 with client ranks
64/32/16/16/8/8/4/4/4/4 (``rank-profile``, by partition id), 10 rounds, 300 training
examples per client, 1000 test examples, one seed. The systems:

* ``fedit``: FedIT under heterogeneous ranks the way the FLoRA paper runs it: factors
  zero-padded to the largest rank and averaged with example weights (``hetlora`` with
  ``weighting=examples``; plain ``fedit`` rejects mixed ranks);
* ``ffa``: FFA-LoRA needs one rank (A is shared): every client at ``--ffa-rank``
  (16 = the mean of the profile, the same number of LoRA parameters in total);
* ``flora``, ``hetlora``, ``flexlora``: the heterogeneous profile as it is;
* ``centralised``: one LoRA of rank ``--central-rank`` trained on the union of the
  clients' (capped) data for rounds x local-epochs epochs: the same examples and the
  same number of passes over them, without federation.

Every federated system uses the same dense codec up and down (``--codec``, default
int8-row): FLoRA and FlexLoRA send full factors, which top-k sparsification destroys,
and one codec for all keeps the comparison about the aggregation rule. bytes_up and
bytes_down are per round, summed over clients, averaged over the rounds.

    python benchmarks/aggregators.py                                       # the full benchmark
    python benchmarks/aggregators.py --datasets ag_news --rounds 1 --no-publish   # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pollinate.config import RunConfig
from pollinate.simulations.centralised import train_centralised
from pollinate.simulations.launch import simulate

if __package__ in (None, ""):  # run as a file: import ``benchmarks`` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402

NAME = "aggregators"
PROFILE = "64,32,16,16,8,8,4,4,4,4"
SYSTEMS = ("fedit", "ffa", "flora", "hetlora", "flexlora", "centralised")
COLUMNS = ("dataset", "aggregator", "ranks", "accuracy", "accuracy_last3", "vs_fedit", "vs_centralised",
           "bytes_up", "bytes_down", "dropped", "minutes")


def system_options(system: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run-config options that make ``system`` (a federated one) what the docstring says."""
    if system == "fedit":
        return {"aggregator": "hetlora", "aggregator-options": "weighting=examples",
                "rank-profile": args.profile}
    if system == "ffa":
        return {"aggregator": "ffa", "lora-rank": args.ffa_rank}
    return {"aggregator": system, "rank-profile": args.profile}


def base_config(args: argparse.Namespace, dataset: str, system: str) -> RunConfig:
    return RunConfig.from_mapping({
        "train-data": str(harness.DATA / dataset / "train.csv"),
        "test-data": str(harness.DATA / dataset / "test.csv"),
        **harness.scenario_options(args), "partition": "dirichlet", "dirichlet-alpha": 0.5,
        "codec": args.codec, "downlink-codec": args.codec,
        "out": str(Path(args.runs) / f"{dataset}-{system}"), "overwrite": True,
        **({} if system == "centralised" else system_options(system, args))}, allow_extra=False)


def run_one(args: argparse.Namespace, dataset: str, system: str) -> dict[str, Any]:
    config = base_config(args, dataset, system)
    started = time.perf_counter()
    reasons: Counter[str] = Counter()
    if system == "centralised":
        history = train_centralised(config, rank=args.central_rank)
        curve = [(epoch, h["accuracy"], 0, 0) for epoch, h in enumerate(history)]
        ranks = str(args.central_rank)
    else:
        rounds = simulate_retrying_oom(config, args.retries, args.cpus)
        curve = [(r["round"], r["accuracy"], r["bytes_up"], r["bytes_down"]) for r in rounds]
        ranks = config.rank_profile or str(config.lora_rank)
        reasons.update(drop_kind(d["reason"]) for r in rounds for d in r.get("dropped", []))
    trained = curve[1:]
    return {"dataset": dataset, "aggregator": system, "ranks": ranks, "accuracy": curve[-1][1],
            "accuracy_last3": sum(c[1] for c in curve[-3:]) / len(curve[-3:]),
            "bytes_up": round(sum(c[2] for c in trained) / len(trained)),
            "bytes_down": round(sum(c[3] for c in trained) / len(trained)),
            "dropped": sum(reasons.values()), "drop_reasons": dict(reasons),
            "minutes": (time.perf_counter() - started) / 60, "curve": curve}


def drop_kind(reason: str) -> str:
    """``client stale: downlink is ...`` -> ``client stale`` (the reason's first clause)."""
    return reason.split(":", 1)[0]


def simulate_retrying_oom(config: RunConfig, retries: int, cpus: int) -> list[dict[str, Any]]:
    """The run's rounds; rerun when Ray killed a client for memory (the machine is shared)."""
    for attempt in range(retries + 1):
        rounds = simulate(config, num_cpus=cpus or None)["rounds"]
        if not any("OutOfMemoryError" in d["reason"] for r in rounds for d in r.get("dropped", [])):
            break
        harness.console.print(f"[yellow]a client was killed for memory (attempt {attempt + 1})[/]")
    return rounds


def compare(rows: list[dict[str, Any]]) -> None:
    """Accuracy differences in points against FedIT and centralised of the same dataset."""
    for baseline in ("fedit", "centralised"):
        base = {r["dataset"]: r["accuracy"] for r in rows if r["aggregator"] == baseline}
        for row in rows:
            if row["dataset"] in base:
                row[f"vs_{baseline}"] = 100 * (row["accuracy"] - base[row["dataset"]])


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(2, len(datasets), figsize=(6 * len(datasets), 8), squeeze=False)
    for col, dataset in enumerate(datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        top, bottom = axes[0][col], axes[1][col]
        for row in mine:
            style = "k--" if row["aggregator"] == "centralised" else "o-"
            label = row["aggregator"] + ("" if row["ranks"] == PROFILE else f" (rank {row['ranks']})")
            top.plot([c[0] for c in row["curve"]], [c[1] for c in row["curve"]], style, ms=3, label=label)
        top.set_title(dataset)
        top.set_xlabel("round (centralised: epoch)")
        top.set_ylabel("test accuracy")
        top.legend(fontsize=8)
        federated = [r for r in mine if r["aggregator"] != "centralised"]
        xs = range(len(federated))
        bottom.bar([x - 0.2 for x in xs], [r["bytes_up"] / 2**20 for r in federated], 0.4, label="up")
        bottom.bar([x + 0.2 for x in xs], [r["bytes_down"] / 2**20 for r in federated], 0.4, label="down")
        bottom.set_xticks(list(xs), [r["aggregator"] for r in federated])
        bottom.set_yscale("log")
        bottom.set_ylabel("MiB per round (all clients, log)")
        bottom.legend()
    fig.suptitle(f"aggregators under heterogeneous LoRA ranks ({PROFILE})")
    return harness.save_figure(fig, path)


def notes(args: argparse.Namespace, png: Path) -> str:
    """The docs section's text under the table."""
    return (f"{args.clients} clients, Dirichlet 0.5, {args.rounds} rounds, client ranks "
            f"{args.profile}, {args.max_train_examples} train examples per client, "
            f"{args.test_examples} test examples, one seed ({args.seed}), batch {args.batch_size}, lr "
            f"{args.learning_rate}, codec {args.codec} "
            "up and down for every federated run. `fedit` = FedIT with zero-padded factors "
            "and example weights (the FLoRA paper's heterogeneous baseline; `hetlora` with "
            f"`weighting=examples`); `ffa` runs every client at rank {args.ffa_rank} (FFA "
            "cannot mix ranks); `centralised` = one rank-"
            f"{args.central_rank} LoRA on the pooled client data for "
            f"{args.rounds * args.local_epochs} epochs ({args.local_epochs} local epoch(s) per "
            "round). accuracy = final round, accuracy_last3 = mean of the last three rounds "
            "(epochs), less noisy than one evaluation; vs_fedit / vs_centralised = accuracy "
            "difference in points; "
            "bytes per round summed over clients, mean over rounds; dropped = client updates "
            "not aggregated over the run (by kind in the JSON's drop_reasons, each one in the "
            "run's metrics.jsonl). "
            f"Plot: `benchmarks/results/{png.name}`. See docs/aggregators.md.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="ag_news,banking77")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--profile", default=PROFILE, help="client LoRA ranks (rank-profile)")
    parser.add_argument("--ffa-rank", type=int, default=16)
    parser.add_argument("--central-rank", type=int, default=64)
    parser.add_argument("--codec", default="int8-row", help="uplink and downlink codec of every run")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a run that lost a client to OOM")
    parser.add_argument("--cpus", type=int, default=0,
                        help="Ray CPUs, i.e. clients training at once (0 = all cores; 1 halves memory)")
    harness.federation_arguments(parser, runs="runs/bench/aggregators")
    args = harness.parse_arguments(parser)
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    runs = [(d, s) for d in args.datasets.split(",") for s in args.systems.split(",")]
    rows = harness.run_each(runs, lambda run: f"{run[0]}, {run[1]}", lambda run: run_one(args, *run),
                            lambda row: f"accuracy {row['accuracy']:.4f}, {row['minutes']:.1f} min")
    compare(rows)
    harness.finish(args, NAME, rows,
                   title="Aggregators under heterogeneous LoRA ranks (FedIT, FFA, FLoRA, HetLoRA, FlexLoRA)",
                   columns=COLUMNS, table_title="aggregators under heterogeneous ranks",
                   left=("dataset", "aggregator", "ranks"), plot=plot, notes=lambda png: notes(args, png),
                   extra={"curves": {f"{r['dataset']}/{r['aggregator']}": r["curve"] for r in rows}})


if __name__ == "__main__":
    main()
