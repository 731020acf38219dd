"""Configuration: defaults, the example file, validation messages naming key and reason."""

from pathlib import Path

import pytest

from bridge.config import ConfigError, ListenAddress, load_settings, parse_listen_address

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
