"""Typed, validated configuration: `bridge.toml`, overridden by `BRIDGE_<SECTION>__<KEY>`
variables (`loading`). One module per concern: the service's own sections (`sections`), the
delete policies (`deletion`), the UIDLs (`uidl`). Every key has a default there and is documented, with that
default, in the example `bridge.toml` at the top of the repository."""

from bridge.config.base import ConfigError
from bridge.config.deletion import (
    DEVICE_NAME_PATTERN,
    MIN_STATE_KEY_LENGTH,
    AccountSettings,
    DeletePolicy,
    DeleteSettings,
    account_key,
    is_device_name,
)
from bridge.config.loading import (
    ENV_PREFIX,
    BridgeSettings,
    environment_overrides,
    load_settings,
    weakened_settings,
)
from bridge.config.oauth2 import OAuth2Settings, ServiceAccountKey
from bridge.config.sections import (
    AdminSettings,
    CacheSettings,
    LoggingSettings,
    LoginLimitSettings,
    PoolSettings,
    Pop3Settings,
    ServerSettings,
    UpstreamSettings,
)
from bridge.config.uidl import UIDL_PRESETS, UidlSettings

__all__ = [
    "DEVICE_NAME_PATTERN",
    "ENV_PREFIX",
    "MIN_STATE_KEY_LENGTH",
    "UIDL_PRESETS",
    "AccountSettings",
    "AdminSettings",
    "BridgeSettings",
    "CacheSettings",
    "ConfigError",
    "DeletePolicy",
    "DeleteSettings",
    "LoggingSettings",
    "LoginLimitSettings",
    "OAuth2Settings",
    "PoolSettings",
    "Pop3Settings",
    "ServerSettings",
    "UidlSettings",
    "ServiceAccountKey",
    "UpstreamSettings",
    "account_key",
    "environment_overrides",
    "is_device_name",
    "load_settings",
    "weakened_settings",
]
