"""The ``pollinate`` command line: simulate a federation (and, later, deploy one).

The one module allowed to import from every part of the package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from pollinate import deploy
from pollinate.config import ConfigError, RunConfig, parse_assignment

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pollinate: federated fine-tuning of adapters on Flower.")
console = Console()
DEBUG = {"on": bool(os.environ.get("POLLINATE_DEBUG"))}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug",
                                    help="show full tracebacks and Flower's logs")) -> None:
    """Pollinate: federated fine-tuning of adapters on Flower."""
    DEBUG["on"] = DEBUG["on"] or debug


@app.command()
def simulate(
    clients: int = typer.Option(10, help="number of simulated clients (SuperNodes)"),
    rounds: int = typer.Option(5, help="federated rounds"),
    partition: str = typer.Option("dirichlet", help="iid | dirichlet | classes"),
    aggregator: str = typer.Option("fedit", help="aggregator name or module:Class path"),
    model: str = typer.Option("", help="model path or name; empty = bundled all-MiniLM-L6-v2"),
    train_data: str = typer.Option("", help="CSV/JSONL/saved dataset; empty = generated task"),
    test_data: str = typer.Option("", help="held-out split the server scores; empty = test-fraction "
                                           "of --train-data"),
    seed: int = typer.Option(0, help="seed for data, partitions, model init and sampling"),
    out: Path = typer.Option(None, help="run directory (default: a new runs/<date>-<time>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the run in --out"),
    cpus: int = typer.Option(0, help="CPU cores for the simulation engine (0 = all)"),
    ray_address: str = typer.Option("", help="HOST:PORT (or auto) of a running Ray cluster to run the "
                                             "clients on (docs/deployment.md); empty = start Ray here"),
    profile: bool = typer.Option(False, "--profile", help="after the run, print where each round's "
                                                          "wall time went (from metrics.jsonl)"),
    option: list[str] = typer.Option([], "--set", help="any run-config option, key=value "
                                                       "(`pollinate options` lists them)"),
) -> None:
    """Run a simulated federation on this machine (or a Ray cluster) and write its run directory."""
    from pollinate.server.rundir import fresh_path
    from pollinate.simulations.launch import simulate as run

    values: dict[str, object] = {
        "num-clients": clients, "num-server-rounds": rounds, "partition": partition,
        "aggregator": aggregator, "model": model, "train-data": train_data,
        "test-data": test_data, "seed": seed, "out": str(out or fresh_path()), "resume": resume,
        "overwrite": overwrite, "ray-address": ray_address,
    }
    try:
        for item in option:
            values.update(parse_assignment(item, "--set"))
        config = _preflight(RunConfig.from_mapping(values, allow_extra=False))
        if cpus and config.ray_address:
            raise ConfigError("--cpus sizes Ray on this machine; the nodes of a Ray cluster have the CPUs "
                              "each was started with (ray start --num-cpus)")
        summary = run(config, num_cpus=cpus or None, verbose=DEBUG["on"])  # checks ray-address first
    except ConfigError as err:
        _fail(err)
    _print_summary(summary, Path(config.out))
    if profile:
        _print_profile(Path(config.out))


def _preflight(config: RunConfig, *, local_data: bool = True) -> RunConfig:
    """Every check that can fail before a process starts; returns the config the run will use.

    Aggregator name and options, codecs the method can learn with, the run directory and
    (``local_data``: the data lives on this machine) data files, labels and sizes.
    """
    from pollinate import data as datalib
    from pollinate import partitions
    from pollinate.aggregators import UnknownAggregator, resolve
    from pollinate.server.rundir import RunDirectory, check_reuse

    try:
        method = resolve(config.aggregator)
        method(**config.aggregator_option_map)
    except UnknownAggregator as err:
        raise ConfigError(str(err)) from err
    except ConfigError:
        raise  # already names the method and the option
    except (TypeError, ValueError) as err:
        raise ConfigError(f"aggregator-options for {config.aggregator}: {err}") from err
    config = method.settle_config(config, lambda text: console.print(f"[yellow]note:[/] {text}"))
    if local_data:
        table = datalib.train_table(config)
        datalib.test_table(config, datalib.label_names(table))  # the names of the table just read
        if config.num_clients > len(table):
            raise ConfigError(f"more clients ({config.num_clients}) than training examples ({len(table)})")
        if config.partition != "iid":  # a split that cannot work fails here; the server states a repair
            partitions.split(config, table, config.num_clients)
    if config.out and local_data:
        check_reuse(config.out, resume=config.resume, overwrite=config.overwrite)
        RunDirectory(config.out)  # a directory that cannot be written fails here, not in round 1
    return config


@app.command("options")
def options_command() -> None:
    """List every run-config option (`--set key=value`, `[tool.flwr.app.config]`) with its default."""
    from pollinate.config import option_help

    table = Table(title="Run-config options")
    for column in ("option", "type", "default", "what it does"):
        table.add_column(column, overflow="fold")
    for row in option_help():
        table.add_row(*row)
    console.print(table)


@app.command("aggregators")
def aggregators_command(
    path: list[str] = typer.Option([], "--path", help="also list this module:Class method (repeatable)"),
) -> None:
    """List every aggregation method (built-ins, entry points, --path) with its options."""
    from rich.markup import escape

    from pollinate.aggregators import UnknownAggregator, methods

    try:
        found = methods(path)
    except UnknownAggregator as err:
        _fail(err)
    table = Table(title="Aggregation methods (--aggregator NAME, --set aggregator-options=key=value,...)")
    for column in ("method", "option", "type", "default", "what it does"):
        table.add_column(column, overflow="fold")
    for name, method in found.items():
        for i, row in enumerate(method.option_rows()):
            table.add_row(name if i == 0 else "", *map(escape, row))
        table.add_section()
    console.print(table)


def _print_summary(summary: dict, out: Path) -> None:
    private = any("epsilon" in r for r in summary["rounds"])
    table = Table(title=f"Pollinate run - {out}")
    for column in ("round", "accuracy", "loss", "bytes up", "bytes down", "clients") + (
            ("epsilon",) if private else ()):
        table.add_column(column, justify="right")
    for r in summary["rounds"]:
        quality = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
        loss = f"{r['loss']:.4f}" if "loss" in r else "-"
        epsilon = (f"{r['epsilon']:.2f}" if "epsilon" in r else "-",) if private else ()
        table.add_row(str(r["round"]), quality, loss, f"{r['bytes_up']:,}", f"{r['bytes_down']:,}",
                      str(r.get("clients", "-")), *epsilon)
    console.print(table)
    console.print(f"adapter: {out / 'adapter'}   plots: {', '.join(summary.get('plots', []))}   "
                  f"log: {out / 'server.log'}", highlight=False, soft_wrap=True)


def _print_profile(out: Path) -> None:
    """Mean seconds per round and share of round wall time of each component of the round profile."""
    from pollinate.server.profile import summarize
    from pollinate.server.rundir import RunDirectory

    table = Table(title=f"Round profile - {out / 'metrics.jsonl'}")
    for column in ("component", "seconds per round", "share of round time"):
        table.add_column(column, justify="left" if column == "component" else "right")
    for row in summarize(RunDirectory(out).read_metrics()):
        if row["component"] == "overhead":
            table.add_section()
        table.add_row(row["component"], f"{row['seconds']:.4f}", f"{row['share']:.1%}")
    console.print(table)
    console.print("overhead = everything but local training (train) and evaluation (evaluate); "
                  "transport = waiting on clients while none computed (docs/benchmarks.md)", highlight=False)


# -- deploy: Flower's deployment engine (docs/deployment.md) ---------------------------

deploy_app = typer.Typer(no_args_is_help=True,
                         help="Run Pollinate on Flower's deployment engine: certificates, SuperLink, "
                              "SuperNodes, runs. Every command prints the Flower command it runs.")
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("certs")
def deploy_certs(
    out: Path = typer.Argument(Path("certificates"), help="directory for the CA, server cert and node keys"),
    host: list[str] = typer.Option([], "--host", help="a name or IP the SuperLink is reached by (repeat)"),
    node: list[str] = typer.Option([], "--node", help="a SuperNode to make a key pair for (repeat)"),
) -> None:
    """Create a CA, the SuperLink's TLS certificate and SuperNode authentication keys."""
    from pollinate.certs import CertificateError, generate

    try:
        bundle = generate(out, host, node)
    except CertificateError as err:
        _fail(err)
    table = Table(title=f"Pollinate deployment keys - {out}")
    table.add_column("file")
    table.add_column("goes to")
    table.add_row(str(bundle.ca_cert), "SuperLink, every SuperNode, flwr CLI, App executors")
    table.add_row(f"{bundle.server_cert}, {bundle.server_key}", "SuperLink only")
    for key in bundle.nodes:
        table.add_row(str(key.private_key), f"SuperNode {key.name} only")
        table.add_row(str(key.public_key), "`pollinate deploy register` (flwr supernode register)")
    console.print(table)


