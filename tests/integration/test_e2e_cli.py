"""The command line as an operator uses it: the installed `pop3-imap-bridge` script and
`python -m bridge`, run as real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    """The environment without BRIDGE_* overrides, which would change what a file means."""
    return {key: value for key, value in os.environ.items() if not key.startswith("BRIDGE_")}


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=120, cwd=cwd, env=clean_env(),
        stdin=subprocess.DEVNULL,
    )


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "bridge", "check-config", "--config", str(path))


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
