"""Wire formats side by side: accuracy, bytes up and down, and codec time per encoding.

One federation per setting, same seed: 10 clients (Dirichlet 0.5) on AG News, 300
training examples per client, 1000 test examples, LoRA rank 8 on query/value plus the
head, FedIT, 1 local epoch (``--local-epochs``), 10 rounds. The baseline ``fp32`` is what FlowerTune sends:
dense fp32 both ways (``codec=fp32``, ``downlink-codec=fp32``). Every other setting
changes the uplink ``codec`` (``ENCODING@DENSITY`` for top-k) and uses one downlink
codec for all (``--downlink``, default the run-config default ``topk-ternary@0.1``;
``--downlink fp32`` isolates what each uplink encoding costs), unless the setting names
its own (``UP/DOWN``, e.g. ``topk-ternary@0.1/topk-ternary@0.1``), with error feedback on
both sides as configured by default. Settings run in the order
given, the baseline first; ``--reuse`` takes a setting's finished run of the identical
config from its out directory instead of running it again (to finish an interrupted run).

bytes_up / bytes_down are per client per round: the run's per-round totals over
clients (summary.json) divided by the clients that trained, averaged over rounds 1..R.
Round 1's downlink is nearly free for every setting (clients rebuild the seeded first
version; the server sends a digest-checked empty difference). ratio_up / ratio_down
divide the baseline's bytes, measured in the same invocation, by the setting's.
encode_ms / decode_ms time :func:`pollinate.codec.encode` / ``decode`` (median of
``--repeats``) on a real trained delta: the baseline's last global increment (the
difference of its two newest checkpointed versions, exact because it is fp32 both ways).

    python benchmarks/codec.py                                              # the full benchmark
    python benchmarks/codec.py --rounds 2 --settings fp32,int8 --no-publish  # smoke
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
from pollinate.server.rundir import RunDirectory
from pollinate.spec import AdapterSpec, Tensors

if __package__ in (None, ""):  # run as a file: import ``benchmarks`` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402

NAME = "codec"
BASELINE = "fp32"
# the order they run in: the settings the targets hinge on first
SETTINGS = ("fp32", "topk-ternary@0.1", "topk-ternary@0.05", "int8", "topk-int8@0.1",
            "topk-ternary@0.02", "int8-row", "fp16", "bf16")
COLUMNS = ("setting", "encoding", "density", "downlink", "accuracy", "vs_fp32", "bytes_up", "bytes_down",
           "ratio_up", "ratio_down", "encode_ms", "decode_ms", "target_up", "dropped", "minutes")
TARGETS = ((50.0, 1.0), (20.0, 0.5))  # (uplink ratio, largest accuracy loss in points)


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

    @property
    def label(self) -> str:
        return f"{self.encoding}@{self.density:g}" if self.spec.sparse else self.encoding

    @property
    def spec(self) -> CodecSpec:
        return CodecSpec(encoding=self.encoding, density=self.density)


def standard_error(rows: list[dict[str, Any]], args: argparse.Namespace) -> float:
    """Binomial standard error, in points, of the baseline's final accuracy on the test examples."""
    p = rows[0]["accuracy"]
    return 100 * (p * (1 - p) / max(args.test_examples, 1)) ** 0.5


def run_config(args: argparse.Namespace, uplink: Setting, downlink: Setting) -> RunConfig:
    return RunConfig.from_mapping({
        "train-data": str(harness.DATA / "ag_news" / "train.csv"),
        "test-data": str(harness.DATA / "ag_news" / "test.csv"),
        **harness.scenario_options(args), "partition": "dirichlet", "dirichlet-alpha": 0.5,
        "lora-rank": 8, "aggregator": "fedit",
        "codec": uplink.encoding, "density": uplink.density,
        "downlink-codec": downlink.encoding, "downlink-density": downlink.density,
        "out": str(Path(args.runs) / run_label(uplink, downlink)), "overwrite": True,
    }, allow_extra=False)


def run_label(uplink: Setting, downlink: Setting) -> str:
    """A run's name: its uplink setting, plus the downlink where it is not the same."""
    return uplink.label if uplink == downlink else f"{uplink.label}_down-{downlink.label}"


def parse_run(text: str, downlink: Setting) -> tuple[Setting, Setting]:
    """``UP`` (downlink ``downlink``) or ``UP/DOWN`` -> (uplink, downlink) settings."""
    up, _, down = text.partition("/")
    return Setting.parse(up), Setting.parse(down) if down else downlink


def per_client(rounds: list[dict[str, Any]], key: str) -> int:
    """Mean over rounds 1..R of the round's ``key`` total divided by the clients that trained."""
    trained = [r for r in rounds if r["round"] > 0]
    return round(sum(r[key] / max(r["clients"], 1) for r in trained) / len(trained))


def run_one(args: argparse.Namespace, uplink: Setting, downlink: Setting,
            default_down: Setting) -> dict[str, Any]:
    config = run_config(args, uplink, downlink)
    rounds = harness.simulate_cached(config, args.reuse)["rounds"]
    label = uplink.label if downlink == default_down or uplink.label == BASELINE else \
        f"{uplink.label}/{downlink.label}"
    return {"setting": label, "encoding": uplink.encoding, "density": uplink.density,
            "downlink": downlink.label, "accuracy": rounds[-1]["accuracy"],
            "bytes_up": per_client(rounds, "bytes_up"), "bytes_down": per_client(rounds, "bytes_down"),
            "dropped": sum(len(r.get("dropped", [])) for r in rounds),
            "minutes": sum(r.get("seconds", 0.0) for r in rounds) / 60,
            "curve": [(r["round"], r["accuracy"]) for r in rounds]}


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


