"""Differential privacy on AG News: accuracy against epsilon, and the cost of DP-SGD on the CPU.

10 clients (Dirichlet 0.5), ``--max-train-examples`` per client (default 1000), 1000 test
examples, FedIT, the ``--codec`` both ways (default int8-row: a dense codec, so that the
three rounds are not slowed by top-k's error feedback). The defaults are
DP-SGD's regime: many examples per client and large Poisson batches (128), so that the
noise on each step's mean gradient, sigma C / batch, is small; the DP settings train with
SGD (momentum 0.9, ``--dp-learning-rate`` 0.5; AdamW's first steps are full-size in
noise-dominated coordinates, docs/privacy.md), ``none`` with AdamW at ``--learning-rate``.
Settings:

* ``none``: no DP, the baseline (AdamW at ``--learning-rate``);
* ``none-as-dp``: no DP, trained like the DP settings (``--dp-optimizer`` at
  ``--dp-learning-rate``), so that the optimizer is not what a DP row is credited with;
* ``sample``: DP-SGD on every client at target epsilon 1, 3 and 8 (delta 1e-5) for the
  whole run; the noise multiplier is solved per client from its data size;
* ``client-central`` / ``client-local``: client-level DP at two noise multipliers. The
  clipping norm C is the median L2 norm of one client's non-private update (one local
  epoch), measured at the start of this run, so clipping keeps the typical update and
  the noise is what the comparison is about.

A setting may name another aggregator after ``@`` (``none@ffa``, ``sample-8@ffa``): FFA-LoRA
freezes A, so DP noise goes into half as many parameters and never into both factors of
the product (Sun et al., 2024). Each row's ``vs_none`` compares it with the better
of the no-DP rows of the same aggregator.

Local-training time: one client's epoch with the ordinary trainer and with DP-SGD (the
same number of steps), alternated ``--timing-repeats`` times in this process, medians.
The ``local_train_seconds`` of a row is the mean ``train-seconds`` its clients reported.

Seeds: one run of a setting is one draw of the DP noise, the partition and the
initialisation; on 1000 test examples the accuracy of one run moves by a few points
from seed to seed. ``--seeds N`` runs the settings named in ``--repeated`` (default: all)
on seeds ``--seed`` .. ``--seed + N - 1`` (the same partitions for every setting, so that
differences are paired) and reports their mean, standard deviation and every seed's
accuracy; the other settings run on ``--seed`` only.

    python benchmarks/privacy.py                                      # the full benchmark
    python benchmarks/privacy.py --rounds 1 --settings none,sample-8 --no-publish   # smoke
    python benchmarks/privacy.py --seeds 3 --repeated none,sample-8   # the goal's pair on 3 seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pollinate import data as datalib
from pollinate.client.privacy import plan_for, train_private
from pollinate.client.trainer import train
from pollinate.config import RunConfig
from pollinate.deltas import diff
from pollinate.modeling import ModelSpec, build_model, pick_device
from pollinate.privacy import Budget, l2_norm
from pollinate.simulations.launch import simulate

if __package__ in (None, ""):  # run as a file: import ``benchmarks`` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402

NAME = "privacy"
SETTINGS = ("none", "none-as-dp", "sample-1", "sample-3", "sample-8", "client-central-low",
            "client-central-high", "client-local-low", "client-local-high")
COLUMNS = ("setting", "aggregator", "optimizer", "target_epsilon", "epsilon", "noise_multiplier", "clip_norm",
           "seeds", "accuracy", "accuracy_sd", "vs_none", "local_train_seconds", "device", "minutes")
# A lost update makes a run another experiment (run_one refuses it); on a busy 2-core machine
# a round of 10 clients x 1000 examples can take longer than the default 600 s.
ROUND_TIMEOUT = 3600.0
AVERAGED = ("accuracy", "epsilon", "noise_multiplier", "local_train_seconds", "minutes")
console = harness.console


def base_config(args: argparse.Namespace, **options: Any) -> RunConfig:
    return RunConfig.from_mapping({
        "train-data": str(harness.DATA / "ag_news" / "train.csv"),
        "test-data": str(harness.DATA / "ag_news" / "test.csv"),
        **harness.scenario_options(args), "partition": "dirichlet", "dirichlet-alpha": 0.5,
        "overwrite": True, "delta": 1e-5, **codec_options(args.codec),
        "round-timeout": ROUND_TIMEOUT,
        **options}, allow_extra=False)


def codec_options(codec: str) -> dict[str, Any]:
    """``topk-ternary@0.1`` -> that codec and density, uplink and downlink alike."""
    name, _, density = codec.partition("@")
    options = {"codec": name, "downlink-codec": name}
    if density:
        options |= {"density": float(density), "downlink-density": float(density)}
    return options


def split_setting(name: str) -> tuple[str, str]:
    """``sample-8@ffa`` -> (``sample-8``, ``ffa``); without ``@`` the aggregator is ``fedit``."""
    setting, _, aggregator = name.partition("@")
    return setting, aggregator or "fedit"


def setting_options(name: str, args: argparse.Namespace, clip_norm: float) -> dict[str, Any]:
    """Run-config options of a named setting (see the module docstring)."""
    setting, aggregator = split_setting(name)
    return {"aggregator": aggregator, **dp_options(setting, args, clip_norm),
            **training_options(setting, args)}


def training_options(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    """Optimizer and learning rate: ``none`` trains as configured, every other setting as DP does."""
    if setting == "none":
        return {"optimizer": "adamw", "learning-rate": args.learning_rate}
    return {"optimizer": args.dp_optimizer, "learning-rate": args.dp_learning_rate or args.learning_rate}


def dp_options(setting: str, args: argparse.Namespace, clip_norm: float) -> dict[str, Any]:
    if setting.startswith("none"):
        return {"dp": "none"}
    if setting.startswith("sample-"):
        return {"dp": "sample", "target-epsilon": float(setting.removeprefix("sample-"))}
    mode, level = setting.rsplit("-", 1)
    noise = args.low_noise if level == "low" else args.high_noise
    return {"dp": mode, "noise-multiplier": noise, "clip-norm": clip_norm,
            "target-epsilon": float("inf")}  # report epsilon, never stop: the noise is the variable


def time_local_training(args: argparse.Namespace) -> dict[str, Any]:
    """One client's epoch, ordinary trainer vs DP-SGD (target epsilon 8), alternated; medians."""
    config = base_config(args, out=str(Path(args.runs) / "timing"))
    model = build_model(ModelSpec(num_labels=4))
    table = datalib.client_table(config, datalib.train_table(config), 0, args.clients)
    data = datalib.encode(table, model.tokenizer, config.task, config.max_length)
    private = base_config(args, out=config.out, **dp_options("sample-8", args, 0.0),
                          **training_options("sample", args))
    plan = plan_for(private, len(data))
    init = model.adapter_state()
    plain_seconds, dp_seconds, norms = [], [], []
    for repeat in range(args.timing_repeats):
        model.load_adapter_state(init)
        plain_seconds.append(train(model, data, config, seed=repeat).seconds)
        norms.append(l2_norm(diff(model.adapter_state(), init)))
        model.load_adapter_state(init)
        dp_seconds.append(train_private(model, data, private, plan, Budget(8.0, 1e-5)).seconds)
        console.print(f"timing {repeat + 1}/{args.timing_repeats}: plain {plain_seconds[-1]:.1f} s, "
                      f"DP-SGD {dp_seconds[-1]:.1f} s ({plan.steps} steps, {len(data)} examples)")
    plain, dp = statistics.median(plain_seconds), statistics.median(dp_seconds)
    return {"plain_seconds": plain, "dp_seconds": dp, "ratio": dp / plain, "steps": plan.steps,
            "examples": len(data), "update_norm": statistics.median(norms),
            "all_plain_seconds": plain_seconds, "all_dp_seconds": dp_seconds}


