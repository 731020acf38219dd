"""deploy/kubernetes, checked offline: no cluster runs on these machines.

Every manifest is validated against the Kubernetes OpenAPI schemas bundled in the
`kubernetes-validate` package (strict: unknown fields are errors; no network needed), the
pieces are checked to refer to each other correctly (selectors, named ports, probes, volumes),
the ConfigMap's bridge.toml is loaded by the bridge's own config loader, and HAProxy's own
parser checks haproxy.cfg (`haproxy -c`, Debian's haproxy package, installed by
scripts/install-deps). The ConfigMap is loaded as a pod loads it: under the image's and the
Deployment's environment, with the TLS Secret mounted. Real traffic through every Service port
and through a real HAProxy: tests/integration/test_deploy_set.py. Not checked: applying them to
a cluster."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bridge.cli import main
from bridge.config import load_settings
from bridge.net.addresses import parse_listen_address
from tests.deploy_support import (
    DOCKERFILE,
    K8S,
    bridge_container,
    container_ports,
    haproxy_binary,
    kubernetes_documents,
    mount_path,
    of_kind,
    pod_environment,
    single,
)
from tests.security_support import TlsFiles

# The oldest Kubernetes release still in common managed offerings that we claim to support.
KUBERNETES_VERSION = "1.29"
APP = {"app.kubernetes.io/name": "pop3-imap-bridge"}
DOCUMENTS = kubernetes_documents()


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


def _pod_config(workdir: Path, monkeypatch: pytest.MonkeyPatch, certificate: bytes, key: bytes) -> Path:
    """The ConfigMap's bridge.toml as a pod reads it: the pod's BRIDGE_* environment set, the
    TLS Secret's files (``certificate``, ``key``) where the Deployment mounts them."""
    for name, value in pod_environment().items():
        monkeypatch.setenv(name, value)
    secret = workdir / "tls"
    secret.mkdir()
    (secret / "tls.crt").write_bytes(certificate)
    (secret / "tls.key").write_bytes(key)
    config = workdir / "bridge.toml"
    config.write_text(single("ConfigMap")["data"]["bridge.toml"].replace(mount_path("tls"), str(secret)))
    return config


def test_configmap_is_a_valid_bridge_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tls_files: TlsFiles
) -> None:
    config = _pod_config(tmp_path, monkeypatch, Path(tls_files.cert).read_bytes(), Path(tls_files.key).read_bytes())
    settings = load_settings(config)

    ports = container_ports()
    pop3 = settings.pop3
    plain = {parse_listen_address(a).port for a in pop3.listen}
    implicit_tls = {parse_listen_address(a).port for a in pop3.tls_listen}
    proxied = {parse_listen_address(a).port for a in pop3.proxy_protocol}
    assert plain == {ports["pop3"], ports["pop3-proxy"]}
    assert implicit_tls == {ports["pop3s"], ports["pop3s-proxy"]}
    assert proxied == {ports["pop3-proxy"], ports["pop3s-proxy"]}
    # Passwords over TLS only: STLS on the plain listeners, plain-text logins from loopback only.
    assert pop3.stls and pop3.allow_plaintext_auth == "loopback"
    admin = settings.admin.listen_address
    assert admin is not None and admin.port == ports["admin"]
    assert set(ports.values()) == plain | implicit_tls | {admin.port}  # no port without a listener
    assert all(a.host == "0.0.0.0" for a in [*pop3.listen_addresses, admin])
    assert settings.logging.format == "json"
    # Kubernetes sends SIGKILL after terminationGracePeriodSeconds, counted from the preStop.
    pod = single("Deployment")["spec"]["template"]["spec"]
    pre_stop = int(bridge_container()["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pop3.shutdown_grace_seconds + pre_stop < pod["terminationGracePeriodSeconds"]


def test_the_shipped_empty_secret_stops_the_bridge_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As shipped the Secret is empty: the bridge must refuse to start, naming the file, rather
    than serve logins it would have to refuse (no TLS) or nothing at all on the POP3S port.
    check-config loads the configuration exactly as `serve` does at start-up (bridge/cli.py)."""
    data = single("Secret")["data"]
    config = _pod_config(
        tmp_path, monkeypatch, base64.b64decode(data["tls.crt"]), base64.b64decode(data["tls.key"])
    )
    with pytest.raises(SystemExit) as exited:
        main(["check-config", "--config", str(config)])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "bad configuration" in error and "pop3.tls_key" in error and "tls.crt" in error, error


def test_the_mounted_paths_are_the_ones_the_image_reads() -> None:
    container = bridge_container()
    assert container["args"] == ["serve", "--config", "/etc/pop3-imap-bridge/bridge.toml"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in single("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert set(mounts) == set(volumes)
    assert mounts["config"]["mountPath"] == "/etc/pop3-imap-bridge/bridge.toml"
    assert volumes["config"]["configMap"]["name"] == single("ConfigMap")["metadata"]["name"]
    assert volumes["tls"]["secret"]["secretName"] == single("Secret")["metadata"]["name"]
    assert single("Secret")["type"] == "kubernetes.io/tls"
    # readOnlyRootFilesystem needs a writable /tmp (the multi-worker metrics files live there).
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volumes[next(n for n, m in mounts.items() if m["mountPath"] == "/tmp")]


def test_probes_use_the_admin_endpoints() -> None:
    container = bridge_container()
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]


def test_pod_runs_as_the_image_user_and_not_as_root() -> None:
    pod = single("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile = DOCKERFILE.read_text()
    assert f"\nUSER {pod['securityContext']['runAsUser']}:" in dockerfile
    assert bridge_container()["securityContext"]["allowPrivilegeEscalation"] is False


def test_selectors_ports_and_targets_line_up() -> None:
    deployment = single("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["selector"]["matchLabels"] == APP
    assert deployment["spec"]["template"]["metadata"]["labels"] == APP
    container_ports = {p["name"] for p in bridge_container()["ports"]}
    for service in of_kind("Service"):
        assert service["spec"]["selector"] == APP
        for port in service["spec"]["ports"]:
            assert port["protocol"] == "TCP"
            assert port["targetPort"] in container_ports
    exposed = {p["targetPort"] for s in of_kind("Service") if s["spec"]["type"] == "LoadBalancer" for p in s["spec"]["ports"]}
    assert exposed == {"pop3", "pop3s"}  # the admin port stays inside the cluster
    assert single("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == APP
    target = single("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert single("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2


def test_haproxy_example_is_accepted_by_haproxy() -> None:
    config = K8S / "haproxy.cfg"
    checked = subprocess.run([haproxy_binary(), "-c", "-f", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "WARNING" not in checked.stdout + checked.stderr
    text = config.read_text()
    servers = [line.split() for line in text.splitlines() if line.strip().startswith("server ")]
    assert servers and all("send-proxy-v2" in words for words in servers)
    # Health checks go to the admin listener's /readyz, so a draining replica gets no new sessions.
    assert "http-check send meth GET uri /readyz" in text and "check port 9110" in text
    # Only to the pods' PROXY listeners (tests/integration/test_deploy_set.py sends real traffic).
    ports = container_ports()
    assert {parse_listen_address(words[2]).port for words in servers} == {ports["pop3-proxy"], ports["pop3s-proxy"]}
