"""`[oauth2]`: logging in upstream with OAuth2 (`upstream.auth = "oauth2"`, docs/oauth2.md).

The keys are validated on their own whatever `upstream.auth` says (a URL must be a URL, a file
must be readable); what the chosen grant needs (a token endpoint, a client, a key) is checked
by `check_oauth2` only when OAuth2 is in use, so the defaults load for password logins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, PrivateAttr, field_validator

from bridge.config.base import ConfigError, Section, readable_file
from bridge.net.addresses import is_loopback_host

Grant = Literal["refresh_token", "client_credentials", "jwt_bearer"]

# Documented endpoints of the two big providers (docs/oauth2.md cites them); "{tenant}" is
# oauth2.tenant. The token endpoint of a service account's key file wins for jwt_bearer.
_PRESETS: dict[str, dict[str, str]] = {
    "google": {
        "authorization_url": "https://accounts.google.com/o/oauth2/auth",
        "token_url": "https://oauth2.googleapis.com/token",
        "device_authorization_url": "https://oauth2.googleapis.com/device/code",
    },
    "microsoft": {
        "authorization_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
        "token_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        "device_authorization_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode",
    },
}
# The scope asked for when oauth2.scope is empty, by provider and grant.
_DEFAULT_SCOPES: dict[tuple[str, str], str] = {
    ("google", "refresh_token"): "https://mail.google.com/",
    ("google", "jwt_bearer"): "https://mail.google.com/",
    ("microsoft", "refresh_token"): "https://outlook.office.com/IMAP.AccessAsUser.All offline_access",
    ("microsoft", "client_credentials"): "https://outlook.office365.com/.default",
}
_URL_KEYS = ("token_url", "device_authorization_url", "authorization_url")


@dataclass(frozen=True)
class ServiceAccountKey:
    """What the jwt_bearer grant needs of a service account's JSON key file."""

    client_email: str
    private_key: str  # PEM
    private_key_id: str
    token_uri: str


def _check_url(value: str) -> str:
    if not value:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an https:// URL")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        # The token endpoint receives the client secret and hands out tokens.
        raise ValueError("must be https:// (plain http only to a loopback address)")
    return value


def parse_store(value: str) -> tuple[str, str]:
    """("file", directory) or ("redis", URL) from oauth2.store; ValueError if neither."""
    if value.startswith("file:"):
        path = value.removeprefix("file:")
        if not path.startswith("/"):
            raise ValueError('a file store needs an absolute directory: "file:/var/lib/pop3-imap-bridge/oauth2"')
        return "file", path
    if value.startswith(("redis://", "rediss://", "unix://")):
        if value.startswith(("redis://", "rediss://")) and not urlsplit(value).hostname:
            raise ValueError("a redis URL needs a host: redis://host:6379/0")
        return "redis", value
    raise ValueError('must be "file:/absolute/directory" or "redis://host:port/db" (rediss:// for TLS)')


def _load_service_account_key(path: str) -> ServiceAccountKey:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path!r} is not a readable JSON key file ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k] for k in ("client_email", "private_key")):
        raise ValueError(f"{path!r} has no client_email and private_key: not a service account key file")
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(data["private_key"].encode(), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path!r}: its private_key is not an unencrypted PEM private key") from None
    if not isinstance(key, RSAPrivateKey):
        raise ValueError(f"{path!r}: its private_key is not an RSA key (RS256 needs one)")
    return ServiceAccountKey(
        data["client_email"], data["private_key"], str(data.get("private_key_id", "")), str(data.get("token_uri", ""))
    )


class OAuth2Settings(Section):
    provider: Literal["google", "microsoft", "custom"] = "custom"
    tenant: str = Field(default="common", pattern=r"^[A-Za-z0-9.-]+$")
    token_url: str = ""
    device_authorization_url: str = ""
    authorization_url: str = ""
    client_id: str = ""
    client_secret: str = ""
    client_secret_file: str = ""
    service_account_key_file: str = ""
    scope: str = ""
    grant: Grant = "refresh_token"
    mechanism: Literal["xoauth2", "oauthbearer", "auto"] = "auto"
    store: str = "file:/var/lib/pop3-imap-bridge/oauth2"

    _secret: str = PrivateAttr(default="")
    _service_account: ServiceAccountKey | None = PrivateAttr(default=None)

    @field_validator(*_URL_KEYS)
    @classmethod
    def _urls(cls, value: str) -> str:
        return _check_url(value)

    @field_validator("client_secret_file")
    @classmethod
    def _secret_file(cls, value: str) -> str:
        return readable_file(value)

    @field_validator("service_account_key_file")
    @classmethod
    def _key_file(cls, value: str) -> str:
        if value:
            readable_file(value)
            _load_service_account_key(value)
        return value

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        parse_store(value)
        return value

    def model_post_init(self, context: Any) -> None:
        if self.client_secret:
            self._secret = self.client_secret
        elif self.client_secret_file:
            self._secret = Path(self.client_secret_file).read_text().strip()
        if self.service_account_key_file:
            self._service_account = _load_service_account_key(self.service_account_key_file)

    # -- what the settings resolve to -----------------------------------------------------------

    @property
    def secret(self) -> str:
        """The client secret, from client_secret or client_secret_file ("" for a public client)."""
        return self._secret

    @property
    def service_account(self) -> ServiceAccountKey | None:
        return self._service_account

    def endpoint(self, key: str) -> str:
        """token_url, device_authorization_url or authorization_url: as configured, else the
        provider's (for jwt_bearer, the key file's token_uri before the preset's)."""
        configured = str(getattr(self, key))
        if configured:
            return configured
        if key == "token_url" and self._service_account is not None and self._service_account.token_uri:
            return self._service_account.token_uri
        preset = _PRESETS.get(self.provider, {}).get(key, "")
        return preset.replace("{tenant}", self.tenant)

    @property
    def effective_scope(self) -> str:
        return self.scope or _DEFAULT_SCOPES.get((self.provider, self.grant), "")

    @property
    def store_location(self) -> tuple[str, str]:
        return parse_store(self.store)


def check_oauth2(oauth2: OAuth2Settings) -> None:
    """What `upstream.auth = "oauth2"` needs of [oauth2], by grant."""
    if oauth2.client_secret and oauth2.client_secret_file:
        raise ConfigError("oauth2.client_secret: give oauth2.client_secret or oauth2.client_secret_file, not both")
    if oauth2.tenant != "common" and oauth2.provider != "microsoft":
        raise ConfigError('oauth2.tenant: only used with provider = "microsoft"')
    if not oauth2.endpoint("token_url"):
        raise ConfigError(f'oauth2.token_url: required with provider = "{oauth2.provider}" (the token endpoint)')
    if oauth2.grant in ("refresh_token", "client_credentials") and not oauth2.client_id:
        raise ConfigError(f'oauth2.client_id: required for grant = "{oauth2.grant}" (the application\'s client ID)')
    if oauth2.grant == "client_credentials" and not oauth2.secret:
        raise ConfigError(
            'oauth2.client_secret: required for grant = "client_credentials" (or oauth2.client_secret_file, '
            "or the environment variable BRIDGE_OAUTH2__CLIENT_SECRET)"
        )
    if oauth2.grant == "jwt_bearer" and oauth2.service_account is None:
        raise ConfigError('oauth2.service_account_key_file: required for grant = "jwt_bearer" (the JSON key file)')
    if oauth2.grant == "client_credentials" and not oauth2.effective_scope:
        raise ConfigError('oauth2.scope: required for grant = "client_credentials" with provider = "custom"')
