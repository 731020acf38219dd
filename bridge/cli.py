"""Command line: `pop3-imap-bridge serve|check-config|admin|probe|oauth2 ...|uidl import` (also
`python -m bridge`)."""

from __future__ import annotations

import argparse
import gc
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bridge import __version__
from bridge.config import BridgeSettings, ConfigError, environment_overrides, load_settings
from bridge.oauth2.command_line import register as register_oauth2_commands
from bridge.ops.logs import configure_logging


def _load(path: Path | None) -> BridgeSettings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"pop3-imap-bridge: bad configuration:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _tune_gc() -> None:
    """Garbage collection for a long-running server: what start-up loaded (modules, settings)
    is frozen out of every later collection, and young collections run every 20,000
    allocations instead of 700 (a download allocates thousands of short-lived objects per
    second). Measured on a 1,000-message download: about 10% less CPU in the bridge."""
    gc.freeze()
    _threshold0, threshold1, threshold2 = gc.get_threshold()
    gc.set_threshold(20_000, threshold1, threshold2)


def _serve(args: argparse.Namespace) -> int:
    from bridge.net.sockets import InheritedListener, ListenError
    from bridge.ops.service import run_until_signalled
    from bridge.ops.workers import run_supervisor, run_worker

    settings = _load(args.config)
    configure_logging(settings.logging.level, settings.logging.format)
    _tune_gc()
    if args.worker_index is not None:
        return run_worker(
            settings, args.config, args.worker_index, args.notify_fd, args.admin_socket, args.lifeline_fd,
            [InheritedListener.parse(item) for item in args.listener],
        )
    refused: BaseException | None = None
    try:
        if settings.server.workers > 1:
            return run_supervisor(settings, args.config)
        trio.run(partial(run_until_signalled, settings, reload=partial(load_settings, args.config)))
    except* ListenError as group:
        refused = group
        while isinstance(refused, BaseExceptionGroup):
            refused = refused.exceptions[0]
    if isinstance(refused, ListenError):
        # One line and status 1, not a traceback (a supervisor binds before its workers
        # start, a single process as its service starts).
        print(f"pop3-imap-bridge: {refused.strerror}", file=sys.stderr)
        return 1
    return 0


def _without_none(value: Any) -> Any:
    # TOML has no null: a key left unset (an account override that keeps the default) is omitted.
    if isinstance(value, dict):
        return {key: _without_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):  # [[routes]]: each route's keys left unset are omitted
        return [_without_none(item) for item in value]
    return value


def settings_as_toml(settings: BridgeSettings) -> str:
    """The settings in force as TOML that reads back to the same settings (secrets masked)."""
    import tomli_w

    from bridge.ops.secrets import mask_secrets

    return tomli_w.dumps(_without_none(mask_secrets(settings.model_dump())))


def _check_config(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    variables = sorted(environment_overrides())
    print(f"# {args.config or '(no file: built-in defaults)'}: the configuration is valid.")
    if variables:
        print(f"# Environment overrides applied: {', '.join(variables)}.")
    else:
        print("# No BRIDGE_* environment variables are set.")
    print("# The settings in force, secrets masked:\n")
    print(settings_as_toml(settings), end="")
    return 0


def _admin(args: argparse.Namespace) -> int:
    from bridge.ops.admin_client import run

    return run(args)


def _probe(args: argparse.Namespace) -> int:
    import json

    from bridge.config.routing import upstream_login
    from bridge.ops.helpdesk import policy_of
    from bridge.ops.probe import probe, render
    from bridge.routing.routes import Backend, RouteTable

    settings = _load(args.config)
    if args.account and args.password_file is None:
        print("pop3-imap-bridge probe: --account needs --password-file", file=sys.stderr)
        return 2
    table = RouteTable(settings)
    if args.route is not None:
        route = table.by_name(args.route)
        if route is None:
            names = ", ".join(r.name for r in [*table.routes, table.default])
            print(f"pop3-imap-bridge probe: no route {args.route!r} (there are: {names})", file=sys.stderr)
            return 2
    else:
        route = table.route_for(args.account or "")
    upstream = route.upstream
    if args.host is not None:
        upstream = upstream.model_copy(update={"host": args.host, **({"port": args.port} if args.port else {})})
    account = args.account or ""
    backend = Backend(route.name, upstream, upstream_login(route.login, account) if account else "", route.name, route.login)
    password = None
    if args.password_file is not None:
        try:
            password = args.password_file.read_text().strip("\r\n")
        except OSError as exc:
            print(f"pop3-imap-bridge probe: {args.password_file}: {exc.strerror}", file=sys.stderr)
            return 2
    if account and settings.routing.lookup_url and args.route is None and args.host is None:
        from bridge.ops.probe import looked_up

        try:
            backend = trio.run(looked_up, settings, account, password)
        except Exception as exc:  # the lookup refused or failed: said as it is
            print(f"pop3-imap-bridge probe: the lookup service: {exc}", file=sys.stderr)
            return 1
    policy = policy_of(settings, account) if account else settings.delete.policy
    report = trio.run(probe, settings, backend, password, policy)
    print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else render(report))
    return 0 if report["served"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pop3-imap-bridge", description="POP3 server for IMAP mailboxes")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--config", type=Path, help="path to bridge.toml (default: built-in defaults)")
    # Set by the supervisor when it starts a worker process (bridge.ops.workers), not by hand.
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--notify-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--lifeline-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--admin-socket", help=argparse.SUPPRESS)
    serve.add_argument("--listener", action="append", default=[], help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    check = commands.add_parser(
        "check-config", help="validate a configuration (file and BRIDGE_* environment) and print it as TOML"
    )
    check.add_argument("--config", type=Path, help="path to bridge.toml")
    check.set_defaults(func=_check_config)
    register_oauth2_commands(commands)

    from bridge.uidl.command import add_parser as add_uidl_parser

    add_uidl_parser(commands)

    from bridge.ops.admin_client import add_arguments

    admin = commands.add_parser("admin", help="the admin API: who, kick, devices, device-reset")
    add_arguments(admin)
    admin.set_defaults(func=_admin)

    probe = commands.add_parser(
        "probe", help="what an IMAP server offers, and whether the bridge can serve the delete policy with it"
    )
    probe.add_argument("--config", type=Path, help="path to bridge.toml")
    where = probe.add_mutually_exclusive_group()
    where.add_argument("--route", help="the route (back end) to probe, by name ('default': [upstream])")
    where.add_argument("--host", help="probe this host with the settings of the account's route or [upstream]")
    probe.add_argument("--port", type=int, help="with --host: the port")
    probe.add_argument("--account", help="log in as this account (its route decides the back end, unless --route)")
    probe.add_argument("--password-file", type=Path, help="with --account: a file holding its password")
    probe.add_argument("--json", action="store_true", help="print the report as JSON")
    probe.set_defaults(func=_probe)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 0
