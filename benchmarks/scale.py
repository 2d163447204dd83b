"""Scale, overhead and coordinator throughput of Pollinate's server (issue 21).

Three parts, each published on its own (``--parts``):

* ``scale``: ``--sizes`` sampled clients per round out of ``--virtual`` virtual clients
  (and ``--big`` VIRTUAL:SAMPLED, e.g. 10,000:100), ``--rounds`` rounds of one local step
  on the tiny random encoder ``random:bert-tiny`` over AG News (``--examples`` per client).
  Per size: the server's peak RSS (the simulation's main process, where the ServerApp runs
  beside Flower's simulation engine and the Ray driver: ``ru_maxrss``), the whole
  simulation's peak RSS (that process plus every Ray process under it, summed RSS sampled
  every 0.25 s), and per round (mean of rounds 2..R: round 1 also starts Ray's workers)
  aggregation seconds, checkpoint seconds and wall time, from metrics.jsonl's ``profile``.
* ``overhead``: the default scenario of ``pollinate simulate`` (10 clients, 5 rounds,
  MiniLM, the generated task): each component's share of the summed round wall time
  (server/profile.py), over all rounds and over rounds 2..R.
* ``throughput``: ``--throughput-clients`` clients, all trained every round, one local step
  of ``random:bert-tiny``: rounds/s and updates/s (rounds 2..R) of Pollinate and of plain
  Flower FedAvg (``benchmarks/flower_baseline.py``) on the same workload, one after the
  other in this invocation.

Every federation runs in its own process (``--worker``), so peak RSS is that run's alone;
finished runs are kept in ``--runs`` and reused with ``--reuse`` when their spec is identical.

    python benchmarks/scale.py                                   # everything, published
    python benchmarks/scale.py --parts scale --sizes 10 --virtual 100 --rounds 2 --no-publish
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import ``benchmarks`` from the repository (Ray's workers too)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import DATA, console  # noqa: E402
from pollinate.config import RunConfig  # noqa: E402
from pollinate.server.profile import COMPONENTS, summarize  # noqa: E402

MB = 2**20
SCALE_COLUMNS = ("virtual_clients", "sampled_clients", "server_peak_rss_mb", "simulation_peak_rss_mb",
                 "aggregate_s", "aggregate_ms_per_update", "checkpoint_s", "round_s", "first_round_s")
OVERHEAD_COLUMNS = ("component", "seconds", "share", "seconds_after_round1", "share_after_round1")
THROUGHPUT_COLUMNS = ("clients", "system", "rounds_per_s", "updates_per_s", "round_s", "server_s", "ratio")
SERVER_WORK = ("downlink", "validate", "aggregate", "evaluate", "checkpoint", "other")  # the server's own CPU


# -- one federation in its own process ------------------------------------------------

class PeakRss:
    """Peak summed RSS of this process and its descendants (Ray's processes), sampled."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.interval):
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one federation (``system`` pollinate or flower) here; its rounds and peak memory."""
    config = RunConfig.from_json(spec["config"])
    with PeakRss() as meter:
        if spec["system"] == "flower":
            from benchmarks import flower_baseline

            rounds = flower_baseline.run(config)
        else:
            from pollinate.server.rundir import RunDirectory
            from pollinate.simulations.launch import simulate

            simulate(config, num_supernodes=spec.get("num_supernodes"))
            rounds = [{k: v for k, v in r.items() if k != "client_metrics"}
                      for r in RunDirectory(config.out).read_metrics()]
    return {"rounds": rounds, "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "simulation_peak_rss_mb": meter.peak / MB}


def run_worker(args: argparse.Namespace, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """``worker(spec)`` in a fresh process, or the saved result of an identical spec with ``--reuse``."""
    path = Path(args.runs) / f"{name}.json"
    if args.reuse and path.exists():
        saved = json.loads(path.read_text())
        if saved["spec"] == spec:
            console.print(f"[yellow]{name}: reusing {path}")
            return saved["result"]
    path.parent.mkdir(parents=True, exist_ok=True)
    result_file = path.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec), "--worker-out", str(result_file)],
                   check=True, cwd=harness.ROOT)
    result = json.loads(result_file.read_text())
    result_file.unlink()
    path.write_text(json.dumps({"spec": spec, "result": result}))
    return result


def steady(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rounds 2..R (round 1 also starts the simulation's Ray workers); round 1 if that is all."""
    trained = [r for r in rounds if r["round"] >= 1]
    return trained[1:] or trained


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# -- the three parts ------------------------------------------------------------------

def tiny_workload(args: argparse.Namespace, out: Path, **options: Any) -> RunConfig:
    """One local step of random:bert-tiny on a few AG News examples: training costs next to nothing."""
    return RunConfig.from_mapping({
        "model": "random:bert-tiny", "train-data": str(DATA / "ag_news" / "train.csv"),
        "test-data": str(DATA / "ag_news" / "test.csv"), "partition": args.partition,
        "local-steps": 1, "batch-size": 8, "max-train-examples": args.examples,
        "test-examples": args.test_examples, "seed": args.seed, "out": str(out), "overwrite": True,
        **options})


def scale_row(args: argparse.Namespace, virtual: int, sampled: int) -> dict[str, Any]:
    out = Path(args.runs) / f"scale-{virtual}-{sampled}"
    config = tiny_workload(args, out, **{
        "num-clients": virtual, "fraction-train": sampled / virtual, "num-server-rounds": args.rounds,
        "min-train-nodes": min(2, sampled)})
    result = run_worker(args, out.name, {"system": "pollinate", "config": config.to_json()})
    rounds = steady(result["rounds"])
    if any(r["sampled"] != sampled for r in rounds):
        raise RuntimeError(f"{out}: sampled {[r['sampled'] for r in rounds]}, expected {sampled}")
    aggregate = mean([r["profile"]["aggregate"] for r in rounds])
    return {"virtual_clients": virtual, "sampled_clients": sampled,
            "server_peak_rss_mb": round(result["server_peak_rss_mb"], 1),
            "simulation_peak_rss_mb": round(result["simulation_peak_rss_mb"], 1),
            "aggregate_s": aggregate, "aggregate_ms_per_update": 1000 * aggregate / sampled,
            "aggregate_best_ms_per_update": 1000 * min(r["profile"]["aggregate"] for r in result["rounds"]
                                                       if "profile" in r) / sampled,
            "checkpoint_s": mean([r["profile"]["checkpoint"] for r in rounds]),
            "round_s": mean([r["seconds"] for r in rounds]),
            "first_round_s": next(r["seconds"] for r in result["rounds"] if r["round"] == 1),
            "updates": mean([r["clients"] for r in rounds]),
            "profile": {k: mean([r["profile"][k] for r in rounds]) for k in COMPONENTS}}


def overhead_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The default ``pollinate simulate`` scenario, profiled."""
    config = RunConfig(out=str(Path(args.runs) / "overhead-default"), overwrite=True)
    result = run_worker(args, "overhead-default", {"system": "pollinate", "config": config.to_json()})
    later = {r["component"]: r for r in summarize(steady(result["rounds"]))}
    return [{**row, "seconds_after_round1": later[row["component"]]["seconds"],
             "share_after_round1": later[row["component"]]["share"]}
            for row in summarize(result["rounds"])]


def throughput_rows(args: argparse.Namespace, clients: int) -> list[dict[str, Any]]:
    rows = []
    for system in ("pollinate", "flower"):
        out = Path(args.runs) / f"throughput-{system}-{clients}"
        config = tiny_workload(args, out, **{
            "num-clients": clients, "num-server-rounds": args.throughput_rounds, "min-train-nodes": clients})
        rounds = steady(run_worker(args, out.name, {"system": system, "config": config.to_json()})["rounds"])
        seconds = sum(r["seconds"] for r in rounds)
        updates = sum(r.get("clients", clients) for r in rounds)  # FedAvg aggregates every reply
        server = [sum(r["profile"][k] for k in SERVER_WORK) for r in rounds if "profile" in r]
        rows.append({"clients": clients, "system": system, "rounds_per_s": len(rounds) / seconds,
                     "updates_per_s": updates / seconds, "round_s": seconds / len(rounds),
                     "server_s": mean(server) if server else None})
    for row in rows:
        row["ratio"] = row["rounds_per_s"] / rows[1]["rounds_per_s"]
    return rows


# -- plots and notes ------------------------------------------------------------------

def plot_scale(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, (mem, secs) = plt.subplots(1, 2, figsize=(10, 4))
    base = [r for r in rows if r["virtual_clients"] == rows[0]["virtual_clients"]]
    x = [r["sampled_clients"] for r in base]
    mem.plot(x, [r["server_peak_rss_mb"] for r in base], marker="o", label="server (main process)")
    mem.plot(x, [r["simulation_peak_rss_mb"] for r in base], marker="s", label="whole simulation")
    secs.plot(x, [r["aggregate_s"] for r in base], marker="o", label="aggregate")
    secs.plot(x, [r["round_s"] for r in base], marker="s", label="round wall time")
    secs.plot(x, [r["checkpoint_s"] for r in base], marker="^", label="checkpoint")
    mem.set(xscale="log", xlabel="sampled clients per round", ylabel="peak RSS (MB)", ylim=(0, None),
            title=f"memory, {base[0]['virtual_clients']:,} virtual clients")
    secs.set(xscale="log", yscale="log", xlabel="sampled clients per round", ylabel="seconds per round",
             title="time per round (rounds 2..R)")
    for ax in (mem, secs):
        ax.legend()
        ax.grid(alpha=0.3)
    return harness.save_figure(fig, path)


def plot_overhead(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    parts = [r for r in rows if r["component"] != "overhead"]
    fig, ax = plt.subplots(figsize=(7, 4))
    y = range(len(parts))
    ax.barh([i + 0.2 for i in y], [100 * r["share"] for r in parts], height=0.4, label="all rounds")
    ax.barh([i - 0.2 for i in y], [100 * r["share_after_round1"] for r in parts], height=0.4,
            label="rounds 2..R")
    for i, r in enumerate(parts):
        ax.text(100 * max(r["share"], r["share_after_round1"]) + 0.5, i, f"{r['share']:.1%} / "
                f"{r['share_after_round1']:.1%}", va="center", fontsize=8)
    ax.set_yticks(list(y), [r["component"] for r in parts])
    ax.set(xlabel="% of round wall time", title="where a round's time goes (default scenario)")
    ax.legend()
    return harness.save_figure(fig, path)


def plot_throughput(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    sizes = sorted({r["clients"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for offset, system in ((-0.2, "pollinate"), (0.2, "flower")):
        ax.bar([i + offset for i in range(len(sizes))],
               [next(r["updates_per_s"] for r in rows if r["clients"] == n and r["system"] == system)
                for n in sizes], width=0.4, label=system)
    ax.set_xticks(range(len(sizes)), [f"{n} clients" for n in sizes])
    ax.set(ylabel="client updates aggregated per second", title="coordinator throughput, 1 local step")
    ax.legend()
    return harness.save_figure(fig, path)


def scale_notes(args: argparse.Namespace, rows: list[dict[str, Any]], png: Path) -> str:
    base = [r for r in rows if r["virtual_clients"] == args.virtual]
    server = [r["server_peak_rss_mb"] for r in base]
    spread = (max(server) - min(server)) / min(server)
    per_update = [r["aggregate_ms_per_update"] for r in base]
    best = [r["aggregate_best_ms_per_update"] for r in base]
    wall = [r["round_s"] for r in base]
    whole = [r["simulation_peak_rss_mb"] for r in base]
    extra = [r for r in rows if r["virtual_clients"] != args.virtual]
    big = "".join(f" With {r['virtual_clients']:,} virtual clients and {r['sampled_clients']} sampled the "
                  f"server peaks at {r['server_peak_rss_mb']:.0f} MB and the simulation at "
                  f"{r['simulation_peak_rss_mb']:.0f} MB." for r in extra)
    return (f"Each size is one federation in its own process: `random:bert-tiny` (2 layers, hidden 32, "
            f"LoRA r=8 on query/value + head), AG News, partition {args.partition}, {args.examples} "
            f"examples per client, one local step (batch 8), {args.test_examples} test examples, "
            f"{args.rounds} rounds, "
            f"default codecs, 2 Ray client actors, node memory in files (`node-state-dir`, the launcher's "
            f"default; a Dirichlet split tops up clients it leaves empty: pollinate/partitions.py). "
            f"`server_peak_rss_mb` is the peak RSS (`ru_maxrss`) of the "
            f"simulation's main process: the ServerApp runs there, and so do Flower's simulation engine "
            f"(every virtual node's context and in-flight messages) and the Ray driver; "
            f"`simulation_peak_rss_mb` adds every Ray process under it (GCS, raylet, the client actors), "
            f"sampled every 0.25 s (RSS sums count pages the processes share once per process). "
            f"Times are means over rounds 2..R from metrics.jsonl's `profile` (round 1 also starts Ray's "
            f"workers: `first_round_s`); `aggregate_s` is accumulate + finalize, `checkpoint_s` the "
            f"checkpoint plus the summary write.\n\n"
            f"Reading: server peak RSS across {', '.join(str(r['sampled_clients']) for r in base)} sampled "
            f"of {args.virtual:,}: {min(server):.0f} to {max(server):.0f} MB, a spread of {spread:.1%} "
            f"(goal: within 10%: {'met' if spread <= 0.10 else 'not met'}); the whole simulation "
            f"{min(whole):.0f} to {max(whole):.0f} MB.{big} Aggregation per update, mean of rounds 2..R: "
            f"{', '.join(f'{v:.2f}' for v in per_update)} ms; the fastest round of each size: "
            f"{', '.join(f'{v:.2f}' for v in best)} ms (a flat value is linear time; single rounds on a "
            f"machine shared with other jobs vary by up to 2x). Round wall time grows with the sampled "
            f"clients ({', '.join(f'{v:.2f}' for v in wall)} s): the clients, two at a time on the two "
            f"Ray actors, are the round; the server's own work is the profile's downlink, validate, "
            f"aggregate, checkpoint and other (`profiles` in the JSON).\n\n"
            f"![scale](../benchmarks/results/{png.name})")


def overhead_notes(rows: list[dict[str, Any]], png: Path) -> str:
    total = next(r for r in rows if r["component"] == "overhead")
    return ("The default scenario of `pollinate simulate` (10 clients, Dirichlet 0.5, 5 rounds, MiniLM "
            "with LoRA r=8, the generated task, 500 test examples), profiled by the server "
            "(`pollinate simulate --profile` prints the same table for any run). Components: "
            "`downlink` packing and encoding the messages and the increment; `transport` waiting on "
            "`send_and_receive` while no client computed (Flower message handling, Ray); `client_other` "
            "the clients' own decoding, setup and encoding; `train` local training; `validate` parsing, "
            "decoding and checking replies; `aggregate` accumulate + finalize (and the server "
            "optimizer's step); `evaluate` the server's evaluation; `checkpoint` checkpoint and summary; "
            "`other` the rest (sampling, bookkeeping). "
            "Client time is placed on the round's timeline from the clients' own reports (busy = at "
            "least one client computing), split between train and client_other by their summed times. "
            f"`overhead` = everything but train and evaluate.\n\n"
            f"Reading: overhead {total['share']:.1%} of round wall time over all rounds "
            f"(goal <= 10% on CPU: {'met' if total['share'] <= 0.10 else 'not met'}), "
            f"{total['share_after_round1']:.1%} over rounds 2..R "
            f"({'met' if total['share_after_round1'] <= 0.10 else 'not met'}). Round 1 carries one-time "
            f"costs: Ray starts the client actors (each imports torch and Flower: most of round 1's "
            f"`transport`) and each client builds its model and tokenizes its data (`client_other`); "
            f"after that the overhead is the steady-state figure, so a longer run tends to it.\n\n"
            f"![overhead](../benchmarks/results/{png.name})")


def throughput_notes(args: argparse.Namespace, rows: list[dict[str, Any]], png: Path) -> str:
    ratios = [r for r in rows if r["system"] == "pollinate"]
    stated = ", ".join(f"{r['ratio']:.2f} at {r['clients']} clients" for r in ratios)
    work = ", ".join(f"{r['server_s']:.3f} s of {r['round_s']:.2f} s at {r['clients']} clients"
                     for r in ratios)
    return (f"Coordinator throughput on a workload with next to no training: `random:bert-tiny`, one "
            f"local step of batch 8, {args.examples} AG News examples per client, every client trains "
            f"every round, {args.throughput_rounds} rounds, {args.test_examples} test examples scored by "
            f"the server each round in both systems; Pollinate and plain Flower FedAvg "
            f"(`benchmarks/flower_baseline.py`: fp32 adapter both ways, model rebuilt per call) run one "
            f"after the other in this invocation, each in its own process, on 2 Ray client actors. "
            f"rounds_per_s and updates_per_s over rounds 2..R (round 1 starts Ray's workers); "
            f"ratio = Pollinate / Flower rounds per second. server_s = the seconds per round the "
            f"Pollinate server itself works (its profile's {', '.join(SERVER_WORK)}; plain Flower "
            f"records no such split).\n\n"
            f"Reading: ratio {stated} "
            f"(goal >= 1.0: {'met' if all(r['ratio'] >= 1.0 for r in ratios) else 'not met'}). The "
            f"rounds are bound by the clients and the simulation engine, not by the coordinator: "
            f"Pollinate's server works {work} per round, so most of the ratio comes "
            f"from the clients (Pollinate keeps model and tokenized data resident; the FlowerTune-style "
            f"baseline builds both per call) and from the bytes on the wire.\n\n"
            f"![throughput](../benchmarks/results/{png.name})")


# -- main -----------------------------------------------------------------------------

def sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="scale,overhead,throughput")
    parser.add_argument("--sizes", type=sizes, default=[10, 100, 1000], help="sampled clients per round")
    parser.add_argument("--virtual", type=int, default=1000, help="virtual clients of --sizes")
    parser.add_argument("--big", default="10000:100", help="VIRTUAL:SAMPLED extra row ('' = none)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=8, help="training examples per client")
    parser.add_argument("--test-examples", type=int, default=200)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--throughput-clients", type=sizes, default=[10, 100])
    parser.add_argument("--throughput-rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/bench/scale")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs of identical specs")
    harness.publishing_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(json.loads(args.worker))))
        return
    parts = args.parts.split(",")
    if "scale" in parts:
        grid = [(args.virtual, n) for n in args.sizes]
        if args.big:
            virtual, sampled = map(int, args.big.split(":"))
            grid.append((virtual, sampled))
        rows = harness.run_each(grid, lambda g: f"{g[1]:,} sampled of {g[0]:,}",
                                lambda g: scale_row(args, *g),
                                lambda r: f"server {r['server_peak_rss_mb']:.0f} MB, aggregate "
                                          f"{r['aggregate_s']:.3f} s, round {r['round_s']:.2f} s")
        profiles = {f"{r['virtual_clients']}:{r['sampled_clients']}": r["profile"] for r in rows}
        harness.finish(args, "scale", rows,
                       title="Scale: server memory and time per round vs sampled clients",
                       columns=SCALE_COLUMNS, table_title="scale", plot=plot_scale,
                       notes=lambda png: scale_notes(args, rows, png),
                       private=("profile",), extra={"profiles": profiles})
    if "overhead" in parts:
        rows = overhead_rows(args)
        harness.finish(args, "overhead", rows, title="Overhead: where a round's wall time goes",
                       columns=OVERHEAD_COLUMNS, table_title="round profile", left=("component",),
                       plot=plot_overhead, notes=lambda png: overhead_notes(rows, png))
    if "throughput" in parts:
        rows = [row for n in args.throughput_clients for row in throughput_rows(args, n)]
        harness.finish(args, "throughput", rows,
                       title="Coordinator throughput: Pollinate vs plain Flower FedAvg",
                       columns=THROUGHPUT_COLUMNS, table_title="coordinator throughput", left=("system",),
                       plot=plot_throughput, notes=lambda png: throughput_notes(args, rows, png))


if __name__ == "__main__":
    main()
