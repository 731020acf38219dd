"""What the POP3 side needs from an upstream connection: the maildrop, read and changed by UID.

`MaildropStore` is that contract (bridge.session and bridge.policy.deletion use it). The
per-device state's own needs are `bridge.policy.device_state.StateBackend`; one
`bridge.imap.mailbox.ImapMailbox` implements both, whichever engine is below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from bridge.imap.snapshot import MailboxSnapshot


class RangeReader(Protocol):
    async def next_piece(self, most: int | None = None) -> bytes:
        """The next piece of the range (at most `most` bytes where the engine streams), b""
        once it is all read. The first call raises MessageGone if the UID no longer exists,
        before any byte is returned."""
        ...


class MaildropStore(Protocol):
    """One authenticated IMAP connection, serving the POP3 maildrop folder."""

    @property
    def capabilities(self) -> frozenset[str]:
        """What the server offers, less upstream.ignore_capabilities."""
        ...

    async def snapshot(self) -> MailboxSnapshot:
        """UIDs and sizes of the messages not flagged \\Deleted, in UID order."""
        ...

    async def fetch_range(self, uid: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the message as the server stores it, without
        setting \\Seen. Raises MessageGone if the UID no longer exists."""
        ...

    def open_range(self, uid: int, offset: int, length: int) -> AbstractAsyncContextManager[RangeReader]:
        """Bytes [offset, offset+length) of the message, read piece by piece as they arrive
        (memory stays flat however big the message). The connection is this reader's until the
        context ends; leaving it before the last piece leaves the connection unusable (it is
        dropped, not parked)."""
        ...

    async def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        """Whole small maildrop messages by UID, in one round trip; UIDs that no longer exist
        are absent from the result."""
        ...

    async def delete(self, uids: Sequence[int]) -> None:
        """Flag exactly these UIDs \\Deleted and expunge exactly these UIDs."""
        ...

    async def move(self, uids: Sequence[int], folder: str) -> None:
        """Move exactly these UIDs to `folder` (created if missing): MOVE, else COPY and
        delete as above."""
        ...

    async def add_flags(self, uids: Sequence[int], flags: str) -> None:
        """Add flags (e.g. "\\Seen") to exactly these UIDs of the maildrop."""
        ...


class ChunkedRangeReader:
    """A `RangeReader` made of `fetch_range` calls, one partial FETCH of at most `chunk`
    bytes per piece: for an engine that cannot hand out a literal as it arrives, and for TOP
    (which usually needs only the first piece)."""

    def __init__(self, store: MaildropStore, uid: int, offset: int, length: int, chunk: int) -> None:
        self._store = store
        self._uid = uid
        self._offset = offset
        self._remaining = length
        self._chunk = chunk

    async def next_piece(self, most: int | None = None) -> bytes:
        # `most` is not followed: each piece is a FETCH of its own, `chunk` bytes.
        if self._remaining <= 0:
            return b""
        asked = min(self._chunk, self._remaining)
        data = await self._store.fetch_range(self._uid, self._offset, asked)
        # Fewer bytes than asked for: the message ends here.
        self._remaining = self._remaining - len(data) if len(data) == asked else 0
        self._offset += len(data)
        return data
