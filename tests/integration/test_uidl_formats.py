"""[uidl] format and reuse_x_uidl against the real servers whose UIDLs they reproduce: the
bridge in front of a Dovecot configured with another `pop3_uidl_format` gives exactly the UIDLs
of that Dovecot's own POP3, the "cyrus" preset exactly those of Cyrus's pop3d, "emailid" the
EMAILIDs Cyrus reports (and a refused login on a server without OBJECTID). X-UIDL headers are
read once per message, new mail only (what the bridge sends upstream is watched through a
pass-through proxy)."""

from __future__ import annotations

import poplib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import DovecotSandbox, Mailbox
from sandbox.cyrus import CyrusSandbox
from tests.faultproxy import FaultProxy
from tests.harness import ThreadedBridge, bridge_settings, wait_for_event
from tests.integration.uidl_support import corpus

FORMATS = ["uw", "%v.%u", "%u-%v", "x%Xv%04u"]


def uidl_lines(port: int, user: str, password: str, host: str = "127.0.0.1") -> list[bytes]:
    pop = poplib.POP3(host, port, timeout=60)
    try:
        pop.user(user)
        pop.pass_(password)
        return pop.uidl()[1]
    finally:
        pop.close()


@pytest.fixture(scope="module")
def dovecots() -> Iterator[dict[str, DovecotSandbox]]:
    """One Dovecot per format, its own POP3 configured with that pop3_uidl_format."""
    workdir = Path(tempfile.mkdtemp(prefix="bridge-uidl-formats-"))
    workdir.chmod(0o755)
    started: dict[str, DovecotSandbox] = {}
    try:
        for index, fmt in enumerate(FORMATS):
            template = {"uw": "%08Xv%08Xu"}.get(fmt, fmt)
            server = DovecotSandbox(workdir / f"d{index}", extra_config=f"pop3_uidl_format = {template}\n")
            server.start()
            started[fmt] = server
        yield started
    finally:
        for server in started.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_bridge_gives_exactly_the_uidls_of_dovecot_with_that_format(dovecots: dict[str, DovecotSandbox], fmt: str) -> None:
    server = dovecots[fmt]
    box = server.new_mailbox()
    uids = box.append(corpus(12, "formats")).uids
    box.observer().expunge(uids[3:5])  # gaps in the UIDs
    bridge = ThreadedBridge(bridge_settings(server.imap_port, uidl={"format": fmt})).start()
    try:
        through_bridge = uidl_lines(bridge.port, box.user, box.password)
    finally:
        bridge.stop()
    assert through_bridge == uidl_lines(server.pop3_port, box.user, box.password)
    assert len(through_bridge) == 10


def test_the_default_is_dovecots_default_format(mailbox: Mailbox, bridge: ThreadedBridge) -> None:
    mailbox.append(corpus(5, "default"))
    assert uidl_lines(bridge.port, mailbox.user, mailbox.password) == uidl_lines(
        mailbox.pop3_port, mailbox.user, mailbox.password
    )


