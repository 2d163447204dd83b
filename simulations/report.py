"""Benchmark results: ``benchmarks/results/NAME.json`` and a table in ``docs/benchmarks.md``.

Every benchmark script ends with :func:`publish`, so results share one format
(``{"machine", "date", "command", "rows"}``) and the docs table is regenerated from
the same rows, never typed by hand. Each benchmark owns one marked block of the docs
page; blocks of other benchmarks are left as they are (a file lock guards the page
against two benchmarks finishing at once).
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
HEADER = ("# Benchmarks\n\nEvery table is generated from `benchmarks/results/*.json` "
          "by the script named in it.\n")


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} "
            f"{platform.python_version()}, torch {torch.__version__}, {device}")


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def publish(name: str, rows: list[dict[str, Any]], *, title: str, columns: Sequence[str],
            notes: str = "", extra: dict[str, Any] | None = None) -> Path:
    """Write the JSON result and replace this benchmark's block in docs/benchmarks.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "date": dt.date.today().isoformat(), "command": command(),
              "rows": rows, **(extra or {})}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    block = (f"<!-- {name}:start -->\n## {title}\n\n`{record['command']}` on {record['machine']}, "
             f"{record['date']}. Raw rows: `benchmarks/results/{name}.json`.\n\n"
             f"{markdown_table(rows, columns)}\n\n{notes.strip()}\n<!-- {name}:end -->")
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    with open(DOCS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = DOCS.read_text() if DOCS.exists() else HEADER
        pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
        DOCS.write_text(text.rstrip() + "\n")
    return path


def rich_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, title: str,
               left: Sequence[str] = ()) -> Table:
    """The rows as a rich table for the terminal: ``left`` columns left-aligned, others right."""
    out = Table(title=title)
    for column in columns:
        out.add_column(column, justify="left" if column in left else "right")
    for row in rows:
        out.add_row(*("" if v is None else f"{v:.4g}" if isinstance(v, float)
                      else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
                      for v in (row.get(c) for c in columns)))
    return out


def federation_arguments(parser: argparse.ArgumentParser, *, runs: str, examples: int = 300,
                         test_examples: int = 1000) -> argparse.ArgumentParser:
    """The scenario options every federated benchmark shares (sizes, seed, where runs go)."""
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
    parser.add_argument("--no-publish", action="store_true", help="smoke run: print, write nothing")
    return parser


def scenario_options(args: argparse.Namespace) -> dict[str, Any]:
    """Run-config options of the shared scenario arguments (see :func:`federation_arguments`)."""
    return {"num-clients": args.clients, "num-server-rounds": args.rounds,
            "max-train-examples": args.max_train_examples, "test-examples": args.test_examples,
            "batch-size": args.batch_size, "learning-rate": args.learning_rate,
            "local-epochs": args.local_epochs, "seed": args.seed}


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write and close a matplotlib figure (the PNG beside a benchmark's JSON)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
