"""Who is logging in: the upstream account, the device, and the delete policy that applies.

`alice@example.com#phone` logs in upstream as `alice@example.com`, device `phone`. Devices that
cannot change their login get a name from `[delete.logins]` (a fixed login -> account#device
mapping) or from their account's `default_device`.

Account names (and fixed logins) are compared case-insensitively (`account_key`), as the
upstream compares them; device names are case-sensitive.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.config import DeletePolicy, DeleteSettings, account_key, is_device_name
from bridge.config.deletion import FirstLogin

__all__ = ["InvalidLogin", "LoginIdentity", "account_key", "resolve_login"]


class InvalidLogin(Exception):
    """The login names a device the bridge cannot accept (the text is safe to show)."""


@dataclass(frozen=True)
class LoginIdentity:
    account: str
    device: str
    policy: DeletePolicy
    folder: str
    # What of the maildrop the device sees (bridge.policy.windows).
    window: str = "all"
    first_login: FirstLogin = "all"

    @property
    def account_key(self) -> str:
        """The account as the bridge compares it (login limits, locks, state records)."""
        return account_key(self.account)

    @property
    def lock_key(self) -> str:
        # One POP3 session per device of an account; different devices may poll at once.
        return f"{self.account_key}\0{self.device}"


def resolve_login(login: str, settings: DeleteSettings) -> LoginIdentity:
    mapped = settings.mapped_login(login)
    if mapped is None:
        mapped = login
    account, separator, device = mapped.rpartition(settings.device_separator)
    if not separator:
        account, device = mapped, ""
    elif not device:
        # "alice#" is a typo more likely than a wish for the default device.
        raise InvalidLogin(f"no device name after '{settings.device_separator}'")
    if not account:
        raise InvalidLogin("empty account name")
    overrides = settings.account_settings(account)
    if not device:
        device = (overrides.default_device if overrides else None) or settings.default_device
    if not is_device_name(device):
        raise InvalidLogin("device names are 1-64 letters, digits, '.', '_' or '-'")
    # The most specific setting wins: the account's device, the account, [delete].
    view = overrides.devices.get(device) if overrides else None
    return LoginIdentity(
        account=account,
        device=device,
        policy=(overrides.policy if overrides else None) or settings.policy,
        folder=(overrides.folder if overrides else None) or settings.folder,
        window=(view.window if view else None) or (overrides.window if overrides else None) or settings.window,
        first_login=(view.first_login if view else None)
        or (overrides.first_login if overrides else None)
        or settings.first_login,
    )
