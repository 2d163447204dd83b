"""The ``pollinate`` command line: simulate a federation (and, later, deploy one).

The one module allowed to import from every part of the package.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pollinate.config import ConfigError, RunConfig, parse_options

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Pollinate: federated fine-tuning of adapters on Flower.")
console = Console()


@app.callback()
def _root() -> None:
    """Pollinate: federated fine-tuning of adapters on Flower."""


@app.command()
def simulate(
    clients: int = typer.Option(10, help="number of simulated clients (SuperNodes)"),
    rounds: int = typer.Option(5, help="federated rounds"),
    partition: str = typer.Option("dirichlet", help="iid | dirichlet | classes"),
    aggregator: str = typer.Option("fedit", help="aggregator name or module:Class path"),
    model: str = typer.Option("", help="model path or name; empty = bundled all-MiniLM-L6-v2"),
    train_data: str = typer.Option("", help="CSV/JSONL/saved dataset; empty = generated task"),
    test_data: str = typer.Option("", help="held-out split for server-side evaluation"),
    seed: int = typer.Option(0, help="seed for data, partitions, model init and sampling"),
    out: Path = typer.Option(Path("runs/latest"), help="run directory"),
    cpus: int = typer.Option(0, help="CPU cores for the simulation engine (0 = all)"),
    option: list[str] = typer.Option([], "--set", help="any run-config option, key=value"),
) -> None:
    """Run a simulated federation on this machine and write its run directory."""
    from pollinate.simulations.launch import simulate as run

    values: dict[str, object] = {
        "num-clients": clients, "num-server-rounds": rounds, "partition": partition,
        "aggregator": aggregator, "model": model, "train-data": train_data,
        "test-data": test_data, "seed": seed, "out": str(out), "resume": False,
    }
    for item in option:
        values.update(parse_options(item, "--set"))
    try:
        config = RunConfig.from_mapping(values, allow_extra=False)
        _preflight(config)
    except ConfigError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2) from err
    summary = run(config, num_cpus=cpus or None)
    _print_summary(summary, out)


def _preflight(config: RunConfig) -> None:
    """Fail before starting any process: aggregator name, data files and columns, sizes."""
    from pollinate import data as datalib
    from pollinate.aggregators import UnknownAggregator, resolve

    try:
        resolve(config.aggregator)
    except UnknownAggregator as err:
        raise ConfigError(str(err)) from err
    table = datalib.train_table(config)
    datalib.test_table(config)
    if config.num_clients > len(table):
        raise ConfigError(f"more clients ({config.num_clients}) than training examples ({len(table)})")


def _print_summary(summary: dict, out: Path) -> None:
    table = Table(title=f"Pollinate run - {out}")
    for column in ("round", "accuracy", "loss", "bytes up", "bytes down"):
        table.add_column(column, justify="right")
    for r in summary["rounds"]:
        quality = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
        table.add_row(str(r["round"]), quality, f"{r['loss']:.4f}", f"{r['bytes_up']:,}",
                      f"{r['bytes_down']:,}")
    console.print(table)
    console.print(f"adapter: {out / 'adapter'}   plots: {', '.join(summary.get('plots', []))}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
