"""The command line as an operator uses it: the installed `pop3-imap-bridge` script and
`python -m bridge`, run as real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.config import load_settings

REPO = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    """The environment without BRIDGE_* overrides, which would change what a file means."""
    return {key: value for key, value in os.environ.items() if not key.startswith("BRIDGE_")}


def run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=120, cwd=cwd, env={**clean_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "bridge", "check-config", "--config", str(path), env=env)


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        pytest.param("[upstream]\nfetch_chunk = 10\n", "upstream.fetch_chunk", "4096", id="below-minimum"),
        pytest.param("[upstream]\nport = \"imap\"\n", "upstream.port", "integer", id="wrong-type"),
        pytest.param("[pop3]\nlisten_port = 110\n", "pop3.listen_port", "unknown key", id="misspelt-key"),
        pytest.param("[pop3]\nlisten = [\"nohost\"]\n", "pop3.listen", "host:port", id="bad-address"),
        pytest.param("[pop3]\nautologout_seconds = 60\n", "pop3.autologout_seconds", "600", id="rfc-minimum"),
        pytest.param("[logging]\nlevel = \"loud\"\n", "logging.level", "debug", id="not-a-choice"),
    ],
)
def test_check_config_rejects_a_bad_file_naming_key_and_reason(
    tmp_path: Path, toml: str, key: str, reason: str
) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(toml)
    result = check_config(config)
    assert result.returncode != 0, result.stdout
    assert key in result.stderr, result.stderr
    assert reason in result.stderr, result.stderr


def test_check_config_rejects_broken_toml_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[upstream\nport = 143\n")
    result = check_config(broken)
    assert result.returncode != 0
    assert "TOML" in result.stderr, result.stderr

    missing = tmp_path / "missing.toml"
    result = check_config(missing)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "no such file" in result.stderr, result.stderr


def test_check_config_accepts_the_documented_example() -> None:
    result = check_config(REPO / "bridge.toml")
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    # It prints the effective settings, among them the example's values.
    assert "fetch_chunk = 1048576" in result.stdout, result.stdout


def test_check_config_accepts_a_small_valid_file(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[upstream]\nhost = "imap.example.net"\nport = 1143\nfetch_chunk = 65536\n')
    result = check_config(config)
    assert result.returncode == 0, result.stderr
    assert "imap.example.net" in result.stdout and "65536" in result.stdout


def test_installed_script_help() -> None:
    script = shutil.which("pop3-imap-bridge", path=str(Path(sys.executable).parent))
    assert script is not None, f"pop3-imap-bridge is not installed next to {sys.executable}"
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    for command in ("serve", "check-config"):
        assert command in result.stdout, result.stdout
    result = run(script, "check-config", "--help")
    assert result.returncode == 0 and "--config" in result.stdout


def test_check_config_prints_toml_that_reads_back_to_the_same_settings(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        '[upstream]\nhost = "imap.example.net"\nverify = false\n'
        '[delete.accounts."alice@example.com"]\npolicy = "keep"\n'
    )
    result = check_config(config, env={"BRIDGE_POOL__PARK_SECONDS": "60"})
    assert result.returncode == 0, result.stderr
    printed = tmp_path / "printed.toml"
    printed.write_text(result.stdout)
    # TOML booleans (not Python's True), every key, and the environment's value included:
    # pasted back as a file (without the environment), it is the same configuration.
    assert "verify = false" in result.stdout, result.stdout
    assert load_settings(printed) == load_settings(config).model_copy(
        update={"pool": load_settings(config).pool.model_copy(update={"park_seconds": 60.0})}
    )
    assert "Environment overrides applied: BRIDGE_POOL__PARK_SECONDS." in result.stdout


def test_check_config_says_when_no_environment_override_is_set(tmp_path: Path) -> None:
    result = check_config(REPO / "bridge.toml")
    assert result.returncode == 0, result.stderr
    assert "No BRIDGE_* environment variables are set." in result.stdout
    assert "overrides applied" not in result.stdout


def test_a_misspelt_environment_variable_is_an_error(tmp_path: Path) -> None:
    result = check_config(REPO / "bridge.toml", env={"BRIDGE_UPSTREM__PORT": "993"})
    assert result.returncode == 2, result.stdout
    assert "BRIDGE_UPSTREM__PORT names no setting" in result.stderr, result.stderr
    assert "did you mean BRIDGE_UPSTREAM__PORT?" in result.stderr, result.stderr

    result = check_config(REPO / "bridge.toml", env={"BRIDGE_UPSTREAM__PROT": "993"})
    assert result.returncode == 2 and "BRIDGE_UPSTREAM__PROT names no setting" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("env", "source"),
    [
        pytest.param({}, "from {config}", id="from-the-file"),
        pytest.param({"BRIDGE_UPSTREAM__PORT": "70000"}, "from environment variable BRIDGE_UPSTREAM__PORT", id="from-env"),
    ],
)
def test_a_bad_value_is_shown_with_where_it_came_from(tmp_path: Path, env: dict[str, str], source: str) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text("[upstream]\nport = 70000\n")
    result = check_config(config, env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines()[1].startswith("upstream.port: "), result.stderr
    assert "got 70000" in result.stderr or "got '70000'" in result.stderr, result.stderr
    assert source.format(config=config) in result.stderr, result.stderr


def test_a_bad_secret_value_is_not_shown(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[upstream]\nhost = "x"\n')
    result = check_config(config, env={"BRIDGE_DELETE__ACCOUNTS": '{"a" = {"password" = "hunter2"}}'})
    assert result.returncode == 2
    assert "hunter2" not in result.stderr, result.stderr
    assert "delete.accounts.a.password: unknown key" in result.stderr, result.stderr
