"""The demo IMAP upstream for deploy/docker-compose.yml (also runs outside a container).

Starts a private Dovecot with the project's sandbox (sandbox), creates one user and
seeds its INBOX with the demo messages, prints one JSON line `demo_upstream_ready`, and runs
until SIGTERM or SIGINT. Every start begins with a fresh mailbox.

Environment: DEMO_WORKDIR (default /srv/demo-upstream), DEMO_IMAP_PORT (143),
DEMO_POP3_PORT (1100, Dovecot's own POP3, handy for comparing), DEMO_USER and
DEMO_PASSWORD (demo / demo). The sandbox listens on 127.0.0.1 only, which is why the compose
file runs the bridge in this container's network namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

from sandbox import DovecotSandbox, append_messages, demo_messages


def main() -> int:
    workdir = Path(os.environ.get("DEMO_WORKDIR", "/srv/demo-upstream"))
    user = os.environ.get("DEMO_USER", "demo")
    password = os.environ.get("DEMO_PASSWORD", "demo")
    # Block the stop signals before Dovecot starts, then wait for one of them.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    sandbox = DovecotSandbox(
        workdir,
        imap_port=int(os.environ.get("DEMO_IMAP_PORT", "143")),
        pop3_port=int(os.environ.get("DEMO_POP3_PORT", "1100")),
    )
    with sandbox:
        sandbox.add_user(user, password)
        seeded = append_messages(sandbox.host, sandbox.imap_port, user, password, demo_messages())
        ready = {
            "event": "demo_upstream_ready",
            "imap": f"{sandbox.host}:{sandbox.imap_port}",
            "user": user,
            "messages": len(seeded.uids),
        }
        print(json.dumps(ready), flush=True)
        received = signal.sigwait(stop_signals)
        print(json.dumps({"event": "demo_upstream_stopping", "signal": signal.Signals(received).name}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
