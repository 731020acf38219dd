"""Putting mail into (and looking at) a real IMAP mailbox, for tests and demos.

:func:`append_messages` is the fast path: it pipelines APPEND commands with
non-synchronising literals (LITERAL+, RFC 7888), so thousands of messages cost one
connection and no round trip per message. :class:`ImapObserver` is a deliberately
plain :mod:`imaplib` client that tests use as "another IMAP user" of the mailbox.

The corpus generators produce CRLF-terminated messages only: Dovecot (like any
IMAP server) hands messages back with CRLF line endings, so only CRLF input can be
compared byte for byte with what POP3 serves.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import re
import selectors
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from types import TracebackType

__all__ = [
    "AppendResult",
    "ImapObserver",
    "MessageInfo",
    "SeedingError",
    "append_messages",
    "big_message",
    "demo_messages",
    "numbered_messages",
    "tricky_messages",
]

CRLF = b"\r\n"

# How much APPEND data is queued for the socket at a time; bounds memory when the
# caller passes a lazy iterator, and is large enough that the kernel never idles.
_QUEUE_BYTES = 4 * 1024 * 1024
_TAGGED_RE = re.compile(rb"^(A\d+) (OK|NO|BAD)\b ?(.*)$")
_APPENDUID_RE = re.compile(rb"\[APPENDUID (\d+) ([\d:,]+)\]")


class SeedingError(RuntimeError):
    """The IMAP server refused a login or one or more APPENDs."""


@dataclass(frozen=True)
class AppendResult:
    """Outcome of :func:`append_messages`: UIDs in the order the messages were given."""

    uidvalidity: int
    uids: list[int]


@dataclass(frozen=True)
class MessageInfo:
    uid: int
    size: int
    flags: frozenset[str]


# ---------------------------------------------------------------------------
# Fast seeding over a raw socket
# ---------------------------------------------------------------------------


def _quote(value: str) -> bytes:
    # Mailbox names here are plain ASCII; anything else would need modified UTF-7.
    if not value.isascii() or any(c in value for c in "\r\n\0"):
        raise ValueError(f"unsupported mailbox name {value!r}")
    return b'"' + value.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'


def _literal(data: bytes) -> bytes:
    return b"{%d+}\r\n" % len(data) + data


class _ImapPipe:
    """Just enough of an IMAP client to log in and stream pipelined commands."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self._timeout = timeout
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._inbuf = bytearray()
        greeting = self._read_line()
        if not greeting.startswith(b"* OK"):
            self.close()
            raise SeedingError(f"unexpected IMAP greeting: {greeting!r}")
        self.greeting = greeting

    def close(self) -> None:
        self._sock.close()

    def _read_line(self) -> bytes:
        while (end := self._inbuf.find(CRLF)) < 0:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise SeedingError("IMAP server closed the connection")
            self._inbuf += chunk
        line = bytes(self._inbuf[:end])
        del self._inbuf[: end + 2]
        return line

    def simple(self, tag: bytes, command: bytes) -> bytes:
        """Send one command, return its tagged completion line (must be OK)."""
        self._sock.sendall(tag + b" " + command + CRLF)
        while True:
            line = self._read_line()
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise SeedingError(f"{command.split(b' ')[0].decode()} failed: {line!r}")
                return line

    def pipeline(self, commands: Iterator[tuple[bytes, Sequence[bytes]]]) -> dict[bytes, bytes]:
        """Stream ``(tag, chunks)`` commands while collecting tagged replies.

        Writing everything before reading would deadlock once the server's replies
        fill both socket buffers, so reads and writes are interleaved.
        """
        sock = self._sock
        sock.setblocking(False)
        outq: deque[memoryview] = deque()
        queued = 0
        exhausted = False
        sent_tags: list[bytes] = []
        replies: dict[bytes, bytes] = {}
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        try:
            last_progress = time.monotonic()
            while True:
                while not exhausted and queued < _QUEUE_BYTES:
                    try:
                        tag, chunks = next(commands)
                    except StopIteration:
                        exhausted = True
                        break
                    sent_tags.append(tag)
                    for chunk in chunks:
                        if chunk:
                            outq.append(memoryview(chunk))
                            queued += len(chunk)
                if exhausted and not outq and len(replies) == len(sent_tags):
                    return replies
                sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if outq else 0))
                events = sel.select(timeout=1.0)
                if not events and time.monotonic() - last_progress > self._timeout:
                    raise SeedingError(
                        f"no progress for {self._timeout} s "
                        f"({len(replies)}/{len(sent_tags)} replies)"
                    )
                for _key, mask in events:
                    if mask & selectors.EVENT_WRITE and outq:
                        try:
                            n = sock.send(outq[0])
                        except BlockingIOError:
                            n = 0
                        if n:
                            last_progress = time.monotonic()
                            queued -= n
                            if n == len(outq[0]):
                                outq.popleft()
                            else:
                                outq[0] = outq[0][n:]
                    if mask & selectors.EVENT_READ:
                        try:
                            chunk = sock.recv(262144)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            raise SeedingError(
                                "IMAP server closed the connection after "
                                f"{len(replies)}/{len(sent_tags)} replies; last data: "
                                f"{bytes(self._inbuf[-300:])!r}"
                            )
                        last_progress = time.monotonic()
                        self._inbuf += chunk
                        self._collect(replies)
        finally:
            sel.close()
            sock.setblocking(True)
            sock.settimeout(self._timeout)

    def _collect(self, replies: dict[bytes, bytes]) -> None:
        buf = self._inbuf
        start = 0
        while (end := buf.find(CRLF, start)) >= 0:
            line = bytes(buf[start:end])
            start = end + 2
            if line.startswith(b"* BYE"):
                raise SeedingError(f"IMAP server said goodbye: {line!r}")
            if m := _TAGGED_RE.match(line):
                replies[m.group(1)] = line
        del buf[:start]


