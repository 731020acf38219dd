"""deploy/Dockerfile, checked without a Docker engine (none runs on these machines).

What is checked here: the instructions (official slim Python base, non-root user, exec-form
entrypoint that is our console command, HEALTHCHECK on /healthz of the admin port, exposed
ports matching the configured listeners, every COPY source present in the build context) and
that the image's configuration is valid and sets no variable that would override a mounted one.
tests/integration/test_ops_deploy.py runs the entrypoint command and the HEALTHCHECK command
outside a container; scripts/check-image (a CI step) builds the image with podman and runs it."""

from __future__ import annotations

import fnmatch
import tomllib
from urllib.parse import urlsplit

import pytest

from bridge.config import load_settings
from tests.deploy_support import (
    DOCKERFILE,
    REPO,
    Instruction,
    copy_sources,
    exec_form,
    final_stage,
    healthcheck_command,
    image_config,
    image_environment,
    one,
    parse_dockerfile,
)


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
    in_image, source = image_config()
    assert in_image == command[2] and source == REPO / "deploy" / "container-bridge.toml"


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


def test_the_image_sets_no_bridge_variable(instructions: list[Instruction]) -> None:
    # A BRIDGE_* variable in the image would silently override the same key of a bridge.toml
    # mounted over the image's (the Kubernetes ConfigMap's extra PROXY listeners, say).
    assert [key for key in image_environment(instructions) if key.upper().startswith("BRIDGE_")] == []


def test_image_configuration_is_valid_and_matches_the_exposed_ports(instructions: list[Instruction]) -> None:
    settings = load_settings(image_config()[1])
    assert settings.pop3.listen == ["0.0.0.0:1110"]
    assert settings.logging.format == "json"
    exposed = {int(port) for port in one(final_stage(instructions), "EXPOSE").arguments.split()}
    assert {address.port for address in settings.pop3.listen_addresses} <= exposed
    admin = settings.admin.listen_address
    assert admin is not None and admin.port in exposed
    # Everything else is the documented default.
    defaults = load_settings(REPO / "bridge.toml").model_dump()
    changed = {
        f"{section}.{key}"
        for section, values in settings.model_dump().items()
        for key, value in values.items()
        if defaults[section][key] != value
    }
    assert changed == {"pop3.listen", "admin.listen", "logging.format"}


def test_healthcheck_asks_the_admin_listener_for_healthz(instructions: list[Instruction]) -> None:
    command = healthcheck_command(instructions)
    assert command[:2] == ["python", "-c"]
    url = command[2].split("'")[1]
    parts = urlsplit(url)
    admin = load_settings(image_config()[1]).admin.listen_address
    assert admin is not None
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("http", "127.0.0.1", admin.port, "/healthz")
