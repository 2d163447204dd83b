"""Pollinate on Flower's deployment engine: a SuperLink and SuperNodes as real processes over gRPC.

Every round starts one ClientApp process per node, so one federation (TLS, SuperNode
authentication, SQLite state, all on 127.0.0.1 with ports picked at run time) is shared
by all tests and tells one story:

1. three honest SuperNodes and two bad peers join; an unregistered key and a client
   without the CA are refused;
2. run 1 uses the tests' app directory (honest nodes run the real ClientApp and log the
   payload sizes they see; bad peers send an oversized or a malformed reply) and
   completes round 1;
3. the server is killed (SIGKILL of the SuperLink with its ServerApp) and restarted;
4. run 2, from the repo root, resumes at round 2; one SuperNode is killed mid-round and
   the round completes with the other two (the bad peers, now running the real ClientApp
   without data, are refused by it and dropped too).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import tomli_w
from deploy_support import Process, free_port, healthy, wait_until

from pollinate import certs, deploy


def deployed(test):
    """A test of the shared federation: slow, and it needs Flower's executables."""
    needs = pytest.mark.skipif(shutil.which("flower-superlink") is None,
                               reason="Flower's executables are not on PATH")
    return pytest.mark.slow(needs(test))


REPO = Path(__file__).resolve().parents[1]
HONEST = ("node-0", "node-1", "node-2")
BAD = {"bad-oversize": "oversize", "bad-malformed": "malformed"}
VICTIM = "node-2"
RUN_CONFIG = {"num-server-rounds": 2, "num-clients": 3, "max-train-examples": 100,
              "test-examples": 100, "learning-rate": 0.01, "local-epochs": 2, "max-payload-bytes": 1_000_000,
              "round-timeout": 600.0, "min-train-nodes": 2, "resume": True}
CONNECTION = "pollinate-test"
FROM_NOTHING = {"full", "seeded"}  # downlinks for a node holding nothing (server/versions.py)


