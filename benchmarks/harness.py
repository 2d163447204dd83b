"""The pipeline every benchmark script shares: scenario -> runs -> rows -> table, plot, publish.

A script keeps what is its own (its systems, its run config, its row, its plot and
notes) and hands the rest to this module: the shared scenario options
(:func:`federation_arguments`, :func:`dataset_arguments`), federations reused when an
identical one already finished (:func:`simulate_cached`, :func:`keyed_out`; other runs'
curves: :func:`cached_curve`), the run loop with progress (:func:`run_each`), the
terminal table (:func:`rich_table`) and publishing (:func:`finish` / :func:`publish`):
``RESULTS/NAME.json`` as ``{"machine", "date", "command", "rows"}``, the PNG beside it,
and the benchmark's block of ``docs/benchmarks.md``, regenerated from the same rows,
never typed by hand. Each benchmark owns one marked block of the docs page; blocks of
other benchmarks are left as they are (a file lock guards the page against two
benchmarks finishing at once). ``--results DIR`` publishes into ``DIR`` (JSON, PNG and
``DIR/benchmarks.md``) instead, for a rerun that must not replace published numbers.

This lives in ``benchmarks/`` (not installed), because it writes into the repository.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from pollinate.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
DATA = ROOT.parent / "shared" / "data"  # the real datasets, outside the repository
HEADER = ("# Benchmarks\n\nEvery table is generated from `benchmarks/results/*.json` "
          "by the script named in it.\n")
console = Console(width=None if sys.stdout.isatty() else 200)
Run = TypeVar("Run")


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} "
            f"{platform.python_version()}, torch {torch.__version__}, {device}")


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def rich_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, title: str,
               left: Sequence[str] = ()) -> Table:
    """The rows as a rich table for the terminal: ``left`` columns left-aligned, others right."""
    out = Table(title=title)
    for column in columns:
        out.add_column(column, justify="left" if column in left else "right")
    for row in rows:
        out.add_row(*(_cell(row.get(c)) for c in columns))
    return out


def publish(name: str, rows: list[dict[str, Any]], *, title: str, columns: Sequence[str],
            notes: str = "", extra: dict[str, Any] | None = None, results: Path = RESULTS) -> Path:
    """Write the JSON result and replace this benchmark's block in the docs page.

    The docs page is ``docs/benchmarks.md`` for the published results, else
    ``results/benchmarks.md``.
    """
    results = Path(results)
    docs = DOCS if results.resolve() == RESULTS.resolve() else results / "benchmarks.md"
    results.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "date": dt.date.today().isoformat(), "command": command(),
              "rows": rows, **(extra or {})}
    path = results / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    block = (f"<!-- {name}:start -->\n## {title}\n\n`{record['command']}` on {record['machine']}, "
             f"{record['date']}. Raw rows: `benchmarks/results/{name}.json`.\n\n"
             f"{markdown_table(rows, columns)}\n\n{notes.strip()}\n<!-- {name}:end -->")
    docs.parent.mkdir(parents=True, exist_ok=True)
    with open(docs.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = docs.read_text() if docs.exists() else HEADER
        pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
        docs.write_text(text.rstrip() + "\n")
    return path


def federation_arguments(parser: argparse.ArgumentParser, *, runs: str, examples: int = 300,
                         test_examples: int = 1000) -> argparse.ArgumentParser:
    """The scenario options every federated benchmark shares (sizes, seed, where runs and results go)."""
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--max-train-examples", type=int, default=examples,
                        help="training examples per client")
    parser.add_argument("--test-examples", type=int, default=test_examples)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--local-epochs", type=int, default=1,
                        help="passes over its data a client makes per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=runs, help="where each federation writes its run directory")
    return publishing_arguments(parser)


def publishing_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--no-publish`` and ``--results``, the options :func:`finish` reads."""
    parser.add_argument("--no-publish", action="store_true", help="smoke run: print, write nothing")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the JSON, the PNG and the docs block go (another folder than "
                             "the default leaves the published results and docs/benchmarks.md alone)")
    return parser


def dataset_arguments(parser: argparse.ArgumentParser, datasets: Sequence[str],
                      seeds: str = "0,1") -> argparse.ArgumentParser:
    """``--datasets`` and ``--seeds`` of a benchmark whose rows are means over seeds, per dataset;
    :func:`parse_arguments` splits them into ``args.dataset_list`` and ``args.seed_list``."""
    parser.add_argument("--datasets", default=",".join(datasets), help="comma-separated, in ../shared/data")
    parser.add_argument("--seeds", default=seeds, help="comma-separated seeds; rows are means over them")
    parser.set_defaults(dataset_list=(), seed_list=())  # filled in by parse_arguments
    return parser


def parse_arguments(parser: argparse.ArgumentParser, datasets: Sequence[str] = ("ag_news",)
                    ) -> argparse.Namespace:
    """The parsed command line, once the real datasets the benchmark reads (``--datasets`` where
    :func:`dataset_arguments` added it, else ``datasets``) are known to be there."""
    args = parser.parse_args()
    if "seed_list" in args:
        args.dataset_list = datasets = args.datasets.split(",")
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    if not all((DATA / name / "train.csv").exists() for name in datasets):
        raise SystemExit(f"datasets not found under {DATA}")
    return args


def scenario_options(args: argparse.Namespace) -> dict[str, Any]:
    """Run-config options of the shared scenario arguments (see :func:`federation_arguments`)."""
    return {"num-clients": args.clients, "num-server-rounds": args.rounds,
            "max-train-examples": args.max_train_examples, "test-examples": args.test_examples,
            "batch-size": args.batch_size, "learning-rate": args.learning_rate,
            "local-epochs": args.local_epochs, "seed": args.seed}


