"""Command line: `pop3-imap-bridge serve|check-config|oauth2 ...|uidl import` (also `python -m bridge`)."""

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
from bridge.oauth2.commands import register as register_oauth2_commands
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
    from bridge.ops.service import run_until_signalled
    from bridge.ops.workers import run_supervisor, run_worker

    settings = _load(args.config)
    configure_logging(settings.logging.level, settings.logging.format)
    _tune_gc()
    if args.worker_index is not None:
        return run_worker(settings, args.config, args.worker_index, args.notify_fd)
    if settings.server.workers > 1:
        return run_supervisor(settings, args.config)
    trio.run(partial(run_until_signalled, settings, reload=partial(load_settings, args.config)))
    return 0


def _without_none(value: Any) -> Any:
    # TOML has no null: a key left unset (an account override that keeps the default) is omitted.
    if isinstance(value, dict):
        return {key: _without_none(item) for key, item in value.items() if item is not None}
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pop3-imap-bridge", description="POP3 server for IMAP mailboxes")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--config", type=Path, help="path to bridge.toml (default: built-in defaults)")
    # Set by the supervisor when it starts a worker process (bridge.ops.workers), not by hand.
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--notify-fd", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    check = commands.add_parser(
        "check-config", help="validate a configuration (file and BRIDGE_* environment) and print it as TOML"
    )
    check.add_argument("--config", type=Path, help="path to bridge.toml")
    check.set_defaults(func=_check_config)
    register_oauth2_commands(commands)

    from bridge.uidl.command import add_parser as add_uidl_parser

    add_uidl_parser(commands)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 0
