"""Wire formats side by side (issue 23): accuracy, rounds and bytes to a target, codec time.

AG News, SST-2 and BANKING77 from ``../shared/data``: 10 clients x 300 training examples
(Dirichlet 0.5), 1,000 test examples, 12 rounds of one local epoch, FedIT without the
restricted softmax (:data:`TRAINING`), MiniLM with LoRA r=8 on query/value and the head,
seeds 0 and 1 (``--seeds 0,1,2`` where time allows). Every setting is the same run but for
what goes over the wire:

* ``fp32``: Pollinate with dense fp32 both ways (``codec=fp32``, ``downlink-codec=fp32``),
  the reference every target is measured against;
* ``flower``: the plain-Flower FedAvg-LoRA baseline of :mod:`benchmarks.flower_baseline`
  (the fp32 adapter as one ArrayRecord both ways), on the same data and seeds;
* ``default``: Pollinate with the run-config default codecs (uplink ``codec`` / ``density``,
  downlink ``downlink-codec`` / ``downlink-density``, the head's ``head-codec``);
* ``UP/DOWN[/HEAD]``: a candidate pair, each side ``ENCODING[@DENSITY]`` (``topk-int8@0.1/fp32``),
  and optionally a dense ``head-codec`` (``topk-int8@0.1/topk-ternary@0.1/int8-row``; without
  one the head goes like the rest); ``UP`` alone takes the default downlink. Error feedback
  on both sides as by default.

Per seed, the target is 97% of the fp32 run's final accuracy on the same dataset and seed;
rounds / seconds / bytes to target are those of the first round (1..R) that reaches it, with
bytes the cumulative bytes one client sent up (received down), :mod:`pollinate.server.curves`.
A row is one dataset and setting over the seeds: final accuracy mean and sd, vs_fp32 (points),
the means over seeds of rounds / bytes / seconds to target (none unless every seed reached
it), ratio_to_target_up / _down = fp32's bytes to target over the row's, bytes per client per
round (rounds 1..R), and encode_ms / decode_ms: the median :func:`pollinate.codec.encode` /
``decode`` time of the row's uplink codec on a real trained delta (the fp32 run's last global
increment, first dataset and seed). ``targets`` checks the issue's goals for the row: rounds
to target <= 1.1x fp32's, accuracy within 0.5 points, >= 20x fewer bytes both ways (50x:
stretch).

Every finished run (Pollinate: its summary.json; Flower: curve.json) is cached under
``--runs`` by its whole config, so an interrupted invocation resumes where it stopped and
the table can be built up over several invocations.

    python benchmarks/codec.py     # the full benchmark: 30 runs x 12 rounds, ~5-7 h on 2 cores
    python benchmarks/codec.py --cached-only --no-publish   # the table from the runs finished so far
    python benchmarks/codec.py --datasets sst2 --seeds 0 --rounds 2 --clients 2 \\
        --max-train-examples 40 --test-examples 100 --settings fp32,flower,default --no-publish
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollinate.codec import ENCODINGS, CodecSpec, Delta, DeltaHeader, decode, encode
from pollinate.config import RunConfig
from pollinate.deltas import diff
from pollinate.server.curves import cumulative, to_target
from pollinate.server.rundir import RunDirectory
from pollinate.spec import AdapterSpec, Tensors

if __package__ in (None, ""):  # run as a file: import ``benchmarks`` from the repository (Ray's workers too)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import flower_baseline, harness  # noqa: E402

NAME = "codec"
DATASETS = ("ag_news", "sst2", "banking77")
REFERENCE, FLOWER, DEFAULT = "fp32", "flower", "default"
# the default (sign both ways, an int4 head), then the two candidates that show what it fixed:
# the previous default top-k pair, and that pair with the int4 head alone
SETTINGS = (REFERENCE, FLOWER, DEFAULT, "topk-int8@0.1/topk-ternary@0.1",
            "topk-int8@0.1/topk-ternary@0.1/int4-row")
TARGET_SHARE = 0.97  # the target: this share of the fp32 run's final accuracy (same dataset, seed)
GOALS = {"rounds_ratio": 1.1, "points_lost": 0.5, "bytes_ratio": 20.0, "stretch_ratio": 50.0}
COLUMNS = ("dataset", "setting", "uplink", "downlink", "seed_count", "accuracy", "accuracy_sd", "vs_fp32",
           "rounds_to_target", "fp32_rounds_to_target", "bytes_to_target_up", "bytes_to_target_down",
           "ratio_to_target_up", "ratio_to_target_down", "bytes_up", "bytes_down", "encode_ms", "decode_ms",
           "targets")
PRIVATE = ("curve", "seeds", "minutes")  # kept out of the published rows (curves go in ``extra``)


@dataclass(frozen=True)
class Setting:
    """An encoding and its top-k density (1.0 for dense encodings), written ``ENCODING[@DENSITY]``."""

    encoding: str
    density: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Setting:
        encoding, _, density = text.strip().partition("@")
        if encoding not in ENCODINGS:
            raise SystemExit(f"setting {text!r}: encoding must be one of {', '.join(ENCODINGS)}")
        sparse = encoding.startswith("topk")
        if sparse != bool(density):
            raise SystemExit(f"setting {text!r}: top-k encodings need @DENSITY, dense ones take none")
        try:
            setting = cls(encoding, float(density or 1.0))
            setting.spec  # noqa: B018 - validate the density now
        except ValueError as err:
            raise SystemExit(f"setting {text!r}: {err}") from err
        return setting

    @classmethod
    def of(cls, encoding: str, density: float) -> Setting:
        """A run config's ``encoding`` and ``density`` (which a dense encoding ignores)."""
        return cls(encoding, density if encoding.startswith("topk") else 1.0)

    @property
    def label(self) -> str:
        return f"{self.encoding}@{self.density:g}" if self.spec.sparse else self.encoding

    @property
    def spec(self) -> CodecSpec:
        return CodecSpec(encoding=self.encoding, density=self.density)


