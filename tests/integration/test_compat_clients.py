"""Real POP3 clients against the bridge (Dovecot upstream): Python's poplib, fetchmail and
getmail6, over plain TCP and over TLS (implicit TLS on `pop3.tls_listen`; poplib also
through STLS), leaving the mail on the server and deleting it. Every client must deliver
the corpus intact, modulo what that client documents it changes:

- poplib: nothing (it hands back lines without their CRLF, un-stuffed).
- fetchmail: LF line ends, a final newline, a blank line after a body-less header, its own
  Received header on top; lines past RFC 5322's 998 octets are out of scope (fetchmail 6.4
  mangles them against any server, Dovecot's own POP3 included).
- getmail6: LF line ends, a final newline, a "Return-Path: <unknown>" header on top, and
  header fields longer than 78 characters refolded (Python's email package).
"""

from __future__ import annotations

import hashlib
import os
import poplib
import re
import shutil
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox import Mailbox, big_message, numbered_messages, tricky_messages
from tests.harness import ThreadedBridge, poplib_payload, retr_payload
from tests.security_support import TlsFiles

RFC5322_MAX_LINE = 998
_SUBJECT = re.compile(rb"^Subject: ([^\r\n]*)", re.MULTILINE)


def corpus(*, max_line: int | None = None) -> list[bytes]:
    messages = list(tricky_messages().values())
    messages.append(big_message(3 * 1024 * 1024 + 777, tag="clients-big"))
    messages.extend(numbered_messages(3))
    if max_line is not None:
        messages = [m for m in messages if max(len(line) for line in m.split(b"\r\n")) <= max_line]
    return messages


def key(data: bytes) -> bytes:
    found = _SUBJECT.search(data)
    assert found is not None, data[:100]
    return found.group(1)


def unfold(data: bytes) -> bytes:
    """LF text with the header's folded lines joined (folding is not content, RFC 5322 2.2.3)."""
    head, sep, body = data.partition(b"\n\n")
    return re.sub(rb"\n([ \t])", rb"\1", head) + sep + body


def as_lf_delivery(stored: bytes) -> bytes:
    data = stored.replace(b"\r\n", b"\n")
    if not data.endswith(b"\n"):
        data += b"\n"
    return data