class Federation:
    """The processes of one deployment on 127.0.0.1 and the files they write."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "flwr-home"
        self.env = deploy.environment(FLWR_HOME=str(self.home), HF_HUB_OFFLINE="1")
        self.keys = certs.generate(root / "certs", nodes=[*HONEST, *BAD, "rogue"])
        self.tls = deploy.TLSFiles.from_dir(self.keys.directory)
        self.http, self.fleet = free_port(), free_port()
        self.out = root / "run"
        self.processes: list[Process] = []
        self.nodes: dict[str, Process] = {}
        self.superlink: Process | None = None

    def start(self, name: str, cmd: list[str]) -> Process:
        proc = Process(name, cmd, self.root / f"{name}-{len(self.processes)}.log", self.env, self.root)
        self.processes.append(proc)
        return proc

    def start_superlink(self) -> Process:
        cmd = deploy.superlink_command(self.tls, host="127.0.0.1", port=self.http,
                                       fleet_address=f"127.0.0.1:{self.fleet}",
                                       database=self.root / "state.db")
        self.superlink = self.start("superlink", cmd)
        wait_until(lambda: healthy(f"https://127.0.0.1:{self.http}/health", self.tls.ca_cert), 90,
                   "the SuperLink's HTTP API", [self.superlink])
        return self.superlink

    def start_node(self, name: str, settings: deploy.NodeConfig, *, ca: bool = True) -> Process:
        """A SuperNode authenticating with key ``name`` (if there is one) and trusting our CA."""
        key = self.keys.node(name).private_key if any(k.name == name for k in self.keys.nodes) else None
        cmd = deploy.supernode_command(f"127.0.0.1:{self.fleet}", settings,
                                       ca_cert=self.tls.ca_cert if ca else None, auth_key=key,
                                       port=free_port())
        if not ca:  # neither our CA nor --insecure: the system's trust store
            cmd.remove("--insecure")
        self.nodes[name] = self.start(name, cmd)
        return self.nodes[name]

    def flwr(self, cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, env=self.env, cwd=self.root, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def start_run(self, app: Path) -> int:
        cmd = deploy.run_command(app, CONNECTION, {**RUN_CONFIG, "out": str(self.out)})
        return int(json.loads(self.flwr([*cmd, "--format", "json"]).stdout)["run-id"])

    def run_log(self, run_id: int) -> str:
        """What the run's ServerApp printed, as Flower collected it on the SuperLink."""
        return self.flwr(["flwr", "log", str(run_id), CONNECTION, "--show"]).stdout

    def node_id(self, name: str) -> int:
        for line in self.nodes[name].output().splitlines():
            if "SuperNode ID:" in line:
                return int(line.rsplit(":", 1)[1])
        raise AssertionError(f"{name} never got a node id:\n{self.nodes[name].output()[-2000:]}")

    def metrics(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def checkpoint_round(self) -> int:
        meta = self.out / "checkpoint" / "meta.json"
        return json.loads(meta.read_text())["round"] if meta.exists() else 0

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop(grace=5)


def traced_app(root: Path) -> Path:
    """An app directory like the repo root whose ClientApp is ``deploy_support:app``."""
    app = root / "app"
    app.mkdir()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    config["tool"]["flwr"]["app"]["components"]["clientapp"] = "deploy_support:app"
    config["tool"]["flwr"]["app"]["fab-include"] = ["deploy_support.py"]
    (app / "pyproject.toml").write_text(tomli_w.dumps(config))
    shutil.copy(Path(__file__).with_name("deploy_support.py"), app / "deploy_support.py")
    return app


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("deployment"))
    try:
        fed.start_superlink()
        deploy.write_connection(fed.home, CONNECTION, f"127.0.0.1:{fed.http}", fed.tls.ca_cert, default=True)
        registrations = [subprocess.Popen(deploy.register_command(fed.keys.node(n).public_key, CONNECTION),
                                          env=fed.env, cwd=fed.root, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)
                         for n in (*HONEST, *BAD)]
        for reg in registrations:
            output, _ = reg.communicate(timeout=120)
            assert reg.returncode == 0, output
        for i, name in enumerate(HONEST):
            fed.start_node(name, deploy.NodeConfig(
                partition_id=i, num_partitions=len(HONEST), device="cpu",
                extra={"trace-file": str(fed.root / f"trace-{name}.jsonl")}))
        for name, behaviour in BAD.items():
            fed.start_node(name, deploy.NodeConfig(extra={"misbehave": behaviour}))
        fed.start_node("rogue", deploy.NodeConfig(partition_id=0, num_partitions=3))
        fed.start_node("no-ca", deploy.NodeConfig(partition_id=0, num_partitions=3), ca=False)
        members = [fed.nodes[n] for n in (*HONEST, *BAD)]
        wait_until(lambda: all("SuperNode ID:" in p.output() for p in members), 90,
                   "every registered SuperNode to activate", [fed.superlink, *members])
        yield fed
    finally:
        fed.stop_all()


@pytest.fixture(scope="module")
def first_run(federation):
    """Run 1 up to its round-1 checkpoint, then kill the server."""
    fed = federation
    run_id = fed.start_run(traced_app(fed.root))
    wait_until(lambda: fed.checkpoint_round() >= 1, 400, "the round-1 checkpoint", [fed.superlink])
    fed.superlink.kill()
    metrics = fed.metrics()
    traces = {n: [json.loads(x) for x in (fed.root / f"trace-{n}.jsonl").read_text().splitlines()]
              for n in HONEST}
    return {"metrics": metrics, "traces": traces, "run_id": run_id}


@pytest.fixture(scope="module")
def second_run(federation, first_run):
    """Restart the server, resume from the repo root, kill one SuperNode during round 2."""
    fed = federation
    superlink = fed.start_superlink()
    run_id = fed.start_run(REPO)
    # a node fetches a run's description when it pulls the run's first message: round 2's
    # instructions are out, and the victim dies before it can answer
    wait_until(lambda: f"Requesting `Run` for run_id={run_id}" in superlink.output(), 300,
               "the round-2 instructions", [superlink])
    fed.nodes[VICTIM].kill()
    summary = fed.out / "summary.json"
    wait_until(lambda: summary.exists() and "plots" in json.loads(summary.read_text()), 400,
               "run 2 to finish", [fed.superlink])
    return {"metrics": fed.metrics(), "summary": json.loads(summary.read_text()),
            "logs": {1: fed.run_log(first_run["run_id"]), 2: fed.run_log(run_id)}}


