"""The sections of bridge.toml the service itself reads: [pop3], [upstream], [pool],
[login_limits], [logging], [admin], [server]. Each key has its default here and is documented
with it in the example bridge.toml."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator

from bridge.config.base import Section, readable_file, writable_directory
from bridge.net.addresses import ListenAddress, parse_listen_address


class Pop3Settings(Section):
    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:1110"], min_length=1)
    autologout_seconds: float = Field(default=600.0, ge=600.0)
    tcp_keepalive_seconds: float = Field(default=60.0, ge=0, le=7200)
    max_line_length: int = Field(default=255, ge=64, le=65536)
    max_connections: int = Field(default=1000, ge=1)
    implementation: str = "pop3-imap-bridge"
    shutdown_grace_seconds: float = Field(default=30.0, ge=0, le=3600)
    # Security (docs/operators.md, "Security"). A validator may only look at fields above its own.
    tls_cert: str = ""
    tls_key: str = ""
    minimum_tls_version: Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    tls_listen: list[str] = Field(default_factory=list)
    stls: bool = False
    allow_plaintext_auth: Literal["loopback", "always", "never"] = "loopback"
    proxy_trusted: list[str] = Field(default_factory=list)
    proxy_protocol: list[str] = Field(default_factory=list)
    max_connections_per_address: int = Field(default=100, ge=1)
    session_timeout_seconds: float = Field(default=7200.0, ge=0)
    send_timeout_seconds: float = Field(default=120.0, gt=0)
    handshake_timeout_seconds: float = Field(default=30.0, gt=0)
    login_timeout_seconds: float = Field(default=60.0, gt=0)
    poll_microseconds: int = Field(default=200, ge=0, le=1000)

    @field_validator("listen", "tls_listen")
    @classmethod
    def _valid_addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_listen_address(item)
        return value

    @field_validator("tls_cert")
    @classmethod
    def _cert_file(cls, value: str) -> str:
        return readable_file(value)

    @field_validator("tls_key")
    @classmethod
    def _key_matches_cert(cls, value: str, info: ValidationInfo) -> str:
        readable_file(value)
        if "tls_cert" not in info.data:
            return value  # the certificate itself was refused; that error is reported
        cert = info.data["tls_cert"]
        if bool(value) != bool(cert):
            raise ValueError("tls_cert and tls_key must be given together")
        if value:
            from bridge.net.tls import TlsConfigError, load_server_context

            try:
                load_server_context(cert, value, "TLSv1.2")
            except TlsConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("tls_listen", "stls")
    @classmethod
    def _needs_certificate(cls, value: list[str] | bool, info: ValidationInfo) -> list[str] | bool:
        if value and not (info.data.get("tls_cert") and info.data.get("tls_key")):
            raise ValueError("needs pop3.tls_cert and pop3.tls_key")
        return value

    @field_validator("proxy_trusted")
    @classmethod
    def _trusted_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
        return value

    @field_validator("proxy_protocol")
    @classmethod
    def _proxied_listeners(cls, value: list[str], info: ValidationInfo) -> list[str]:
        configured = {*info.data.get("listen", []), *info.data.get("tls_listen", [])}
        for item in value:
            if item not in configured:
                raise ValueError(f"{item!r} is not one of the addresses in listen or tls_listen")
        if value and not info.data.get("proxy_trusted"):
            raise ValueError("needs pop3.proxy_trusted: the balancers allowed to send PROXY headers")
        return value

    @property
    def listen_addresses(self) -> list[ListenAddress]:
        return [parse_listen_address(item) for item in self.listen]


class UpstreamSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=143, ge=1, le=65535)
    tls: Literal["none", "starttls", "implicit"] = "starttls"
    ca_file: str = ""
    verify: bool = True
    mailbox: str = Field(default="INBOX", min_length=1)
    fetch_chunk: int = Field(default=1048576, ge=4096, le=64 * 1048576)
    readahead_max_bytes: int = Field(default=64 * 1048576, ge=0, le=16 * 1024 * 1048576)
    timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    tcp_keepalive_seconds: float = Field(default=60.0, ge=0, le=7200)
    ignore_capabilities: list[str] = Field(default_factory=list)
    engine: Literal["trio", "aioimaplib"] = "trio"
    reconnect_initial_seconds: float = Field(default=0.2, gt=0, le=60)
    reconnect_max_seconds: float = Field(default=5.0, gt=0, le=300)
    # "password": the POP3 password is the upstream's; "oauth2": the bridge checks a device
    # password and logs in upstream with an OAuth2 access token ([oauth2], docs/oauth2.md).
    auth: Literal["password", "oauth2"] = "password"
    # The server's admin (a Dovecot master user, a Cyrus admin), for `pop3-imap-bridge admin
    # devices|device-reset`, which read and write an account's device state without its
    # owner's password: SASL PLAIN as `admin_login`, authorized as the account.
    admin_login: str = ""
    admin_password_file: str = ""

    @property
    def ignore_capabilities_set(self) -> frozenset[str]:
        return frozenset(name.upper() for name in self.ignore_capabilities)

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, value: str) -> str:
        readable_file(value)
        if value:
            from bridge.net.tls import TlsConfigError, load_client_context

            try:
                load_client_context(value, verify=True)
            except TlsConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("admin_password_file")
    @classmethod
    def _admin_password_file(cls, value: str) -> str:
        return readable_file(value)


class PoolSettings(Section):
    """Parking a finished session's IMAP connection for that account's next session."""

    park_seconds: float = Field(default=1200.0, ge=0, le=86400)
    # From the connection's upstream LOGIN, never refreshed: the longest an old password keeps
    # working on a parked connection after it changed upstream (bridge/imap/pool.py).
    max_age_seconds: float = Field(default=300.0, gt=0, le=86400)
    # Every IMAP connection open at once, in use by a session or parked (bridge/imap/capacity.py).
    max_connections: int = Field(default=1000, ge=1)
    max_per_account: int = Field(default=2, ge=1, le=64)
    # RFC 2177: re-issue IDLE at least every 29 minutes; many servers and NATs drop sooner.
    keepalive_seconds: float = Field(default=600.0, ge=1, le=1740)


class CacheSettings(Section):
    """Big messages kept after their first RETR for the next one (bridge/session/message_cache.py)."""

    max_bytes: int = Field(default=1 << 30, ge=0, le=1 << 40)
    min_message_bytes: int = Field(default=1 << 20, ge=65536, le=1 << 40)
    # Each cached message is an open descriptor.
    max_messages: int = Field(default=256, ge=1, le=4096)
    directory: str = ""

    @field_validator("directory")
    @classmethod
    def _directory(cls, value: str) -> str:
        return writable_directory(value)


# The whole name must match (re.fullmatch): with "$", "phone\n" would pass as "phone".
class LoginLimitSettings(Section):
    """Failed-login slow-down and blocking (bridge/net/login_limiter.py explains the design)."""

    failure_delay_seconds: float = Field(default=1.0, ge=0, le=60)
    max_delay_seconds: float = Field(default=15.0, ge=0, le=60)
    address_block_after: int = Field(default=30, ge=0)
    account_block_after: int = Field(default=10, ge=0)
    block_seconds: float = Field(default=300.0, ge=0)
    forget_after_seconds: float = Field(default=900.0, gt=0)


class LoggingSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class AdminSettings(Section):
    # Empty: no admin listener (metrics and probes are opt-in; they reveal traffic figures).
    listen: str = ""
    readiness_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    max_connections: int = Field(default=64, ge=1)
    # The admin API (/admin/...: sessions, kick, devices, device-reset) on this listener,
    # for requests carrying `Authorization: Bearer <token>`.
    api: bool = False
    token: str = ""
    token_file: str = ""
    _token_value: str = PrivateAttr("")

    @field_validator("listen")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        if value:
            parse_listen_address(value)
        return value

    @field_validator("token_file")
    @classmethod
    def _token_file(cls, value: str) -> str:
        return readable_file(value)

    def model_post_init(self, context: Any) -> None:
        # Surrounding whitespace (an editor's newline) is not part of the token.
        if self.token:
            self._token_value = self.token.strip()
        elif self.token_file:
            self._token_value = Path(self.token_file).read_text().strip()

    @property
    def listen_address(self) -> ListenAddress | None:
        return parse_listen_address(self.listen) if self.listen else None

    @property
    def api_token(self) -> str:
        """The bearer token of `token` or `token_file` ("" when neither is set)."""
        return self._token_value


class ServerSettings(Section):
    workers: int = Field(default=1, ge=1, le=256)


