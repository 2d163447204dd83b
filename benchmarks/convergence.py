"""Convergence under label skew (issue 24): server optimizers, client optimizer state, LR schedules.

AG News, SST-2 and BANKING77 from ``../shared/data``: 10 clients x 300 training examples
(Dirichlet 0.5), 1,000 test examples, 15 rounds of one local epoch, seeds 0 and 1, MiniLM
with LoRA r=8 and the head. Every federated system moves fp32 both ways (Pollinate with
``codec`` and ``downlink-codec`` fp32), so the differences are the optimizers', not the
codecs'. The systems:

* ``centralised``: the LoRA trained on the pooled client data for rounds x local epochs
  epochs (:mod:`pollinate.simulations.centralised`), the ceiling;
* ``flower-fedavg``, ``flower-fedadam``: Flower's FedAvg and FedAdam over the fp32 LoRA
  state with the FlowerTune-style client of :mod:`benchmarks.flower_baseline` (FedAdam with
  the hyperparameters of ``pollinate-adam``);
* ``pollinate-before``: Pollinate as it was before issue 24 (fedit, no server optimizer, a
  fresh AdamW every round, constant learning rate, no restricted softmax, the scenario's
  local epochs), pinned so it stays "before";
* ``pollinate-OPT``: the same with ``server-optimizer=OPT`` (avgm, adam, yogi, adagrad) at
  its default hyperparameters;
* ``default``: Pollinate with the project's current defaults (:class:`RunConfig`), its
  local epochs included (the other systems take ``--local-epochs``, 1 by default, so
  ``centralised`` trains rounds x that many epochs).

A Pollinate system name takes modifiers: ``+state`` (``client-optimizer-state=true``),
``+cosine`` (``lr-schedule=cosine`` after ``--warmup-rounds`` of warm-up) and ``+KEY=VALUE``
(any run-config option), e.g. ``pollinate-adam+state+cosine`` or
``pollinate-adam+server-learning-rate=0.03``.

Per dataset and system, over the seeds: the mean accuracy curve, the final accuracy's mean
and sd, ``gap_to_centralised`` (final accuracy minus centralised's, a fraction) and
``rounds_to_target``: the first round whose seed-mean accuracy reaches 95% of centralised's
final accuracy (none: not within the rounds).

Every finished run is cached under ``--runs`` by its whole config, so the benchmark can be
built up over several invocations: each runs only what is missing and publishes every row
its arguments name.

    python benchmarks/convergence.py                  # the full benchmark: many CPU-hours on 2 cores
    python benchmarks/convergence.py --datasets banking77 --seeds 0 --rounds 8 \\
        --systems centralised,pollinate-before,pollinate-adam          # a reduced run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pollinate.config import SERVER_OPTIMIZERS, RunConfig
from pollinate.simulations.centralised import train_centralised

if __package__ in (None, ""):  # run as a file: import ``benchmarks`` from the repository (Ray's workers too)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import flower_baseline, harness  # noqa: E402

NAME = "convergence"
DATASETS = ("ag_news", "sst2", "banking77")
BEFORE = {"aggregator": "fedit", "server-optimizer": "none", "client-optimizer-state": False,
          "lr-schedule": "constant", "lr-warmup-rounds": 0, "restricted-softmax": 1.0}
"""Pollinate's training options before issue 24, pinned: ``pollinate-before`` stays what it was."""
SYSTEMS = ("centralised", "flower-fedavg", "flower-fedadam", "pollinate-before",
           *(f"pollinate-{name}" for name in SERVER_OPTIMIZERS[1:]), "default")
MODIFIERS = {"state": {"client-optimizer-state": True}, "cosine": {"lr-schedule": "cosine"}}
TARGET = 0.95  # rounds_to_target: this share of centralised's final accuracy
GAP_POINTS, FLOWER_SHARE = 2.0, 0.8  # the default's targets: gap to centralised, rounds vs Flower FedAvg's
COLUMNS = ("dataset", "system", "seed_count", "accuracy", "accuracy_sd", "gap_to_centralised",
           "rounds_to_target", "loss", "accuracy_by_round", "targets")


