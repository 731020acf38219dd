"""Configuration: defaults, the example file, validation messages naming key and reason."""

from pathlib import Path

import pytest

from bridge.config import ConfigError, load_settings
from bridge.net.addresses import ListenAddress, parse_listen_address

REPO = Path(__file__).resolve().parents[2]


def test_example_file_is_valid_and_equals_the_defaults() -> None:
    # The example documents every key with its default, so loading it changes nothing.
    assert load_settings(REPO / "bridge.toml") == load_settings(None)


def test_example_file_documents_every_key() -> None:
    text = (REPO / "bridge.toml").read_text()
    for section, values in load_settings(None).model_dump().items():
        assert f"[{section}]" in text
        for key in values:
            documented = f"\n{key} = " in text or f"\n[{section}.{key}]" in text
            assert documented, f"{section}.{key} is not documented in bridge.toml"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:1110", ListenAddress("127.0.0.1", 1110)),
        ("[::1]:995", ListenAddress("::1", 995)),
        ("localhost:0", ListenAddress("localhost", 0)),
    ],
)
def test_listen_addresses_parse(text: str, expected: ListenAddress) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["1110", "::1:1110", "[::1]1110", "host:99999", "host:", "[nothost]:1"])
def test_bad_listen_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen_address(text)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        ('[pop3]\nlisten = ["nowhere"]\n', "pop3.listen", "host:port"),
        ("[pop3]\nautologout_seconds = 60\n", "pop3.autologout_seconds", "greater than or equal to 600"),
        ("[upstream]\nport = 0\n", "upstream.port", "greater than or equal to 1"),
        ('[upstream]\ntls = "maybe"\n', "upstream.tls", "'none'"),
        ("[upstream]\nfetch_chunk = 10\n", "upstream.fetch_chunk", "greater than or equal to 4096"),
        ("[upstream]\nhots = \"x\"\n", "upstream.hots", "unknown key"),
        ("[pop4]\nlisten = []\n", "pop4", "unknown key"),
    ],
)
def test_bad_values_name_the_key_and_the_reason(tmp_path: Path, toml: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_write(tmp_path, toml))
    message = str(caught.value)
    assert message.startswith(f"{key}:"), message
    assert reason in message


def test_not_toml_is_reported_with_the_file_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "[pop3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, '[upstream]\nhost = "imap.example.net"\nport = 993\n')
    monkeypatch.setenv("BRIDGE_UPSTREAM__HOST", "10.1.2.3")
    monkeypatch.setenv("BRIDGE_POP3__LISTEN", '["[::1]:110", "127.0.0.1:110"]')
    settings = load_settings(path)
    assert settings.upstream.host == "10.1.2.3"
    assert settings.upstream.port == 993  # from the file, untouched by the environment
    assert [str(a) for a in settings.pop3.listen_addresses] == ["[::1]:110", "127.0.0.1:110"]


# -- the key that signs per-client state records ------------------------------------------------

STATE_KEY = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "delete",
    [
        {"policy": "per-client"},
        {"policy": "expunge", "accounts": {"alice@example.com": {"policy": "per-client"}}},
    ],
)
def test_per_client_needs_a_state_key(delete: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"delete": delete})
    message = str(caught.value)
    assert message.startswith("delete.state_key: required"), message
    assert "per-client" in message and "state_key_file" in message


def test_other_policies_need_no_state_key() -> None:
    for policy in ("expunge", "move", "keep"):
        assert load_settings(None, {"delete": {"policy": policy}}).delete.signing_key == b""


def test_a_short_state_key_is_refused_naming_the_minimum() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"delete": {"policy": "per-client", "state_key": "too short"}})
    message = str(caught.value)
    assert message.startswith("delete.state_key:") and "must be at least 32 characters" in message, message
    assert "too short" not in message


def test_state_key_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "state.key"
    key_file.write_text(STATE_KEY + "\n")
    settings = load_settings(None, {"delete": {"policy": "per-client", "state_key_file": str(key_file)}})
    assert settings.delete.signing_key == STATE_KEY.encode()  # the final newline is not part of it

    key_file.write_text("short\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"delete": {"policy": "per-client", "state_key_file": str(key_file)}})
    message = str(caught.value)
    assert message.startswith("delete.state_key_file:") and "must hold at least 32 characters" in message, message
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"delete": {"state_key_file": str(tmp_path / "missing")}})
    assert str(caught.value).startswith("delete.state_key_file:"), str(caught.value)

    monkeypatch.setenv("BRIDGE_DELETE__STATE_KEY", STATE_KEY)
    assert load_settings(None, {"delete": {"policy": "per-client"}}).delete.signing_key == STATE_KEY.encode()
    key_file.write_text(STATE_KEY)
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"delete": {"policy": "per-client", "state_key_file": str(key_file)}})
    assert str(caught.value).startswith("delete.state_key: give delete.state_key or delete.state_key_file"), str(
        caught.value
    )


def test_check_config_masks_the_state_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bridge.cli import main

    monkeypatch.setenv("BRIDGE_DELETE__POLICY", "per-client")
    monkeypatch.setenv("BRIDGE_DELETE__STATE_KEY", STATE_KEY)
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert STATE_KEY not in out
    assert 'state_key = "********"' in out


# -- windows and first logins (bridge.policy.windows) -------------------------------------


@pytest.mark.parametrize("window", ["all", "last-1-days", "last-30-days", "last-999999-messages"])
def test_windows_that_are_accepted(window: str) -> None:
    assert load_settings(None, {"delete": {"window": window}}).delete.window == window


@pytest.mark.parametrize("window", ["", "last-0-days", "last-30-day", "last-1000000-messages", "30d", "last--1-days"])
def test_windows_that_are_refused_name_the_key(window: str) -> None:
    with pytest.raises(ConfigError, match=r"delete\.window"):
        load_settings(None, {"delete": {"window": window}})
    with pytest.raises(ConfigError, match=r"delete\.accounts\.a@b\.devices\.phone\.window"):
        load_settings(None, {"delete": {"accounts": {"a@b": {"devices": {"phone": {"window": window}}}}}})


def test_the_most_specific_window_and_first_login_win() -> None:
    from bridge.policy.identity import resolve_login

    delete = load_settings(
        None,
        {
            "delete": {
                "window": "last-30-days",
                "state_key": "k" * 32,
                "accounts": {
                    "Alice@Example.org": {
                        "window": "last-90-days",
                        "first_login": "from-now-on",
                        "devices": {"printer": {"window": "last-5-messages", "first_login": "all"}},
                    }
                },
            }
        },
    ).delete
    views = {
        login: (identity.window, identity.first_login)
        for login in ("alice@example.org#printer", "alice@example.org#phone", "bob@example.org")
        for identity in [resolve_login(login, delete)]
    }
    assert views == {
        "alice@example.org#printer": ("last-5-messages", "all"),
        "alice@example.org#phone": ("last-90-days", "from-now-on"),
        "bob@example.org": ("last-30-days", "all"),
    }


def test_a_first_login_from_now_on_needs_the_state_key() -> None:
    with pytest.raises(ConfigError, match=r"delete\.state_key: required when a first_login is \"from-now-on\""):
        load_settings(None, {"delete": {"accounts": {"a@b": {"devices": {"p": {"first_login": "from-now-on"}}}}}})


def test_device_names_in_the_device_table_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"delete\.accounts\.a@b\.devices"):
        load_settings(None, {"delete": {"accounts": {"a@b": {"devices": {"bad name": {"window": "all"}}}}}})