@dataclass(frozen=True)
class Wire:
    """What one setting sends: Pollinate's uplink and downlink codecs and ``head-codec``, or (both
    None) the Flower baseline."""

    name: str
    uplink: Setting | None
    downlink: Setting | None
    head: str = ""

    @classmethod
    def parse(cls, text: str) -> Wire:
        text = text.strip()
        defaults = RunConfig()
        default_down = Setting.of(defaults.downlink_codec, defaults.downlink_density)
        if text == FLOWER:
            return cls(FLOWER, None, None)
        if text == REFERENCE:
            return cls(REFERENCE, Setting(REFERENCE), Setting(REFERENCE))
        if text == DEFAULT:
            return cls(DEFAULT, Setting.of(defaults.codec, defaults.density), default_down,
                       defaults.head_codec)
        up, _, rest = text.partition("/")
        down, _, head = rest.partition("/")
        uplink, downlink = Setting.parse(up), Setting.parse(down) if down else default_down
        if head and Setting.parse(head).spec.sparse:
            raise SystemExit(f"setting {text!r}: the head encoding (after the second /) must be dense")
        name = "/".join([uplink.label, downlink.label, *([head] if head else [])])
        return cls(name, uplink, downlink, head)


TRAINING = {"restricted-softmax": 1.0}
"""The training recipe the codecs were measured under, pinned (issue 24 changed the defaults after):
the codecs are compared with each other under one recipe, whatever the defaults become.
``--recipe defaults`` trains with the run-config defaults instead (their local epochs and
restricted softmax), to see how the codecs fare under what a user runs today."""
RECIPES = {"pinned": "no restricted softmax, the recipe of the first table",
           "defaults": "the training defaults: restricted softmax on"}


def recipe_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training options of ``--recipe``: the pinned :data:`TRAINING`, or the defaults' local epochs."""
    return TRAINING if args.recipe == "pinned" else {"local-epochs": RunConfig().local_epochs}


