"""The bridge streams messages: its memory does not grow with the size of the message it
sends. Measured on the real `python -m bridge serve` process with psutil."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import psutil
import pytest

from sandbox import DovecotSandbox, Mailbox, big_message, numbered_messages
from tests.harness import RawPop3, SubprocessBridge, pop3_unstuff

MESSAGE_SIZE = 100 * 1024 * 1024
# A bridge that held the whole message would grow by at least MESSAGE_SIZE (100 MiB), and by
# about twice that with the dot-stuffed copy. Streaming keeps a few pieces alive at once (the
# piece being read, the stuffed output, the previous piece, allocator slack), a few MiB with
# either engine whatever the message's size. The bound sits far from both: several times what
# streaming needs, less than half of what holding the message would.
MAX_GROWTH = 40 * 1024 * 1024


class RssSampler:
    """Samples a process's resident set size in a thread until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self.samples += 1
            self._stop.wait(0.002)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.peak = max(self.peak, self._process.memory_info().rss)


@pytest.mark.parametrize("engine", ["trio", "aioimaplib"])
def test_retr_of_100_mb_does_not_hold_the_message_in_memory(
    dovecot: DovecotSandbox, mailbox: Mailbox, tmp_path: Path, engine: str
) -> None:
    message = big_message(MESSAGE_SIZE)
    mailbox.append([*numbered_messages(1), message])
    with SubprocessBridge(tmp_path, dovecot.imap_port, env={"BRIDGE_UPSTREAM__ENGINE": engine}) as bridge:
        assert bridge.process is not None
        with RawPop3("127.0.0.1", bridge.port) as pop:
            pop.login(mailbox.user, mailbox.password)
            # A small RETR first, so code paths and buffers every RETR needs are warm and
            # only what grows with the message size is measured below.
            status, _ = pop.command_multiline(b"RETR 1")
            assert status.startswith(b"+OK")
            with RssSampler(bridge.process.pid) as rss:
                status, body = pop.command_multiline(b"RETR 2")
            assert status == b"+OK %d octets\r\n" % MESSAGE_SIZE
            # The message arrived whole: the measurement is of a real 20 MiB transfer.
            assert hashlib.sha256(pop3_unstuff(body)).digest() == hashlib.sha256(message).digest()
            assert pop.command(b"QUIT").startswith(b"+OK")
    growth = rss.peak - rss.baseline
    assert rss.samples > 0
    assert growth < MAX_GROWTH, (
        f"RSS grew by {growth / 2**20:.1f} MiB while sending a {MESSAGE_SIZE / 2**20:.0f} MiB "
        f"message (baseline {rss.baseline / 2**20:.1f} MiB, peak {rss.peak / 2**20:.1f} MiB)"
    )


# Many clients slower than the upstream, then stopped mid-RETR: each session holds what it read
# from the upstream and could not send yet. Before pieces followed the client's pace, a read
# took all the upstream had delivered meanwhile (up to 1 MiB, and a dot-stuffed copy): 40 such
# sessions grew the bridge by 86 MiB. Pieces that start at 32 KiB and shrink while sends wait
# keep them at a few MiB together; the bound sits between, away from both.
STALLED_CLIENTS = 40
MAX_STALLED_GROWTH = 16 * 1024 * 1024


def test_clients_that_stop_reading_hold_little_memory_each(dovecot: DovecotSandbox, tmp_path: Path) -> None:
    import socket
    import time

    boxes = [dovecot.new_mailbox() for _ in range(STALLED_CLIENTS)]
    message = big_message(8 * 1024 * 1024, tag="stalled")
    for box in boxes:
        box.append([message])
    env = {"BRIDGE_CACHE__MAX_BYTES": "0", "BRIDGE_POP3__MAX_CONNECTIONS_PER_ADDRESS": "1000"}
    with SubprocessBridge(tmp_path, dovecot.imap_port, env=env) as bridge:
        assert bridge.process is not None
        process = psutil.Process(bridge.process.pid)
        baseline = process.memory_info().rss
        clients = []
        try:
            for box in boxes:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", bridge.port))
                sock.recv(100)
                sock.sendall(b"USER %s\r\nPASS %s\r\nRETR 1\r\n" % (box.user.encode(), box.password.encode()))
                clients.append(sock)
            # Each reads a little, pauses (the upstream meanwhile fills the bridge's receive
            # buffer: a fast server and a slow client), reads a little more, then stops.
            for pause in (0.0, 0.5):
                time.sleep(pause)
                for sock in clients:
                    received = 0
                    while received < 512 * 1024:
                        received += len(sock.recv(65536))
            # Every session has sent what the socket buffers take and waits for its client:
            # the bridge's CPU time stops moving.
            last, steady = -1.0, 0
            while steady < 5:
                time.sleep(0.2)
                used = sum(process.cpu_times()[:2])
                steady = steady + 1 if used == last else 0
                last = used
            growth = process.memory_info().rss - baseline
        finally:
            for sock in clients:
                sock.close()
    assert growth <= MAX_STALLED_GROWTH, f"{growth / 1048576:.1f} MiB for {STALLED_CLIENTS} stalled clients"
