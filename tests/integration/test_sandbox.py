"""The test infrastructure itself: a real Dovecot, real seeding, a real POP3 oracle.

If these fail, no other integration test result means anything.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

import sandbox.dovecot as dovecot_module
from sandbox import (
    DovecotNotInstalledError,
    DovecotSandbox,
    DovecotStartError,
    Mailbox,
    SeedingError,
    append_messages,
    big_message,
    demo_messages,
    numbered_messages,
    tricky_messages,
)
from sandbox.cyrus import CyrusSandbox

CRLF = b"\r\n"


def pop3_retr_bytes(pop: poplib.POP3, which: int) -> bytes:
    """RETR as bytes on the wire minus the terminator (poplib already un-stuffs dots)."""
    _resp, lines, _octets = pop.retr(which)
    return b"".join(line + CRLF for line in lines)


# -- logging in -----------------------------------------------------------------


def test_imap_login_works(mailbox: Mailbox) -> None:
    imap = imaplib.IMAP4(mailbox.host, mailbox.imap_port, timeout=10)
    try:
        typ, _ = imap.login(mailbox.user, mailbox.password)
        assert typ == "OK"
        typ, data = imap.select("INBOX")
        assert (typ, data) == ("OK", [b"0"])
    finally:
        imap.logout()


def test_wrong_password_fails_and_the_right_one_still_works(mailbox: Mailbox) -> None:
    # Repeated failures from 127.0.0.1 must not lock the user out or start an
    # auth penalty (the sandbox disables it; see DovecotSandbox's config).
    for _attempt in range(3):
        imap = imaplib.IMAP4(mailbox.host, mailbox.imap_port, timeout=10)
        try:
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                imap.login(mailbox.user, mailbox.password + "x")
        finally:
            imap.shutdown()
        pop = mailbox.native_pop3(login=False)
        pop.user(mailbox.user)
        with pytest.raises(poplib.error_proto, match="-ERR"):
            pop.pass_("not-" + mailbox.password)
    assert mailbox.native_pop3().stat() == (0, 0)
    assert mailbox.observer().uids() == []


def test_unknown_user_fails(dovecot: DovecotSandbox) -> None:
    imap = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login("nobody-has-this-name", "whatever")
    finally:
        imap.shutdown()


def test_users_added_back_to_back_can_log_in_at_once(dovecot: DovecotSandbox) -> None:
    # Dovecot re-reads a known passwd-file at most once a second; users added
    # within the same second must not depend on that.
    names = [f"burst{os.getpid()}x{i}" for i in range(5)]
    for name in names:
        dovecot.add_user(name, "pw-" + name)
        imap = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
        try:
            assert imap.login(name, "pw-" + name)[0] == "OK"
        finally:
            imap.logout()


def test_fresh_users_are_empty(mailbox_factory: Callable[[], Mailbox]) -> None:
    first, second = mailbox_factory(), mailbox_factory()
    assert first.user != second.user
    first.append(numbered_messages(3))
    assert second.observer().uids() == []
    assert second.native_pop3().stat() == (0, 0)
    assert len(first.observer().uids()) == 3


# -- seeding ----------------------------------------------------------------------


def test_seeding_1000_messages_gives_1000_uids_with_exact_sizes(mailbox: Mailbox) -> None:
    messages = list(numbered_messages(1000))
    result = mailbox.append(messages)

    assert len(result.uids) == 1000
    assert result.uids == sorted(set(result.uids))
    obs = mailbox.observer()
    assert obs.uidvalidity() == result.uidvalidity
    infos = obs.messages()
    assert [i.uid for i in infos] == result.uids
    assert [i.size for i in infos] == [len(m) for m in messages]
    assert all(i.flags == frozenset() for i in infos)
    assert obs.fetch(result.uids[500]) == messages[500]


@pytest.mark.slow
def test_seeding_20000_messages(mailbox: Mailbox) -> None:
    messages = list(numbered_messages(20_000))
    result = mailbox.append(messages)
    assert len(result.uids) == 20_000
    assert mailbox.native_pop3().stat() == (20_000, sum(map(len, messages)))
    assert mailbox.observer().fetch(result.uids[-1]) == messages[-1]


def test_seeding_with_flags(mailbox: Mailbox) -> None:
    result = mailbox.append(numbered_messages(2), flags=["\\Seen", "\\Flagged"])
    obs = mailbox.observer()
    assert {i.uid: i.flags for i in obs.messages()} == {
        uid: frozenset({"\\Seen", "\\Flagged"}) for uid in result.uids
    }


def test_seeding_reports_refused_appends(mailbox: Mailbox) -> None:
    # Three MULTIAPPEND batches, all refused; the pipelined literals must still
    # be consumed so the replies line up and the next seeding works.
    with pytest.raises(SeedingError, match=r"(?s)3 of 3 APPEND commands failed.*TRYCREATE"):
        mailbox.append(numbered_messages(1200), mailbox="NoSuchFolder")
    assert len(mailbox.append(numbered_messages(2)).uids) == 2


def test_seeding_with_a_wrong_password_fails(mailbox: Mailbox) -> None:
    with pytest.raises(SeedingError, match="AUTHENTICATIONFAILED"):
        append_messages(mailbox.host, mailbox.imap_port, mailbox.user, "wrong", [b"x"])


def test_seeding_rejects_nul_on_a_real_server(mailbox: Mailbox) -> None:
    with pytest.raises(ValueError, match="NUL"):
        mailbox.append([b"Subject: x\r\n\r\na\0b\r\n"])


# -- the POP3 oracle ------------------------------------------------------------------


def test_native_pop3_retrieves_exactly_the_appended_bytes(
    mailbox: Mailbox, native_pop3: Callable[..., poplib.POP3]
) -> None:
    corpus = {**tricky_messages(), **{f"demo{i}": m for i, m in enumerate(demo_messages())}}
    result = mailbox.append(corpus.values())
    obs = mailbox.observer()
    pop = native_pop3(mailbox)
    _resp, listing, _ = pop.list()
    assert len(listing) == len(corpus)

    for n, ((name, data), uid, entry) in enumerate(
        zip(corpus.items(), result.uids, listing, strict=True), start=1
    ):
        assert obs.fetch(uid) == data, name
        assert entry == b"%d %d" % (n, len(data)), name
        retrieved = pop3_retr_bytes(pop, n)
        if data.endswith(CRLF):
            assert retrieved == data, name
        else:
            # POP3 cannot end a message mid-line: Dovecot adds the CRLF before the
            # terminating dot (while LIST still reports the stored size).
            assert retrieved == data + CRLF, name


def test_native_pop3_retrieves_a_20mb_message_exactly(mailbox: Mailbox) -> None:
    data = big_message(20 * 1024 * 1024)
    (uid,) = mailbox.append([data]).uids
    assert mailbox.observer().fetch(uid) == data
    pop = mailbox.native_pop3()
    assert pop.stat() == (1, len(data))
    assert pop3_retr_bytes(pop, 1) == data


# -- corpus generators --------------------------------------------------------------


def test_big_message_has_the_exact_size_and_crlf_lines() -> None:
    refused = []
    for size in [*range(100, 400), 1_000_001, 20 * 1024 * 1024 + 1]:
        try:
            data = big_message(size)
        except ValueError:
            refused.append(size)
            continue
        assert len(data) == size
        assert data.count(b"\n") == data.count(CRLF) == data.count(b"\r")
        assert data.endswith(CRLF)
    # Only sizes below the header, and header + 1 (a line needs its CRLF), are refused.
    assert refused and max(refused) < 200
    assert max(refused) - 1 not in refused


def test_corpus_is_imap_safe_and_crlf_only() -> None:
    corpus = {**tricky_messages(), **{f"demo{i}": m for i, m in enumerate(demo_messages())}}
    for name, data in corpus.items():
        assert data, name
        assert b"\0" not in data, name
        assert data.count(b"\n") == data.count(CRLF), name
        assert data.count(b"\r") == data.count(CRLF), name
    tricky = tricky_messages()
    assert b"\r\n.\r\n" in tricky["lone_dot_line"]
    assert not tricky["no_final_crlf"].endswith(CRLF)
    assert max(len(line) for line in tricky["long_line_20000"].split(CRLF)) >= 20_000


# -- observer helpers --------------------------------------------------------------------


def test_observer_flags_and_expunge_are_seen_by_native_pop3(mailbox: Mailbox) -> None:
    uids = mailbox.append(numbered_messages(5)).uids
    obs = mailbox.observer()
    obs.store_flags([uids[0]], ["\\Seen"])
    assert obs.flags(uids[0]) == {"\\Seen"}
    obs.store_flags([uids[0]], ["\\Seen"], mode="-")
    assert obs.flags(uids[0]) == frozenset()

    obs.expunge([uids[1], uids[3]])
    assert obs.uids() == [uids[0], uids[2], uids[4]]
    assert mailbox.native_pop3().stat()[0] == 3


# -- lifecycle -----------------------------------------------------------------------------


def test_stop_start_keeps_ports_users_and_mail(own_dovecot: DovecotSandbox) -> None:
    box = own_dovecot.new_mailbox("keeper", "secret")
    imap_port, pop3_port = own_dovecot.imap_port, own_dovecot.pop3_port
    try:
        result = box.append(numbered_messages(3))
        own_dovecot.stop()
        assert not own_dovecot.running
        with pytest.raises(OSError):
            socket.create_connection((own_dovecot.host, imap_port), timeout=2).close()

        own_dovecot.start()
        assert (own_dovecot.imap_port, own_dovecot.pop3_port) == (imap_port, pop3_port)
        obs = box.observer()
        assert obs.uids() == result.uids
        assert obs.uidvalidity() == result.uidvalidity
        assert box.native_pop3().stat()[0] == 3
    finally:
        box.close()


def test_pid_and_children_are_gone_after_stop(own_dovecot: DovecotSandbox) -> None:
    pid = own_dovecot.pid
    assert pid is not None
    # Make sure login and mail processes exist, so their cleanup is checked too.
    box = own_dovecot.new_mailbox()
    box.observer()
    box.native_pop3()
    family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    assert len(family) > 1

    own_dovecot.stop()
    box.close()
    assert own_dovecot.pid is None
    _gone, alive = psutil.wait_procs(family, timeout=10)
    assert alive == [], f"still running after stop: {alive}"
    assert not psutil.pid_exists(pid)


def test_kick_disconnects_imap_and_pop3(mailbox: Mailbox, dovecot: DovecotSandbox) -> None:
    mailbox.append(numbered_messages(1))
    obs = mailbox.observer()
    pop = mailbox.native_pop3()
    assert dovecot.sessions(mailbox.user) == 2

    dovecot.kick(mailbox.user)

    assert dovecot.sessions(mailbox.user) == 0
    with pytest.raises((imaplib.IMAP4.abort, OSError)):
        obs.noop()
    with pytest.raises((poplib.error_proto, OSError)):
        pop.noop()
    # Kicking is not banning: the user can come straight back.
    assert mailbox.native_pop3().stat()[0] == 1


def test_start_failure_reports_the_log() -> None:
    workdir = tempfile.mkdtemp(prefix="bridge-dovecot-bad-")
    try:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            port = squatter.getsockname()[1]
            sandbox = DovecotSandbox(workdir, imap_port=port)
            # The message must carry Dovecot's own explanation from its log.
            with pytest.raises(DovecotStartError, match="Address already in use"):
                sandbox.start()
            assert sandbox.pid is None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_missing_dovecot_is_a_loud_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(dovecot_module, "_EXTRA_BIN_DIRS", ())
    with pytest.raises(DovecotNotInstalledError, match="dovecot-imapd dovecot-pop3d"):
        DovecotSandbox(tmp_path / "sandbox")


def test_missing_protocol_service_is_a_loud_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(dovecot_module, "_libexec_dir", lambda _doveconf: tmp_path / "no-libexec")
    monkeypatch.setattr(dovecot_module, "UNPACKED_PACKAGES_DIR", tmp_path / "nothing-unpacked")
    with pytest.raises(DovecotNotInstalledError, match="dovecot-imapd"):
        DovecotSandbox(tmp_path / "sandbox")


def test_an_unpacked_imap_package_serves_with_every_one_of_its_services(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/install-deps unpacks dovecot-imapd instead of installing it next to a Dovecot the
    machine already had. Dovecot checks the executable of every service of the imap protocol
    (imap-urlauth, imap-urlauth-worker, ...), not only imap and imap-login: each must be
    pointed at the unpacked copy, or Dovecot refuses to start (the fresh-machine bug)."""
    installed = dovecot_module._libexec_dir(dovecot_module._find_binary("doveconf"))
    root = Path(tempfile.mkdtemp(prefix="bridge-unpacked-"))
    try:
        root.chmod(0o755)  # the mail user execs the services from here
        unpacked = root / "dovecot-imapd" / "usr/lib/dovecot"
        unpacked.mkdir(parents=True)
        for service in ("imap", "imap-login", "imap-urlauth", "imap-urlauth-login", "imap-urlauth-worker", "imap-hibernate"):
            shutil.copy2(installed / service, unpacked / service)
        monkeypatch.setattr(dovecot_module, "_libexec_dir", lambda _doveconf: root / "not-installed")
        monkeypatch.setattr(dovecot_module, "UNPACKED_PACKAGES_DIR", root)
        with DovecotSandbox(root / "sandbox", pop3=False) as dovecot:
            config = dovecot.config_path.read_text()
            assert f"executable = {unpacked / 'imap-urlauth-worker'}" in config
            assert "protocols = imap\n" in config
            box = dovecot.new_mailbox()
            box.append(numbered_messages(2))
            assert len(box.observer().uids()) == 2
            box.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_mail_belongs_to_an_unprivileged_user(mailbox: Mailbox) -> None:
    mailbox.append(numbered_messages(1))
    new_or_cur = [p for d in ("new", "cur") for p in (mailbox.maildir / d).iterdir()]
    assert new_or_cur
    owners = {p.stat().st_uid for p in new_or_cur}
    # Dovecot refuses uid 0 for mail; as root the sandbox uses an unprivileged user.
    assert owners == {mailbox.dovecot.mail_uid}
    assert 0 not in owners


def test_stopping_one_cyrus_leaves_another_serving(cyrus: CyrusSandbox) -> None:
    """A Cyrus master shutting down signals its whole process group: each master has its
    own, or stopping a test's private Cyrus took the session's down with it."""
    from sandbox.netcheck import greets

    workdir = tempfile.mkdtemp(prefix="bridge-cyrus-other-")
    try:
        other = CyrusSandbox(workdir)
        other.start()
        other.restart()
        other.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert cyrus.running and greets("127.0.0.1", cyrus.imap_port, b"* OK")
    # The admin login the device commands use acts as a user (proxyservers).
    box = cyrus.new_mailbox()
    box.append([b"Subject: x\r\n\r\nx\r\n"])
    client = imaplib.IMAP4("127.0.0.1", cyrus.imap_port)
    try:
        client.authenticate("PLAIN", lambda _: f"{box.user}\0{cyrus.admin_login}\0{cyrus.admin_password}".encode())
        assert client.select("INBOX") == ("OK", [b"1"])
    finally:
        client.logout()
