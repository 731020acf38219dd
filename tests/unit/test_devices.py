"""Logins -> (upstream account, device, policy, folder): resolve_login with real settings."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.config import ConfigError, DeleteSettings, load_settings
from bridge.policy.identity import InvalidLogin, LoginIdentity, account_key, resolve_login

KEY = "k" * 32


def delete_settings(**values: Any) -> DeleteSettings:
    return load_settings(None, {"delete": values}).delete


def test_separator_splits_account_and_device() -> None:
    identity = resolve_login("alice@example.com#phone", delete_settings())
    assert identity == LoginIdentity(
        account="alice@example.com", device="phone", policy="expunge", folder="POP Downloaded"
    )


def test_login_without_separator_is_the_default_device() -> None:
    identity = resolve_login("alice@example.com", delete_settings())
    assert (identity.account, identity.device) == ("alice@example.com", "default")
    renamed = resolve_login("alice", delete_settings(default_device="legacy"))
    assert (renamed.account, renamed.device) == ("alice", "legacy")


def test_the_last_separator_splits_so_accounts_may_contain_it() -> None:
    identity = resolve_login("team#sales#printer", delete_settings())
    assert (identity.account, identity.device) == ("team#sales", "printer")


def test_separator_is_configurable() -> None:
    settings = delete_settings(device_separator="+")
    plus = resolve_login("alice+phone", settings)
    assert (plus.account, plus.device) == ("alice", "phone")
    # With "+" configured, "#" is just part of the account name.
    hashed = resolve_login("alice#phone", settings)
    assert (hashed.account, hashed.device) == ("alice#phone", "default")


def test_fixed_login_mapping_names_account_and_device() -> None:
    settings = delete_settings(logins={"office-printer": "alice@example.com#printer", "scanner": "bob"})
    printer = resolve_login("office-printer", settings)
    assert (printer.account, printer.device) == ("alice@example.com", "printer")
    scanner = resolve_login("scanner", settings)
    assert (scanner.account, scanner.device) == ("bob", "default")
    # Logins not in the mapping are resolved as usual.
    assert resolve_login("carol#tablet", settings).device == "tablet"


def test_a_mapped_login_wins_over_an_account_of_the_same_name() -> None:
    settings = delete_settings(logins={"alice": "bob#kiosk"})
    identity = resolve_login("alice", settings)
    assert (identity.account, identity.device) == ("bob", "kiosk")
    assert resolve_login("alice#phone", settings).account == "alice"


def test_per_account_default_device_and_overrides() -> None:
    settings = delete_settings(
        policy="expunge",
        state_key=KEY,
        accounts={
            "alice": {"default_device": "desk-phone", "policy": "per-client", "folder": "Archive"},
            "bob": {"policy": "keep"},
        },
    )
    alice = resolve_login("alice", settings)
    assert alice == LoginIdentity(account="alice", device="desk-phone", policy="per-client", folder="Archive")
    # An explicit device wins over the account's default device; the policy stays the account's.
    alice_phone = resolve_login("alice#phone", settings)
    assert (alice_phone.device, alice_phone.policy) == ("phone", "per-client")
    bob = resolve_login("bob#tablet", settings)
    assert (bob.device, bob.policy, bob.folder) == ("tablet", "keep", "POP Downloaded")
    carol = resolve_login("carol", settings)
    assert (carol.device, carol.policy) == ("default", "expunge")


def test_mapping_and_account_defaults_combine() -> None:
    settings = delete_settings(
        logins={"front-desk": "alice"}, accounts={"alice": {"default_device": "reception"}}
    )
    identity = resolve_login("front-desk", settings)
    assert (identity.account, identity.device) == ("alice", "reception")


@pytest.mark.parametrize(
    "login",
    [
        "alice#",  # separator but no device
        "#phone",  # no account
        "alice#my phone",
        "alice#" + "x" * 65,
        "alice#télé",
        "alice#a/b",
        "alice#a\tb",
        "alice#phone\n",  # "$" in a pattern matches before a final newline
        "alice#phone\r\n",
    ],
)
def test_invalid_device_names_are_refused(login: str) -> None:
    with pytest.raises(InvalidLogin) as caught:
        resolve_login(login, delete_settings())
    assert str(caught.value)


def test_longest_allowed_device_name() -> None:
    name = "A-z_0.9" + "x" * 57
    assert resolve_login(f"alice#{name}", delete_settings()).device == name


def test_a_mapping_to_an_invalid_device_is_refused_at_login() -> None:
    settings = delete_settings(logins={"printer": "alice#bad name"})
    with pytest.raises(InvalidLogin):
        resolve_login("printer", settings)
    with pytest.raises(InvalidLogin):
        resolve_login("scanner", delete_settings(logins={"scanner": "alice#phone\n"}))


def test_one_lock_per_device_of_an_account() -> None:
    settings = delete_settings()
    phone = resolve_login("alice#phone", settings)
    laptop = resolve_login("alice#laptop", settings)
    assert phone.lock_key != laptop.lock_key
    assert phone.lock_key == resolve_login("alice#phone", settings).lock_key


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"default_device": "two words"}, "delete.default_device"),
        ({"default_device": "phone\n"}, "delete.default_device"),
        ({"accounts": {"alice": {"default_device": "phone\n"}}}, "delete.accounts.alice.default_device"),
        ({"device_separator": "ab"}, "delete.device_separator"),
        ({"device_separator": "x"}, "delete.device_separator"),
        ({"policy": "shred"}, "delete.policy"),
        ({"accounts": {"alice": {"default_device": "no/slash"}}}, "delete.accounts.alice.default_device"),
        ({"accounts": {"alice": {"polcy": "keep"}}}, "delete.accounts.alice.polcy"),
    ],
)
def test_bad_device_settings_name_the_key(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        delete_settings(**values)
    assert str(caught.value).startswith(f"{key}:"), str(caught.value)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"delete": {"state_folder": "INBOX"}}, "delete.state_folder: must not be the maildrop folder"),
        ({"delete": {"state_folder": "inbox"}}, "delete.state_folder: must not be the maildrop folder"),
        ({"upstream": {"mailbox": "Work"}, "delete": {"folder": "Work"}}, "delete.folder: must not be the maildrop"),
        (
            {"delete": {"accounts": {"alice": {"folder": "Inbox"}}}},
            "delete.accounts.alice.folder: must not be the maildrop",
        ),
        ({"delete": {"folder": "Keep", "state_folder": "Keep"}}, "delete.folder: must not be the state folder"),
    ],
)
def test_maildrop_state_and_move_folders_must_differ(sections: dict[str, Any], message: str) -> None:
    # A state folder that is the maildrop would be listed to POP3 devices; a move folder
    # that is the maildrop would hand every downloaded message back as new.
    with pytest.raises(ConfigError) as caught:
        load_settings(None, sections)
    assert str(caught.value).startswith(message), str(caught.value)


def test_folders_in_the_maildrop_hierarchy_are_fine() -> None:
    settings = load_settings(
        None, {"upstream": {"mailbox": "Work"}, "delete": {"folder": "Work.Done", "state_folder": "INBOX"}}
    )
    assert settings.delete.state_folder == "INBOX"


# -- account names are compared case-insensitively ---------------------------------------------


def test_account_key_folds_case_as_dovecot_does() -> None:
    assert account_key("Alice@Example.COM") == account_key("alice@example.com") == "alice@example.com"
    assert account_key("team#sales") == "team#sales"


def test_an_account_override_applies_whatever_the_case_of_the_login() -> None:
    # The upstream folds case (Dovecot's auth_username_format %Lu): "Alice@example.com" opens
    # alice's mailbox, so it must get alice's policy, not the service default.
    settings = delete_settings(
        policy="expunge",
        state_key=KEY,
        accounts={"alice@example.com": {"policy": "per-client", "default_device": "desk"}},
    )
    for login in ("alice@example.com", "Alice@example.com", "ALICE@EXAMPLE.COM"):
        identity = resolve_login(login, settings)
        assert (identity.policy, identity.device) == ("per-client", "desk"), login
        # The upstream login is the account exactly as typed.
        assert identity.account == login
    mixed = delete_settings(state_key=KEY, accounts={"Bob@Example.com": {"policy": "per-client"}})
    assert resolve_login("bob@example.com#phone", mixed).policy == "per-client"


def test_a_fixed_login_mapping_applies_whatever_the_case_of_the_login() -> None:
    settings = delete_settings(logins={"Office-Printer": "alice#printer"})
    for login in ("office-printer", "OFFICE-PRINTER", "Office-Printer"):
        identity = resolve_login(login, settings)
        assert (identity.account, identity.device) == ("alice", "printer"), login


def test_one_lock_per_device_whatever_the_case_of_the_account() -> None:
    settings = delete_settings()
    assert resolve_login("Alice#phone", settings).lock_key == resolve_login("alice#phone", settings).lock_key
    # Device names stay case-sensitive: "Phone" is another device.
    assert resolve_login("alice#Phone", settings).lock_key != resolve_login("alice#phone", settings).lock_key
    assert resolve_login("Alice#phone", settings).account_key == "alice"


@pytest.mark.parametrize("table", ["accounts", "logins"])
def test_two_names_differing_only_in_case_are_a_config_error(table: str) -> None:
    value: object = {"policy": "keep"} if table == "accounts" else "carol"
    with pytest.raises(ConfigError) as caught:
        delete_settings(**{table: {"alice@example.com": value, "Alice@Example.com": value}})
    message = str(caught.value)
    assert message.startswith(f"delete.{table}:"), message
    assert "'alice@example.com'" in message and "'Alice@Example.com'" in message
