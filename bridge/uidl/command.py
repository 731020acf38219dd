"""`pop3-imap-bridge uidl import`: the command line of the UIDL import (bridge.uidl.importer).

    pop3-imap-bridge uidl import --config bridge.toml --from pop3s://old.example:995 \\
        alice@example.com --password-file alice.pw [--old-login alice] [--dry-run] [--lenient]
    pop3-imap-bridge uidl import --config bridge.toml --from pop3s://old.example:995 \\
        --accounts accounts.csv [--jobs 4] [--report report.csv]

`--accounts` is a CSV file: account, password (or `file:PATH`, a file holding it), and
optionally the login on the old server; empty lines and lines starting with `#` are skipped.
Progress goes to stderr (a bar on a terminal), the per-account report to stdout (with
`--dry-run`, the UIDL listing each device would see change) and, with `--report`, to a CSV
file. Exit status: 0 every account recorded (or, for a dry run, would be), 1 otherwise, 2 a
usage or configuration error.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import trio

from bridge.config import BridgeSettings, ConfigError, load_settings
from bridge.imap.engines import engine_runtime
from bridge.ops.logs import configure_logging
from bridge.uidl.headers import SKIPPED_FIELDS
from bridge.uidl.importer import AccountReport, ImportOptions, ImportRequest, import_account
from bridge.uidl.old_server import OldServerAddress, parse_address

_REPORT_COLUMNS = ("account", "outcome", "matched", "only_old", "only_imap", "ambiguous", "size_differs", "replaced", "error")


class UsageError(Exception):
    pass


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    uidl = commands.add_parser("uidl", help="UIDLs: import them from the old POP3 server")
    actions = uidl.add_subparsers(dest="uidl_command", required=True)
    imports = actions.add_parser(
        "import", help="record an old POP3 server's UIDLs for the matching IMAP messages",
        description="Record the UIDLs an old POP3 server gives its messages for the matching IMAP messages, "
        "so devices keep them after the cut-over (docs/operators.md, \"Migrating from another POP3 server\").",
    )
    imports.add_argument("--config", type=Path, help="path to bridge.toml")
    imports.add_argument("--from", dest="old_server", required=True, metavar="URL", help="pop3s://host[:port] or pop3://host[:port]")
    imports.add_argument("account", nargs="?", help="the account (its IMAP login)")
    imports.add_argument("--password-file", type=Path, help="a file holding the account's password ('-': standard input)")
    imports.add_argument("--old-login", help="the login on the old server, if not the account")
    imports.add_argument("--accounts", type=Path, help="CSV: account, password or file:PATH, [old-server login]")
    imports.add_argument("--dry-run", action="store_true", help="write nothing; print what each device would see change")
    imports.add_argument("--lenient", action="store_true", help="record what matched even when old messages did not")
    imports.add_argument(
        "--ignore-header", action="append", default=[], metavar="NAME",
        help="leave this header field out of the comparison too (e.g. Received, for a migration that delivered anew)",
    )
    imports.add_argument("--ca-file", default="", help="CA certificates for the old server (default: the system's)")
    imports.add_argument("--no-verify", action="store_true", help="accept any certificate from the old server (WEAKENS)")
    imports.add_argument("--allow-plaintext", action="store_true", help="send passwords to a pop3:// server without STLS")
    imports.add_argument("--jobs", type=int, default=4, help="accounts imported at the same time (default 4)")
    imports.add_argument("--report", type=Path, help="also write the per-account report to this CSV file")
    imports.set_defaults(func=run)


def _password_from(source: str, where: str) -> str:
    if source.startswith("file:"):
        try:
            return Path(source[5:]).read_text().rstrip("\r\n")
        except OSError as exc:
            raise UsageError(f"{where}: cannot read {source[5:]!r}: {exc.strerror}") from None
    return source


def requests(args: argparse.Namespace, old_server: OldServerAddress) -> list[ImportRequest]:
    if (args.account is None) == (args.accounts is None):
        raise UsageError("give one ACCOUNT or --accounts FILE")
    if args.accounts is None:
        if args.password_file is None:
            if not sys.stdin.isatty():
                raise UsageError("give --password-file (or run on a terminal to be asked)")
            password = getpass.getpass(f"password of {args.account}: ")
        elif str(args.password_file) == "-":
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = _password_from(f"file:{args.password_file}", "--password-file")
        return [ImportRequest(args.account, password, args.old_login or args.account, old_server)]
    found: list[ImportRequest] = []
    try:
        with open(args.accounts, newline="") as handle:
            for number, row in enumerate(csv.reader(handle), 1):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                where = f"{args.accounts}, line {number}"
                if len(row) not in (2, 3) or not row[0].strip():
                    raise UsageError(f"{where}: expected account, password (or file:PATH)[, old-server login]")
                account = row[0].strip()
                old_login = row[2].strip() if len(row) == 3 and row[2].strip() else account
                found.append(ImportRequest(account, _password_from(row[1], where), old_login, old_server))
    except OSError as exc:
        raise UsageError(f"{args.accounts}: {exc.strerror}") from None
    return found


def describe(report: AccountReport, dry_run: bool) -> str:
    if report.outcome == "error":
        return f"{report.account}: error: {report.error}"
    outcome = {
        "recorded": "recorded",
        "dry run": "would be recorded",
        "not recorded": "NOT recorded (strict: old messages without a match; --lenient records the rest)",
        "nothing to record": "nothing to record",
    }[report.outcome]
    if dry_run and report.outcome == "not recorded":
        outcome = "would NOT be recorded (strict: old messages without a match; --lenient records the rest)"
    counts = (
        f"{report.matched} matched, {report.only_old} only on the old server, {report.only_imap} only on IMAP, "
        f"{report.ambiguous} ambiguous"
    )
    replaced = f", replacing an earlier import ({report.replaced} records)" if report.replaced else ""
    return f"{report.account}: {outcome}: {counts}{replaced}"


def print_diff(report: AccountReport, old_server: OldServerAddress, out: TextIO) -> None:
    out.write(f"--- {report.account} on {old_server} (UIDL)\n")
    out.write(f"+++ {report.account} through the bridge after the import (UIDL)\n")
    for line in report.diff:
        out.write(f"{line.mark} {line.number} {line.uidl}\n")


class Progress:
    """A bar on a terminal, nothing otherwise (the report lines show the progress there)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self._total, self._stream, self._done = total, stream, 0
        self._bar = stream.isatty()

    def step(self) -> None:
        self._done += 1
        if self._bar:
            filled = int(30 * self._done / max(self._total, 1))
            self._stream.write(f"\r[{'#' * filled}{' ' * (30 - filled)}] {self._done}/{self._total} accounts")
            if self._done == self._total:
                self._stream.write("\n")
            self._stream.flush()


