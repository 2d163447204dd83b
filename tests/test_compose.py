"""docker-compose.yml and Dockerfile: valid for Flower 1.39, pinned, TLS everywhere, data isolated.

The static checks parse every container's command with Flower 1.39's own argument
parsers (a renamed or removed flag fails here, not at ``docker compose up``). The last
test asks a real docker client to resolve the file (``docker compose config``, or the
standalone ``docker-compose``); it needs no engine and skips where neither exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from flwr.common.config import parse_config_args
from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from pollinate import deploy

REPO = Path(__file__).resolve().parents[1]
FLWR_VERSION = "1.39.0"
NODES = (1, 2, 3)


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def _volumes(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), from short ("src:dst:ro") or long syntax."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out[volume["target"]] = (str(volume["source"]), bool(volume.get("read_only")))
        else:  # the source may be "${VAR:-default}"
            rest, _, mode = volume.rpartition(":") if volume.endswith((":ro", ":rw")) else (volume, "", "")
            source, _, target = rest.rpartition(":")
            out[target] = (source, mode == "ro")
    return out


def test_commands_are_valid_flower_1_39_commands(services):
    link = _parse_args_run_superlink().parse_args(services["superlink"]["command"])
    assert link.enable_supernode_auth and not link.insecure and link.isolation == "process"
    assert (link.ssl_ca_certfile, link.ssl_certfile, link.ssl_keyfile) == (
        "certificates/ca.crt", "certificates/server.pem", "certificates/server.key")
    assert link.fleet_api_address == f"0.0.0.0:{deploy.FLEET_PORT}" and link.port == deploy.HTTP_PORT
    assert link.database.startswith("state/")  # the named volume: registrations survive restarts

    keys = set()
    for n in NODES:
        node = _parse_args_run_supernode().parse_args(services[f"supernode-{n}"]["command"])
        assert node.superlink == f"superlink:{deploy.FLEET_PORT}" and not node.insecure
        assert node.root_certificates == "certificates/ca.crt" and node.isolation == "process"
        settings = parse_config_args([node.node_config])
        assert settings["data-path"].startswith("/data/") and settings["lora-rank"] > 0
        assert settings["device"] == ("cuda" if n == 3 else "cpu")
        keys.add(_volumes(services[f"supernode-{n}"])["/app/keys/node"])
        executor = superexec_parser().parse_args(services[f"clientapp-{n}"]["command"])
        assert executor.runtime_api_address == f"supernode-{n}:{node.port}"
    assert len(keys) == len(NODES) and all(ro and "certificates/nodes/" in src for src, ro in keys)

    server = superexec_parser().parse_args(services["serverapp"]["command"])
    assert server.runtime_api_address == f"superlink:{link.port}"
    assert server.root_certificates == "certificates/ca.crt"  # verifies the SuperLink's HTTPS


def test_images_are_pinned_and_every_service_has_a_healthcheck(services):
    for name, service in services.items():
        assert "test" in service["healthcheck"], name
        image = service["image"]
        if image.startswith("flwr/"):
            assert image.endswith(f":{FLWR_VERSION}"), name
        else:  # built from this repo's Dockerfile on flwr/superexec
            assert service["build"]["args"]["FLWR_VERSION"] == FLWR_VERSION, name
            assert re.fullmatch(r"pollinate-executor:\d+\.\d+\.\d+(-cuda)?", image), name
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG FLWR_VERSION={FLWR_VERSION}" in dockerfile
    assert "FROM flwr/superexec:${FLWR_VERSION}" in dockerfile
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in dockerfile


def test_data_and_keys_are_mounted_read_only_where_they_are_used(services):
    sources = set()
    for n in NODES:
        mounts = _volumes(services[f"clientapp-{n}"])
        source, read_only = mounts["/data"]
        assert read_only and f"POLLINATE_DATA_{n}" in source
        sources.add(source)
        assert "/data" not in _volumes(services[f"supernode-{n}"])  # only the ClientApp reads data
    assert len(sources) == len(NODES)
    link = _volumes(services["superlink"])
    assert all(link[f"/app/certificates/{f}"][1] for f in ("ca.crt", "server.pem", "server.key"))
    assert not any("server.key" in src for name, s in services.items() if name != "superlink"
                   for src, _ in _volumes(s).values())


def test_gpu_node_is_optional(services):
    profiled = {name for name, s in services.items() if s.get("profiles")}
    assert profiled == {"supernode-3", "clientapp-3"}
    assert all(services[name]["profiles"] == ["gpu"] for name in profiled)
    (device,) = services["clientapp-3"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "cu" in services["clientapp-3"]["build"]["args"]["TORCH_INDEX_URL"]


def _compose() -> list[str] | None:
    if shutil.which("docker"):
        found = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if found.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_docker_compose_resolves_the_file(tmp_path):
    compose = _compose()
    if compose is None:
        pytest.skip("no docker client with compose")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path),
           "POLLINATE_DATA_2": "/srv/hospital-b"}
    base = [*compose, "--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml")]

    def config(*args: str) -> str:
        done = subprocess.run([*base, "config", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    resolved = yaml.safe_load(config())["services"]
    mounts = {n: _volumes(resolved[f"clientapp-{n}"])["/data"] for n in (1, 2)}
    assert mounts[1] == (str(REPO / "data" / "client-1"), True)  # the default, made absolute
    assert mounts[2] == ("/srv/hospital-b", True)  # a node's data from its own variable
    services = set(config("--services").split())
    assert {"superlink", "serverapp", "supernode-1", "clientapp-1", "supernode-2", "clientapp-2"} <= services
    if compose == ["docker", "compose"]:  # compose v2 leaves profiled services out by default
        assert "supernode-3" not in services
