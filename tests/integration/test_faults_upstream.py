"""The upstream connection breaks for real (tests/faultproxy.py between the bridge and
Dovecot): cut, reset or stalled in the middle of RETR, QUIT, or a move. The client must
never take a truncated message for a whole one, no message may be lost, nothing unmarked
may be deleted, and the next session must work.

What state each interruption leaves is the one docs/operators.md, "Guarantees", states; these tests are
its proof.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest

from sandbox import DovecotSandbox, ImapObserver, Mailbox, big_message, numbered_messages
from tests.faultproxy import Fault, FaultProxy
from tests.harness import (
    RawPop3,
    ThreadedBridge,
    bridge_settings,
    pop3_unstuff,
    retr_payload,
    wait_until,
)

# The socket timeout only keeps a broken test from hanging; the behaviour under test is
# the bridge answering (or closing) first.
CLIENT_TIMEOUT = 60.0
TEMP = b"-ERR [SYS/TEMP]"

# The guarantees hold on both engines: every test here runs on each.
pytestmark = pytest.mark.usefixtures("on_every_engine")


class Rig:
    """A bridge whose upstream connections all go through a fault proxy."""

    def __init__(self, proxy: FaultProxy, bridge: ThreadedBridge) -> None:
        self.proxy = proxy
        self.bridge = bridge

    def client(self, box: Mailbox, *, login: bool = True) -> RawPop3:
        raw = RawPop3("127.0.0.1", self.bridge.port, timeout=CLIENT_TIMEOUT)
        if login:
            raw.login(box.user, box.password)
        return raw


@pytest.fixture
def rig_factory(dovecot: DovecotSandbox) -> Iterator[Callable[..., Rig]]:
    started: list[tuple[FaultProxy, ThreadedBridge]] = []

    def make(**sections: dict[str, object]) -> Rig:
        proxy = FaultProxy(dovecot.host, dovecot.imap_port).start()
        try:
            bridge = ThreadedBridge(bridge_settings(proxy.port, **sections)).start()
        except BaseException:
            proxy.stop()
            raise
        started.append((proxy, bridge))
        return Rig(proxy, bridge)

    yield make
    for proxy, bridge in started:
        # Stalled upstream connections must not keep the bridge from stopping.
        proxy.stop()
        bridge.stop()


def drain(raw: RawPop3) -> tuple[bytes, bool]:
    """Everything the server still sends, and whether it then closed the connection."""
    data = raw.take_buffered()
    while True:
        try:
            chunk = raw.sock.recv(1 << 20)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def fresh_observer(box: Mailbox) -> ImapObserver:
    # A new session, so it sees what other sessions did without waiting for NOOP updates.
    return box.observer()


def flags_by_uid(box: Mailbox) -> dict[int, frozenset[str]]:
    return {info.uid: info.flags for info in fresh_observer(box).messages()}


# -- RETR ---------------------------------------------------------------------------------

# The trio engine streams RETR out of one partial FETCH, BODY.PEEK[]<0.size>, as its literal
# arrives (bridge/session/retrieval.py): every fault strikes inside that one answer, whose first
# line, "* 1 FETCH (UID n BODY[]<0> {1500000}", is about 37 bytes. The message is bigger than
# what one read of the socket brings (1 MiB), so the trio engine always passes a first piece on
# before it can reach the end. The aioimaplib engine reads fetch_chunk (4096) pieces, each a
# FETCH of its own and vouched for by its own tagged OK; the faults count the bytes of all.
# What the client gets is pinned per fault and engine: a temporary -ERR while nothing of the
# message has gone out (the session goes on), else +OK and part of it, then the bridge hangs up.
RETR_FETCH = b"BODY.PEEK[]<0."
BIG_SIZE = 1_500_000
TEMPORARY_ERROR, CLOSED_MID_MESSAGE = "temporary_error", "closed_mid_message"
MID_RETR_FAULTS = {
    # inside the answer's first line, before the bridge has said +OK
    "cut_before_the_literal": (
        Fault("cut", on_command=RETR_FETCH, when="after", after_bytes=20),
        {"trio": TEMPORARY_ERROR, "aioimaplib": TEMPORARY_ERROR},
    ),
    # trio: the client already has the first part of the message; aioimaplib: the first
    # 4096-byte piece never completed
    "reset_early_in_the_literal": (
        Fault("reset", on_command=RETR_FETCH, when="after", after_bytes=1500),
        {"trio": CLOSED_MID_MESSAGE, "aioimaplib": TEMPORARY_ERROR},
    ),
    "cut_in_the_middle_of_the_literal": (
        Fault("cut", on_command=RETR_FETCH, when="after", after_bytes=30_000),
        {"trio": CLOSED_MID_MESSAGE, "aioimaplib": CLOSED_MID_MESSAGE},
    ),
    # trio: the whole body arrived, but not the server's tagged OK that vouches for it
    "cut_before_the_tagged_ok": (
        Fault("cut", on_command=RETR_FETCH, when="after", after_bytes=BIG_SIZE + 42),
        {"trio": CLOSED_MID_MESSAGE, "aioimaplib": CLOSED_MID_MESSAGE},
    ),
}


# A slow reader's RETR of a big message is spooled once a piece took a while to go out: the
# rest is read at once into a file, and sent from there after the IMAP connection is let go.
# A fault while the spool reads, or once it holds the whole body but before the tagged OK
# that vouches for it, must end as it does for a stream: +OK, part of it, no terminator.
SPOOL_FAULTS = {
    "cut_while_spooling": Fault("cut", on_command=RETR_FETCH, when="after", after_bytes=1_000_000),
    "cut_before_the_tagged_ok": Fault("cut", on_command=RETR_FETCH, when="after", after_bytes=BIG_SIZE + 42),
}


@pytest.mark.parametrize("fault_name", sorted(SPOOL_FAULTS))
def test_upstream_lost_while_spooling_never_passes_off_a_truncated_message(
    rig_factory: Callable[..., Rig], mailbox: Mailbox, fault_name: str
) -> None:
    big = big_message(BIG_SIZE, dot_every=7)
    uid = mailbox.append([big]).uids[0]
    # (The aioimaplib engine reads fetch_chunk pieces: a small one is its first piece, so
    # the fault strikes while it spools too.)
    rig = rig_factory(upstream={"fetch_chunk": 65536})
    armed = SPOOL_FAULTS[fault_name]
    fault = rig.proxy.arm(Fault(armed.action, on_command=armed.on_command, when=armed.when, after_bytes=armed.after_bytes))
    with rig.client(mailbox) as raw:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.send(b"RETR 1\r\n")
        # Not reading for a while: the first piece waits for the client, which makes it a
        # slow reader whose message is spooled.
        time.sleep(0.5)
        status = raw.status()
        assert status.startswith(b"+OK"), status
        rest, closed = drain(raw)
    assert closed
    assert b"\r\n.\r\n" not in rest
    assert big.startswith(rest.replace(b"\n..", b"\n."))
    assert fault.fired.is_set()
    events = rig.bridge.events()
    assert [e["uid"] for e in events if e["event"] == "retrieve_spooled"] == [uid]
    assert [(e["level"], e["uid"]) for e in events if e["event"] == "retrieve_aborted"] == [("warning", uid)]
    # The next session gets the whole message.
    with rig.client(mailbox) as raw:
        status, body = raw.command_multiline(b"RETR 1")
        assert status.startswith(b"+OK")
        assert pop3_unstuff(body) == retr_payload(big)
        assert raw.command(b"QUIT").startswith(b"+OK")


@pytest.mark.parametrize("fault_name", sorted(MID_RETR_FAULTS))
def test_upstream_lost_mid_retr_never_passes_off_a_truncated_message(
    rig_factory: Callable[..., Rig], mailbox: Mailbox, fault_name: str, on_every_engine: str
) -> None:
    big = big_message(BIG_SIZE, dot_every=7)
    small = list(numbered_messages(2))
    uids = mailbox.append([big, *small]).uids
    # fetch_chunk 4096 keeps the big message out of the read-ahead of small messages.
    rig = rig_factory(upstream={"fetch_chunk": 4096})
    armed, outcomes = MID_RETR_FAULTS[fault_name]
    fault = rig.proxy.arm(Fault(armed.action, on_command=armed.on_command, when=armed.when, after_bytes=armed.after_bytes))

    with rig.client(mailbox) as raw:
        assert raw.command(b"DELE 2").startswith(b"+OK")
        raw.send(b"RETR 1\r\n")
        status = raw.status()
        if outcomes[on_every_engine] == CLOSED_MID_MESSAGE:
            assert status.startswith(b"+OK"), status
            rest, closed = drain(raw)
            # The bridge hung up instead of finishing: no terminator line anywhere.
            assert closed
            assert b"\r\n.\r\n" not in rest
            # What did arrive is the message's beginning, stuffed as it should be.
            assert big.startswith(rest.replace(b"\n..", b"\n."))
            aborted = [e for e in rig.bridge.events() if e["event"] == "retrieve_aborted"]
            assert [(e["level"], e["uid"]) for e in aborted] == [("warning", uids[0])]
            kept = uids  # the session never completed a QUIT: nothing was deleted
        else:
            # The first piece never arrived: a plain temporary error, and the session goes
            # on; its broken upstream connection is replaced at its next command that needs
            # the server, so its QUIT applies the DELE.
            assert status.startswith(TEMP), status
            assert raw.command(b"NOOP").startswith(b"+OK")
            assert raw.command(b"QUIT").startswith(b"+OK")
            kept = [uids[0], uids[2]]
    assert fault.fired.is_set()

    assert sorted(flags_by_uid(mailbox)) == kept
    assert all("\\Deleted" not in flags for flags in flags_by_uid(mailbox).values())
    # The next session works and gets the whole message.
    with rig.client(mailbox) as raw:
        assert raw.command(b"STAT").startswith(b"+OK %d " % len(kept))
        status, body = raw.command_multiline(b"RETR 1")
        assert status.startswith(b"+OK")
        assert pop3_unstuff(body) == retr_payload(big)
        assert raw.command(b"QUIT").startswith(b"+OK")


# -- QUIT ---------------------------------------------------------------------------------

# Where the upstream breaks while QUIT applies DELE 1 and DELE 2 of three messages, and what
# must then be true of the two marked messages upstream.
QUIT_FAULTS = {
    # nothing reached the server: both marked messages untouched and listed again
    "cut_before_store": (Fault("cut", on_command=b"UID STORE"), "untouched"),
    # flagged but not expunged: hidden from POP3, removed by the owner's next expunge
    "cut_before_expunge": (Fault("cut", on_command=b"UID EXPUNGE"), "flagged"),
    "reset_before_expunge": (Fault("reset", on_command=b"UID EXPUNGE"), "flagged"),
    # the server expunged but its OK never arrived: gone, and QUIT still said -ERR
    "cut_after_expunge": (Fault("cut", on_command=b"UID EXPUNGE", when="after"), "gone"),
}


@pytest.mark.parametrize("fault_name", sorted(QUIT_FAULTS))
def test_upstream_lost_during_quit_deletes_nothing_unmarked(
    rig_factory: Callable[..., Rig], mailbox: Mailbox, fault_name: str
) -> None:
    fault, expected = QUIT_FAULTS[fault_name]
    messages = list(numbered_messages(3))
    uids = mailbox.append(messages).uids
    rig = rig_factory()
    rig.proxy.arm(fault)

    with rig.client(mailbox) as raw:
        assert raw.command(b"DELE 1").startswith(b"+OK")
        assert raw.command(b"DELE 2").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(TEMP)
    assert fault.fired.is_set()
    # What an operator sees (docs/operators.md, "Logs"): the deletions that failed.
    failed = [e for e in rig.bridge.events() if e["event"] == "deletions_failed"]
    assert [(e["level"], e["count"], e["policy"]) for e in failed] == [("warning", 2, "expunge")]

    flags = flags_by_uid(mailbox)
    # The unmarked message is always there, unflagged and intact.
    assert "\\Deleted" not in flags[uids[2]]
    assert fresh_observer(mailbox).fetch(uids[2]) == messages[2]
    marked = uids[:2]
    if expected == "untouched":
        assert all(uid in flags and "\\Deleted" not in flags[uid] for uid in marked)
        listed = 3
    elif expected == "flagged":
        assert all("\\Deleted" in flags[uid] for uid in marked)
        for uid, original in zip(marked, messages, strict=False):
            assert fresh_observer(mailbox).fetch(uid) == original
        listed = 1
    else:
        assert not set(marked) & set(flags)
        listed = 1

    with rig.client(mailbox) as raw:
        assert raw.command(b"STAT").startswith(b"+OK %d " % listed)
        status, body = raw.command_multiline(b"RETR %d" % listed)
        assert pop3_unstuff(body) == retr_payload(messages[2])
        assert raw.command(b"QUIT").startswith(b"+OK")

    if expected == "flagged":
        # docs/design.md: a message left flagged \Deleted goes when the owner (or the server's
        # clean-up) expunges the folder; the bridge itself never sends a plain EXPUNGE.
        assert not any(line.split(b" ", 2)[1:2] == [b"EXPUNGE"] for line in rig.proxy.lines_to_server())
        owner = fresh_observer(mailbox)
        owner.imap.expunge()
        assert fresh_observer(mailbox).uids() == [uids[2]]


# -- move without MOVE: COPY, then STORE + EXPUNGE ------------------------------------------

MOVE_FOLDER = "POP Downloaded"
MOVE_FAULTS = {
    # nothing copied, nothing flagged
    "cut_before_copy": (Fault("cut", on_command=b"UID COPY"), "untouched"),
    # copied, originals untouched: the message exists twice, POP3 lists it again
    "cut_before_store": (Fault("cut", on_command=b"UID STORE"), "copied"),
    # copied, originals flagged: hidden from POP3, removed by the owner's next expunge
    "cut_before_expunge": (Fault("cut", on_command=b"UID EXPUNGE"), "copied_flagged"),
    # the move completed, only its OK was lost
    "cut_after_expunge": (Fault("cut", on_command=b"UID EXPUNGE", when="after"), "moved"),
}


def folder_bodies(box: Mailbox, folder: str) -> list[bytes]:
    observer = box.observer(folder)
    return [observer.fetch(uid) for uid in observer.uids()]


@pytest.mark.parametrize("fault_name", sorted(MOVE_FAULTS))
def test_upstream_lost_between_the_halves_of_a_move(
    rig_factory: Callable[..., Rig], mailbox: Mailbox, fault_name: str
) -> None:
    fault, expected = MOVE_FAULTS[fault_name]
    messages = list(numbered_messages(3))
    uids = mailbox.append(messages).uids
    rig = rig_factory(upstream={"ignore_capabilities": ["MOVE"]}, delete={"policy": "move"})
    rig.proxy.arm(fault)

    with rig.client(mailbox) as raw:
        assert raw.command(b"DELE 1").startswith(b"+OK")
        assert raw.command(b"DELE 2").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(TEMP)
    assert fault.fired.is_set()
    # What an operator sees (docs/operators.md, "Logs"): the deletions that failed.
    failed = [e for e in rig.bridge.events() if e["event"] == "deletions_failed"]
    assert [(e["level"], e["count"], e["policy"]) for e in failed] == [("warning", 2, "move")]
    assert not any(b"UID MOVE" in line for line in rig.proxy.lines_to_server())

    flags = flags_by_uid(mailbox)
    assert "\\Deleted" not in flags[uids[2]]
    copies = folder_bodies(mailbox, MOVE_FOLDER) if expected != "untouched" else []
    if expected == "untouched":
        assert all("\\Deleted" not in flags[uid] for uid in uids)
    elif expected == "copied":
        assert all("\\Deleted" not in flags[uid] for uid in uids)
        assert copies == messages[:2]
    elif expected == "copied_flagged":
        assert all("\\Deleted" in flags[uid] for uid in uids[:2])
        assert copies == messages[:2]
    else:
        assert sorted(flags) == [uids[2]]
        assert copies == messages[:2]

    # Every message exists somewhere, intact.
    inbox = {uid: fresh_observer(mailbox).fetch(uid) for uid in flags}
    for original in messages:
        assert original in inbox.values() or original in copies

    # The device retries its poll (no fault now): it sees what is not hidden and can
    # delete it again; at worst a message that was copied but not flagged is copied again.
    with rig.client(mailbox) as raw:
        count = int(raw.command(b"STAT").split()[1])
        for n in range(1, count + 1):
            assert raw.command(b"DELE %d" % n).startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")
    final_copies = folder_bodies(mailbox, MOVE_FOLDER)
    for original in messages:
        assert 1 <= final_copies.count(original) <= 2
    remaining = [fresh_observer(mailbox).fetch(uid) for uid in fresh_observer(mailbox).uids()]
    # Only the flagged leftovers of an interrupted move remain in the maildrop.
    for body in remaining:
        assert body in messages[:2] and expected == "copied_flagged"


def test_move_with_move_capability_interrupted_moves_nothing(
    rig_factory: Callable[..., Rig], mailbox: Mailbox
) -> None:
    messages = list(numbered_messages(2))
    uids = mailbox.append(messages).uids
    rig = rig_factory(delete={"policy": "move"})
    fault = rig.proxy.arm(Fault("cut", on_command=b"UID MOVE"))
    with rig.client(mailbox) as raw:
        assert raw.command(b"DELE 1").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(TEMP)
    assert fault.fired.is_set()
    assert fresh_observer(mailbox).uids() == uids
    assert folder_bodies(mailbox, MOVE_FOLDER) == []


# -- stalls: the server accepts but never answers -------------------------------------------

# upstream.timeout_seconds covers every upstream operation, those before the stall too (connect,
# login, listing, state loading through the proxy: tens of milliseconds here). Five seconds is
# far above them even on a loaded machine, so only the stalled operation can time out.
STALL_TIMEOUT = {"timeout_seconds": 5}


def test_stalled_server_at_login_gets_sys_temp(rig_factory: Callable[..., Rig], mailbox: Mailbox) -> None:
    rig = rig_factory(upstream=STALL_TIMEOUT)
    fault = rig.proxy.arm(Fault("stall"))
    with rig.client(mailbox, login=False) as raw:
        assert raw.command(b"USER " + mailbox.user.encode()).startswith(b"+OK")
        assert raw.command(b"PASS " + mailbox.password.encode()).startswith(TEMP)
        # The session is still in AUTHORIZATION and usable.
        assert raw.command(b"CAPA").startswith(b"+OK")
    assert fault.fired.is_set()
    # A stall after the greeting, in the middle of logging in.
    fault = rig.proxy.arm(Fault("stall", on_command=b"SELECT"))
    with rig.client(mailbox, login=False) as raw:
        raw.command(b"USER " + mailbox.user.encode())
        assert raw.command(b"PASS " + mailbox.password.encode()).startswith(TEMP)
    assert fault.fired.is_set()


def test_stalled_server_after_login_every_upstream_command_gets_sys_temp(
    rig_factory: Callable[..., Rig], mailbox: Mailbox
) -> None:
    messages = list(numbered_messages(3))
    uids = mailbox.append(messages).uids
    rig = rig_factory(upstream=STALL_TIMEOUT)
    with rig.client(mailbox) as raw:
        # The session's connection stalls, and so does every connection opened after it.
        rig.proxy.arm(Fault("stall", existing=True))
        rig.proxy.arm(Fault("stall", times=None))
        # Answered from the session's snapshot, no upstream needed.
        assert raw.command(b"STAT").startswith(b"+OK 3 ")
        assert raw.command(b"RETR 1").startswith(TEMP)
        assert raw.command(b"TOP 2 0").startswith(TEMP)
        assert raw.command(b"DELE 3").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(TEMP)
    rig.proxy.cut_all()
    assert fresh_observer(mailbox).uids() == uids
    assert all("\\Deleted" not in flags for flags in flags_by_uid(mailbox).values())


def test_a_connection_that_stalled_is_replaced_for_the_sessions_next_command(
    rig_factory: Callable[..., Rig], mailbox: Mailbox
) -> None:
    # One server process hangs (on a lock, say): the session's connection stalls, the
    # command waiting on it fails, and the session's next command has a working connection.
    messages = list(numbered_messages(3))
    uids = mailbox.append(messages).uids
    rig = rig_factory(upstream=STALL_TIMEOUT)
    with rig.client(mailbox) as raw:
        rig.proxy.arm(Fault("stall", existing=True))
        assert raw.command(b"RETR 1").startswith(TEMP)
        status, body = raw.command_multiline(b"RETR 2")
        assert status.startswith(b"+OK")
        assert pop3_unstuff(body) == retr_payload(messages[1])
        assert raw.command(b"DELE 3").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")
    rig.proxy.cut_all()
    assert fresh_observer(mailbox).uids() == uids[:2]
    assert [e["reason"] for e in rig.bridge.events() if e["event"] == "upstream_checked_out_again"] == ["broken"]


@pytest.mark.parametrize("stall_at", [b"UID STORE", b"UID EXPUNGE"])
def test_stalled_server_during_quit_gets_sys_temp(
    rig_factory: Callable[..., Rig], mailbox: Mailbox, stall_at: bytes
) -> None:
    messages = list(numbered_messages(2))
    uids = mailbox.append(messages).uids
    rig = rig_factory(upstream=STALL_TIMEOUT)
    fault = rig.proxy.arm(Fault("stall", on_command=stall_at))
    with rig.client(mailbox) as raw:
        assert raw.command(b"DELE 1").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(TEMP)
    assert fault.fired.is_set()
    rig.proxy.cut_all()
    flags = flags_by_uid(mailbox)
    assert sorted(flags) == uids
    assert "\\Deleted" not in flags[uids[1]]


def test_stalled_server_mid_retr_closes_without_terminator(
    rig_factory: Callable[..., Rig], mailbox: Mailbox
) -> None:
    big = big_message(30_000)
    mailbox.append([big])
    # fetch_chunk 4096: the aioimaplib engine's first piece (a FETCH of its own) is whole
    # before the stall, so both engines have begun the message when the server stops.
    rig = rig_factory(upstream={**STALL_TIMEOUT, "fetch_chunk": 4096})
    fault = rig.proxy.arm(Fault("stall", on_command=RETR_FETCH, when="after", after_bytes=8000))
    with rig.client(mailbox) as raw:
        raw.send(b"RETR 1\r\n")
        assert raw.status().startswith(b"+OK")
        rest, closed = drain(raw)
        assert closed and b"\r\n.\r\n" not in rest
    assert fault.fired.is_set()


def test_stalled_state_save_of_per_client_policy_gets_sys_temp(
    rig_factory: Callable[..., Rig], mailbox: Mailbox
) -> None:
    mailbox.append(numbered_messages(2))
    rig = rig_factory(upstream=STALL_TIMEOUT, delete={"policy": "per-client"})
    fault = rig.proxy.arm(Fault("stall", on_command=b"APPEND"))
    with rig.client(mailbox) as raw:
        assert raw.command(b"DELE 1").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(TEMP)
    assert fault.fired.is_set()
    rig.proxy.cut_all()
    # The device was not told +OK, and indeed nothing is hidden from it.
    with rig.client(mailbox) as raw:
        assert raw.command(b"STAT").startswith(b"+OK 2 ")


def test_slow_server_within_the_timeout_is_just_slow(
    rig_factory: Callable[..., Rig], mailbox: Mailbox
) -> None:
    messages = list(numbered_messages(2))
    mailbox.append(messages)
    rig = rig_factory(upstream={"timeout_seconds": 20})
    fault = rig.proxy.arm(Fault("delay", on_command=b"BODY.PEEK", seconds=1.0, times=None))
    with rig.client(mailbox) as raw:
        status, body = raw.command_multiline(b"RETR 2")
        assert status.startswith(b"+OK")
        assert pop3_unstuff(body) == retr_payload(messages[1])
    assert fault.fired.is_set()


def test_refused_connections_get_sys_temp_and_the_next_login_works(
    rig_factory: Callable[..., Rig], mailbox: Mailbox
) -> None:
    mailbox.append(numbered_messages(1))
    rig = rig_factory(upstream={"timeout_seconds": 2})
    # Every connection refused: the bridge's retries (within the timeout) cannot help.
    fault = rig.proxy.arm(Fault("refuse", times=None))
    with rig.client(mailbox, login=False) as raw:
        raw.command(b"USER " + mailbox.user.encode())
        assert raw.command(b"PASS " + mailbox.password.encode()).startswith(TEMP)
    assert fault.fired.is_set()
    rig.proxy.disarm()
    with rig.client(mailbox) as raw:
        assert raw.command(b"STAT").startswith(b"+OK 1 ")


# -- parked connections (bridge.imap.pool) ----------------------------------------------


@pytest.mark.parametrize("action", ["cut", "reset"])
def test_parked_connection_broken_by_the_network(
    rig_factory: Callable[..., Rig], mailbox: Mailbox, action: str
) -> None:
    messages = list(numbered_messages(2))
    mailbox.append(messages)
    rig = rig_factory()
    for _round in range(2):
        with rig.client(mailbox) as raw:
            assert raw.command(b"STAT").startswith(b"+OK 2 ")
            assert raw.command(b"QUIT").startswith(b"+OK")
        # Whatever the bridge kept open for the account's next session dies now.
        rig.proxy.arm(Fault(action, existing=True))  # type: ignore[arg-type]
        wait_until(lambda: not rig.proxy.live_connections(), "the parked connection to be cut")
        with rig.client(mailbox) as raw:
            status, body = raw.command_multiline(b"RETR 2")
            assert status.startswith(b"+OK")
            assert pop3_unstuff(body) == retr_payload(messages[1])
            assert raw.command(b"QUIT").startswith(b"+OK")
    # The service survives the broken connection, and stops cleanly (the fixture's stop()
    # raises if the bridge crashed), even when the break and the shutdown coincide.
    rig.proxy.cut_all()
    rig.bridge.stop()
    # A parked connection that breaks is routine, not an error: logged at info.
    events = rig.bridge.events()
    assert [e["event"] for e in events if e.get("level") in ("error", "critical")] == []
    dropped = [e for e in events if e["event"] == "pool_connection_dropped"]
    assert len(dropped) >= 2 and {(e["level"], e["reason"]) for e in dropped} == {("info", "broken")}


def test_mail_arriving_while_the_maildrop_is_listed(rig_factory: Callable[..., Rig], mailbox: Mailbox) -> None:
    """Delivery between SELECT and the listing: the server announces the new message (EXISTS)
    after the listing's answer. Found by the soak test: logins failed with [SYS/TEMP]."""
    messages = list(numbered_messages(3))
    mailbox.append(messages[:2])
    rig = rig_factory()
    # Hold the listing command until the new message is in.
    fault = rig.proxy.arm(Fault("stall", on_command=b"FETCH 1:*"))
    with rig.client(mailbox, login=False) as raw:
        assert raw.command(b"USER " + mailbox.user.encode()).startswith(b"+OK")
        raw.send(b"PASS " + mailbox.password.encode() + b"\r\n")
        assert fault.fired.wait(30)
        mailbox.append(messages[2:])
        rig.proxy.release()
        assert raw.status().startswith(b"+OK")
        count = int(raw.command(b"STAT").split()[1])
        assert count in (2, 3)
        for n in range(1, count + 1):
            status, body = raw.command_multiline(b"RETR %d" % n)
            assert pop3_unstuff(body) == retr_payload(messages[n - 1])
        assert raw.command(b"QUIT").startswith(b"+OK")


