"""Run a whole federation in-process on Flower's simulation engine (Ray backend).

Flower's ``run_simulation`` ignores ``[tool.flwr.app.config]``, so the launcher hands
the server a fully built :class:`RunConfig`; clients receive it with every round's
instructions, as they would in a deployment.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pollinate.config import RunConfig
from pollinate.server.app import ERROR_FILE, RunFailed

from .cluster import attach_args


def simulate(config: RunConfig, num_cpus: int | None = None, num_gpus: float = 0.0,
             verbose: bool = False, faults: dict[int, str | Sequence[str]] | None = None,
             num_supernodes: int | None = None) -> dict[str, Any]:
    """Run ``config`` with ``num-clients`` virtual SuperNodes; return the run's summary.

    ``faults`` maps partition ids to a misbehaviour, or one per round (see :mod:`.faults`).
    ``num_supernodes`` starts that many SuperNodes instead, e.g. fewer than ``num-clients``
    (the nodes that exist are what the server samples from and accounts for).
    With ``ray-address`` set the clients run on that Ray cluster (each node's ``ray start
    --num-cpus``/``--num-gpus`` replace ``num_cpus``; one CPU and ``num_gpus`` per client),
    which is left running: this launcher attached to it, it did not start it.
    """
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from pollinate.client.app import app as client_app
    from pollinate.server.app import make_app

    from .faults import faulty_client_app

    if faults:
        client_app = faulty_client_app(faults)
    cores = os.cpu_count() or 1
    num_cpus = min(num_cpus or cores, cores)
    resources = {"num_cpus": 1, "num_gpus": num_gpus}
    local = {"num_cpus": num_cpus, "num_gpus": 1 if num_gpus else 0, "include_dashboard": False}
    backend = {"client_resources": resources,
               "init_args": attach_args(config.ray_address, resources) if config.ray_address else local}
    if not verbose:  # Flower's deprecation notice of run_simulation and per-actor chatter
        logging.getLogger("flwr").setLevel(logging.ERROR)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    config, scratch = _node_state_dir(config)
    started = time.time()
    try:
        run_simulation(server_app=make_app(config), client_app=client_app,
                       num_supernodes=num_supernodes or config.num_clients, backend_config=backend,
                       verbose_logging=verbose)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    out = Path(config.out)
    if _written_since(out / ERROR_FILE, started):
        raise RunFailed((out / ERROR_FILE).read_text().strip())
    if not _written_since(out / "summary.json", started):
        raise RunFailed(f"the simulation ended without writing {out / 'summary.json'}; run with --debug")
    return json.loads((out / "summary.json").read_text())


def _node_state_dir(config: RunConfig) -> tuple[RunConfig, Path | None]:
    """The config with ``node-state-dir`` set, and the directory this launcher owns (``None`` if given).

    Flower's engine keeps every virtual node's Context in this process; node memory in
    ``<out>/nodes`` keeps only a path there per node. Node memory lives for one run (a
    resumed run starts new nodes), so the directory is emptied before and removed after.
    On a Ray cluster (``ray-address``) a node's next round may run on another machine, so
    its memory stays in the Context, which Ray carries there, unless ``node-state-dir`` names
    a directory that every machine shares.
    """
    if config.node_state_dir or config.ray_address:
        return config, None
    scratch = Path(config.out).resolve() / "nodes"
    shutil.rmtree(scratch, ignore_errors=True)
    return config.replace(node_state_dir=str(scratch)), scratch


def _written_since(path: Path, started: float) -> bool:
    """Whether this run wrote ``path`` (a file of an earlier run in the same directory is not news)."""
    return path.exists() and path.stat().st_mtime >= started
