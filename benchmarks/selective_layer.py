"""Selective layer fine-tuning: regulated vs gradient vs random selection vs all layers at equal bytes.

10 clients (Dirichlet 0.3) on AG News and BANKING77; half the clients train 2 of the 6
MiniLM layers, half all 6 (``budgets=2:6``, cycled over partition ids). The selective
policies run at LoRA rank ``--rank``; ``all`` trains every layer of every client at the
rank that sends the same number of LoRA parameters per round:

    all_rank = rank * mean(budget) / layers      (12 * 4 / 6 = 8)

so sum over clients of (layers sent x rank) is equal, and with top-k at a fixed density
the uplink bytes are too (the table shows the measured ratio). ``lora-alpha`` is 2 x
rank in every run so the LoRA scaling is the same. Prints a table, writes
``benchmarks/results/selective_layer.json`` (via ``harness.publish``), ``selective_layer.png``
(accuracy against cumulative uplink bytes) and the regulated runs' selection heatmaps.

    python benchmarks/selective_layer.py                 # the full benchmark
    python benchmarks/selective_layer.py --rounds 2 --datasets ag_news --no-publish   # smoke

Each run is a child process; one in which any client is dropped (Ray kills actors when
the shared machine runs low on memory) is stopped at once and rerun (up to 6 attempts,
each once 6 GiB are free). ``--reuse`` takes complete runs of the same config from
the run directories of an interrupted invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pollinate.aggregators.selective_layer import HEATMAP
from pollinate.config import RunConfig
from pollinate.server.rundir import RunDirectory

if __package__ in (None, ""):  # run as a file: import ``benchmarks`` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402

NAME = "selective_layer"
POLICIES = ("regulated", "gradient", "random", "all")
LAYERS = 6  # MiniLM-L6
ATTEMPTS = 6
MEMORY_NEEDED = 6 * 2**30  # bytes free before a run starts: server + two client actors
CHILD = ("import sys; from pollinate.config import RunConfig; "
         "from pollinate.simulations.launch import simulate; simulate(RunConfig.from_json(sys.argv[1]))")
COLUMNS = ("dataset", "policy", "rank", "layers_per_client", "accuracy", "best_accuracy", "bytes_up",
           "bytes_up_vs_all", "accuracy_vs_all")
console = harness.console


def budgets_of(text: str, clients: int) -> list[int]:
    entries = [int(b) for b in text.split(":")]
    return [entries[i % len(entries)] for i in range(clients)]


def matched_rank(rank: int, budgets: list[int]) -> int:
    """The rank at which training every layer sends as many LoRA parameters as ``budgets`` at ``rank``."""
    units = rank * sum(budgets)
    if units % (LAYERS * len(budgets)):
        raise SystemExit(f"rank {rank} with budgets {budgets} has no equal-parameter rank for 'all'; "
                         "choose a rank divisible accordingly")
    return units // (LAYERS * len(budgets))


def run_config(args: argparse.Namespace, dataset: str, policy: str, rank: int) -> RunConfig:
    options = f"policy={policy}" + ("" if policy == "all" else f",budgets={args.budgets}")
    return RunConfig.from_mapping({
        "train-data": str(harness.DATA / dataset / "train.csv"),
        "test-data": str(harness.DATA / dataset / "test.csv"), **harness.scenario_options(args),
        "partition": "dirichlet", "dirichlet-alpha": 0.3, "lora-rank": rank,
        "lora-alpha": 2.0 * rank, "aggregator": "selective-layer", "aggregator-options": options,
        "out": str(Path(args.runs) / f"{dataset}-{policy}"), "overwrite": True}, allow_extra=False)


def complete(summary: dict[str, Any] | None, config: RunConfig) -> bool:
    """Every round ran with every client (on a shared machine Ray may kill actors for memory)."""
    if summary is None or summary.get("config") != config.to_mapping():
        return False
    rounds = summary["rounds"]
    return len(rounds) == config.num_server_rounds + 1 and all(
        not r.get("dropped") and r["clients"] == config.num_clients for r in rounds[1:])


def previous(config: RunConfig) -> dict[str, Any] | None:
    """The summary of a finished run of exactly this config in its run directory, if it is complete."""
    summary = harness.finished(config)
    return summary if complete(summary, config) else None


def wait_for_memory(need: int = MEMORY_NEEDED, patience: float = 1800.0) -> None:
    """Start a run only when the machine has room for it (up to ``patience`` seconds)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        if int(fields["MemAvailable"].split()[0]) * 1024 >= need:
            return
        time.sleep(30)


def watched_simulation(config: RunConfig) -> dict[str, Any] | None:
    """Run ``config`` in a child process; stop it as soon as a round drops a client.

    On this shared machine Ray kills client actors when memory runs low, and the run then
    limps on with one client; waiting for its end would cost the rest of the run.
    """
    shutil.rmtree(config.out, ignore_errors=True)
    wait_for_memory()
    child = subprocess.Popen([sys.executable, "-c", CHILD, config.to_json()], start_new_session=True)
    while child.poll() is None:
        time.sleep(15)
        try:
            dropped = any(r.get("dropped") for r in RunDirectory(config.out).read_metrics())
        except ValueError:  # a line being written
            dropped = False
        if dropped:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait()
            return None
    path = Path(config.out) / "summary.json"
    return json.loads(path.read_text()) if child.returncode == 0 and path.exists() else None


