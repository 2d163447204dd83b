"""Run a whole federation in-process on Flower's simulation engine (Ray backend).

Flower's ``run_simulation`` ignores ``[tool.flwr.app.config]``, so the launcher hands
the server a fully built :class:`RunConfig`; clients receive it with every round's
instructions, as they would in a deployment.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pollinate.config import RunConfig


def simulate(config: RunConfig, num_cpus: int | None = None, num_gpus: float = 0.0,
             verbose: bool = False, faults: dict[int, str] | None = None) -> dict[str, Any]:
    """Run ``config`` with ``num-clients`` virtual SuperNodes; return the run's summary.

    ``faults`` maps partition ids to a misbehaviour (see :mod:`.faults`).
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
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": num_gpus},
        "init_args": {"num_cpus": num_cpus, "num_gpus": 1 if num_gpus else 0,
                      "include_dashboard": False},
    }
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(server_app=make_app(config), client_app=client_app,
                   num_supernodes=config.num_clients, backend_config=backend,
                   verbose_logging=verbose)
    summary = Path(config.out) / "summary.json"
    if not summary.exists():
        raise RuntimeError(f"the simulation ended without writing {summary}; see the log above")
    return json.loads(summary.read_text())
