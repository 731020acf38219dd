"""`pop3-imap-bridge probe` against real servers: Dovecot (plain and over TLS), Cyrus, and
Dovecot with capabilities hidden (`upstream.ignore_capabilities`), as an operator runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from sandbox import DovecotSandbox
from sandbox.cyrus import CyrusSandbox
from tests.harness import TEST_STATE_KEY, free_port
from tests.security_support import TlsFiles


def probe(tmp_path: Path, config: str, *args: str, password: str | None = None) -> tuple[int, dict[str, Any], str]:
    path = tmp_path / "bridge.toml"
    path.write_text(config)
    extra = list(args)
    if password is not None:
        (tmp_path / "password").write_text(password + "\n")
        extra += ["--password-file", str(tmp_path / "password")]
    command = [sys.executable, "-m", "bridge", "probe", "--config", str(path), *extra]
    env = {"PATH": "/usr/bin:/bin", "BRIDGE_DELETE__STATE_KEY": TEST_STATE_KEY}
    result = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120, env=env)
    text = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert text.returncode == result.returncode, text.stderr
    return result.returncode, json.loads(result.stdout) if result.stdout else {}, text.stdout + text.stderr


def features(report: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["status"] for item in report["features"]}


def verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {policy: item["verdict"] for policy, item in report["policies"].items()}


def test_probe_dovecot_with_an_account(dovecot: DovecotSandbox, tmp_path: Path) -> None:
    box = dovecot.new_mailbox()
    box.append([b"Subject: one\r\n\r\none\r\n"])
    config = f'[upstream]\nhost = "127.0.0.1"\nport = {dovecot.imap_port}\ntls = "none"\n'
    status, report, text = probe(tmp_path, config, "--account", box.user, password=box.password)
    assert status == 0, text
    assert report["login"] == {"user": box.user, "result": "ok"}
    assert report["maildrop"]["messages"] == 1
    assert {"UIDPLUS", "MOVE", "IDLE", "QRESYNC", "LITERAL+"} <= set(report["capabilities"])
    assert features(report) == {
        "UIDPLUS": "offered", "MOVE": "offered", "IDLE": "offered", "CONDSTORE/QRESYNC": "offered",
        "LITERAL+": "offered", "SASL-IR": "offered", "OBJECTID": "absent",
    }
    assert verdicts(report) == {"expunge": "yes", "move": "yes", "keep": "yes", "per-client": "yes"}
    uidl = {name: verdict["verdict"] for name, verdict in report["uidl_formats"].items()}
    # Dovecot 2.3 has no OBJECTID: every format but "emailid".
    assert uidl == {"dovecot": "yes", "uw": "yes", "cyrus": "yes", "custom": "yes", "emailid": "no", "x-uidl": "yes"}
    assert report["login_mechanisms"] == ["LOGIN", "PLAIN"]
    assert "verdict: the policy in force (expunge) can be served" in text

    # Without an account: what the server says before login (Dovecot lists UIDPLUS only after).
    status, report, _text = probe(tmp_path, config)
    assert status == 0
    assert report["login"]["result"] == "not tried"
    assert verdicts(report)["expunge"] == "unknown"
    assert features(report)["UIDPLUS"] == "not advertised before login"


def test_probe_with_capabilities_hidden(dovecot: DovecotSandbox, tmp_path: Path) -> None:
    box = dovecot.new_mailbox()
    base = f'[upstream]\nhost = "127.0.0.1"\nport = {dovecot.imap_port}\ntls = "none"\n'
    # MOVE hidden: the move policy falls back to COPY + UID EXPUNGE, as good.
    status, report, _ = probe(
        tmp_path, base + 'ignore_capabilities = ["MOVE", "SASL-IR"]\n[delete]\npolicy = "move"\n',
        "--account", box.user, password=box.password,
    )
    assert status == 0
    assert features(report)["MOVE"] == "ignored" and features(report)["SASL-IR"] == "ignored"
    assert report["policies"]["move"]["verdict"] == "fallback"
    # UIDPLUS hidden too: expunge cannot delete exactly what was marked: exit status 1.
    status, report, text = probe(
        tmp_path, base + 'ignore_capabilities = ["UIDPLUS", "MOVE"]\n', "--account", box.user, password=box.password,
    )
    assert status == 1
    assert verdicts(report) == {"expunge": "degraded", "move": "degraded", "keep": "yes", "per-client": "yes"}
    assert "verdict: the policy in force (expunge) CANNOT be served" in text
    assert "ignored (upstream.ignore_capabilities): MOVE UIDPLUS" in text


def test_probe_cyrus_through_its_route(cyrus: CyrusSandbox, tmp_path: Path) -> None:
    box = cyrus.new_mailbox()
    config = (
        f'[upstream]\nhost = "127.0.0.1"\nport = {free_port()}\ntls = "none"\n'
        f'[[routes]]\nname = "cyrus"\nmatch = "*@cyrus.example"\nport = {cyrus.imap_port}\nlogin = "{{local}}"\n'
    )
    status, report, text = probe(tmp_path, config, "--account", f"{box.user}@cyrus.example", password=box.password)
    assert status == 0, text
    assert report["backend"] == "cyrus" and report["login"] == {"user": box.user, "result": "ok"}
    assert features(report)["OBJECTID"] == "offered"
    assert verdicts(report)["expunge"] == "yes"
    assert report["uidl_formats"]["emailid"]["verdict"] == "yes"
    # --route probes one back end without an account.
    status, report, _ = probe(tmp_path, config, "--route", "cyrus")
    assert status == 0 and report["server"] == f"127.0.0.1:{cyrus.imap_port}"


def test_probe_shows_tls_and_the_certificate(tls_dovecot: DovecotSandbox, tls_files: TlsFiles, tmp_path: Path) -> None:
    box = tls_dovecot.new_mailbox()
    config = (
        f'[upstream]\nhost = "127.0.0.1"\nport = {tls_dovecot.imaps_port}\ntls = "implicit"\n'
        f'ca_file = "{tls_files.ca_file}"\n'
    )
    status, report, text = probe(tmp_path, config, "--account", box.user, password=box.password)
    assert status == 0, text
    tls = report["tls"]
    assert tls["version"] in ("TLSv1.2", "TLSv1.3") and tls["verified"] is True
    assert "127.0.0.1" in tls["names"]
    assert "certificate verified" in text
    # A CA that did not sign it: the probe says why and the exit status says it cannot serve.
    config = config.replace(tls_files.ca_file, tls_files.other_ca_file)
    status, report, _ = probe(tmp_path, config, "--account", box.user, password=box.password)
    assert status == 1
    assert "certificate verification failed" in report["problems"][0]
    assert set(verdicts(report).values()) == {"no"}


def test_probe_failures_are_clear(dovecot: DovecotSandbox, tmp_path: Path) -> None:
    box = dovecot.new_mailbox()
    config = f'[upstream]\nhost = "127.0.0.1"\nport = {dovecot.imap_port}\ntls = "none"\n'
    status, report, _ = probe(tmp_path, config, "--account", box.user, password="wrong")
    assert status == 1 and report["login"]["result"] == "refused"
    status, report, _ = probe(tmp_path, config, "--host", "127.0.0.1", "--port", str(free_port()))
    assert status == 1 and "refused" in report["problems"][0]
    status, _report, text = probe(tmp_path, config, "--route", "nowhere")
    assert status == 2 and "no route 'nowhere' (there are: default)" in text
