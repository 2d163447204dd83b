"""Support for the deployment tests: real processes on 127.0.0.1, and a test ClientApp.

Processes are started in their own session and stopped by PID together with every
descendant Flower spawned for them (SuperExec, ServerApp, ClientApp processes), so a
failing test leaves nothing behind.

``app`` is the ClientApp of the tests' app directory (``clientapp = "deploy_support:app"``;
the FAB ships this file). Honest nodes run the real Pollinate ClientApp and, when their
node config names a ``trace-file``, append what crossed the wire (downlink and uplink
payload sizes, as seen on the node) so a test can compare them with what the server
counted. A node configured with ``misbehave=oversize`` or ``misbehave=malformed`` is a
bad peer: it answers at once, without training, with a payload above the run's
``max-payload-bytes`` or a reply that lacks its update record. The module imports
nothing heavy at import time: bad peers never load torch.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    from pollinate.protocol import PAYLOAD, UPLINK, TrainInstruction

    order = TrainInstruction.from_message(msg)
    behaviour = str(context.node_config.get("misbehave", ""))
    if behaviour:
        reply = _misbehave(behaviour, order, msg)
    else:
        from pollinate.client.app import handle_train

        reply = handle_train(msg, context)
    trace = str(context.node_config.get("trace-file", ""))
    if trace:
        up = len(reply.content[UPLINK][PAYLOAD]) if UPLINK in reply.content else None
        line = {"node": context.node_id, "round": order.round, "down": len(order.payload), "up": up}
        with open(trace, "a") as fh:
            fh.write(json.dumps(line) + "\n")
    return reply


def _misbehave(behaviour: str, order, msg: Message) -> Message:
    from pollinate.protocol import UPLINK, TrainReply

    if behaviour == "oversize":
        payload = b"PLN1" + bytes(order.config.max_payload_bytes)
        return Message(TrainReply("ok", payload, 10, 0).to_record(), reply_to=msg)
    if behaviour == "malformed":
        content = TrainReply("ok", b"", 10, 0).to_record()
        del content[UPLINK]
        return Message(content, reply_to=msg)
    raise ValueError(f"unknown misbehave={behaviour!r}")


# -- processes -----------------------------------------------------------------------


class Process:
    """A command running in its own session, its output in a log file."""

    def __init__(self, name: str, cmd: Sequence[str], log: Path, env: dict[str, str], cwd: Path):
        self.name, self.cmd, self.log = name, list(cmd), log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                          cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the process and everything it started, as a machine crash would."""
        for pid in [self.pid, *descendants(self.pid)]:
            _signal(pid, signal.SIGKILL)
        self._reap(5)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (Flower shuts down cleanly), then SIGKILL whatever is left of the tree."""
        tree = [self.pid, *descendants(self.pid)]
        if self.alive():
            _signal(self.pid, signal.SIGTERM)
            self._reap(grace)
        for pid in tree:
            _signal(pid, signal.SIGKILL)
        self._reap(5)

    def _reap(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


def descendants(pid: int) -> list[int]:
    """PIDs of all live descendants of ``pid`` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, [])]
        found += frontier
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float, what: str,
               watch: Sequence[Process] = ()) -> object:
    """Poll ``condition`` until truthy; fail early if a watched process exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for proc in watch:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}) while waiting "
                                     f"for {what}:\n{proc.output()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def healthy(url: str, ca_cert: Path | None) -> bool:
    """``GET url`` answers 200 (over TLS verified with ``ca_cert`` when given)."""
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200
    except OSError:
        return False