def cached(args: argparse.Namespace, name: str, compute: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """``compute()``, or its result from an earlier invocation with the same arguments.

    The machine is shared and a run can be killed hours in; finished parts are kept in
    ``--runs`` (``--fresh`` ignores them). The key is every argument the part depends on
    (:func:`unused_arguments`); an argument added to this script after a part was saved
    matches that part when it has its default value.
    """
    path = Path(args.runs) / f"{name}.json"
    unused = {"settings", "no_publish", "results", "fresh", "seeds", "repeated", *unused_arguments(name)}
    key = {k: v for k, v in vars(args).items() if k not in unused}
    if path.exists() and not args.fresh:
        saved = json.loads(path.read_text())
        if {k: saved["args"].get(k, defaults.get(k)) for k in key} == key:
            console.print(f"[yellow]{name}: reusing {path}")
            return saved["result"]
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": key, "result": result}))
    return result


def unused_arguments(part: str) -> tuple[str, ...]:
    """Arguments a cached part does not depend on: the DP training options for ``none``,
    the client-level noise levels for everything but client-level settings."""
    setting = split_setting(part)[0]
    noise = () if setting.startswith("client-") else ("low_noise", "high_noise")
    return noise + (("dp_optimizer", "dp_learning_rate") if setting == "none" else ())


def run_one(args: argparse.Namespace, setting: str, clip_norm: float) -> dict[str, Any]:
    options = setting_options(setting, args, clip_norm)
    config = base_config(args, out=str(Path(args.runs) / setting), **options)
    started = time.perf_counter()
    summary = simulate(config, num_cpus=args.num_cpus)
    records = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    failed = [d["reason"] for r in records[1:] for d in r.get("dropped", [])
              if not d["reason"].startswith("client exhausted")]
    if failed:  # a crashed or killed client makes the run a different experiment: do not publish it
        raise RuntimeError(f"{setting}: {len(failed)} client updates were lost, e.g. {failed[0][:300]}")
    clients = [c for r in records[1:] for c in r.get("client_metrics", []) if c.get("status") == "ok"]
    final = summary["rounds"][-1]
    if config.dp == "client-central":
        noise = config.noise_multiplier
    else:
        noises = [c["noise-multiplier"] for c in clients if "noise-multiplier" in c]
        noise = statistics.mean(noises) if noises else None
    return {"setting": config.dp, "name": setting,
            "target_epsilon": config.target_epsilon if config.dp == "sample" else None,
            "epsilon": final.get("epsilon"), "noise_multiplier": noise,
            "clip_norm": config.clip_norm if config.dp.startswith("client") else
            (config.max_grad_norm if config.dp == "sample" else None),
            "accuracy": final["accuracy"],
            "local_train_seconds": statistics.mean(c["train-seconds"] for c in clients),
            "device": str(pick_device(config.device)), "minutes": (time.perf_counter() - started) / 60,
            "exhausted_clients": len(summary["exhausted_clients"]),
            "curve": [(r["round"], r["accuracy"]) for r in summary["rounds"]]}


def seed_arguments(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    """``args`` at another seed; its runs (and cached parts) go to ``RUNS/seed-N``."""
    if seed == args.seed:
        return args
    return argparse.Namespace(**{**vars(args), "seed": seed, "runs": f"{args.runs}/seed-{seed}"})


def over_seeds(results: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One row from a setting's runs on ``seeds``: means, the accuracy's standard deviation,
    each seed's accuracy and the mean accuracy curve."""
    row = dict(results[0])
    for key in AVERAGED:
        values = [r[key] for r in results if r[key] is not None]
        row[key] = statistics.fmean(values) if values else None
    accuracies = [r["accuracy"] for r in results]
    rounds = [point[0] for point in results[0]["curve"]]
    curves = [dict(r["curve"]) for r in results]
    return {**row, "seeds": len(seeds), "seed_list": seeds, "accuracies": accuracies,
            "accuracy_sd": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "curve": [(k, statistics.fmean(c[k] for c in curves)) for k in rounds]}


def compare(rows: list[dict[str, Any]]) -> None:
    """``vs_none``: accuracy difference in points against the best no-DP row of the row's
    aggregator, that row's accuracy taken over the same seeds (a row on seed 0 only is
    compared with the baselines' seed-0 runs)."""
    for row in rows:
        row["aggregator"] = split_setting(row["name"])[1]
    for row in rows:
        bases = [same_seeds(r, row["seed_list"]) for r in rows
                 if r["setting"] == "none" and r["aggregator"] == row["aggregator"]]
        bases = [b for b in bases if b is not None]
        row["vs_none"] = 100 * (row["accuracy"] - max(bases)) if bases else None


def same_seeds(baseline: dict[str, Any], seeds: list[int]) -> float | None:
    """``baseline``'s mean accuracy over ``seeds``; None when it did not run all of them."""
    by_seed = dict(zip(baseline["seed_list"], baseline["accuracies"], strict=True))
    if not set(seeds) <= set(by_seed):
        return None
    return statistics.fmean(by_seed[s] for s in seeds)


def paired_gaps(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """`` (per seed: -2.1, ...)`` against the ``none`` row of the same aggregator on the same seeds."""
    base = [r for r in rows if split_setting(r["name"]) == ("none", row["aggregator"])]
    if row["seeds"] < 2 or not base or base[0]["seed_list"] != row["seed_list"]:
        return ""
    gaps = [100 * (a - b) for a, b in zip(row["accuracies"], base[0]["accuracies"], strict=True)]
    return f" (per seed against none: {', '.join(f'{g:+.1f}' for g in gaps)})"


def seed_note(rows: list[dict[str, Any]]) -> str:
    """Which seeds the rows ran on, for the notes."""
    many = [r for r in rows if r["seeds"] > 1]
    first = rows[0]["seed_list"][0]
    if not many:
        return f"one seed ({first})"
    seeds = many[0]["seed_list"]
    return (f"{', '.join(r['name'] for r in many)} on seeds {seeds[0]}-{seeds[-1]} (accuracy = mean, "
            f"accuracy_sd = standard deviation over seeds), the other rows on seed {first}")


def plot(rows: list[dict[str, Any]], timing: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 1]})
    for row in rows:
        eps = row["epsilon"]
        label = row["name"] + ("" if eps is None else f" (eps {eps:.3g})") + (
            f", mean of {row['seeds']} seeds" if row["seeds"] > 1 else f", seed {row['seed_list'][0]}")
        left.plot([c[0] for c in row["curve"]], [c[1] for c in row["curve"]], "o-", ms=3, label=label)
    left.set_xlabel("round")
    left.set_ylabel("test accuracy (AG News)")
    left.legend(fontsize=8)
    right.bar(["ordinary", "DP-SGD"], [timing["plain_seconds"], timing["dp_seconds"]])
    right.set_ylabel(f"seconds per local epoch ({timing['examples']} examples, CPU)")
    right.set_title(f"DP-SGD / ordinary = {timing['ratio']:.2f}x")
    return harness.save_figure(fig, path)


def notes(args: argparse.Namespace, rows: list[dict[str, Any]], timing: dict[str, Any], clip_norm: float,
          png: Path) -> str:
    """The docs section's text under the table."""
    goal = "".join(
        f"Goal epsilon 8 within 3 points of no DP, {row['aggregator']}: {row['vs_none']:+.1f} points"
        f"{paired_gaps(row, rows)} ({'met' if row['vs_none'] >= -3 else 'not met'}). "
        for row in rows if split_setting(row["name"])[0] == "sample-8" and row["vs_none"] is not None)
    return (f"{args.clients} clients, Dirichlet 0.5, {args.rounds} rounds, "
            f"{args.max_train_examples} train examples per client, {args.test_examples} test "
            f"examples, FedIT unless the name says `@AGGREGATOR`, codec {args.codec} both ways, batch "
            f"{args.batch_size}, optimizer and learning rate per row (`none`: AdamW, every other "
            "row as DP trains), vs_none against the better no-DP row of the aggregator, "
            f"{args.local_epochs} local "
            f"epoch(s), {seed_note(rows)}, delta 1e-5. "
            "epsilon = the final round's (sample/client-local: the largest a client reported; "
            "client-central: the server's accountant); noise_multiplier = mean over clients "
            "(sample-level noise is solved per client from its data size). client-level "
            f"clip-norm = median norm of a non-private local update ({clip_norm:.3g}). {goal}"
            f"Local training time, one client's epoch ({timing['examples']} examples, "
            f"{timing['steps']} steps, CPU, median of {args.timing_repeats} alternated runs): "
            f"ordinary {timing['plain_seconds']:.2f} s, DP-SGD {timing['dp_seconds']:.2f} s, "
            f"ratio {timing['ratio']:.2f}x (goal <= 2x: "
            f"{'met' if timing['ratio'] <= 2 else 'not met'}). local_train_seconds per row = "
            "mean seconds per client-round inside the simulation (shared CPU, noisier). "
            f"Plot: `benchmarks/results/{png.name}`. See docs/privacy.md.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--low-noise", type=float, default=0.1, help="client-level noise multiplier")
    parser.add_argument("--high-noise", type=float, default=1.0, help="client-level noise multiplier")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--codec", default="int8-row", help="NAME[@DENSITY], both ways")
    parser.add_argument("--dp-optimizer", default="sgd", choices=("adamw", "sgd"),
                        help="optimizer of the DP settings (none keeps adamw)")
    parser.add_argument("--dp-learning-rate", type=float, default=0.5,
                        help="learning rate of the DP settings (0: --learning-rate)")
    parser.add_argument("--num-cpus", type=int, default=1,
                        help="Ray CPUs, i.e. concurrent client actors (each holds a model in memory)")
    parser.add_argument("--fresh", action="store_true", help="recompute parts finished by an earlier run")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the --repeated settings (>= 1)")
    parser.add_argument("--repeated", default="", help="settings run on every seed (default: all)")
    harness.federation_arguments(parser, runs="runs/bench/privacy")
    # DP-SGD's regime: many examples per client, large Poisson batches, few steps (docs/privacy.md)
    parser.set_defaults(rounds=3, max_train_examples=1000, batch_size=128)
    args = harness.parse_arguments(parser)
    settings = args.settings.split(",")
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    stray = set(filter(None, args.repeated.split(","))) - set(settings)
    if stray:
        raise SystemExit(f"--repeated names settings that are not in --settings: {sorted(stray)}")
    unknown = {s for s in settings if split_setting(s)[0] not in SETTINGS}
    if unknown:
        raise SystemExit(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    console.rule("[bold]local training time, ordinary vs DP-SGD")
    defaults = {k: parser.get_default(k) for k in vars(args)}
    timing = cached(args, "timing", lambda: time_local_training(args), defaults)
    clip_norm = timing["update_norm"]
    console.print(f"DP-SGD / ordinary = {timing['ratio']:.2f}x; client-level clip-norm = median update "
                  f"norm {clip_norm:.4g}")
    repeated = set(args.repeated.split(",")) if args.repeated else set(settings)
    rows = []
    for i, setting in enumerate(settings, 1):
        seeds = range(args.seed, args.seed + (args.seeds if setting in repeated else 1))
        results = []
        for seed in seeds:
            console.rule(f"[bold]run {i}/{len(settings)}: {setting}, seed {seed}")
            at_seed = seed_arguments(args, seed)
            results.append(cached(at_seed, setting, lambda s=setting, a=at_seed: run_one(a, s, clip_norm),
                                  defaults))
            console.print(f"[green]{setting}[/] seed {seed}: accuracy {results[-1]['accuracy']:.4f}, "
                          f"epsilon {results[-1]['epsilon']}, {results[-1]['minutes']:.1f} min")
        trained = training_options(split_setting(setting)[0], args)
        rows.append({**over_seeds(results, list(seeds)),
                     "optimizer": f"{trained['optimizer']} {trained['learning-rate']:g}"})
    compare(rows)
    harness.finish(args, NAME, rows, title="Differential privacy: accuracy vs epsilon, DP-SGD cost (AG News)",
                   columns=COLUMNS, table_title="differential privacy on AG News",
                   left=("setting", "aggregator", "device"),
                   plot=lambda rows, path: plot(rows, timing, path),
                   notes=lambda png: notes(args, rows, timing, clip_norm, png),
                   extra={"timing": timing, "curves": {r["name"]: r["curve"] for r in rows}})


if __name__ == "__main__":
    main()
