"""`pop3-imap-bridge uidl import` against real old POP3 servers with their own UIDL schemes:
Dovecot's POP3 with another pop3_uidl_format, and Cyrus's pop3d, each on its own copy of the
mail. The mail is copied into the bridge's IMAP store through APPEND as a migration tool would
(another order, a Return-Path added, bare LF line ends, so sizes and bytes differ). A real
"leave mail on server" client that had fetched everything from the old server, its record of
seen UIDLs carried over to the bridge's address, then fetches nothing through the bridge, and
after that exactly the new mail."""

from __future__ import annotations

import csv
import poplib
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox import DovecotSandbox, Mailbox
from sandbox.cyrus import CyrusSandbox
from tests.harness import ThreadedBridge
from tests.integration.policy_support import STATE_FOLDER, folder_names
from tests.integration.uidl_support import (
    BRIDGE_HOST,
    FetchmailKeep,
    GetmailKeep,
    corpus,
    migrate,
    subjects,
    uidl_import,
    write_config,
)

BridgeFactory = Callable[..., ThreadedBridge]
OLD_FORMAT = "%08Xv%08Xu"  # UW's order: nothing the bridge would make up by itself


@pytest.fixture(scope="module")
def old_dovecot() -> Iterator[DovecotSandbox]:
    """The old server: a Dovecot of its own, its POP3 with another pop3_uidl_format."""
    workdir = Path(tempfile.mkdtemp(prefix="bridge-uidl-old-"))
    workdir.chmod(0o755)
    server = DovecotSandbox(workdir, extra_config=f"pop3_uidl_format = {OLD_FORMAT}\n")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def old_cyrus() -> Iterator[CyrusSandbox]:
    """The old server: Cyrus IMAP with its pop3d (UIDLs "uidvalidity.uid")."""
    workdir = Path(tempfile.mkdtemp(prefix="bridge-uidl-old-cyrus-"))
    workdir.chmod(0o755)
    server = CyrusSandbox(workdir, pop3=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def uidls_of(host: str, port: int, user: str, password: str) -> list[bytes]:
    pop = poplib.POP3(host, port, timeout=60)
    try:
        pop.user(user)
        pop.pass_(password)
        return [line.split()[1] for line in pop.uidl()[1]]
    finally:
        pop.close()


def password_file(tmp_path: Path, password: str) -> str:
    path = tmp_path / "password"
    path.write_text(password + "\n")
    return str(path)


def new_store_box(dovecot: DovecotSandbox, user: str, password: str) -> Mailbox:
    """The account on the bridge's IMAP store: the same login and password."""
    return dovecot.new_mailbox(user=user, password=password)


def test_fetchmail_fetches_nothing_after_the_cut_over_from_dovecot_then_exactly_the_new_mail(
    old_dovecot: DovecotSandbox, dovecot: DovecotSandbox, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    messages = corpus(12, "from-dovecot")
    old = old_dovecot.new_mailbox()
    old.append(messages)
    new = new_store_box(dovecot, old.user, old.password)
    order = list(range(12))
    random.Random(16).shuffle(order)
    migrate(messages, new.host, new.imap_port, new.user, new.password, order=order)

    device = FetchmailKeep(tmp_path / "device", old.user, old.password)
    assert len(device.run("127.0.0.1", old.pop3_port)) == 12  # the device had everything
    assert device.run("127.0.0.1", old.pop3_port) == []

    # Without the import, the same device would download all twelve again (shown on a copy).
    before = FetchmailKeep(tmp_path / "no-import", old.user, old.password)
    shutil.copy(device.home / ".fetchids", before.home / ".fetchids")
    unimported = bridge_factory(pop3={"listen": [f"{BRIDGE_HOST}:0"]}, uidl={"imported": True})
    assert before.carry_over("127.0.0.1", BRIDGE_HOST) == 12
    assert len(before.run(BRIDGE_HOST, unimported.port)) == 12

    config = write_config(tmp_path / "bridge.toml", dovecot.imap_port, "[uidl]\nimported = true\n")
    result = uidl_import(
        config, f"pop3://127.0.0.1:{old_dovecot.pop3_port}", old.user, "--password-file", password_file(tmp_path, old.password)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "recorded: 12 matched, 0 only on the old server, 0 only on IMAP, 0 ambiguous" in result.stdout

    bridge = bridge_factory(pop3={"listen": [f"{BRIDGE_HOST}:0"]}, uidl={"imported": True})
    # The old server's UIDLs, in the old server's order (not the order of the copy).
    old_uidls = uidls_of("127.0.0.1", old.pop3_port, old.user, old.password)
    assert uidls_of(BRIDGE_HOST, bridge.port, old.user, old.password) == old_uidls
    assert device.carry_over("127.0.0.1", BRIDGE_HOST) == 12
    assert device.run(BRIDGE_HOST, bridge.port) == []

    arrived = corpus(2, "after-cut-over")
    new.append(arrived)
    assert sorted(subjects(device.run(BRIDGE_HOST, bridge.port))) == sorted(subjects(arrived))
    assert device.run(BRIDGE_HOST, bridge.port) == []
    # New mail has the configured format, after the migrated messages.
    listed = uidls_of(BRIDGE_HOST, bridge.port, old.user, old.password)
    assert listed[:12] == old_uidls
    uidvalidity = new.observer().uidvalidity()
    assert listed[12:] == [b"%08x%08x" % (uid, uidvalidity) for uid in new.observer().uids()[12:]]


def test_getmail_fetches_nothing_after_the_cut_over_from_cyrus_then_exactly_the_new_mail(
    old_cyrus: CyrusSandbox, dovecot: DovecotSandbox, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    old = old_cyrus.new_mailbox()
    old.append(corpus(8, "from-cyrus"))
    observer = old.observer()
    # The migration copies what Cyrus stores (its own copy of the mail) through APPEND.
    stored = [observer.fetch(uid) for uid in observer.uids()]
    new = new_store_box(dovecot, old.user, old.password)
    migrate(stored, new.host, new.imap_port, new.user, new.password, order=[7, 6, 5, 4, 3, 2, 1, 0])

    device = GetmailKeep(tmp_path / "device", old.user, old.password)
    assert len(device.run("127.0.0.1", old_cyrus.pop3_port)) == 8
    assert device.run("127.0.0.1", old_cyrus.pop3_port) == []

    config = write_config(tmp_path / "bridge.toml", dovecot.imap_port, "[uidl]\nimported = true\n")
    result = uidl_import(
        config, f"pop3://127.0.0.1:{old_cyrus.pop3_port}", old.user, "--password-file", password_file(tmp_path, old.password)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "recorded: 8 matched" in result.stdout

    bridge = bridge_factory(pop3={"listen": [f"{BRIDGE_HOST}:0"]}, uidl={"imported": True})
    cyrus_uidls = uidls_of("127.0.0.1", old_cyrus.pop3_port, old.user, old.password)
    assert all(b"." in uidl for uidl in cyrus_uidls)  # Cyrus's own scheme
    assert uidls_of(BRIDGE_HOST, bridge.port, old.user, old.password) == cyrus_uidls
    assert device.carry_over("127.0.0.1", old_cyrus.pop3_port, BRIDGE_HOST, bridge.port) == 8
    assert device.run(BRIDGE_HOST, bridge.port) == []

    arrived = corpus(3, "cyrus-after")
    new.append(arrived)
    assert sorted(subjects(device.run(BRIDGE_HOST, bridge.port))) == sorted(subjects(arrived))
    assert device.run(BRIDGE_HOST, bridge.port) == []


def test_a_dry_run_prints_what_devices_would_see_and_writes_nothing(
    old_dovecot: DovecotSandbox, dovecot: DovecotSandbox, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    messages = corpus(4, "dry-run")
    old = old_dovecot.new_mailbox()
    old.append(messages)
    new = new_store_box(dovecot, old.user, old.password)
    migrate(messages[:3], new.host, new.imap_port, new.user, new.password)  # the last one was not copied
    new.append(corpus(1, "dry-run-new"))  # and new mail arrived on the IMAP side
    config = write_config(tmp_path / "bridge.toml", dovecot.imap_port)  # imported off: fine for a dry run
    result = uidl_import(
        config, f"pop3://127.0.0.1:{old_dovecot.pop3_port}", old.user, "--dry-run", "--password-file",
        password_file(tmp_path, old.password),
    )
    old_uidls = uidls_of("127.0.0.1", old.pop3_port, old.user, old.password)
    assert result.returncode == 1, result.stdout + result.stderr  # strict: it would not be recorded
    assert "would NOT be recorded" in result.stdout and "1 only on the old server, 1 only on IMAP" in result.stdout
    uid_new = new.observer().uids()[-1]
    diff = [line for line in result.stdout.splitlines() if line[:2] in ("  ", "- ", "+ ")]
    # Strict: nothing would be recorded, so every old UIDL would disappear and every message
    # come back under a new one.
    assert [line.split()[2].encode() for line in diff if line.startswith("- ")] == old_uidls
    assert len([line for line in diff if line.startswith("+ ")]) == 4
    lenient = uidl_import(
        config, f"pop3://127.0.0.1:{old_dovecot.pop3_port}", old.user, "--dry-run", "--lenient",
        "--password-file", password_file(tmp_path, old.password),
    )
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    diff = [line for line in lenient.stdout.splitlines() if line[:2] in ("  ", "- ", "+ ")]
    assert diff[:3] == [f"  {n} {uidl.decode()}" for n, uidl in enumerate(old_uidls[:3], 1)]
    assert diff[3] == f"- 4 {old_uidls[3].decode()}"
    assert diff[4].startswith("+ 4 ") and diff[4].endswith(f"{uid_new:08x}{new.observer().uidvalidity():08x}")
    assert STATE_FOLDER not in folder_names(new)  # nothing written


def test_strict_records_nothing_when_an_old_message_is_missing_and_lenient_records_the_rest(
    old_dovecot: DovecotSandbox, dovecot: DovecotSandbox, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    messages = corpus(5, "strict")
    old = old_dovecot.new_mailbox()
    old.append(messages)
    new = new_store_box(dovecot, old.user, old.password)
    migrate([messages[0], messages[1], messages[3], messages[4]], new.host, new.imap_port, new.user, new.password)
    config = write_config(tmp_path / "bridge.toml", dovecot.imap_port, "[uidl]\nimported = true\n")
    source = f"pop3://127.0.0.1:{old_dovecot.pop3_port}"
    password = password_file(tmp_path, old.password)
    bridge = bridge_factory(uidl={"imported": True})
    default = uidls_of("127.0.0.1", bridge.port, old.user, old.password)

    strict = uidl_import(config, source, old.user, "--password-file", password)
    assert strict.returncode == 1 and "NOT recorded" in strict.stdout and "1 only on the old server" in strict.stdout
    assert uidls_of("127.0.0.1", bridge.port, old.user, old.password) == default

    lenient = uidl_import(config, source, old.user, "--password-file", password, "--lenient")
    assert lenient.returncode == 0 and "recorded: 4 matched, 1 only on the old server" in lenient.stdout
    old_uidls = uidls_of("127.0.0.1", old.pop3_port, old.user, old.password)
    assert uidls_of("127.0.0.1", bridge.port, old.user, old.password) == [old_uidls[i] for i in (0, 1, 3, 4)]

    # Importing again replaces the earlier import (it does not pile up).
    again = uidl_import(config, source, old.user, "--password-file", password, "--lenient")
    assert again.returncode == 0 and "replacing an earlier import (1 records)" in again.stdout
    assert uidls_of("127.0.0.1", bridge.port, old.user, old.password) == [old_uidls[i] for i in (0, 1, 3, 4)]


def test_bulk_import_reports_each_account(
    old_dovecot: DovecotSandbox, dovecot: DovecotSandbox, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    accounts = []
    for n in range(3):
        messages = corpus(3 + n, f"bulk{n}")
        old = old_dovecot.new_mailbox()
        old.append(messages)
        new = new_store_box(dovecot, old.user, old.password)
        migrate(messages, new.host, new.imap_port, new.user, new.password)
        accounts.append(old)
    secret = tmp_path / "second.pw"
    secret.write_text(accounts[1].password + "\n")
    rows = tmp_path / "accounts.csv"
    rows.write_text(
        "# account, password or file:PATH, old-server login\n"
        f"{accounts[0].user},{accounts[0].password}\n"
        f"{accounts[1].user},file:{secret},{accounts[1].user}\n"
        "\n"
        f"{accounts[2].user},wrong-password\n"
    )
    report = tmp_path / "report.csv"
    config = write_config(tmp_path / "bridge.toml", dovecot.imap_port, "[uidl]\nimported = true\n")
    result = uidl_import(
        config, f"pop3://127.0.0.1:{old_dovecot.pop3_port}", "--accounts", str(rows), "--report", str(report), "--jobs", "2"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{accounts[0].user}: recorded: 3 matched" in result.stdout
    assert f"{accounts[1].user}: recorded: 4 matched" in result.stdout
    assert f"{accounts[2].user}: error: " in result.stdout and "refused the login" in result.stdout
    assert "3 accounts: 2 recorded, 0 not, 1 errors" in result.stdout
    assert "wrong-password" not in result.stdout + result.stderr
    with open(report, newline="") as handle:
        rows_out = {row["account"]: row for row in csv.DictReader(handle)}
    assert rows_out[accounts[1].user]["outcome"] == "recorded" and rows_out[accounts[1].user]["matched"] == "4"
    assert rows_out[accounts[2].user]["outcome"] == "error"
    bridge = bridge_factory(uidl={"imported": True})
    for old in accounts[:2]:
        assert uidls_of("127.0.0.1", bridge.port, old.user, old.password) == uidls_of(
            "127.0.0.1", old.pop3_port, old.user, old.password
        )


def test_the_import_refuses_to_record_what_the_bridge_would_not_serve(
    old_dovecot: DovecotSandbox, dovecot: DovecotSandbox, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "bridge.toml", dovecot.imap_port)
    result = uidl_import(config, f"pop3://127.0.0.1:{old_dovecot.pop3_port}", "someone", "--password-file", "/dev/null")
    assert result.returncode == 2 and "[uidl] imported = true" in result.stderr
    bad = uidl_import(config, "imap://old.example", "someone", "--dry-run", "--password-file", "/dev/null")
    assert bad.returncode == 2 and "pop3s://host" in bad.stderr
    unsigned = tmp_path / "unsigned.toml"
    unsigned.write_text(f'[upstream]\nport = {dovecot.imap_port}\n[uidl]\nimported = true\n')
    nokey = uidl_import(unsigned, f"pop3://127.0.0.1:{old_dovecot.pop3_port}", "someone", "--password-file", "/dev/null")
    assert nokey.returncode == 2 and "delete.state_key: required" in nokey.stderr
