"""The shipped deployment files read the way their consumers read them, for the deploy tests.

- deploy/Dockerfile: its instructions (a small parser: no Docker engine runs the unit tests).
- deploy/kubernetes: the manifests, and the bridge a pod runs: the ConfigMap's bridge.toml
  under the environment the pod gets (the image's ENV, then the Deployment's env), with the
  Secret's certificate mounted where the Deployment mounts it. On a test machine only addresses
  change: every "0.0.0.0:PORT" becomes a free loopback port, the TLS mount a temporary directory.
- deploy/kubernetes/haproxy.cfg moved onto the same loopback ports, for a real haproxy.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.harness import SubprocessBridge, free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
HAPROXY_CONFIG = K8S / "haproxy.cfg"

# What clients send to the well-known ports a Service or HAProxy frontend exposes.
POP3, POP3S, HTTP = "pop3", "pop3s", "http"
PROTOCOL_OF_PORT = {110: POP3, 995: POP3S, 9110: HTTP}


# --- deploy/Dockerfile ------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, arguments = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, arguments.strip(), stage))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def one(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def image_environment(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.arguments):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {word!r}: use the key=value form"
                env[key] = value
    return env


def exec_form(arguments: str) -> list[str]:
    words = json.loads(arguments)
    assert isinstance(words, list) and all(isinstance(w, str) for w in words), arguments
    return words


def healthcheck_command(instructions: list[Instruction]) -> list[str]:
    arguments = one(final_stage(instructions), "HEALTHCHECK").arguments
    assert " CMD [" in f" {arguments}", "HEALTHCHECK must use CMD in exec form"
    return exec_form(arguments[arguments.index("CMD ") + 4 :])


def copy_sources(instruction: Instruction) -> list[str]:
    words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
    return words[:-1]


def image_config() -> tuple[str, Path]:
    """(the config path the image's CMD names, the repository file COPY puts there)."""
    stage = final_stage(parse_dockerfile())
    command = exec_form(one(stage, "CMD").arguments)
    in_image = command[command.index("--config") + 1]
    copied = {
        shlex.split(i.arguments)[-1]: copy_sources(i)
        for i in stage
        if i.keyword == "COPY" and "--from" not in i.arguments
    }
    sources = copied.get(in_image)
    assert sources is not None and len(sources) == 1, f"no single COPY puts a file at {in_image}"
    return in_image, REPO / sources[0]


# --- deploy/kubernetes -------------------------------------------------------------------------


def kubernetes_documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, manifest) for every manifest kustomize would apply."""
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((path.name, document))
    return found


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [document for _name, document in kubernetes_documents() if document["kind"] == kind]


def single(kind: str) -> dict[str, Any]:
    matches = of_kind(kind)
    assert len(matches) == 1, f"expected one {kind}"
    return matches[0]


def bridge_container() -> dict[str, Any]:
    containers = single("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_ports() -> dict[str, int]:
    """The Deployment's named container ports: name -> port."""
    return {port["name"]: port["containerPort"] for port in bridge_container()["ports"]}


def pod_environment() -> dict[str, str]:
    """The BRIDGE_* variables a pod's bridge sees: the image's ENV, then the Deployment's env."""
    env = {k: v for k, v in image_environment(final_stage(parse_dockerfile())).items() if k.startswith("BRIDGE_")}
    env.update({item["name"]: item["value"] for item in bridge_container().get("env", [])})
    return env


def mount_path(volume: str) -> str:
    mounts = {mount["name"]: mount["mountPath"] for mount in bridge_container()["volumeMounts"]}
    return mounts[volume]


_ANY_ADDRESS = re.compile(r"0\.0\.0\.0:(\d+)")


@dataclass
class LoopbackPod:
    """The pod's configuration moved onto this machine: ``ports`` maps each port the pod
    listens on to the free loopback port standing in for it; ``config`` is the ConfigMap's
    bridge.toml so moved; ``env`` the pod's BRIDGE_* variables so moved."""

    config: Path
    env: dict[str, str]
    ports: dict[int, int] = field(default_factory=dict)

    def move(self, text: str) -> str:
        def loopback(match: re.Match[str]) -> str:
            port = int(match.group(1))
            if port not in self.ports:
                self.ports[port] = free_port()
            return f"127.0.0.1:{self.ports[port]}"

        return _ANY_ADDRESS.sub(loopback, text)


