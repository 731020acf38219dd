"""Soak: hundreds of POP3 clients poll, retrieve and delete at once, for a bounded time, while
new mail keeps arriving over IMAP APPEND; some clients hang up mid-session (the injected
faults). Afterwards every appended message was delivered exactly once to each device that
polls it (by policy), or is still there for it; the bridge's memory and open file
descriptors are flat; and its log holds no errors.

Two sizes: a CI-sized run (20 s, 40 clients) in the default suite, and the long one
(`./scripts/test -m soak`, deselected by default), sized by SOAK_SECONDS (default 120) and
SOAK_CLIENTS (default 200).
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from sandbox import DovecotSandbox, Mailbox
from tests.harness import RawPop3, SubprocessBridge

LONG_SECONDS = float(os.environ.get("SOAK_SECONDS", "120"))
LONG_CLIENTS = int(os.environ.get("SOAK_CLIENTS", "200"))
EXPUNGE_ACCOUNTS = 12
PER_CLIENT_ACCOUNTS = 6
DEVICES = ("phone", "laptop", "printer")
_SUBJECT = re.compile(rb"^Subject: (soak-[0-9a-z-]+)\r$", re.MULTILINE)


def soak_message(account: int, serial: int) -> tuple[str, bytes]:
    subject = f"soak-{account}-{serial}"
    body = "".join(f"line {i} of {subject}\r\n" for i in range(random.randint(1, 60)))
    if serial % 7 == 0:
        body += ".\r\n..\r\n"  # byte-stuffing under load, too
    data = f"From: soak@example.org\r\nTo: you@example.org\r\nSubject: {subject}\r\n\r\n{body}".encode()
    return subject, data


@dataclass
class Ledger:
    """What happened, as the clients saw it."""

    appended: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    # (account, device) -> subjects delivered in sessions whose QUIT said +OK
    delivered: dict[tuple[int, str], Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    sessions: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    failures: list[str] = field(default_factory=list)


def poll_once(port: int, box: Mailbox, login: str, key: tuple[int, str], ledger: Ledger, rng: random.Random) -> None:
    with RawPop3("127.0.0.1", port, timeout=120) as raw:
        raw.command(b"USER " + login.encode())
        reply = raw.command(b"PASS " + box.password.encode())
        if reply.startswith(b"-ERR [IN-USE]"):
            with ledger.lock:
                ledger.sessions["in_use"] += 1
            return
        if not reply.startswith(b"+OK"):
            raise AssertionError(f"login refused: {reply!r}")
        count = int(raw.command(b"STAT").split()[1])
        got: list[str] = []
        abort_at = rng.randint(1, count) if count and rng.random() < 0.1 else None
        for n in range(1, count + 1):
            status, body = raw.command_multiline(b"RETR %d" % n)
            if not status.startswith(b"+OK"):
                raise AssertionError(f"RETR {n}: {status!r}")
            found = _SUBJECT.search(body)
            assert found is not None, body[:200]
            got.append(found.group(1).decode())
            if n == abort_at:
                # Injected: the client hangs up mid-session, after a DELE, without QUIT.
                raw.command(b"DELE %d" % n)
                with ledger.lock:
                    ledger.sessions["aborted"] += 1
                return
            assert raw.command(b"DELE %d" % n).startswith(b"+OK")
        reply = raw.command(b"QUIT")
        if not reply.startswith(b"+OK"):
            raise AssertionError(f"QUIT: {reply!r}")
        with ledger.lock:
            ledger.sessions["committed"] += 1
            ledger.delivered[key].update(got)


def visible(port: int, box: Mailbox, login: str) -> set[str]:
    with RawPop3("127.0.0.1", port, timeout=120) as raw:
        raw.login(login, box.password)
        count = int(raw.command(b"STAT").split()[1])
        subjects = set()
        for n in range(1, count + 1):
            status, body = raw.command_multiline(b"TOP %d 0" % n)
            found = _SUBJECT.search(body)
            assert found is not None
            subjects.add(found.group(1).decode())
        assert raw.command(b"QUIT").startswith(b"+OK")
    return subjects


def bridge_usage(process: psutil.Process) -> tuple[int, int]:
    """(RSS, open descriptors) of the bridge process and its children."""
    procs = [process, *process.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs), sum(p.num_fds() for p in procs)


@pytest.mark.parametrize(
    ("seconds", "clients"),
    [pytest.param(20.0, 40, id="ci-sized"), pytest.param(LONG_SECONDS, LONG_CLIENTS, id="long", marks=pytest.mark.soak)],
)
def test_soak(
    dovecot: DovecotSandbox, mailbox_factory: Callable[[], Mailbox], tmp_path: Path, seconds: float, clients: int
) -> None:
    expunge_boxes = [mailbox_factory() for _ in range(EXPUNGE_ACCOUNTS)]
    per_client_boxes = [mailbox_factory() for _ in range(PER_CLIENT_ACCOUNTS)]
    boxes = expunge_boxes + per_client_boxes
    overrides = "".join(f'[delete.accounts."{box.user}"]\npolicy = "per-client"\n' for box in per_client_boxes)
    # Every client comes from 127.0.0.1 and all start at once: the per-address cap (100 by
    # default) must not be what the soak measures.
    cap = {"BRIDGE_POP3__MAX_CONNECTIONS_PER_ADDRESS": str(clients + 50)}
    bridge = SubprocessBridge(tmp_path, dovecot.imap_port, extra_toml=overrides, env=cap).start()
    ledger = Ledger()
    try:
        assert bridge.process is not None
        process = psutil.Process(bridge.process.pid)
        # Who polls what: every account has clients; per-client accounts one per device.
        pollers: list[tuple[int, str, tuple[int, str]]] = []
        for i in range(clients):
            account = i % len(boxes)
            box = boxes[account]
            if account < EXPUNGE_ACCOUNTS:
                pollers.append((account, box.user, (account, "default")))
            else:
                device = DEVICES[(i // len(boxes)) % len(DEVICES)]
                pollers.append((account, f"{box.user}#{device}", (account, device)))

        stop = threading.Event()

        def append_forever() -> None:
            rng = random.Random(1)
            serial = 0
            while not stop.is_set():
                account = rng.randrange(len(boxes))
                batch = [soak_message(account, serial + k) for k in range(rng.randint(1, 5))]
                serial += len(batch)
                boxes[account].append([data for _subject, data in batch])
                with ledger.lock:
                    ledger.appended[account].update(subject for subject, _data in batch)
                time.sleep(0.01)

        def poll_forever(index: int, account: int, login: str, key: tuple[int, str]) -> None:
            rng = random.Random(index)
            try:
                while not stop.is_set():
                    poll_once(bridge.port, boxes[account], login, key, ledger, rng)
                    time.sleep(rng.uniform(0.05, 0.5))
            except Exception as exc:  # reported below, with the client that hit it
                with ledger.lock:
                    ledger.failures.append(f"client {index} ({login}): {type(exc).__name__}: {exc}")

        appender = threading.Thread(target=append_forever, name="soak-appender")
        appender.start()
        threads = [
            threading.Thread(target=poll_forever, args=(i, *poller), name=f"soak-{i}") for i, poller in enumerate(pollers)
        ]
        for thread in threads:
            thread.start()
        time.sleep(seconds / 4)
        warm = bridge_usage(process)
        time.sleep(seconds * 3 / 4)
        late = bridge_usage(process)
        stop.set()
        appender.join(120)
        for thread in threads:
            thread.join(300)
        assert not any(thread.is_alive() for thread in (appender, *threads)), "a soak client hung"
        assert ledger.failures == []

        # Quiet again: what the bridge holds now is what it holds at rest (parked
        # connections included), and it must not have grown with the traffic.
        idle = bridge_usage(process)
        usage = f"rss/fds after warm-up {warm}, at the end {late}, idle {idle}"
        assert late[0] <= warm[0] * 1.5, f"memory grew under steady load: {usage}"
        assert idle[1] <= warm[1] + 10, f"descriptors leaked: {usage}"
        print(f"soak: {usage}")

        # Exactly once, or still there.
        for account, box in enumerate(boxes):
            appended = ledger.appended[account]
            devices = ("default",) if account < EXPUNGE_ACCOUNTS else DEVICES
            if account < EXPUNGE_ACCOUNTS:
                remaining = visible(bridge.port, box, box.user)
            for device in devices:
                delivered = ledger.delivered[(account, device)]
                twice = [subject for subject, n in delivered.items() if n > 1]
                assert twice == [], f"account {account} device {device}: delivered twice: {twice[:5]}"
                if account >= EXPUNGE_ACCOUNTS:
                    remaining = visible(bridge.port, box, f"{box.user}#{device}")
                if account < EXPUNGE_ACCOUNTS:
                    # All devices of an expunge account share one maildrop.
                    delivered = sum((ledger.delivered[(account, d)] for d in devices), Counter())
                assert not set(delivered) & remaining, "delivered and deleted, yet still listed"
                assert set(delivered) | remaining == appended, (
                    f"account {account} device {device}: lost {sorted(appended - set(delivered) - remaining)[:5]}"
                )

        events = bridge.events()
        bad = [e for e in events if e.get("level") in ("error", "critical", "exception")]
        assert bad == [], bad[:3]
        warnings = Counter(e.get("event") for e in events if e.get("level") == "warning")
        assert warnings == Counter(), warnings
        assert ledger.sessions["committed"] > clients  # it did soak
    finally:
        bridge.stop()
        print(
            f"soak: {seconds:g} s, {clients} clients, sessions {dict(ledger.sessions)}, "
            f"appended {sum(len(s) for s in ledger.appended.values())}"
        )