@deploy_app.command("superlink")
def deploy_superlink(
    certs: Path = typer.Option(Path("certificates"), help="directory written by `pollinate deploy certs`"),
    insecure: bool = typer.Option(False, help="no TLS (trusted networks only; implies --no-node-auth)"),
    node_auth: bool = typer.Option(True, help="admit only SuperNodes registered with `deploy register`"),
    host: str = typer.Option("0.0.0.0", help="interface of the Control and Runtime HTTP API"),
    port: int = typer.Option(deploy.HTTP_PORT, help="port of the Control and Runtime HTTP API"),
    fleet: str = typer.Option(f"0.0.0.0:{deploy.FLEET_PORT}", help="Fleet API (gRPC) address for SuperNodes"),
    database: Path = typer.Option(Path("state.db"), help="SQLite state: keys and runs survive restarts"),
    dry_run: bool = typer.Option(False, help="print the command instead of running it"),
) -> None:
    """Start the SuperLink (Fleet API for SuperNodes, HTTP API for flwr and the ServerApp)."""
    try:
        tls = None if insecure else deploy.TLSFiles.from_dir(certs)
        cmd = deploy.superlink_command(tls, node_auth=node_auth and not insecure, host=host, port=port,
                                       fleet_address=fleet, database=database)
    except deploy.DeployError as err:
        _fail(err)
    _launch(cmd, dry_run, replace=True)


