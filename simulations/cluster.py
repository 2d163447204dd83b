"""Attach a simulation to a running Ray cluster, after checking that it answers and fits a client.

``ray.init(address=...)`` towards an address where no Ray cluster answers retries for
many minutes (Ray 2.55: 20 tries of a 5 s connect and a 30 s wait). A run that names a
wrong ``ray-address`` fails instead before round 1, in one line naming the option: a TCP
connect shows whether anything listens there, and a child process that is killed after
``PROBE_SECONDS`` asks the cluster for its nodes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from typing import Any

from pollinate.config import ConfigError, split_host_port

PROBE_SECONDS = 30.0
CONNECT_SECONDS = 5.0
_PROBE = ("import json, sys, ray\n"
          "ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False,"
          " logging_level='ERROR')\n"
          "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() "
          "if n['Alive']]))\n")


def cluster_nodes(address: str, timeout: float = PROBE_SECONDS) -> list[dict[str, Any]]:
    """The alive nodes (``id``, ``resources``) of the Ray cluster at ``address`` (``HOST:PORT`` or auto)."""
    endpoint = split_host_port(address)
    if endpoint is not None:
        try:
            socket.create_connection(endpoint, timeout=CONNECT_SECONDS).close()
        except OSError as err:
            raise ConfigError(f"ray-address {address}: nothing answers there ({err}); is `ray start --head "
                              f"--port {endpoint[1]}` running on {endpoint[0]}?") from err
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise ConfigError(f"ray-address {address}: no Ray cluster answered within {timeout:.0f} s") from err
    if done.returncode:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()] or [
            f"exit status {done.returncode}"]
        raise ConfigError(f"ray-address {address}: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def attach_args(address: str, client_resources: dict[str, float]) -> dict[str, Any]:
    """``ray.init`` arguments that attach to ``address``, once one of its nodes fits a client.

    No ``num_cpus``/``num_gpus``: a cluster's resources are what each node was started with
    (``ray start --num-cpus``); Ray refuses them when attaching. ``client_resources`` stay
    per client, so the actors spread over the nodes that fit them.
    """
    need = {"CPU": client_resources.get("num_cpus", 0), "GPU": client_resources.get("num_gpus", 0)}
    nodes = cluster_nodes(address)
    if not any(all(node["resources"].get(k, 0) >= v for k, v in need.items()) for node in nodes):
        raise ConfigError(f"ray-address {address}: none of the cluster's {len(nodes)} node(s) has the "
                          f"{need['CPU']:g} CPU and {need['GPU']:g} GPU one client needs")
    return {"address": address, "include_dashboard": False}