def run_one(args: argparse.Namespace, dataset: str, policy: str, rank: int) -> dict[str, Any]:
    config = run_config(args, dataset, policy, rank)
    summary = previous(config) if args.reuse else None
    if summary is not None:
        console.print(f"reusing the finished run in {config.out}")
    for attempt in range(1, ATTEMPTS + 1):
        if summary is not None:
            break
        summary = watched_simulation(config)
        if not complete(summary, config):
            console.print(f"[yellow]attempt {attempt} failed or dropped clients; see {config.out}")
            summary = None
    if summary is None:
        raise SystemExit(f"{dataset}/{policy}: no complete run in {ATTEMPTS} attempts")
    rounds = RunDirectory(config.out).read_metrics()[1:]
    accuracies = [r["accuracy"] for r in summary["rounds"]]
    return {
        "dataset": dataset, "policy": policy, "rank": rank,
        "layers_per_client": sum(r["aggregator"]["layers_per_client"] for r in rounds) / len(rounds),
        "accuracy": accuracies[-1], "best_accuracy": max(accuracies),
        "bytes_up": sum(r["bytes_up"] for r in summary["rounds"]),
        "bytes_down": sum(r["bytes_down"] for r in summary["rounds"]),
        "curve": [(r["round"], r["accuracy"], r["bytes_up"]) for r in summary["rounds"]],
        "out": config.out,
    }


def compare_to_all(rows: list[dict[str, Any]]) -> None:
    baseline = {r["dataset"]: r for r in rows if r["policy"] == "all"}
    for row in rows:
        base = baseline.get(row["dataset"])
        if base:
            row["bytes_up_vs_all"] = row["bytes_up"] / base["bytes_up"]
            row["accuracy_vs_all"] = row["accuracy"] - base["accuracy"]


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, panels = harness.dataset_panels(rows, 4.2)
    for ax, dataset in panels:
        for row in (r for r in rows if r["dataset"] == dataset):
            sent, xs, ys = 0, [], []
            for _, accuracy, up in row["curve"]:
                sent += up
                xs.append(sent / 2**20)
                ys.append(accuracy)
            ax.plot(xs, ys, "o-", ms=3, label=f"{row['policy']} (rank {row['rank']})")
        ax.set_title(dataset)
        ax.set_xlabel("cumulative uplink (MiB, all clients)")
        ax.set_ylabel("test accuracy")
        ax.legend()
    fig.suptitle("selective layers (budgets 2 or 6 of 6 layers) vs all layers at equal bytes")
    return harness.save_figure(fig, path)


def figures(rows: list[dict[str, Any]], path: Path) -> Path:
    """The plot at ``path`` and, beside it, the layer heatmap of every regulated run."""
    for row in rows:
        if row["policy"] == "regulated":
            shutil.copy(Path(row["out"]) / HEATMAP, path.parent / f"{NAME}_heatmap_{row['dataset']}.png")
    return plot(rows, path)


def notes(args: argparse.Namespace, all_rank: int, png: Path) -> str:
    """The docs section's text under the table."""
    return (f"10 clients, Dirichlet 0.3, {args.rounds} rounds, {args.max_train_examples} train "
            f"examples per client, {args.test_examples} test examples, one seed ({args.seed}), batch "
            f"{args.batch_size}, lr {args.learning_rate}. "
            f"Budgets {args.budgets} layers of 6 (cycled over clients) for regulated/gradient/"
            f"random at rank {args.rank}; `all` trains every layer at rank {all_rank}, which "
            "sends the same number of LoRA parameters per round (rank x layers summed over "
            "clients), so bytes_up_vs_all is close to 1. accuracy = final round; "
            "accuracy_vs_all = accuracy - the equal-bytes `all` accuracy. "
            f"Plot: `benchmarks/results/{png.name}`; layer heatmaps of the regulated runs: "
            f"`benchmarks/results/{NAME}_heatmap_*.png`.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="ag_news,banking77")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--budgets", default="2:6")
    parser.add_argument("--rank", type=int, default=12)
    parser.add_argument("--reuse", action="store_true",
                        help="reuse finished, complete runs of the same config found in --runs")
    harness.federation_arguments(parser, runs="runs/bench/selective_layer")
    args = harness.parse_arguments(parser)
    all_rank = matched_rank(args.rank, budgets_of(args.budgets, args.clients))
    runs = [(d, p, all_rank if p == "all" else args.rank)
            for d in args.datasets.split(",") for p in args.policies.split(",")]
    rows = harness.run_each(runs, lambda run: f"{run[0]}, policy {run[1]}, rank {run[2]}",
                            lambda run: run_one(args, *run),
                            lambda row: f"accuracy {row['accuracy']:.4f}, uplink {row['bytes_up']:,} B")
    compare_to_all(rows)
    harness.finish(args, NAME, rows,
                   title="Selective layer fine-tuning (Sun et al. 2024) at equal uplink bytes",
                   columns=COLUMNS, table_title="selective layer fine-tuning", left=("dataset", "policy"),
                   plot=figures, notes=lambda png: notes(args, all_rank, png), private=("curve", "out"),
                   extra={"curves": {f"{r['dataset']}/{r['policy']}": r["curve"] for r in rows}})


if __name__ == "__main__":
    main()