def _expand_uid_set(text: bytes) -> list[int]:
    out: list[int] = []
    for part in text.split(b","):
        lo, _, hi = part.partition(b":")
        first, last = int(lo), int(hi or lo)
        out.extend(range(min(first, last), max(first, last) + 1))
    return out


def append_messages(
    host: str,
    port: int,
    user: str,
    password: str,
    messages: Iterable[bytes],
    *,
    mailbox: str = "INBOX",
    flags: Sequence[str] = (),
    batch_messages: int = 500,
    batch_bytes: int = 32 * 1024 * 1024,
    timeout: float = 60.0,
) -> AppendResult:
    """APPEND every message to ``mailbox`` over one pipelined IMAP connection.

    Messages are grouped into MULTIAPPEND (RFC 3502) commands of at most
    ``batch_messages`` messages / ``batch_bytes`` bytes, sent back to back with
    non-synchronising literals. ``messages`` may be a lazy iterable.

    Returns the UIDs the server assigned (UIDPLUS APPENDUID), in input order.
    Raises :class:`SeedingError` if any APPEND is not OK (a failed MULTIAPPEND
    stores none of its messages), and ``ValueError`` for a message IMAP cannot
    carry (empty, or containing NUL).
    """
    flag_part = b"(" + " ".join(flags).encode("ascii") + b") " if flags else b""
    mailbox_arg = _quote(mailbox)

    pipe = _ImapPipe(host, port, timeout)
    try:
        login = pipe.simple(
            b"L", b"LOGIN " + _literal(user.encode()) + b" " + _literal(password.encode())
        )
        caps = login + b" " + pipe.greeting
        if b"LITERAL+" not in caps:
            # Dovecot always has it; without it every message would need a round trip.
            raise SeedingError("server does not advertise LITERAL+")
        if b"MULTIAPPEND" not in caps:
            batch_messages = 1
        # Each APPEND command is one transaction, and Dovecot's maildir pays for a
        # directory scan per transaction: one message per command made seeding
        # 20,000 messages quadratic (minutes instead of seconds).
        batches: list[tuple[int, int]] = []  # (first message index, count)

        def commands() -> Iterator[tuple[bytes, Sequence[bytes]]]:
            chunks: list[bytes] = []
            first = size = 0
            for i, data in enumerate(messages):
                if not data:
                    raise ValueError(f"message #{i} is empty; IMAP cannot store it")
                if b"\0" in data:
                    raise ValueError(f"message #{i} contains NUL, which IMAP literals forbid")
                if chunks and (i - first >= batch_messages or size + len(data) > batch_bytes):
                    yield _finish(chunks, first, i)
                    chunks, first, size = [], i, 0
                if not chunks:
                    chunks.append(b"A%d APPEND %s" % (len(batches), mailbox_arg))
                # Messages are queued as-is, not concatenated, to avoid copying them.
                chunks += [b" " + flag_part + b"{%d+}\r\n" % len(data), data]
                size += len(data)
            if chunks:
                yield _finish(chunks, first, first + (len(chunks) - 1) // 2)

        def _finish(chunks: list[bytes], first: int, end: int) -> tuple[bytes, Sequence[bytes]]:
            tag = b"A%d" % len(batches)
            batches.append((first, end - first))
            chunks.append(CRLF)
            return tag, chunks

        replies = pipe.pipeline(commands())
        with contextlib.suppress(OSError, SeedingError):
            pipe.simple(b"Z", b"LOGOUT")
    finally:
        pipe.close()

    uidvalidity = 0
    uids: list[int] = []
    failures: list[str] = []
    for n, (first, count) in enumerate(batches):
        line = replies[b"A%d" % n]
        m = _APPENDUID_RE.search(line)
        got = _expand_uid_set(m.group(2)) if m else []
        if not line.startswith(b"A%d OK" % n) or len(got) != count:
            failures.append(
                f"messages #{first}..#{first + count - 1}: {line.decode(errors='replace')}"
            )
            continue
        uidvalidity = int(m.group(1)) if m else 0
        uids += got
    if failures:
        shown = "\n".join(failures[:5])
        raise SeedingError(f"{len(failures)} of {len(batches)} APPEND commands failed:\n{shown}")
    return AppendResult(uidvalidity=uidvalidity, uids=uids)


# ---------------------------------------------------------------------------
# Observer: a second, ordinary IMAP client on the same mailbox
# ---------------------------------------------------------------------------


def _uid_set(uids: Iterable[int]) -> str:
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("empty UID set")
    ranges: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid != prev + 1:
            ranges.append(f"{start}:{prev}" if start != prev else str(start))
            start = uid
        prev = uid
    ranges.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(ranges)


_FETCH_UID_RE = re.compile(rb"\bUID (\d+)")
_FETCH_SIZE_RE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_FETCH_FLAGS_RE = re.compile(rb"\bFLAGS \(([^)]*)\)")


def _flag_set(raw: bytes) -> frozenset[str]:
    return frozenset(raw.decode().split()) - {"\\Recent"}


class ImapObserver:
    """An :mod:`imaplib` session on one mailbox, selected read-write.

    Reads use BODY.PEEK so observing never sets \\Seen. Flags are reported
    without \\Recent: it belongs to whichever session saw the message first
    (often this one), not to the message.
    """

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str,
        mailbox: str = "INBOX",
        *,
        timeout: float = 60.0,
    ) -> None:
        self.mailbox = mailbox
        self.imap = imaplib.IMAP4(host, port, timeout=timeout)
        try:
            self._ok(self.imap.login(user, password), "LOGIN")
            self._ok(self.imap.select(_quote(mailbox).decode()), "SELECT")
        except BaseException:
            with contextlib.suppress(Exception):
                self.imap.shutdown()
            raise

    def __enter__(self) -> ImapObserver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.imap.logout()

    @staticmethod
    def _ok(response: tuple[str, list], what: str) -> list:
        typ, data = response
        if typ != "OK":
            raise imaplib.IMAP4.error(f"{what} failed: {typ} {data!r}")
        return data

    def _status(self, item: str) -> int:
        data = self._ok(self.imap.status(_quote(self.mailbox).decode(), f"({item})"), "STATUS")
        m = re.search(rb"\b" + item.encode() + rb" (\d+)", data[0])
        if m is None:
            raise imaplib.IMAP4.error(f"no {item} in STATUS reply {data!r}")
        return int(m.group(1))

    def uidvalidity(self) -> int:
        return self._status("UIDVALIDITY")

    def uidnext(self) -> int:
        return self._status("UIDNEXT")

    def noop(self) -> None:
        """Let the session see changes made by other sessions."""
        self._ok(self.imap.noop(), "NOOP")

    def messages(self) -> list[MessageInfo]:
        """UID, RFC822.SIZE and flags of every message, in UID order."""
        data = self._ok(self.imap.uid("FETCH", "1:*", "(UID RFC822.SIZE FLAGS)"), "FETCH")
        infos = {}
        for item in data:
            if not isinstance(item, bytes):
                continue
            uid = _FETCH_UID_RE.search(item)
            size = _FETCH_SIZE_RE.search(item)
            flags = _FETCH_FLAGS_RE.search(item)
            # Unsolicited FETCH replies (flag changes by other sessions) may lack
            # the size; the solicited one for the same UID is complete.
            if uid and size and flags:
                infos[int(uid.group(1))] = MessageInfo(
                    uid=int(uid.group(1)),
                    size=int(size.group(1)),
                    flags=_flag_set(flags.group(1)),
                )
        return [infos[uid] for uid in sorted(infos)]

    def uids(self) -> list[int]:
        data = self._ok(self.imap.uid("SEARCH", "ALL"), "SEARCH")
        return sorted(int(x) for x in b" ".join(d for d in data if d).split())

    def fetch(self, uid: int) -> bytes:
        """The message exactly as the server stores it (BODY.PEEK[])."""
        data = self._ok(self.imap.uid("FETCH", str(uid), "(BODY.PEEK[])"), "FETCH")
        for item in data:
            if isinstance(item, tuple) and b"BODY[]" in item[0]:
                return item[1]
        raise KeyError(f"UID {uid} not in mailbox {self.mailbox!r}")

    def flags(self, uid: int) -> frozenset[str]:
        data = self._ok(self.imap.uid("FETCH", str(uid), "(FLAGS)"), "FETCH")
        for item in data:
            if isinstance(item, bytes) and (m := _FETCH_FLAGS_RE.search(item)):
                return _flag_set(m.group(1))
        raise KeyError(f"UID {uid} not in mailbox {self.mailbox!r}")

    def store_flags(self, uids: Iterable[int], flags: Iterable[str], mode: str = "+") -> None:
        """Add (``"+"``), remove (``"-"``) or replace (``""``) flags on ``uids``."""
        if mode not in ("+", "-", ""):
            raise ValueError("mode must be '+', '-' or ''")
        flag_list = "(" + " ".join(flags) + ")"
        self._ok(self.imap.uid("STORE", _uid_set(uids), f"{mode}FLAGS.SILENT", flag_list), "STORE")

    def expunge(self, uids: Iterable[int]) -> None:
        """Delete exactly ``uids`` (UID EXPUNGE leaves other \\Deleted mail alone)."""
        uid_set = _uid_set(uids)
        self._ok(self.imap.uid("STORE", uid_set, "+FLAGS.SILENT", "(\\Deleted)"), "STORE")
        self._ok(self.imap.uid("EXPUNGE", uid_set), "UID EXPUNGE")