def target_met(ratio: float, loss_points: float) -> str:
    """The strongest uplink target (``RATIOx/POINTSpt``) this row meets, or ``-``."""
    for ratio_min, loss_max in TARGETS:
        if ratio >= ratio_min and loss_points <= loss_max:
            return f"{ratio_min:g}x/{loss_max:g}pt"
    return "-"


def compare(rows: list[dict[str, Any]], delta: Tensors, repeats: int) -> None:
    """Add ratios and accuracy differences against the baseline row, and codec timings."""
    base = next(r for r in rows if r["setting"] == BASELINE)
    for row in rows:
        row["vs_fp32"] = 100 * (row["accuracy"] - base["accuracy"])
        row["ratio_up"] = base["bytes_up"] / row["bytes_up"]
        row["ratio_down"] = base["bytes_down"] / row["bytes_down"]
        row["target_up"] = target_met(row["ratio_up"], -row["vs_fp32"])
        row["encode_ms"], row["decode_ms"] = codec_ms(delta, Setting(row["encoding"], row["density"]).spec,
                                                      repeats)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for row in rows:
        marker = "s" if row["setting"] == BASELINE else "o"
        left.scatter(row["bytes_up"], row["accuracy"], s=40, marker=marker)
        left.annotate(row["setting"], (row["bytes_up"], row["accuracy"]), fontsize=8,
                      xytext=(4, 4), textcoords="offset points")
        right.plot(*zip(*row["curve"], strict=True), "o-", ms=3, label=row["setting"])
    left.set_xscale("log")
    left.set_xlabel("uplink bytes per client per round (log)")
    left.set_ylabel("final test accuracy")
    left.set_title("accuracy vs uplink bytes")
    right.set_xlabel("round")
    right.set_ylabel("test accuracy")
    right.set_title("accuracy per round")
    right.legend(fontsize=8)
    fig.suptitle("AG News, 10 clients, Dirichlet 0.5, FedIT LoRA r=8: wire formats")
    return harness.save_figure(fig, path)


def notes(args: argparse.Namespace, rows: list[dict[str, Any]], downlink: Setting, png: Path) -> str:
    """The docs section's text under the table."""
    return (f"AG News, {args.clients} clients, Dirichlet 0.5, {args.rounds} rounds, "
            f"{args.max_train_examples} train examples per client, {args.test_examples} test "
            f"examples, FedIT, LoRA r=8 on query/value + head, {args.local_epochs} local "
            f"epoch(s), batch "
            f"{args.batch_size}, lr {args.learning_rate}, seed {args.seed}. "
            f"`fp32` = dense fp32 up and down (the FlowerTune-style baseline); every other row "
            f"uses downlink {downlink.label} unless its setting says `UP/DOWN`; error feedback "
            "on both sides. accuracy = final "
            f"round; vs_fp32 = accuracy difference in points (one seed: {args.test_examples} test "
            f"examples give one accuracy a standard error of {standard_error(rows, args):.1f} "
            "points). bytes = per client per round, mean over "
            "rounds 1..R (round 1's downlink is a near-empty seeded difference for every row). "
            "ratio = fp32 bytes / row bytes, same invocation. encode_ms / decode_ms = median of "
            f"{args.repeats} encode / decode calls on the fp32 run's last global increment "
            "(a real trained delta, the same tensors a client sends), on a shared CPU. "
            f"target_up: the strongest uplink target met (>= 50x at <= 1 point loss, "
            f">= 20x at <= 0.5 point). dropped = client updates lost over the run (e.g. an "
            "actor killed by Ray's memory monitor on the shared machine); bytes divide by the "
            "clients that trained. minutes = the federation's summed round times. "
            f"Plot: `benchmarks/results/{png.name}`.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"uplink settings ENCODING[@DENSITY]; {BASELINE} (the baseline) always runs")
    parser.add_argument("--downlink", default="topk-ternary@0.1",
                        help="downlink codec of every setting but the baseline")
    parser.add_argument("--repeats", type=int, default=21, help="encode/decode timings per setting")
    parser.add_argument("--reuse", action="store_true",
                        help="take a setting's finished run of the same config from its out directory")
    harness.federation_arguments(parser, runs="runs/bench/codec")
    args = harness.parse_arguments(parser)
    # Ray kills its workers once the *machine* passes 95% memory; on a shared machine other
    # processes' memory would cost this run client updates (each shows in ``dropped``)
    os.environ.setdefault("RAY_memory_usage_threshold", "0.98")
    downlink = Setting.parse(args.downlink)
    baseline = Setting.parse(BASELINE)
    runs = [(baseline, baseline)] + [run for run in (parse_run(s, downlink) for s in args.settings.split(",")
                                                      if s.strip()) if run[0] != baseline]
    rows = harness.run_each(runs, lambda run: f"up {run[0].label}, down {run[1].label}",
                            lambda run: run_one(args, *run, downlink),
                            lambda row: f"accuracy {row['accuracy']:.4f}, up {row['bytes_up']:,} B, "
                                        f"down {row['bytes_down']:,} B, {row['minutes']:.1f} min")
    compare(rows, last_increment(run_config(args, baseline, baseline).out), args.repeats)
    harness.finish(args, NAME, rows, title="Wire formats: accuracy, bytes and codec time per encoding",
                   columns=COLUMNS, table_title="wire formats (bytes per client per round)",
                   left=("setting", "encoding", "downlink", "target_up"), plot=plot,
                   notes=lambda png: notes(args, rows, downlink, png),
                   extra={"curves": {r["setting"]: r["curve"] for r in rows}})


if __name__ == "__main__":
    main()
