"""The maildrop folder deleted and re-created with the same messages (a new UIDVALIDITY, the
messages in another order): with `[uidl] keep_across_uidvalidity` a real "leave mail on
server" client downloads nothing again, per-device state follows the messages, and imported
UIDLs survive; without it every message is new (the documented default). Fingerprints are
kept incrementally: a poll that finds no new mail reads no header (watched through a
pass-through proxy)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox import DovecotSandbox, ImapObserver, Mailbox
from sandbox.seeding import append_messages
from tests.faultproxy import FaultProxy
from tests.harness import Pop3Client, ThreadedBridge, wait_for_event
from tests.integration.policy_support import create_folder
from tests.integration.uidl_support import (
    FetchmailKeep,
    as_migrated,
    corpus,
    recreate_folder,
    subjects,
    uidl_import,
    write_config,
)

BridgeFactory = Callable[..., ThreadedBridge]
FOLDER = "Mail"  # INBOX cannot be deleted; the maildrop is another folder here


def seeded(box: Mailbox, messages: list[bytes]) -> list[int]:
    create_folder(box, FOLDER)
    return append_messages(box.host, box.imap_port, box.user, box.password, messages, mailbox=FOLDER).uids


def uidls(port: int, login: str, password: str) -> list[tuple[bytes, bytes]]:
    """(subject, UIDL) in the order the device sees them; QUIT without DELE."""
    with Pop3Client(port, login, password) as pop:
        seen = []
        for line in pop.uidl()[1]:
            number, uidl = line.split()
            seen.append((subjects([b"\r\n".join(pop.top(int(number), 0)[1])])[0], uidl))
        pop.quit()
    return seen


def recreate(box: Mailbox) -> None:
    recreate_folder(box.host, box.imap_port, box.user, box.password, FOLDER)


def keep_across(**sections: dict[str, object]) -> dict[str, dict[str, object]]:
    upstream = {"mailbox": FOLDER, **sections.pop("upstream", {})}
    return {"upstream": upstream, "uidl": {"keep_across_uidvalidity": True, **sections.pop("uidl", {})}, **sections}


def test_fetchmail_downloads_nothing_again_after_the_folder_is_recreated(
    bridge_factory: BridgeFactory, mailbox: Mailbox, tmp_path: Path, on_every_engine: str
) -> None:
    seeded(mailbox, corpus(10, "recreated"))
    bridge = bridge_factory(**keep_across())
    device = FetchmailKeep(tmp_path / "device", mailbox.user, mailbox.password)
    assert len(device.run("127.0.0.1", bridge.port)) == 10
    before = uidls(bridge.port, mailbox.user, mailbox.password)
    recreate(mailbox)
    assert device.run("127.0.0.1", bridge.port) == []
    event = wait_for_event(bridge, "uidls_rematched")
    assert (event["rematched"], event["new_uidls"], event["gone"]) == (10, 0, 0)
    # The same UIDLs, in the order the device knew (the copy came back reversed).
    assert uidls(bridge.port, mailbox.user, mailbox.password) == before
    arrived = corpus(2, "recreated-new")
    append_messages(mailbox.host, mailbox.imap_port, mailbox.user, mailbox.password, arrived, mailbox=FOLDER)
    assert sorted(subjects(device.run("127.0.0.1", bridge.port))) == sorted(subjects(arrived))
    assert device.run("127.0.0.1", bridge.port) == []
    # A bridge process that never saw the old folder serves the same UIDLs.
    other = bridge_factory(**keep_across())
    assert uidls(other.port, mailbox.user, mailbox.password) == uidls(bridge.port, mailbox.user, mailbox.password)


def test_without_keep_across_uidvalidity_every_message_is_new_again(
    bridge_factory: BridgeFactory, mailbox: Mailbox, tmp_path: Path
) -> None:
    seeded(mailbox, corpus(6, "not-kept"))
    bridge = bridge_factory(upstream={"mailbox": FOLDER})
    device = FetchmailKeep(tmp_path / "device", mailbox.user, mailbox.password)
    assert len(device.run("127.0.0.1", bridge.port)) == 6
    assert device.run("127.0.0.1", bridge.port) == []
    recreate(mailbox)
    assert len(device.run("127.0.0.1", bridge.port)) == 6


def test_per_device_state_follows_the_messages_to_their_new_uids(
    bridge_factory: BridgeFactory, mailbox: Mailbox, on_every_engine: str
) -> None:
    seeded(mailbox, corpus(6, "devices"))
    bridge = bridge_factory(**keep_across(delete={"policy": "per-client"}))
    phone, laptop = f"{mailbox.user}#phone", f"{mailbox.user}#laptop"
    everything = uidls(bridge.port, laptop, mailbox.password)
    with Pop3Client(bridge.port, phone, mailbox.password) as pop:
        for number in (1, 3, 4):
            pop.dele(number)
        assert pop.quit().startswith(b"+OK")
    phone_sees = uidls(bridge.port, phone, mailbox.password)
    assert phone_sees == [everything[i] for i in (1, 4, 5)]
    recreate(mailbox)
    assert uidls(bridge.port, phone, mailbox.password) == phone_sees
    assert uidls(bridge.port, laptop, mailbox.password) == everything
    assert not [e for e in bridge.events() if e.get("event") == "device_state_reset"]
    # The carried state is saved under the new UIDVALIDITY at the device's next QUIT that
    # changes it, and still hides the same messages.
    with Pop3Client(bridge.port, phone, mailbox.password) as pop:
        pop.dele(1)
        assert pop.quit().startswith(b"+OK")
    assert uidls(bridge.port, phone, mailbox.password) == phone_sees[1:]


def test_identical_copies_keep_their_uidls_across_the_change(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    copy = corpus(1, "copies")[0]
    messages = [copy, *corpus(3, "others"), copy, copy]
    seeded(mailbox, messages)
    bridge = bridge_factory(**keep_across())
    before = uidls(bridge.port, mailbox.user, mailbox.password)
    recreate(mailbox)
    after = uidls(bridge.port, mailbox.user, mailbox.password)
    assert after == before  # identical copies paired in order: the same list
    event = wait_for_event(bridge, "uidls_rematched")
    assert event["rematched"] == 6 and event["ambiguous"] == 3


def header_reads(proxy: FaultProxy, start: int = 0) -> list[bytes]:
    return [line for line in proxy.lines_to_server()[start:] if b"BODY.PEEK[HEADER]" in line]


def test_fingerprints_are_kept_for_new_mail_only(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    uids = seeded(mailbox, corpus(30, "incremental"))
    with FaultProxy(mailbox.host, mailbox.imap_port) as proxy:
        bridge = bridge_factory(**keep_across(upstream={"port": proxy.port}))
        first = uidls(bridge.port, mailbox.user, mailbox.password)
        assert len(header_reads(proxy)) == 1  # the first listing reads every header, once
        mark = len(proxy.lines_to_server())
        assert uidls(bridge.port, mailbox.user, mailbox.password) == first
        assert header_reads(proxy, mark) == []  # a warm poll of an unchanged maildrop reads none
        new_uid = append_messages(
            mailbox.host, mailbox.imap_port, mailbox.user, mailbox.password, corpus(1, "incremental-new"), mailbox=FOLDER
        ).uids[0]
        mark = len(proxy.lines_to_server())
        uidls(bridge.port, mailbox.user, mailbox.password)
        reads = header_reads(proxy, mark)
        assert len(reads) == 1 and b"UID FETCH %d " % new_uid in reads[0]
    assert first[0][1] == b"%08x%08x" % (uids[0], ImapObserver(mailbox.host, mailbox.imap_port, mailbox.user, mailbox.password, FOLDER).uidvalidity())


def _without_tags(lines: list[bytes]) -> list[bytes]:
    """The commands, tags dropped, and without the parked connection's IDLE and DONE: when the
    keeper sends them, relative to the poll, is the scheduler's business, not the poll's cost."""
    commands = [line.split(b" ", 1)[1] if b" " in line else line for line in lines]
    return [command for command in commands if command.upper() not in (b"IDLE\r\n", b"DONE\r\n")]


def test_a_warm_poll_with_fingerprints_on_sends_what_one_with_them_off_sends(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    """The cost of keep_across_uidvalidity on an unchanged maildrop, without a clock: the
    same IMAP commands as without it (no state folder, no header, nothing more)."""
    seeded(mailbox, corpus(20, "same-commands"))
    sent: dict[bool, list[bytes]] = {}
    for on in (False, True):
        with FaultProxy(mailbox.host, mailbox.imap_port) as proxy:
            sections = keep_across(upstream={"port": proxy.port}) if on else {"upstream": {"mailbox": FOLDER, "port": proxy.port}}
            bridge = bridge_factory(**sections)
            first = uidls(bridge.port, mailbox.user, mailbox.password)
            uidls(bridge.port, mailbox.user, mailbox.password)
            mark = len(proxy.lines_to_server())
            assert uidls(bridge.port, mailbox.user, mailbox.password) == first
            sent[on] = _without_tags(proxy.lines_to_server()[mark:])
            bridge.stop()
    assert sent[True] == sent[False]
    assert any(b"SELECT" in line for line in sent[True])  # the refresh of the warm listing


@pytest.mark.parametrize("policy", ["expunge", "move", "keep"])
def test_the_change_is_handled_under_every_delete_policy(bridge_factory: BridgeFactory, mailbox: Mailbox, policy: str) -> None:
    seeded(mailbox, corpus(4, f"policy-{policy}"))
    bridge = bridge_factory(**keep_across(delete={"policy": policy}))
    with Pop3Client(bridge.port, mailbox.user, mailbox.password) as pop:
        pop.dele(2)
        assert pop.quit().startswith(b"+OK")
    before = uidls(bridge.port, mailbox.user, mailbox.password)
    recreate(mailbox)
    assert uidls(bridge.port, mailbox.user, mailbox.password) == before


@pytest.fixture(scope="module")
def old_dovecot() -> Iterator[DovecotSandbox]:
    workdir = Path(tempfile.mkdtemp(prefix="bridge-uidl-rematch-"))
    workdir.chmod(0o755)
    server = DovecotSandbox(workdir, extra_config="pop3_uidl_format = %v.%u\n")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_imported_uidls_survive_the_change(
    bridge_factory: BridgeFactory, old_dovecot: DovecotSandbox, dovecot: DovecotSandbox, tmp_path: Path
) -> None:
    messages = corpus(5, "imported-kept")
    old = old_dovecot.new_mailbox()
    old.append(messages)
    new = dovecot.new_mailbox(user=old.user, password=old.password)
    create_folder(new, FOLDER)
    append_messages(new.host, new.imap_port, new.user, new.password, [as_migrated(m) for m in reversed(messages)], mailbox=FOLDER)
    password = tmp_path / "pw"
    password.write_text(old.password)
    config = write_config(
        tmp_path / "bridge.toml", dovecot.imap_port, "[uidl]\nimported = true\nkeep_across_uidvalidity = true\n",
        upstream=f'mailbox = "{FOLDER}"\n',
    )
    result = uidl_import(config, f"pop3://127.0.0.1:{old_dovecot.pop3_port}", old.user, "--password-file", str(password))
    assert result.returncode == 0, result.stdout + result.stderr
    bridge = bridge_factory(**keep_across(uidl={"imported": True}))
    old_listing = uidls(old.pop3_port, old.user, old.password)
    assert uidls(bridge.port, new.user, new.password) == old_listing
    recreate(new)
    assert uidls(bridge.port, new.user, new.password) == old_listing
    event = wait_for_event(bridge, "uidls_rematched")
    assert (event["rematched"], event["new_uidls"]) == (5, 0)