def finished(config: RunConfig) -> dict[str, Any] | None:
    """The summary of a finished run of exactly ``config`` in its out directory, if there is one.

    The whole run config (seed included) is the cache key: any option that differs is a
    different run.
    """
    path = Path(config.out) / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    done = len(summary.get("rounds", [])) == config.num_server_rounds + 1
    return summary if done and same_run(summary["config"], config) else None


def cached(config: RunConfig) -> bool:
    """Whether ``config``'s run finished before: a Pollinate summary or a stored curve of it."""
    curve = Path(config.out) / "curve.json"
    return finished(config) is not None or (
        curve.exists() and same_run(json.loads(curve.read_text())["config"], config))


PLACES = ("out", "node-state-dir")  # where a run keeps its files: the launcher fills them in


ADDED_OPTIONS = {"head-codec": "", "restricted-softmax": 1.0}
"""Options added after runs were cached, with the value that reproduces those runs (which saved
no value for them): a new option at its new default is a different run from an old one. At that
value an option is left out of a run's cache key, so adding one keeps the old runs' keys."""


AUTO_OPTIONS = {"restricted-softmax": lambda config: config.absent_class_scale}
"""Options with an ``auto`` value, keyed by what it resolves to: a run at auto is the run at
that value."""


def run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What makes a run that run: every option (those saved before an option existed get its
    :data:`ADDED_OPTIONS` value; ``auto`` values resolved), where it writes aside."""
    settings = {**ADDED_OPTIONS, **{k: v for k, v in config.items() if k not in PLACES}}
    resolved = RunConfig.from_mapping(settings)
    return {**settings, **{key: value(resolved) for key, value in AUTO_OPTIONS.items()}}


def same_run(saved: dict[str, Any], config: RunConfig) -> bool:
    """Whether ``saved`` (a stored run's config) is ``config``'s run; the places it wrote to aside
    (``out`` may be given relative or absolute, ``node-state-dir`` is set by the launcher)."""
    return run_settings(saved) == run_settings(json.loads(config.to_json()))


def simulate_cached(config: RunConfig, reuse: bool, **launch: Any) -> dict[str, Any]:
    """The run's summary: a finished run of the identical config if ``reuse``, else a new federation."""
    from pollinate.simulations.launch import simulate

    summary = finished(config) if reuse else None
    if summary is not None:
        console.print(f"reusing the finished run in {config.out}")
        return summary
    return simulate(config, **launch)


def keyed_out(config: RunConfig, runs: str, name: str, kind: str = "pollinate") -> RunConfig:
    """``config`` writing to ``RUNS/NAME-KIND-HASH``, the hash of ``kind`` and :func:`run_settings`:
    equal runs share a directory (and so a cache entry), different ones never do."""
    settings = json.dumps({k: v for k, v in run_settings(json.loads(config.to_json())).items()
                           if k not in ADDED_OPTIONS or v != ADDED_OPTIONS[k]}, sort_keys=True)
    key = hashlib.sha256(f"{kind} {settings}".encode()).hexdigest()[:10]
    return config.replace(out=str(Path(runs) / f"{name}-{kind}-{key}"), overwrite=True)


def cached_curve(config: RunConfig,
                 compute: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The per-round records of a run that is not a Pollinate federation (the Flower baseline,
    centralised training), from ``out/curve.json`` if that holds the same config, else computed
    and stored there."""
    path = Path(config.out) / "curve.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if same_run(stored["config"], config):
            console.print(f"reusing the finished run in {config.out}")
            return stored["curve"]
    curve = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": json.loads(config.to_json()), "curve": curve}))
    return curve


def run_each(runs: Sequence[Run], label: Callable[[Run], str], run: Callable[[Run], dict[str, Any]],
             outcome: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """One row per run, in order, with a progress rule before and a one-line ``outcome`` after each."""
    rows = []
    for i, item in enumerate(runs, 1):
        console.rule(f"[bold]run {i}/{len(runs)}: {label(item)}")
        rows.append(run(item))
        console.print(f"[green]{label(item)}[/]: {outcome(rows[-1])}")
    return rows


def dataset_panels(rows: Sequence[dict[str, Any]], height: float) -> tuple[Any, list[tuple[Any, str]]]:
    """A figure with one panel per dataset of ``rows``, side by side: ``(figure, [(axes, dataset)])``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), height), squeeze=False)
    return fig, list(zip(axes[0], datasets, strict=True))


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write and close a matplotlib figure (the PNG beside a benchmark's JSON)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish(args: argparse.Namespace, name: str, rows: list[dict[str, Any]], *, title: str,
           columns: Sequence[str], table_title: str, left: Sequence[str] = (),
           plot: Callable[[list[dict[str, Any]], Path], Path], notes: Callable[[Path], str],
           extra: dict[str, Any] | None = None, private: Sequence[str] = ("curve",)) -> Path | None:
    """Print the table; unless ``--no-publish``, plot to ``RESULTS/NAME.png`` and publish the rows.

    ``notes`` gets the PNG's path; ``private`` keys of a row stay out of the published rows
    (curves go in ``extra``).
    """
    console.print(rich_table(rows, columns, title=table_title, left=left))
    if args.no_publish:
        return None
    Path(args.results).mkdir(parents=True, exist_ok=True)
    png = plot(rows, Path(args.results) / f"{name}.png")
    return publish(name, [{k: v for k, v in r.items() if k not in private} for r in rows], title=title,
                   columns=columns, notes=notes(png), extra=extra, results=args.results)