def run_config(args: argparse.Namespace, dataset: str, seed: int, wire: Wire) -> RunConfig:
    """One seed's run of ``wire``; its ``out`` is named by a hash of the whole config (the cache key).

    The Flower baseline takes the fp32 row's config (it reads the scenario, not the codecs).
    """
    uplink, downlink = wire.uplink or Setting(REFERENCE), wire.downlink or Setting(REFERENCE)
    config = RunConfig.from_mapping({
        "train-data": str(harness.DATA / dataset / "train.csv"),
        "test-data": str(harness.DATA / dataset / "test.csv"),
        **harness.scenario_options(args), "seed": seed, "partition": "dirichlet", "dirichlet-alpha": 0.5,
        "lora-rank": 8, "aggregator": "fedit", "min-train-nodes": args.clients, "round-timeout": 3600.0,
        **recipe_options(args), "codec": uplink.encoding, "density": uplink.density,
        "downlink-codec": downlink.encoding, "downlink-density": downlink.density, "head-codec": wire.head,
    }, allow_extra=False)
    kind = FLOWER if wire.uplink is None else "pollinate"
    return harness.keyed_out(config, args.runs, f"{dataset}-s{seed}", kind)


def seed_curve(args: argparse.Namespace, dataset: str, seed: int, wire: Wire) -> list[dict[str, Any]] | None:
    """Round 0..R of one seed's run with cumulative seconds and bytes per client (cached runs reused;
    with ``--cached-only``, None for a run that never finished).

    A Pollinate round's bytes are totals over the sampled clients; the Flower baseline's are
    already per client (no ``sampled``, so :func:`cumulative` divides by 1).
    """
    config = run_config(args, dataset, seed, wire)
    if args.cached_only and not harness.cached(config):
        return None
    if wire.uplink is None:
        records = harness.cached_curve(config, lambda: flower_baseline.run(config))
    else:
        records = harness.simulate_cached(config, reuse=True)["rounds"]
    return cumulative(records)


def measure(args: argparse.Namespace, dataset: str, wire: Wire) -> dict[str, Any]:
    """The setting's runs on every seed: the raw row :func:`derive` turns into the table's."""
    started = time.perf_counter()
    curves = {seed: seed_curve(args, dataset, seed, wire) for seed in args.seed_list}
    seeds = {seed: curve for seed, curve in curves.items() if curve is not None}
    return {"dataset": dataset, "setting": wire.name,
            "uplink": wire.uplink.label if wire.uplink else "flower-fp32",
            "downlink": wire.downlink.label if wire.downlink else "flower-fp32",
            "seeds": seeds, "minutes": (time.perf_counter() - started) / 60}