@deploy_app.command("supernode")
def deploy_supernode(
    superlink: str = typer.Option(..., help=f"the SuperLink's Fleet API, host:{deploy.FLEET_PORT}"),
    certs: Path = typer.Option(Path("certificates"), help="directory holding ca.crt (and nodes/NAME keys)"),
    name: str = typer.Option("", help="use the key pair certs/nodes/NAME (node authentication)"),
    insecure: bool = typer.Option(False, help="connect without TLS"),
    data_path: str = typer.Option("", help="this node's training data (CSV, JSONL or saved dataset)"),
    lora_rank: int = typer.Option(0, help="LoRA rank on this node (0 = the run's lora-rank)"),
    device: str = typer.Option("", help="cpu, cuda, cuda:1, mps (empty = the run's device)"),
    port: int = typer.Option(deploy.SUPERNODE_PORT, help="this node's Runtime API port (one per SuperNode)"),
    dry_run: bool = typer.Option(False, help="print the command instead of running it"),
) -> None:
    """Start a SuperNode on an edge machine, with its own data, rank and device."""
    settings = deploy.NodeConfig(data_path=data_path, lora_rank=lora_rank or None, device=device)
    key = certs / "nodes" / name if name else None
    try:
        if key is not None and not key.exists():
            raise deploy.DeployError(f"no key {key}; create it with `pollinate deploy certs --node {name}`")
        ca = None if insecure else deploy.TLSFiles.from_dir(certs).ca_cert
        cmd = deploy.supernode_command(superlink, settings, ca_cert=ca, auth_key=key, port=port)
    except deploy.DeployError as err:
        _fail(err)
    _launch(cmd, dry_run, replace=True)


@deploy_app.command("register")
def deploy_register(
    public_keys: list[Path] = typer.Argument(..., help="nodes/NAME.pub files to admit"),
    connection: str = typer.Option("pollinate", help="SuperLink connection (`pollinate deploy connect`)"),
    dry_run: bool = typer.Option(False, help="print the commands instead of running them"),
) -> None:
    """Register SuperNode public keys with the SuperLink (flwr supernode register)."""
    for key in public_keys:
        _launch(deploy.register_command(key, connection), dry_run)


@deploy_app.command("connect")
def deploy_connect(
    name: str = typer.Argument("pollinate", help="connection name for flwr and the commands below"),
    address: str = typer.Option(..., help=f"the SuperLink's Control API, host:{deploy.HTTP_PORT}"),
    ca: Path = typer.Option(None, help="CA certificate that signed the SuperLink's (omit with --insecure)"),
    insecure: bool = typer.Option(False, help="connect without TLS"),
    default: bool = typer.Option(True, help="make it the default connection"),
) -> None:
    """Write a SuperLink connection to $FLWR_HOME/config.toml (what flwr reads)."""
    try:
        if (ca is None) != insecure:
            raise deploy.DeployError("give exactly one of --ca and --insecure")
        path = deploy.write_connection(deploy.flwr_home(), name, address, ca, default=default)
    except deploy.DeployError as err:
        _fail(err)
    console.print(f"connection {name!r} -> {address} written to {path}")


