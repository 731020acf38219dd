"""Big messages kept after their first RETR, in the form that went out on the wire.

Fetching a 30 MB attachment from the IMAP server again is the expensive part of a RETR, and it
happens often: a phone on a weak network retries a download that broke off, several devices of
one account each fetch the same message, a client RETRs again after a failed save. The first
complete RETR of a message of at least `cache.min_message_bytes` keeps what the core's encoder
produced (dot-stuffed body and terminator) in an unnamed temporary file; the next RETR of it
sends the status line and then that file with `sendfile`, straight from the page cache.

- Keyed by the upstream, the account (its account_key), the folder, UIDVALIDITY and UID
  (IMAP never changes a message under the same UIDVALIDITY and UID), through an HMAC with a
  key made at start-up, so a message is served only to sessions of its own account and
  nothing guessable names an entry.
- The files have no name (`tempfile.TemporaryFile`: unlinked at once): nothing to find in the
  directory, nothing left behind when the process ends, however it ends.
- Bounded: `cache.max_bytes` and `cache.max_messages`, the least recently used dropped
  first; an entry being sent when it is dropped is closed when its last reader is done.
- A RETR that does not finish (client gone, upstream failure) keeps nothing.
- A slow client's first RETR spools: once a piece took a while to go out (the session layer
  decides: `bridge.session.retrieval`), the rest of the message is read from the upstream as
  fast as it comes into the file being written, and sent from there with `sendfile`
  (`CacheWriter.start_spool`). The session then needs no IMAP
  connection and no wake-up per piece while its client reads; at most
  `_SPOOL_FETCHES` spools read from the upstream at once, and the spools being sent count
  against `cache.max_bytes` with the kept messages (kept ones make room).

Like the read-ahead, a message served from here was in the session's maildrop at login; one
another client expunged since is still delivered, as RFC 1939's fixed maildrop has it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from collections import OrderedDict
from typing import IO

from bridge.config import CacheSettings
from bridge.ops import metrics
from bridge.ops.logs import get_logger

_log = get_logger()
# Spools reading from the upstream at once, per worker: each holds a piece (and its
# stuffed copy) while it reads, and one worker's CPU is all they share anyway.
_SPOOL_FETCHES = 8


class CachedMessage:
    """One kept message: `length` bytes of wire form in `fd`, of a message listed as `size`."""

    def __init__(self, file: IO[bytes], length: int, size: int) -> None:
        self._file = file
        self.fd = file.fileno()
        self.length = length
        self.size = size
        self._readers = 0
        self._dropped = False

    def __enter__(self) -> CachedMessage:
        self._readers += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._readers -= 1
        if self._dropped and not self._readers:
            self._file.close()

    def drop(self) -> None:
        self._dropped = True
        if not self._readers:
            self._file.close()


class CacheWriter:
    """The wire form of one message as it goes out; kept only if `commit()` is reached."""

    def __init__(self, cache: MessageCache, key: bytes, file: IO[bytes], size: int) -> None:
        self._cache = cache
        self._key = key
        self._file = file
        self.fd = file.fileno()
        self._size = size
        # Bytes in the file: every write goes straight to the descriptor, so this is exact
        # even after a failed one (a spool's client is sent exactly what the file holds).
        self.length = 0
        self._failed = False
        self._done = False
        self._reserved = 0
        self._fetching = False

    def write(self, data: bytes) -> int:
        """How much of `data` the file took (all of it unless writing failed)."""
        if self._failed or not data:
            return 0
        view = memoryview(data)
        written = 0
        try:
            while written < len(view):
                # The page cache takes it at memory speed; a full disk only costs the entry.
                written += os.write(self.fd, view[written:])
        except OSError as exc:
            self._failed = True
            _log.warning("message_cache_write_failed", error=exc.strerror)
        self.length += written
        if self.length > self._cache.limit:
            self._failed = True
        return written

    def start_spool(self) -> bool:
        """Whether the rest of the message may be read into this file at the upstream's
        pace, to be sent from it (a slow client): a fetch slot and room in the budget."""
        if self._failed or self._done or self._reserved or not self._cache.reserve_spool(self._size):
            return False
        self._reserved = self._size
        self._fetching = True
        return True

    def fetched(self) -> None:
        """The spool has read what it will from the upstream: its fetch slot is free."""
        if self._fetching:
            self._fetching = False
            self._cache.end_spool_fetch()

    def commit(self) -> None:
        """The message went out whole: keep it (unless writing it failed)."""
        if self._done:
            return
        self._release()
        if self._failed:
            self.abort()
            return
        self._done = True
        self._cache.keep(self._key, CachedMessage(self._file, self.length, self._size))

    def abort(self) -> None:
        """Keep nothing (a no-op after commit)."""
        if self._done:
            return
        self._release()
        self._done = True
        self._cache.writing.discard(self._key)
        self._file.close()

    def _release(self) -> None:
        self.fetched()
        if self._reserved:
            self._cache.release_spool(self._reserved)
            self._reserved = 0


class MessageCache:
    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self._secret = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, CachedMessage] = OrderedDict()
        self._bytes = 0
        # Keys whose first RETR is being written: a second session fetches on its own.
        self.writing: set[bytes] = set()
        # Bytes reserved by spools not yet kept (kept messages make room for them).
        self._spooled = 0
        self._spool_fetches = 0

    @property
    def limit(self) -> int:
        return self.settings.max_bytes

    def key(self, upstream: str, account: str, folder: str, uidvalidity: int, uid: int) -> bytes:
        text = "\0".join((upstream, account, folder, str(uidvalidity), str(uid)))
        return hmac.new(self._secret, text.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    def worth_keeping(self, size: int) -> bool:
        settings = self.settings
        return settings.max_bytes > 0 and settings.min_message_bytes <= size <= settings.max_bytes

    def get(self, key: bytes, size: int) -> CachedMessage | None:
        """The message kept under `key`, if it was listed as `size` then too."""
        found = self._entries.get(key)
        if found is not None and found.size == size:
            self._entries.move_to_end(key)
            metrics.MESSAGE_CACHE_HITS.inc()
            return found
        return None

    def writer(self, key: bytes, size: int) -> CacheWriter | None:
        """A writer for the first RETR of `key`, or None (being written by another session,
        too many being written, or no temporary file to be had)."""
        if key in self.writing or key in self._entries or len(self.writing) >= self.settings.max_messages:
            # Being written already, kept already, or as many being written as may be kept
            # (each is a descriptor).
            return None
        try:
            file = tempfile.TemporaryFile(buffering=0, dir=self.settings.directory or None)
        except OSError as exc:
            _log.warning("message_cache_write_failed", error=exc.strerror)
            return None
        self.writing.add(key)
        return CacheWriter(self, key, file, size)

    def keep(self, key: bytes, entry: CachedMessage) -> None:
        self.writing.discard(key)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.length
            old.drop()
        self._entries[key] = entry
        self._bytes += entry.length
        self._make_room()

    def reserve_spool(self, size: int) -> bool:
        """Room for a spool of a message of `size` (see the module's docstring)."""
        if self._spool_fetches >= _SPOOL_FETCHES or self._spooled + size > self.settings.max_bytes:
            return False
        self._spooled += size
        self._spool_fetches += 1
        metrics.MESSAGE_SPOOL_BYTES.set(self._spooled)
        self._make_room()
        return True

    def end_spool_fetch(self) -> None:
        self._spool_fetches -= 1

    def release_spool(self, size: int) -> None:
        self._spooled -= size
        metrics.MESSAGE_SPOOL_BYTES.set(self._spooled)

    def _make_room(self) -> None:
        settings = self.settings
        while self._entries and (
            self._bytes + self._spooled > settings.max_bytes or len(self._entries) > settings.max_messages
        ):
            _old_key, old = self._entries.popitem(last=False)
            self._bytes -= old.length
            old.drop()
        metrics.MESSAGE_CACHE_BYTES.set(self._bytes)

    def close(self) -> None:
        for entry in self._entries.values():
            entry.drop()
        self._entries.clear()
        self._bytes = 0
        metrics.MESSAGE_CACHE_BYTES.set(0)


class AccountCache:
    """The message cache as the sessions of one account and folder see it."""

    def __init__(self, cache: MessageCache, upstream: str, account: str, folder: str, uidvalidity: int) -> None:
        self.cache = cache
        self._where = (upstream, account, folder, uidvalidity)

    def key(self, uid: int) -> bytes:
        return self.cache.key(*self._where, uid)
