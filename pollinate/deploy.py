"""The exact commands and configuration that run Pollinate on Flower's deployment engine.

One place builds every ``flower-superlink`` / ``flower-supernode`` / ``flwr`` command line
and every ``$FLWR_HOME/config.toml`` connection entry, so that the ``pollinate deploy`` CLI,
docs/deployment.md and the deployment tests agree on flags and ports (tests parse them
with Flower's own parsers). Nothing here starts a process.

The processes (Flower 1.39) and what each owns:

* **SuperLink** (``flower-superlink``): the Fleet API (gRPC-rere, :data:`FLEET_PORT`)
  that SuperNodes dial, and one HTTP(S) server (:data:`HTTP_PORT`) carrying the Control
  API (``flwr run``, ``flwr supernode register``) and the Runtime API (the ServerApp).
  It owns the federation state: registered node keys, runs, messages (in memory, or in
  ``--database`` so a restart keeps them). With ``--isolation subprocess`` it starts a
  ``flower-superexec`` that launches one ``flwr-serverapp`` per run: the Pollinate
  Coordinator, which owns the run directory (metrics, checkpoints, adapter).
* **SuperNode** (``flower-supernode``, one per edge machine): dials the Fleet API, keeps
  the node's per-run state (the global version it holds, error-feedback residuals) and
  serves its own Runtime API (:data:`SUPERNODE_PORT`) to ``flwr-clientapp`` processes,
  one per round, which read the node's data (``--node-config data-path=...``), train
  and send the encoded update.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

# Flower 1.39's defaults (tests check them against flwr's constants; importing those
# here would cost the CLI seconds of start-up)
FLEET_PORT = 9092  # SuperNodes -> SuperLink: Fleet API, gRPC-rere
HTTP_PORT = 8000  # flwr CLI (Control API) and ServerApp (Runtime API) -> SuperLink: HTTP(S)
SUPERNODE_PORT = 9094  # ClientApp -> its SuperNode: Runtime API, HTTP
CONFIG_FILE = "config.toml"
ENVIRONMENT = {
    # the app's dependencies are installed on every machine; never pip-install at run time
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # edge machines are often offline and hold private data: no phone-home
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


class DeployError(ValueError):
    """A deployment setting is inconsistent (e.g. node authentication without TLS)."""


@dataclass(frozen=True)
class TLSFiles:
    """The certificate files of a deployment, laid out as :func:`pollinate.certs.generate` writes them."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def from_dir(cls, directory: str | Path) -> TLSFiles:
        d = Path(directory).resolve()
        files = cls(d / "ca.crt", d / "server.pem", d / "server.key")
        missing = [str(p) for p in (files.ca_cert, files.server_cert, files.server_key) if not p.exists()]
        if missing:
            raise DeployError(f"missing certificate files {missing}; "
                              "create them with `pollinate deploy certs`")
        return files


@dataclass(frozen=True)
class NodeConfig:
    """A SuperNode's ``--node-config``: what the Pollinate ClientApp reads on that node."""

    data_path: str = ""
    lora_rank: int | None = None
    device: str = ""
    partition_id: int | None = None
    num_partitions: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_mapping(self) -> dict[str, Any]:
        values: dict[str, Any] = {"data-path": self.data_path, "lora-rank": self.lora_rank,
                                  "device": self.device, "partition-id": self.partition_id,
                                  "num-partitions": self.num_partitions, **self.extra}
        return {k: v for k, v in values.items() if v not in (None, "")}


def config_arg(values: Mapping[str, Any]) -> str:
    """``key=value`` pairs as ``--node-config`` / ``--run-config`` parse them (TOML values)."""
    return " ".join(f"{key}={_toml_value(key, value)}" for key, value in values.items())


def _toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value)
        if any(c in text for c in "\"\\'") or any(c.isspace() for c in text):
            raise DeployError(f"{key}: value {text!r} may not contain quotes, backslashes or spaces "
                              "(Flower splits these options on whitespace)")
        return f'"{text}"'
    raise DeployError(f"{key}: unsupported value {value!r} (use a bool, number or string)")