# ---------------------------------------------------------------------------
# Corpus generators
# ---------------------------------------------------------------------------

_DEMO_DATE = datetime(2024, 5, 6, 9, 30, tzinfo=UTC)


def _email_bytes(msg: EmailMessage) -> bytes:
    # The SMTP policy writes CRLF line endings and RFC 2047-encodes non-ASCII
    # headers, which every mail client in a demo understands.
    return msg.as_bytes(policy=SMTP)


def demo_messages() -> list[bytes]:
    """A handful of friendly messages for the README demo (deterministic)."""
    specs = [
        (
            "Alice Example <alice@example.org>",
            "Welcome to your POP3 bridge",
            "Hi!\n\nThis message lives in an IMAP mailbox, and you are reading it over POP3.\n\n"
            "-- Alice\n",
        ),
        (
            "Bob Builder <bob@example.org>",
            "Meeting notes",
            "Agenda:\n  1. Coffee\n  2. Bridges\n.\nThe line above is a lone dot; POP3 has to\n"
            "escape it, and your client should show it unchanged.\n",
        ),
        (
            "Zoë Müller <zoe@example.org>",
            "Grüße aus Köln ☕",
            "Unicode works too: naïve café, 東京, emoji 🎉.\n",
        ),
        (
            "Newsletter <news@example.org>",
            "Weekly digest",
            "".join(f"Item {i}: something happened this week.\n" for i in range(1, 21)),
        ),
    ]
    out = []
    for i, (sender, subject, body) in enumerate(specs):
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = "you@example.org"
        msg["Subject"] = subject
        msg["Date"] = format_datetime(_DEMO_DATE + timedelta(hours=i))
        msg["Message-ID"] = f"<demo-{i + 1}@sandbox.example.org>"
        msg.set_content(body)
        out.append(_email_bytes(msg))

    msg = EmailMessage()
    msg["From"] = "Carol Camera <carol@example.org>"
    msg["To"] = "you@example.org"
    msg["Subject"] = "Holiday photo"
    msg["Date"] = format_datetime(_DEMO_DATE + timedelta(hours=len(specs)))
    msg["Message-ID"] = f"<demo-{len(specs) + 1}@sandbox.example.org>"
    msg.set_content("A tiny picture is attached.\n")
    msg.add_attachment(_tiny_png(), maintype="image", subtype="png", filename="photo.png")
    out.append(_email_bytes(msg))
    return out