@pytest.fixture(params=["plain", "tls"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tls_bridge(bridge_factory: Callable[..., ThreadedBridge], tls_files: TlsFiles) -> tuple[int, int]:
    """A bridge with a plain listener (offering STLS) and an implicit-TLS one: their ports."""
    bridge = bridge_factory(
        pop3={"tls_cert": tls_files.cert, "tls_key": tls_files.key, "tls_listen": ["127.0.0.1:0"], "stls": True}
    )
    return bridge.port, int(bridge.addresses[1].rsplit(":", 1)[1])


@pytest.fixture
def client_port(tls_bridge: tuple[int, int], transport: str) -> int:
    plain, tls = tls_bridge
    return tls if transport == "tls" else plain


# -- poplib ------------------------------------------------------------------------------------


@pytest.mark.parametrize("delete", [False, True], ids=["keep", "delete"])
@pytest.mark.parametrize("mode", ["plain", "tls", "stls"])
def test_poplib(tls_bridge: tuple[int, int], mailbox: Mailbox, tls_files: TlsFiles, mode: str, delete: bool) -> None:
    plain_port, tls_port = tls_bridge
    messages = corpus()
    uids = mailbox.append(messages).uids
    if mode == "tls":
        pop: poplib.POP3 = poplib.POP3_SSL("127.0.0.1", tls_port, context=tls_files.client_context(), timeout=60)
    else:
        pop = poplib.POP3("127.0.0.1", plain_port, timeout=60)
        if mode == "stls":
            pop.stls(context=tls_files.client_context())
    try:
        pop.user(mailbox.user)
        pop.pass_(mailbox.password)
        assert pop.stat()[0] == len(messages)
        for n, original in enumerate(messages, 1):
            assert poplib_payload(pop.retr(n)[1]) == retr_payload(original)
            if delete:
                pop.dele(n)
        assert pop.quit().startswith(b"+OK")
    finally:
        pop.close()
    assert mailbox.observer().uids() == ([] if delete else uids)


# -- getmail6 ----------------------------------------------------------------------------------


_MDA = (
    "cat > $(mktemp DIR/msg.XXXXXXXX); i=0; "
    "while [ $i -lt 3000 ] && [ $(( 0x$(awk '/^SigCgt/ {print $2}' /proc/$PPID/status) & 0x10000 )) -eq 0 ]; "
    "do sleep 0.01; i=$((i + 1)); done"
)


def run_getmail(home: Path, port: int, box: Mailbox, *, tls: bool, ca_file: str, delete: bool) -> list[bytes]:
    getmail = shutil.which("getmail")
    assert getmail is not None, "getmail is missing; install the Debian package getmail6 (scripts/install-deps)"
    delivered = home / "delivered"
    delivered.mkdir(parents=True)
    retriever = "SimplePOP3SSLRetriever" if tls else "SimplePOP3Retriever"
    tls_lines = f"ca_certs = {ca_file}\n" if tls else ""
    (home / "getmailrc").write_text(
        f"[retriever]\ntype = {retriever}\nserver = 127.0.0.1\nport = {port}\n"
        f"username = {box.user}\npassword = {box.password}\n{tls_lines}"
        # An external MDA writes each message to its own file; getmail refuses to deliver to a
        # Maildir as root, and allow_root_commands lets the MDA run in CI (root). getmail 6.18
        # installs its SIGCHLD handler only after fork() (getmailcore.baseclasses.forkchild), so
        # a delivery child that exits before the parent gets there is never noticed (getmail
        # then fails after its timeout): the MDA exits only once its parent catches SIGCHLD
        # (signal 17: bit 0x10000 of SigCgt in /proc/PID/status), at most 30 s later.
        f"[destination]\ntype = MDA_external\npath = /bin/sh\n"
        f'arguments = ("-c", "{_MDA.replace("DIR", str(delivered))}")\n'
        f"allow_root_commands = true\n"
        f"[options]\ndelete = {str(delete).lower()}\nread_all = true\ndelivered_to = false\n"
        f"received = false\nverbose = 0\n"
    )
    result = subprocess.run(
        [getmail, f"--getmaildir={home}", "--rcfile=getmailrc"],
        capture_output=True, timeout=300, stdin=subprocess.DEVNULL,
        env={"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")[-3000:]
    return [re.sub(rb"\AReturn-Path: [^\n]*\n", b"", path.read_bytes()) for path in sorted(delivered.iterdir())]


@pytest.mark.parametrize("delete", [False, True], ids=["keep", "delete"])
def test_getmail(
    client_port: int, mailbox: Mailbox, tls_files: TlsFiles, tmp_path: Path, transport: str, delete: bool
) -> None:
    port = client_port
    messages = corpus()
    uids = mailbox.append(messages).uids
    delivered = run_getmail(tmp_path / "getmail", port, mailbox, tls=transport == "tls", ca_file=tls_files.ca_file, delete=delete)
    assert len(delivered) == len(messages)
    by_key = {key(unfold(data)): unfold(data) for data in delivered}
    assert len(by_key) == len(messages), "a message was delivered twice"
    for original in messages:
        expected = unfold(as_lf_delivery(original))
        got = by_key[key(expected)]
        # getmail adds the blank line a header-only message lacks.
        assert got in (expected, expected + b"\n"), key(expected)
    assert mailbox.observer().uids() == ([] if delete else uids)


# -- fetchmail ---------------------------------------------------------------------------------


_RECEIVED = re.compile(rb"\AReceived: [^\n]*\n(?:[ \t][^\n]*\n)*")


def certificate_fingerprint(cert_file: str) -> str:
    """MD5 of the first (leaf) certificate in a PEM file, the form fetchmail 6.4 compares."""
    pem = Path(cert_file).read_text()
    der = ssl.PEM_cert_to_DER_cert(pem[: pem.index("-----END CERTIFICATE-----") + 25])
    digest = hashlib.md5(der, usedforsecurity=False).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def run_fetchmail(home: Path, port: int, box: Mailbox, *, tls: bool, fingerprint: str, delete: bool) -> list[bytes]:
    fetchmail = shutil.which("fetchmail")
    assert fetchmail is not None, "fetchmail is missing; install the Debian package fetchmail (scripts/install-deps)"
    delivered = home / "delivered"
    delivered.mkdir(parents=True)
    mda = home / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp {delivered}/msg.XXXXXXXX)"\n')
    mda.chmod(0o755)
    # Plain: sslproto "" keeps fetchmail 6.4 from insisting on STLS. TLS: implicit TLS, the
    # server identified by its certificate's fingerprint (fetchmail 6.4's name check finds
    # no name in a certificate that has subjectAltName only, as trustme's have).
    tls_options = f'ssl no sslcertck sslfingerprint "{fingerprint}"' if tls else 'sslproto ""'
    rcfile = home / "fetchmailrc"
    rcfile.write_text(
        "set no bouncemail\nset no syslog\n"
        f"poll 127.0.0.1 protocol POP3 port {port} timeout 60\n"
        f'  user "{box.user}" there with password "{box.password}"\n'
        f"  options {'no keep' if delete else 'keep'} fetchall no rewrite {tls_options}\n"
        f'  mda "{mda}"\n'
    )
    rcfile.chmod(0o600)
    result = subprocess.run(
        [fetchmail, "-f", str(rcfile), "--nodetach"],
        capture_output=True, timeout=300, stdin=subprocess.DEVNULL, cwd=home,
        env={"HOME": str(home), "FETCHMAILHOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")[-3000:]
    out = []
    for path in sorted(delivered.iterdir()):
        data = path.read_bytes()
        received = _RECEIVED.match(data)
        assert received is not None, data[:200]
        out.append(data[received.end() :])
    return out


@pytest.mark.parametrize("delete", [False, True], ids=["keep", "delete"])
def test_fetchmail(
    client_port: int, mailbox: Mailbox, tls_files: TlsFiles, tmp_path: Path, transport: str, delete: bool
) -> None:
    port = client_port
    messages = corpus(max_line=RFC5322_MAX_LINE)
    uids = mailbox.append(messages).uids
    delivered = run_fetchmail(
        tmp_path / "fetchmail", port, mailbox, tls=transport == "tls",
        fingerprint=certificate_fingerprint(tls_files.cert), delete=delete,
    )
    by_key = {key(data): data for data in delivered}
    assert len(by_key) == len(delivered) == len(messages)
    for original in messages:
        expected = as_lf_delivery(original)
        if b"\n\n" not in expected:
            expected += b"\n"
        assert by_key[key(expected)] == expected, key(expected)
    assert mailbox.observer().uids() == ([] if delete else uids)
