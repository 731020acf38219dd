"""deploy/kubernetes, checked offline: no cluster runs on these machines.

Every manifest is validated against the Kubernetes OpenAPI schemas bundled in the
`kubernetes-validate` package (strict: unknown fields are errors; no network needed), the
pieces are checked to refer to each other correctly (selectors, named ports, probes, volumes),
the ConfigMap's bridge.toml is loaded by the bridge's own config loader, and HAProxy's own
parser checks haproxy.cfg (`haproxy -c`, Debian's haproxy package, installed by
scripts/install-deps). Not checked: applying them to a cluster, or traffic through HAProxy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bridge.config import load_settings
from bridge.net.addresses import parse_listen_address

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
# The oldest Kubernetes release still in common managed offerings that we claim to support.
KUBERNETES_VERSION = "1.29"
APP = {"app.kubernetes.io/name": "pop3-imap-bridge"}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((path.name, document))
    return found


DOCUMENTS = _documents()


def _kind(kind: str) -> list[dict[str, Any]]:
    return [document for _name, document in DOCUMENTS if document["kind"] == kind]


def _single(kind: str) -> dict[str, Any]:
    matches = _kind(kind)
    assert len(matches) == 1, f"expected one {kind}"
    return matches[0]


def test_every_required_kind_is_there() -> None:
    kinds = sorted(document["kind"] for _name, document in DOCUMENTS)
    assert kinds == sorted(
        ["ConfigMap", "Secret", "Deployment", "Service", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]
    )


@pytest.mark.parametrize(
    "document", [d for _n, d in DOCUMENTS], ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in DOCUMENTS]
)
def test_manifest_passes_schema_validation(document: dict[str, Any]) -> None:
    # validate() raises SchemaNotFoundError for an unknown kind/apiVersion: a failure too.
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_schema_validation_catches_mistakes() -> None:
    # The validator is not a rubber stamp: a misspelt field and a wrong type both fail.
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    deployment["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = sorted(kustomization["resources"])
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert listed == on_disk


def _container() -> dict[str, Any]:
    containers = _single("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_configmap_is_a_valid_bridge_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _single("ConfigMap")["data"]["bridge.toml"]
    env = {e["name"]: e["value"] for e in _container().get("env", [])}
    for key, value in env.items():
        assert key.startswith("BRIDGE_")
        monkeypatch.setenv(key, value)
    config = tmp_path / "bridge.toml"
    config.write_text(text)
    settings = load_settings(config)

    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    assert {a.port for a in settings.pop3.listen_addresses} == {ports["pop3"]}
    admin = settings.admin.listen_address
    assert admin is not None and admin.port == ports["admin"]
    assert all(a.host == "0.0.0.0" for a in [*settings.pop3.listen_addresses, admin])
    assert settings.logging.format == "json"
    # Kubernetes sends SIGKILL after terminationGracePeriodSeconds, counted from the preStop.
    pod = _single("Deployment")["spec"]["template"]["spec"]
    pre_stop = int(_container()["lifecycle"]["preStop"]["exec"]["command"][1])
    assert settings.pop3.shutdown_grace_seconds + pre_stop < pod["terminationGracePeriodSeconds"]


def test_the_mounted_paths_are_the_ones_the_image_reads() -> None:
    container = _container()
    assert container["args"] == ["serve", "--config", "/etc/pop3-imap-bridge/bridge.toml"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _single("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert set(mounts) == set(volumes)
    assert mounts["config"]["mountPath"] == "/etc/pop3-imap-bridge/bridge.toml"
    assert volumes["config"]["configMap"]["name"] == _single("ConfigMap")["metadata"]["name"]
    assert volumes["tls"]["secret"]["secretName"] == _single("Secret")["metadata"]["name"]
    assert _single("Secret")["type"] == "kubernetes.io/tls"
    # readOnlyRootFilesystem needs a writable /tmp (the multi-worker metrics files live there).
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volumes[next(n for n, m in mounts.items() if m["mountPath"] == "/tmp")]


def test_probes_use_the_admin_endpoints() -> None:
    container = _container()
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]


def test_pod_runs_as_the_image_user_and_not_as_root() -> None:
    pod = _single("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert f"\nUSER {pod['securityContext']['runAsUser']}:" in dockerfile
    assert _container()["securityContext"]["allowPrivilegeEscalation"] is False


def test_selectors_ports_and_targets_line_up() -> None:
    deployment = _single("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["selector"]["matchLabels"] == APP
    assert deployment["spec"]["template"]["metadata"]["labels"] == APP
    container_ports = {p["name"] for p in _container()["ports"]}
    for service in _kind("Service"):
        assert service["spec"]["selector"] == APP
        for port in service["spec"]["ports"]:
            assert port["protocol"] == "TCP"
            assert port["targetPort"] in container_ports
    exposed = {p["targetPort"] for s in _kind("Service") if s["spec"]["type"] == "LoadBalancer" for p in s["spec"]["ports"]}
    assert exposed == {"pop3", "pop3s"}  # the admin port stays inside the cluster
    assert _single("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == APP
    target = _single("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert _single("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2


def test_haproxy_example_is_accepted_by_haproxy() -> None:
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    assert haproxy, "haproxy is missing: run scripts/install-deps (Debian package haproxy)"
    config = K8S / "haproxy.cfg"
    checked = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "WARNING" not in checked.stdout + checked.stderr
    text = config.read_text()
    servers = [line.split() for line in text.splitlines() if line.strip().startswith("server ")]
    assert servers and all("send-proxy-v2" in words for words in servers)
    # Health checks go to the admin listener's /readyz, so a draining replica gets no new sessions.
    assert "http-check send meth GET uri /readyz" in text and "check port 9110" in text
    assert parse_listen_address(servers[0][2]).port == 1110
