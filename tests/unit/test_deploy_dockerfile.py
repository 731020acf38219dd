"""deploy/Dockerfile, checked without a Docker engine (none runs on these machines).

What is checked here: the instructions (official slim Python base, non-root user, exec-form
entrypoint that is our console command, HEALTHCHECK on /healthz of the admin port, exposed
ports matching the configured listeners, every COPY source present in the build context) and
that the image's environment is a valid configuration. tests/integration/test_ops_deploy.py
runs the entrypoint command and the HEALTHCHECK command outside a container. Not checked:
that the image builds and starts under Docker."""

from __future__ import annotations

import fnmatch
import json
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bridge.config import load_settings
from bridge.net.addresses import parse_listen_address

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int


def parse_dockerfile(path: Path) -> list[Instruction]:
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


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE)


def test_bases_are_official_slim_python_images(instructions: list[Instruction]) -> None:
    bases = [i.arguments.split()[0] for i in instructions if i.keyword == "FROM"]
    assert bases
    for base in bases:
        name, _, tag = base.partition(":")
        assert name == "python", base  # Docker's official image, not a third-party one
        assert "-slim" in tag and tag.startswith("3.11"), base


def test_runs_as_a_fixed_non_root_user(instructions: list[Instruction]) -> None:
    user = one(final_stage(instructions), "USER").arguments
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user
    assert gid.isdigit() and int(gid) != 0, user
    # The USER comes before the entrypoint, i.e. it is what the container runs as.
    keywords = [i.keyword for i in final_stage(instructions)]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")


def test_entrypoint_is_the_console_command_with_the_mounted_config(instructions: list[Instruction]) -> None:
    stage = final_stage(instructions)
    entrypoint = exec_form(one(stage, "ENTRYPOINT").arguments)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["pop3-imap-bridge"] and "pop3-imap-bridge" in scripts
    command = exec_form(one(stage, "CMD").arguments)
    assert command[:2] == ["serve", "--config"]
    config_in_image = command[2]
    copied = {
        shlex.split(i.arguments)[-1]: copy_sources(i)
        for i in stage
        if i.keyword == "COPY" and "--from" not in i.arguments
    }
    assert copied.get(config_in_image) == ["bridge.toml"], "the image carries the example bridge.toml"


def test_copy_sources_exist_and_pass_the_dockerignore(instructions: list[Instruction]) -> None:
    ignore = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [p for p in ignore if p and not p.startswith("#")]

    def sent_to_the_builder(path: str) -> bool:
        included = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            body = pattern[1:] if negated else pattern
            if fnmatch.fnmatch(path, body.rstrip("/")) or path.startswith(body.rstrip("/") + "/"):
                included = negated
        return included

    for instruction in instructions:
        if instruction.keyword != "COPY" or "--from" in instruction.arguments:
            continue
        for source in copy_sources(instruction):
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert sent_to_the_builder(source), f"COPY {source}: excluded by Dockerfile.dockerignore"


def test_image_environment_is_a_valid_configuration(
    instructions: list[Instruction], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = image_environment(instructions)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(REPO / "bridge.toml")
    assert settings.pop3.listen == ["0.0.0.0:1110"]
    assert settings.logging.format == "json"
    exposed = {int(port) for port in one(final_stage(instructions), "EXPOSE").arguments.split()}
    assert {address.port for address in settings.pop3.listen_addresses} <= exposed
    admin = settings.admin.listen_address
    assert admin is not None and admin.port in exposed


def test_healthcheck_asks_the_admin_listener_for_healthz(
    instructions: list[Instruction], monkeypatch: pytest.MonkeyPatch
) -> None:
    command = healthcheck_command(instructions)
    assert command[:2] == ["python", "-c"]
    url = command[2].split("'")[1]
    parts = urlsplit(url)
    admin_port = parse_listen_address(image_environment(instructions)["BRIDGE_ADMIN__LISTEN"]).port
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("http", "127.0.0.1", admin_port, "/healthz")
