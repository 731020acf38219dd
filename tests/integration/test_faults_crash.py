"""The bridge process is killed (SIGKILL: no clean-up of any kind) in the middle of applying
a QUIT, then started again. The upstream must be consistent: each marked message either
applied or still there intact, per-device state either the old version or the new one (or
both, which readers merge), never half of anything, and the restarted bridge must serve it.

The fault proxy holds the upstream command at the chosen point (the bridge is waiting for
its answer), the test kills the real `python -m bridge serve` process, and the held command
is then dropped with the connection, so the server never sees it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from sandbox import DovecotSandbox, Mailbox, numbered_messages
from tests.faultproxy import Fault, FaultProxy
from tests.harness import RawPop3, SubprocessBridge, pop3_unstuff, retr_payload

STATE_FOLDER = "POP3 Bridge State"
CLIENT_TIMEOUT = 60.0

# The guarantees hold on both engines: every test here runs on each.
pytestmark = pytest.mark.usefixtures("on_every_engine")


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as resources:
        yield resources


def start_bridge(stack: ExitStack, workdir: Path, port: int, policy: str) -> SubprocessBridge:
    workdir.mkdir()
    bridge = SubprocessBridge(workdir, port, extra_toml=f'[delete]\npolicy = "{policy}"\n')
    stack.callback(bridge.stop)
    return bridge.start()


def listing(bridge: SubprocessBridge, box: Mailbox) -> list[bytes]:
    """Every message the device sees, as RETR carries it; QUIT without DELE."""
    with RawPop3("127.0.0.1", bridge.port, timeout=CLIENT_TIMEOUT) as raw:
        raw.login(box.user, box.password)
        count = int(raw.command(b"STAT").split()[1])
        bodies = []
        for n in range(1, count + 1):
            status, body = raw.command_multiline(b"RETR %d" % n)
            assert status.startswith(b"+OK")
            bodies.append(pop3_unstuff(body))
        assert raw.command(b"QUIT").startswith(b"+OK")
    return bodies


def delete_and_quit(bridge: SubprocessBridge, box: Mailbox, numbers: list[int]) -> None:
    with RawPop3("127.0.0.1", bridge.port, timeout=CLIENT_TIMEOUT) as raw:
        raw.login(box.user, box.password)
        for n in numbers:
            assert raw.command(b"DELE %d" % n).startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")


def kill_during_quit(bridge: SubprocessBridge, proxy: FaultProxy, box: Mailbox, numbers: list[int], fault: Fault) -> None:
    proxy.arm(fault)
    raw = RawPop3("127.0.0.1", bridge.port, timeout=CLIENT_TIMEOUT)
    try:
        raw.login(box.user, box.password)
        for n in numbers:
            assert raw.command(b"DELE %d" % n).startswith(b"+OK")
        raw.send(b"QUIT\r\n")
        assert fault.fired.wait(30), "QUIT never reached the stalled command"
        assert bridge.process is not None
        bridge.process.kill()
        bridge.process.wait(30)
        # The device never heard +OK: its connection just died.
        try:
            reply = raw.status()
        except (ConnectionError, OSError):
            reply = b""
        assert not reply.startswith(b"+OK")
    finally:
        raw.close()
    # Drop the held command with its connection: the server never sees it.
    proxy.cut_all()
    proxy.disarm()


def test_killed_between_flagging_and_expunging(
    dovecot: DovecotSandbox, mailbox: Mailbox, stack: ExitStack, tmp_path: Path
) -> None:
    messages = list(numbered_messages(4))
    uids = mailbox.append(messages).uids
    proxy = stack.enter_context(FaultProxy(dovecot.host, dovecot.imap_port))
    bridge = start_bridge(stack, tmp_path / "first", proxy.port, "expunge")

    kill_during_quit(bridge, proxy, mailbox, [2, 3], Fault("stall", on_command=b"UID EXPUNGE"))

    observer = mailbox.observer()
    flags = {info.uid: info.flags for info in observer.messages()}
    assert sorted(flags) == uids  # nothing expunged
    assert ["\\Deleted" in flags[uid] for uid in uids] == [False, True, True, False]
    for uid, original in zip(uids, messages, strict=True):
        assert observer.fetch(uid) == original  # every message intact

    restarted = start_bridge(stack, tmp_path / "second", dovecot.imap_port, "expunge")
    # The flagged messages are hidden (docs/design.md, "Deletion, exactly"); the rest is served whole.
    assert listing(restarted, mailbox) == [retr_payload(messages[0]), retr_payload(messages[3])]
    delete_and_quit(restarted, mailbox, [1])
    assert mailbox.observer().uids() == uids[1:]


def test_killed_before_flagging(dovecot: DovecotSandbox, mailbox: Mailbox, stack: ExitStack, tmp_path: Path) -> None:
    messages = list(numbered_messages(3))
    uids = mailbox.append(messages).uids
    proxy = stack.enter_context(FaultProxy(dovecot.host, dovecot.imap_port))
    bridge = start_bridge(stack, tmp_path / "first", proxy.port, "expunge")

    kill_during_quit(bridge, proxy, mailbox, [1, 3], Fault("stall", on_command=b"UID STORE"))

    observer = mailbox.observer()
    assert all("\\Deleted" not in info.flags for info in observer.messages())
    restarted = start_bridge(stack, tmp_path / "second", dovecot.imap_port, "expunge")
    assert listing(restarted, mailbox) == [retr_payload(m) for m in messages]
    assert mailbox.observer().uids() == uids


@pytest.mark.parametrize(
    ("stall_at", "hidden_after"),
    [
        # The new state version was never written: the device still has its old state.
        (b"APPEND", {1}),
        # The new version is written, the old one not yet removed: both are there, and the
        # reader's union of them is the new state.
        (b"UID EXPUNGE", {1, 2, 3}),
    ],
)
def test_killed_while_saving_per_device_state(
    dovecot: DovecotSandbox,
    mailbox: Mailbox,
    stack: ExitStack,
    tmp_path: Path,
    stall_at: bytes,
    hidden_after: set[int],
) -> None:
    messages = list(numbered_messages(5))
    uids = mailbox.append(messages).uids
    proxy = stack.enter_context(FaultProxy(dovecot.host, dovecot.imap_port))
    bridge = start_bridge(stack, tmp_path / "first", proxy.port, "per-client")
    # A first, complete poll: the device's state (one version) hides message 1.
    delete_and_quit(bridge, mailbox, [1])
    # Now messages 2 and 3 (numbers 1 and 2 in this session); the save is interrupted.
    kill_during_quit(bridge, proxy, mailbox, [1, 2], Fault("stall", on_command=stall_at))

    # The maildrop itself is never touched by per-client deletion.
    observer = mailbox.observer()
    assert observer.uids() == uids
    assert all("\\Deleted" not in info.flags for info in observer.messages())
    for uid, original in zip(uids, messages, strict=True):
        assert observer.fetch(uid) == original
    versions = mailbox.observer(STATE_FOLDER).uids()
    assert len(versions) == (1 if stall_at == b"APPEND" else 2)

    restarted = start_bridge(stack, tmp_path / "second", dovecot.imap_port, "per-client")
    expected = [retr_payload(m) for n, m in enumerate(messages, 1) if n not in hidden_after]
    assert listing(restarted, mailbox) == expected
    # The next save merges whatever versions it reads into one. A version the interrupted
    # save had flagged \Deleted is superseded: not read, and left for the folder's expunge.
    delete_and_quit(restarted, mailbox, [1])
    state = mailbox.observer(STATE_FOLDER).messages()
    assert len([info for info in state if "\\Deleted" not in info.flags]) == 1
    assert len(state) == (1 if stall_at == b"APPEND" else 2)
    assert len(listing(restarted, mailbox)) == len(expected) - 1