def loopback_pod(workdir: Path, certificate: Path, key: Path) -> LoopbackPod:
    """The ConfigMap's bridge.toml and the pod's environment with the pod's listeners on free
    loopback ports, and the TLS Secret (tls.crt, tls.key) mounted in ``workdir``."""
    secret_dir = workdir / "tls"
    secret_dir.mkdir()
    shutil.copy(certificate, secret_dir / "tls.crt")
    shutil.copy(key, secret_dir / "tls.key")
    pod = LoopbackPod(workdir / "configmap-bridge.toml", {})
    text = single("ConfigMap")["data"]["bridge.toml"].replace(mount_path("tls"), str(secret_dir))
    pod.config.write_text(pod.move(text))
    pod.env = {name: pod.move(value) for name, value in pod_environment().items()}
    return pod


class PodBridge(SubprocessBridge):
    """`python -m bridge serve` with a LoopbackPod's configuration and environment, plus
    ``env`` (the BRIDGE_* overrides a Deployment would add). ``greeting_port``: a plain,
    PROXY-less listener, polled for the greeting until the bridge serves."""

    def __init__(self, workdir: Path, pod: LoopbackPod, greeting_port: int, env: Mapping[str, str]) -> None:
        super().__init__(workdir, imap_port=0, env={**pod.env, **env})
        self.config_path = pod.config
        self.port = greeting_port


# --- deploy/kubernetes/haproxy.cfg -------------------------------------------------------------


@dataclass(frozen=True)
class HaproxyRoute:
    """One frontend: the port it binds, and for each server of its default backend the port
    traffic goes to and whether a PROXY v2 header goes first."""

    frontend: str
    bind_port: int
    servers: list[tuple[int, bool]]


def haproxy_routes(text: str) -> list[HaproxyRoute]:
    sections: dict[tuple[str, str], list[list[str]]] = {}
    current: tuple[str, str] | None = None
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] in ("global", "defaults", "frontend", "backend", "listen"):
            current = (words[0], words[1] if len(words) > 1 else "")
            sections[current] = []
        elif current is not None:
            sections[current].append(words)
    routes = []
    for (kind, name), lines in sections.items():
        if kind != "frontend":
            continue
        binds = [words[1] for words in lines if words[0] == "bind"]
        backend = next(words[1] for words in lines if words[0] == "default_backend")
        servers = [
            (int(words[2].rsplit(":", 1)[1]), "send-proxy-v2" in words[3:])
            for words in sections[("backend", backend)]
            if words[0] == "server"
        ]
        assert len(binds) == 1 and servers, f"frontend {name}: one bind and a backend with servers"
        routes.append(HaproxyRoute(name, int(binds[0].rsplit(":", 1)[1]), servers))
    return routes


def loopback_haproxy_config(text: str, pod: LoopbackPod, frontends: Mapping[int, int]) -> str:
    """haproxy.cfg with its frontends bound to ``frontends`` (bind port -> loopback port) and
    every server (and health-check port) moved to the pod's loopback port. Nothing else
    changes; a port no listener of the pod stands in for is an error."""

    def pod_port(port: str) -> str:
        assert int(port) in pod.ports, f"haproxy.cfg sends to port {port}, on which the pod does not listen"
        return str(pod.ports[int(port)])

    lines = []
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["bind"]:
            port = int(words[1].rsplit(":", 1)[1])
            line = line.replace(words[1], f"127.0.0.1:{frontends[port]}", 1)
        elif words[:1] == ["server"]:
            line = line.replace(words[2], f"127.0.0.1:{pod_port(words[2].rsplit(':', 1)[1])}", 1)
        line = re.sub(r"\bcheck port (\d+)", lambda m: f"check port {pod_port(m.group(1))}", line)
        lines.append(line)
    return "\n".join(lines) + "\n"


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    assert found, "haproxy is missing: run scripts/install-deps (Debian package haproxy)"
    return found


class Haproxy:
    """A real haproxy in the foreground (-db) on a config file; stopped by its pid."""

    def __init__(self, config: Path, log: Path, maxconn: int) -> None:
        self.config, self.log_path = config, log
        # -n caps maxconn below this machine's file limit (haproxy needs two descriptors per
        # connection and refuses to start otherwise); the file itself stays as shipped.
        self.command = [haproxy_binary(), "-db", "-n", str(maxconn), "-f", str(config)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: Callable[[], bool]) -> Haproxy:
        """Start it, and wait until ``ready()`` (e.g. a client through it got a greeting)."""
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)

        def serving() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"haproxy exited ({self.process.returncode}): {self.log_path.read_text()}")
            return ready()

        wait_until(serving, "haproxy to pass a session to the bridge", timeout=60)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