@deployed
def test_unregistered_key_and_client_without_the_ca_are_refused(federation):
    for name in ("rogue", "no-ca"):
        proc = federation.nodes[name]
        wait_until(lambda p=proc: not p.alive(), 60, f"{name} to give up")
        assert proc.popen.returncode != 0
        assert "SuperNode ID:" not in proc.output()
    assert "Failed to activate SuperNode" in federation.nodes["rogue"].output()
    assert "No SuperNode found with the given public key" in federation.superlink.output()
    assert "CERTIFICATE_VERIFY_FAILED" in federation.nodes["no-ca"].output()


@deployed
def test_supernodes_connect_to_the_grpc_fleet_api(federation):
    log = federation.superlink.output()
    assert f"Starting Fleet API (gRPC-rere) on 127.0.0.1:{federation.fleet}" in log
    for name in (*HONEST, *BAD):
        assert f"[Fleet.ActivateNode] Activated node_id={federation.node_id(name)}" in log
    listed = json.loads(federation.flwr(["flwr", "supernode", "list", CONNECTION, "--format", "json"]).stdout)
    online = {int(n["node-id"]) for n in listed["nodes"] if n["status"] == "online"}
    assert {federation.node_id(n) for n in (*HONEST, *BAD)} <= online


@deployed
def test_server_counts_the_payload_bytes_the_nodes_saw(federation, first_run):
    round1 = next(r for r in first_run["metrics"] if r["round"] == 1)
    seen = {federation.node_id(n): first_run["traces"][n] for n in HONEST}
    counted = {c["node"]: c for c in round1["client_metrics"] if c["used"]}
    assert set(counted) == set(seen)
    for node, traces in seen.items():
        (trace,) = [t for t in traces if t["round"] == 1]
        assert counted[node]["bytes_down"] == trace["down"] > 0
        assert counted[node]["bytes_up"] == trace["up"] > 0
        assert counted[node]["downlink"] in FROM_NOTHING
    oversize = RUN_CONFIG["max-payload-bytes"] + 4  # what the oversize peer sent, also counted
    assert round1["bytes_up"] == sum(counted[n]["bytes_up"] for n in seen) + oversize
    assert round1["clients"] == len(HONEST)


@deployed
def test_bad_peers_are_dropped_with_their_reason(federation, first_run):
    round1 = next(r for r in first_run["metrics"] if r["round"] == 1)
    reasons = {d["node"]: d["reason"] for d in round1["dropped"]}
    assert set(reasons) == {federation.node_id(n) for n in BAD}
    assert "PayloadTooLarge" in reasons[federation.node_id("bad-oversize")]
    assert "malformed reply" in reasons[federation.node_id("bad-malformed")]


@deployed
def test_bad_peers_reasons_are_in_the_run_log(federation, second_run):
    log = second_run["logs"][1]  # run 1's ServerApp died with the SuperLink; its log survived
    for name in BAD:
        assert f"round 1: dropped update of node {federation.node_id(name)}" in log


@deployed
def test_restarted_server_resumes_at_round_two(federation, second_run):
    rounds = [r["round"] for r in second_run["metrics"]]
    assert rounds == [0, 1, 2]  # round 1 neither lost nor repeated
    round2 = second_run["metrics"][2]
    used = {c["node"]: c for c in round2["client_metrics"] if c["used"]}
    assert set(used) == {federation.node_id(n) for n in HONEST if n != VICTIM}
    # a new Flower run: nodes hold nothing, so each got the whole state and none was stale
    assert all(c["downlink"] in FROM_NOTHING and c["status"] == "ok" for c in used.values())
    assert all(c["bytes_down"] == c["bytes-down"] for c in used.values())  # as measured on the node


@deployed
def test_round_completes_without_a_killed_supernode(federation, second_run):
    round2 = second_run["metrics"][2]
    reasons = {d["node"]: d["reason"] for d in round2["dropped"]}
    # Flower answers for a node whose heartbeat lapsed (2 x 30 s): the round did not wait for
    # its timeout, which would have recorded "no reply before the round timeout"
    assert "Node Unavailable" in reasons.pop(federation.node_id(VICTIM))
    assert round2["seconds"] < RUN_CONFIG["round-timeout"]
    assert f"round 2: dropped update of node {federation.node_id(VICTIM)}" in second_run["logs"][2]
    # the bad peers now run the real ClientApp, which refuses their node config
    assert set(reasons) == {federation.node_id(n) for n in BAD}
    assert all("ConfigError" in reason for reason in reasons.values())


