"""The `oauth2` subcommands' arguments. Kept apart from their implementation
(bridge.oauth2.commands), which is imported only when one of them runs: the token store,
the crypto library and the HTTP client stay out of every other command, `serve` included."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from bridge.oauth2.commands import run

    return run(args)


def register(commands: Any) -> None:
    """Add `oauth2` and its subcommands to the main parser's subcommands."""
    oauth2 = commands.add_parser(
        "oauth2", help="enrol and manage the accounts of upstream.auth = \"oauth2\" (docs/oauth2.md)",
        description="Enrol and manage the accounts the bridge logs in to with OAuth2. Each command writes the token "
        "store (oauth2.store); a running bridge applies it at the account's next login.",
    )
    sub = oauth2.add_subparsers(dest="oauth2_command", required=True)

    def command(name: str, help_text: str, *, password: bool = False) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text, description=help_text)
        if name != "list":
            parser.add_argument("account", metavar="ACCOUNT", help="the mailbox's address, as the device logs in")
        parser.add_argument("--config", type=Path, required=True, help="path to bridge.toml (the one `serve` uses)")
        if password:
            parser.add_argument(
                "--device-password-file", type=Path, metavar="FILE",
                help="read the device password from the first line of FILE (default: ask twice on the terminal)",
            )
        parser.set_defaults(func=_run)
        return parser

    enrol = command("enrol", "consent to the bridge reading ACCOUNT's mail (grant refresh_token) and set its device password", password=True)
    enrol.add_argument(
        "--flow", choices=("device", "browser"), default="device",
        help="device: a URL and a code to enter on any device (RFC 8628; the default); browser: a URL to open, "
        "with a loopback redirect or the final URL pasted back (authorization code with PKCE)",
    )
    command("add", "add ACCOUNT for an app-only grant (client_credentials, jwt_bearer) with its device password", password=True)
    command("list", "list the enrolled accounts: account, grant, state (tab-separated)")
    command("status", "show ACCOUNT's enrolment: state, token expiry, last refresh (exit 3: needs re-enrolment)")
    passwd = command("passwd", "change ACCOUNT's device password (needs the current one for grant refresh_token)", password=True)
    passwd.add_argument(
        "--old-device-password-file", type=Path, metavar="FILE",
        help="read the current device password from FILE (default: ask on the terminal)",
    )
    command("remove", "remove ACCOUNT: its device can no longer log in")
