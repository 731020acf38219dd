"""`./scripts/demo` (`python -m sandbox.demo`): the bridge on 127.0.0.1:1110 in front of a
private demo Dovecot. Runs from a source checkout: the sandbox is not part of the installed
package.

The Dovecot runs unprivileged from a fresh working directory (a new temporary one unless
`--workdir` names one), seeded with a few messages, and is stopped when the demo ends. What
the demo cannot do is said in two lines, the cause and the fix, never as a traceback.
"""

from __future__ import annotations

import argparse
import errno
import shutil
import socket
import sys
import tempfile
from functools import partial
from pathlib import Path

import trio

from bridge.config import load_settings
from bridge.ops.logs import configure_logging
from bridge.ops.service import run_until_signalled
from sandbox.dovecot import (
    DovecotError,
    DovecotNotInstalledError,
    DovecotSandbox,
    DovecotStartError,
)
from sandbox.seeding import SeedingError, append_messages, demo_messages

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"


class DemoFailed(Exception):
    """The demo cannot run; `cause` and `fix` are shown to the user as they are."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(cause)
        self.cause = cause
        self.fix = fix


def ready_banner(port: int, messages: int, workdir: Path) -> str:
    return f"""
pop3-imap-bridge demo is ready: POP3 on 127.0.0.1:{port}, user {DEMO_USER!r}, password {DEMO_PASSWORD!r}
({messages} messages, served from a private Dovecot IMAP server with its files in {workdir}).

Try, from another terminal:

  curl -u {DEMO_USER}:{DEMO_PASSWORD} pop3://127.0.0.1:{port}/      # list the messages
  curl -u {DEMO_USER}:{DEMO_PASSWORD} pop3://127.0.0.1:{port}/1     # read the first one

or with Python's own POP3 client:

  python3 -c 'import poplib; p = poplib.POP3("127.0.0.1", {port}); p.user("{DEMO_USER}"); p.pass_("{DEMO_PASSWORD}"); print(p.stat()); print(b"\\n".join(p.retr(1)[1]).decode())'

Ctrl-C stops the bridge and the demo Dovecot.
"""


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DemoFailed(
                    f"127.0.0.1:{port} is already in use by another program (an earlier demo still running?)",
                    f"stop that program, or choose another port: ./scripts/demo --port {port + 1}",
                ) from None
            raise DemoFailed(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}", "choose another port with --port") from None


def _first_fatal_line(error: DovecotStartError) -> str:
    for line in str(error).splitlines():
        if "Fatal:" in line:
            return line.split("Fatal:", 1)[1].strip()
    return str(error).splitlines()[0]


def _start_dovecot(workdir: Path) -> DovecotSandbox:
    try:
        dovecot = DovecotSandbox(workdir / "dovecot", pop3=False)
        dovecot.start()
    except DovecotNotInstalledError as exc:
        raise DemoFailed(f"Dovecot is not installed: {exc}", "run ./scripts/demo, which installs it (or scripts/install-deps demo)") from None
    except DovecotStartError as exc:
        raise DemoFailed(
            f"the demo Dovecot did not start: {_first_fatal_line(exc)}",
            f"run scripts/install-deps demo to repair the installation; Dovecot's log is in {workdir / 'dovecot'}",
        ) from None
    except DovecotError as exc:
        raise DemoFailed(str(exc).splitlines()[0], "run the demo with --workdir pointing at a directory under /tmp") from None
    return dovecot


def run_demo(workdir: Path | None, port: int = 1110) -> int:
    """Runs until Ctrl-C or SIGTERM; returns the exit status (1 with cause and fix printed)."""
    own_workdir = workdir is None
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="pop3-imap-bridge-demo-"))
        # mkdtemp makes it private; Dovecot's unprivileged processes must get through it.
        workdir.chmod(0o755)
    else:
        workdir = workdir.resolve()
        # A fresh mailbox every time, so the demo always starts with the same mail.
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
    try:
        _check_port_free(port)
        dovecot = _start_dovecot(workdir)
        with dovecot:
            _serve(dovecot, port, workdir)
    except DemoFailed as failure:
        print(f"pop3-imap-bridge demo: cannot start: {failure.cause}\n  fix: {failure.fix}", file=sys.stderr)
        return 1
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _serve(dovecot: DovecotSandbox, port: int, workdir: Path) -> None:
    dovecot.add_user(DEMO_USER, DEMO_PASSWORD)
    messages = demo_messages()
    try:
        append_messages(dovecot.host, dovecot.imap_port, DEMO_USER, DEMO_PASSWORD, messages)
    except SeedingError as exc:
        raise DemoFailed(f"could not put the demo mail into Dovecot: {exc}", f"see Dovecot's log in {dovecot.workdir}") from None
    settings = load_settings(
        None,
        {
            "pop3": {"listen": [f"127.0.0.1:{port}"]},
            # The demo Dovecot speaks plain IMAP on loopback only.
            "upstream": {"host": dovecot.host, "port": dovecot.imap_port, "tls": "none"},
            "logging": {"format": "console"},
        },
    )
    configure_logging(settings.logging.level, settings.logging.format, stream=sys.stdout)

    def announce(state: str) -> None:
        if state == "ready":
            print(ready_banner(port, len(messages), workdir), flush=True)

    try:
        trio.run(partial(run_until_signalled, settings, notify=announce))
    except* OSError as group:
        error = group.exceptions[0]
        assert isinstance(error, OSError)
        raise DemoFailed(
            f"the bridge cannot listen on 127.0.0.1:{port}: {error.strerror or error}",
            f"choose another port: ./scripts/demo --port {port + 1}",
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="Run the bridge on 127.0.0.1 in front of a private Dovecot seeded with demo mail (Ctrl-C stops both).",
    )
    parser.add_argument("--port", type=int, default=1110, help="POP3 port on 127.0.0.1 (default 1110)")
    parser.add_argument(
        "--workdir", type=Path, default=None,
        help="where the demo Dovecot keeps its files (emptied first; default: a new temporary directory, removed at the end)",
    )
    args = parser.parse_args(argv)
    try:
        return run_demo(args.workdir, args.port)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