@deployed
def test_accuracy_rises_over_the_deployment(second_run):
    rounds = second_run["summary"]["rounds"]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.1


# -- the building blocks, without processes ------------------------------------------


def test_certificates_let_a_client_verify_the_superlink(tmp_path):
    import socket
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    bundle = certs.generate(tmp_path / "a", hosts=["10.1.2.3", "link.example.org"], nodes=["edge-1"])
    sans = x509.load_pem_x509_certificate(bundle.server_cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert {"localhost", "superlink", "link.example.org"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.1.2.3"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(bundle.server_cert, bundle.server_key)
    other = certs.generate(tmp_path / "b")

    def handshake(ca: Path, host: str) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            accept = threading.Thread(target=lambda: _serve_once(listener, server))
            accept.start()
            try:
                client = ssl.create_default_context(cafile=str(ca))
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                    client.wrap_socket(raw, server_hostname=host).close()
            finally:
                accept.join(5)

    handshake(bundle.ca_cert, "localhost")
    handshake(bundle.ca_cert, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(other.ca_cert, "localhost")  # a client that trusts another CA
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(bundle.ca_cert, "elsewhere.example.org")  # a name not in the SANs

    node = bundle.node("edge-1")
    key = load_ssh_private_key(node.private_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert node.private_key.stat().st_mode & 0o077 == 0 and bundle.server_key.stat().st_mode & 0o077 == 0
    assert try_load_public_key(node.public_key)  # what `flwr supernode register` reads
    again = certs.generate(tmp_path / "a", nodes=["edge-1", "edge-2"])  # add a node, keep the CA
    assert again.ca_cert.read_bytes() == bundle.ca_cert.read_bytes()
    assert again.node("edge-1").public_key.read_bytes() == node.public_key.read_bytes()
    with pytest.raises(certs.CertificateError):
        certs.generate(tmp_path / "c", nodes=["../escape"])


def _serve_once(listener, context) -> None:
    conn, _ = listener.accept()
    try:
        context.wrap_socket(conn, server_side=True).close()
    except (OSError, ValueError):
        conn.close()


def test_commands_parse_with_flowers_own_parsers(tmp_path):
    from flwr.common.config import parse_config_args
    from flwr.common.constant import FLEETAPI_GRPC_RERE_PORT
    from flwr.supercore.constant import SUPERLINK_UVICORN_DEFAULT_PORT, SUPERNODE_UVICORN_DEFAULT_PORT
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    assert (deploy.FLEET_PORT, deploy.HTTP_PORT, deploy.SUPERNODE_PORT) == (
        int(FLEETAPI_GRPC_RERE_PORT), SUPERLINK_UVICORN_DEFAULT_PORT, SUPERNODE_UVICORN_DEFAULT_PORT)
    tls = deploy.TLSFiles.from_dir(certs.generate(tmp_path).directory)
    link = _parse_args_run_superlink().parse_args(deploy.superlink_command(tls, database="s.db")[1:])
    assert (link.enable_supernode_auth, link.insecure, link.port, link.ssl_ca_certfile) == (
        True, False, 8000, str(tls.ca_cert))
    assert link.fleet_api_address == "0.0.0.0:9092" and link.database == "s.db"
    plain = _parse_args_run_superlink().parse_args(deploy.superlink_command(None, node_auth=False)[1:])
    assert plain.insecure and not plain.enable_supernode_auth
    with pytest.raises(deploy.DeployError, match="needs TLS"):
        deploy.superlink_command(None)

    settings = deploy.NodeConfig(data_path="/data/a_b.csv", lora_rank=16, device="cuda:1",
                                   extra={"tier": 2})
    cmd = deploy.supernode_command("link:9092", settings, ca_cert=tls.ca_cert, auth_key="k", port=9095)
    node = _parse_args_run_supernode().parse_args(cmd[1:])
    assert (node.superlink, node.root_certificates, node.auth_supernode_private_key, node.port) == (
        "link:9092", str(tls.ca_cert), "k", 9095)
    assert parse_config_args([node.node_config]) == {"data-path": "/data/a_b.csv", "lora-rank": 16,
                                                     "device": "cuda:1", "tier": 2}
    with pytest.raises(deploy.DeployError, match="spaces"):
        deploy.supernode_command("link:9092", deploy.NodeConfig(data_path="/my data"), ca_cert=None)

    run = deploy.run_command(".", "prod", {"num-server-rounds": 3, "error-feedback": False, "out": "/r"})
    assert run[:4] == ["flwr", "run", ".", "prod"]
    assert parse_config_args([run[run.index("--run-config") + 1]]) == {
        "num-server-rounds": 3, "error-feedback": False, "out": "/r"}


def test_connection_entries_are_what_flwr_reads(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n'
                                      '[superlink.local]\naddress = ":local:"\n')
    deploy.write_connection(home, "prod", "link.example.org:8000", tmp_path / "ca.crt")
    deploy.write_connection(home, "lab", "10.0.0.5:8000", None, default=True)
    monkeypatch.setenv("FLWR_HOME", str(home))
    prod = read_superlink_connection("prod")
    assert (prod.address, prod.root_certificates, prod.insecure) == (
        "link.example.org:8000", str((tmp_path / "ca.crt").resolve()), False)
    lab = read_superlink_connection(None)  # the new default
    assert (lab.name, lab.address, lab.insecure) == ("lab", "10.0.0.5:8000", True)
    assert read_superlink_connection("local").address == ":local:"  # untouched
    with pytest.raises(deploy.DeployError, match="host:port"):
        deploy.write_connection(home, "bad", "link.example.org", None)


def test_the_apps_fab_ships_metadata_not_code():
    """Code in the FAB would shadow the installed package; a federations table would be migrated."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))).namelist()
    assert "pyproject.toml" in names and not [n for n in names if n.endswith(".py")]
    assert "federations" not in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]


def test_cli_prints_the_flower_commands(tmp_path):
    from typer.testing import CliRunner

    from pollinate.cli import app

    runner = CliRunner()
    made = runner.invoke(app, ["deploy", "certs", str(tmp_path), "--node", "edge-1"])
    assert made.exit_code == 0, made.output
    link = runner.invoke(app, ["deploy", "superlink", "--certs", str(tmp_path), "--dry-run"])
    assert link.exit_code == 0 and "flower-superlink --ssl-ca-certfile" in link.output
    node = runner.invoke(app, ["deploy", "supernode", "--superlink", "link:9092", "--certs", str(tmp_path),
                               "--name", "edge-1", "--data-path", "/data/x.csv", "--dry-run"])
    assert node.exit_code == 0 and "--auth-supernode-private-key" in node.output
    assert "'data-path=\"/data/x.csv\"'" in node.output  # shell-quoted as a whole
    home = tmp_path / "home"
    wrote = runner.invoke(app, ["deploy", "connect", "lab", "--address", "10.0.0.5:8000", "--ca",
                                str(tmp_path / "ca.crt")], env={"FLWR_HOME": str(home)})
    assert wrote.exit_code == 0, wrote.output
    assert tomllib.loads((home / "config.toml").read_text())["superlink"]["lab"]["address"] == "10.0.0.5:8000"
    run = runner.invoke(app, ["deploy", "run", str(REPO), "--connection", "lab",
                              "--set", "num-server-rounds=3", "--dry-run"])
    assert run.exit_code == 2 and "needs test-data" in run.output  # a server must know its label count
    run = runner.invoke(app, ["deploy", "run", str(REPO), "--connection", "lab",
                              "--set", "num-server-rounds=3", "--set", "num-labels=4", "--dry-run"])
    assert run.exit_code == 0, run.output
    assert f"flwr run {REPO} lab --run-config 'num-server-rounds=3 num-labels=4'" in run.output
    typo = runner.invoke(app, ["deploy", "run", "--set", "num-server-round=3", "--dry-run"])
    assert typo.exit_code == 2 and "unknown option 'num-server-round'" in typo.output
    missing = runner.invoke(app, ["deploy", "supernode", "--superlink", "link:9092", "--certs", str(tmp_path),
                                  "--name", "nobody", "--dry-run"])
    assert missing.exit_code == 2 and "no key" in missing.output
