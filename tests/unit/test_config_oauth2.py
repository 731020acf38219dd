"""[oauth2] and upstream.auth: presets, validation messages naming key and reason, the
environment, and the client secret masked wherever settings are shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bridge.cli import settings_as_toml
from bridge.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]


def _oauth2(**oauth2: object) -> dict[str, dict[str, object]]:
    return {"upstream": {"auth": "oauth2"}, "oauth2": oauth2}


def test_password_logins_need_no_oauth2_settings() -> None:
    assert load_settings(None).upstream.auth == "password"


def test_the_presets() -> None:
    microsoft = load_settings(None, _oauth2(provider="microsoft", tenant="contoso.onmicrosoft.com", client_id="c")).oauth2
    assert microsoft.endpoint("token_url") == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert microsoft.endpoint("device_authorization_url").endswith("/contoso.onmicrosoft.com/oauth2/v2.0/devicecode")
    assert microsoft.effective_scope == "https://outlook.office.com/IMAP.AccessAsUser.All offline_access"
    app = load_settings(None, _oauth2(provider="microsoft", client_id="c", client_secret="s", grant="client_credentials")).oauth2
    assert app.effective_scope == "https://outlook.office365.com/.default"
    google = load_settings(None, _oauth2(provider="google", client_id="c")).oauth2
    assert google.endpoint("token_url") == "https://oauth2.googleapis.com/token"
    assert google.effective_scope == "https://mail.google.com/"
    overridden = load_settings(None, _oauth2(provider="google", client_id="c", token_url="https://idp.example/token", scope="x")).oauth2
    assert overridden.endpoint("token_url") == "https://idp.example/token" and overridden.effective_scope == "x"


def _key_file(tmp_path: Path, key: object = None) -> Path:
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())  # type: ignore[attr-defined]
    path = tmp_path / "key.json"
    path.write_text(json.dumps({"client_email": "sa@p.iam.example", "private_key": pem.decode(), "token_uri": "https://idp.example/t"}))
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, 'oauth2.token_url: required with provider = "custom"'),
        ({"provider": "google"}, 'oauth2.client_id: required for grant = "refresh_token"'),
        ({"provider": "microsoft", "client_id": "c", "grant": "client_credentials"}, 'oauth2.client_secret: required for grant = "client_credentials"'),
        ({"provider": "google", "grant": "jwt_bearer"}, 'oauth2.service_account_key_file: required for grant = "jwt_bearer"'),
        ({"provider": "google", "client_id": "c", "tenant": "x"}, 'oauth2.tenant: only used with provider = "microsoft"'),
        ({"provider": "google", "client_id": "c", "client_secret": "s", "client_secret_file": "/etc/hostname"}, "not both"),
        ({"token_url": "http://idp.example/token"}, "oauth2.token_url: must be https:// (plain http only to a loopback address)"),
        ({"token_url": "ftp://x/y"}, "oauth2.token_url: must be an https:// URL"),
        ({"store": "file:relative/dir"}, "oauth2.store: a file store needs an absolute directory"),
        ({"store": "memcached://x"}, 'oauth2.store: must be "file:/absolute/directory" or "redis://host:port/db"'),
        ({"mechanism": "plain"}, "oauth2.mechanism:"),
        ({"grant": "password"}, "oauth2.grant:"),
        ({"client_secret_file": "/nonexistent"}, "oauth2.client_secret_file: '/nonexistent' is not a readable file"),
        ({"colour": "blue"}, "oauth2.colour: unknown key"),
    ],
)
def test_bad_settings_name_the_key_and_the_reason(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, _oauth2(**overrides))
    assert message in str(error.value)


def test_the_service_account_key_file_is_checked(tmp_path: Path) -> None:
    good = load_settings(None, _oauth2(provider="google", grant="jwt_bearer", service_account_key_file=str(_key_file(tmp_path)))).oauth2
    assert good.service_account is not None and good.service_account.client_email == "sa@p.iam.example"
    assert good.endpoint("token_url") == "https://idp.example/t"  # the key file's token_uri
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="oauth2.service_account_key_file: .* not a service account key file"):
        load_settings(None, _oauth2(service_account_key_file=str(tmp_path / "bad.json")))
    with pytest.raises(ConfigError, match="not an RSA key"):
        load_settings(None, _oauth2(service_account_key_file=str(_key_file(tmp_path, ec.generate_private_key(ec.SECP256R1())))))


def test_the_client_secret_from_a_file_or_the_environment_is_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    from_file = load_settings(None, _oauth2(provider="google", client_id="c", client_secret_file=str(secret_file)))
    assert from_file.oauth2.secret == "from-a-file"
    monkeypatch.setenv("BRIDGE_UPSTREAM__AUTH", "oauth2")
    monkeypatch.setenv("BRIDGE_OAUTH2__PROVIDER", "microsoft")
    monkeypatch.setenv("BRIDGE_OAUTH2__CLIENT_ID", "c")
    monkeypatch.setenv("BRIDGE_OAUTH2__CLIENT_SECRET", "from-the-environment")
    monkeypatch.setenv("BRIDGE_OAUTH2__GRANT", "client_credentials")
    settings = load_settings(None)
    assert settings.oauth2.secret == "from-the-environment" and settings.oauth2.grant == "client_credentials"
    shown = settings_as_toml(settings)
    assert "from-the-environment" not in shown and 'client_secret = "********"' in shown
    monkeypatch.setenv("BRIDGE_OAUTH2__STORE", "somewhere")
    with pytest.raises(ConfigError) as error:
        load_settings(None)
    assert "oauth2.store:" in str(error.value) and "from environment variable BRIDGE_OAUTH2__STORE" in str(error.value)