@pytest.fixture(scope="module")
def cyrus_pop3() -> Iterator[CyrusSandbox]:
    """A Cyrus with its own pop3d (Debian cyrus-pop3d)."""
    workdir = Path(tempfile.mkdtemp(prefix="bridge-uidl-cyrus-"))
    workdir.chmod(0o755)
    server = CyrusSandbox(workdir, pop3=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_cyrus_preset_gives_exactly_the_uidls_of_cyrus_pop3d(cyrus_pop3: CyrusSandbox) -> None:
    box = cyrus_pop3.new_mailbox()
    uids = box.append(corpus(8, "cyrus")).uids
    box.observer().expunge(uids[:2])
    bridge = ThreadedBridge(bridge_settings(cyrus_pop3.imap_port, uidl={"format": "cyrus"})).start()
    try:
        through_bridge = uidl_lines(bridge.port, box.user, box.password)
    finally:
        bridge.stop()
    native = uidl_lines(cyrus_pop3.pop3_port, box.user, box.password)
    assert through_bridge == native and len(native) == 6


def test_emailid_uidls_are_the_servers_emailids(cyrus_pop3: CyrusSandbox, on_every_engine: str) -> None:
    box = cyrus_pop3.new_mailbox()
    uids = box.append(corpus(4, "emailid")).uids
    observer = box.observer()
    _typ, data = observer.imap.uid("FETCH", "1:*", "(EMAILID)")
    emailids = [line.split(b"EMAILID (")[1].split(b")")[0] for line in data if isinstance(line, bytes)]
    bridge = ThreadedBridge(bridge_settings(cyrus_pop3.imap_port, uidl={"format": "emailid"})).start()
    try:
        first = uidl_lines(bridge.port, box.user, box.password)
        # New mail: only its EMAILID is asked for; the others are remembered.
        box.append(corpus(1, "emailid-new"))
        second = uidl_lines(bridge.port, box.user, box.password)
    finally:
        bridge.stop()
    assert first == [b"%d %s" % (n, emailid) for n, emailid in enumerate(emailids, 1)]
    assert second[:4] == first and len(second) == 5 and len(uids) == 4


@pytest.mark.bridge_errors("uidl_emailid_unavailable")
def test_emailid_on_a_server_without_objectid_refuses_the_login(bridge_factory, mailbox: Mailbox) -> None:  # noqa: ANN001
    mailbox.append(corpus(2, "no-objectid"))
    bridge = bridge_factory(uidl={"format": "emailid"})
    pop = poplib.POP3("127.0.0.1", bridge.port, timeout=60)
    try:
        pop.user(mailbox.user)
        with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
            pop.pass_(mailbox.password)
    finally:
        pop.close()
    wait_for_event(bridge, "uidl_emailid_unavailable")


def x_uidl_message(n: int, value: bytes | None) -> bytes:
    head = b"From: a@example.org\r\nSubject: x-uidl %d\r\nMessage-ID: <x%d@example.org>\r\n" % (n, n)
    if value is not None:
        head += b"X-UIDL: " + value + b"\r\n"
    return head + b"\r\nbody %d\r\n" % n


def header_fetches(proxy: FaultProxy, start: int) -> list[bytes]:
    return [line for line in proxy.lines_to_server()[start:] if b"BODY.PEEK[HEADER]" in line]


def test_x_uidl_headers_are_the_uidls_and_each_is_read_once(bridge_factory, mailbox: Mailbox, on_every_engine: str) -> None:  # noqa: ANN001
    messages = [
        x_uidl_message(1, b"3f1a2b44c0ffee"),
        x_uidl_message(2, None),
        x_uidl_message(3, b"y" * 71),  # too long: mapped, never sent
        x_uidl_message(4, b"3f1a2b44c0ffee"),  # a copy's: the first keeps it
        x_uidl_message(5, b"has space"),
    ]
    uids = mailbox.append(messages).uids
    with FaultProxy(mailbox.host, mailbox.imap_port) as proxy:
        bridge = bridge_factory(upstream={"port": proxy.port}, uidl={"reuse_x_uidl": True})
        first = uidl_lines(bridge.port, mailbox.user, mailbox.password)
        assert len(header_fetches(proxy, 0)) == 1  # every header, once
        mark = len(proxy.lines_to_server())
        again = uidl_lines(bridge.port, mailbox.user, mailbox.password)
        assert again == first
        assert header_fetches(proxy, mark) == []  # an unchanged maildrop: no header read
        new_uid = mailbox.append([x_uidl_message(6, b"new-x-uidl")]).uids[0]
        mark = len(proxy.lines_to_server())
        third = uidl_lines(bridge.port, mailbox.user, mailbox.password)
        fetched = header_fetches(proxy, mark)
        assert len(fetched) == 1 and b"UID FETCH %d " % new_uid in fetched[0]  # the new message only
    uidls = [line.split()[1] for line in first]
    assert uidls[0] == b"3f1a2b44c0ffee"
    assert uidls[1] == b"%08x%08x" % (uids[1], mailbox.observer().uidvalidity())
    assert uidls[2].startswith(b"~") and len(uidls[2]) == 33
    assert uidls[3] != uidls[0] and uidls[3].startswith(b"~")
    assert uidls[4].startswith(b"~")
    assert [line.split()[1] for line in third] == uidls + [b"new-x-uidl"]
    # Kept with the state, so a bridge process that never saw them reads no header again.
    with FaultProxy(mailbox.host, mailbox.imap_port) as proxy:
        other = bridge_factory(upstream={"port": proxy.port}, uidl={"reuse_x_uidl": True})
        assert uidl_lines(other.port, mailbox.user, mailbox.password) == third
        assert header_fetches(proxy, 0) == []