@deploy_app.command("run")
def deploy_run(
    app_dir: Path = typer.Argument(Path("."), help="the app directory (with pyproject.toml)"),
    connection: str = typer.Option("pollinate", help="SuperLink connection (`pollinate deploy connect`)"),
    option: list[str] = typer.Option([], "--set", help="run-config option key=value (repeat)"),
    stream: bool = typer.Option(False, help="follow the run's log"),
    dry_run: bool = typer.Option(False, help="print the command instead of running it"),
) -> None:
    """Start a run on a SuperLink (flwr run)."""
    values: dict[str, object] = {}
    try:
        for item in option:
            values.update(parse_assignment(item, "--set"))
        defaults = deploy.app_config(app_dir)
        config = _preflight(RunConfig.from_mapping({**defaults, **values}, allow_extra=False),
                            local_data=False)
        unscored = not (config.train_data or config.test_data or config.num_labels)
        if unscored and config.task == "classification":
            raise ConfigError("a deployed server needs test-data (to score the model) or num-labels "
                              "(the label count of the nodes' data); set one with --set")
        cmd = deploy.run_command(app_dir, connection, values, stream=stream)
    except (ConfigError, deploy.DeployError) as err:
        _fail(err)
    _launch(cmd, dry_run)


def _launch(cmd: list[str], dry_run: bool, replace: bool = False) -> None:
    """Print ``cmd``; run it with the deployment environment (``replace``: become it, for services)."""
    import os
    import shlex
    import subprocess

    console.print(f"[bold]$ {shlex.join(cmd)}[/]", soft_wrap=True)
    if dry_run:
        return
    env = deploy.environment()
    if replace:
        os.execvpe(cmd[0], cmd, env)
    code = subprocess.run(cmd, env=env).returncode
    if code:
        raise typer.Exit(code)


def _fail(err: Exception) -> NoReturn:
    """One line naming what to fix; exit status 2 (a usage or configuration error)."""
    console.print(f"[red]error:[/] {err}", highlight=False)
    raise typer.Exit(2) from err


@app.command("personalize")
def personalize_command(
    run: Path = typer.Option(..., help="run directory of an expert-routing run"),
    data: Path = typer.Option(..., help="a new client's local data (CSV/JSONL with text and label)"),
    experts: int = typer.Option(0, help="experts to download (0 = the run's client-experts)"),
    save: Path = typer.Option(None, help="write the personalised model here (gate, head and the chosen "
                                         "experts, each a peft adapter)"),
) -> None:
    """Zero-shot model for a client that never trained: its experts, chosen by the global gate."""
    import json

    from pollinate import data as datalib
    from pollinate.aggregators import resolve
    from pollinate.aggregators.expert_routing import ExpertConfig, MixtureModel, personalize
    from pollinate.modeling import ModelSpec, pick_device
    from pollinate.server.rundir import RunDirectory

    try:
        ckpt = RunDirectory(run).load_checkpoint() if (run / "summary.json").exists() else None
        if ckpt is None:
            raise ConfigError(f"{run} holds no finished round of a run (summary.json, checkpoint/)")
        config = RunConfig.from_mapping(ckpt.config)
        summary = json.loads((run / "summary.json").read_text())
        labels = tuple(summary.get("labels", ()))
        spec = ModelSpec.from_config(config, summary["num_labels"])
        model = resolve(config.aggregator).build_model(spec, pick_device(config.device))
        if not isinstance(model, MixtureModel):
            raise ConfigError(f"{run} is a {config.aggregator!r} run; personalize needs expert-routing")
        model.configure(ExpertConfig.from_options(config.aggregator_option_map))
        local = datalib.encode(datalib.load_table(str(data), config, labels or None), model.tokenizer,
                               config.task, config.max_length)
        state = ckpt.states[max(ckpt.states)]
        result = personalize(model, state, local, experts=experts or None)
        if save is not None:
            model.export(save, state, labels, experts=result.experts)
    except (ConfigError, ValueError) as err:
        _fail(err)
    metric = "accuracy" if "accuracy" in result.full else "loss"
    table = Table(title=f"Zero-shot personalisation - {data} ({result.examples} examples), "
                        f"experts {list(result.experts)}")
    for column in ("prediction", metric, "bytes downloaded"):
        table.add_column(column, justify="right")
    table.add_row("top-1 downloaded expert", f"{result.top1[metric]:.4f}", f"{result.bytes_downloaded:,}")
    table.add_row("gate mixture of downloaded experts", f"{result.mixture[metric]:.4f}",
                  f"{result.bytes_downloaded:,}")
    table.add_row("gate mixture of all experts", f"{result.full[metric]:.4f}", f"{result.bytes_full:,}")
    console.print(table)
    if save is not None:
        console.print(f"personalised model: {save} (routing.json names its experts)", highlight=False)


def main() -> None:
    """The console script: any error is one line (``--debug`` or POLLINATE_DEBUG=1: the traceback)."""
    from pollinate.server.app import one_line

    try:
        app()
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as err:
        if DEBUG["on"]:
            raise
        console.print(f"[red]error:[/] {one_line(err)}  (--debug shows the traceback)", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
