"""Volume at the edges of the corpus: one 50 MB message retrieved whole, and a maildrop of
20,000 messages listed. Correctness only (speed belongs in bench/): every byte of the big
message, and every size and UIDL of the listing, as the IMAP server has them."""

from __future__ import annotations

import hashlib

import pytest

from sandbox import Mailbox, big_message, numbered_messages
from tests.harness import RawPop3, ThreadedBridge, retr_payload

POP3_TERMINATOR = b"\r\n.\r\n"


@pytest.mark.slow
def test_50_mb_message_arrives_whole(bridge: ThreadedBridge, mailbox: Mailbox) -> None:
    message = big_message(50 * 1024 * 1024, dot_every=50, tag="fifty")
    mailbox.append([message])
    with RawPop3("127.0.0.1", bridge.port, timeout=120) as raw:
        raw.login(mailbox.user, mailbox.password)
        assert raw.command(b"LIST 1") == b"+OK 1 %d\r\n" % len(message)
        status, body = raw.command_multiline(b"RETR 1")
        assert status.startswith(b"+OK")
        assert body.endswith(POP3_TERMINATOR)
        # Un-stuff without another 50 MB copy per step: every stuffed line starts "..".
        unstuffed = body[:-3].replace(b"\r\n..", b"\r\n.")
        assert len(unstuffed) == len(message)
        assert hashlib.sha256(unstuffed).digest() == hashlib.sha256(retr_payload(message)).digest()
        assert raw.command(b"QUIT").startswith(b"+OK")


@pytest.mark.slow
def test_maildrop_of_20000_messages_is_listed_exactly(bridge: ThreadedBridge, mailbox: Mailbox) -> None:
    count = 20_000
    result = mailbox.append(numbered_messages(count, body_lines=2))
    sizes = {info.uid: info.size for info in mailbox.observer().messages()}
    assert len(sizes) == count
    with RawPop3("127.0.0.1", bridge.port, timeout=120) as raw:
        raw.login(mailbox.user, mailbox.password)
        assert raw.command(b"STAT") == b"+OK %d %d\r\n" % (count, sum(sizes.values()))
        status, body = raw.command_multiline(b"LIST")
        listed = [tuple(map(int, line.split())) for line in body.split(b"\r\n")[:-2]]
        assert listed == [(n, sizes[uid]) for n, uid in enumerate(result.uids, 1)]
        status, body = raw.command_multiline(b"UIDL")
        uidls = [line.split()[1] for line in body.split(b"\r\n")[:-2]]
        assert uidls == [b"%08x%08x" % (uid, result.uidvalidity) for uid in result.uids]
        status, body = raw.command_multiline(b"RETR %d" % count)
        assert b"Subject: message %d\r\n" % count in body
        assert raw.command(b"QUIT").startswith(b"+OK")