def system_options(system: str, args: argparse.Namespace) -> dict[str, Any]:
    """The run-config options that make ``system`` (after the shared scenario) what the docstring says."""
    name, *modifiers = system.split("+")
    if name == "centralised":
        base: dict[str, Any] = dict(BEFORE)
    elif name in ("flower-fedavg", "flower-fedadam"):
        base = {**BEFORE, "server-optimizer": "adam" if name == "flower-fedadam" else "none"}
    elif name == "pollinate-before":
        base = dict(BEFORE)
    elif name == "default":
        base = {"local-epochs": RunConfig().local_epochs}  # the default's, not the scenario's
    elif name.startswith("pollinate-") and name.removeprefix("pollinate-") in SERVER_OPTIMIZERS:
        base = {**BEFORE, "server-optimizer": name.removeprefix("pollinate-")}
    else:
        raise SystemExit(f"unknown system {system!r}; known: {', '.join(SYSTEMS)} (+state, +cosine, "
                         "+KEY=VALUE after a pollinate system)")
    if modifiers and not (name.startswith("pollinate-") or name == "default"):
        raise SystemExit(f"{system}: modifiers apply to pollinate systems only")
    for modifier in modifiers:
        if modifier in MODIFIERS:
            base.update(MODIFIERS[modifier])
            if modifier == "cosine":
                base["lr-warmup-rounds"] = args.warmup_rounds
        elif "=" in modifier:
            key, value = modifier.split("=", 1)
            base[key] = value
        else:
            raise SystemExit(f"{system}: unknown modifier {modifier!r} (state, cosine or KEY=VALUE)")
    return base


def run_config(args: argparse.Namespace, dataset: str, system: str, seed: int) -> RunConfig:
    """The system's run; its ``out`` is named by a hash of everything else, so equal runs share it."""
    options = {
        "train-data": str(harness.DATA / dataset / "train.csv"),
        "test-data": str(harness.DATA / dataset / "test.csv"),
        **harness.scenario_options(args), "seed": seed, "partition": "dirichlet", "dirichlet-alpha": 0.5,
        "codec": "fp32", "downlink-codec": "fp32", "min-train-nodes": args.clients, "round-timeout": 3600.0,
        **system_options(system, args)}
    config = RunConfig.from_mapping(options, allow_extra=False)
    kind = system.split("+")[0] if system.split("+")[0] in ("centralised", "flower-fedavg",
                                                            "flower-fedadam") else "pollinate"
    return harness.keyed_out(config, args.runs, f"{dataset}-s{seed}", kind)


def federation(config: RunConfig) -> list[dict[str, Any]]:
    """The rounds of a Pollinate federation: a finished run of the same config, else a new one."""
    return harness.simulate_cached(config, reuse=True)["rounds"]


def curve_of(system: str, config: RunConfig) -> list[dict[str, float]]:
    """Test accuracy and loss after round (epoch) 0, 1, ..., rounds of one seed's run."""
    kind = system.split("+")[0]
    if kind == "centralised":
        records = harness.cached_curve(config, lambda: train_centralised(config))
    elif kind.startswith("flower-"):
        records = harness.cached_curve(config, lambda: flower_baseline.run(config))
    else:
        records = federation(config)
    return [{"accuracy": r["accuracy"], "loss": r["loss"]} for r in records]


def row(args: argparse.Namespace, dataset: str, system: str) -> dict[str, Any] | None:
    """The system's row over the seeds (with ``--cached-only``, the seeds whose runs finished;
    None if none did)."""
    started = time.perf_counter()
    configs = {seed: run_config(args, dataset, system, seed) for seed in args.seed_list}
    runs = {seed: curve_of(system, config) for seed, config in configs.items()
            if not args.cached_only or harness.cached(config)}
    if not runs:
        return None
    mean = {key: [statistics.fmean(r[key] for r in rounds) for rounds in zip(*runs.values(), strict=True)]
            for key in ("accuracy", "loss")}
    finals = [run[-1]["accuracy"] for run in runs.values()]
    return {"dataset": dataset, "system": system, "seed_count": len(runs), "accuracy": mean["accuracy"][-1],
            "accuracy_sd": statistics.stdev(finals) if len(finals) > 1 else None,
            "seeds": list(runs), "accuracy_per_seed": finals, "loss": mean["loss"][-1],
            "curve_per_seed": [[r["accuracy"] for r in run] for run in runs.values()],
            "curve": mean["accuracy"], "loss_curve": mean["loss"],
            "accuracy_by_round": " ".join(f"{a:.2f}" for a in mean["accuracy"]),
            "minutes": (time.perf_counter() - started) / 60}


