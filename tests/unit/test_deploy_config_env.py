"""Configuration for deployments: every key from the environment (BRIDGE_<SECTION>__<KEY>,
lists and tables as JSON or TOML), `check-config` printing the effective configuration with
secrets masked, and what a SIGHUP reload may change live."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.config import BridgeSettings, ConfigError, load_settings
from bridge.ops.reload import changed_keys, plan_reload
from bridge.ops.secrets import MASK, mask_secrets

REPO = Path(__file__).resolve().parents[2]


def _every_key() -> list[tuple[str, str]]:
    return [(section, key) for section, values in load_settings(None).model_dump().items() for key in values]


def test_every_key_has_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings(None).model_dump()
    for section, key in _every_key():
        value = defaults[section][key]
        text = value if isinstance(value, str) else json.dumps(value)
        monkeypatch.setenv(f"BRIDGE_{section.upper()}__{key.upper()}", text)
    # The environment source itself reports a value for every key: none is left unmapped.
    environment_source = BridgeSettings.settings_customise_sources(BridgeSettings, None, None, None, None)[0]  # type: ignore[arg-type]
    found = environment_source()
    assert sorted((s, k) for s, values in found.items() for k in values) == sorted(_every_key())
    assert load_settings(REPO / "bridge.toml").model_dump() == defaults


@pytest.mark.parametrize(
    ("variable", "text", "section", "key", "expected"),
    [
        ("BRIDGE_UPSTREAM__PORT", "1143", "upstream", "port", 1143),
        ("BRIDGE_UPSTREAM__HOST", "imap.example.net", "upstream", "host", "imap.example.net"),
        ("BRIDGE_POP3__LISTEN", '["127.0.0.1:110", "[::1]:110"]', "pop3", "listen", ["127.0.0.1:110", "[::1]:110"]),
        ("BRIDGE_POP3__LISTEN", "['127.0.0.1:110']", "pop3", "listen", ["127.0.0.1:110"]),  # TOML literal strings
        ("BRIDGE_UPSTREAM__IGNORE_CAPABILITIES", '["MOVE", "UIDPLUS"]', "upstream", "ignore_capabilities", ["MOVE", "UIDPLUS"]),
        ("BRIDGE_DELETE__LOGINS", '{"printer": "alice@example.com#printer"}', "delete", "logins",
         {"printer": "alice@example.com#printer"}),
        ("BRIDGE_DELETE__LOGINS", '{ printer = "alice@example.com#printer" }', "delete", "logins",
         {"printer": "alice@example.com#printer"}),  # a TOML inline table
        ("BRIDGE_POP3__SHUTDOWN_GRACE_SECONDS", "5", "pop3", "shutdown_grace_seconds", 5.0),
        ("BRIDGE_ADMIN__LISTEN", "127.0.0.1:9110", "admin", "listen", "127.0.0.1:9110"),
        ("BRIDGE_SERVER__WORKERS", "4", "server", "workers", 4),
    ],
)
def test_environment_overrides_the_file(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str, section: str, key: str, expected: object
) -> None:
    monkeypatch.setenv(variable, text)
    settings = load_settings(REPO / "bridge.toml")
    assert getattr(getattr(settings, section), key) == expected


@pytest.mark.parametrize(
    ("variable", "text", "message"),
    [
        ("BRIDGE_UPSTREAM__PORT", "imap", "upstream.port: Input should be a valid integer"),
        ("BRIDGE_POP3__LISTEN", "[127.0.0.1:110", "pop3.listen: environment variable BRIDGE_POP3__LISTEN is neither"),
        ("BRIDGE_POP3__LISTEN", '["nowhere"]', "pop3.listen: 'nowhere' is not host:port"),
        ("BRIDGE_SERVER__WORKERS", "0", "server.workers: Input should be greater than or equal to 1"),
        ("BRIDGE_ADMIN__LISTEN", "9110", "admin.listen: '9110' is not host:port"),
    ],
)
def test_a_bad_environment_value_names_the_key(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str, message: str
) -> None:
    monkeypatch.setenv(variable, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(REPO / "bridge.toml")
    assert str(caught.value).startswith(message), caught.value


def test_check_config_prints_the_effective_configuration(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BRIDGE_UPSTREAM__PORT", "1143")
    monkeypatch.setenv("BRIDGE_POP3__LISTEN", "['0.0.0.0:1110']")
    assert main(["check-config", "--config", str(REPO / "bridge.toml")]) == 0
    out = capsys.readouterr().out
    assert "configuration is valid" in out
    assert "\n[upstream]\n" in out and "\nport = 1143\n" in out
    printed = tomllib.loads(out)
    assert printed["pop3"]["listen"] == ["0.0.0.0:1110"]


def test_check_config_exits_non_zero_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BRIDGE_POP3__SHUTDOWN_GRACE_SECONDS", "-1")
    with pytest.raises(SystemExit) as caught:
        main(["check-config", "--config", str(REPO / "bridge.toml")])
    assert caught.value.code == 2
    assert "pop3.shutdown_grace_seconds: Input should be greater than or equal to 0" in capsys.readouterr().err


def test_secrets_are_masked_by_key_name_wherever_they_sit() -> None:
    dumped = {
        "pop3": {"tls_key": "/etc/tls/key.pem", "tls_key_password": "hunter2", "listen": ["0.0.0.0:110"]},
        "upstream": {"password": "pw", "api_token": "t0k3n", "client_secret": "s", "empty_password": ""},
        "delete": {"accounts": {"alice": {"passphrase": "x", "policy": "keep"}}},
    }
    masked = mask_secrets(dumped)
    assert masked["pop3"] == {"tls_key": "/etc/tls/key.pem", "tls_key_password": MASK, "listen": ["0.0.0.0:110"]}
    assert masked["upstream"] == {"password": MASK, "api_token": MASK, "client_secret": MASK, "empty_password": ""}
    assert masked["delete"]["accounts"]["alice"] == {"passphrase": MASK, "policy": "keep"}
    assert dumped["upstream"]["password"] == "pw"  # a copy; the settings are untouched


def test_reload_applies_live_keys_and_keeps_restart_only_ones() -> None:
    running = load_settings(None, {"pop3": {"listen": ["127.0.0.1:1110"]}, "server": {"workers": 2}})
    loaded = load_settings(
        None,
        {
            "pop3": {"listen": ["127.0.0.1:2110"], "autologout_seconds": 900},
            "server": {"workers": 4},
            "logging": {"level": "debug"},
            "upstream": {"timeout_seconds": 12, "fetch_chunk": 65536},
            "delete": {"policy": "keep"},
            "admin": {"listen": "127.0.0.1:9110"},
        },
    )
    plan = plan_reload(running, loaded)
    assert plan.applied == [
        "delete.policy", "logging.level", "pop3.autologout_seconds", "upstream.fetch_chunk", "upstream.timeout_seconds"
    ]
    assert plan.needs_restart == ["admin.listen", "pop3.listen", "server.workers"]
    assert plan.settings.pop3.listen == ["127.0.0.1:1110"]
    assert plan.settings.server.workers == 2
    assert plan.settings.admin.listen == ""
    assert plan.settings.pop3.autologout_seconds == 900
    assert plan.settings.delete.policy == "keep"
    assert changed_keys(running, running) == []
