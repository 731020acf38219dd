"""The message cache's bookkeeping (bridge.session.message_cache): keys, bounds, writers, and
files that stay open while they are being sent. Serving from it over real POP3 sessions is
tested in tests/integration/test_message_cache.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.config import CacheSettings
from bridge.session.message_cache import MessageCache

MIB = 1 << 20


def cache(tmp_path: Path, **settings: int) -> MessageCache:
    defaults = {"max_bytes": 10 * MIB, "min_message_bytes": 65536, "max_messages": 8}
    return MessageCache(CacheSettings(directory=str(tmp_path), **{**defaults, **settings}))


def keep(messages: MessageCache, key: bytes, wire: bytes, size: int | None = None) -> None:
    writer = messages.writer(key, len(wire) if size is None else size)
    assert writer is not None
    for start in range(0, len(wire), 1000):
        writer.write(wire[start : start + 1000])
    writer.commit()


def content(messages: MessageCache, key: bytes, size: int) -> bytes | None:
    found = messages.get(key, size)
    if found is None:
        return None
    with found:
        return os.pread(found.fd, found.length, 0)


def test_a_kept_message_comes_back_whole_and_leaves_no_name_behind(tmp_path: Path) -> None:
    messages = cache(tmp_path)
    key = messages.key("imap:143", "alice@example.org", "INBOX", 7, 42)
    wire = os.urandom(300_000) + b"\r\n.\r\n"
    keep(messages, key, wire)
    assert content(messages, key, len(wire)) == wire
    assert list(tmp_path.iterdir()) == []
    messages.close()


def test_keys_keep_accounts_folders_and_validities_apart(tmp_path: Path) -> None:
    messages = cache(tmp_path)
    where = ("imap:143", "alice@example.org", "INBOX", 7, 42)
    keep(messages, messages.key(*where), b"a" * 100_000)
    for other in (
        ("imap2:143", "alice@example.org", "INBOX", 7, 42),
        ("imap:143", "bob@example.org", "INBOX", 7, 42),
        ("imap:143", "alice@example.org", "Archive", 7, 42),
        ("imap:143", "alice@example.org", "INBOX", 8, 42),
        ("imap:143", "alice@example.org", "INBOX", 7, 43),
    ):
        assert content(messages, messages.key(*other), 100_000) is None, other
    # Listed in another size than when it was kept: not the same message after all.
    assert content(messages, messages.key(*where), 100_001) is None
    # A new process makes new keys: nothing carries over by accident.
    assert MessageCache(messages.settings).key(*where) != messages.key(*where)


def test_the_least_recently_used_go_first(tmp_path: Path) -> None:
    messages = cache(tmp_path, max_bytes=300_000, max_messages=8)
    keys = [messages.key("u", "a", "INBOX", 1, uid) for uid in range(4)]
    for key in keys[:3]:
        keep(messages, key, b"x" * 100_000)
    assert content(messages, keys[0], 100_000) is not None  # used: now the most recent
    keep(messages, keys[3], b"y" * 100_000)
    assert [content(messages, key, 100_000) is not None for key in keys] == [True, False, True, True]
    few = cache(tmp_path, max_messages=2)
    for key in keys:
        keep(few, key, b"z" * 70_000)
    assert [content(few, key, 70_000) is not None for key in keys] == [False, False, True, True]


def test_an_entry_dropped_while_being_sent_stays_readable_until_done(tmp_path: Path) -> None:
    messages = cache(tmp_path, max_messages=1)
    first, second = messages.key("u", "a", "INBOX", 1, 1), messages.key("u", "a", "INBOX", 1, 2)
    keep(messages, first, b"1" * 100_000)
    found = messages.get(first, 100_000)
    assert found is not None
    with found:
        keep(messages, second, b"2" * 100_000)  # drops the first
        assert os.pread(found.fd, 10, 0) == b"1" * 10
    with pytest.raises(OSError):
        os.pread(found.fd, 10, 0)


def test_only_a_committed_write_is_kept_and_one_writer_at_a_time(tmp_path: Path) -> None:
    messages = cache(tmp_path, max_bytes=200_000)
    key = messages.key("u", "a", "INBOX", 1, 1)
    writer = messages.writer(key, 150_000)
    assert writer is not None
    assert messages.writer(key, 150_000) is None  # another session fetches on its own
    writer.write(b"a" * 50_000)
    writer.abort()  # the client went away half-way
    assert content(messages, key, 150_000) is None
    too_big = messages.writer(key, 150_000)
    assert too_big is not None
    too_big.write(b"b" * 250_000)  # beyond max_bytes: dropped, never kept
    too_big.commit()
    assert content(messages, key, 150_000) is None
    assert messages.writer(key, 150_000) is not None


def test_what_is_worth_keeping(tmp_path: Path) -> None:
    messages = cache(tmp_path, min_message_bytes=100_000, max_bytes=1_000_000)
    assert [messages.worth_keeping(size) for size in (99_999, 100_000, 1_000_000, 1_000_001)] == [
        False, True, True, False,
    ]
    assert not cache(tmp_path, max_bytes=0).worth_keeping(100_000)


def test_spools_fit_in_max_bytes_with_the_kept_messages_making_room(tmp_path: Path) -> None:
    messages = cache(tmp_path, max_bytes=10 * MIB)
    keep(messages, b"old", b"o" * (4 * MIB))
    first = messages.writer(b"first", 4 * MIB)
    second = messages.writer(b"second", 4 * MIB)
    third = messages.writer(b"third", 4 * MIB)
    assert first is not None and second is not None and third is not None
    assert first.start_spool()
    assert content(messages, b"old", 4 * MIB) is not None
    # 4 + 4 reserved and 4 kept would pass 10: the kept one goes.
    assert second.start_spool()
    assert content(messages, b"old", 4 * MIB) is None
    # Spools are never dropped to make room for another.
    assert not third.start_spool()
    first.write(b"f" * 1000)
    first.commit()
    # Kept now, no longer reserved: room for the third.
    assert third.start_spool()
    assert content(messages, b"first", 4 * MIB) == b"f" * 1000
    second.abort()
    third.abort()
    messages.close()


def test_only_a_few_spools_read_from_the_upstream_at_once(tmp_path: Path) -> None:
    messages = cache(tmp_path, max_bytes=100 * MIB, max_messages=64)
    writers = [messages.writer(b"%d" % n, MIB) for n in range(20)]
    started = [w for w in writers if w is not None and w.start_spool()]
    assert 1 <= len(started) < 20
    assert not started[0].start_spool()  # once per writer
    started[0].fetched()
    late = writers[len(started)]
    assert late is not None and late.start_spool()
    for writer in writers:
        assert writer is not None
        writer.abort()
    messages.close()


def test_a_write_the_file_cannot_take_says_how_much_it_took(tmp_path: Path) -> None:
    messages = cache(tmp_path, max_bytes=100_000)
    writer = messages.writer(b"key", 90_000)
    assert writer is not None
    assert writer.write(b"x" * 60_000) == 60_000
    # Past max_bytes the entry is given up: the file still holds what it took, nothing more.
    assert writer.write(b"y" * 60_000) == 60_000
    assert writer.write(b"z" * 10) == 0
    assert writer.length == 120_000
    assert os.pread(writer.fd, 10, 119_990) == b"y" * 10
    assert not writer.start_spool()
    writer.commit()
    assert content(messages, b"key", 90_000) is None
    messages.close()
