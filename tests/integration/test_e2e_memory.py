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
