"""``ray-address``: a federation on a two-node Ray cluster on loopback, and wrong addresses failing fast.

The cluster is a head and a second node started with ``ray start --block``, one CPU each,
in their own process groups, and stopped by those process ids (never ``ray stop``, which
stops every Ray process on the machine). Each client needs one CPU, so Flower's two actors
land one on each node, and four clients per round keep both busy: the node ids the
clients report must be the cluster's two.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pollinate.config import ConfigError, RunConfig
from pollinate.server.rundir import RunDirectory
from pollinate.simulations.cluster import cluster_nodes
from pollinate.simulations.launch import simulate

RAY = Path(sys.executable).with_name("ray")  # the CLI of the Ray that this Python imports
NODE_ARGS = ["--block", "--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats",
             "--object-store-memory", str(128 * 2**20)]
START_SECONDS = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen([str(RAY), "start", *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the node's process group (``ray start --block`` stops what it started), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_nodes(address: str, count: int, procs: dict[str, subprocess.Popen], logs: Path) -> list[dict]:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                tail = (logs / f"{name}.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"ray {name} node exited with status {proc.returncode}:\n{tail}")
        try:
            nodes = cluster_nodes(address, timeout=20)
        except ConfigError:
            nodes = []
        if len(nodes) == count:
            return nodes
        time.sleep(1)
    pytest.fail(f"the Ray cluster at {address} did not show {count} nodes within {START_SECONDS:.0f} s")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, list[dict]]]:
    """``(address, nodes)`` of a running two-node cluster on 127.0.0.1."""
    if not RAY.exists():
        pytest.skip(f"Ray's CLI is not installed next to {sys.executable}")
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are length-bound
    address = f"127.0.0.1:{free_port()}"
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["head"] = _start(["--head", "--port", address.rsplit(":", 1)[1], "--temp-dir", str(temp),
                                "--include-dashboard", "false", *NODE_ARGS], temp / "head.log")
        _wait_for_nodes(address, 1, procs, temp)
        procs["worker"] = _start(["--address", address, *NODE_ARGS], temp / "worker.log")
        yield address, _wait_for_nodes(address, 2, procs, temp)
    finally:
        for proc in procs.values():
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_clients_run_on_both_nodes_and_the_cluster_outlives_the_run(ray_cluster, tmp_path):
    address, nodes = ray_cluster
    config = RunConfig(num_clients=4, num_server_rounds=2, local_steps=1, max_train_examples=50,
                       test_examples=50, out=str(tmp_path), ray_address=address)
    summary = simulate(config)
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]

    records = RunDirectory(config.out).read_metrics()[1:]
    clients = [c for record in records for c in record["client_metrics"]]
    assert len(clients) == 8 and all(c["used"] for c in clients)
    assert {c["ray-node"] for c in clients} == {node["id"] for node in nodes}
    assert {node["id"] for node in cluster_nodes(address)} == {node["id"] for node in nodes}  # still up


def test_an_address_where_nothing_listens_fails_before_round_one(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    config = RunConfig(num_clients=2, num_server_rounds=1, out=str(tmp_path), ray_address=address)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"ray-address {address}: nothing answers there"):
        simulate(config)
    assert time.monotonic() - started < 20  # not the minutes of ray.init's retries
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_port_that_is_not_ray_fails_within_the_probe_timeout():
    with socket.socket() as listener:  # accepts TCP connections, never speaks Ray's protocol
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ConfigError, match=f"ray-address {address}: "):
            cluster_nodes(address, timeout=5)
        assert time.monotonic() - started < 15
