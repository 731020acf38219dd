"""The oracle: Dovecot's own POP3 server on the same maildir. For the whole tricky corpus,
STAT, LIST, UIDL, RETR and TOP through the bridge must put the same bytes on the wire as
Dovecot's POP3 does (dot-stuffing and terminator included), compared on raw sockets. Status
line texts may differ; what follows them, and the numbers in single-line answers, may not.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sandbox import Mailbox, numbered_messages, tricky_messages
from tests.harness import ENGINES, RawPop3, ThreadedBridge, pop3_unstuff, retr_payload

CRLF = b"\r\n"
SMALL_CHUNK = 4096  # the smallest fetch_chunk the configuration accepts
TOP_LINES = (0, 1, 2, 5, 100, 4294967295)  # 0, a few, more than any body has, and huge


def _fill(prefix: bytes, start: int, end: int) -> bytes:
    """CRLF lines (at most 84 octets each) that take a message from offset ``start`` to
    exactly offset ``end``."""
    out = b""
    remaining = end - start
    assert remaining > 20, "leave room for at least one line"
    while remaining > 84:
        out += prefix + b"x" * (64 - len(prefix) - 2) + CRLF
        remaining -= 64
    return out + prefix + b"y" * (remaining - len(prefix) - 2) + CRLF


def chunk_boundary_messages(chunk: int = SMALL_CHUNK) -> dict[str, bytes]:
    """Messages whose interesting bytes sit exactly on ``chunk`` boundaries, so that partial
    FETCHes of ``chunk`` octets split them: the blank line ending the header (TOP's cut),
    a CR from its LF, a line-starting dot from the LF before it, and the message end."""
    out: dict[str, bytes] = {}
    for shift in (-2, -1, 0, 1, 2):
        head = b"Subject: chunk boundary %+d\r\n" % shift
        head += _fill(b"X-Pad: ", len(head), chunk + shift)
        message = head + CRLF  # the blank line starts at chunk + shift
        message += _fill(b"body ", len(message), 2 * chunk + shift)
        message += b".a dot line starting at 2*chunk%+d\r\n..\r\n.\r\n" % shift
        message += _fill(b"more ", len(message), 3 * chunk + shift - 3)
        message += b".\r\n"  # the message ends with a lone dot line, at 3*chunk + shift
        assert len(message) == 3 * chunk + shift
        out[f"boundary{shift:+d}"] = message
    tail = b"Subject: ends in a dot without CRLF at a chunk end\r\n"
    tail += _fill(b"X-Pad: ", len(tail), chunk - 10)
    tail += CRLF
    tail += _fill(b"b ", len(tail), 2 * chunk - 1) + b"."
    assert len(tail) == 2 * chunk
    out["boundary_dot_no_crlf"] = tail
    return out


def oracle_corpus() -> dict[str, bytes]:
    corpus = dict(tricky_messages())
    corpus.update(chunk_boundary_messages())
    corpus.update({f"numbered{n}": m for n, m in enumerate(numbered_messages(3), 1)})
    return corpus


def transcript(port: int, mailbox: Mailbox, count: int) -> list[tuple[bytes, bytes, bytes]]:
    """(command, status line, rest of the response) for everything the oracle compares."""
    out: list[tuple[bytes, bytes, bytes]] = []
    with RawPop3(mailbox.host, port) as pop:
        pop.login(mailbox.user, mailbox.password)
        out.append((b"STAT", pop.command(b"STAT"), b""))
        for command in (b"LIST", b"UIDL"):
            out.append((command, *pop.command_multiline(command)))
        for n in range(1, count + 1):
            for command in (b"LIST %d" % n, b"UIDL %d" % n):
                out.append((command, pop.command(command), b""))
            out.append((b"RETR %d" % n, *pop.command_multiline(b"RETR %d" % n)))
            for lines in TOP_LINES:
                command = b"TOP %d %d" % (n, lines)
                out.append((command, *pop.command_multiline(command)))
    return out


def comparable(command: bytes, status: bytes, rest: bytes) -> tuple[bytes, ...]:
    """What must agree: +OK/-ERR, the numbers of single-line answers, every byte after."""
    words = status.split()
    if command.split()[0] in (b"STAT", b"LIST", b"UIDL") and not rest:
        return (command, *words)  # "+OK 3 1234" / "+OK 2 0000000100000001..." in full
    return (command, words[0], rest)




@pytest.fixture(
    params=[(engine, chunk) for engine in ENGINES for chunk in (None, SMALL_CHUNK)],
    ids=lambda p: f"{p[0]}-{'chunk_4096' if p[1] else 'default_chunk'}",
)
def oracle_bridge(request: pytest.FixtureRequest, bridge_factory: Callable[..., ThreadedBridge]) -> ThreadedBridge:
    engine, chunk = request.param
    upstream: dict[str, object] = {"engine": engine}
    if chunk is not None:
        upstream["fetch_chunk"] = chunk
    return bridge_factory(upstream=upstream)


def test_bridge_matches_dovecots_own_pop3(oracle_bridge: ThreadedBridge, mailbox: Mailbox) -> None:
    corpus = oracle_corpus()
    mailbox.append(corpus.values())
    names = list(corpus)

    ours = transcript(oracle_bridge.port, mailbox, len(corpus))
    theirs = transcript(mailbox.pop3_port, mailbox, len(corpus))

    assert len(ours) == len(theirs)
    mismatches = []
    for (command, our_status, our_rest), (_, their_status, their_rest) in zip(ours, theirs, strict=True):
        assert our_status.startswith(b"+OK"), (command, our_status)
        if comparable(command, our_status, our_rest) != comparable(command, their_status, their_rest):
            words = command.split()
            name = names[int(words[1]) - 1] if len(words) > 1 else "-"
            mismatches.append(
                f"{command.decode()} ({name}): bridge {our_status!r} {len(our_rest)} octets "
                f"{our_rest[:60]!r}..., Dovecot {their_status!r} {len(their_rest)} octets "
                f"{their_rest[:60]!r}..."
            )
    assert not mismatches, "\n".join(mismatches)


def test_retr_is_the_imap_message_and_list_its_size(oracle_bridge: ThreadedBridge, mailbox: Mailbox) -> None:
    corpus = oracle_corpus()
    uids = mailbox.append(corpus.values()).uids
    observer = mailbox.observer()
    with RawPop3("127.0.0.1", oracle_bridge.port) as pop:
        pop.login(mailbox.user, mailbox.password)
        for n, (name, uid) in enumerate(zip(corpus, uids, strict=True), 1):
            stored = observer.fetch(uid)  # BODY.PEEK[]: the message as IMAP stores it
            assert pop.command(b"LIST %d" % n) == b"+OK %d %d\r\n" % (n, len(stored)), name
            status, body = pop.command_multiline(b"RETR %d" % n)
            assert status == b"+OK %d octets\r\n" % len(stored), name
            assert pop3_unstuff(body) == retr_payload(stored), name


@pytest.mark.parametrize("engine", ENGINES)
def test_small_fetch_chunks_change_nothing(
    bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox, engine: str
) -> None:
    """Chunk boundaries split lines, CRLFs, dots and the header's end; the output of a
    4 KiB-chunk bridge is identical, status lines included, to a 1 MiB-chunk bridge's."""
    corpus = oracle_corpus()
    mailbox.append(corpus.values())
    default = bridge_factory(upstream={"engine": engine})
    small = bridge_factory(upstream={"engine": engine, "fetch_chunk": SMALL_CHUNK})
    default_transcript = transcript(default.port, mailbox, len(corpus))
    small_transcript = transcript(small.port, mailbox, len(corpus))
    assert len(small_transcript) == len(default_transcript)
    for expected, got in zip(default_transcript, small_transcript, strict=True):
        assert got == expected, expected[0]
