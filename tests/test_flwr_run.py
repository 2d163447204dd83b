"""The README's ``flwr run . local``: Flower's own CLI runs the installed Pollinate app.

``flwr run`` on the ``local`` connection starts a detached SuperLink in simulation mode,
which starts a SuperExec, which starts the simulation process (ServerApp and Ray with
the ClientApp actors). None of them is a child of the test once ``flwr`` exits, so the
test recognises them by the ``FLWR_HOME`` it gave them (every process inherits it) and
stops each by PID. Its own ports and ``FLWR_HOME`` keep a user's SuperLink and
``~/.flwr`` out of it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from deploy_support import Process, descendants, free_port, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 2
FEDERATION = "num-supernodes=2 client-resources-num-cpus=1"


def flwr_env(home: Path) -> dict[str, str]:
    """The README's environment, with a private FLWR_HOME and private local-SuperLink ports."""
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}


def ours(home: Path) -> dict[int, str]:
    """Running processes started under ``home`` (FLWR_HOME in their environment, or a
    descendant of one): PID -> command line. Read afresh each time, so no reused PID is hit."""
    marker = f"FLWR_HOME={home}".encode()
    marked = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                marked.append(int(entry.name))
        except OSError:
            continue
    found = {}
    for pid in {*marked, *(child for parent in marked for child in descendants(parent))}:
        try:
            stat, cmd = Path(f"/proc/{pid}/stat").read_text(), Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):  # a zombie has exited already
            found[pid] = cmd.replace(b"\0", b" ").decode(errors="replace")
    return found


def stop_all(home: Path) -> dict[int, str]:
    """SIGTERM the SuperLink (it stops its SuperExec), then SIGKILL the rest; return what is left."""
    for pid, cmd in ours(home).items():
        if "flower-superlink" in cmd:
            _signal(pid, signal.SIGTERM)
    wait_gone(home, 15)
    for pid in ours(home):
        _signal(pid, signal.SIGKILL)
    return wait_gone(home, 10)


def wait_gone(home: Path, timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while (left := ours(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def finished(out: Path) -> dict | None:
    """summary.json once it holds round 0 (the initial model) and every round asked for."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    rounds = [r["round"] for r in summary.get("rounds", [])]
    return summary if rounds == list(range(ROUNDS + 1)) and summary.get("status") == "ok" else None


def test_flwr_run_local_runs_the_installed_app_and_leaves_nothing_running(tmp_path: Path):
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    env = flwr_env(home)
    run_config = (f"num-server-rounds={ROUNDS} max-train-examples=40 test-examples=40 num-clients=2 "
                  f"min-train-nodes=2 out='{out}'")
    seen: dict[int, str] = {}
    started = time.monotonic()
    flwr = Process("flwr run", ["flwr", "run", ".", "local", "--stream", "--federation-config", FEDERATION,
                                "--run-config", run_config], tmp_path / "flwr-run.log", env, REPO)
    try:
        def done_or_exited() -> bool:
            seen.update(ours(home))
            return finished(out) is not None or not flwr.alive()

        wait_until(done_or_exited, 180, "the run's summary.json with rounds 0..2")
        summary = finished(out)
        assert summary is not None, f"flwr run exited ({flwr.popen.returncode}):\n{flwr.output()[-4000:]}"
        assert flwr.wait(60) == 0, flwr.output()[-4000:]
        elapsed = time.monotonic() - started
        log = flwr.output()

        assert summary["config"]["num-server-rounds"] == ROUNDS and summary["config"]["out"] == str(out)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["round"] for m in metrics] == list(range(ROUNDS + 1))
        assert (out / "adapter").is_dir() and (out / "server.log").is_file()
        assert f"run directory: {out}" in log  # what --stream shows the user
        assert "'client_resources': {'num_cpus': 1" in log  # --federation-config reached the simulation
        assert not (home / "runtime-envs").exists()  # no per-run environment, no second torch
        assert (home / "local-superlink" / "superlink.log").is_file()
        assert any("flower-superlink" in cmd for cmd in seen.values()), "no detached SuperLink was seen"

        run_id = re.search(r"Successfully started run (\d+)", log).group(1)
        listing = subprocess.run(["flwr", "ls", "local", "--format", "json"], env=env, cwd=tmp_path,
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        runs = json.loads(listing.stdout[listing.stdout.index("{"):])["runs"]
        assert [r["status"] for r in runs if r["run-id"] == run_id] == ["finished:completed"]
        print(f"flwr run . local: {ROUNDS} rounds in {elapsed:.0f}s")
    finally:
        if flwr.alive():  # once reaped, its PID may be another process's
            flwr.stop()
        left = stop_all(home)
    assert not left, f"processes left running: {left}"