def seed_result(curve: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """One seed's final accuracy, cost to ``target`` (rounds 1..R; None: never reached) and mean
    bytes per client per round."""
    trained = len(curve) - 1
    return {"accuracy": curve[-1]["accuracy"], "target": target, "to_target": to_target(curve[1:], target),
            "bytes_up": curve[-1]["cum_bytes_up_per_client"] / max(trained, 1),
            "bytes_down": curve[-1]["cum_bytes_down_per_client"] / max(trained, 1),
            "dropped": sum(len(r.get("dropped", [])) for r in curve)}


def over_seeds(raw: dict[str, Any], targets: dict[int, float]) -> dict[str, Any]:
    """A row from the raw row's per-seed curves and each seed's target accuracy."""
    seeds = [seed_result(raw["seeds"][seed], targets[seed]) for seed in sorted(raw["seeds"])]
    finals = [s["accuracy"] for s in seeds]
    reached = [s["to_target"] for s in seeds if s["to_target"] is not None]
    every = len(reached) == len(seeds)

    def to_target_mean(key: str) -> float | None:
        if not every:
            return None
        mean = statistics.fmean(r[key] for r in reached)
        return round(mean) if key.startswith("bytes") else mean

    curves = [raw["seeds"][seed] for seed in sorted(raw["seeds"])]
    mean_curve = {key: [statistics.fmean(r[key] for r in rounds) for rounds in zip(*curves, strict=True)]
                  for key in ("accuracy", "cum_bytes_up_per_client", "cum_bytes_down_per_client")}
    return {**{k: v for k, v in raw.items() if k != "seeds"}, "seeds": seeds, "seed_count": len(seeds),
            "accuracy": statistics.fmean(finals),
            "accuracy_sd": statistics.stdev(finals) if len(finals) > 1 else None,
            "accuracy_per_seed": finals, "target_accuracy": statistics.fmean(targets.values()),
            "reached": f"{len(reached)}/{len(seeds)}",
            "rounds_to_target": to_target_mean("rounds"), "seconds_to_target": to_target_mean("seconds"),
            "bytes_to_target_up": to_target_mean("bytes_up_per_client"),
            "bytes_to_target_down": to_target_mean("bytes_down_per_client"),
            "bytes_up": round(statistics.fmean(s["bytes_up"] for s in seeds)),
            "bytes_down": round(statistics.fmean(s["bytes_down"] for s in seeds)),
            "dropped": sum(s["dropped"] for s in seeds),
            "curve": {**mean_curve, "accuracy_per_seed": [[r["accuracy"] for r in c] for c in curves]}}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def goals_met(row: dict[str, Any]) -> str:
    """The issue's goals against fp32 for one row: ``all (20x)`` / ``all (50x)``, else what was missed."""
    if row["setting"] == REFERENCE:
        return ""
    missed = [name for name, ok in (
        ("rounds", row["rounds_ratio"] is not None and row["rounds_ratio"] <= GOALS["rounds_ratio"]),
        ("accuracy", -row["vs_fp32"] <= GOALS["points_lost"]),
        ("bytes", min(row["ratio_to_target_up"] or 0.0, row["ratio_to_target_down"] or 0.0)
         >= GOALS["bytes_ratio"]),
    ) if not ok]
    if missed:
        return "missed: " + ", ".join(missed)
    stretch = min(row["ratio_to_target_up"], row["ratio_to_target_down"]) >= GOALS["stretch_ratio"]
    return f"all ({GOALS['stretch_ratio' if stretch else 'bytes_ratio']:g}x)"


def derive(raw_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows from the raw ones: per seed, target = ``TARGET_SHARE`` x the fp32 row's final
    accuracy on the same dataset and seed; then the means over seeds and the ratios to fp32."""
    reference = {r["dataset"]: r for r in raw_rows if r["setting"] == REFERENCE}
    rows = []
    for raw in raw_rows:
        curves = reference[raw["dataset"]]["seeds"] if raw["dataset"] in reference else {}
        raw = {**raw, "seeds": {seed: c for seed, c in raw["seeds"].items() if seed in curves}}
        if not raw["seeds"]:
            continue
        targets = {seed: TARGET_SHARE * curves[seed][-1]["accuracy"] for seed in raw["seeds"]}
        row = over_seeds(raw, targets)
        # fp32 on this row's seeds (a row built from fewer cached seeds is compared seed for seed)
        fp32 = over_seeds({"seeds": {seed: curves[seed] for seed in raw["seeds"]}}, targets)
        row["vs_fp32"] = 100 * (row["accuracy"] - fp32["accuracy"])
        row["fp32_rounds_to_target"] = fp32["rounds_to_target"]
        row["rounds_ratio"] = _ratio(row["rounds_to_target"], fp32["rounds_to_target"])
        for side in ("up", "down"):
            for key in (f"bytes_to_target_{side}", f"bytes_{side}"):
                row[key.replace("bytes", "ratio")] = _ratio(fp32[key], row[key])
        row["targets"] = goals_met(row)
        rows.append(row)
    return rows


def last_increment(out: str) -> Tensors:
    """The newest global increment of a finished run: its two newest checkpointed versions' difference."""
    checkpoint = RunDirectory(out).load_checkpoint()
    if checkpoint is None or len(checkpoint.states) < 2:
        raise SystemExit(f"{out} has no checkpoint with two versions to take a delta from")
    old, new = sorted(checkpoint.states)[-2:]
    return diff(checkpoint.states[new], checkpoint.states[old])


def codec_ms(delta: Tensors, spec: CodecSpec, repeats: int) -> tuple[float, float]:
    """Median milliseconds of ``encode`` and of ``decode`` (validating against the delta's spec)."""
    adapter = AdapterSpec.of(delta)
    message = Delta(DeltaHeader(round=1, base_version=1, target_version=2), delta)
    encode_s, decode_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        payload = encode(message, spec)
        encode_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        decode(payload, adapter)
        decode_s.append(time.perf_counter() - started)
    return 1000 * statistics.median(encode_s), 1000 * statistics.median(decode_s)


def time_codecs(rows: list[dict[str, Any]], wires: dict[str, Wire], delta: Tensors, repeats: int) -> None:
    """encode_ms / decode_ms of each row's uplink codec (none for the Flower baseline)."""
    timed: dict[str, tuple[float, float]] = {}
    for row in rows:
        uplink = wires[row["setting"]].uplink
        if uplink is not None and uplink.label not in timed:
            timed[uplink.label] = codec_ms(delta, uplink.spec, repeats)
        row["encode_ms"], row["decode_ms"] = timed[uplink.label] if uplink else (None, None)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Per dataset: accuracy vs round, and accuracy vs cumulative bytes one client sent up (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(13, 4.5 * len(datasets)), squeeze=False)
    for (by_round, by_bytes), dataset in zip(axes, datasets, strict=True):
        for row in (r for r in rows if r["dataset"] == dataset):
            style = {REFERENCE: "ks-", FLOWER: "k^--"}.get(row["setting"], "o-")
            accuracy = row["curve"]["accuracy"]
            label = f"{row['setting']} ({row['seed_count']} seed{'s' if row['seed_count'] > 1 else ''})"
            by_round.plot(range(len(accuracy)), accuracy, style, ms=3, label=label)
            by_bytes.plot(row["curve"]["cum_bytes_up_per_client"][1:], accuracy[1:], style, ms=3, label=label)
        target = next(r["target_accuracy"] for r in rows if r["dataset"] == dataset)
        for ax in (by_round, by_bytes):
            ax.axhline(target, color="grey", lw=0.8, ls=":")
            ax.set_ylabel("test accuracy (mean over the row's seeds)")
            ax.legend(fontsize=7)
        by_round.set_title(f"{dataset}: accuracy per round (dotted: target)")
        by_round.set_xlabel("round")
        by_bytes.set_title(f"{dataset}: accuracy vs bytes sent up")
        by_bytes.set_xscale("log")
        by_bytes.set_xlabel("cumulative bytes up per client (log)")
    fig.suptitle("wire formats: 10 clients, Dirichlet 0.5, FedIT LoRA r=8")
    return harness.save_figure(fig, path)


def notes(args: argparse.Namespace, rows: list[dict[str, Any]], png: Path) -> str:
    """The docs section's text under the table."""
    issue = {"datasets": ",".join(DATASETS), "seeds": "0,1", "rounds": 12, "clients": 10,
             "max_train_examples": 300, "test_examples": 1000}
    changed = [f"{key.replace('_', '-')} {getattr(args, key)} (issue: {value})"
               for key, value in issue.items() if str(getattr(args, key)) != str(value)
               and not (key == "seeds" and set(issue["seeds"].split(",")) <= set(args.seeds.split(",")))]
    scope = ("The issue's benchmark." if not changed else
             "**A reduced run, not the issue's benchmark:** " + "; ".join(changed) + ".")
    default = "; ".join(
        f"{r['dataset']}: rounds to target {_cell(r['rounds_to_target'])} vs fp32 "
        f"{_cell(r['fp32_rounds_to_target'])}, {r['vs_fp32']:+.1f} points, "
        f"{_cell(r['ratio_to_target_up'])}x up / {_cell(r['ratio_to_target_down'])}x down to target "
        f"({r['targets']})" for r in rows if r["setting"] == DEFAULT)
    return (f"{scope} {args.clients} clients x {args.max_train_examples} examples (Dirichlet 0.5), "
            f"{args.test_examples} test examples, {args.rounds} rounds of "
            f"{recipe_options(args).get('local-epochs', args.local_epochs)} local "
            f"epoch(s) ({RECIPES[args.recipe]}), FedIT, LoRA r=8 on query/value + head, "
            f"batch {args.batch_size}, lr {args.learning_rate}, seeds {args.seeds}; error feedback on "
            "both sides. `fp32` = Pollinate "
            "with dense fp32 both ways; `flower` = the plain-Flower FedAvg baseline "
            "(benchmarks/flower_baseline.py, fp32 ArrayRecord both ways) run in the same invocation; "
            "`default` = the run-config defaults (`codec`, `downlink-codec`, `head-codec`); other "
            "settings are UP/DOWN codec pairs, /HEAD the `head-codec` of the classification head. "
            "accuracy = final round, mean over seeds (accuracy_sd: their sd); vs_fp32 in points. "
            f"Target per seed = {TARGET_SHARE:.0%} of the fp32 run's final accuracy (same dataset and "
            "seed); rounds_to_target and bytes_to_target_up / _down (cumulative bytes per client until "
            "the first round that reached it) are means over the seeds, empty unless every seed reached "
            "it (the JSON has `reached` and each seed's numbers); ratio_to_target = fp32's bytes to "
            "target over the row's. bytes_up / bytes_down = per client per round, mean over rounds 1..R "
            "and seeds (round 1's downlink is a near-empty seeded difference for every Pollinate row, a "
            "full adapter for Flower). encode_ms / decode_ms = median of "
            f"{args.repeats} calls of the row's uplink codec on the fp32 run's last global increment "
            "(a real trained delta), shared CPU. targets = the issue's goals against fp32: rounds to "
            f"target <= {GOALS['rounds_ratio']}x, <= {GOALS['points_lost']} points lost, >= "
            f"{GOALS['bytes_ratio']:g}x fewer bytes to target both ways ({GOALS['stretch_ratio']:g}x: "
            f"stretch). Default pair: {default or 'not run'}. Curves: `benchmarks/results/{png.name}`.")


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.dataset_arguments(parser, DATASETS)
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"{REFERENCE}, {FLOWER}, {DEFAULT} or UP/DOWN codec pairs "
                             f"(ENCODING[@DENSITY]); {REFERENCE}, the reference, always runs")
    parser.add_argument("--repeats", type=int, default=21, help="encode/decode timings per codec")
    parser.add_argument("--cached-only", action="store_true",
                        help="run nothing: build the table from finished runs, each row on the seeds "
                             "it and fp32 have (its seed_count says how many)")
    harness.federation_arguments(parser, runs="runs/bench/codec")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="pinned",
                        help="pinned: one local epoch (--local-epochs), no restricted softmax, the recipe "
                             "the published table was measured under; defaults: the run-config defaults' "
                             "training (their local epochs, overriding --local-epochs)")
    parser.set_defaults(rounds=12)
    args = harness.parse_arguments(parser)
    # Ray kills its workers once the *machine* passes 95% memory; on a shared machine other
    # processes' memory would cost this run client updates (each shows in ``dropped``)
    os.environ.setdefault("RAY_memory_usage_threshold", "0.98")
    wires = {w.name: w for w in map(Wire.parse, [REFERENCE, *args.settings.split(",")])}
    runs = [(dataset, wire) for dataset in args.dataset_list for wire in wires.values()]
    raw = harness.run_each(runs, lambda run: f"{run[0]}, {run[1].name}", lambda run: measure(args, *run),
                           lambda r: "final accuracy per seed " + ", ".join(
                               f"{c[-1]['accuracy']:.4f}" for c in r["seeds"].values())
                           + f"; {r['minutes']:.1f} min")
    rows = derive([r for r in raw if r["seeds"]])  # --cached-only: a row never run has no seeds
    first = run_config(args, args.dataset_list[0], args.seed_list[0], wires[REFERENCE])
    time_codecs(rows, wires, last_increment(first.out), args.repeats)
    publish(args, rows)


def publish(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Print the table; unless ``--no-publish``, write the JSON (with every curve and each seed's
    numbers), the curves plot and the docs block (``codec``; ``codec-defaults`` for ``--recipe defaults``)."""
    pinned = args.recipe == "pinned"  # the other recipe publishes beside it, as codec-defaults
    harness.finish(args, NAME if pinned else f"{NAME}-{args.recipe}", rows,
                   title="Wire formats: accuracy, rounds and bytes to target, codec time"
                   + ("" if pinned else " (under the training defaults)"),
                   columns=COLUMNS, table_title="wire formats (bytes per client)",
                   left=("dataset", "setting", "uplink", "downlink", "targets"), plot=plot,
                   notes=lambda png: notes(args, rows, png),
                   extra={"target_share": TARGET_SHARE,
                          "curves": {f"{r['dataset']}/{r['setting']}": r["curve"] for r in rows},
                          "per_seed": {f"{r['dataset']}/{r['setting']}": r["seeds"] for r in rows}},
                   private=PRIVATE)


if __name__ == "__main__":
    main()