def _tiny_png() -> bytes:
    # A valid 1x1 PNG, so mail clients in the demo render a real attachment.
    return base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )


def _raw(
    headers: Sequence[str], body_lines: Sequence[bytes] | None, *, final_crlf: bool = True
) -> bytes:
    """Assemble a message by hand, for shapes the email package would normalise away."""
    head = b"".join(h.encode("utf-8") + CRLF for h in headers)
    if body_lines is None:
        return head
    body = CRLF.join(body_lines)
    return head + CRLF + body + (CRLF if final_crlf else b"")


def _hdrs(name: str, *extra: str) -> list[str]:
    return [
        "From: Tricky Sender <tricky@example.org>",
        "To: you@example.org",
        f"Subject: tricky: {name}",
        "Date: Mon, 06 May 2024 09:30:00 +0000",
        f"Message-ID: <tricky-{name}@sandbox.example.org>",
        *extra,
    ]


def tricky_messages() -> dict[str, bytes]:
    """Named messages that exercise the hard cases of serving mail over POP3.

    Deterministic, CRLF line endings throughout (except where a missing final CRLF
    is the point), no NUL and no bare CR or LF, so every one round-trips through
    IMAP byte for byte.
    """
    m: dict[str, bytes] = {}
    m["dot_lines"] = _raw(
        _hdrs("dot_lines"),
        [b"Lines that begin with a dot:", b".hidden", b". dot space", b".\ttab", b"end"],
    )
    m["lone_dot_line"] = _raw(
        _hdrs("lone_dot_line"),
        [b"The next line is only a dot, the POP3 terminator:", b".", b"and the mail goes on."],
    )
    m["double_dot_lines"] = _raw(
        _hdrs("double_dot_lines"), [b"..", b"...", b"..x", b". .", b"....."]
    )
    m["ends_with_dot_line"] = _raw(_hdrs("ends_with_dot_line"), [b"last line is a dot:", b"."])
    m["no_final_crlf"] = _raw(
        _hdrs("no_final_crlf"), [b"first line", b"last line has no CRLF"], final_crlf=False
    )
    m["no_final_crlf_dot"] = _raw(
        _hdrs("no_final_crlf_dot"), [b"ends in a dot without CRLF:", b"."], final_crlf=False
    )
    m["single_line_no_crlf"] = b"Subject: tricky: a one-line message without any CRLF"
    m["header_only_no_blank_line"] = _raw(_hdrs("header_only_no_blank_line"), None)
    m["header_only_blank_line"] = _raw(_hdrs("header_only_blank_line"), [b""], final_crlf=False)
    m["trailing_blank_lines"] = _raw(
        _hdrs("trailing_blank_lines"), [b"followed by empty lines", b"", b"", b""]
    )
    m["utf8_8bit"] = _raw(
        [
            "From: Zoë Ünïcode <zoe@example.org>",
            "To: 東京 <tokyo@example.org>",
            "Subject: tricky: 8-bit UTF-8 headers — ça marche? 🎉",
            "Date: Mon, 06 May 2024 09:30:00 +0000",
            "Message-ID: <tricky-utf8_8bit@sandbox.example.org>",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ],
        [
            "Grüße, naïve café, Ελληνικά, русский, 中文, 🙂".encode(),
            ".ünïcode after a dot".encode(),
        ],
    )
    m["latin1_8bit"] = _raw(
        _hdrs("latin1_8bit", "Content-Type: text/plain; charset=iso-8859-1"),
        ["Gr\u00fc\u00dfe aus K\u00f6ln, invalid as UTF-8".encode("latin-1"), b"\xe9\xe8\xff"],
    )
    # Every byte value IMAP allows in a literal: all but NUL, CR and LF (which may
    # only appear together as a line ending).
    allowed = bytes(b for b in range(1, 256) if b not in (0x0A, 0x0D))
    m["binary_bytes"] = _raw(
        _hdrs("binary_bytes", "Content-Type: application/octet-stream"),
        [allowed[i : i + 61] for i in range(0, len(allowed), 61)] + [b"." + allowed[:40]],
    )
    m["control_chars"] = _raw(
        _hdrs("control_chars"),
        [b"tab\there", b"form\x0cfeed", b"esc\x1b[0m", b"del\x7f", b"bell\x07", b"  spaces  "],
    )
    m["long_line_20000"] = _raw(_hdrs("long_line_20000"), [b"x" * 20000, b"short line after"])
    m["long_dot_line_20000"] = _raw(
        _hdrs("long_dot_line_20000"), [b"." + b"y" * 19999, b".", b"." * 20000]
    )
    m["folded_header"] = _raw(
        [
            *_hdrs("folded_header"),
            "X-Long: " + " ".join(f"word{i}" for i in range(20)),
            " " + " ".join(f"cont{i}" for i in range(20)),
            "\t.tab-folded continuation starting with a dot",
        ],
        [b"body"],
    )
    m["many_dot_lines"] = _raw(
        _hdrs("many_dot_lines"),
        [(b".", b"..", b"x", b"", b".x")[i % 5] for i in range(10000)],
    )
    m["mime_multipart_base64"] = _multipart_message()
    return m