def superlink_command(tls: TLSFiles | None, *, node_auth: bool = True, host: str = "0.0.0.0",
                      port: int = HTTP_PORT, fleet_address: str = f"0.0.0.0:{FLEET_PORT}",
                      database: str | Path | None = None, isolation: str = "subprocess") -> list[str]:
    """``flower-superlink``: Fleet API on ``fleet_address``, Control+Runtime HTTP API on ``host:port``.

    ``tls=None`` runs without encryption, for a trusted local network only; node
    authentication needs TLS (Flower refuses it otherwise, and so do we, earlier).
    ``database`` (an SQLite file) keeps node registrations and runs across restarts.
    """
    if isolation not in ("subprocess", "process"):
        raise DeployError(f"isolation must be 'subprocess' or 'process', got {isolation!r}")
    cmd = ["flower-superlink"]
    if tls is None:
        if node_auth:
            raise DeployError("SuperNode authentication needs TLS: give certificates or disable node auth")
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key)]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    cmd += ["--fleet-api-address", fleet_address, "--host", host, "--port", str(port),
            "--isolation", isolation]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_command(superlink: str, node: NodeConfig, *, ca_cert: str | Path | None,
                      auth_key: str | Path | None = None, host: str = "127.0.0.1",
                      port: int = SUPERNODE_PORT, isolation: str = "subprocess") -> list[str]:
    """``flower-supernode`` dialling the Fleet API at ``superlink`` (``host:9092``).

    ``ca_cert=None`` connects without TLS. ``auth_key`` is the node's private key
    (OpenSSH, ECDSA); its public half must be registered on the SuperLink. ``host:port``
    is this node's Runtime API for its ClientApp processes: every SuperNode on one machine
    needs its own port.
    """
    if ":" not in superlink:
        raise DeployError(f"--superlink needs host:port (the Fleet API, port {FLEET_PORT}), "
                          f"got {superlink!r}")
    cmd = ["flower-supernode", "--superlink", superlink]
    cmd += ["--insecure"] if ca_cert is None else ["--root-certificates", str(ca_cert)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    settings = node.to_mapping()
    if settings:
        cmd += ["--node-config", config_arg(settings)]
    cmd += ["--host", host, "--port", str(port), "--isolation", isolation]
    return cmd


def register_command(public_key: str | Path, connection: str) -> list[str]:
    """``flwr supernode register``: allow the node holding this key to join (needs node auth on)."""
    return ["flwr", "supernode", "register", str(public_key), connection]


def app_config(app: str | Path) -> dict[str, Any]:
    """The app's default run config (``[tool.flwr.app.config]``), what ``flwr run`` starts from."""
    pyproject = Path(app) / "pyproject.toml"
    if not pyproject.exists():
        raise DeployError(f"{app} has no pyproject.toml (the app directory `flwr run` builds)")
    tool = tomllib.loads(pyproject.read_text()).get("tool", {})
    return tool.get("flwr", {}).get("app", {}).get("config", {})


def run_command(app: str | Path, connection: str, run_config: Mapping[str, Any] | None = None,
                *, stream: bool = False) -> list[str]:
    """``flwr run``: build the FAB from ``app`` (a directory with pyproject.toml) and start a run."""
    cmd = ["flwr", "run", str(app), connection]
    if run_config:
        cmd += ["--run-config", config_arg(run_config)]
    return cmd + (["--stream"] if stream else [])


def connection_entry(address: str, ca_cert: str | Path | None) -> dict[str, Any]:
    """A ``[superlink.NAME]`` table: the Control API address and how to trust it."""
    if ":" not in address:
        raise DeployError(f"connection address needs host:port (the HTTP API, port {HTTP_PORT}), "
                          f"got {address!r}")
    if ca_cert is None:
        return {"address": address, "insecure": True}
    return {"address": address, "root-certificates": str(Path(ca_cert).resolve())}


def write_connection(flwr_home: str | Path, name: str, address: str, ca_cert: str | Path | None,
                     *, default: bool = False) -> Path:
    """Add or replace connection ``name`` in ``flwr_home/config.toml``; keep everything else."""
    path = Path(flwr_home) / CONFIG_FILE
    config = tomllib.loads(path.read_text()) if path.exists() else {}
    links = config.setdefault("superlink", {})
    links[name] = connection_entry(address, ca_cert)
    if default or "default" not in links:
        links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def flwr_home() -> Path:
    """Where ``flwr`` keeps config.toml: ``$FLWR_HOME``, else ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def environment(base: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """The environment every deployment process runs with: ``base`` (default: ours) + :data:`ENVIRONMENT`."""
    env = dict(os.environ if base is None else base)
    env.update(ENVIRONMENT)
    env.update(overrides)
    return env