def _ceiling(rows: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """Centralised's final accuracy per (dataset, seed)."""
    return {(r["dataset"], seed): final for r in rows if r["system"] == "centralised"
            for seed, final in zip(r["seeds"], r["accuracy_per_seed"], strict=True)}


def _top(ceiling: dict[tuple[str, int], float], dataset: str, seeds: list[int]) -> float | None:
    tops = [ceiling.get((dataset, seed)) for seed in seeds]
    return None if not tops or None in tops else statistics.fmean(tops)


def _rounds_to(curve: list[float], top: float | None) -> int | None:
    """The first round (after round 0) at ``TARGET`` x ``top``; None if none or no ``top``."""
    if top is None:
        return None
    return next((i for i, a in enumerate(curve) if i and a >= TARGET * top), None)


def compare(rows: list[dict[str, Any]]) -> None:
    """``gap_to_centralised`` and ``rounds_to_target`` against the centralised runs of the dataset
    on the row's own seeds (a row of fewer seeds is not compared with other seeds' ceiling); then
    the issue's ``targets`` for the ``default`` rows (:func:`targets`)."""
    ceiling = _ceiling(rows)
    for r in rows:
        top = _top(ceiling, r["dataset"], r["seeds"])
        r["gap_to_centralised"] = None if top is None else r["accuracy"] - top
        r["rounds_to_target"] = _rounds_to(r["curve"], top)
        r["targets"] = ""
    for r in rows:
        if r["system"] == "default":
            r["targets"] = targets(r, rows, ceiling)


def targets(default: dict[str, Any], rows: list[dict[str, Any]],
            ceiling: dict[tuple[str, int], float]) -> str:
    """The issue's targets for the new default on one dataset: within ``GAP_POINTS`` of centralised
    after the last round, and rounds to target at most ``FLOWER_SHARE`` x plain Flower FedAvg's,
    both judged on the seeds the compared runs share (a missing comparison says so)."""
    dataset = default["dataset"]
    gap = default["gap_to_centralised"]
    parts = ["gap: no centralised run" if gap is None else
             f"gap {100 * gap:+.1f} points ({'met' if gap >= -GAP_POINTS / 100 else 'missed'})"]
    flower = next((r for r in rows if (r["dataset"], r["system"]) == (dataset, "flower-fedavg")), None)
    seeds = [s for s in default["seeds"] if flower is not None and s in flower["seeds"]]
    top = _top(ceiling, dataset, seeds)
    if top is None:
        return "; ".join([*parts, "rounds: no flower-fedavg and centralised run on its seeds"])
    mine, theirs = (_rounds_to(_mean_curve(r, seeds), top) for r in (default, flower))
    on = f"seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"
    if mine is None:
        parts.append(f"rounds: not at target on {on} (missed)")
    elif theirs is None:
        parts.append(f"rounds {mine} vs flower-fedavg never in {len(flower['curve']) - 1} on {on} (met)")
    else:
        parts.append(f"rounds {mine} vs flower-fedavg {theirs} on {on}: {mine / theirs:.2f}x "
                     f"({'met' if mine <= FLOWER_SHARE * theirs else 'missed'})")
    return "; ".join(parts)


def _mean_curve(row: dict[str, Any], seeds: list[int]) -> list[float]:
    """The row's accuracy curve, mean over ``seeds`` only."""
    curves = [row["curve_per_seed"][row["seeds"].index(seed)] for seed in seeds]
    return [statistics.fmean(c) for c in zip(*curves, strict=True)]


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, panels = harness.dataset_panels(rows, 4.5)
    systems = list(dict.fromkeys(r["system"] for r in rows))  # one colour per system in every panel
    for ax, dataset in panels:
        for r in (r for r in rows if r["dataset"] == dataset):
            style = "k--" if r["system"] == "centralised" else f"C{systems.index(r['system']) % 10}o-"
            ax.plot(range(len(r["curve"])), r["curve"], style, ms=3,
                    label=f"{r['system']} ({r['seed_count']} seed{'s' if r['seed_count'] > 1 else ''})")
        ax.set_title(dataset)
        ax.set_xlabel("round (centralised: epoch)")
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.legend(fontsize=7)
    fig.suptitle("convergence under Dirichlet 0.5 label skew")
    return harness.save_figure(fig, path)


def notes(args: argparse.Namespace, rows: list[dict[str, Any]], png: Path) -> str:
    ran = {r["system"] for r in rows}
    missing = [f"datasets {', '.join(d for d in DATASETS if d not in args.dataset_list)}"
               if set(DATASETS) - set(args.dataset_list) else "",
               f"seeds {', '.join(str(s) for s in (0, 1) if s not in args.seed_list)}"
               if {0, 1} - set(args.seed_list) else "",
               "the second seed of " + ", ".join(f"{r['dataset']} {r['system']}" for r in rows
                                                  if r["seed_count"] < 2 <= len(args.seed_list))
               if any(r["seed_count"] < 2 <= len(args.seed_list) for r in rows) else "",
               f"systems {', '.join(s for s in SYSTEMS if s not in ran)}" if set(SYSTEMS) - ran else "",
               f"{args.rounds} rounds instead of 15" if args.rounds != 15 else "",
               f"{args.clients} clients x {args.max_train_examples} examples instead of 10 x 300"
               if (args.clients, args.max_train_examples) != (10, 300) else "",
               f"{args.test_examples} test examples instead of 1,000" if args.test_examples != 1000 else ""]
    missing = [m for m in missing if m]
    versus = []
    for dataset in args.dataset_list:
        before = next((r for r in rows if (r["dataset"], r["system"]) == (dataset, "pollinate-before")),
                      None)
        if before is not None:
            versus.append(f"{dataset}: " + ", ".join(
                f"{r['system']} {100 * (r['accuracy'] - before['accuracy']):+.1f} points "
                f"(loss {r['loss'] - before['loss']:+.2f})"
                for r in rows if r["dataset"] == dataset and r["seeds"] == before["seeds"]
                and r["system"] not in ("pollinate-before", "centralised")))
    scope = ("The full benchmark." if not missing else
             "**A reduced run, not the issue's benchmark.** Not run: " + "; ".join(missing) + ".")
    return (f"{scope} {args.clients} clients x {args.max_train_examples} examples (Dirichlet 0.5), "
            f"{args.test_examples} test examples, {args.rounds} rounds of {args.local_epochs} local "
            f"epoch(s) (`default`: its own {RunConfig().local_epochs}; centralised: rounds x "
            f"{args.local_epochs} epochs), lr {args.learning_rate}, batch {args.batch_size}, "
            f"seeds {args.seeds}; fp32 up and "
            "down for every federated system. accuracy = final round, mean over the row's seeds "
            "(seed_count; accuracy_sd: their sd, none for one seed); gap_to_centralised = accuracy minus "
            "centralised's on the same seeds (a fraction); "
            f"rounds_to_target = first round at {TARGET:.0%} of centralised's final accuracy; "
            "loss = final test loss (seed mean); accuracy_by_round = the seed-mean curve from round 0. "
            "Server optimizers at their defaults "
            "(server-learning-rate 1 for avgm, 0.01 for adam / yogi / adagrad; server-momentum 0.9, "
            "server-beta2 0.99, server-tau 0.001) unless the system name sets them; flower-fedadam uses "
            f"the same. `+cosine` = lr-schedule=cosine with {args.warmup_rounds} warm-up round(s). "
            f"Plot: `benchmarks/results/{png.name}`."
            + (" Final accuracy and loss against pollinate-before (rows on its seeds): "
               + "; ".join(versus) + "."
               if versus else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.dataset_arguments(parser, DATASETS)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--warmup-rounds", type=int, default=1, help="warm-up rounds of a +cosine system")
    parser.add_argument("--cached-only", action="store_true",
                        help="run nothing: rows from the seeds whose runs finished (seed_count: how many)")
    harness.federation_arguments(parser, runs="runs/bench/convergence")
    parser.set_defaults(rounds=15)
    args = harness.parse_arguments(parser)
    systems = args.systems.split(",")
    for system in systems:
        system_options(system, args)  # unknown names fail before any run
    runs = [(d, s) for d in args.dataset_list for s in systems]
    rows = harness.run_each(runs, lambda run: f"{run[0]}, {run[1]}", lambda run: row(args, *run),
                            lambda r: "no finished run" if r is None else f"accuracy {r['accuracy']:.4f} "
                            f"over {r['seed_count']} seed(s), {r['minutes']:.1f} min")
    rows = [r for r in rows if r is not None]
    compare(rows)
    harness.finish(args, NAME, rows, title="Convergence under label skew: server optimizers, client "
                   "optimizer state, LR schedules", columns=COLUMNS, table_title="convergence",
                   left=("dataset", "system", "accuracy_by_round", "targets"), plot=plot,
                   notes=lambda png: notes(args, rows, png),
                   extra={"curves": {f"{r['dataset']}/{r['system']}": {"accuracy": r["curve"],
                                                                      "loss": r["loss_curve"]}
                                     for r in rows}},
                   private=("curve", "loss_curve", "curve_per_seed", "minutes"))


if __name__ == "__main__":
    main()