def _multipart_message() -> bytes:
    msg = EmailMessage()
    for header in _hdrs("mime_multipart_base64"):
        name, _, value = header.partition(": ")
        msg[name] = value
    msg.set_content("See the attachment.\n.\nA lone dot in a MIME part, too.\n")
    # Deterministic pseudo-random bytes, so failures reproduce.
    blob = bytes((i * 7919 + (i >> 8) * 31) % 256 for i in range(30000))
    msg.add_attachment(blob, maintype="application", subtype="octet-stream", filename="data.bin")
    msg.add_attachment(
        "Ünïcode text attachment\n".encode(),
        maintype="text",
        subtype="plain",
        filename="notes.txt",
    )
    return _email_bytes(msg)


def numbered_messages(count: int, *, start: int = 1, body_lines: int = 10) -> Iterator[bytes]:
    """``count`` small distinct messages (lazily), numbered from ``start``.

    Each body includes a line that is only a dot, so bulk transfers exercise
    POP3 byte-stuffing too.
    """
    filler = b"The quick brown fox jumps over the lazy dog, again and again."
    for n in range(start, start + count):
        head = (
            b"From: Sender <sender@example.org>\r\n"
            b"To: you@example.org\r\n"
            b"Subject: message %d\r\n"
            b"Message-ID: <msg-%d@sandbox.example.org>\r\n"
            b"\r\n" % (n, n)
        )
        body = b"".join(b"%d/%d %s\r\n" % (n, i, filler) for i in range(body_lines))
        yield head + body + b".\r\nend of message %d\r\n" % n


