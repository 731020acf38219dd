"""deploy/systemd: systemd's own checker accepts the unit, and its sandboxing scores well.

The unit names /opt/pop3-imap-bridge/bin/pop3-imap-bridge, which `systemd-analyze verify`
requires to exist; the test checks a copy pointing at this checkout's console script instead.
Not checked: starting it under a running systemd (no init system runs in these containers)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "pop3-imap-bridge.service"
INSTALLED = "/opt/pop3-imap-bridge/bin/pop3-imap-bridge"


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    console_script = Path(sys.executable).with_name("pop3-imap-bridge")
    assert console_script.exists(), "install the project (scripts/install-deps)"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(console_script)))
    return unit


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: run scripts/install-deps (Debian package systemd)"
    return tool


def test_systemd_accepts_the_unit(local_unit: Path) -> None:
    checked = subprocess.run([_analyze(), "verify", str(local_unit)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.strip() == "", checked.stderr  # no unknown keys, no warnings


def test_systemd_rejects_a_broken_unit(tmp_path: Path, local_unit: Path) -> None:
    broken = tmp_path / "broken" / UNIT.name
    broken.parent.mkdir()
    broken.write_text(local_unit.read_text().replace("ExecStart=", "ExecStart=/nonexistent/program ", 1))
    checked = subprocess.run([_analyze(), "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert checked.returncode != 0 or checked.stderr.strip()


def test_sandboxing_exposure_is_low(local_unit: Path) -> None:
    # systemd's exposure score, 0 (locked down) .. 10 (unprotected); --threshold is in tenths.
    checked = subprocess.run(
        [_analyze(), "security", "--offline=yes", "--threshold=20", "--no-pager", str(local_unit)],
        capture_output=True, text=True, timeout=60,
    )
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr


def test_unit_runs_the_console_command_unprivileged() -> None:
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} serve --config /etc/pop3-imap-bridge/bridge.toml" in text
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "DynamicUser=yes" in text and "NoNewPrivileges=yes" in text
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in text
