"""The deployment artefacts' commands, run for real outside containers (scripts/check-image, a
CI step, builds the images with podman and runs them).

- deploy/Dockerfile: ENTRYPOINT + CMD with the image's environment serve POP3, the
  HEALTHCHECK command succeeds against it, and STOPSIGNAL ends it with status 0.
- deploy/docker-compose.yml: the upstream service's command (deploy/compose/demo_upstream.py)
  brings up a seeded Dovecot, and the bridge with the compose environment serves its mail.
- deploy/systemd: the unit's ExecStartPre check succeeds.
Only addresses are changed (loopback and free ports instead of 0.0.0.0 and fixed ports)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bridge.config import load_settings
from sandbox import Mailbox, demo_messages, numbered_messages
from tests.deploy_support import (
    exec_form,
    final_stage,
    healthcheck_command,
    image_config,
    image_environment,
    one,
    parse_dockerfile,
)
from tests.harness import RawPop3, free_port
from tests.integration.ops_support import wait_for

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent  # the console scripts of this checkout's environment


def _greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            return sock.recv(100).startswith(b"+OK")
    except OSError:
        return False


class _Processes:
    """Processes a test starts; all are stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


@pytest.fixture
def processes() -> Iterator[_Processes]:
    started = _Processes()
    try:
        yield started
    finally:
        started.stop_all()


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _image_command() -> tuple[list[str], dict[str, str], Path]:
    """ENTRYPOINT + CMD with the config path mapped from the image to the repository file
    the Dockerfile copies there; the image's ENV; that file."""
    stage = final_stage(parse_dockerfile(DEPLOY / "Dockerfile"))
    command = exec_form(one(stage, "ENTRYPOINT").arguments) + exec_form(one(stage, "CMD").arguments)
    in_image, source = image_config()
    assert command[command.index("--config") + 1] == in_image
    command[command.index("--config") + 1] = str(source)
    return command, image_environment(stage), source


def test_image_entrypoint_serves_and_its_healthcheck_passes(
    mailbox: Mailbox, tmp_path: Path, processes: _Processes
) -> None:
    mailbox.append(numbered_messages(2))
    command, image_env, image_config_file = _image_command()
    pop3_port, admin_port = free_port(), free_port()
    env = {
        **_base_env(),
        **image_env,
        # What `docker run -e ...` would add; addresses on loopback instead of 0.0.0.0.
        "BRIDGE_POP3__LISTEN": json.dumps([f"127.0.0.1:{pop3_port}"]),
        "BRIDGE_ADMIN__LISTEN": f"127.0.0.1:{admin_port}",
        "BRIDGE_UPSTREAM__HOST": "127.0.0.1",
        "BRIDGE_UPSTREAM__PORT": str(mailbox.imap_port),
        "BRIDGE_UPSTREAM__TLS": "none",
    }
    bridge = processes.start(command, env, tmp_path / "bridge.log")
    wait_for(lambda: bridge.poll() is not None or _greets(pop3_port), "the image's command to serve POP3")
    assert bridge.poll() is None, (tmp_path / "bridge.log").read_text()

    health = healthcheck_command(parse_dockerfile(DEPLOY / "Dockerfile"))
    image_admin = load_settings(image_config_file).admin.listen_address
    assert image_admin is not None
    image_admin_port = image_admin.port
    health = [part.replace(f":{image_admin_port}/", f":{admin_port}/") for part in health]
    assert subprocess.run(health, env=env, timeout=60).returncode == 0
    # ...and it does fail where nothing answers.
    nothing = [part.replace(f":{admin_port}/", f":{free_port()}/") for part in health]
    assert subprocess.run(nothing, env=env, capture_output=True, timeout=60).returncode != 0

    with RawPop3("127.0.0.1", pop3_port) as client:
        client.login(mailbox.user, mailbox.password)
        assert client.command(b"STAT").startswith(b"+OK 2 ")
        assert client.command(b"QUIT").startswith(b"+OK")

    stop = one(final_stage(parse_dockerfile(DEPLOY / "Dockerfile")), "STOPSIGNAL").arguments
    bridge.send_signal(signal.Signals[stop])
    assert bridge.wait(60) == 0
    log = [json.loads(line) for line in (tmp_path / "bridge.log").read_text().splitlines() if line.startswith("{")]
    assert log, "the image's configuration selects JSON logs"