def big_message(size_bytes: int, *, dot_every: int = 100, tag: str = "big") -> bytes:
    """A message of exactly ``size_bytes`` bytes with 78-byte CRLF lines.

    Each line carries its number, so truncation or reordering shows up in a diff;
    every ``dot_every``-th line starts with a dot, so byte-stuffing is exercised
    throughout (0 disables).
    """
    head = (
        "From: Big Sender <big@example.org>\r\n"
        "To: you@example.org\r\n"
        f"Subject: {tag}: {size_bytes} bytes\r\n"
        f"Message-ID: <{tag}-{size_bytes}@sandbox.example.org>\r\n"
        "\r\n"
    ).encode()
    body_size = size_bytes - len(head)
    if body_size < 0 or body_size == 1:
        raise ValueError(f"size_bytes must be {len(head)} or at least {len(head) + 2}")
    line_len = 78
    full, rest = divmod(body_size, line_len)
    # A 1-byte remainder cannot be a line of its own (a line needs CRLF), so the
    # last full line absorbs it.
    long_last = rest == 1
    if long_last:
        full -= 1
        rest = 0

    pad = b"-" * line_len
    lines = []
    for i in range(full):
        lead = b"." if dot_every and i % dot_every == dot_every - 1 else b"L"
        num = b"%s%09d " % (lead, i)
        lines.append(num + pad[: line_len - 2 - len(num)] + CRLF)
    if long_last:
        lines.append(b"L%09d " % full + pad[: line_len + 1 - 2 - 11] + CRLF)
    if rest:
        lines.append(pad[: rest - 2] + CRLF)
    data = head + b"".join(lines)
    assert len(data) == size_bytes
    return data
