"""deploy/docker-compose.yml, checked without Docker: it parses, its pieces exist, and the
bridge's environment there is a configuration the bridge accepts. Running the demo upstream's
command and the bridge with that environment (outside containers) is in
tests/integration/test_ops_deploy.py; scripts/check-image (a CI step) builds both images with
podman and runs them wired as here. Not checked: `docker compose up` itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import load_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_services_build_from_files_in_the_repository(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"bridge", "upstream"}
    for name, service in compose["services"].items():
        context = (DEPLOY / service["build"]["context"]).resolve()
        assert context == REPO, name
        assert (context / service["build"]["dockerfile"]).is_file(), name
    assert compose["services"]["bridge"]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_bridge_waits_for_a_healthy_upstream_and_shares_its_network(compose: dict[str, Any]) -> None:
    bridge, upstream = compose["services"]["bridge"], compose["services"]["upstream"]
    assert bridge["depends_on"] == {"upstream": {"condition": "service_healthy"}}
    assert bridge["network_mode"] == "service:upstream"
    assert upstream["healthcheck"]["test"][0] == "CMD"
    # Published on the laptop's loopback only.
    assert all(port.startswith("127.0.0.1:") for port in upstream["ports"])


def test_mounted_files_exist(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (DEPLOY / source).resolve().is_file(), volume


def test_bridge_environment_is_a_valid_configuration(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    bridge, upstream = compose["services"]["bridge"], compose["services"]["upstream"]
    for key, value in bridge["environment"].items():
        monkeypatch.setenv(key, str(value))
    settings = load_settings(REPO / "bridge.toml")
    published = {int(port.split(":")[-1]) for port in upstream["ports"]}
    admin = settings.admin.listen_address
    assert admin is not None
    assert {a.port for a in settings.pop3.listen_addresses} | {admin.port} == published
    assert (settings.upstream.host, settings.upstream.port) == ("127.0.0.1", int(upstream["environment"]["DEMO_IMAP_PORT"]))
    # Compose waits stop_grace_period before SIGKILL: longer than the bridge's own grace.
    assert int(bridge["stop_grace_period"].rstrip("s")) > settings.pop3.shutdown_grace_seconds
