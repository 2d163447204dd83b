"""Foundation benchmark (issue 3): Pollinate vs a plain-Flower baseline vs centralised training.

One scenario and one set of hyperparameters for all systems: AG News, 10 clients with
300 training examples each from a Dirichlet(0.5) label partition of the train split,
1,000 test examples, MiniLM with LoRA r=8 on query and value plus the head, 1 local
epoch per round, 10 rounds.

* ``pollinate``: FedAvg-LoRA (``aggregator=fedit``, default codec) through
  :func:`pollinate.simulations.launch.simulate`;
* ``flower-baseline``: Flower's FedAvg with a FlowerTune-style client
  (:mod:`benchmarks.flower_baseline`), on the same Ray resources;
* ``centralised``: the same LoRA trained on the union of the clients' data for as
  many epochs as there are rounds, with Pollinate's trainer and evaluation;
* ``pollinate-bf16``: ``pollinate`` with one change, bf16 autocast in local training
  (``precision=bf16``; AMX on recent x86 CPUs), to show what that buys.

Learning rate 5e-3 for every system (the centralised run converges with it and the
federations get most of the way in 10 rounds); ``round-timeout`` is raised so that a
slow round on a busy machine is waited for, not dropped.

Per round (epoch for ``centralised``): test accuracy, wall seconds, CPU seconds of the
system's processes (the driver and its Ray workers), and the mean bytes a client sent
up and received down. Wall time on a shared machine also measures the other tenants;
CPU seconds measure only the system, so ratios are given for both.

    python -m benchmarks.foundation            # the full benchmark, published
    python -m benchmarks.foundation --jobs 2   # the same, two systems at a time (in the order of --systems)
    python -m benchmarks.foundation --quick    # 3 clients, 2 rounds: a smoke test, not published
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import ``benchmarks`` from the repository (Ray's workers too)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from datasets import concatenate_datasets  # noqa: E402
from rich.console import Console  # noqa: E402

from benchmarks import flower_baseline  # noqa: E402
from benchmarks.harness import DATA, RESULTS, markdown_table, publish, rich_table  # noqa: E402
from pollinate import data as datalib  # noqa: E402
from pollinate.client.trainer import make_optimizer, train  # noqa: E402
from pollinate.config import RunConfig, parse_options  # noqa: E402
from pollinate.evaluation import evaluate  # noqa: E402
from pollinate.modeling import ModelSpec, build_model, pick_device  # noqa: E402
from pollinate.simulations.launch import simulate  # noqa: E402

NAME = "foundation"
REQUIRED = ("pollinate", "flower-baseline", "centralised")
VARIANTS: dict[str, dict[str, Any]] = {"pollinate-bf16": {"precision": "bf16"}}  # pollinate, one change each
SYSTEMS = (*REQUIRED, *VARIANTS)
STAGGER_S = 60.0  # between concurrent starts: Ray gives a node 30 s to come up, too little when busy
COLUMNS = ("system", "round", "accuracy", "seconds", "cpu_seconds", "bytes_up", "bytes_down")
console = Console(stderr=True)


def scenario(quick: bool, out: Path) -> RunConfig:
    ag_news = DATA / "ag_news"
    if not (ag_news / "train.csv").exists():
        raise SystemExit(f"AG News not found at {ag_news}")
    size = dict(num_clients=3, max_train_examples=100, test_examples=200, num_server_rounds=2) if quick \
        else dict(num_clients=10, max_train_examples=300, test_examples=1000, num_server_rounds=10)
    return RunConfig(train_data=str(ag_news / "train.csv"), test_data=str(ag_news / "test.csv"),
                     partition="dirichlet", dirichlet_alpha=0.5, lora_rank=8, target_modules="query,value",
                     local_epochs=1, learning_rate=5e-3, aggregator="fedit",
                     min_train_nodes=size["num_clients"], round_timeout=3600.0, out=str(out), overwrite=True,
                     **size)


class CpuMeter:
    """CPU seconds (user + system) of this process and all its descendants, sampled in a thread.

    Ray's workers are descendants of the driver, so this is the whole system's CPU
    use. ``watch`` is a metrics file whose every new line marks the end of a round.
    """

    def __init__(self, watch: Path | None = None, interval: float = 0.5):
        self.watch, self.interval = watch, interval
        self.samples: list[tuple[float, float]] = []
        self.marks: list[float] = []
        self._seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> CpuMeter:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            self._seen[proc.pid] = times.user + times.system
        now = time.monotonic()
        self.samples.append((now, sum(self._seen.values())))
        if self.watch is not None and self.watch.exists():
            lines = len(self.watch.read_text().splitlines())
            self.marks += [now] * (lines - len(self.marks))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def at(self, moment: float) -> float:
        """CPU seconds used up to ``moment`` (linear between samples)."""
        before = [s for s in self.samples if s[0] <= moment] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= moment] or self.samples[-1:]
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 if t1 <= t0 else c0 + (c1 - c0) * (moment - t0) / (t1 - t0)

    def per_round(self, ends: list[float]) -> list[float]:
        """CPU seconds between consecutive round ends (0 for the first, the initial evaluation)."""
        return [0.0] + [self.at(b) - self.at(a) for a, b in zip(ends, ends[1:], strict=False)]


def run_pollinate(config: RunConfig) -> list[dict[str, Any]]:
    out = Path(config.out)
    shutil.rmtree(out, ignore_errors=True)
    with CpuMeter(watch=out / "metrics.jsonl") as meter:
        summary = simulate(config)
    rounds = summary["rounds"]
    short = [r["round"] for r in rounds[1:] if r["clients"] < config.num_clients or r.get("dropped")]
    if short:
        raise RuntimeError(f"rounds {short} did not use every client; see the log above")
    if len(meter.marks) != len(rounds):
        raise RuntimeError(f"saw {len(meter.marks)} round ends in metrics.jsonl, expected {len(rounds)}")
    cpu = meter.per_round(meter.marks)
    return [{"round": r["round"], "accuracy": r["accuracy"], "seconds": r.get("seconds", 0.0),
             "cpu_seconds": c, "bytes_up": r["bytes_up"] // max(r["clients"], 1),
             "bytes_down": r["bytes_down"] // max(r["clients"], 1)} for r, c in zip(rounds, cpu, strict=True)]


def run_baseline(config: RunConfig) -> list[dict[str, Any]]:
    with CpuMeter() as meter:
        rounds = flower_baseline.run(config)
    silent = [r["round"] for r in rounds[1:] if not r["bytes_up"]]
    if silent:
        raise RuntimeError(f"no client replied in rounds {silent}; see the log above")
    cpu = meter.per_round([r["t_end"] for r in rounds])
    return [{"round": r["round"], "accuracy": r["accuracy"], "seconds": r["seconds"], "cpu_seconds": c,
             "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"]}
            for r, c in zip(rounds, cpu, strict=True)]


def run_centralised(config: RunConfig) -> list[dict[str, Any]]:
    """One LoRA on the pooled client partitions, one optimizer, evaluated after every epoch."""
    with CpuMeter() as meter:
        table = datalib.train_table(config)
        pooled = concatenate_datasets([datalib.client_table(config, table, i, config.num_clients)
                                       for i in range(config.num_clients)])
        test_table = datalib.test_table(config)
        model = build_model(ModelSpec.from_config(config, datalib.num_labels(table, test_table)),
                            pick_device(config.device))
        train_data = datalib.encode(pooled, model.tokenizer, config.task, config.max_length)
        test_data = datalib.encode(test_table, model.tokenizer, config.task, config.max_length)
        optimizer = make_optimizer(model, config)
        rows = [{"round": 0, **evaluate(model, test_data), "seconds": 0.0, "t_end": time.monotonic()}]
        for epoch in range(1, config.num_server_rounds * config.local_epochs + 1):
            start = time.monotonic()
            train(model, train_data, config.replace(local_epochs=1, local_steps=0), config.seed + epoch,
                  optimizer)
            metrics = evaluate(model, test_data)
            now = time.monotonic()
            rows.append({"round": epoch, **metrics, "seconds": now - start, "t_end": now})
            console.print(f"epoch {epoch}  accuracy {metrics['accuracy']:.3f}  {now - start:.1f} s")
    cpu = meter.per_round([r["t_end"] for r in rows])
    return [{"round": r["round"], "accuracy": r["accuracy"], "seconds": r["seconds"], "cpu_seconds": c,
             "bytes_up": 0, "bytes_down": 0} for r, c in zip(rows, cpu, strict=True)]


RUNNERS: dict[str, Callable[[RunConfig], list[dict[str, Any]]]] = {
    "pollinate": run_pollinate, "flower-baseline": run_baseline, "centralised": run_centralised,
    **{name: lambda config, name=name: run_pollinate(config.replace(
        **VARIANTS[name], out=str(Path(config.out).with_name(name)))) for name in VARIANTS}}


def run_system(system: str, config_json: str) -> list[dict[str, Any]]:
    console.rule(f"[bold]{system}")
    started = time.monotonic()
    rows = [{"system": system, **r} for r in RUNNERS[system](RunConfig.from_json(config_json))]
    console.print(f"{system}: {time.monotonic() - started:.0f} s")
    return rows


def mean(rows: list[dict[str, Any]], system: str, key: str) -> float:
    values = [r[key] for r in rows if r["system"] == system and r["round"] > 0]
    return sum(values) / max(len(values), 1)


def final(rows: list[dict[str, Any]], system: str) -> dict[str, Any]:
    return max((r for r in rows if r["system"] == system), key=lambda r: r["round"])


def notes(rows: list[dict[str, Any]], config: RunConfig) -> str:
    systems = {r["system"] for r in rows}
    lines = [f"Final round of each system (all rounds in the JSON):\n\n"
             f"{markdown_table([final(rows, s) for s in SYSTEMS if s in systems], COLUMNS)}\n",
             f"Scenario: {config.num_clients} clients x {config.max_train_examples} AG News examples "
             f"(Dirichlet {config.dirichlet_alpha}), {config.test_examples} test examples, LoRA r="
             f"{config.lora_rank} on {config.target_modules} + head, lr {config.learning_rate}, batch "
             f"{config.batch_size}, {config.local_epochs} local epoch, {config.num_server_rounds} rounds, "
             f"precision {config.precision} (fp32 on a CPU). "
             + "".join(f"{name} is pollinate with {_options(opts)}. " for name, opts in VARIANTS.items()
                       if name in systems) +
             f"By default pollinate sends {config.codec} "
             f"(density {config.density}) up and {config.downlink_codec} down with error feedback; the "
             "baseline sends the fp32 adapter both ways. `seconds` is wall time per round (training, "
             "aggregation, evaluation) on a machine shared with other jobs; `cpu_seconds` is the CPU time "
             "of the system's own processes in that round. Bytes are per client per round. Ratios below "
             "are means over rounds 1..R of the same run.\n"]
    for name in (s for s in ("pollinate", *VARIANTS) if s in systems):
        parts = []
        if "centralised" in systems:
            parts.append(f"final accuracy {points(rows, name, 'centralised')} points vs centralised")
        if "flower-baseline" in systems:
            parts.append(f"{points(rows, name, 'flower-baseline')} points vs flower-baseline; per round vs "
                         f"flower-baseline: wall {ratio(rows, name, 'seconds'):.2f}x, CPU "
                         f"{ratio(rows, name, 'cpu_seconds'):.2f}x, bytes up "
                         f"{ratio(rows, name, 'bytes_up'):.3f}x, bytes down "
                         f"{ratio(rows, name, 'bytes_down'):.3f}x")
        lines.append(f"- {name}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def _options(options: dict[str, Any]) -> str:
    return ", ".join(f"{key.replace('_', '-')}={value}" for key, value in options.items())


def points(rows: list[dict[str, Any]], system: str, other: str) -> str:
    return f"{100 * (final(rows, system)['accuracy'] - final(rows, other)['accuracy']):+.1f}"


def ratio(rows: list[dict[str, Any]], system: str, key: str) -> float:
    return mean(rows, system, key) / max(mean(rows, "flower-baseline", key), 1e-9)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, secs) = plt.subplots(1, 2, figsize=(11, 4))
    for system in SYSTEMS:
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["round"])
        if not mine:
            continue
        acc.plot([r["round"] for r in mine], [r["accuracy"] for r in mine], marker="o", label=system)
        line = secs.plot([r["round"] for r in mine[1:]], [r["seconds"] for r in mine[1:]], marker="o",
                         label=f"{system} wall")[0]
        secs.plot([r["round"] for r in mine[1:]], [r["cpu_seconds"] for r in mine[1:]], linestyle="--",
                  color=line.get_color(), label=f"{system} CPU")
    acc.set(xlabel="round (epoch for centralised)", ylabel="test accuracy", title="Accuracy")
    secs.set(xlabel="round (epoch for centralised)", ylabel="seconds", title="Seconds per round")
    acc.legend()
    secs.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 clients, 2 rounds, not published")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {', '.join(SYSTEMS)} "
                             f"(published if it has {', '.join(REQUIRED)})")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run up to this many systems at once (each in its own process)")
    parser.add_argument("--set", default="", metavar="KEY=VALUE,...",
                        help="run-config overrides for every system (e.g. learning-rate=0.005)")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {SYSTEMS}")
    work = Path(tempfile.mkdtemp(prefix="pollinate-foundation-"))
    base = scenario(args.quick, work / "pollinate")
    config = RunConfig.from_mapping({**base.to_mapping(), **parse_options(args.set, "--set")},
                                    allow_extra=False)

    rows: list[dict[str, Any]] = []
    if args.jobs > 1:  # concurrent systems share the machine's load alike (fairer wall times when shared)
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            futures = []
            for i, system in enumerate(systems):
                time.sleep(STAGGER_S if i else 0.0)
                futures.append(pool.submit(run_system, system, config.to_json()))
            for future in futures:
                rows += future.result()
    else:
        for system in systems:
            rows += run_system(system, config.to_json())
    Console().print(rich_table(rows, COLUMNS, title="foundation benchmark", left=("system",)))
    publishable = not args.quick and set(REQUIRED) <= set(systems)
    if publishable:
        png = plot(rows, RESULTS / f"{NAME}.png")
        path = publish(NAME, rows, title="Foundation: Pollinate vs plain Flower vs centralised (AG News)",
                       columns=COLUMNS, extra={"config": config.to_mapping()},
                       notes=notes(rows, config) + f"\n\n![foundation](../benchmarks/results/{png.name})")
        console.print(f"wrote {path} and {png}")
    else:
        record = {"config": config.to_mapping(), "rows": rows}
        (work / f"{NAME}.json").write_text(json.dumps(record, indent=2))
        plot(rows, work / f"{NAME}.png")
        console.print(notes(rows, config))
        console.print(f"not published (quick run or a subset); results in {work}")


if __name__ == "__main__":
    main()
