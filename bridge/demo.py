"""`pop3-imap-bridge demo`: the bridge on 127.0.0.1:1110 in front of a private demo Dovecot."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import trio

from bridge.config import load_settings
from bridge.observability import configure_logging
from bridge.sandbox.dovecot import DovecotSandbox
from bridge.sandbox.seeding import append_messages, demo_messages
from bridge.server import run_until_signalled

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"


def run_demo(workdir: Path, port: int = 1110) -> int:
    workdir = workdir.resolve()
    # A fresh mailbox every time, so the demo always starts with the same mail.
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    with DovecotSandbox(workdir / "dovecot") as dovecot:
        dovecot.add_user(DEMO_USER, DEMO_PASSWORD)
        messages = demo_messages()
        append_messages(dovecot.host, dovecot.imap_port, DEMO_USER, DEMO_PASSWORD, messages)
        settings = load_settings(
            None,
            {
                "pop3": {"listen": [f"127.0.0.1:{port}"]},
                # The demo Dovecot speaks plain IMAP on loopback only.
                "upstream": {"host": dovecot.host, "port": dovecot.imap_port, "tls": "none"},
                "logging": {"format": "console"},
            },
        )
        print(
            f"""
Demo Dovecot (IMAP) on {dovecot.host}:{dovecot.imap_port}, files in {dovecot.workdir}
with {len(messages)} messages for user {DEMO_USER!r}, password {DEMO_PASSWORD!r}.
The bridge serves it as POP3 on 127.0.0.1:{port}. Try:

  python3 -c 'import poplib; p = poplib.POP3("127.0.0.1", {port}); p.user("{DEMO_USER}"); p.pass_("{DEMO_PASSWORD}"); print(p.stat()); print(b"\\n".join(p.retr(1)[1]).decode())'

or: telnet 127.0.0.1 {port}  then  USER {DEMO_USER} / PASS {DEMO_PASSWORD} / LIST / RETR 1 / QUIT

Ctrl-C stops the bridge and the demo Dovecot.
""",
            flush=True,
        )
        configure_logging(settings.logging.level, settings.logging.format, stream=sys.stdout)
        trio.run(run_until_signalled, settings)
    return 0
