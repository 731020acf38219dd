"""Serving imported UIDLs: with every delete policy (per-device state included), on both IMAP
engines, in the old server's order, and never trusting a record planted in the state folder."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bridge.uidl.records import RecordSigner, render_table
from sandbox import DovecotSandbox, ImapObserver, Mailbox
from tests.harness import TEST_STATE_KEY, Pop3Client, ThreadedBridge, wait_for_event
from tests.integration.policy_support import STATE_FOLDER
from tests.integration.uidl_support import corpus, migrate, subjects, uidl_import, write_config

BridgeFactory = Callable[..., ThreadedBridge]


@pytest.fixture(scope="module")
def old_dovecot() -> Iterator[DovecotSandbox]:
    workdir = Path(tempfile.mkdtemp(prefix="bridge-uidl-serve-"))
    workdir.chmod(0o755)
    server = DovecotSandbox(workdir, extra_config="pop3_uidl_format = %v.%u\n")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def listing(port: int, login: str, password: str) -> list[tuple[bytes, bytes]]:
    """(subject, UIDL) of every message a device sees, in its order; QUIT without DELE."""
    with Pop3Client(port, login, password) as pop:
        seen = []
        for line in pop.uidl()[1]:
            number, uidl = line.split()
            header = b"\r\n".join(pop.top(int(number), 0)[1])
            seen.append((subjects([header])[0], uidl))
        pop.quit()
    return seen


def delete_first(port: int, login: str, password: str) -> bytes:
    """A device downloads message 1 and deletes it; its subject."""
    with Pop3Client(port, login, password) as pop:
        subject = subjects([b"\r\n".join(pop.retr(1)[1])])[0]
        pop.dele(1)
        assert pop.quit().startswith(b"+OK")
    return subject


@pytest.fixture
def migrated(old_dovecot: DovecotSandbox, dovecot: DovecotSandbox, tmp_path: Path) -> tuple[Mailbox, list[tuple[bytes, bytes]]]:
    """An account migrated in reverse order and imported: its store mailbox and what the old
    server listed, (subject, UIDL) in the old order."""
    messages = corpus(6, "serve")
    old = old_dovecot.new_mailbox()
    old.append(messages)
    new = dovecot.new_mailbox(user=old.user, password=old.password)
    migrate(messages, new.host, new.imap_port, new.user, new.password, order=[5, 4, 3, 2, 1, 0])
    before = listing(old.pop3_port, old.user, old.password)
    password = tmp_path / "pw"
    password.write_text(old.password)
    config = write_config(tmp_path / "bridge.toml", dovecot.imap_port, "[uidl]\nimported = true\n")
    result = uidl_import(config, f"pop3://127.0.0.1:{old_dovecot.pop3_port}", old.user, "--password-file", str(password))
    assert result.returncode == 0, result.stdout + result.stderr
    return new, before


@pytest.mark.parametrize("policy", ["expunge", "move", "keep"])
def test_imported_uidls_hold_under_every_delete_policy(
    bridge_factory: BridgeFactory, migrated: tuple[Mailbox, list[tuple[bytes, bytes]]], policy: str, on_every_engine: str
) -> None:
    box, before = migrated
    bridge = bridge_factory(uidl={"imported": True}, delete={"policy": policy})
    assert listing(bridge.port, box.user, box.password) == before
    gone = delete_first(bridge.port, box.user, box.password)
    assert gone == before[0][0]
    after = listing(bridge.port, box.user, box.password)
    if policy == "keep":
        assert after == before
    else:
        assert after == before[1:]
    box.append(corpus(1, "serve-new"))
    newest = listing(bridge.port, box.user, box.password)
    assert newest[:-1] == after and newest[-1][0] == b"serve-new message 1"


def test_imported_uidls_hold_for_every_device_under_per_client(
    bridge_factory: BridgeFactory, migrated: tuple[Mailbox, list[tuple[bytes, bytes]]], on_every_engine: str
) -> None:
    box, before = migrated
    bridge = bridge_factory(uidl={"imported": True}, delete={"policy": "per-client"})
    phone, laptop = f"{box.user}#phone", f"{box.user}#laptop"
    assert delete_first(bridge.port, phone, box.password) == before[0][0]
    assert listing(bridge.port, phone, box.password) == before[1:]
    assert listing(bridge.port, laptop, box.password) == before
    # A second bridge process (cold memory) serves the same.
    other = bridge_factory(uidl={"imported": True}, delete={"policy": "per-client"})
    assert listing(other.port, phone, box.password) == before[1:]
    assert listing(other.port, laptop, box.password) == before


def test_an_import_made_while_the_bridge_serves_applies_at_the_next_login(
    old_dovecot: DovecotSandbox, dovecot: DovecotSandbox, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    messages = corpus(3, "late")
    old = old_dovecot.new_mailbox()
    old.append(messages)
    new = dovecot.new_mailbox(user=old.user, password=old.password)
    migrate(messages, new.host, new.imap_port, new.user, new.password)
    bridge = bridge_factory(uidl={"imported": True})
    before = listing(bridge.port, new.user, new.password)  # remembered by the bridge, parked
    password = tmp_path / "pw"
    password.write_text(old.password)
    config = write_config(tmp_path / "bridge.toml", dovecot.imap_port, "[uidl]\nimported = true\n")
    result = uidl_import(config, f"pop3://127.0.0.1:{old_dovecot.pop3_port}", old.user, "--password-file", str(password))
    assert result.returncode == 0, result.stdout + result.stderr
    after = listing(bridge.port, new.user, new.password)
    assert after == listing(old.pop3_port, old.user, old.password) and after != before


@pytest.mark.parametrize("engine", ["trio", "aioimaplib"])
def test_the_import_runs_on_either_engine(
    old_dovecot: DovecotSandbox, dovecot: DovecotSandbox, bridge_factory: BridgeFactory, tmp_path: Path, engine: str
) -> None:
    messages = corpus(3, f"engine-{engine}")
    old = old_dovecot.new_mailbox()
    old.append(messages)
    new = dovecot.new_mailbox(user=old.user, password=old.password)
    migrate(messages, new.host, new.imap_port, new.user, new.password, order=[2, 0, 1])
    config = write_config(
        tmp_path / "bridge.toml", dovecot.imap_port, "[uidl]\nimported = true\n", upstream=f'engine = "{engine}"\n'
    )
    result = uidl_import(config, f"pop3://127.0.0.1:{old_dovecot.pop3_port}", old.user, "--password-file", "-", stdin=old.password + "\n")
    assert result.returncode == 0, result.stdout + result.stderr
    bridge = bridge_factory(uidl={"imported": True}, upstream={"engine": engine})
    assert listing(bridge.port, new.user, new.password) == listing(old.pop3_port, old.user, old.password)


def test_a_planted_uidl_record_is_ignored(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    mailbox.append(corpus(2, "planted"))
    uidvalidity = mailbox.observer().uidvalidity()
    uids = mailbox.observer().uids()
    now = datetime.now(UTC)
    forged = render_table(RecordSigner(b"not the bridge's key, 32+ characters!", mailbox.user), "INBOX", uidvalidity,
                          [(uids[0], "evil", None)], "import", now)[0]
    unsigned = forged.replace(b'"mac":"', b'"nomac":"')
    other_account = render_table(RecordSigner(TEST_STATE_KEY.encode(), "someone-else"), "INBOX", uidvalidity,
                                 [(uids[0], "copied", None)], "import", now)[0]
    with ImapObserver(mailbox.host, mailbox.imap_port, mailbox.user, mailbox.password) as observer:
        observer.imap.create(f'"{STATE_FOLDER}"')
        for record in (forged, unsigned, other_account):
            assert observer.imap.append(f'"{STATE_FOLDER}"', None, None, record)[0] == "OK"
    bridge = bridge_factory(uidl={"imported": True})
    listed = [uidl for _subject, uidl in listing(bridge.port, mailbox.user, mailbox.password)]
    assert listed == [b"%08x%08x" % (uid, uidvalidity) for uid in uids]
    reasons = {event["reason"] for event in bridge.events() if event.get("event") == "uidl_record_ignored"}
    assert reasons == {"bad_mac", "unsigned"}
    assert b"evil" not in json.dumps(bridge.events()).encode()
    wait_for_event(bridge, "uidl_record_ignored", reason="bad_mac")