def test_a_parked_connection_that_breaks_at_its_first_command_costs_the_login_nothing(
    rig_factory: Callable[..., Rig], mailbox: Mailbox
) -> None:
    """A parked connection cut while parked can be handed to the next login before its keeper
    notices (handed over in IDLE, it dies at the login's first command): the login goes on
    with a fresh connection instead of answering the device -ERR [SYS/TEMP]."""
    messages = list(numbered_messages(2))
    mailbox.append(messages)
    rig = rig_factory()
    with rig.client(mailbox) as raw:
        assert raw.command(b"STAT").startswith(b"+OK 2 ")
        assert raw.command(b"QUIT").startswith(b"+OK")
    parked = len(rig.proxy.connections) - 1
    # The login's first command on the connection (DONE, then the SELECT that re-selects the
    # folder, in one write) finds it cut.
    fault = rig.proxy.arm(Fault("cut", on_command=b"SELECT"))
    with rig.client(mailbox) as raw:
        status, body = raw.command_multiline(b"RETR 2")
        assert status.startswith(b"+OK")
        assert pop3_unstuff(body) == retr_payload(messages[1])
        assert raw.command(b"QUIT").startswith(b"+OK")
    assert fault.fired.is_set() and fault.fired_on == parked
    assert len(rig.proxy.connections) == parked + 2  # the parked one, then a fresh one
    rig.bridge.stop()
    assert [e["event"] for e in rig.bridge.events() if e.get("level") in ("warning", "error")] == []