def test_compose_upstream_and_bridge_commands_work_together(tmp_path: Path, processes: _Processes) -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    upstream_service, bridge_service = compose["services"]["upstream"], compose["services"]["bridge"]
    imap_port, pop3_port, admin_port = free_port(), free_port(), free_port()
    # Not tmp_path: as root its base is mode 0700, which Dovecot's mail user cannot enter.
    workdir = Path(tempfile.mkdtemp(prefix="bridge-compose-"))
    try:
        upstream_env = {
            **_base_env(),
            **{k: str(v) for k, v in upstream_service["environment"].items()},
            "DEMO_IMAP_PORT": str(imap_port),
            "DEMO_POP3_PORT": str(free_port()),
            "DEMO_WORKDIR": str(workdir),
            # The image puts the sandbox package on PYTHONPATH the same way.
            "PYTHONPATH": str(REPO),
        }
        upstream_log = tmp_path / "upstream.log"
        upstream = processes.start(
            [sys.executable, str(DEPLOY / "compose" / "demo_upstream.py")], upstream_env, upstream_log
        )
        ready = wait_for(
            lambda: upstream.poll() is not None or "demo_upstream_ready" in upstream_log.read_text(),
            "the demo upstream to be seeded",
            timeout=120,
        )
        assert ready and upstream.poll() is None, upstream_log.read_text()

        # The compose healthcheck of the upstream, pointed at this run's port.
        health = [p.replace(", 143)", f", {imap_port})") for p in upstream_service["healthcheck"]["test"][1:]]
        assert subprocess.run(health, env=upstream_env, timeout=60).returncode == 0

        command, image_env, _ = _image_command()
        # The compose file mounts a bridge.toml over the image's: the bridge reads that one.
        in_image = image_config()[0]
        for volume in bridge_service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if target == in_image:
                command[command.index("--config") + 1] = str((DEPLOY / source).resolve())
        bridge_env = {
            **_base_env(),
            **image_env,
            **{k: str(v) for k, v in bridge_service["environment"].items()},
            "BRIDGE_POP3__LISTEN": json.dumps([f"127.0.0.1:{pop3_port}"]),
            "BRIDGE_ADMIN__LISTEN": f"127.0.0.1:{admin_port}",
            "BRIDGE_UPSTREAM__PORT": str(imap_port),
        }
        bridge = processes.start(command, bridge_env, tmp_path / "bridge.log")
        wait_for(lambda: bridge.poll() is not None or _greets(pop3_port), "the bridge to serve POP3")
        assert bridge.poll() is None, (tmp_path / "bridge.log").read_text()

        user = upstream_service["environment"]["DEMO_USER"]
        password = upstream_service["environment"]["DEMO_PASSWORD"]
        with RawPop3("127.0.0.1", pop3_port) as client:
            client.login(user, password)
            assert client.command(b"STAT").startswith(b"+OK %d " % len(demo_messages()))
            assert client.command(b"QUIT").startswith(b"+OK")

        bridge.send_signal(signal.SIGTERM)
        assert bridge.wait(60) == 0
        upstream.send_signal(signal.SIGTERM)
        assert upstream.wait(60) == 0
        assert "demo_upstream_stopping" in upstream_log.read_text()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", imap_port), timeout=5).close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_systemd_exec_start_pre_accepts_the_example_config() -> None:
    unit = (DEPLOY / "systemd" / "pop3-imap-bridge.service").read_text()
    line = next(line for line in unit.splitlines() if line.startswith("ExecStartPre="))
    command = line.removeprefix("ExecStartPre=").split()
    command[0] = str(BIN / Path(command[0]).name)
    command[command.index("--config") + 1] = str(REPO / "bridge.toml")
    checked = subprocess.run(command, env=_base_env(), capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "configuration is valid" in checked.stdout
