"""`pop3-imap-bridge admin who|kick|devices|device-reset`: the admin API (bridge.ops.admin_api)
from the command line.

Where and with what: `--url` (default: `admin.listen` of `--config`, a wildcard address asked
on loopback), the token from `--token-file`, else `BRIDGE_ADMIN__TOKEN`, else the
configuration's `admin.token`/`admin.token_file`. Answers are printed as tables, or as the
API's JSON with `--json`. Exit status: 0 done, 1 refused or unreachable, 2 bad arguments or
configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from bridge.config import BridgeSettings, ConfigError, load_settings

_TIMEOUT_SECONDS = 60.0


class ClientError(Exception):
    """Printed as it is; `status` is the exit status."""

    def __init__(self, text: str, status: int = 1) -> None:
        super().__init__(text)
        self.status = status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="bridge.toml: where the admin listener is, and its token")
    parser.add_argument("--url", help="the admin listener, e.g. http://127.0.0.1:9110 (default: admin.listen)")
    parser.add_argument("--token-file", type=Path, help="a file holding the admin token (default: BRIDGE_ADMIN__TOKEN)")
    actions = parser.add_subparsers(dest="action", required=True)
    who = actions.add_parser("who", help="the live sessions")
    who.add_argument("--account", help="only accounts matching this glob, e.g. '*@example.com'")
    kick = actions.add_parser("kick", help="end an account's sessions without their pending deletions")
    kick.add_argument("account")
    kick.add_argument("--device", help="only this device's sessions")
    devices = actions.add_parser("devices", help="the devices in an account's state folder")
    devices.add_argument("account")
    reset = actions.add_parser("device-reset", help="make a device see everything again (or only new mail)")
    reset.add_argument("account")
    reset.add_argument("device")
    reset.add_argument(
        "--from-now-on", action="store_true", help="the device sees only mail that arrives from now on"
    )
    for sub in (who, kick, devices, reset):
        sub.add_argument("--json", action="store_true", help="print the API's JSON answer")


def _settings(path: Path | None) -> BridgeSettings | None:
    if path is None:
        return None
    try:
        return load_settings(path)
    except ConfigError as exc:
        raise ClientError(f"bad configuration:\n{exc}", 2) from None


def _base_url(args: argparse.Namespace, settings: BridgeSettings | None) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    address = settings.admin.listen_address if settings is not None else None
    if address is None:
        raise ClientError("no admin listener: give --url, or --config with admin.listen set", 2)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address.host, address.host)
    return f"http://[{host}]:{address.port}" if ":" in host else f"http://{host}:{address.port}"


def _token(args: argparse.Namespace, settings: BridgeSettings | None) -> str:
    if args.token_file is not None:
        try:
            return args.token_file.read_text().strip()
        except OSError as exc:
            raise ClientError(f"{args.token_file}: {exc.strerror}", 2) from None
    from_environment = os.environ.get("BRIDGE_ADMIN__TOKEN", "").strip()
    if from_environment:
        return from_environment
    return settings.admin.api_token if settings is not None else ""


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, str]]:
    if args.action == "who":
        return "GET", "sessions", {"account": args.account} if args.account else {}
    if args.action == "kick":
        return "POST", "kick", {"account": args.account, **({"device": args.device} if args.device else {})}
    if args.action == "devices":
        return "GET", "devices", {"account": args.account}
    params = {"account": args.account, "device": args.device}
    if args.from_now_on:
        params["from_now_on"] = "1"
    return "POST", "device-reset", params


def call(args: argparse.Namespace) -> Any:
    """The API's JSON answer to the action `args` names; ClientError when refused."""
    settings = _settings(args.config)
    url = _base_url(args, settings)
    token = _token(args, settings)
    method, action, params = _request(args)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(timeout=_TIMEOUT_SECONDS, trust_env=False) as client:
            response = client.request(method, f"{url}/admin/{action}", params=params, headers=headers)
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach the admin listener at {url}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        raise ClientError(f"{url} answered HTTP {response.status_code} without JSON: is it the admin listener with admin.api on?") from None
    if response.status_code != 200:
        raise ClientError(f"refused ({response.status_code}): {body.get('error', body) if isinstance(body, dict) else body}")
    return body


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in [header, *rows])


def render(action: str, body: Any) -> str:
    """The answer as a person reads it."""
    if action == "who":
        sessions = body["sessions"]
        if not sessions:
            return "no sessions"
        rows = [
            [s["account"] or "-", s["device"] or "-", s["client"], s["backend"] or "-", s["since"], s["state"], str(s["bytes_sent"])]
            for s in sessions
        ]
        return _table(rows, ["ACCOUNT", "DEVICE", "CLIENT", "BACKEND", "SINCE", "STATE", "BYTES SENT"])
    if action == "kick":
        count = body["kicked"]
        return f"kicked {count} session{'s' if count != 1 else ''} (their deletions are not applied)" if count else "no session to kick"
    if action == "devices":
        head = f"{body['account']}: delete policy {body['policy']}"
        if "note" in body:
            return f"{head}; {body['note']}"
        head += f", back end {body['backend']}, {body['messages']} messages"
        if not body["devices"]:
            return f"{head}\nno devices recorded"
        rows = [[d["device"], d["last_seen"] or "-", str(d["hidden"]), str(d["records"])] for d in body["devices"]]
        return head + "\n" + _table(rows, ["DEVICE", "LAST SEEN", "HIDDEN", "RECORDS"])
    if body["from_now_on"]:
        return (
            f"{body['device']} of {body['account']}: the {body['hidden']} messages there now are hidden; "
            "it will see only mail that arrives from now on"
        )
    return f"{body['device']} of {body['account']}: reset; it will see all {body['messages']} messages again"


def run(args: argparse.Namespace) -> int:
    try:
        body = call(args)
    except ClientError as exc:
        print(f"pop3-imap-bridge admin: {exc}", file=sys.stderr)
        return exc.status
    print(json.dumps(body, indent=1, ensure_ascii=False) if args.json else render(args.action, body))
    return 0