async def import_all(
    items: list[ImportRequest], settings: BridgeSettings, options: ImportOptions, jobs: int,
    done: Callable[[int, AccountReport], None],
) -> list[AccountReport]:
    reports: list[AccountReport | None] = [None] * len(items)
    limiter = trio.CapacityLimiter(jobs)

    async def one(index: int, request: ImportRequest) -> None:
        async with limiter:
            reports[index] = report = await import_account(request, settings, options)
        done(index, report)

    async with engine_runtime(settings.upstream.engine), trio.open_nursery() as nursery:
        for index, request in enumerate(items):
            nursery.start_soon(one, index, request)
    return [report for report in reports if report is not None]


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"pop3-imap-bridge: bad configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging("warning", "console", stream=sys.stderr)
    try:
        old_server = parse_address(args.old_server)
        if args.jobs < 1:
            raise UsageError("--jobs must be at least 1")
        if not args.dry_run and not settings.uidl.imported:
            raise UsageError(
                "uidl.imported is off in the configuration: the bridge would not serve what is recorded. "
                "Set [uidl] imported = true first (or use --dry-run)"
            )
        items = requests(args, old_server)
    except (UsageError, ValueError) as exc:
        print(f"pop3-imap-bridge uidl import: {exc}", file=sys.stderr)
        return 2
    options = ImportOptions(
        dry_run=args.dry_run, lenient=args.lenient, ca_file=args.ca_file, verify=not args.no_verify,
        allow_plaintext=args.allow_plaintext,
        skipped_fields=SKIPPED_FIELDS | {name.lower() for name in args.ignore_header},
    )
    progress = Progress(len(items), sys.stderr)

    def done(_index: int, report: AccountReport) -> None:
        progress.step()
        print(describe(report, args.dry_run), flush=True)
        if args.dry_run and report.outcome != "error":
            print_diff(report, old_server, sys.stdout)

    reports = trio.run(import_all, items, settings, options, args.jobs, done)
    if args.report is not None:
        with open(args.report, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(_REPORT_COLUMNS)
            for report in reports:
                writer.writerow([getattr(report, column) for column in _REPORT_COLUMNS])
    wanted = "dry run" if args.dry_run else "recorded"
    good = sum(report.outcome == wanted for report in reports)
    errors = sum(report.outcome == "error" for report in reports)
    verb = "would be recorded" if args.dry_run else "recorded"
    print(f"{len(reports)} accounts: {good} {verb}, {len(reports) - good - errors} not, {errors} errors", flush=True)
    return 0 if good == len(reports) else 1
